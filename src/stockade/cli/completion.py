"""`stockade completion bash|zsh|fish`: a shell completion script made from the parser.

The script is generated from the argparse parser itself (every command module is
imported for it), so it offers exactly the subcommands, options and choices the
program accepts, and nothing has to be kept in step by hand. It is static: a TAB
runs a shell function over tables, never Python, so it costs nothing per key press.

What is completed: subcommands (nested ones too), the options of the command being
typed, an option's `choices` (or a `{a,b}` metavar), file names for `-f` and every
value or positional named FILE, PATH or DIR (directories only for DIR), and the
positional arguments with choices (`stockade get KIND`, `stockade completion SHELL`).
bash and zsh know how many values each option takes, so a value is never taken for
a subcommand or a positional; fish offers a command's positional choices anywhere.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

SHELLS = ("bash", "zsh", "fish")
PROGRAMS = ("stockade", "kubectl-stockade")
MANY = -1  # an option or positional taking one value or more (nargs + * REMAINDER)


@dataclass(frozen=True)
class Values:
    """What a value is completed with: `words`, `files`, `dirs` or nothing (`free`)."""

    kind: str
    words: tuple[str, ...] = ()

    def code(self) -> str:
        """The value spec as the shell functions read it: w:WORDS, f, d or empty."""
        if self.kind == "words":
            return "w:" + " ".join(self.words)
        return {"files": "f", "dirs": "d"}.get(self.kind, "")


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    arity: int  # 0 for a flag, MANY for one or more
    values: Values
    help: str


@dataclass(frozen=True)
class Positional:
    arity: int
    values: Values


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # () for the program itself
    help: str
    options: tuple[Option, ...]
    positionals: tuple[Positional, ...]
    commands: tuple[Command, ...]

    def walk(self) -> Iterator[Command]:
        yield self
        for c in self.commands:
            yield from c.walk()

    @property
    def key(self) -> str:
        return ".".join(self.path)


_FILE_DESTS = frozenset({"file", "files", "paths", "against", "filename", "filenames"})
_BRACES = re.compile(r"^\{([^{}]+)\}$")


def _values(action: argparse.Action) -> Values:
    if action.choices is not None and not isinstance(action.choices, dict):
        return Values("words", tuple(str(c) for c in action.choices))
    metavar = action.metavar if isinstance(action.metavar, str) else ""
    braces = _BRACES.match(metavar)
    if braces:
        return Values("words", tuple(braces.group(1).split(",")))
    if isinstance(action.type, argparse.FileType):
        return Values("files")
    if metavar == "DIR" or action.dest.endswith("_dir"):
        return Values("dirs")
    if (any(word in metavar for word in ("FILE", "DIR", "PATH"))
            or action.dest in _FILE_DESTS or "-f" in action.option_strings):
        return Values("files")
    return Values("free")


def _arity(nargs: Any) -> int:
    if nargs is None or nargs == argparse.OPTIONAL:
        return 1
    if isinstance(nargs, int):
        return nargs
    return MANY


def describe(parser: argparse.ArgumentParser, path: tuple[str, ...] = (),
             help_text: str = "") -> Command:
    """The completion's view of `parser`: its options, positionals and subcommands."""
    options: list[Option] = []
    positionals: list[Positional] = []
    commands: list[Command] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                commands.append(describe(sub, (*path, name), helps.get(name, "")))
        elif action.option_strings:
            arity = 0 if action.nargs == 0 else _arity(action.nargs)
            options.append(Option(tuple(action.option_strings), arity,
                                  _values(action) if arity else Values("free"),
                                  action.help or ""))
        else:
            positionals.append(Positional(_arity(action.nargs), _values(action)))
    return Command(path, help_text, tuple(options), tuple(positionals), tuple(commands))


def _function(prog: str) -> str:
    return "_" + re.sub(r"\W", "_", prog)


