"""libbpf (libbpf.so.1, Debian's libbpf1) through ctypes: only what the eBPF datapath uses.

Loading an object with its maps pinned (reused when already pinned), pinning
and getting objects, map batches, tcx links, object info, and ring buffers.
Every call that fails raises `BpfError` (a DataplaneError) with errno's text and
what libbpf printed meanwhile (the verifier's log, for a refused program).

Why in-process: one batch of 10,000 map entries through libbpf takes a few
milliseconds, where one `bpftool` process costs ~45 ms before it does anything
(see the README's measurements).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterator

from stockade.errors import DataplaneError

BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_LINK_TYPE_TCX = 11
BPF_ANY = 0
BPF_F_NO_PREALLOC = 1

_SYS_MEMBARRIER = 324  # x86_64
_MEMBARRIER_CMD_GLOBAL = 1
_MEMBARRIER_CMD_PRIVATE_EXPEDITED = 1 << 3
_MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED = 1 << 4
# What a map without a batch operation answers: EINVAL, EOPNOTSUPP, or the kernel's
# own ENOTSUPP (524, which Python's errno does not name).
_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, 524})


class BpfError(DataplaneError):
    """A libbpf call failed; `errno` says why."""

    def __init__(self, message: str, err: int, log: str = "") -> None:
        super().__init__(f"{message}: {os.strerror(err)}", stderr=log[-4000:])
        self.errno = err


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)
_log = threading.local()
_load_lock = threading.Lock()


def _printer(level: int, fmt: bytes | None, args: int | None) -> int:
    """libbpf's messages, formatted by vsnprintf and kept for the error being built."""
    buf = ctypes.create_string_buffer(4096)
    _libc.vsnprintf(buf, ctypes.c_size_t(len(buf)), ctypes.c_char_p(fmt), ctypes.c_void_p(args))
    lines: list[str] | None = getattr(_log, "lines", None)
    if lines is not None and len(lines) < 2000:
        lines.append(buf.value.decode(errors="replace"))
    return 0


_PRINTER = _PRINT_FN(_printer)  # kept alive for as long as libbpf may call it


def lib() -> ctypes.CDLL:
    """libbpf.so.1, loaded once, with its messages captured."""
    global _lib
    with _load_lock:
        if _lib is None:
            name = ctypes.util.find_library("bpf") or "libbpf.so.1"
            try:
                handle = ctypes.CDLL(name, use_errno=True)
            except OSError as exc:
                raise DataplaneError("cannot load libbpf (install the Debian package libbpf1)",
                                     stderr=str(exc)) from None
            vp, i, u32p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32)
            sigs: dict[str, tuple[object, list[object]]] = {
                "libbpf_set_print": (vp, [vp]),
                "bpf_object__open_file": (vp, [ctypes.c_char_p, vp]),
                "bpf_object__next_map": (vp, [vp, vp]),
                "bpf_object__load": (i, [vp]),
                "bpf_object__close": (None, [vp]),
                "bpf_object__find_program_by_name": (vp, [vp, ctypes.c_char_p]),
                "bpf_map__name": (ctypes.c_char_p, [vp]),
                "bpf_map__set_pin_path": (i, [vp, ctypes.c_char_p]),
                "bpf_program__fd": (i, [vp]),
                "bpf_map__fd": (i, [vp]),
                "bpf_obj_pin": (i, [i, ctypes.c_char_p]),
                "bpf_obj_get": (i, [ctypes.c_char_p]),
                "bpf_map_get_fd_by_id": (i, [ctypes.c_uint32]),
                "bpf_map_update_batch": (i, [i, vp, vp, u32p, vp]),
                "bpf_map_delete_batch": (i, [i, vp, u32p, vp]),
                "bpf_map_lookup_batch": (i, [i, vp, vp, vp, vp, u32p, vp]),
                "bpf_map_update_elem": (i, [i, vp, vp, ctypes.c_uint64]),
                "bpf_map_delete_elem": (i, [i, vp]),
                "bpf_map_lookup_elem": (i, [i, vp, vp]),
                "bpf_map_get_next_key": (i, [i, vp, vp]),
                "bpf_link_create": (i, [i, i, i, vp]),
                "bpf_link_detach": (i, [i]),
                "bpf_link_update": (i, [i, i, vp]),
                "bpf_obj_get_info_by_fd": (i, [i, vp, u32p]),
                "bpf_prog_query": (i, [i, i, ctypes.c_uint32, u32p, vp, u32p]),
                "bpf_prog_test_run_opts": (i, [i, vp]),
                "ring_buffer__new": (vp, [i, SAMPLE_FN, vp, vp]),
                "ring_buffer__poll": (i, [vp, i]),
                "ring_buffer__free": (None, [vp]),
            }
            for fn, (restype, argtypes) in sigs.items():
                f = getattr(handle, fn)
                f.restype = restype
                f.argtypes = argtypes
            handle.libbpf_set_print(ctypes.cast(_PRINTER, ctypes.c_void_p))
            _lib = handle
        return _lib


