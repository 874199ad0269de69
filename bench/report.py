"""`make bench`: every benchmark at a size that finishes in minutes, one report.

Runs each benchmark below in its own process with `--json`, then writes
`docs/benchmarks.md` (tables, every goal marked met or not met, the machine and
the commands to reproduce) and PNG plots in `docs/img/`. The numbers are what
this machine gave in this run: a 2-core machine shared with other work varies by
tens of percent from run to run, which is why the benchmarks themselves compare
variants interleaved in one run and report ratios and spreads. Each step starts
once the CPUs are idle (`settle`: 90 % over a second, at most a minute's wait), so
that no step pays for the one before it, and says when it started and what it waited.

    .venv/bin/python bench/report.py [--only offline cni …] [--out docs]

With ``--only``, the sections of the other benchmarks already in the report (and
their goals) are kept as they were, each saying when and at which commit it was
measured.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import byte_compile
from results import Results, read

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> the benchmark's arguments at report size (each also gets --json FILE)
STEPS: dict[str, list[str]] = {
    # 100,000 pods and Antrea's shape: one run each (their goals are marked here too)
    "offline": ["offline.py", "--sizes", "2k/200", "10k/1k", "20k/2k", "100k/10k",
                "antrea 100k/75k/25k ns", "--repeat", "2"],
    "cni": ["cni.py", "--rounds", "40", "--pods", "10000", "--policies", "1000",
            "--parallel", "20"],
    # 200 calls of each: the p99 of 30 was their slowest one.
    "agent": ["agent.py", "--rounds", "200", "--seconds", "5"],
    # The same on the eBPF datapath (the goals are the agent's whatever its datapath),
    # with a node's hundred pods on the bridge: eBPF attaches programs to every port.
    "agent-ebpf": ["agent.py", "--rounds", "200", "--seconds", "5", "--datapath", "ebpf",
                   "--ports", "100"],
    "datapaths": ["datapaths.py", "--rounds", "3", "--seconds", "3", "--interleave", "2"],
    "multihost": ["multihost.py", "--endpoints", "10000", "--hosts", "3", "--changes", "100"],
    # The agent on the Kubernetes API (its test double): a node of a 10,000-pod cluster,
    # then of a 100,000-pod one (about three minutes, most of it filling the double).
    "kube": ["kube.py", "--pods", "10000", "--policies", "1000", "--nodes", "100"],
    "kube-cluster": ["kube.py", "--pods", "100000", "--policies", "10000", "--nodes", "1000",
                     "--rounds", "20"],
    "tiers": ["tiers.py", "--rounds", "3", "--seconds", "3"],
}


def machine() -> list[tuple[str, str]]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return [("date (UTC)", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")),
            ("commit", commit + (" (src modified)" if dirty else "")),
            ("CPU", f"{cpu}, {os.cpu_count()} cores"),
            ("memory", f"{int(mem) / 1024 / 1024:.1f} GiB"),
            ("kernel", platform.release()),
            ("Python", platform.python_version())]


def load_average() -> str:
    """The 1-minute load average: how busy the shared machine was around a step."""
    return Path("/proc/loadavg").read_text().split()[0]


def cpu_times() -> tuple[int, int]:
    """All CPUs' jiffies so far: (busy, total), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def idle_share(seconds: float = 1.0) -> float:
    """The share of the CPUs' time spent idle over the next `seconds`."""
    busy0, total0 = cpu_times()
    time.sleep(seconds)
    busy1, total1 = cpu_times()
    return 1.0 - (busy1 - busy0) / max(1, total1 - total0)


# A step begins once the machine is this idle over one second, or after SETTLE_MAX
# seconds, so that none begins while work another left behind still runs (a process,
# or the kernel's: a step deletes hundreds of namespaces). The load average lags by a
# minute and cannot tell: after the CNI step it read 2.0 with the CPUs 97 % idle.
SETTLE_IDLE = 0.9
SETTLE_MAX = 60.0


def settle() -> tuple[float, float]:
    """Wait for the machine to be idle; the seconds waited and the last idle share."""
    t0 = time.monotonic()
    while True:
        share = idle_share()
        waited = time.monotonic() - t0
        if share >= SETTLE_IDLE or waited >= SETTLE_MAX:
            return waited, share


Step = tuple[Results | None, float, str, str]  # results, seconds, error, when and load


def run_step(name: str, args: list[str], tmp: Path) -> Step:
    out = tmp / f"{name}.json"
    waited, share = settle()
    before = load_average()
    argv = [sys.executable, str(HERE / args[0]), *args[1:], "--json", str(out)]
    print(f"# {name}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=HERE, check=False, stdout=sys.stderr)
    took = time.perf_counter() - t0
    load = (f"started {started} UTC, after {waited:.0f} s waiting for the CPUs to be "
            f"{SETTLE_IDLE:.0%} idle ({share:.0%} in the second before); load average "
            f"{before} at the start, {load_average()} at the end")
    if proc.returncode != 0 or not out.exists():
        return None, took, f"exit {proc.returncode}", load
    return read(out), took, "", load


def plot(name: str, spec: dict[str, object], directory: Path) -> str:
    """One PNG (lines: cost against size; bars: variants side by side); its file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if "lines" in spec:
        lines = spec["lines"]
        assert isinstance(lines, dict)
        for label, points in lines.items():
            xs, ys = zip(*points, strict=True) if points else ((), ())
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel(str(spec.get("x", "")))
    else:
        bars = spec["bars"]
        assert isinstance(bars, dict)
        groups = list(bars)
        keys = sorted({k for g in bars.values() for k in g})
        width = 0.8 / max(1, len(keys))
        for i, key in enumerate(keys):
            ax.bar([j + i * width for j in range(len(groups))],
                   [bars[g].get(key, 0) for g in groups], width, label=key)
        ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=7)
        if "ref" in spec:
            ax.axhline(float(str(spec["ref"])), color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel(str(spec.get("y", "")))
    ax.set_title(name)
    ax.legend(fontsize=7)
    fig.tight_layout()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path.name


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(c: str) -> str:
        return c.replace("|", "\\|")

    out = ["| " + " | ".join(cell(c) for c in header) + " |",
           "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return out


def sections(text: str) -> dict[str, list[str]]:
    """A report's ``## name`` sections: name -> its lines, the heading excluded."""
    out: dict[str, list[str]] = {}
    lines: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            lines = out.setdefault(line[3:].strip(), [])
        elif lines is not None:
            lines.append(line)
    return out


def table_rows(lines: list[str]) -> list[list[str]]:
    """The body rows of the markdown tables in ``lines`` (cells unescaped)."""
    rows = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in lines if line.startswith("| ")]
    return [r for r in rows[1:] if not all(set(c) <= {"-"} for c in r)]