def _table(root: Command, table: str) -> list[str]:
    """The tables both bash and zsh read (`NAME[key]=value` is valid in both):
    c:PATH subcommands, o:PATH options, a:PATH:OPT arity (n for many),
    v:PATH:OPT an option's values, p:PATH:I the I-th positional's, r:PATH those of
    every positional past the fixed ones."""
    lines = [f"typeset -gA {table}"]

    def put(key: str, value: str) -> None:
        lines.append(f"{table}[{key}]={shlex.quote(value)}")

    for cmd in root.walk():
        if cmd.commands:
            put(f"c:{cmd.key}", " ".join(c.path[-1] for c in cmd.commands))
        put(f"o:{cmd.key}", " ".join(f for o in cmd.options for f in o.flags))
        for o in cmd.options:
            for flag in o.flags:
                if o.arity:
                    put(f"a:{cmd.key}:{flag}", "n" if o.arity == MANY else str(o.arity))
                    put(f"v:{cmd.key}:{flag}", o.values.code())
        slot = 0
        for p in cmd.positionals:
            if p.arity == MANY:
                put(f"r:{cmd.key}", p.values.code())
                break
            for _ in range(p.arity):
                put(f"p:{cmd.key}:{slot}", p.values.code())
                slot += 1
    return lines


# The walk over the words before the cursor, in the syntax bash and zsh share: it
# finds the subcommand path, the option whose values are being typed (left: how
# many values it still takes, -1 for any number) and the positional index.
_WALK = """\
    local cmdpath="" opt="" w
    local -i left=0 npos=0 i
    for ((i = FIRST; i < CURRENT_INDEX; i++)); do
        w=WORD_AT_I
        [[ $w == "=" ]] && continue  # bash splits --opt=value at the =
        if ((left != 0)) && [[ $w != -* ]]; then
            if ((left > 0)); then
                left=left-1
                ((left == 0)) && opt=""
            fi
            continue
        fi
        if [[ $w == -* ]]; then
            opt=${w%%=*}
            left=0
            if [[ $w != *=* ]]; then
                case ${TABLE[a:$cmdpath:$opt]} in
                    n) left=-1 ;;
                    [0-9]*) left=${TABLE[a:$cmdpath:$opt]} ;;
                esac
            fi
            ((left == 0)) && opt=""
            continue
        fi
        opt=""
        left=0
        if [[ " ${TABLE[c:$cmdpath]} " == *" $w "* ]]; then
            cmdpath=${cmdpath:+$cmdpath.}$w
            npos=0
        else
            npos=npos+1
        fi
    done
"""


def _walk(table: str, first: str, current: str, word: str) -> str:
    return (_WALK.replace("TABLE", table).replace("FIRST", first)
            .replace("CURRENT_INDEX", current).replace("WORD_AT_I", word))


def bash_script(root: Command, prog: str) -> str:
    fn = _function(prog)
    table = f"{fn}_spec"
    return "\n".join([
        f"# bash completion for {prog} (made by `stockade completion bash`)",
        f"# Load it with: source <(stockade completion bash{_for(prog)})",
        *_table(root, table),
        "",
        f"{fn}_values() {{  # $1: a value spec (w:WORDS, f, d), $2: the word typed",
        "    case $1 in",
        "        w:*) mapfile -t COMPREPLY < <(compgen -W \"${1#w:}\" -- \"$2\") ;;",
        "        f) compopt -o filenames 2>/dev/null",
        "           mapfile -t COMPREPLY < <(compgen -f -- \"$2\") ;;",
        "        d) compopt -o filenames 2>/dev/null",
        "           mapfile -t COMPREPLY < <(compgen -d -- \"$2\") ;;",
        "    esac",
        "}",
        "",
        f"{fn}() {{",
        "    local cur=${COMP_WORDS[COMP_CWORD]}",
        "    COMPREPLY=()",
        _walk(table, "1", "COMP_CWORD", "${COMP_WORDS[i]}").rstrip("\n"),
        "    [[ $cur == \"=\" ]] && cur=\"\"",
        "    if [[ $cur == -*=* ]]; then  # --opt=value when = does not break words",
        "        opt=${cur%%=*}",
        f"        {fn}_values \"${{{table}[v:$cmdpath:$opt]}}\" \"${{cur#*=}}\"",
        "        COMPREPLY=(\"${COMPREPLY[@]/#/$opt=}\")",
        "    elif ((left != 0)) && [[ $cur != -* ]]; then",
        f"        {fn}_values \"${{{table}[v:$cmdpath:$opt]}}\" \"$cur\"",
        "    elif [[ $cur == -* ]]; then",
        f"        mapfile -t COMPREPLY < <(compgen -W \"${{{table}[o:$cmdpath]}}\""
        " -- \"$cur\")",
        f"    elif [[ -n ${{{table}[c:$cmdpath]}} ]]; then",
        f"        mapfile -t COMPREPLY < <(compgen -W \"${{{table}[c:$cmdpath]}}\""
        " -- \"$cur\")",
        f"    elif [[ -n ${{{table}[p:$cmdpath:$npos]+set}} ]]; then",
        f"        {fn}_values \"${{{table}[p:$cmdpath:$npos]}}\" \"$cur\"",
        "    else",
        f"        {fn}_values \"${{{table}[r:$cmdpath]}}\" \"$cur\"",
        "    fi",
        "}",
        f"complete -F {fn} {prog}",
        "",
    ])


