"""diffusers-ext demo: the stock and the patched pipeline side by side, in the browser.

    pip install -e ".[app]"
    python app.py                                  # http://127.0.0.1:7860, embedded models (offline)
    python app.py --model runwayml/stable-diffusion-v1-5 --max-side 768 --max-steps 50
    diffusers-ext app ...                          # the same, with the same flags

    from app import AppConfig, build_app, launch_app
    demo = build_app(AppConfig(max_steps=30))      # a gr.Blocks with its queue configured
    launch_app(demo, AppConfig())                  # or demo.launch(...) yourself

A launcher: the app is the package `diffusers_ext.app` (config, widgets, runner, page, cli); this file
re-exports its public names so `from app import ...` keeps working.
"""

from diffusers_ext.app.cli import main
from diffusers_ext.app.config import EMBEDDED_MODELS, AppConfig, parse_args
from diffusers_ext.app.page import build_app, launch_app
from diffusers_ext.app.runner import HAS_VIDEO, VIDEO_METHOD, InputError, Worker, suggested_method
from diffusers_ext.app.widgets import OptionField, option_fields, options_of

__all__ = ["AppConfig", "EMBEDDED_MODELS", "HAS_VIDEO", "InputError", "OptionField", "VIDEO_METHOD", "Worker",
           "build_app", "launch_app", "main", "option_fields", "options_of", "parse_args", "suggested_method"]

if __name__ == "__main__":
    main()
