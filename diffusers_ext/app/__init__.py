"""The demo app: the stock and the patched pipeline side by side, in the browser.

    config.py   AppConfig (what is served, its bounds) and its command-line flags
    widgets.py  one form field per method option, chosen from the option's kind in the registry
    runner.py   the Worker: input checks, one pipeline at a time, the image and the video comparison,
                their progress (real denoiser calls, a measured time left)
    results.py  what is shown of a comparison: the difference image, the session's runs and their chart
    page.py     build_app / launch_app: the gr.Blocks layout and its events
    cli.py      `diffusers-ext app` (and `python app.py`): the flags, then the page served

Only widgets.py and page.py import gradio (the `app` extra), so `diffusers-ext --help` works without it.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo, set before gradio loads
