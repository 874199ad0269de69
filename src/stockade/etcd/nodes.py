"""One agent per node name: the name's claim in etcd, held with a lease.

Layout under the prefix::

    <prefix>/nodes/NAME    {"instance": "...", "hostname": "...", "pid": 123}   (leased)

Everything an agent writes for its node is keyed by the node's name: its address
blocks (etcd/ipam.py), the Pods of its CNI and `run` endpoints (etcd/datastore.py),
its host address (etcd/hosts.py). Two agents given one name (cloned machines share a
host name, which is the name's default) would hand out the same blocks' addresses on
two hosts, overwrite each other's host address and delete each other's Pods. The
claim makes the name one agent's: the first to put the key holds it while its lease
lives (kept alive every third of its TTL); another agent is refused at start, and an
agent that finds its name taken later (its lease ran out while etcd was away and
another took the name) writes nothing more for it and says so.

An agent is known by its instance, a random id kept in its state directory: the
same agent started again (after kill -9 its lease lives on until its TTL) takes its
name back at once. A clean stop revokes the lease, which deletes the key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Any

from stockade.etcd.client import EtcdClient, EtcdError, b64, unb64

log = logging.getLogger("stockade.etcd")

TTL = 15  # seconds a claim outlives its agent
INSTANCE_FILE = "instance"


class NodeTaken(EtcdError):
    """Another agent holds this node's name in etcd (an EtcdError: what would have been
    written for the node is not, as when etcd cannot be reached)."""

    def __init__(self, node: str, holder: dict[str, Any], ttl: int = TTL,
                 key: str = "") -> None:
        self.holder = holder
        self.ttl = ttl  # the holder's lease's, 0: the key has none (put by hand)
        who = ", ".join(f"{k} {holder[k]}" for k in ("hostname", "pid", "instance")
                        if holder.get(k) not in (None, ""))
        end = (f"If that agent is gone, its claim ends within {ttl} s of it" if ttl else
               f"The key has no lease: it stays until deleted (etcdctl del {key})")
        super().__init__(
            f"node name {node!r} is held in etcd by another agent ({who or 'not named'}); "
            "every host needs a name of its own (give it with --node: cloned machines "
            f"share a host name). {end}")


def instance_id(state_dir: str) -> str:
    """This agent's instance: read from the state directory, made there the first time."""
    path = Path(state_dir) / INSTANCE_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
        return text
    text = secrets.token_hex(16)
    tmp = path.with_name(f".{INSTANCE_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return text


class NodeClaim:
    """The claim of one node name for one agent instance (see the module)."""

    def __init__(self, client: EtcdClient, prefix: str, node: str, instance: str, *,
                 ttl: int = TTL) -> None:
        self.client = client
        self.node = node
        self.instance = instance
        self.ttl = ttl
        self.key = f"{prefix}/nodes/{node}"
        self.lease = 0
        self.held = False
        self.taken_by: dict[str, Any] | None = None  # the other agent, when refused
        # Put out of the name while holding it: by an agent of this very instance (a
        # state directory copied with a cloned machine), which a claim would take the
        # name back from, and back again: claimed only once the key is gone.
        self.displaced = False
        self.error = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _value(self) -> str:
        return json.dumps({"instance": self.instance, "hostname": socket.gethostname(),
                           "pid": os.getpid()})

    def claim(self) -> None:
        """Hold the name: put the key under a new lease, if absent or this instance's.
        NodeTaken if another agent's; EtcdError if etcd cannot be asked."""
        with self._lock:
            lease = int(self.client.call("/v3/lease/grant", {"TTL": self.ttl})["ID"])
            try:
                put = {"request_put": {"key": b64(self.key), "value": b64(self._value()),
                                       "lease": str(lease)}}
                absent = {"key": b64(self.key), "target": "CREATE", "result": "EQUAL",
                          "create_revision": "0"}
                result = self.client.txn([absent], [put],
                                         [{"request_range": {"key": b64(self.key)}}])
                if not result.succeeded:
                    kvs = (result.responses[0].get("response_range") or {}).get("kvs") or []
                    holder = _holder(kvs[0]) if kvs else {}
                    if kvs and (holder.get("instance") != self.instance or self.displaced):
                        raise NodeTaken(self.node, holder,
                                        self._granted(int(kvs[0].get("lease") or 0)),
                                        self.key)
                    # Ours (a run before this one, its lease still alive), or gone since:
                    # taken over if unchanged since read.
                    same = ({"key": b64(self.key), "target": "MOD", "result": "EQUAL",
                             "mod_revision": str(kvs[0].get("mod_revision", "0"))}
                            if kvs else absent)
                    if not self.client.txn([same], [put]).succeeded:
                        raise EtcdError(f"{self.key} changed while it was claimed")
            except BaseException:
                self._revoke(lease)
                self.held = False
                raise
            self.lease, self.held, self.taken_by, self.error = lease, True, None, ""
            self.displaced = False
        log.info("node name claimed in etcd", extra={"fields": {
            "node": self.node, "instance": self.instance, "ttl": self.ttl}})

    def ensure(self) -> None:
        """Before a write for the node: raise EtcdError (NodeTaken) unless the name is
        this agent's, claimed now if it can be."""
        if self.held:
            return
        if self._stop.is_set():
            raise EtcdError(f"node name {self.node!r} given up: the agent is stopping")
        try:
            self.claim()
        except NodeTaken as exc:
            self._taken(exc)
            raise
        except EtcdError as exc:
            raise EtcdError(f"node name {self.node!r} not claimed in etcd yet: {exc}",
                            exc.code) from None

    def _taken(self, exc: NodeTaken) -> None:
        if self.taken_by != exc.holder:
            log.error("node name held by another agent: nothing is written to etcd for "
                      "this node", extra={"fields": {"node": self.node, "error": str(exc)}})
        self.taken_by, self.error = exc.holder, str(exc)

    # ---- kept alive ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._keep, name="etcd-node", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if self.held and self._alive():
                    kv = self.client.get(self.key)
                    if kv is not None and kv.lease != self.lease:
                        self._displaced(_holder_of(kv.value), self._granted(kv.lease))
                    elif kv is None:  # deleted by hand: put back
                        self.claim()
                    continue
                if self.held:
                    self.held = False
                    self.error = (f"the node name's lease ran out (etcd not reached "
                                  f"within {self.ttl} s); claiming it again")
                    log.warning("the node name's lease in etcd ran out; claiming it again",
                                extra={"fields": {"node": self.node}})
                self.claim()
            except NodeTaken as exc:
                self._taken(exc)
            except EtcdError as exc:
                self.error = str(exc)

    def _displaced(self, holder: dict[str, Any], ttl: int) -> None:
        """The key is under another lease while this agent holds the name."""
        with self._lock:
            self.held, self.displaced = False, True
            self._revoke(self.lease)
        self._taken(NodeTaken(self.node, holder, ttl, self.key))

    def _granted(self, lease: int) -> int:
        """The TTL the holder's lease was granted with (its agent's --node-claim-ttl),
        this agent's own if etcd does not say; 0 for no lease."""
        if not lease:
            return 0
        try:
            out = self.client.call("/v3/lease/timetolive", {"ID": str(lease)})
        except EtcdError:
            return self.ttl
        return int(out.get("grantedTTL") or 0) or self.ttl

    def _alive(self) -> bool:
        """Renew the lease; False once etcd has let it go (its TTL passed unrenewed)."""
        out = self.client.call("/v3/lease/keepalive", {"ID": str(self.lease)})
        return int((out.get("result") or out).get("TTL") or 0) > 0

    def release(self) -> None:
        """Stop renewing and give the name up (the lease's key goes with it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with self._lock:
            if self.held:
                self._revoke(self.lease)
                self.held = False

    def _revoke(self, lease: int) -> None:
        with contextlib.suppress(EtcdError):  # else it runs out within its TTL
            self.client.call("/v3/lease/revoke", {"ID": str(lease)}, timeout=2.0)

    def status(self) -> dict[str, Any]:
        return {"name": self.node, "held": self.held, "instance": self.instance,
                "heldBy": self.taken_by, "error": "" if self.held else self.error}


def _holder(kv: dict[str, Any]) -> dict[str, Any]:
    return _holder_of(unb64(kv.get("value")))


def _holder_of(value: bytes) -> dict[str, Any]:
    try:
        out = json.loads(value)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def holder(client: EtcdClient, prefix: str, node: str) -> dict[str, Any] | None:
    """The agent holding ``node``'s name now, None if none does."""
    kv = client.get(f"{prefix}/nodes/{node}")
    return None if kv is None else _holder_of(kv.value)
