"""A realistic cluster as Kubernetes manifests, deterministic for a seed and a size.

The shape of a multi-tenant cluster, as issue #11 describes it:

* namespaces of ~100 pods on average but of very different sizes (a few large
  ones, many small ones: sizes drawn from a Pareto law), each with up to ~10
  apps; the pods of an app are replicas with identical labels;
* a `kube-system` namespace serving DNS (`k8s-app=kube-dns`) and a `monitoring`
  namespace with Prometheus;
* pods declare named container ports (`http` 8080, `metrics` 9090, some `grpc`
  9000, databases `postgres` 5432);
* per namespace, in this order while its share of the policy budget lasts: a
  default deny (ingress and egress), an egress allow to DNS, an allow for its
  first app, an ingress allow from monitoring on the named port `metrics`, then
  one allow per other app (from
  other apps of the namespace and of other teams' namespaces, on `http` or a
  number or a range; egress to the namespace's database on `postgres`);
* about 1 in 20 app policies admits dozens of peers (apps across namespaces, by
  namespace name), about 1 in 20 has an ipBlock with excepts;
* the same selectors recur in many policies (`app=web`, the DNS and monitoring
  peers, `team=…` namespace selectors).

Antrea's controller benchmark shape is `--pods 100000 --policies 75000
--namespaces 25000` (4 pods and 3 policies per namespace on average).

    python bench/realistic.py --pods 10000 --policies 1000 -o /tmp/c.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import zlib
from typing import Any

APPS = ("web", "api", "auth", "cart", "search", "worker", "cache", "queue", "db", "admin")
TIERS = {"web": "frontend", "api": "backend", "auth": "backend", "cart": "backend",
         "search": "backend", "worker": "backend", "cache": "data", "queue": "data",
         "db": "data", "admin": "frontend"}
TEAMS = 20
ENVS = ("prod", "staging", "dev")
BASE = (10 << 24) | (128 << 16)  # 10.128.0.0, pods numbered from there

Doc = dict[str, Any]


def _sizes(rnd: random.Random, pods: int, namespaces: int) -> list[int]:
    """Namespace sizes summing to `pods`: Pareto-distributed, at least 1 each."""
    weights = [rnd.paretovariate(1.3) for _ in range(namespaces)]
    total = sum(weights)
    spare = pods - namespaces
    sizes = [1 + int(spare * w / total) for w in weights]
    for i in range(pods - sum(sizes)):  # rounding leftovers, to the first namespaces
        sizes[i % namespaces] += 1
    return sizes


def _ip(n: int) -> str:
    a = BASE + n
    return f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"


def _pod(ns: str, name: str, labels: dict[str, str], ip: str,
         ports: list[tuple[str, int]]) -> Doc:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{"name": "main", "image": "registry.local/app:1",
                                     "ports": [{"name": n, "containerPort": p,
                                                "protocol": "TCP"} for n, p in ports]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def _policy(ns: str, name: str, selector: Doc, types: list[str],
            ingress: list[Doc] | None = None, egress: list[Doc] | None = None) -> Doc:
    spec: Doc = {"podSelector": selector, "policyTypes": types}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def _app_ports(app: str) -> list[tuple[str, int]]:
    if app == "db":
        return [("postgres", 5432), ("metrics", 9090)]
    if app in ("api", "auth", "search"):
        return [("http", 8080), ("grpc", 9000), ("metrics", 9090)]
    return [("http", 8080), ("metrics", 9090)]


def generate(pods: int, policies: int, namespaces: int | None = None,
             seed: int = 1) -> list[Doc]:
    """Namespaces, pods and policies, in that order (as `kubectl get -o json` lists)."""
    rnd = random.Random(seed)
    n_ns = namespaces or max(1, pods // 100)
    names = [f"tenant-{i:05d}" for i in range(n_ns)]
    ns_docs: list[Doc] = []
    for i, name in enumerate(names):
        ns_docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, "labels": {"kubernetes.io/metadata.name": name,
                                     "team": f"team-{i % TEAMS}", "env": ENVS[i % 3]}}})
    for name in ("kube-system", "monitoring"):
        ns_docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, "labels": {"kubernetes.io/metadata.name": name}}})
    pod_docs: list[Doc] = []
    n = 0
    for i in range(2):
        pod_docs.append(_pod("kube-system", f"coredns-{i}", {"k8s-app": "kube-dns"}, _ip(n),
                             [("dns", 53), ("dns-tcp", 53)]))
        n += 1
    pod_docs.append(_pod("monitoring", "prometheus-0", {"app": "prometheus"}, _ip(n),
                         [("web", 9090)]))
    n += 1
    apps_of: list[list[str]] = []
    for name, size in zip(names, _sizes(rnd, max(pods - n, n_ns), n_ns), strict=True):
        apps = list(APPS[:max(1, min(len(APPS), size // 8))])
        apps_of.append(apps)
        # Replicas: a few apps take most pods of the namespace.
        weights = [rnd.paretovariate(1.5) for _ in apps]
        for k in range(size):
            app = rnd.choices(apps, weights)[0] if k >= len(apps) else apps[k]
            labels = {"app": app, "tier": TIERS[app], "version": "v1",
                      "pod-template-hash": f"{zlib.crc32(f'{name}/{app}'.encode()) & 0xffffff:06x}"}
            pod_docs.append(_pod(name, f"{app}-{k}", labels, _ip(n), _app_ports(app)))
            n += 1
    pol_docs: list[Doc] = []
    budget = [policies // n_ns + (1 if i < policies % n_ns else 0) for i in range(n_ns)]
    for i, (name, apps) in enumerate(zip(names, apps_of, strict=True)):
        pol_docs.extend(_namespace_policies(rnd, i, name, apps, budget[i], names, apps_of))
    return ns_docs + pod_docs + pol_docs


DNS_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
MONITORING_PEER = {"namespaceSelector": {"matchLabels": {
    "kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app": "prometheus"}}}


def _namespace_policies(rnd: random.Random, i: int, ns: str, apps: list[str], budget: int,
                        names: list[str], apps_of: list[list[str]]) -> list[Doc]:
    out: list[Doc] = []
    if budget <= 0:
        return out
    out.append(_policy(ns, "default-deny", {}, ["Ingress", "Egress"]))
    if len(out) < budget:
        out.append(_policy(ns, "allow-dns", {}, ["Egress"], egress=[{
            "to": [DNS_PEER], "ports": [{"protocol": "UDP", "port": 53},
                                        {"protocol": "TCP", "port": 53}]}]))
    k = 0
    if len(out) < budget:
        out.append(_app_policy(rnd, i, ns, apps[0], apps, k, names, apps_of))
        k += 1
    if len(out) < budget:
        out.append(_policy(ns, "allow-monitoring", {}, ["Ingress"], ingress=[{
            "from": [MONITORING_PEER], "ports": [{"protocol": "TCP", "port": "metrics"}]}]))
    while len(out) < budget:
        app = apps[k % len(apps)]
        out.append(_app_policy(rnd, i, ns, app, apps, k, names, apps_of))
        k += 1
    return out


def _app_policy(rnd: random.Random, i: int, ns: str, app: str, apps: list[str], k: int,
                names: list[str], apps_of: list[list[str]]) -> Doc:
    name = f"allow-{app}" if k < len(apps) else f"allow-{app}-{k}"
    selector = {"matchLabels": {"app": app}}
    peers: list[Doc] = [{"podSelector": {"matchLabels": {"app": other}}}
                        for other in rnd.sample(apps, min(len(apps), rnd.randint(1, 3)))]
    peers.append({"namespaceSelector": {"matchLabels": {"team": f"team-{rnd.randrange(TEAMS)}"}},
                  "podSelector": {"matchLabels": {"app": rnd.choice(("web", "api"))}}})
    roll = rnd.random()
    if roll < 0.05:  # dozens of peers: apps of namespaces across the cluster
        for _ in range(rnd.randint(20, 40)):
            j = rnd.randrange(len(names))
            peers.append({"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": names[j]}},
                "podSelector": {"matchLabels": {"app": rnd.choice(apps_of[j])}}})
    elif roll < 0.10:
        peers.append({"ipBlock": {"cidr": f"172.{16 + i % 16}.0.0/16",
                                  "except": [f"172.{16 + i % 16}.{rnd.randrange(256)}.0/24"]}})
    ports = rnd.choice([
        [{"protocol": "TCP", "port": "http"}],
        [{"protocol": "TCP", "port": 8080}],
        [{"protocol": "TCP", "port": 8000, "endPort": 8100}],
        [{"protocol": "TCP", "port": "grpc"}, {"protocol": "TCP", "port": 8080}],
    ])
    if app in ("api", "worker") and "db" in apps:
        return _policy(ns, name, selector, ["Ingress", "Egress"],
                       ingress=[{"from": peers, "ports": ports}],
                       egress=[{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}],
                                "ports": [{"protocol": "TCP", "port": "postgres"}]}])
    return _policy(ns, name, selector, ["Ingress"], ingress=[{"from": peers, "ports": ports}])


def write(docs: list[Doc], out: Any, fmt: str = "json") -> None:
    """A `kind: List` as JSON (as `kubectl get -o json`), or a YAML stream."""
    if fmt == "json":
        json.dump({"apiVersion": "v1", "kind": "List", "items": docs}, out,
                  separators=(",", ":"))
    else:
        import yaml

        yaml.safe_dump_all(docs, out, sort_keys=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--namespaces", type=int, default=None,
                    help="default: one per 100 pods")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--format", choices=("json", "yaml"), default="json")
    ap.add_argument("-o", "--output", default="-")
    args = ap.parse_args()
    docs = generate(args.pods, args.policies, args.namespaces, args.seed)
    if args.output == "-":
        write(docs, sys.stdout, args.format)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            write(docs, f, args.format)


if __name__ == "__main__":
    main()
