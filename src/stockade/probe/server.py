"""The probe server: answers TCP, UDP and SCTP on given ports in given namespaces.

One process serves any number of namespaces: it enters each one in turn
(in-process ``setns``), creates its listening sockets there — a socket stays in
the namespace it was created in — and then serves every socket from a single
``selectors`` loop. So a conformance run with nine pods needs one Python
process (~40 ms to start) instead of nine, and no thread per port.

What it answers, on the wildcard address (one dual-stack ``::`` socket per port
where the namespace has IPv6, else ``0.0.0.0``):

* TCP: accept, write one byte, close;
* UDP: echo each datagram back to its sender;
* SCTP: one-to-one socket, accept, write one byte, close; or, where the kernel
  has no SCTP, the raw-socket stand-in of :mod:`stockade.probe.sctp`.

Protocol with the parent (:class:`stockade.probe.launcher.ProbeServer`): one
JSON line on stdout once every socket is bound — ``{"ready": true, "sctp": "native"}`` or
``{"ready": false, "error": "..."}`` — and the server exits when its stdin
reaches EOF, so it never outlives a parent that crashed.

Command line::

    python -m stockade.probe.server --bind NETNS=tcp:80,udp:80,sctp:80 [--bind ...] [--forever]

``NETNS`` is a name under /run/netns, or ``-`` for the server's own namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import selectors
import socket
import sys
from collections.abc import Callable, Mapping, Sequence

from stockade.errors import NetError
from stockade.net.namespace import entered
from stockade.probe import sctp
from stockade.probe.protocol import Port, Protocol

Handler = Callable[[socket.socket], None]


def _listener(kind: int, proto: int, port: int) -> socket.socket:
    """A socket bound to the wildcard of ``port``, dual-stack when IPv6 is there."""
    try:
        sock = socket.socket(socket.AF_INET6, kind, proto)
    except OSError:
        sock = socket.socket(socket.AF_INET, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))  # noqa: S104 - a server in a test namespace
        return sock
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError:
        # IPv6 disabled in this namespace (disable_ipv6=1): fall back to IPv4 only.
        sock.close()
        sock = socket.socket(socket.AF_INET, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))  # noqa: S104
    return sock


def _answer_stream(listener: socket.socket) -> None:
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    with conn, contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(b".")


def _answer_datagram(sock: socket.socket) -> None:
    for _ in range(64):  # drain what is queued, but let other sockets have a turn
        try:
            data, peer = sock.recvfrom(2048)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            continue  # e.g. ECONNREFUSED queued from an earlier reply; nothing to do
        with contextlib.suppress(OSError):
            sock.sendto(data, peer)


def _raw_sctp_answerer(family: int, ports: frozenset[int]) -> Handler:
    """Answers INITs for ``ports`` with INIT ACK and for other ports with ABORT."""

    def answer(sock: socket.socket) -> None:
        for _ in range(64):
            try:
                data, peer = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            payload = sctp.strip_ipv4_header(data) if family == socket.AF_INET else data
            packet = sctp.parse_packet(payload)
            if packet is None or packet.chunk != sctp.INIT or packet.vtag != 0:
                continue
            if packet.dport in ports:
                tag = secrets.randbits(32) or 1
                reply = sctp.build_init_ack(packet.dport, packet.sport, packet.initiate_tag, tag)
            else:
                reply = sctp.build_abort(packet.dport, packet.sport, packet.initiate_tag)
            with contextlib.suppress(OSError):
                sock.sendto(reply, (peer[0], 0))

    return answer


def open_sockets(ports: Sequence[Port]) -> list[tuple[socket.socket, Handler]]:
    """Bind every port in the current namespace; returns sockets with their handlers."""
    opened: list[tuple[socket.socket, Handler]] = []
    mode = sctp.sctp_mode()
    try:
        for port in sorted(set(ports)):
            if port.protocol is Protocol.UDP:
                opened.append((_listener(socket.SOCK_DGRAM, 0, port.number), _answer_datagram))
            elif port.protocol is Protocol.TCP or mode == "native":
                proto = 0 if port.protocol is Protocol.TCP else sctp.IPPROTO_SCTP
                sock = _listener(socket.SOCK_STREAM, proto, port.number)
                sock.listen(512)
                opened.append((sock, _answer_stream))
        raw_ports = frozenset(p.number for p in ports if p.protocol is Protocol.SCTP)
        if raw_ports and mode == "raw":
            for family in (socket.AF_INET, socket.AF_INET6):
                try:
                    sock = socket.socket(family, socket.SOCK_RAW, sctp.IPPROTO_SCTP)
                except OSError:
                    continue  # no IPv6 in this namespace
                opened.append((sock, _raw_sctp_answerer(family, raw_ports)))
        elif raw_ports and mode == "unavailable":
            raise NetError("this kernel has neither SCTP sockets nor raw sockets for SCTP")
    except BaseException:
        for sock, _ in opened:
            sock.close()
        raise
    for sock, _ in opened:
        sock.setblocking(False)
    return opened


def serve(
    bindings: Mapping[str | None, Sequence[Port]],
    ready: Callable[[str], None],
    watch_stdin: bool = True,
) -> None:
    """Bind everything, call ``ready`` with the SCTP mode, serve until stdin closes.

    With ``watch_stdin`` False it serves until killed (for a manual run with
    stdin on /dev/null).
    """
    selector = selectors.DefaultSelector()
    for netns, ports in bindings.items():
        with entered(netns):
            for sock, handler in open_sockets(ports):
                selector.register(sock, selectors.EVENT_READ, handler)
    if watch_stdin:
        os.set_blocking(sys.stdin.fileno(), False)
        selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    ready(sctp.sctp_mode())
    while True:
        for key, _ in selector.select():
            if key.data is None:
                try:
                    if not os.read(sys.stdin.fileno(), 4096):
                        return
                except BlockingIOError:
                    pass
                continue
            key.data(key.fileobj)


def _parse_binding(text: str) -> tuple[str | None, list[Port]]:
    netns, sep, ports = text.partition("=")
    if not sep or not netns:
        raise NetError(f"invalid --bind {text!r}: want NETNS=tcp:80,udp:80")
    return (None if netns == "-" else netns), [Port.parse(p) for p in ports.split(",") if p]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stockade.probe.server")
    parser.add_argument("--bind", action="append", default=[], metavar="NETNS=PORTS")
    parser.add_argument(
        "--forever", action="store_true", help="ignore stdin; serve until killed (SIGTERM)"
    )
    args = parser.parse_args(argv)

    def announce(mode: str) -> None:
        print(json.dumps({"ready": True, "sctp": mode}), flush=True)

    try:
        bindings: dict[str | None, list[Port]] = {}
        for text in args.bind:
            netns, ports = _parse_binding(text)
            bindings.setdefault(netns, []).extend(ports)
        serve(bindings, announce, watch_stdin=not args.forever)
    except (NetError, OSError) as exc:
        print(json.dumps({"ready": False, "error": str(exc)}), flush=True)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
