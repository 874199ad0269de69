"""A real etcd on loopback for tests, started by the test itself.

``with EtcdServer(tmp) as etcd:`` starts Debian's ``etcd`` (``make setup`` installs
it) on two free loopback ports with a fresh data directory under ``tmp``, waits until
it answers, and on exit kills it and removes the data directory, whether the test
passed, failed or crashed midway (the ``etcd_server`` fixture also covers a test
killed by pytest-timeout: the process is in a session of its own and is killed by
its process group). ``stop()``/``start()`` restart it on the same ports and data
(an outage), ``kill()`` is ``kill -9``, ``compact()`` compacts its history up to
now.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from stockade.etcd.client import EtcdClient


def etcd_binary() -> str | None:
    return shutil.which("etcd") or next(
        (p for p in ("/usr/bin/etcd", "/usr/local/bin/etcd") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls(directory: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    directory.mkdir(parents=True, exist_ok=True)
    d = str(directory)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    for who, ext in (("server", ["subjectAltName=IP:127.0.0.1",
                                   # etcd's JSON gateway dials etcd with the server's
                                   # certificate: it is a client certificate too.
                                   "extendedKeyUsage=serverAuth,clientAuth"]),
                     ("client", ["extendedKeyUsage=clientAuth"])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
            "-keyout", f"{who}.key", "-out", f"{who}.csr")
        (directory / f"{who}.ext").write_text("".join(f"{line}\n" for line in ext))
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{who}.ext", "-out", f"{who}.crt")
    return TlsFiles(f"{d}/ca.crt", f"{d}/server.crt", f"{d}/server.key", f"{d}/client.crt",
                    f"{d}/client.key")


class EtcdServer:
    def __init__(self, tmp: Path, *, name: str = "default", tls: bool = False) -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed (make setup installs etcd-server)")
        self.binary = binary
        self.dir = Path(tmp) / f"etcd-{name}"
        self.data = self.dir / "data"
        self.log = self.dir / "etcd.log"
        self.name = name
        self.port = free_port()
        self.peer_port = free_port()
        # With tls: https, a server certificate, and client certificates required.
        self.tls = make_tls(self.dir / "tls") if tls else None
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    # ---- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> EtcdServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 20.0) -> EtcdServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.dir.mkdir(parents=True, exist_ok=True)
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [self.binary, "--name", self.name, "--data-dir", str(self.data),
               "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"{self.name}={peer}",
               "--initial-cluster-state", "new", "--logger", "zap", "--log-outputs", "stderr",
               # A quiet watch is told its progress every second (a bookmark).
               "--experimental-watch-progress-notify-interval", "1s"]
        if self.tls is not None:
            cmd += ["--cert-file", self.tls.server_cert, "--key-file", self.tls.server_key,
                    "--client-cert-auth", "--trusted-ca-file", self.tls.ca]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
        atexit.register(self.close)  # pytest itself interrupted: no etcd left behind
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {self.log.read_text()[-3000:]}")
            try:
                r = httpx.get(self.url + "/health", timeout=1.0, **self._httpx_tls())
                if r.status_code == 200 and r.json().get("health") == "true":
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd did not become healthy: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM, and wait (its data stays: start() brings it back)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.data, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- data -------------------------------------------------------------------------

    def _httpx_tls(self) -> dict[str, Any]:
        if self.tls is None:
            return {}
        import ssl

        ctx = ssl.create_default_context(cafile=self.tls.ca)
        ctx.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        return {"verify": ctx}

    def client(self, **kwargs: Any) -> EtcdClient:
        if self.tls is not None and "tls" not in kwargs:
            from stockade.etcd.client import TlsConfig

            kwargs["tls"] = TlsConfig(self.tls.client_cert, self.tls.client_key, self.tls.ca)
        return EtcdClient([self.url], **kwargs)

    def compact(self) -> int:
        """Compact the history up to the current revision; that revision."""
        with self.client() as c:
            header, _, _ = c.range("\0", "\0", limit=1)
            c.compact(header.revision)
            return header.revision