class captured:
    """Collects what libbpf prints inside the block (per thread)."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        _log.lines = self.lines
        return self.lines

    def __exit__(self, *exc: object) -> None:
        _log.lines = None

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _check(rc: int, what: str, log: str = "") -> int:
    """libbpf 1.x returns -errno (and sets errno)."""
    if rc < 0:
        raise BpfError(what, -rc if rc != -1 else ctypes.get_errno() or errno.EINVAL, log)
    return rc


def load_object(path: str, pins: dict[str, str]) -> tuple[dict[str, int], dict[str, int]]:
    """Open and load an object file, each map pinned at pins[name] (reused if there).

    Returns new file descriptors of its programs and maps by name; the object
    itself is closed (the caller pins or closes what it keeps).
    """
    bpf = lib()
    cap = captured()
    with cap:
        obj = bpf.bpf_object__open_file(path.encode(), None)
        if not obj:
            raise BpfError(f"cannot open {path}", ctypes.get_errno() or errno.EINVAL, cap.text)
        try:
            maps: dict[str, int] = {}
            m = bpf.bpf_object__next_map(obj, None)
            handles = []
            while m:
                name = bpf.bpf_map__name(m).decode()
                if name in pins:
                    _check(bpf.bpf_map__set_pin_path(m, pins[name].encode()),
                           f"map {name}: pin path")
                handles.append((name, m))
                m = bpf.bpf_object__next_map(obj, m)
            _check(bpf.bpf_object__load(obj), f"loading {path}", cap.text)
            for name, m in handles:
                fd = bpf.bpf_map__fd(m)
                maps[name] = os.dup(_check(fd, f"map {name}"))
            progs: dict[str, int] = {}
            for prog in ("stockade_from_pod", "stockade_to_pod"):
                p = bpf.bpf_object__find_program_by_name(obj, prog.encode())
                if not p:
                    raise BpfError(f"{path} has no program {prog}", errno.ENOENT)
                progs[prog] = os.dup(_check(bpf.bpf_program__fd(p), f"program {prog}"))
            return progs, maps
        finally:
            bpf.bpf_object__close(obj)


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, path.encode()), f"pinning {path}")


def obj_get(path: str) -> int:
    return _check(lib().bpf_obj_get(path.encode()), f"opening {path}")


def update_batch(fd: int, keys: list[bytes], values: list[bytes], key_size: int,
                 value_size: int) -> None:
    """Write many entries: one BPF_MAP_UPDATE_BATCH where the map has it, else one by one."""
    if not keys:
        return
    kbuf = ctypes.create_string_buffer(b"".join(keys), key_size * len(keys))
    vbuf = ctypes.create_string_buffer(b"".join(values), value_size * len(values))
    count = ctypes.c_uint32(len(keys))
    rc = lib().bpf_map_update_batch(fd, kbuf, vbuf, ctypes.byref(count), None)
    if rc == 0:
        return
    if -rc not in _UNSUPPORTED:
        _check(rc, "map batch update")
    done = count.value if -rc != errno.EINVAL else 0
    for k, v in zip(keys[done:], values[done:], strict=True):
        update(fd, k, v)


def delete_batch(fd: int, keys: list[bytes], key_size: int) -> None:
    """Delete many entries (missing ones are not an error)."""
    if not keys:
        return
    kbuf = ctypes.create_string_buffer(b"".join(keys), key_size * len(keys))
    count = ctypes.c_uint32(len(keys))
    rc = lib().bpf_map_delete_batch(fd, kbuf, ctypes.byref(count), None)
    if rc == 0:
        return
    for k in keys:
        delete(fd, k)


def update(fd: int, key: bytes, value: bytes) -> None:
    _check(lib().bpf_map_update_elem(fd, key, value, BPF_ANY), "map update")


def delete(fd: int, key: bytes) -> None:
    rc = lib().bpf_map_delete_elem(fd, key)
    if rc < 0 and -rc != errno.ENOENT:
        _check(rc, "map delete")


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    buf = ctypes.create_string_buffer(value_size)
    rc = lib().bpf_map_lookup_elem(fd, key, buf)
    if rc < 0:
        if -rc == errno.ENOENT:
            return None
        _check(rc, "map lookup")
    return buf.raw


def keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key of a map (get_next_key from the start)."""
    bpf = lib()
    cur = ctypes.create_string_buffer(key_size)
    nxt = ctypes.create_string_buffer(key_size)
    rc = bpf.bpf_map_get_next_key(fd, None, nxt)
    seen = 0
    while rc == 0:
        yield nxt.raw
        seen += 1
        ctypes.memmove(cur, nxt, key_size)
        rc = bpf.bpf_map_get_next_key(fd, cur, nxt)
    if -rc != errno.ENOENT:
        _check(rc, "map iteration")


