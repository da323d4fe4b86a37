"""diffusers-ext demo: the stock and the patched pipeline side by side, in the browser.

    pip install -e ".[app]"
    python app.py                                  # http://127.0.0.1:7860, embedded tiny models (offline)
    python app.py --model runwayml/stable-diffusion-v1-5 --max-side 768 --max-steps 50

    from app import AppConfig, build_app
    demo = build_app(AppConfig(max_steps=30))      # a gr.Blocks with its queue configured
    launch_app(demo, AppConfig())                  # or demo.launch(...) yourself

Safe by default: binds to 127.0.0.1 (`--host 0.0.0.0` to serve a network), loads only safetensors
weights (`use_safetensors=True`: a pickled checkpoint can run code), bounds resolution, steps, batch
and frames (raise them with flags), queues requests (one generation at a time, `--queue-size`
waiting), and turns every bad input into a message in the page. The method options are generated
from the method registry, so a newly registered method appears here without touching this file.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import diffusers_ext as dx  # noqa: E402
from diffusers_ext.compare import DEFAULT_PROMPT, compare_pipeline  # noqa: E402
from diffusers_ext.families import get_family  # noqa: E402
from diffusers_ext.loading import EMBEDDED, embedded_family  # noqa: E402
from diffusers_ext.pipeline_io import DenoiserTimer, call_kwargs, num_classes  # noqa: E402
from diffusers_ext.registry import all_methods  # noqa: E402

logger = logging.getLogger("diffusers_ext.app")

EMBEDDED_MODELS = ("digits", "tiny:sd", "tiny:sdxl", "tiny:sd3", "tiny:sd35", "tiny:dit", "tiny:sit")
VIDEO_METHOD = "anchor_frame"
HAS_VIDEO = importlib.util.find_spec("diffusers_ext.pipelines.animatediff_anchor") is not None
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAX_PROMPT_CHARS = 2000


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


class InputError(ValueError):
    """Bad user input: shown in the page as it is."""


# --- option widgets from the registry -----------------------------------------------------------------

def _accepts(option, value) -> bool:
    try:
        option.validate(value)
        return True
    except (TypeError, ValueError):
        return False


@dataclass
class OptionField:
    """One method option on the form: how it is shown and how the page's value becomes an option value.

    The widget is inferred through `Option.validate` only (the public API): booleans -> Checkbox; a
    number the check accepts but not a string or a tuple -> Number (integer when it rejects halves); a
    closed set of quoted words from the doc -> Dropdown; anything else (schedules, tuples, per-family
    defaults) -> Textbox holding a Python literal, empty = the method's default for the model.
    """

    method: str
    option: Any
    kind: str = "text"                          # checkbox | number | integer | choice | text
    choices: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, method: str, option) -> "OptionField":
        default = option.default
        if isinstance(default, dict):           # per-family default: free text, empty = model's default
            return cls(method, option)
        if isinstance(default, bool):
            return cls(method, option, "checkbox")
        if isinstance(default, (int, float)) and not _accepts(option, "\x00") and not _accepts(option, (default,)):
            integer = isinstance(default, int) and not _accepts(option, default + 0.5)
            return cls(method, option, "integer" if integer else "number")
        if isinstance(default, str):
            quoted = dict.fromkeys([default, *re.findall(r"'([\w.-]+)'", option.doc)])
            choices = [c for c in quoted if _accepts(option, c)]
            if not _accepts(option, "\x00not an option") and len(choices) > 1:
                return cls(method, option, "choice", choices)
        return cls(method, option)

    def component(self, visible: bool) -> gr.components.Component:
        option, label = self.option, self.option.name
        elem_id = f"opt-{self.method}-{label}"
        common = dict(label=label, info=option.doc, visible=visible, elem_id=elem_id)
        if self.kind == "checkbox":
            return gr.Checkbox(value=option.default, **common)
        if self.kind in ("number", "integer"):
            return gr.Number(value=option.default, precision=0 if self.kind == "integer" else None, **common)
        if self.kind == "choice":
            return gr.Dropdown(choices=self.choices, value=option.default, allow_custom_value=True, **common)
        default = option.default
        if isinstance(default, dict):
            shown = ", ".join(f"{'others' if k == '*' else k}: {v!r}" for k, v in default.items())
            placeholder = f"default per model ({shown})"
        else:
            placeholder = "default: whole run" if label.endswith("steps") and default is None else f"default: {default!r}"
        return gr.Textbox(value="", placeholder=placeholder, max_lines=1, **common)

    def parse(self, value) -> tuple[bool, Any]:
        """Page value -> (given, option value); not given means the method's default."""
        if self.kind == "checkbox":
            return bool(value) != self.option.default, bool(value)
        if self.kind in ("number", "integer"):
            if value is None or value == "":
                return False, None
            number = int(value) if self.kind == "integer" and float(value).is_integer() else float(value)
            return number != self.option.default, number
        text = "" if value is None else str(value).strip()
        if not text or (self.kind == "choice" and text == self.option.default):
            return False, None
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = text                        # a bare word: a string option such as mode=concat
        return True, parsed


