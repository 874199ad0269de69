"""The agent and its clients: agent, apply, delete, get, label, status, snapshot, flows."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import yaml

from stockade.agent.client import AgentClient
from stockade.agent.protocol import ApiError
from stockade.cli.inputs import (
    add_conntrack_limit,
    add_files,
    add_output,
    address_pool,
    bridge_prefix,
    etcd_url,
    host_address,
    lease_seconds,
    metrics_address,
    nflog_group,
    node_name,
    positive_seconds,
    seconds,
    table_name,
)
from stockade.datapath import ATTACH_MODES, DATAPATHS
from stockade.errors import InputError
from stockade.load import expand_paths, read_text
from stockade.model.parse import parse_documents

# The names a ClusterNetworkPolicy goes by on the command line (the agent knows them too).
CNP_KINDS = ("clusternetworkpolicy", "clusternetworkpolicies", "cnp")


def register(sub: Any) -> None:
    a = sub.add_parser("agent", help="run the node agent in the foreground")
    a.add_argument("--state-dir", default="/var/lib/stockade")
    _socket(a)
    a.add_argument("--datapath", default="nft", choices=tuple(DATAPATHS),
                   help="what enforces in the kernel: nftables, iptables + ipset, or eBPF")
    a.add_argument("--ebpf-attach", default="auto", choices=ATTACH_MODES,
                   help="eBPF: attach to each pod's port with tcx links (auto: where the "
                   "kernel has them) or clsact filters (a new port attached several times "
                   "faster; see the README)")
    a.add_argument("--netns", metavar="NAME", help="enforce in /run/netns/NAME")
    a.add_argument("--table", default="stockade", type=table_name,
                   help="the name of what the agent owns in the kernel (the nftables "
                   "table, the eBPF pin directory); one agent per name and namespace")
    a.add_argument("--metrics-address", type=metrics_address, metavar="HOST:PORT")
    a.add_argument("--subnet", type=address_pool,
                   help="address pool of the bridge (default: with --datastore "
                   "kubernetes this node's spec.podCIDR, else 10.244.0.0/16)")
    a.add_argument("--bridge-prefix", type=bridge_prefix, default="stk", metavar="PREFIX",
                   help="prefix of the bridge, veths and namespaces `stockade run` makes")
    a.add_argument("--resync-interval", type=positive_seconds, default=30.0, metavar="SECONDS")
    a.add_argument("--warm-idle", type=seconds, default=10.0, metavar="SECONDS",
                   help="keep the warm start current once no change came for this long "
                        "(0: only at a clean stop; local datastore)")
    a.add_argument("--warm-interval", type=seconds, default=60.0, metavar="SECONDS",
                   help="keep it at most this often")
    a.add_argument("--log-group", type=nflog_group, default=100,
                   help="NFLOG group for denied flows (0: no denied-flow log)")
    add_conntrack_limit(a)
    a.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    a.add_argument("--no-table-owner", dest="table_owner", action="store_false",
                   help="leave the table changeable by other processes (by default it is "
                        "owned by the agent and kept when the agent exits)")
    a.add_argument("--datastore", default="local", choices=("local", "kubernetes", "etcd"),
                   help="where namespaces, policies and pods come from: the local store "
                        "(default, single hosts), the Kubernetes API or etcd (list and "
                        "watch)")
    a.add_argument("--etcd-endpoints", type=etcd_url, nargs="+", metavar="URL", default=(),
                   help="with --datastore etcd: etcd's client URLs (http://HOST:2379, or "
                        "https with --etcd-cacert/--etcd-cert/--etcd-key)")
    a.add_argument("--etcd-prefix", default="/stockade", metavar="PREFIX",
                   help="with --datastore etcd: the key prefix of the objects")
    a.add_argument("--etcd-cacert", metavar="FILE", help="CA bundle of etcd's certificate")
    a.add_argument("--etcd-cert", metavar="FILE", help="client certificate for etcd")
    a.add_argument("--etcd-key", metavar="FILE", help="the client certificate's key")
    a.add_argument("--host-address", type=host_address, metavar="IP",
                   help="with --datastore etcd: this host's address, to which the other "
                        "hosts route its endpoints' address blocks")
    a.add_argument("--empty-block-grace", type=seconds, default=600.0, metavar="SECONDS",
                   help="with --datastore etcd: give an address block this host has left "
                        "empty this long back to the pool (its last block excepted; "
                        "0: never)")
    a.add_argument("--node-claim-ttl", type=lease_seconds, default=15, metavar="SECONDS",
                   help="with --datastore etcd: how long this node's name stays claimed "
                        "in etcd after its agent is killed; an agent started with a name "
                        "another holds waits this long for it, then stops (default 15)")
    a.add_argument("--kubeconfig", metavar="FILE",
                   help="with --datastore kubernetes: this kubeconfig (default: in-cluster "
                        "service account, else $KUBECONFIG or ~/.kube/config)")
    a.add_argument("--context", metavar="NAME", help="the kubeconfig's context to use")
    a.add_argument("--node", type=node_name, metavar="NAME",
                   help="with --datastore kubernetes or etcd: this node's name (default "
                        "$NODE_NAME, "
                        "else the host name)")
    a.add_argument("--watch-stall-timeout", type=positive_seconds, default=150.0, metavar="SECONDS",
                   help="reconnect a watch that delivered no event nor bookmark for this long")
    a.add_argument("--pod-wait", type=seconds, default=10.0, metavar="SECONDS",
                   help="how long a CNI ADD waits for the API to show its pod")
    a.add_argument("--cni-conf-dir", default="/etc/cni/net.d", metavar="DIR",
                   help="the container runtime's CNI configurations, reported on GET "
                        "/status of the metrics port")
    recover = a.add_mutually_exclusive_group()
    recover.add_argument("--restore-snapshot", metavar="FILE",
                         help="an empty store facing a kernel table: load this snapshot "
                              "(`stockade snapshot save`) into it first")
    recover.add_argument("--accept-empty-store", action="store_true",
                         help="an empty store facing a kernel table: replace the kernel's "
                              "rules by the empty state (removes enforcement)")
    a.set_defaults(run=run_agent)

    p = sub.add_parser("apply", help="apply manifests through the agent (all or nothing)")
    _socket(p)
    add_files(p)
    p.add_argument("--no-wait", action="store_true", help="return once stored, not enforced")
    p.set_defaults(run=run_apply)

    d = sub.add_parser("delete", help="delete objects through the agent")
    _socket(d)
    add_files(d, required=False)
    d.add_argument("what", nargs="*", metavar="KIND NS/NAME",
                   help="e.g. `policy shop/allow-web`, `namespace shop` or "
                        "`clusternetworkpolicy deny-db` (alias cnp)")
    d.set_defaults(run=run_delete)

    g = sub.add_parser("get", help="list namespaces, endpoints, policies, "
                                   "clusternetworkpolicies (cnp) or chains")
    _socket(g)
    g.add_argument("kind", choices=("namespaces", "endpoints", "policies",
                                    "clusternetworkpolicies", "cnp", "chains"))
    add_output(g, ("txt", "json", "yaml"), help="output format (default txt, a table; "
               "text and table are txt)")
    g.set_defaults(run=run_get)

    lab = sub.add_parser("label", help="set (k=v) or remove (k-) labels")
    _socket(lab)
    lab.add_argument("kind", choices=("namespace", "endpoint"))
    lab.add_argument("name", metavar="NAME|NS/NAME")
    lab.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-")
    lab.set_defaults(run=run_label)

    st = sub.add_parser("status", help="is the kernel in sync; last apply; counts; drift")
    _socket(st)
    add_output(st, ("txt", "json"))
    st.set_defaults(run=run_status)

    sn = sub.add_parser("snapshot", help="export or import the agent's whole state")
    verbs = sn.add_subparsers(dest="verb", required=True, metavar="save|restore")
    save = verbs.add_parser("save")
    _socket(save)
    save.add_argument("file", metavar="FILE")
    save.set_defaults(run=run_snapshot_save)
    restore = verbs.add_parser("restore")
    _socket(restore)
    restore.add_argument("file", metavar="FILE")
    restore.set_defaults(run=run_snapshot_restore)

    fl = sub.add_parser("flows", help="denied flows logged by the kernel")
    _socket(fl)
    fl.add_argument("--denied", action="store_true", default=True)
    fl.add_argument("--follow", action="store_true")
    # -n is a namespace everywhere else: the count is only --limit.
    fl.add_argument("--limit", type=int, default=100, metavar="COUNT",
                    help="how many of the latest flows (default 100)")
    fl.set_defaults(run=run_flows)


def _socket(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", metavar="PATH",
                   help="the agent's socket (default $STOCKADE_SOCKET or /run/stockade/agent.sock)")


def _call(args: argparse.Namespace, op: str, **kw: Any) -> Any:
    with AgentClient(args.socket) as client:
        return _checked(lambda: client.call(op, **kw))


def _checked(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ApiError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        raise InputError(exc.message) from None


def run_agent(args: argparse.Namespace) -> int:
    from stockade.agent.early import read_ahead
    from stockade.agent.logfmt import setup_logging
    from stockade.agent.ownership import take_ownership

    setup_logging(args.log_level)
    if args.datastore == "etcd" and args.subnet and ":" in args.subnet:
        # etcd's blocks and the routes between hosts are IPv4 (etcd/ipam.py, hosts.py)
        raise InputError(f"--subnet {args.subnet}: with --datastore etcd the address pool "
                         "is IPv4 (blocks and routes across hosts are IPv4 only)")
    # Before anything touches the state or the kernel: another agent may own them.
    ownership = take_ownership(args.state_dir, args.table, args.netns)
    try:
        # The table's read-back starts now and runs while the agent's modules load.
        datapath = read_ahead(args.datapath, args.table, datastore=args.datastore,
                              netns=args.netns, owner=args.table_owner,
                              log_group=args.log_group or None,
                              conntrack_limit=args.conntrack_limit,
                              ebpf_attach=args.ebpf_attach)
        from stockade.agent.daemon import AgentConfig
        from stockade.agent.daemon import run_agent as run
    except BaseException:
        ownership.release()
        raise

    return run(AgentConfig(
        state_dir=args.state_dir, socket=args.socket or _default_socket(),
        datapath=args.datapath, netns=args.netns, table=args.table,
        metrics_address=args.metrics_address, subnet=args.subnet,
        bridge_prefix=args.bridge_prefix, resync_interval=args.resync_interval,
        warm_idle=args.warm_idle, warm_interval=args.warm_interval,
        log_group=args.log_group or None, conntrack_limit=args.conntrack_limit,
        ebpf_attach=args.ebpf_attach,
        restore_snapshot=args.restore_snapshot,
        accept_empty_store=args.accept_empty_store, table_owner=args.table_owner,
        datastore=args.datastore, kubeconfig=args.kubeconfig, kube_context=args.context,
        node=args.node or "", watch_stall_timeout=args.watch_stall_timeout,
        pod_wait=args.pod_wait, cni_conf_dir=args.cni_conf_dir,
        etcd_endpoints=tuple(u for e in args.etcd_endpoints for u in e.split(",") if u),
        etcd_prefix=args.etcd_prefix, etcd_cacert=args.etcd_cacert, etcd_cert=args.etcd_cert,
        etcd_key=args.etcd_key, host_address=args.host_address,
        empty_block_grace=args.empty_block_grace, node_claim_ttl=args.node_claim_ttl),
        datapath, ownership)


def _default_socket() -> str:
    from stockade.agent.client import socket_path

    return socket_path(None)


def _documents(files: list[str], recursive: bool = False) -> tuple[list[Any], str]:
    docs: list[Any] = []
    paths = expand_paths(files, recursive=recursive)
    for path in paths:
        docs += parse_documents(read_text(path), path)
    return docs, ",".join(paths)


def run_apply(args: argparse.Namespace) -> int:
    docs, source = _documents(args.files, args.recursive)
    out = _call(args, "apply", documents=docs, source=source, sync=not args.no_wait)
    for verb in ("created", "configured", "unchanged"):
        for name in out[verb]:
            print(f"{name} {verb}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    refs = []
    what = list(args.what)
    if len(what) % 2:
        raise InputError("give KIND NAME pairs, e.g. `policy shop/web` or `namespace shop`")
    for kind, name in zip(what[::2], what[1::2], strict=True):
        ns, _, n = name.rpartition("/")
        if kind in ("namespace", *CNP_KINDS):
            ns, n = "", name  # cluster-scoped
        refs.append({"kind": kind, "namespace": ns or "default", "name": n})
    docs = _documents(args.files, args.recursive)[0] if args.files else []
    if not refs and not docs:
        raise InputError("nothing to delete: give -f FILE or KIND NAME")
    out = _call(args, "delete", refs=refs, documents=docs)
    for name in out["deleted"]:
        print(f"{name} deleted")
    for name in out["missing"]:
        print(f"{name} not found", file=sys.stderr)
    return 0 if not out["missing"] else 1


def run_get(args: argparse.Namespace) -> int:
    kind = "clusternetworkpolicies" if args.kind in CNP_KINDS else args.kind
    items = _call(args, "get", kind=kind)["items"]
    if args.output == "json":
        print(json.dumps(items, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump_all(items, sort_keys=False) if items else "", end="")
    else:
        print(_table(kind, items))
    return 0


def _labels(d: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(d.items())) or "<none>"


def _table(kind: str, items: list[dict[str, Any]]) -> str:
    if kind == "namespaces":
        rows = [["NAME", "LABELS"]] + [[i["name"], _labels(i["labels"])] for i in items]
    elif kind == "endpoints":
        rows = [["NAMESPACE", "NAME", "IPS", "OWNER", "NETNS", "LABELS"]] + [
            [i["namespace"], i["name"], ",".join(i["ips"]), i["owner"], i["netns"] or "-",
             _labels(i["labels"])] for i in items]
    elif kind == "chains":
        rows = [["CHAIN", "DIRECTION", "ENDPOINTS", "POLICIES"]] + [
            [i["name"], i["direction"], str(i["endpoints"]),
             " | ".join(",".join(keys) for keys in i["policies"])] for i in items]
    elif kind == "clusternetworkpolicies":
        rows = [["NAME", "TIER", "PRIORITY", "SUBJECT", "INGRESS", "EGRESS"]] + [
            _cnp_row(i) for i in items]
    else:
        rows = [["NAMESPACE", "NAME", "POLICY-TYPES"]] + [
            [i["metadata"].get("namespace", "default"), i["metadata"].get("name", ""),
             ",".join((i.get("spec") or {}).get("policyTypes") or ["(default)"])]
            for i in items]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True))
                     .rstrip() for r in rows)


def _cnp_row(manifest: dict[str, Any]) -> list[str]:
    """NAME TIER PRIORITY SUBJECT INGRESS EGRESS of a stored (valid) manifest."""
    spec = manifest.get("spec") or {}
    subject = spec.get("subject") or {}
    if "namespaces" in subject:
        what = f"namespaces {_selector(subject['namespaces'])}"
    else:
        pods = subject.get("pods") or {}
        what = (f"pods {_selector(pods.get('podSelector'))} in namespaces "
                f"{_selector(pods.get('namespaceSelector'))}")
    return [str((manifest.get("metadata") or {}).get("name", "")), str(spec.get("tier", "")),
            str(spec.get("priority", "")), what, str(len(spec.get("ingress") or [])),
            str(len(spec.get("egress") or []))]


def _selector(sel: Any) -> str:
    """A label selector, short: `{k=v,k2 In (a,b)}`; `{}` selects everything."""
    if not isinstance(sel, dict):
        return "{}"
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for e in sel.get("matchExpressions") or []:
        values = ",".join(e.get("values") or [])
        parts.append(f"{e.get('key')} {e.get('operator')}" + (f" ({values})" if values else ""))
    return "{" + ",".join(parts) + "}"


def run_label(args: argparse.Namespace) -> int:
    set_: dict[str, str] = {}
    remove: list[str] = []
    for item in args.labels:
        if item.endswith("-") and "=" not in item:
            remove.append(item[:-1])
        elif "=" in item:
            k, _, v = item.partition("=")
            set_[k] = v
        else:
            raise InputError(f"label {item!r}: give KEY=VALUE to set or KEY- to remove")
    out = _call(args, "label", kind=args.kind, name=args.name, set=set_, remove=remove)
    print(f"{args.kind}/{args.name} labelled (revision {out['revision']})")
    return 0


def run_status(args: argparse.Namespace) -> int:
    st = _call(args, "status")
    if args.output == "json":
        print(json.dumps(st, indent=2))
        return 0 if _healthy_status(st) else 1
    print("\n".join(status_lines(st)))
    return 0 if _healthy_status(st) else 1


def status_lines(st: dict[str, Any]) -> list[str]:
    """`stockade status`'s text of the agent's status (pure)."""
    out: list[str] = []
    last = st.get("lastApply") or {}
    out.append(f"in sync:        {'yes' if st['inSync'] else 'NO'} "
               f"(revision {st['revision']}, applied {st['appliedRevision']})")
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["at"]))
        summary = ", ".join(f"{k}={v}" for k, v in last["summary"].items()) or "no change"
        out.append(f"last apply:     {when}, {last['durationMs']} ms, {summary}"
                   + (f", ERROR: {last['error']}" if last.get("error") else ""))
    c = st["counts"]
    out.append(f"objects:        {c['namespaces']} namespaces, {c['endpoints']} endpoints, "
               f"{c['policies']} policies, {c.get('clusterPolicies', 0)} cluster policies")
    out.append(f"drift repaired: {st['driftRepairs']} time(s); "
               f"apply failures: {st['applyFailures']}")
    if st.get("lastVerified"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["lastVerified"]))
        out.append(f"last verified:  {when} (the kernel read back and found as applied)")
    out.append(f"datapath:       {st['datapath']}; up {st['uptime']} s")
    if st.get("table"):
        out.append(f"table:          {st['table']}")
    if st.get("error"):
        out.append(f"NOT READY:      the kernel refused the last {st['consecutiveFailures']} "
                   f"attempt(s), the previous ruleset stays in force: {st['error']}")
    for key, reasons in (st.get("quarantined") or {}).items():
        out.append(f"held closed:    {key}: {'; '.join(reasons)}")
    ds = st.get("datastore")
    if isinstance(ds, dict):
        out += _datastore_lines(ds)
    return out


def _datastore_lines(ds: dict[str, Any]) -> list[str]:
    found = ds.get("hosts")
    hosts: dict[str, Any] = found if isinstance(found, dict) else {}
    # The feed's own lists and, with etcd, the host table's (hosts and blocks): the
    # first sync waits for all of them, so a list that never comes is named.
    resources = {**(hosts.get("resources") or {}), **(ds.get("resources") or {})}
    unlisted = sorted(p for p, r in resources.items() if not r.get("lists"))
    waiting = ("NOT SYNCED: waiting for the first lists"
               + (f" of {', '.join(unlisted)}" if unlisted else ""))
    node = ds.get("node")  # etcd: the claim on the node's name, with the name
    name = node.get("name") if isinstance(node, dict) else node
    out = [f"datastore:      {ds.get('kind')} {ds.get('server')} (node {name}), "
           f"{'synced' if ds.get('synced') else waiting}"
           + (", DEGRADED: reconnecting (enforcing the last state, writes refused)"
              if ds.get("degraded") else "")]
    for plural, r in sorted(resources.items()):
        out.append(f"  {plural:16}rv {r.get('resourceVersion') or '-'}, lists {r.get('lists')},"
                   f" events {r.get('events')}, errors {r.get('errors')}"
                   + (f", last error: {r['lastError']}" if r.get("lastError") else ""))
    for key, why in (ds.get("waiting") or {}).items():
        out.append(f"  waiting:      {key}: {why}")
    if isinstance(node, dict) and not node.get("held"):
        out.append(f"  NODE NAME NOT HELD: nothing is written to etcd for node "
                   f"{node.get('name')}: {node.get('error') or 'not claimed yet'}")
    if hosts.get("addressOf"):
        out.append(f"  HOST ADDRESS TAKEN: {hosts.get('error')}")
    return out


def _healthy_status(st: dict[str, Any]) -> bool:
    """In sync, ready, and not cut off from its datastore (etcd: degraded, its node's
    name not held, or its host address another host's)."""
    ds = st.get("datastore")
    degraded = isinstance(ds, dict) and bool(ds.get("degraded"))
    node = ds.get("node") if isinstance(ds, dict) else None
    lost = isinstance(node, dict) and not node.get("held")
    hosts = ds.get("hosts") if isinstance(ds, dict) else None
    taken = isinstance(hosts, dict) and bool(hosts.get("addressOf"))
    return (bool(st["inSync"] and st.get("ready", True)) and not degraded and not lost
            and not taken)


def run_snapshot_save(args: argparse.Namespace) -> int:
    snap = _call(args, "snapshot.save")["snapshot"]
    text = json.dumps(snap, indent=1, sort_keys=True)
    if args.file == "-":
        print(text)
    else:
        from pathlib import Path

        Path(args.file).write_text(text + "\n")
        print(f"saved revision {snap.get('revision')} to {args.file}")
    return 0


def run_snapshot_restore(args: argparse.Namespace) -> int:
    try:
        snap = json.loads(read_text(args.file))
    except ValueError as exc:
        raise InputError(f"not a JSON snapshot: {exc}", source=args.file) from None
    out = _call(args, "snapshot.restore", snapshot=snap)
    print(f"restored (revision {out['revision']})")
    return 0


def run_flows(args: argparse.Namespace) -> int:
    with AgentClient(args.socket) as client:
        since = 0
        first = True
        while True:
            out = _checked(partial(client.call, "flows", since=since, limit=args.limit,
                                   tail=first))
            first = False
            for item in out["items"]:
                print(json.dumps(item, separators=(",", ":")))
            sys.stdout.flush()
            since = out["next"]
            if not args.follow:
                return 0
            time.sleep(0.5)
