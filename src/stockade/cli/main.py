"""`stockade` entry point: one subcommand per module, errors as one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from stockade import __version__
from stockade.errors import InvalidObjects, StockadeError, ValidationError

# Command modules, imported when their command runs (or all for --help): an
# offline command does not pay for the agent's imports (sqlite3, ctypes, ...).
COMMANDS: tuple[str, ...] = (
    "validate", "explain", "matrix", "compile", "analysis", "conformance", "dataplane",
    "agent", "containers", "operator", "listing", "completion",
)
# The module that registers each command (tests/unit/test_cli_conventions.py checks
# it against the parser of them all): only that one is imported to run it.
_MODULE_OF = {"validate": "validate", "explain": "explain", "matrix": "matrix",
              "compile": "compile", "coverage": "analysis", "diff": "analysis",
              "lint": "analysis", "conformance": "conformance", "dataplane": "dataplane",
              "datapath": "dataplane", "operator": "operator", "list": "listing",
              "completion": "completion", "agent": "agent", "apply": "agent",
              "delete": "agent", "get": "agent", "label": "agent", "status": "agent",
              "snapshot": "agent", "flows": "agent", "run": "containers", "ps": "containers",
              "rm": "containers", "probe": "containers"}

# The libraries of the optional extras (pyproject's optional-dependencies, by
# module name; tests/unit/test_extras.py keeps the two in step). The base install
# is the offline analyses: a command that reaches one of these without its extra
# gets one line naming the extra, not a traceback.
EXTRAS: dict[str, tuple[str, ...]] = {
    "agent": ("nftables", "prometheus_client", "httpx"),
    "kube": ("lightkube", "httpx", "prometheus_client"),
}


EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_INPUT = 2


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stockade",
        description="Container network isolation and NetworkPolicy enforcement on Linux.",
    )
    parser.add_argument("--version", action="version", version=f"stockade {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = (_MODULE_OF[command],) if command in _MODULE_OF else COMMANDS
    for name in names:
        importlib.import_module(f"stockade.cli.{name}").register(sub)
    return parser


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like an interrupt, so cleanups in `finally` blocks run.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    args = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in args if not a.startswith("-")), None)
    parsed = build_parser(first).parse_args(args)
    # A one-shot command run as the process ends with `os._exit` below: what it built
    # need not be freed (`exits`).
    parsed.exits = argv is None and getattr(parsed, "one_shot", False)
    code = execute(parsed)
    if parsed.exits:
        # The process ends here: freeing millions of objects one by one at interpreter
        # exit (a second at 100,000 pods) serves no one. Callers of main() in-process
        # (argv given) return as usual.
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            pass  # a reader that stopped early, as execute() treats it
        except OSError as exc:
            print(f"stockade: cannot write the output: {exc}", file=sys.stderr)
            code = code or 1
        os._exit(code)
    return code


def execute(args: argparse.Namespace, prog: str = "stockade") -> int:
    """Run a parsed command: errors as lines on stderr (exit 2), never a traceback.
    Also the runner of `kubectl stockade` (cli/kubectl.py)."""
    try:
        code: int = args.run(args)
        return code
    except (ValidationError, InvalidObjects) as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_INPUT
    except StockadeError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except ModuleNotFoundError as exc:
        return missing_extra(exc, f"{prog} {args.command}", _extras_of(args))
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _extras_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The extras a command needs (for the message when one is missing)."""
    kube = (args.command == "operator"
            or getattr(args, "program", "") == "kubectl-stockade")  # its completion
    if args.command == "agent":
        return ("agent", "kube") if args.datastore == "kubernetes" else ("agent",)
    return ("kube",) if kube else ("agent",)


def missing_extra(exc: ModuleNotFoundError, what: str, needed: tuple[str, ...]) -> int:
    """`what`, which needs the extras `needed`, met a library that is not installed:
    name the extras, exit 2. A module no extra provides means a broken install, and
    its traceback is the useful report."""
    module = (exc.name or "").partition(".")[0]
    providers = tuple(extra for extra, modules in EXTRAS.items() if module in modules)
    if not providers:
        raise exc
    extras = needed if set(needed) & set(providers) else providers[:1]
    print(f"{what} needs the {' and '.join(repr(e) for e in extras)} "
          f"extra{'s' if len(extras) > 1 else ''} (no module named {module!r}): "
          f"pip install 'stockade[{','.join(extras)}]'", file=sys.stderr)
    return EXIT_INPUT


def kubectl_main(argv: Sequence[str] | None = None) -> int:
    """The `kubectl-stockade` executable: cli/kubectl.py, which needs the 'kube' extra
    from its first import on."""
    try:
        from stockade.cli import kubectl
    except ModuleNotFoundError as exc:
        return missing_extra(exc, "kubectl stockade", ("kube",))
    return kubectl.main(argv)


if __name__ == "__main__":
    sys.exit(main())
