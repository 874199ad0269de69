"""`nft_text.full_load` (what `stockade compile -o nft` prints) against its definition:
the text of each command is, byte for byte, `json.dumps` of the command `render_full`
gives, in the same order, on random clusters with NetworkPolicies and
ClusterNetworkPolicies (tier chains, links, verdict maps), with and without logging,
and with a table name that JSON escapes.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from tests.property.strategies import DEFAULT, DENSE, clusters
from tests.property.tier_strategies import cnp_clusters

from stockade.compile.ir import Ruleset
from stockade.compile.lower import compile_cluster
from stockade.compile.nft import Table, render_full
from stockade.compile.nft_text import full_load
from stockade.model.cluster import Cluster

TABLES = st.sampled_from([Table(), Table("t\u00e4\"\\x", priority=-5),
                          Table(log_group=7, log_rate=3)])


def _same(table: Table, rs: Ruleset) -> None:
    texts = list(full_load(table, rs))
    assert texts == [json.dumps(c) for c in render_full(table, rs)]


@given(cluster=st.one_of(clusters(DEFAULT, with_policies=True),
                         clusters(DENSE, with_policies=True)), table=TABLES)
def test_the_text_of_a_full_load_is_json_dumps_of_its_commands(cluster: Cluster,
                                                                table: Table) -> None:
    _same(table, compile_cluster(cluster))


@given(cluster=st.one_of(cnp_clusters(DEFAULT), cnp_clusters(DENSE)), table=TABLES)
def test_so_it_is_with_tiers(cluster: Cluster, table: Table) -> None:
    _same(table, compile_cluster(cluster))


def test_an_empty_ruleset_is_the_skeleton() -> None:
    _same(Table(), Ruleset())