@dataclass(frozen=True)
class Kept:
    """A benchmark's section of an earlier report, not run this time."""

    lines: list[str]
    goals: list[list[str]]  # its rows of the goals table


def kept_sections(previous: str, run: Sequence[str]) -> dict[str, Kept]:
    """The sections of ``previous`` (a report) of benchmarks not in ``run``, each saying
    when it was measured (an older report gave that only for the whole report)."""
    old = sections(previous)
    machine = dict((r[0], r[1]) for r in table_rows(old.get("The machine", [])) if len(r) == 2)
    goals = table_rows(old.get("Goals", []))
    out: dict[str, Kept] = {}
    for name in STEPS:
        if name in run or name not in old:
            continue
        lines = "\n".join(old[name]).strip("\n").splitlines()
        at = next((i for i, line in enumerate(lines) if line.startswith("`")), None)
        if at is not None:
            lines[at] = re.sub(r" --json [^\s`]+", "", lines[at])
        if (at is not None and " UTC, commit " not in lines[at] and "; started " not in lines[at]
                and lines[at].endswith(")")):
            lines[at] = (lines[at][:-1] + f"; {machine.get('date (UTC)', '?')} UTC, commit "
                         f"{machine.get('commit', '?')})")
        out[name] = Kept(lines, [r for r in goals if r and r[0] == name])
    return out


def render(done: dict[str, Step], out: Path,
           kept: Mapping[str, Kept] | None = None) -> str:
    kept = kept or {}
    about = dict(machine())
    lines = ["# Benchmarks", "",
             "Written by `make bench` (`bench/report.py`); do not edit by hand. Every figure",
             "below is what this machine gave in the run described with it, measured by the",
             "benchmark named with it. The machine is small and shared: read ratios, spreads",
             "and growth, not the last digit.", "", "## The machine", ""]
    lines += md_table(["", ""], [list(r) for r in about.items()])
    if kept:
        lines += ["", f"The sections of {', '.join(kept)} are from an earlier run "
                      "(`bench/report.py --only` ran the others); each says when."]
    goals = [[name, g.goal, g.measured, "met" if g.met else "**not met**"]
             for name, (res, _, _, _) in done.items() if res for g in res.goals]
    goals += [row for k in kept.values() for row in k.goals]
    order = list(STEPS)
    goals.sort(key=lambda r: order.index(r[0]) if r[0] in order else len(order))
    lines += ["", "## Goals", ""]
    lines += md_table(["benchmark", "goal", "measured", "status"], goals)
    for name in [n for n in order if n in done or n in kept]:
        lines += ["", f"## {name}", ""]
        if name in kept:
            lines += kept[name].lines
            continue
        res, took, error, load = done[name]
        if res is None:
            lines += [f"Not measured in this run ({error}).", ""]
            continue
        command = re.sub(r" --json [^\s`]+", "", res.command.removeprefix("bench/"))
        lines += [f"`.venv/bin/python bench/{command}` ({took:.0f} s; commit {about['commit']}; "
                  f"{load})", ""]
        for t in res.tables:
            lines += [f"**{t.title}**", ""]
            lines += md_table(t.header, t.rows)
            if t.note:
                lines += ["", t.note]
            lines += [""]
        for plot_name, spec in res.series.items():
            lines += [f"![{plot_name}](img/{plot(plot_name, spec, out / 'img')})", ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=tuple(STEPS), default=list(STEPS))
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/report.py: run as root (namespaces, the agent, datapaths)")
    if importlib.util.find_spec("matplotlib") is None:
        # Checked before the steps run: the plots are drawn after them, and half an hour
        # of measurements would be lost to a missing package.
        raise SystemExit("bench/report.py: matplotlib is missing: `make bench` installs it "
                         "(pip install -e '.[dev,bench]')")
    byte_compile()  # the steps' processes import this tree (see bench/common.py)
    done: dict[str, Step] = {}
    with tempfile.TemporaryDirectory(prefix="stockade-report-") as tmp:
        for name in args.only:
            done[name] = run_step(name, STEPS[name], Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "benchmarks.md"
    previous = report.read_text(encoding="utf-8") if report.exists() else ""
    text = render(done, args.out, kept_sections(previous, args.only))
    report.write_text(text, encoding="utf-8")
    print(f"wrote {args.out / 'benchmarks.md'}", file=sys.stderr)
    if any(res is None for res, _, _, _ in done.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