def dump(fd: int, key_size: int, value_size: int, *, batched: bool = True
         ) -> dict[bytes, bytes]:
    """Every entry of a map: BPF_MAP_LOOKUP_BATCH where the map has it (and `batched`),
    else key by key.

    A batch is one system call for thousands of entries; key by key is two calls
    through ctypes per entry (bench/ebpf.py compares the two).
    """
    if batched:
        try:
            return _dump_batched(fd, key_size, value_size)
        except _NoBatch:
            pass
    out: dict[bytes, bytes] = {}
    for k in list(keys(fd, key_size)):
        v = lookup(fd, k, value_size)
        if v is not None:
            out[k] = v
    return out


class _NoBatch(Exception):
    """The map (or the kernel) has no batched lookup; nothing was read."""


_BATCH = 8192  # entries a batch asks for: ~0.5 MB of buffers for the widest map


def _dump_batched(fd: int, key_size: int, value_size: int) -> dict[bytes, bytes]:
    bpf = lib()
    # The position token is a key for the generic batch (tries, arrays) and a
    # bucket number for hash maps: room for either.
    token = max(key_size, 8)
    position, following = ctypes.create_string_buffer(token), ctypes.create_string_buffer(token)
    size = _BATCH
    kbuf, vbuf = ctypes.create_string_buffer(key_size * size), ctypes.create_string_buffer(
        value_size * size)
    key_cut, value_cut = struct.Struct(f"{key_size}s"), struct.Struct(f"{value_size}s")
    out: dict[bytes, bytes] = {}
    first = True
    while True:
        count = ctypes.c_uint32(size)
        rc = bpf.bpf_map_lookup_batch(fd, None if first else position, following, kbuf, vbuf,
                                      ctypes.byref(count), None)
        err = -rc if rc < 0 else 0
        if first and err in _UNSUPPORTED:
            raise _NoBatch
        if err == errno.ENOSPC and count.value == 0:
            size *= 2  # one hash bucket holds more entries than the batch has room for
            kbuf = ctypes.create_string_buffer(key_size * size)
            vbuf = ctypes.create_string_buffer(value_size * size)
            continue
        if err not in (0, errno.ENOENT):
            _check(rc, "map batch lookup")
        n = count.value
        # cut by struct (in C): half the time of slicing in a loop
        out.update(zip([k for (k,) in key_cut.iter_unpack(ctypes.string_at(kbuf, key_size * n))],
                       [v for (v,) in value_cut.iter_unpack(
                           ctypes.string_at(vbuf, value_size * n))], strict=True))
        if err == errno.ENOENT:  # the last batch (possibly empty)
            return out
        ctypes.memmove(position, following, token)
        first = False