def option_fields(methods: list[str]) -> list[OptionField]:
    registry = all_methods()
    return [OptionField.of(name, option) for name in methods for option in registry[name].options]


def options_of(method: str, fields_: list[OptionField], values: list) -> dict:
    options = {}
    for option_field, value in zip(fields_, values):
        if option_field.method != method:
            continue
        try:
            given, parsed = option_field.parse(value)
        except (TypeError, ValueError) as err:
            raise InputError(f"option `{option_field.option.name}`: cannot read {value!r} ({err})") from None
        if given:
            options[option_field.option.name] = parsed
    return options


def method_help(name: str) -> str:
    info = all_methods()[name].info()
    kind = "training-free" if info["training_free"] else "needs a short fine-tune (here: its initial weights)"
    return f"**{name}**: {info['description']}  \nmodels: {', '.join(info['families'])}; {kind}"


# --- the model and the work ---------------------------------------------------------------------------

class Worker:
    """Holds one pipeline at a time and runs the generations, one at a time."""

    def __init__(self, config: AppConfig):
        self.config = config
        self._lock = threading.Lock()
        self._model: str | None = None
        self._pipe = None

    # input checks (server side: the page's own limits can be bypassed through the API)
    def check_model(self, model: str | None) -> str:
        model = (model or "").strip()
        if not model:
            raise InputError("choose a model")
        if model in self.config.models or model == self.config.video_model:
            return model
        if not self.config.custom_models:
            raise InputError(f"model {model!r} is not offered here; choose one of {', '.join(self.config.models)}")
        if model.startswith("tiny:") or model in EMBEDDED or HUB_ID.match(model) or Path(model).expanduser().is_dir():
            return model
        raise InputError(f"model {model!r} is neither a hub id (owner/name), a local pipeline folder, "
                         f"nor an embedded model (digits, tiny:sd, tiny:dit, ...)")

    def check_int(self, name: str, value, low: int, high: int | None, flag: str | None = None) -> int:
        if value is None or value == "":
            raise InputError(f"{name} is empty")
        number = float(value)
        if not number.is_integer():
            raise InputError(f"{name} must be a whole number, got {value}")
        number = int(number)
        if number < low or (high is not None and number > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise InputError(f"{name} must be {bound}, got {number}"
                             + (f" (the server's limit: raise it with {flag})" if flag and high and number > high else ""))
        return number

    def check_float(self, name: str, value) -> float | None:
        if value is None or str(value).strip() == "":
            return None
        try:
            number = float(value)
        except ValueError:
            raise InputError(f"{name} must be a number, got {value!r}") from None
        if not np.isfinite(number) or number < 0:
            raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
        return number

    def check_side(self, name: str, value) -> int | None:
        if value in (None, "", 0):
            return None                                         # the model's default
        return self.check_int(name, value, 8, self.config.max_side, "--max-side")

    def check_prompt(self, prompt: str | None) -> str:
        prompt = prompt or ""
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
        return prompt

    def pipeline(self, model: str, progress):
        if model != self._model:
            from diffusers_ext.loading import load_pipeline

            progress(0.0, desc=f"loading {model}")
            self._pipe = self._model = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._pipe = load_pipeline(model, dtype=self.config.dtype, device=self.config.device, use_safetensors=True)
            self._model = model
        dx.unpatch(self._pipe, missing_ok=True)                  # stock, whatever a failed run left
        return self._pipe

    # image tab
    def compare_images(self, model, method, prompt, class_label, height, width, steps, guidance, batch, seed,
                       warmup, options, progress):
        model = self.check_model(model)
        if method not in all_methods():
            raise InputError(f"unknown method {method!r}")
        steps = self.check_int("steps", steps, 1, self.config.max_steps, "--max-steps")
        batch = self.check_int("batch size", batch, 1, self.config.max_batch, "--max-batch")
        seed = self.check_int("seed", seed, 0, 2**63 - 1)
        height, width = self.check_side("height", height), self.check_side("width", width)
        prompt = self.check_prompt(prompt)
        guidance = self.check_float("guidance scale", guidance)
        with self._lock:
            pipe = self.pipeline(model, progress)
            kwargs = call_kwargs(pipe, prompt, 0, steps, guidance, height, width, seed, batch)
            if "class_labels" in kwargs:
                classes = num_classes(pipe)
                label = self.check_int("class label", class_label, 0, None if classes is None else classes - 1)
                kwargs["class_labels"] = [label] * batch

            def report(done, total, phase):
                progress(min(done / total, 1.0), desc=f"{phase} run: denoiser call {done} of {total}")

            return compare_pipeline(pipe, method, options, kwargs, warmup=warmup, progress=report)

    # video tab
    def compare_videos(self, model, prompt, frames, height, width, steps, guidance, seed, options,
                       image_model_anchor, photo, progress):
        from diffusers import UNetMotionModel
        from diffusers.utils.torch_utils import randn_tensor

        from diffusers_ext.pipelines.animatediff_anchor import animate, save_video

        model = self.check_model(model)
        frames = self.check_int("frames", frames, 2, self.config.max_frames, "--max-frames")
        steps = self.check_int("steps", steps, 1, self.config.max_steps, "--max-steps")
        seed = self.check_int("seed", seed, 0, 2**63 - 1)
        height, width = self.check_side("height", height), self.check_side("width", width)
        prompt = self.check_prompt(prompt)
        guidance = self.check_float("guidance scale", guidance)
        guidance = 7.5 if guidance is None else guidance
        with self._lock:
            pipe = self.pipeline(model, progress)
            if not isinstance(getattr(pipe, "unet", None), UNetMotionModel):
                raise InputError(f"{type(pipe).__name__} is not an AnimateDiff pipeline; the video tab needs one "
                                 f"(offline: tiny:animatediff)")
            scale = pipe.vae_scale_factor
            height = height or pipe.unet.config.sample_size * scale
            width = width or pipe.unet.config.sample_size * scale
            if height % scale or width % scale:
                raise InputError(f"height and width must be multiples of {scale}; got {height} x {width}")
            shape = (1, pipe.unet.config.in_channels, frames, height // scale, width // scale)
            latents = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed),
                                   device=pipe.unet.device, dtype=pipe.unet.dtype)
            common = dict(num_frames=frames, height=height, width=width, num_inference_steps=steps,
                          guidance_scale=guidance, output_type="np")
            done, total = [0], 2 * steps + 2

            def counted(phase):
                def on_forward():
                    done[0] += 1
                    progress(min(done[0] / total, 1.0), desc=f"{phase} run: denoiser call {done[0]} of {total}")
                return on_forward

            pipe.set_progress_bar_config(disable=True)
            warm = {**common, "num_inference_steps": 1}   # one-time costs hit neither timing
            for run in (pipe, lambda *a, **k: animate(pipe, *a, **options, **k)):
                with DenoiserTimer(pipe.unet, counted("warm-up")):
                    run(prompt, latents=latents.clone(), **warm)
            with DenoiserTimer(pipe.unet, counted("stock")) as timer:
                stock = pipe(prompt, latents=latents.clone(), **common).frames[0]
            stock_times = timer.times
            with DenoiserTimer(pipe.unet, counted(VIDEO_METHOD)) as timer:
                anchored = animate(pipe, prompt, latents=latents.clone(), image=photo,
                                   image_model_anchor=image_model_anchor, **options, **common).frames[0]
            anchor_times = timer.times[-steps:]  # an inverted photo adds the inversion's forwards first
        folder = Path(tempfile.mkdtemp(prefix="diffusers_ext_app_"))
        stock_path = save_video(_enlarge_frames(stock), folder / "stock.gif")
        anchor_path = save_video(_enlarge_frames(anchored), folder / "anchor_frame.gif")
        return stock_path, anchor_path, float(np.mean(stock_times)), float(np.mean(anchor_times))


