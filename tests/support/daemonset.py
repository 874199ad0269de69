"""A command run in a podman container shaped as the agent's DaemonSet runs it.

Host network; the DaemonSet's four capabilities (NET_ADMIN, NET_RAW, SYS_ADMIN,
BPF) and no other; a PID and a mount namespace of its own with a read-only root
(an empty directory, with /usr, /etc, the interpreter and the source tree mounted
read-only in place of an image, which these machines cannot pull); the given
directories from the host, read-write, at their own paths; and /run/netns from
the host with ``rslave`` propagation, as ``mountPropagation: HostToContainer``
gives it (namespaces made after the start reach the container).

    with Contained(tmp, "name", [tmp / "state"]) as box:
        subprocess.Popen(box.command(["stockade", "agent", ...]))

Leaving the block removes the container and podman's storage (private to the
block: the host's podman storage is not touched).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]
CAPABILITIES = "NET_ADMIN,NET_RAW,SYS_ADMIN,BPF"  # deploy/agent-daemonset.yaml's


class Contained:
    def __init__(self, tmp: Path, name: str, shared: Sequence[Path]) -> None:
        self.name = name
        self.shared = list(shared)
        self.rootfs = tmp / f"rootfs-{name}"
        # short: podman refuses a runroot longer than 50 characters
        self.storage = Path(tempfile.mkdtemp(prefix="stk-pod-"))
        self.podman = ["podman", "--root", str(self.storage / "root"), "--runroot",
                       str(self.storage / "run")]
        for d in ("usr", "etc", "proc", "sys", "dev", "tmp", "run", "var"):
            (self.rootfs / d).mkdir(parents=True, exist_ok=True)
        for link in ("bin", "lib", "lib64", "sbin"):
            if not (self.rootfs / link).is_symlink():
                (self.rootfs / link).symlink_to(f"usr/{link}")

    def command(self, argv: Sequence[str]) -> list[str]:
        """``podman run`` of ``argv`` in the container (attached: its output is podman's)."""
        volumes = [f"{p}:{p}:ro" for p in sorted({"/usr", "/etc", sys.base_prefix, str(ROOT)})]
        volumes += [f"{p}:{p}" for p in self.shared] + ["/run/netns:/run/netns:rslave"]
        return [*self.podman, "run", "--rm", "--name", self.name, "--network", "host",
                "--cap-drop", "ALL", "--cap-add", CAPABILITIES, "--read-only",
                # root here lacks CAP_SYS_RESOURCE to raise podman's default limits
                "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                "--env", "PYTHONDONTWRITEBYTECODE=1",
                *(f"--volume={v}" for v in volumes), "--rootfs", str(self.rootfs), *argv]

    def remove(self) -> None:
        subprocess.run([*self.podman, "rm", "--force", "--time", "0", self.name],
                       capture_output=True, check=False, timeout=60)
        shutil.rmtree(self.storage, ignore_errors=True)

    def __enter__(self) -> Contained:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()