def link_create(prog_fd: int, ifindex: int, attach_type: int) -> int:
    return _check(lib().bpf_link_create(prog_fd, ifindex, attach_type, None),
                  f"attaching to interface {ifindex}")


def link_detach(link_fd: int) -> None:
    rc = lib().bpf_link_detach(link_fd)
    if rc < 0 and -rc not in (errno.ENOLINK, errno.ENOENT, errno.EINVAL):
        _check(rc, "detaching a link")


def link_update(link_fd: int, prog_fd: int) -> None:
    _check(lib().bpf_link_update(link_fd, prog_fd, None), "replacing a link's program")


def info(fd: int, size: int = 256) -> bytes:
    buf = ctypes.create_string_buffer(size)
    n = ctypes.c_uint32(size)
    _check(lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(n)), "object info")
    return buf.raw


def obj_id(fd: int) -> int:
    """A map's or program's id (struct bpf_map_info and bpf_prog_info: type, id)."""
    return int.from_bytes(info(fd)[4:8], "little")


def map_name(fd: int) -> str:
    """A map's name as the object named it (struct bpf_map_info: name[16] at 24)."""
    return info(fd)[24:40].split(b"\0", 1)[0].decode(errors="replace")


def map_by_id(map_id: int) -> int:
    """A descriptor of the map with that id (one no pin reaches any more too)."""
    fd: int = lib().bpf_map_get_fd_by_id(map_id)
    _check(fd, f"opening map {map_id}")
    return fd


def prog_map_ids(fd: int) -> set[int]:
    """The ids of the maps a program holds (struct bpf_prog_info: nr_map_ids at 52, the
    address of an array the kernel fills at 56)."""
    n = int.from_bytes(info(fd)[52:56], "little")
    ids = (ctypes.c_uint32 * max(n, 1))()
    buf = ctypes.create_string_buffer(256)
    struct.pack_into("=IQ", buf, 52, n, ctypes.addressof(ids))
    size = ctypes.c_uint32(len(buf))
    _check(lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), "program info")
    return set(ids[:n])


def map_layout(fd: int) -> tuple[int, int]:
    """A map's key and value sizes (struct bpf_map_info: type, id, key_size, value_size)."""
    raw = info(fd)
    return int.from_bytes(raw[8:12], "little"), int.from_bytes(raw[12:16], "little")


def prog_id_tag(fd: int) -> tuple[int, bytes]:
    """A program's id and tag (struct bpf_prog_info: type, id, tag[8])."""
    raw = info(fd)
    return int.from_bytes(raw[4:8], "little"), raw[8:16]


def link_info(fd: int) -> tuple[int, int, int, int]:
    """(link type, program id, ifindex, attach type) of a tcx link (struct bpf_link_info)."""
    raw = info(fd, 128)
    return (int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[8:12], "little"),
            int.from_bytes(raw[16:20], "little"), int.from_bytes(raw[20:24], "little"))


def attached_programs(ifindex: int, attach_type: int) -> list[int]:
    """The ids of the programs on a hook of an interface of the calling thread's
    namespace (BPF_PROG_QUERY; for tcx the target is the ifindex), in the order they
    run: one call, where opening a link's pin and reading it are three."""
    size = 8
    while True:
        ids = (ctypes.c_uint32 * size)()
        count = ctypes.c_uint32(size)
        rc = lib().bpf_prog_query(ifindex, attach_type, 0, None, ids, ctypes.byref(count))
        if rc < 0 and -rc == errno.ENOSPC and size < 1024:
            size *= 8
            continue
        _check(rc, f"listing the programs of interface {ifindex}")
        return list(ids[:count.value])


