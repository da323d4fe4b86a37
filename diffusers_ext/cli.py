"""The `diffusers-ext` command line. Each sub-command lives in its own module with a `register`
function that adds its parser to the sub-parsers; `main` dispatches to the chosen one."""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> registers one or more sub-commands; imported lazily so `--help` stays fast.
COMMAND_MODULES = (
    "diffusers_ext.compare",
    "diffusers_ext.eval.cli",
    "diffusers_ext.distill.cli",
    "diffusers_ext.animate_cli",
    "diffusers_ext.animate_train_cli",
    "diffusers_ext.app.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-ext", description="Faster, paper-faithful attention for diffusers pipelines."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency inside the module: say so
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import DiffusersExtError

    try:
        return int(args.func(args) or 0)
    except (DiffusersExtError, ValueError, OSError) as err:
        print(f"diffusers-ext {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:   # Ctrl-C: one line (what was kept, when the command says), 128 + SIGINT
        print(f"diffusers-ext {args.command}: interrupted{f': {err}' if str(err) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
