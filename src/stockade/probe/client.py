"""The probe client: tries many (source, destination, port, protocol) at once.

Design: a socket belongs to the namespace it was created in, so one thread can
drive every probe of every source. For each source namespace the calling
thread enters it (in-process ``setns``), creates that source's sockets and
starts them (non-blocking ``connect``, first datagram), and leaves; then one
``selectors`` loop waits for all answers together. The whole matrix of a
conformance step therefore costs about one timeout, not one per probe.

Verdicts:

* TCP / native SCTP: the handshake completing is ``ALLOWED``; a timeout is
  ``DENIED`` (dropped); ``ECONNREFUSED`` is ``REFUSED`` (a RST: either a
  reject rule or nobody listening — servers listen on every probed port, so
  this is reported apart to make misconfiguration visible); ICMP unreachable
  and local ``EPERM``/``EACCES`` are ``UNREACHABLE``.
* UDP: a datagram with a random token is sent over a connected socket and
  resent every ``resend`` seconds; the echo of the token is ``ALLOWED``; an
  ICMP port unreachable surfaces as ``REFUSED``; silence is ``DENIED``.
* raw SCTP (kernels without SCTP, see :mod:`stockade.probe.sctp`): INIT is
  resent like UDP; a matching INIT ACK is ``ALLOWED``, an ABORT ``REFUSED``.

Only ``ALLOWED`` counts as allowed; every other outcome is a kind of denied.

Public API::

    Probe(src, src_netns, dst, address, port)
    Outcome, ProbeResult(probe, outcome, detail, elapsed)
    run_probes(probes, timeout=1.0, resend=0.25) -> list[ProbeResult]
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import os
import resource
import secrets
import selectors
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby

from stockade.errors import NetError
from stockade.net.namespace import entered
from stockade.probe import sctp
from stockade.probe.protocol import Port, Protocol

_UNREACHABLE = {
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EACCES,
    errno.EPERM,
    errno.EHOSTDOWN,
}
_RESERVE_FDS = 64


class Outcome(enum.StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"  # no answer within the timeout: dropped
    REFUSED = "refused"  # RST, ICMP port unreachable or SCTP ABORT
    UNREACHABLE = "unreachable"  # ICMP host/net/admin unreachable, or local EPERM
    ERROR = "error"  # the probe could not be sent at all

    @property
    def allowed(self) -> bool:
        return self is Outcome.ALLOWED


@dataclass(frozen=True)
class Probe:
    """One attempt: from the ``src`` endpoint's namespace to ``address``:``port``."""

    src: str
    src_netns: str | None
    dst: str
    address: str
    port: Port

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.address else socket.AF_INET


@dataclass(frozen=True)
class ProbeResult:
    probe: Probe
    outcome: Outcome
    detail: str = ""
    elapsed: float = 0.0

    @property
    def allowed(self) -> bool:
        return self.outcome.allowed


@dataclass
class _Attempt:
    """A probe in flight. Mutable on purpose: it lives inside one run only."""

    probe: Probe
    started: float
    sock: socket.socket | None = None
    token: bytes = b""
    sport: int = 0
    tag: int = 0
    packet: bytes = b""
    next_send: float = 0.0
    verdict: ProbeResult | None = field(default=None)

    def finish(self, outcome: Outcome, detail: str = "") -> None:
        if self.verdict is None:
            elapsed = time.monotonic() - self.started
            self.verdict = ProbeResult(self.probe, outcome, detail, elapsed)
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _errno_outcome(code: int) -> Outcome:
    if code == errno.ECONNREFUSED:
        return Outcome.REFUSED
    if code in _UNREACHABLE:
        return Outcome.UNREACHABLE
    if code == errno.ETIMEDOUT:
        return Outcome.DENIED
    return Outcome.ERROR