SKB_IFINDEX = 40  # offsetof(struct __sk_buff, ifindex)


def test_run(prog_fd: int, packet: bytes, repeat: int, *, ifindex: int = 0
             ) -> tuple[int, int]:
    """(return value, mean ns per run) of BPF_PROG_TEST_RUN over one packet.

    The packet arrives on the loopback device unless `ifindex` (> 1) names another
    interface of the calling thread's network namespace: the program's skb->ifindex.
    """

    class Opts(ctypes.Structure):
        _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p),
                    ("data_out", ctypes.c_void_p), ("data_size_in", ctypes.c_uint32),
                    ("data_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_void_p),
                    ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                    ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                    ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                    ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                    ("batch_size", ctypes.c_uint32)]

    data = ctypes.create_string_buffer(packet, len(packet))
    opts = Opts(sz=ctypes.sizeof(Opts), data_in=ctypes.cast(data, ctypes.c_void_p),
                data_size_in=len(packet), repeat=repeat)
    if ifindex:
        # a struct __sk_buff cut after ifindex: the kernel zero-fills the rest, and
        # refuses every field before it but mark and priority unless zero
        ctx = ctypes.create_string_buffer(
            bytes(SKB_IFINDEX) + ifindex.to_bytes(4, sys.byteorder), SKB_IFINDEX + 4)
        opts.ctx_in = ctypes.cast(ctx, ctypes.c_void_p)
        opts.ctx_size_in = SKB_IFINDEX + 4
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "test run")
    return int(opts.retval), int(opts.duration)


def barrier() -> None:
    """A full memory barrier in the calling thread, between its syscalls: a map entry
    written by an earlier one is seen by every CPU before a later one reads a map.

    membarrier's private expedited command starts with the kernel's smp_mb() (a
    system call's entry is not one) and interrupts only the CPUs running this
    process's other threads: microseconds, where MEMBARRIER_CMD_GLOBAL waits a grace
    period. The process registers for it once (a forked child anew). Where that
    command is refused (a kernel before 4.14, a filter on system calls), the global
    one serves: slower, and a full barrier on every CPU all the same.
    """
    for _ in range(2):
        if int(_libc.syscall(_SYS_MEMBARRIER, _MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0)) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EPERM:
            break
        if int(_libc.syscall(_SYS_MEMBARRIER, _MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                             0, 0)) != 0:
            err = ctypes.get_errno()
            break
    if int(_libc.syscall(_SYS_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL, 0, 0)) == 0:
        return
    raise BpfError("membarrier", err)


def synchronize() -> None:
    """Wait until every program running now has finished (an RCU grace period).

    tc programs run inside RCU read-side sections; MEMBARRIER_CMD_GLOBAL
    returns after synchronize_rcu(), so a program that read the old slot is done.
    """
    if int(_libc.syscall(_SYS_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL, 0, 0)) != 0:
        raise BpfError("membarrier", ctypes.get_errno())


class RingBuffer:
    """A BPF ring buffer map read through libbpf; `on_sample` gets each record's bytes."""

    def __init__(self, map_fd: int, on_sample: Callable[[bytes], None]) -> None:
        def sample(_ctx: int | None, data: int | None, size: int) -> int:
            if data is not None:
                on_sample(ctypes.string_at(data, size))
            return 0

        self._cb = SAMPLE_FN(sample)
        rb = lib().ring_buffer__new(map_fd, self._cb, None, None)
        if not rb:
            raise BpfError("ring buffer", ctypes.get_errno() or errno.EINVAL)
        self._rb: int | None = rb

    def poll(self, timeout_ms: int) -> int:
        if self._rb is None:
            return 0
        rc = lib().ring_buffer__poll(self._rb, timeout_ms)
        if rc < 0 and -rc != errno.EINTR:
            _check(rc, "ring buffer poll")
        return max(int(rc), 0)

    def close(self) -> None:
        if self._rb is not None:
            lib().ring_buffer__free(self._rb)
            self._rb = None
