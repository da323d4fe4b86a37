"""The app's work: input checks, one pipeline held at a time, the image and the video comparison.

The image comparison is `diffusers_ext.compare.compare_pipeline`, the one `diffusers-ext compare`
runs; the video comparison times the denoiser with the same `pipeline_io.DenoiserTimer`. No gradio
here: `progress` is any callable progress(fraction, desc=...), fed by `StepProgress`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import diffusers_ext as dx
from diffusers_ext.compare import Comparison, compare_pipeline
from diffusers_ext.errors import DiffusersExtError
from diffusers_ext.families import family_of_pipeline_class, get_family
from diffusers_ext.loading import EMBEDDED, embedded_family, embedded_method, embedded_recipe, load_pipeline
from diffusers_ext.pipeline_io import DenoiserTimer, call_kwargs, num_classes, pipeline_kind, recipe
from diffusers_ext.registry import all_methods

from .config import AppConfig

logger = logging.getLogger("diffusers_ext.app")

VIDEO_METHOD = "anchor_frame"
HAS_VIDEO = importlib.util.find_spec("diffusers_ext.pipelines.animatediff_anchor") is not None
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAX_PROMPT_CHARS = 2000


class InputError(ValueError):
    """Bad user input: shown in the page as it is."""


@dataclass
class ImageRun:
    """One image comparison of the app: `compare_pipeline`'s result and what it was made with.

    settings: what the numbers depend on besides the method and its options (model, prompt or class
        label, the images' actual size, sampling steps, batch, guidance, seed, warm-up), for the history.
    conditioning: the pipeline's kind (`pipeline_kind`: "text", "class"): the page then shows only its input.
    """

    comparison: Comparison
    settings: dict
    conditioning: str


class StepProgress:
    """`compare_pipeline`'s progress(done, total, phase) -> progress(fraction, desc=...) with the real
    count and a time-left estimate from this request's own pace (its denoiser calls after the warm-up):

        "stock run: denoiser call 9 of 42, about 3 s left"

    The estimate is measured, never an average over other requests (other models, steps or sizes).
    """

    def __init__(self, progress, clock=time.monotonic):
        self.progress, self.clock = progress, clock
        self.start: tuple[float, int] | None = None      # (time, calls done) at the first timed call

    def __call__(self, done: int, total: int, phase: str) -> None:
        now, desc = self.clock(), f"{phase} run: denoiser call {done} of {total}"
        if phase != "warm-up":
            if self.start is None:
                self.start = (now, done)
            elif done > self.start[1]:
                pace = (now - self.start[0]) / (done - self.start[1])
                desc += f", about {seconds_text(pace * max(total - done, 0))} left"
        self.progress(min(done / total, 1.0), desc=desc)


def seconds_text(seconds: float) -> str:
    """12 s, 2 min 5 s."""
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60} s"


class Worker:
    """Holds one pipeline at a time and runs the generations, one at a time (a lock)."""

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

    def conditioning_of(self, model: str | None) -> str | None:
        """"text" or "class" (`pipeline_kind`): what `model` takes, where that is known without loading
        anything (an embedded model, the pipeline held, a saved pipeline's model_index.json in its folder or
        the hub cache); None when unknown (the page then shows both inputs until the model has run)."""
        model = (model or "").strip()
        family = embedded_family(model)
        if family:
            return get_family(family).conditioning
        pipe = self._pipe if self._model == model else None
        if pipe is not None:
            return pipeline_kind(pipe)
        index = Path(model).expanduser() / "model_index.json"
        if not index.is_file() and HUB_ID.match(model):
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(model, "model_index.json")   # the local cache only
            except Exception:  # noqa: BLE001  (an unusable cache just leaves it unknown)
                cached = None
            index = Path(cached) if isinstance(cached, str) else index
        try:
            family = family_of_pipeline_class(json.loads(index.read_text()).get("_class_name", ""))
        except (OSError, ValueError, AttributeError):
            return None
        return family.conditioning if family else None

    def steps_of(self, model: str | None) -> int | None:
        """The sampling steps `model` recommends (its recipe: the digits SiT's 12), where that is known
        without loading anything (an embedded model, the pipeline held); None otherwise."""
        model = (model or "").strip()
        pipe = self._pipe if self._model == model else None
        return (recipe(pipe) if pipe is not None else embedded_recipe(model)).get("num_inference_steps")

    def pipeline(self, model: str, progress):
        """The pipeline of `model`, stock (loaded when it is not the one held; call under the lock)."""
        if model != self._model:
            progress(0.0, desc=f"loading {model}")
            self._pipe = self._model = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._pipe = load_pipeline(model, dtype=self.config.dtype, device=self.config.device, use_safetensors=True)
            self._model = model
        dx.unpatch(self._pipe, missing_ok=True)                  # stock, whatever a failed run left
        return self._pipe

    def compare_images(self, model, method, prompt, class_label, height, width, steps, guidance, batch, seed,
                       warmup, options, progress) -> ImageRun:
        """Stock vs `method` with typed `options`, from one seed: `compare_pipeline`'s result and its settings."""
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
            kind = pipeline_kind(pipe)
            result = compare_pipeline(pipe, method, options, kwargs, warmup=warmup, progress=StepProgress(progress))
        condition = {"class": {"class": kwargs.get("class_labels", [None])[0]}, "text": {"prompt": repr(prompt)}}
        settings = {"model": model, **condition.get(kind, {}), "size": "x".join(map(str, result.stock.image.shape[:2])),
                    "steps": steps, "batch": batch, "guidance": "default" if guidance is None else guidance,
                    "seed": seed, "warm-up": warmup}
        return ImageRun(result, settings, kind)

    def compare_videos(self, model, prompt, frames, height, width, steps, guidance, seed, options,
                       photo, progress) -> tuple[Path, Path, float, float]:
        """Stock AnimateDiff vs the anchor-frame pipeline from the same initial noise, after a one-step
        warm-up of each: (stock GIF, anchor-frame GIF, seconds per denoiser call of each)."""
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
            done, total, report = [0], 2 * steps + 2, StepProgress(progress)

            def counted(phase):
                def on_forward():
                    done[0] += 1
                    report(done[0], total, phase)
                return on_forward

            pipe.set_progress_bar_config(disable=True)
            warm = {**common, "num_inference_steps": 1}   # one-time costs hit neither timing
            for run in (pipe, lambda *a, **k: animate(pipe, *a, **options, **k)):
                with DenoiserTimer(pipe.unet, counted("warm-up")):
                    run(prompt, latents=latents.clone(), **warm)
            with DenoiserTimer(pipe.unet, counted("stock")) as stock_timer:
                stock = pipe(prompt, latents=latents.clone(), **common).frames[0]
            with DenoiserTimer(pipe.unet, counted(VIDEO_METHOD)) as anchor_timer:
                anchored = animate(pipe, prompt, latents=latents.clone(), image=photo,
                                   **options, **common).frames[0]
            anchor_times = anchor_timer.times[-steps:]   # an inverted photo adds the inversion's forwards first
        folder = Path(tempfile.mkdtemp(prefix="diffusers_ext_app_"))
        stock_path = save_video([enlarge(frame, 128) for frame in np.asarray(stock)], folder / "stock.gif")
        anchor_path = save_video([enlarge(frame, 128) for frame in np.asarray(anchored)], folder / "anchor_frame.gif")
        return stock_path, anchor_path, stock_timer.mean, float(np.mean(anchor_times))


def suggested_method(model: str | None, methods: list[str]) -> str | None:
    """The method an embedded model is shown with (`loading.embedded_method`) if it is among `methods`;
    None for other models (not loaded to find out)."""
    method = embedded_method(model or "")
    return method if method in methods else None


def enlarge(image: np.ndarray, at_least: int = 256) -> np.ndarray:
    """Nearest-neighbour upscale of a small (H, W, 3) float image in [0, 1] to uint8, so the page shows its pixels."""
    factor = max(1, at_least // max(min(image.shape[:2]), 1))
    image = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    return (image.repeat(factor, 0).repeat(factor, 1) * 255).round().astype(np.uint8)


def error_message(err: BaseException) -> str:
    """The page's message for a failed generation (bad input as it is; anything else logged)."""
    if isinstance(err, (DiffusersExtError, ValueError, TypeError, OSError, ImportError, KeyError)):
        return str(err) or type(err).__name__
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of GPU memory: lower the resolution, the batch size or the frames"
    logger.exception("generation failed")
    return f"internal error ({type(err).__name__}: {err}); see the server log"