def zsh_script(root: Command, prog: str) -> str:
    fn = _function(prog)
    table = f"{fn}_spec"
    return "\n".join([
        f"#compdef {prog}",
        f"# zsh completion for {prog} (made by `stockade completion zsh`). Either save it",
        f"# as {fn} in a directory of $fpath, or, after compinit:",
        f"#   source <(stockade completion zsh{_for(prog)})",
        *_table(root, table),
        "",
        f"{fn}_values() {{  # $1: a value spec (w:WORDS, f, d)",
        "    case $1 in",
        "        w:*) compadd -- ${=${1#w:}} ;;",
        "        f) _files ;;",
        "        d) _files -/ ;;",
        "    esac",
        "}",
        "",
        f"{fn}() {{",
        "    local cur=${words[CURRENT]}",
        _walk(table, "2", "CURRENT", "${words[i]}").rstrip("\n"),
        "    if [[ $cur == -*=* ]]; then",
        "        opt=${cur%%=*}",
        "        compset -P '*='",
        f"        {fn}_values \"${{{table}[v:$cmdpath:$opt]}}\"",
        "    elif ((left != 0)) && [[ $cur != -* ]]; then",
        f"        {fn}_values \"${{{table}[v:$cmdpath:$opt]}}\"",
        "    elif [[ $cur == -* ]]; then",
        f"        compadd -- ${{={table}[o:$cmdpath]}}",
        f"    elif [[ -n ${{{table}[c:$cmdpath]}} ]]; then",
        f"        compadd -- ${{={table}[c:$cmdpath]}}",
        f"    elif (( ${{+{table}[p:$cmdpath:$npos]}} )); then",
        f"        {fn}_values \"${{{table}[p:$cmdpath:$npos]}}\"",
        "    else",
        f"        {fn}_values \"${{{table}[r:$cmdpath]}}\"",
        "    fi",
        "}",
        "",
        f"compdef {fn} {prog}",
        "# autoloaded from $fpath: this file's body is the first call's",
        f'if [[ $funcstack[1] == {fn} ]]; then {fn} "$@"; fi',
        "",
    ])


def _fish_text(text: str) -> str:
    return shlex.quote(" ".join(text.split()))


