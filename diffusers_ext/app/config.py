"""What the app serves and its bounds (`AppConfig`), and the command-line flags that set them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from ..argtypes import positive_int
from ..loading import EMBEDDED

EMBEDDED_MODELS = (*EMBEDDED, "tiny:sd", "tiny:sdxl", "tiny:sd3", "tiny:sd35", "tiny:dit", "tiny:sit")
POSITIVE = ("max_side", "max_steps", "max_batch", "max_frames", "queue_size")   # flags that must be >= 1

DESCRIPTION = """diffusers-ext demo: the stock and the patched pipeline side by side, in the browser.

    pip install -e ".[app]"
    diffusers-ext app                              # http://127.0.0.1:7860, embedded models (offline)
    python app.py --model runwayml/stable-diffusion-v1-5 --max-side 768 --max-steps 50   # the same

Safe by default: binds to 127.0.0.1 (`--host 0.0.0.0` to serve a network), loads only safetensors
weights (`use_safetensors=True`: a pickled checkpoint can run code), bounds resolution, steps, batch
and frames (raise them with flags), queues requests (one generation at a time, `--queue-size`
waiting), and turns every bad input into a message in the page. The method options are generated
from the method registry, so a newly registered method appears here without touching the app.
"""


@dataclass
class AppConfig:
    """What the app serves and its bounds; every field is also a command-line flag (`--max-side` ...)."""

    host: str = "127.0.0.1"
    port: int = 7860
    model: str = "digits"                      # preselected image model (the shipped digits SiT)
    models: tuple[str, ...] = EMBEDDED_MODELS  # offered in the model list
    custom_models: bool = True                 # also accept other hub ids / local folders
    video_model: str = "tiny:animatediff"
    max_side: int = 1024                       # height and width, pixels
    max_steps: int = 100
    max_batch: int = 4
    max_frames: int = 32
    queue_size: int = 16                       # requests waiting; more are turned away with a message
    device: str = "auto"
    dtype: str = "auto"
    default_steps: int = 20


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `AppConfig` field (`--max-side`, `--custom-models` / `--no-custom-models`, ...)."""
    defaults = AppConfig()
    for f in fields(AppConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, tuple):
            parser.add_argument(flag, nargs="+", default=value, help=f"default: {' '.join(value)}")
        else:
            kind = positive_int if f.name in POSITIVE else type(value)
            parser.add_argument(flag, type=kind, default=value, help=f"default: {value}")


def config_of(args: argparse.Namespace) -> AppConfig:
    """The `AppConfig` of parsed flags (`add_flags`)."""
    config = AppConfig(**{f.name: getattr(args, f.name) for f in fields(AppConfig)})
    config.models = tuple(config.models)
    return config


def parse_args(argv: list[str] | None = None) -> AppConfig:
    """`python app.py` flags -> AppConfig (a bound below 1 exits with the flag named)."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)
    return config_of(parser.parse_args(argv))