def _raise_fd_limit(needed: int) -> int:
    """Raise the soft open-files limit towards the hard one; returns what is usable."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed + _RESERVE_FDS:
        target = (
            needed + _RESERVE_FDS
            if hard == resource.RLIM_INFINITY
            else min(hard, needed + _RESERVE_FDS)
        )
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(16, int(soft) - _RESERVE_FDS) if soft != resource.RLIM_INFINITY else needed


class _Run:
    """One batch of probes driven by one selector loop."""

    def __init__(self, probes: Sequence[Probe], timeout: float, resend: float) -> None:
        self.timeout = timeout
        self.resend = resend
        self.selector = selectors.DefaultSelector()
        self.attempts = [_Attempt(p, 0.0) for p in probes]
        self.raw: dict[tuple[str | None, int], socket.socket] = {}
        self.waiting_raw: dict[tuple[int, str, int, int], _Attempt] = {}
        self.mode = (
            sctp.sctp_mode() if any(p.port.protocol is Protocol.SCTP for p in probes) else "native"
        )

    def run(self) -> list[ProbeResult]:
        try:
            order = sorted(self.attempts, key=lambda a: a.probe.src_netns or "")
            for netns, group in groupby(order, key=lambda a: a.probe.src_netns):
                with entered(netns):
                    for attempt in group:
                        self._start(attempt)
            self._loop()
        finally:
            for attempt in self.attempts:
                attempt.finish(Outcome.DENIED, "timeout")
            for sock in self.raw.values():
                sock.close()
            self.selector.close()
        return [a.verdict for a in self.attempts if a.verdict is not None]

    def _start(self, attempt: _Attempt) -> None:
        probe = attempt.probe
        attempt.started = time.monotonic()
        protocol = probe.port.protocol
        try:
            if protocol is Protocol.UDP:
                self._start_udp(attempt)
            elif protocol is Protocol.TCP or self.mode == "native":
                self._start_stream(attempt)
            elif self.mode == "raw":
                self._start_raw_sctp(attempt)
            else:
                attempt.finish(Outcome.ERROR, "kernel supports neither SCTP nor raw sockets")
        except OSError as exc:
            attempt.finish(_errno_outcome(exc.errno or 0), f"{exc}")

    def _start_stream(self, attempt: _Attempt) -> None:
        probe = attempt.probe
        proto = sctp.IPPROTO_SCTP if probe.port.protocol is Protocol.SCTP else 0
        sock = socket.socket(probe.family, socket.SOCK_STREAM, proto)
        attempt.sock = sock
        sock.setblocking(False)
        code = sock.connect_ex((probe.address, probe.port.number))
        if code == 0:
            attempt.finish(Outcome.ALLOWED)
        elif code in (errno.EINPROGRESS, errno.EAGAIN):
            self.selector.register(sock, selectors.EVENT_WRITE, attempt)
        else:
            attempt.finish(_errno_outcome(code), os.strerror(code))

    def _start_udp(self, attempt: _Attempt) -> None:
        probe = attempt.probe
        sock = socket.socket(probe.family, socket.SOCK_DGRAM)
        attempt.sock = sock
        sock.setblocking(False)
        sock.connect((probe.address, probe.port.number))
        attempt.token = secrets.token_bytes(16)
        attempt.packet = attempt.token
        self.selector.register(sock, selectors.EVENT_READ, attempt)
        self._send(attempt)

    def _start_raw_sctp(self, attempt: _Attempt) -> None:
        probe = attempt.probe
        key = (probe.src_netns, probe.family)
        raw = self.raw.get(key)
        if raw is None:
            raw = socket.socket(probe.family, socket.SOCK_RAW, sctp.IPPROTO_SCTP)
            raw.setblocking(False)
            self.raw[key] = raw
            self.selector.register(raw, selectors.EVENT_READ, key)
        attempt.sport = 32768 + secrets.randbelow(28232)
        attempt.tag = secrets.randbits(32) or 1
        attempt.packet = sctp.build_init(attempt.sport, probe.port.number, attempt.tag)
        self.waiting_raw[
            (probe.family, str(_canonical(probe.address)), attempt.sport, attempt.tag)
        ] = attempt
        self._send(attempt)

    def _send(self, attempt: _Attempt) -> None:
        attempt.next_send = time.monotonic() + self.resend
        probe = attempt.probe
        try:
            if attempt.sock is not None:
                attempt.sock.send(attempt.packet)
            else:
                raw = self.raw[(probe.src_netns, probe.family)]
                raw.sendto(attempt.packet, (probe.address, 0))
        except (BlockingIOError, InterruptedError):
            pass  # the resend will try again
        except OSError as exc:
            attempt.finish(_errno_outcome(exc.errno or 0), str(exc))

    def _pending(self) -> Iterator[_Attempt]:
        return (a for a in self.attempts if a.verdict is None)

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            wake = now + 3600.0
            for attempt in self._pending():
                deadline = attempt.started + self.timeout
                if now >= deadline:
                    attempt.finish(Outcome.DENIED, "timeout")
                    continue
                wake = min(wake, deadline)
                if attempt.packet and attempt.probe.port.protocol is not Protocol.TCP:
                    if now >= attempt.next_send:
                        self._send(attempt)
                    wake = min(wake, attempt.next_send)
            if next(self._pending(), None) is None:
                return
            for key, _ in self.selector.select(max(0.0, wake - time.monotonic())):
                if isinstance(key.data, _Attempt):
                    self._answer(key.data)
                else:
                    self._answer_raw(key.fileobj, key.data[1])  # type: ignore[arg-type]

    def _answer(self, attempt: _Attempt) -> None:
        sock = attempt.sock
        if sock is None or attempt.verdict is not None:
            return
        self.selector.unregister(sock)
        if attempt.probe.port.protocol is Protocol.UDP:
            try:
                data = sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                self.selector.register(sock, selectors.EVENT_READ, attempt)
                return
            except OSError as exc:
                attempt.finish(_errno_outcome(exc.errno or 0), str(exc))
                return
            if data == attempt.token:
                attempt.finish(Outcome.ALLOWED)
            else:
                self.selector.register(sock, selectors.EVENT_READ, attempt)
            return
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            attempt.finish(Outcome.ALLOWED)
        else:
            attempt.finish(_errno_outcome(code), os.strerror(code))

    def _answer_raw(self, raw: socket.socket, family: int) -> None:
        while True:
            try:
                data, peer = raw.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            payload = sctp.strip_ipv4_header(data) if family == socket.AF_INET else data
            packet = sctp.parse_packet(payload)
            if packet is None or packet.chunk not in (sctp.INIT_ACK, sctp.ABORT):
                continue
            key = (family, str(_canonical(peer[0])), packet.dport, packet.vtag)
            attempt = self.waiting_raw.pop(key, None)
            if attempt is None or attempt.probe.port.number != packet.sport:
                continue
            if packet.chunk == sctp.INIT_ACK:
                attempt.finish(Outcome.ALLOWED)
            else:
                attempt.finish(Outcome.REFUSED, "SCTP ABORT")


def _canonical(address: str) -> str:
    """One spelling per address, so replies match what the caller wrote."""
    try:
        return str(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        return address


def run_probes(
    probes: Sequence[Probe], timeout: float = 1.0, resend: float = 0.25
) -> list[ProbeResult]:
    """Run every probe concurrently; verdicts come back in the order of ``probes``.

    ``timeout`` bounds each probe (and so, roughly, the whole run); UDP and raw
    SCTP probes resend every ``resend`` seconds until then. The open-files limit
    is raised as needed; probes beyond what it allows run in further batches.
    """
    if timeout <= 0 or resend <= 0:
        raise NetError("probe timeout and resend interval must be positive")
    batch = _raise_fd_limit(len(probes))
    verdicts: list[ProbeResult] = []
    for start in range(0, len(probes), batch):
        verdicts += _Run(probes[start : start + batch], timeout, resend).run()
    return verdicts