def fish_script(root: Command, prog: str) -> str:
    """Native `complete` lines, one condition per command path (fish's own helper
    for the path walks the words as bash's and zsh's do, without the counting)."""
    fn = _function(prog)
    lines = [
        f"# fish completion for {prog} (made by `stockade completion fish`). Save it as",
        f"# ~/.config/fish/completions/{prog}.fish, or: "
        f"stockade completion fish{_for(prog)} | source",
        f"function {fn}_path --description 'the subcommand path being typed'",
        "    set -l path ''",
        "    for w in (commandline -opc)[2..-1]",
        "        string match -q -- '-*' $w; and continue",
        "        set -l key (string join . -- $path $w | string trim -c .)",
        f"        if contains -- $key ${fn}_paths",
        "            set path $key",
        "        end",
        "    end",
        "    echo $path",
        "end",
        f"function {fn}_at --description 'whether the path being typed is $argv[1]'",
        f'    test ({fn}_path) = "$argv[1]"',
        "end",
        f"set -g {fn}_paths "
        + " ".join(shlex.quote(c.key) for c in root.walk() if c.path),
        f"complete -c {prog} -f",
    ]
    for cmd in root.walk():
        cond = f"-n {shlex.quote(f'{fn}_at {cmd.key}'.strip())}"
        for sub in cmd.commands:
            lines.append(f"complete -c {prog} {cond} -a {shlex.quote(sub.path[-1])}"
                         + (f" -d {_fish_text(sub.help)}" if sub.help else ""))
        for o in cmd.options:
            flags = " ".join(f"-l {f[2:]}" if f.startswith("--") else
                             (f"-s {f[1:]}" if len(f) == 2 else f"-o {f[1:]}")
                             for f in o.flags)
            value = ""
            if o.arity and o.values.kind == "words":
                value = f" -x -a {shlex.quote(' '.join(o.values.words))}"
            elif o.arity and o.values.kind in ("files", "dirs"):
                value = " -r -F"
            elif o.arity:
                value = " -x"
            lines.append(f"complete -c {prog} {cond} {flags}{value}"
                         + (f" -d {_fish_text(o.help)}" if o.help else ""))
        for p in cmd.positionals:
            if p.values.kind == "words":
                lines.append(f"complete -c {prog} {cond} -a "
                             f"{shlex.quote(' '.join(p.values.words))}")
            elif p.values.kind in ("files", "dirs"):
                lines.append(f"complete -c {prog} {cond} -F")
    return "\n".join(lines) + "\n"


def _for(prog: str) -> str:
    return "" if prog == "stockade" else f" --program {prog}"


SCRIPTS = {"bash": bash_script, "zsh": zsh_script, "fish": fish_script}


def script(shell: str, prog: str = "stockade") -> str:
    """The completion script of `prog` for `shell`."""
    if prog == "kubectl-stockade":
        from stockade.cli.kubectl import build_parser as kubectl_parser

        parser = kubectl_parser()
    else:
        from stockade.cli.main import build_parser

        parser = build_parser()
    return SCRIPTS[shell](describe(parser), prog)


def kubectl_complete(argv: Sequence[str] | None = None) -> int:
    """The `kubectl_complete-stockade` executable, which kubectl (1.26 and later) runs
    on TAB after `kubectl stockade` with the words typed so far, the last one being
    completed. It runs the bash script's own function on them, so both complete
    alike, and prints the candidates one a line, then cobra's directive `:4` (no
    file completion of kubectl's own: file names are candidates where they belong)."""
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        text = script("bash", "kubectl-stockade")
    except ModuleNotFoundError:  # no 'kube' extra: no kubectl stockade to complete
        print(":4")
        return 0
    fn = _function("kubectl-stockade")
    program = (f"{text}\nCOMP_WORDS=(kubectl-stockade \"$@\"); COMP_CWORD=$#\n"
               f"{fn} 2>/dev/null\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", program, "kubectl-stockade",
                          *(words or [""])], capture_output=True, text=True)
    sys.stdout.write("".join(f"{w}\n" for w in out.stdout.splitlines() if w))
    print(":4")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("completion", help="print a shell completion script",
                       description="Print the completion script of stockade for a shell. "
                       "bash: source <(stockade completion bash); zsh (after compinit): "
                       "source <(stockade completion zsh); fish: stockade completion fish "
                       "| source. Or save it where the shell loads completions from.")
    p.add_argument("shell", choices=SHELLS)
    p.add_argument("--program", choices=PROGRAMS, default="stockade",
                   help="the executable to complete (kubectl-stockade needs the 'kube' "
                        "extra)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    sys.stdout.write(script(args.shell, args.program))
    return 0
