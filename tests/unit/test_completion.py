"""`stockade completion`: the scripts are run in the real shells, against the parser.

bash is driven as its completion machinery drives it (COMP_WORDS, COMP_CWORD, the
function, COMPREPLY); zsh through a pseudo-terminal with TAB pressed (compinit, the
real completion widget, compadd recording what it is given); fish with its own
`complete -C`. The expected words come from the argparse parser, not from a copy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stockade.cli.completion import MANY, Values, describe
from stockade.cli.main import build_parser


def _script(shell: str, *extra: str) -> str:
    out = subprocess.run([sys.executable, "-m", "stockade.cli.main", "completion", shell,
                          *extra], capture_output=True, text=True, check=True)
    return out.stdout


def _sub(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions
                      if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    return {name for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for name in a.choices}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {f for a in parser._actions if a.help != argparse.SUPPRESS
            for f in a.option_strings}


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "stockade.bash"
    path.write_text(_script("bash"))
    return path


def _bash(script: Path, line: str, cwd: Path | None = None) -> list[str]:
    """COMPREPLY for the command line `line` (the cursor at its end)."""
    words = line.split(" ")
    program = (
        f"source {script}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}\n"
        "complete -p stockade >/dev/null || exit 3\n"
        "_stockade 2>/dev/null\n"
        "printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", program],
                         capture_output=True, text=True, check=True, cwd=cwd)
    return [w for w in out.stdout.split("\n") if w]


def test_bash_offers_every_subcommand_then_the_options_of_the_command(
        bash_script: Path, parser: argparse.ArgumentParser) -> None:
    assert set(_bash(bash_script, "stockade ")) == _subcommands(parser)
    assert _bash(bash_script, "stockade expl") == ["explain"]
    explain = _sub(parser, "explain")
    assert set(_bash(bash_script, "stockade explain -")) == _options(explain)
    assert set(_bash(bash_script, "stockade explain --")) == {
        f for f in _options(explain) if f.startswith("--")}
    # nested subcommands, and their own options
    assert set(_bash(bash_script, "stockade dataplane ")) == _subcommands(
        _sub(parser, "dataplane"))
    assert set(_bash(bash_script, "stockade dataplane show -")) == _options(
        _sub(parser, "dataplane", "show"))


def test_bash_offers_the_choices_of_an_option_and_of_a_positional(
        bash_script: Path, parser: argparse.ArgumentParser) -> None:
    protocols = {str(c) for c in _option(_sub(parser, "explain"), "--protocol").choices or ()}
    assert protocols == {"TCP", "UDP", "SCTP"}
    assert set(_bash(bash_script, "stockade explain --protocol ")) == protocols
    assert _bash(bash_script, "stockade explain --protocol SC") == ["SCTP"]
    # --opt=value, which bash splits at the = (COMP_WORDBREAKS)
    assert set(_bash(bash_script, "stockade explain --protocol = ")) == protocols
    datapaths = {str(c) for c in
                 _option(_sub(parser, "dataplane", "show"), "--datapath").choices or ()}
    assert set(_bash(bash_script, "stockade dataplane show --datapath ")) == datapaths
    kinds = next(a for a in _sub(parser, "get")._actions if a.dest == "kind").choices
    assert set(_bash(bash_script, "stockade get ")) == set(kinds or ())
    assert set(_bash(bash_script, "stockade completion ")) == {"bash", "zsh", "fish"}


def test_bash_completes_file_names_for_f_and_does_not_take_values_for_commands(
        bash_script: Path, tmp_path: Path) -> None:
    (tmp_path / "policies.yaml").write_text("")
    (tmp_path / "pods.yaml").write_text("")
    (tmp_path / "sub").mkdir()
    assert set(_bash(bash_script, "stockade explain -f po", tmp_path)) == {
        "policies.yaml", "pods.yaml"}
    # -f takes several files: the second is completed as a file too
    assert _bash(bash_script, "stockade explain -f pods.yaml pol", tmp_path) == [
        "policies.yaml"]
    assert _bash(bash_script, "stockade validate pol", tmp_path) == ["policies.yaml"]
    # a value that is also a command's name is a value, not a subcommand
    assert set(_bash(bash_script, "stockade explain --from list --protocol ")) == {
        "TCP", "UDP", "SCTP"}
    assert _bash(bash_script, "stockade explain --from list ") == []
    # --state-dir takes a directory
    assert _bash(bash_script, "stockade agent --state-dir ", tmp_path) == ["sub"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completes_through_its_completion_system(tmp_path: Path,
                                                     parser: argparse.ArgumentParser) -> None:
    script = tmp_path / "_stockade"
    script.write_text(_script("zsh"))
    (tmp_path / "policies.yaml").write_text("")
    # An interactive zsh in a pseudo-terminal: TAB runs the real completion widget;
    # compadd prints what it was given before adding it. TAB is typed once the
    # setup has run and the line editor shows its prompt (what is typed ahead of it
    # may be dropped).
    driver = tmp_path / "drive.zsh"
    driver.write_text(f"""
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "PS1='PROMPT> '; autoload -U compinit; compinit -u -D; source {script}"
zpty -w z 'compadd () {{ local -a h; builtin compadd -O h "$@"; print -rl -- "" "<hit>"${{^h}}; }}'
zpty -w z 'print __READ""Y__'
zpty -r z line '*__READY__*PROMPT> *'
zpty -w -n z "$1"$'\\t'
zpty -w z $'\\x15print __DO""NE__'
out=""
while zpty -r z line; do out+=$line; [[ $out == *__DONE__* ]] && break; done
print -r -- "$out"
zpty -d z
""")

    def complete(line: str) -> set[str]:
        out = subprocess.run(["zsh", "-f", str(driver), line], capture_output=True,
                             text=True, timeout=30, cwd=tmp_path).stdout
        return {w.split("<hit>", 1)[1].strip() for w in out.replace("\r", "").split("\n")
                if "<hit>" in w}

    assert complete("stockade ") == _subcommands(parser)
    assert complete("stockade explain --") == {
        f for f in _options(_sub(parser, "explain")) if f.startswith("--")}
    assert complete("stockade explain --protocol ") == {"TCP", "UDP", "SCTP"}
    assert complete("stockade dataplane ") == _subcommands(_sub(parser, "dataplane"))
    assert "policies.yaml" in complete("stockade explain -f pol")


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes_with_its_complete_builtin(tmp_path: Path,
                                                  parser: argparse.ArgumentParser) -> None:
    script = tmp_path / "stockade.fish"
    script.write_text(_script("fish"))
    (tmp_path / "policies.yaml").write_text("")

    def complete(line: str) -> set[str]:
        out = subprocess.run(["fish", "-N", "-c", f"source {script}; complete -C '{line}'"],
                             capture_output=True, text=True, check=True, cwd=tmp_path)
        return {w.split("\t")[0] for w in out.stdout.split("\n") if w}

    assert complete("stockade ") == _subcommands(parser)
    assert complete("stockade explain --") == {
        f for f in _options(_sub(parser, "explain")) if f.startswith("--")}
    assert complete("stockade explain --protocol ") == {"TCP", "UDP", "SCTP"}
    assert complete("stockade dataplane show --datapath ") == {
        str(c) for c in _option(_sub(parser, "dataplane", "show"), "--datapath").choices or ()}
    assert complete("stockade explain -f pol") == {"policies.yaml"}


def test_describe_reads_arity_choices_and_file_values_from_argparse() -> None:
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("-f", "--file", action="extend", nargs="+")
    p.add_argument("-o", "--output", choices=("txt", "json"))
    p.add_argument("--format", metavar="{a,b}")
    p.add_argument("--cache-dir")
    p.add_argument("--socket", metavar="PATH")
    p.add_argument("--pair", nargs=2)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--hidden", help=argparse.SUPPRESS)
    p.add_argument("kind", choices=("a", "b"))
    p.add_argument("rest", nargs="*")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("go", help="go somewhere").add_argument("--far", action="store_true")
    root = describe(p)
    by_flag = {o.flags[-1]: o for o in root.options}
    assert "--hidden" not in by_flag
    assert (by_flag["--file"].arity, by_flag["--file"].values) == (MANY, Values("files"))
    assert by_flag["--output"].values == Values("words", ("txt", "json"))
    assert by_flag["--format"].values == Values("words", ("a", "b"))
    assert by_flag["--cache-dir"].values == Values("dirs")
    assert by_flag["--socket"].values == Values("files")
    assert by_flag["--pair"].arity == 2
    assert by_flag["--quiet"].arity == 0
    assert [(q.arity, q.values.kind) for q in root.positionals] == [(1, "words"), (MANY, "free")]
    [go] = root.commands
    assert (go.path, go.help, [o.flags for o in go.options]) == (
        ("go",), "go somewhere", [("-h", "--help"), ("--far",)])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_completes_the_plugin_through_kubectl_complete_stockade(
        tmp_path: Path) -> None:
    from stockade.cli.kubectl import build_parser as kubectl_parser

    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "kubectl_complete-stockade").exists(), "pip install -e . installs it"
    (tmp_path / "policies.yaml").write_text("")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}

    def complete(*words: str) -> list[str]:
        out = subprocess.run(["kubectl", "__complete", "stockade", *words], env=env,
                             capture_output=True, text=True, check=True, cwd=tmp_path)
        lines = out.stdout.split("\n")
        assert lines[-2:] == [":4", ""], out.stdout
        return lines[:-2]

    assert set(complete("")) == _subcommands(kubectl_parser())
    assert complete("mat") == ["matrix"]
    assert set(complete("diff", "-f", "pol")) == {"policies.yaml"}
