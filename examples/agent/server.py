"""A tiny server for `stockade run` demos: answers TCP (a greeting) and UDP (an echo).

    python server.py 8080 [53/udp ...]

Each TCP connection gets one line naming the endpoint (STOCKADE_ENDPOINT, set
by the agent) and is closed; each UDP datagram is sent back as it came, which
is what `stockade probe` expects of a UDP server. Every peer is logged to
stdout, i.e. to the container's log under <state-dir>/containers/.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading

NAME = os.environ.get("STOCKADE_ENDPOINT", "server")


def log(text: str) -> None:
    print(f"{NAME}: {text}", flush=True)


def serve_tcp(port: int) -> None:
    srv = socket.create_server(("0.0.0.0", port), backlog=128)  # noqa: S104 - a server
    log(f"listening on tcp/{port}")
    while True:
        conn, peer = srv.accept()
        with conn:
            log(f"tcp/{port} connection from {peer[0]}")
            with contextlib.suppress(OSError):  # a prober may be gone after the handshake
                conn.sendall(f"hello from {NAME}\n".encode())


def serve_udp(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("0.0.0.0", port))  # noqa: S104 - a server
    log(f"listening on udp/{port}")
    while True:
        data, peer = srv.recvfrom(2048)
        log(f"udp/{port} datagram from {peer[0]}")
        srv.sendto(data, peer)


def main(specs: list[str]) -> None:
    if not specs:
        sys.exit("usage: server.py PORT[/tcp|/udp] ...")
    threads = []
    for spec in specs:
        number, _, proto = spec.partition("/")
        target = serve_udp if proto.lower() == "udp" else serve_tcp
        threads.append(threading.Thread(target=target, args=(int(number),), daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main(sys.argv[1:])
