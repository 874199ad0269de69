"""The connection limit's place in the skeleton of nftables (compile/nft.py) and iptables."""

from __future__ import annotations

import json

import pytest

from stockade.compile.nft import LIMIT_SETS, Table, render_skeleton, skeleton_rules


def test_no_limit_renders_the_skeleton_as_before() -> None:
    text = json.dumps(render_skeleton(Table()))
    assert "ct count" not in text and not any(n in text for n in LIMIT_SETS.values())
    assert [c for _, c in skeleton_rules()] == [c for _, c in skeleton_rules(Table())]


def test_a_limit_comes_after_conntrack_and_before_the_verdict_maps() -> None:
    comments = [c.split(" #")[0] for _, c in skeleton_rules(Table(conntrack_limit=9))]
    assert comments[:4] == ["conntrack", "tcp without syn", "conntrack limit ip",
                            "conntrack limit ip6"]
    assert comments[-4:] == ["egress ip", "egress ip6", "ingress ip", "ingress ip6"]
    cmds = render_skeleton(Table(conntrack_limit=9))
    kinds = [next(iter(c["add"])) for c in cmds]
    # the sets before the chain whose rules add to them
    forward = next(i for i, c in enumerate(cmds) if c["add"].get("chain", {}).get("hook"))
    sets = [i for i, c in enumerate(cmds) if c["add"].get("set", {}).get("name")
            in LIMIT_SETS.values()]
    assert len(sets) == 2 and max(sets) < forward and kinds.count("rule") > 0
    limit = next(e for e, c in skeleton_rules(Table(conntrack_limit=9)) if "limit ip6" in c)
    assert limit[1]["set"]["stmt"] == [{"ct count": {"val": 9, "inv": True}}]
    assert limit[1]["set"]["elem"] == {"payload": {"protocol": "ip6", "field": "saddr"}}


def test_sets_the_kernel_keeps_are_left_out_of_the_skeleton() -> None:
    """A repair keeps the limit's sets (and their counts) when its rules are intact: the
    skeleton then adds the rules only (re-adding a dynamic set is refused)."""
    from stockade.compile.ir import Ruleset
    from stockade.compile.nft import render_plan
    from stockade.compile.plan import plan

    table = Table(conntrack_limit=9)
    names = lambda cmds: [c["add"]["set"]["name"] for c in cmds  # noqa: E731
                          if "add" in c and "set" in c["add"]]
    assert names(render_skeleton(table)) == ["k4-ct", "k6-ct"]
    assert names(render_skeleton(table, kept_sets=("k4-ct", "k6-ct"))) == []
    cmds = render_plan(table, plan(Ruleset(), Ruleset()), skeleton=True,
                       kept_sets=("k4-ct", "k6-ct"))
    assert names(cmds) == [] and "ct count" in json.dumps(cmds)


def test_the_flag_takes_a_whole_number_the_counter_holds(
        capsys: pytest.CaptureFixture[str]) -> None:
    from stockade.cli.main import main

    for bad in ("-1", "4294967296", "1e3", " 5", "five"):
        with pytest.raises(SystemExit) as info:
            main(["compile", "-f", "examples/cluster.yaml", "--conntrack-limit", bad])
        assert info.value.code == 2
        assert "argument --conntrack-limit" in capsys.readouterr().err
    assert main(["compile", "-f", "examples/cluster.yaml", "-o", "nft",
                 "--conntrack-limit", "4294967295"]) == 0
    assert '"val": 4294967295' in capsys.readouterr().out


def test_iptables_limits_in_the_base_chain_as_iptables_save_prints_it() -> None:
    from stockade.compile.iptables import Names, base_bodies

    names = Names.of("stockade")
    assert not any("connlimit" in b for b in base_bodies(names, 4))
    for fam, mask in ((4, 32), (6, 128)):
        bodies = base_bodies(names, fam, 5)
        assert bodies[:2] == base_bodies(names, fam)[:2]  # conntrack, tcp without syn
        assert bodies[2].startswith(
            "-m conntrack --ctstate NEW -m connlimit --connlimit-above 5 "
            f"--connlimit-mask {mask} --connlimit-saddr -m comment --comment ")
        assert bodies[2].endswith(" -j DROP")
