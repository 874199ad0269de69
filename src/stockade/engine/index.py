"""A label index over endpoints, so selectors are answered by set algebra.

Endpoints with the same namespace and labels share an *identity*: everything a
selector decides is decided once per identity, never once per pod. Each
identity is filed under every `key=value` and `key` it carries, per namespace,
so a selector's members are intersections and unions of posting sets instead
of a scan over all pods (the shape of Calico's label index).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from stockade.model.cluster import Cluster, Endpoint
from stockade.model.labels import Labels
from stockade.model.policy import Peer
from stockade.model.selector import DOES_NOT_EXIST, EXISTS, IN, NOT_IN, Selector


@dataclass(frozen=True)
class Identity:
    id: int
    namespace: str
    labels: Labels


class LabelIndex:
    """Posting sets of identities for one population of labelled things."""

    def __init__(self) -> None:
        self.all: set[int] = set()
        self._pairs: dict[tuple[str, str], set[int]] = {}
        self._keys: dict[str, set[int]] = {}

    def add(self, ident: int, labels: Labels) -> None:
        self.all.add(ident)
        for k, v in labels.items_tuple():
            self._pairs.setdefault((k, v), set()).add(ident)
            self._keys.setdefault(k, set()).add(ident)

    def select(self, selector: Selector, within: set[int] | frozenset[int]) -> set[int]:
        """The members of `within` that the selector matches.

        The positive requirements (In, Exists) are intersected first, smallest
        posting set first, and `within` last: a selector over a large
        population (every namespace of a team) costs its matches, not the
        population.
        """
        positive: list[set[int]] = []
        negative: list[set[int]] = []
        for req in selector.requirements():
            if req.operator == IN:
                if len(req.values) == 1:
                    hit = self._pairs.get((req.key, req.values[0]), _NONE)
                else:
                    hit = set()
                    for v in req.values:
                        hit |= self._pairs.get((req.key, v), _NONE)
                positive.append(hit)
            elif req.operator == NOT_IN:
                negative.extend(self._pairs.get((req.key, v), _NONE) for v in req.values)
            elif req.operator == EXISTS:
                positive.append(self._keys.get(req.key, _NONE))
            elif req.operator == DOES_NOT_EXIST:
                negative.append(self._keys.get(req.key, _NONE))
            else:
                return set()
        if positive:
            positive.sort(key=len)
            result = positive[0] & within  # iterates over the smaller of the two
            for hit in positive[1:]:
                if not result:
                    break
                result &= hit
        else:
            result = set(within)
        for miss in negative:
            if not result:
                break
            result -= miss
        return set(result)

    def select_reference(self, selector: Selector, within: set[int] | frozenset[int]
                         ) -> set[int]:
        """`select` requirement by requirement, in order (the definition; tests compare)."""
        result = set(within)
        for req in selector.requirements():
            if not result:
                break
            if req.operator == IN:
                hit: set[int] = set()
                for v in req.values:
                    hit |= self._pairs.get((req.key, v), set())
                result &= hit
            elif req.operator == NOT_IN:
                for v in req.values:
                    result -= self._pairs.get((req.key, v), set())
            elif req.operator == EXISTS:
                result &= self._keys.get(req.key, set())
            elif req.operator == DOES_NOT_EXIST:
                result -= self._keys.get(req.key, set())
            else:
                return set()
        return result


_NONE: set[int] = set()  # an absent posting set; never changed


class ClusterIndex:
    """Identities, namespaces and selector answers for one cluster snapshot."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.namespace_labels: dict[str, Labels] = {n.name: n.labels for n in cluster.namespaces}
        self.identities: list[Identity] = []
        self.members: list[list[Endpoint]] = []
        self._by_key: dict[tuple[str, Labels], int] = {}
        self._pods = LabelIndex()
        self._in_namespace: dict[str, set[int]] = {}
        self._namespaces = LabelIndex()
        self._ns_names = sorted(self.namespace_labels)
        for i, name in enumerate(self._ns_names):
            self._namespaces.add(i, self.namespace_labels[name])
        for ep in cluster.endpoints:
            self.identity_of(ep)
        self._peer_cache: dict[tuple[str, Peer], frozenset[int]] = {}
        self._ns_cache: dict[Selector, frozenset[str]] = {}

    def identity_of(self, ep: Endpoint) -> int:
        key = (ep.namespace, ep.labels)
        ident = self._by_key.get(key)
        if ident is None:
            ident = len(self.identities)
            self._by_key[key] = ident
            self.identities.append(Identity(ident, ep.namespace, ep.labels))
            self.members.append([])
            self._pods.add(ident, ep.labels)
            self._in_namespace.setdefault(ep.namespace, set()).add(ident)
        self.members[ident].append(ep)
        return ident

    def identity_of_existing(self, ep: Endpoint) -> int:
        return self._by_key[(ep.namespace, ep.labels)]

    def namespaces_matching(self, selector: Selector) -> frozenset[str]:
        found = self._ns_cache.get(selector)
        if found is None:
            hits = self._namespaces.select(selector, self._namespaces.all)
            found = frozenset(self._ns_names[i] for i in hits)
            self._ns_cache[selector] = found
        return found

    def pods_matching(self, namespaces: Iterable[str], selector: Selector | None) -> set[int]:
        within: set[int] = set()
        for ns in namespaces:
            within |= self._in_namespace.get(ns, set())
        if selector is None or selector.is_empty:
            return within
        return self._pods.select(selector, within)

    def selected_by_policy(self, namespace: str, selector: Selector) -> frozenset[int]:
        """Identities a policy's podSelector selects (only in its own namespace)."""
        return frozenset(self.pods_matching((namespace,), selector))

    def peer_identities(self, policy_namespace: str, peer: Peer) -> frozenset[int]:
        """Identities a selector peer stands for; an ipBlock peer gives the empty set."""
        # A namespaceSelector peer means the same pods in every policy's namespace.
        key = ("" if peer.namespace_selector is not None else policy_namespace, peer)
        found = self._peer_cache.get(key)
        if found is not None:
            return found
        if peer.ip_block is not None or (peer.pod_selector is None
                                         and peer.namespace_selector is None):
            found = frozenset()
        else:
            namespaces: Iterable[str] = (
                (policy_namespace,) if peer.namespace_selector is None
                else self.namespaces_matching(peer.namespace_selector))
            found = frozenset(self.pods_matching(namespaces, peer.pod_selector))
        self._peer_cache[key] = found
        return found

    def endpoints(self, identities: Iterable[int]) -> list[Endpoint]:
        return [ep for i in sorted(identities) for ep in self.members[i]]

