"""The barrier before a slot's generation is written: membarrier's private expedited
command, registered for on first use, and the global command where that is refused.

The refusals cannot be had on this machine (its kernel serves both commands), so the
system call is replaced by one that refuses as a kernel before 4.14 or a filter would.
"""

from __future__ import annotations

import errno

import pytest

from stockade.datapath import libbpf


class _Kernel:
    def __init__(self, refused: dict[int, int], registered: bool = True) -> None:
        self.refused = refused  # command -> errno
        self.registered = registered
        self.calls: list[int] = []
        self.errno = 0

    def syscall(self, _nr: int, cmd: int, _flags: int, _cpu: int) -> int:
        self.calls.append(cmd)
        if cmd == libbpf._MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED:
            self.registered = True
        elif cmd == libbpf._MEMBARRIER_CMD_PRIVATE_EXPEDITED and not self.registered:
            self.errno = errno.EPERM
            return -1
        if cmd in self.refused:
            self.errno = self.refused[cmd]
            return -1
        return 0


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch):
    def make(refused: dict[int, int], registered: bool = True) -> _Kernel:
        k = _Kernel(refused, registered)
        monkeypatch.setattr(libbpf, "_libc", k)
        monkeypatch.setattr(libbpf.ctypes, "get_errno", lambda: k.errno)
        return k
    return make


PRIVATE = libbpf._MEMBARRIER_CMD_PRIVATE_EXPEDITED
REGISTER = libbpf._MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED
GLOBAL = libbpf._MEMBARRIER_CMD_GLOBAL


def test_the_private_command_registers_once_and_is_enough(kernel) -> None:
    k = kernel({}, registered=False)
    libbpf.barrier()
    libbpf.barrier()
    assert k.calls == [PRIVATE, REGISTER, PRIVATE, PRIVATE]


def test_a_refused_private_command_falls_back_to_the_global_one(kernel) -> None:
    k = kernel({PRIVATE: errno.EINVAL})
    libbpf.barrier()
    assert k.calls == [PRIVATE, GLOBAL]


def test_a_refused_registration_falls_back_to_the_global_one(kernel) -> None:
    k = kernel({REGISTER: errno.EPERM}, registered=False)
    libbpf.barrier()
    assert k.calls == [PRIVATE, REGISTER, GLOBAL]


def test_both_refused_is_an_error_naming_the_call(kernel) -> None:
    kernel({PRIVATE: errno.EINVAL, GLOBAL: errno.EINVAL})
    with pytest.raises(libbpf.BpfError, match="membarrier"):
        libbpf.barrier()
