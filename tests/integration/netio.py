"""Long-lived connections for tests: an echo server in a namespace and its clients."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from stockade.net.namespace import entered

ECHO = """
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
conns = []
def echo(c):
    try:
        while data := c.recv(100):
            c.sendall(data)
    except OSError:
        pass
def serve():
    while True:
        c, _ = s.accept(); conns.append(c)
        threading.Thread(target=echo, args=(c,), daemon=True).start()
threading.Thread(target=serve, daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:  # a line on stdin: the server speaks first, unasked
    for c in conns:
        try:
            c.sendall(line.strip().encode())
        except OSError:
            pass
"""


class EchoServer:
    """An echo server in a namespace; `push(data)` makes it send to its clients unasked."""

    def __init__(self, netns: str, port: int) -> None:
        self.cmd = ["ip", "netns", "exec", netns, sys.executable, "-c", ECHO, str(port)]

    def __enter__(self) -> EchoServer:
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        return self

    def push(self, data: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data + "\n")
        self.proc.stdin.flush()

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def connect(netns: str, address: str, port: int) -> socket.socket:
    with entered(netns):
        conn = socket.socket()  # the socket belongs to the namespace it was made in
    conn.settimeout(1.0)
    deadline = time.monotonic() + 3
    while True:
        try:
            conn.connect((address, port))
            return conn
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def echo(conn: socket.socket, data: bytes) -> bool:
    try:
        conn.sendall(data)
        return conn.recv(100) == data
    except OSError:  # a timeout, or a reset
        return False


def receive(conn: socket.socket, size: int = 100) -> bytes | None:
    try:
        return conn.recv(size)
    except OSError:
        return None