def suggested_method(model: str | None, methods: list[str]) -> str | None:
    """The family default (`Family.default_method`) of an embedded model; None for others (not loaded to find out)."""
    family = embedded_family(model or "")
    method = get_family(family).default_method if family else None
    return method if method in methods else None


def _enlarge(image: np.ndarray, at_least: int = 256) -> np.ndarray:
    """Nearest-neighbour upscale of a small (H, W, 3) image so the page shows its pixels."""
    factor = max(1, at_least // max(min(image.shape[:2]), 1))
    image = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    return (image.repeat(factor, 0).repeat(factor, 1) * 255).round().astype(np.uint8)


def _enlarge_frames(frames) -> list[np.ndarray]:
    return [_enlarge(frame, 128) for frame in np.asarray(frames)]


def timings_markdown(method: str, stock_ms: float, patched_ms: float, extra: str = "") -> str:
    return (
        f"| | stock | {method} |\n|---|---|---|\n"
        f"| time per step | {stock_ms:.1f} ms | {patched_ms:.1f} ms |\n\n"
        f"**speed ratio** (stock / {method}): **{stock_ms / patched_ms:.2f}x**{extra}"
    )


def error_message(err: BaseException) -> str:
    if isinstance(err, (ValueError, TypeError, OSError, ImportError, KeyError)):
        return str(err) or type(err).__name__
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of GPU memory: lower the resolution, the batch size or the frames"
    logger.exception("generation failed")
    return f"internal error ({type(err).__name__}: {err}); see the server log"


def _fail(err: BaseException, outputs: int) -> tuple:
    message = error_message(err)
    gr.Warning(message)
    return (*([None] * outputs), "", f"**Error:** {message}")


# --- the page -----------------------------------------------------------------------------------------

def build_app(config: AppConfig | None = None) -> gr.Blocks:
    """The demo as a `gr.Blocks`, its queue configured (one generation at a time, `queue_size` waiting)."""
    config = config or AppConfig()
    worker = Worker(config)
    methods = [name for name in all_methods() if name != VIDEO_METHOD]
    default_method = suggested_method(config.model, methods) or ("agent" if "agent" in methods else methods[0])
    models = list(dict.fromkeys([config.model, *config.models]))

    with gr.Blocks(title="diffusers-ext", analytics_enabled=False) as demo:
        gr.Markdown("# diffusers-ext\nThe stock and the patched pipeline from the same seed, side by side: "
                    "time per denoising step and the speed ratio. `digits` is a small SiT trained in this "
                    "repository on handwritten digits (class label 0-9): real images, offline. The `tiny:*` "
                    "models are random, so their images are noise; their timings still compare the code paths.")
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column(scale=1):
                    model = gr.Dropdown(models, value=config.model, label="model",
                                        allow_custom_value=config.custom_models, elem_id="model",
                                        info="embedded (offline)" + (", a hub id or a local folder" if config.custom_models else ""))
                    method = gr.Dropdown(methods, value=default_method, label="method", elem_id="method")
                    method_info = gr.Markdown(method_help(default_method))
                    prompt = gr.Textbox(DEFAULT_PROMPT, label="prompt", info="text-to-image models", elem_id="prompt")
                    class_label = gr.Number(7, precision=0, label="class label", elem_id="class_label",
                                            info="class-conditional models: 0-9 for digits, 0-999 for ImageNet DiT / SiT")
                    with gr.Row():
                        height = gr.Number(0, precision=0, label="height", elem_id="height",
                                           info=f"0: model default; at most {config.max_side}")
                        width = gr.Number(0, precision=0, label="width", elem_id="width",
                                          info=f"0: model default; at most {config.max_side}")
                    with gr.Row():
                        steps = gr.Number(min(config.default_steps, config.max_steps), precision=0, label="steps",
                                          info=f"1 to {config.max_steps}", elem_id="steps")
                        batch = gr.Number(1, precision=0, label="batch size", info=f"1 to {config.max_batch}",
                                          elem_id="batch")
                    with gr.Row():
                        guidance = gr.Textbox("", label="guidance scale", placeholder="pipeline default",
                                              info="empty: the pipeline's default", elem_id="guidance")
                        seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                    warmup = gr.Checkbox(True, label="warm-up run first (fair timings)", elem_id="warmup")
                    with gr.Accordion("method options", open=True):
                        image_fields = option_fields(methods)
                        image_options = [f.component(f.method == default_method) for f in image_fields]
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    status = gr.Markdown("", elem_id="status")
                    timings = gr.Markdown("", elem_id="timings")
                    with gr.Row():
                        stock_images = gr.Gallery(label="stock", elem_id="stock-images", columns=2, height="auto")
                        patched_images = gr.Gallery(label="patched", elem_id="patched-images", columns=2, height="auto")

            def show_method(name):
                return [method_help(name), *[gr.update(visible=f.method == name) for f in image_fields]]

            method.change(show_method, method, [method_info, *image_options], queue=False)

            def pick_method(name, current):
                suggested = suggested_method(name, methods)
                return gr.update(value=suggested) if suggested and suggested != current else gr.update()

            model.change(pick_method, [model, method], method, queue=False)

            image_inputs = [model, method, prompt, class_label, height, width, steps, guidance, batch, seed, warmup]

            def generate(*values, progress=gr.Progress()):
                (model_, method_, prompt_, label_, height_, width_, steps_, guidance_, batch_, seed_,
                 warmup_) = values[:len(image_inputs)]
                try:
                    options = options_of(method_, image_fields, list(values[len(image_inputs):]))
                    result = worker.compare_images(model_, method_, prompt_, label_, height_, width_, steps_,
                                                   guidance_, batch_, seed_, bool(warmup_), options, progress)
                except Exception as err:  # noqa: BLE001  (every failure becomes a message, never a stuck page)
                    return _fail(err, 2)
                s = result.summary
                given = ", ".join(f"{k}={v!r}" for k, v in s["options"].items()) or "defaults"
                extra = (f"  \n{s['pipeline']}, {s['steps']} steps, options: {given}; image difference "
                         f"(relative L2) {s['image_rel_l2']:.4f}")
                return ([_enlarge(i) for i in result.stock.images], [_enlarge(i) for i in result.patched.images],
                        timings_markdown(method_, s["stock_ms_per_step"], s["patched_ms_per_step"], extra),
                        "Done.")

            run.click(generate, [*image_inputs, *image_options], [stock_images, patched_images, timings, status],
                      concurrency_id="pipeline", concurrency_limit=1)

        if HAS_VIDEO and VIDEO_METHOD in all_methods():
            with gr.Tab("Video (anchor frame)"):
                with gr.Row():
                    with gr.Column(scale=1):
                        gr.Markdown(method_help(VIDEO_METHOD) + "  \nStock AnimateDiff vs FAAC's anchor frame "
                                    "(the anchor frame is denoised by the image model; the others also attend to it).")
                        v_model = gr.Textbox(config.video_model, label="AnimateDiff model", elem_id="v_model")
                        v_prompt = gr.Textbox("portrait of a woman smiling", label="prompt", elem_id="v_prompt")
                        with gr.Row():
                            v_frames = gr.Number(8, precision=0, label="frames", info=f"2 to {config.max_frames}",
                                                 elem_id="v_frames")
                            v_steps = gr.Number(min(8, config.max_steps), precision=0, label="steps",
                                                info=f"1 to {config.max_steps}", elem_id="v_steps")
                        with gr.Row():
                            v_height = gr.Number(0, precision=0, label="height", info="0: model default")
                            v_width = gr.Number(0, precision=0, label="width", info="0: model default")
                        with gr.Row():
                            v_guidance = gr.Number(7.5, label="guidance scale")
                            v_seed = gr.Number(0, precision=0, label="seed")
                        v_ghost = gr.Checkbox(True, label="anchor denoised by the image model alone (ghost motion modules)")
                        v_photo = gr.Image(type="pil", label="photo to animate (optional: the anchor starts from "
                                           "its DDIM inversion)", sources=["upload"])
                        video_fields = option_fields([VIDEO_METHOD])
                        video_options = [f.component(True) for f in video_fields]
                        v_run = gr.Button("Generate video", variant="primary", elem_id="v_generate")
                    with gr.Column(scale=2):
                        v_status = gr.Markdown("", elem_id="v_status")
                        v_timings = gr.Markdown("", elem_id="v_timings")
                        with gr.Row():
                            v_stock = gr.Image(label="stock AnimateDiff", type="filepath", elem_id="v_stock")
                            v_anchor = gr.Image(label="anchor frame", type="filepath", elem_id="v_anchor")

                video_inputs = [v_model, v_prompt, v_frames, v_height, v_width, v_steps, v_guidance, v_seed,
                                v_ghost, v_photo]

                def generate_video(*values, progress=gr.Progress()):
                    (model_, prompt_, frames_, height_, width_, steps_, guidance_, seed_, ghost_,
                     photo_) = values[:len(video_inputs)]
                    try:
                        options = options_of(VIDEO_METHOD, video_fields, list(values[len(video_inputs):]))
                        stock_path, anchor_path, stock_s, anchor_s = worker.compare_videos(
                            model_, prompt_, frames_, height_, width_, steps_, guidance_, seed_, options,
                            bool(ghost_), photo_, progress)
                    except Exception as err:  # noqa: BLE001
                        return _fail(err, 2)
                    return (str(stock_path), str(anchor_path),
                            timings_markdown(VIDEO_METHOD, stock_s * 1000, anchor_s * 1000), "Done.")

                v_run.click(generate_video, [*video_inputs, *video_options], [v_stock, v_anchor, v_timings, v_status],
                            concurrency_id="pipeline", concurrency_limit=1)

    demo.queue(max_size=config.queue_size, default_concurrency_limit=1)
    demo.diffusers_ext_config = config
    return demo


THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch_app(demo: gr.Blocks, config: AppConfig, **launch_kwargs):
    """`demo.launch` on the configured host and port, with local fonts only (no font download)."""
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("diffusers-ext app: serving on %s: anyone who reaches this address can use it", config.host)
    return demo.launch(server_name=config.host, server_port=config.port, theme=gr.themes.Default(**THEME_FONTS),
                       show_error=False, **launch_kwargs)


def parse_args(argv: list[str] | None = None) -> AppConfig:
    defaults = AppConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(AppConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, tuple):
            parser.add_argument(flag, nargs="+", default=value, help=f"default: {' '.join(value)}")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"default: {value}")
    args = parser.parse_args(argv)
    config = AppConfig(**{f.name: getattr(args, f.name) for f in fields(AppConfig)})
    config.models = tuple(config.models)
    for name in ("max_side", "max_steps", "max_batch", "max_frames", "queue_size"):
        if getattr(config, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return config


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    config = parse_args(argv)
    launch_app(build_app(config), config)


if __name__ == "__main__":
    main()
