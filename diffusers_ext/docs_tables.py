"""The docs' option tables, derived from the registry (`registry.options_markdown`).

A markdown file marks each table with

    <!-- options: agent -->
    | option | default | allowed | meaning |
    ...
    <!-- /options -->

(each marker a line of its own) and this module rewrites what lies between the markers from the
method's registered options:

    python -m diffusers_ext.docs_tables README.md docs/*.md           # rewrite stale tables in place
    python -m diffusers_ext.docs_tables --check README.md docs/*.md   # exit 1 naming each stale table
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .registry import options_markdown

# markers are whole lines (a marker quoted inside a sentence is not one)
OPEN = re.compile(r"^<!-- options: (\S+) -->$", re.M)
REGION = re.compile(r"^<!-- options: (?P<name>\S+) -->\n(?P<body>.*?)^<!-- /options -->$", re.M | re.S)


def regions(text: str) -> list[tuple[str, str]]:
    """(method name, current table) of every marked region, in order; a marker without its
    `<!-- /options -->` is an error."""
    matches = list(REGION.finditer(text))
    starts = {m.start() for m in matches}
    unclosed = [m[1] for m in OPEN.finditer(text) if m.start() not in starts]
    if unclosed:
        raise ValueError(f"the option table marker of {unclosed[0]!r} has no `<!-- /options -->` line before "
                         "the next marker or the end")
    return [(m["name"], m["body"]) for m in matches]


def table_of(name: str) -> str:
    """The table a region of method `name` holds: its options' markdown, newline-terminated."""
    return options_markdown(name) + "\n"


def render(text: str) -> str:
    """`text` with every marked region's table regenerated from the registry."""
    regions(text)  # refuses unterminated markers
    return REGION.sub(lambda m: f"<!-- options: {m['name']} -->\n{table_of(m['name'])}<!-- /options -->", text)


def stale(text: str) -> list[str]:
    """Names of the methods whose marked table differs from the registry's."""
    return [name for name, body in regions(text) if body != table_of(name)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_ext.docs_tables", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report stale tables (exit 1 if any)")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        text = path.read_text(encoding="utf-8")
        try:
            names = stale(text)
        except ValueError as err:   # an unknown method (OptionError) or an unterminated marker
            print(f"{path}: {err}", file=sys.stderr)
            return 2
        if not names:
            continue
        if args.check:
            for name in names:
                print(f"{path}: the option table of {name!r} is stale; run python -m diffusers_ext.docs_tables {path}")
            status = 1
        else:
            path.write_text(render(text), encoding="utf-8")
            print(f"{path}: rewrote the option table(s) of {', '.join(names)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
