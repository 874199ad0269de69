"""Running a delegated IPAM plugin (e.g. ``host-local``) as the spec describes (effects).

The plugin is the executable named by ``ipam.type``, found in the directories
of ``CNI_PATH``; it runs with our own ``CNI_*`` variables but its own
``CNI_COMMAND``, reads the same network configuration on stdin and answers on
stdout: a result for ADD, nothing for the others, an error object and a
non-zero exit on failure, which is passed on to our caller unchanged.

Versions: the reference plugins speak up to 1.0.0, so a 1.1.0 configuration
would be refused with code 1. Then the delegate's VERSION is asked and the
call repeated in the newest version both speak; its result is converted back
to the configuration's version.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from stockade.cni.spec import (
    INCOMPATIBLE_VERSION,
    INTERNAL,
    INVALID_CONFIG,
    VERSIONS,
    CniError,
    Env,
    NetConf,
    Result,
    decode_json,
    delegate_conf,
    highest_common,
    parse_result,
)

TIMEOUT = 60.0


@dataclass(frozen=True)
class Delegate:
    """One IPAM plugin, for one invocation's environment and configuration."""

    conf: NetConf
    env: Env

    @property
    def type(self) -> str:
        assert self.conf.ipam is not None
        return str(self.conf.ipam["type"])

    def find(self) -> str:
        for directory in self.env.path:
            candidate = os.path.join(directory, self.type)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
        raise CniError(INVALID_CONFIG, f"failed to find plugin {self.type!r} in path",
                       ":".join(self.env.path))

    def add(self) -> Result:
        out = self._call("ADD")
        if out is None:
            raise CniError(INTERNAL, f"IPAM plugin {self.type} returned no result")
        return out

    def delete(self) -> None:
        self._call("DEL")

    def check(self) -> None:
        self._call("CHECK")

    def gc(self) -> None:
        """GC if the plugin speaks 1.1.0 (older ones have no GC)."""
        if "1.1.0" in self.versions():
            self._call("GC")

    def status(self) -> None:
        if "1.1.0" in self.versions():
            self._call("STATUS")

    def versions(self) -> tuple[str, ...]:
        stdin = json.dumps({"cniVersion": self.conf.cni_version}).encode()
        out = self._run("VERSION", stdin)
        report = decode_json(out, f"VERSION answer of {self.type}")
        found = report.get("supportedVersions")
        if not isinstance(found, list):
            return ()
        return tuple(str(v) for v in found)

    def _call(self, command: str) -> Result | None:
        version = self.conf.cni_version
        try:
            out = self._run(command, delegate_conf(self.conf, version))
        except CniError as exc:
            if exc.code != INCOMPATIBLE_VERSION:
                raise
            common = highest_common(VERSIONS, self.versions())
            if common is None or common == version:
                raise
            version = common
            out = self._run(command, delegate_conf(self.conf, version))
        if command != "ADD":
            return None
        return parse_result(decode_json(out, f"result of {self.type}"), f"{self.type} result")

    def _run(self, command: str, stdin: bytes) -> bytes:
        env = dict(self.env.inherited)  # CNI_ARGS passes on as the runtime wrote it
        env.update({"CNI_COMMAND": command, "CNI_CONTAINERID": self.env.container_id,
                    "CNI_NETNS": self.env.netns, "CNI_IFNAME": self.env.ifname,
                    "CNI_PATH": ":".join(self.env.path)})
        try:
            proc = subprocess.run([self.find()], input=stdin, capture_output=True, env=env,
                                  timeout=TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CniError(INTERNAL, f"cannot run IPAM plugin {self.type}", str(exc)) from None
        if proc.returncode != 0:
            raise _error_of(self.type, proc.stdout, proc.stderr)
        return proc.stdout


def _error_of(plugin: str, stdout: bytes, stderr: bytes) -> CniError:
    """The delegate's error object, passed on; or one that quotes what it printed."""
    try:
        raw = json.loads(stdout)
    except ValueError:
        raw = None
    if isinstance(raw, Mapping) and isinstance(raw.get("code"), int):
        return CniError(int(raw["code"]), f"{plugin}: {raw.get('msg', 'failed')}",
                        str(raw.get("details", "")))
    text = (stdout or stderr).decode(errors="replace").strip()[:500]
    return CniError(INTERNAL, f"IPAM plugin {plugin} failed", text)
