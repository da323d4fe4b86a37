"""`diffusers-ext app` (and `python app.py`): the app's flags (`AppConfig`), then the page served.

gradio is imported only when the app starts, so the parser exists (and `diffusers-ext --help`
works) without the `app` extra.
"""

from __future__ import annotations

import argparse
import logging

from diffusers_ext.errors import DiffusersExtError

from .config import DESCRIPTION, AppConfig, add_flags, config_of, parse_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "app", help="the demo app in the browser: stock vs patched side by side (the same flags as python app.py)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(parser)
    parser.set_defaults(func=lambda args: serve(config_of(args)))


def serve(config: AppConfig) -> int:
    """Build the page and serve it on `config.host:config.port` until interrupted."""
    try:
        from .page import build_app, launch_app
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        raise DiffusersExtError('the app needs gradio: pip install -e ".[app]"') from None
    logging.basicConfig(level=logging.INFO)
    launch_app(build_app(config), config)
    return 0


def main(argv: list[str] | None = None) -> None:
    """`python app.py [flags]`."""
    serve(parse_args(argv))
