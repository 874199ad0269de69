"""One function per spec field: does a peer, a port, an ipBlock match a flow?"""

from __future__ import annotations

from collections.abc import Mapping

from stockade.model.cidr import parse_cidr, parse_ip
from stockade.model.cluster import Endpoint
from stockade.model.labels import Labels
from stockade.model.policy import IPBlock, Peer, PolicyPort, Rule


def ip_block_matches(block: IPBlock, ip: str) -> bool:
    addr = parse_ip(ip)
    net = parse_cidr(block.cidr)
    if addr is None or net is None or addr.version != net.version or addr not in net:
        return False
    for text in block.except_:
        exc = parse_cidr(text)
        if exc is not None and exc.version == addr.version and addr in exc:
            return False
    return True


def peer_matches(
    peer: Peer,
    policy_namespace: str,
    endpoint: Endpoint | None,
    ip: str,
    namespace_labels: Mapping[str, Labels],
) -> bool:
    """Whether the other side of a flow (a pod, or a bare IP) is this peer.

    Selectors within one peer are ANDed; an absent namespaceSelector means the
    policy's own namespace. Selectors never match a bare IP; an ipBlock matches
    pod IPs as well as external ones.
    """
    if peer.ip_block is not None:
        return ip_block_matches(peer.ip_block, ip)
    if endpoint is None or (peer.pod_selector is None and peer.namespace_selector is None):
        return False
    if peer.namespace_selector is None:
        if endpoint.namespace != policy_namespace:
            return False
    else:
        labels = namespace_labels.get(endpoint.namespace)
        if labels is None or not peer.namespace_selector.matches(labels):
            return False
    return peer.pod_selector is None or peer.pod_selector.matches(endpoint.labels)


def port_matches(
    entry: PolicyPort, port: int, protocol: str, destination: Endpoint | None
) -> bool:
    """A port entry against a flow; a named port is resolved on the destination pod."""
    if entry.protocol != protocol:
        return False
    if entry.port is None:
        return True
    if isinstance(entry.port, str):
        if destination is None:
            return False
        return destination.resolve_port(entry.port, entry.protocol) == port
    high = entry.end_port if entry.end_port is not None else entry.port
    return entry.port <= port <= high


def matching_port(
    rule: Rule, port: int, protocol: str, destination: Endpoint | None
) -> int | None:
    """Index of the first port entry of a rule matching the flow; -1 when it has none."""
    if not rule.ports:
        return -1
    for i, entry in enumerate(rule.ports):
        if port_matches(entry, port, protocol, destination):
            return i
    return None
