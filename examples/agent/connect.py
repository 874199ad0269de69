"""Try one TCP connection at once and say what happened: the first thing a container does.

    python connect.py ADDRESS PORT [TIMEOUT]

Exits 0 if the connection was made, 1 if not. Run by `stockade run` in a
namespace whose egress is denied, it shows that the policy is in force before
the command starts: the very first packet is dropped.
"""

from __future__ import annotations

import os
import socket
import sys

name = os.environ.get("STOCKADE_ENDPOINT", "client")
address, port = sys.argv[1], int(sys.argv[2])
timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
try:
    with socket.create_connection((address, port), timeout=timeout):
        print(f"{name}: connected to {address}:{port}", flush=True)
except OSError as exc:
    print(f"{name}: no connection to {address}:{port}: {exc}", flush=True)
    sys.exit(1)
