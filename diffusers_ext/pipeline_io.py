"""What goes into a diffusers pipeline call and what comes out, written once.

`compare`, the FID sampler (`eval.sampling`), the distiller and the app all call pipelines; they ask
this module how:

    pipeline_kind(pipe)                 "class" (class_labels), "text" (prompt) or "unconditional"
    num_classes(pipe)                   the class count of a class-conditional pipeline, or None
    default_class_labels(pipe)          every class once for small label sets, else ImageNet's 207
    check_conditions(pipe, prompt=...)  the kind; an error for a condition the pipeline does not take
    recipe(pipe)                        the model's recommended call arguments (steps, guidance, sampler)
    call_kwargs(pipe, ...)              the keyword arguments of one call (steps, seed, condition, size)
    latent_shape(pipe, height, width)   (C, h, w) of one sample's initial latents, where `latents=` is taken
    images_of(output)                   (H, W, 3) float arrays in [0, 1] (grey as RGB; video frames side by side)
    to_uint8(images)                    quantisation to uint8 (n, H, W, 3), as ADM / DiT quantise
    DenoiserTimer(denoiser)             a context manager timing every denoiser forward
"""

from __future__ import annotations

import inspect
import math
import time

import numpy as np
import torch

from .errors import DiffusersExtError
from .families import family_of, find_denoiser

IMAGENET_DEFAULT_LABEL = 207   # golden retriever, DiT's sample class


class PipelineCallError(DiffusersExtError, ValueError):
    """A call the pipeline cannot take (a size it has no argument for, a batch it cannot draw)."""


def call_parameters(pipe) -> set[str]:
    return set(inspect.signature(pipe.__call__).parameters)


def pipeline_kind(pipe) -> str:
    """"class" (class_labels), "text" (prompt) or "unconditional"."""
    params = call_parameters(pipe)
    if "class_labels" in params:
        return "class"
    if "prompt" in params:
        return "text"
    return "unconditional"


def check_conditions(pipe, **given: str | None) -> str:
    """The pipeline's kind (`pipeline_kind`); a `PipelineCallError` when a condition it does not take
    is given. `given`: prompt= / class_label= -> the flag that gave it (None: not given), e.g.
    `check_conditions(pipe, prompt="--prompt", class_label=None)`. One rule for every command."""
    kind = pipeline_kind(pipe)
    takes = {"class": "class_label", "text": "prompt"}.get(kind)
    described = {"class": "a class-conditional pipeline", "text": "a text-to-image pipeline"}
    for condition, flag in given.items():
        if flag is not None and condition != takes:
            raise PipelineCallError(f"{type(pipe).__name__} takes no {condition.replace('_', ' ')}s "
                                    f"({described.get(kind, f'an {kind} pipeline')}); drop {flag}")
    return kind


def recipe(pipe) -> dict:
    """The call arguments the model recommends (`pipe.recipe`, e.g. the digits SiT's 12 Heun steps at
    guidance 2: `digits.SAMPLING`), limited to those the pipeline takes; {} when it has none. Every
    command uses them for what the user does not give."""
    params = call_parameters(pipe)
    return {k: v for k, v in (getattr(pipe, "recipe", None) or {}).items() if k in params}


def num_classes(pipe) -> int | None:
    """The number of classes of a class-conditional pipeline's denoiser (or of its label table), or None."""
    model = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    config = getattr(model, "config", {})
    for key in ("num_embeds_ada_norm", "num_classes", "num_class_embeds"):
        value = config.get(key) if hasattr(config, "get") else None
        if value:
            return int(value)
    labels = getattr(pipe, "labels", None)
    if isinstance(labels, dict) and labels:
        return len(set(labels.values()))
    id2label = getattr(pipe, "id2label", None)
    return len(id2label) if isinstance(id2label, dict) and id2label else None


def default_class_labels(pipe) -> list[int]:
    """The pipeline's own showcase (`pipe.default_class_labels`, e.g. the glyph models' "DIFFUSERS"),
    else every class once for small label sets (the digits), else ImageNet's 207 (golden retriever)."""
    own = getattr(pipe, "default_class_labels", None)
    if own:
        return list(own)
    classes = num_classes(pipe)
    return list(range(classes)) if classes is not None and classes <= 16 else [IMAGENET_DEFAULT_LABEL]


def call_kwargs(pipe, prompt: str, class_label: int | list[int], steps: int, guidance: float | None,
                height: int | None, width: int | None, seed: int, batch_size: int = 1) -> dict:
    """One call's keyword arguments: `steps`, a CPU generator seeded with `seed`, numpy output, the
    condition (class labels: one label repeated `batch_size` times, or the given list; else the
    prompt with `batch_size` images or videos per prompt), guidance and size where given."""
    params = call_parameters(pipe)
    if guidance is not None and not math.isfinite(guidance):
        raise PipelineCallError(f"the guidance scale must be a finite number, got {guidance!r}")
    kwargs = {"num_inference_steps": steps, "generator": torch.Generator("cpu").manual_seed(seed),
              "output_type": "np"}
    if "class_labels" in params:
        kwargs["class_labels"] = list(class_label) if isinstance(class_label, (list, tuple)) else [class_label] * batch_size
    else:
        kwargs["prompt"] = prompt
        if batch_size != 1:
            if "num_images_per_prompt" in params:
                kwargs["num_images_per_prompt"] = batch_size
            elif "num_videos_per_prompt" in params:
                kwargs["num_videos_per_prompt"] = batch_size
            else:
                raise PipelineCallError(f"{type(pipe).__name__} does not take a batch size")
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            if name not in params:
                raise PipelineCallError(f"{type(pipe).__name__} does not take --{name}")
            kwargs[name] = value
    return kwargs


@torch.no_grad()
def class_samples(pipe, class_labels, seed: int = 0, batch_size: int = 100, **call) -> torch.Tensor:
    """Samples (B, C, H, W) in [-1, 1] of a class-conditional pipeline for `class_labels`, in batches of
    `batch_size`, each with its own generator seeded by (seed, batch index): deterministic in `seed` and
    `batch_size`. `call`: the rest of the pipeline's arguments (steps, guidance, sampler)."""
    out = []
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        for i, chunk in enumerate(torch.as_tensor(class_labels).split(batch_size)):
            generator = torch.Generator().manual_seed(seed * 100_003 + i)
            images = pipe(class_labels=chunk, generator=generator, output_type="pt", **call).images
            out.append(images * 2 - 1)
    finally:
        pipe._progress_bar_config = saved
    return torch.cat(out)


def latent_shape(pipe, height: int | None, width: int | None) -> tuple[int, ...] | None:
    """(C, h, w) of one sample's initial latents for pipelines that take `latents=` in that layout
    (UNet image pipelines, SD3: `Family.latent_side`); None where the pipeline draws them from the
    per-sample generators itself."""
    if "latents" not in call_parameters(pipe):
        return None
    denoiser, _ = find_denoiser(pipe)
    side = family_of(denoiser).latent_side
    scale = getattr(pipe, "vae_scale_factor", None)
    if side is None or not scale:
        return None
    default = side(pipe)
    if not isinstance(default, int):
        return None
    h, w = height or default * scale, width or default * scale
    if h % scale or w % scale:
        return None
    return (denoiser.config.in_channels, h // scale, w // scale)


def images_of(output) -> list[np.ndarray]:
    """(H, W, 3) arrays in [0, 1]: each image (grey ones as RGB), or each video's frames side by side."""
    if hasattr(output, "images"):
        images = [np.asarray(image) for image in output.images]
        return [np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image for image in images]
    return [np.concatenate(list(np.asarray(video)), axis=1) for video in output.frames]  # (F, H, W, 3) each


def to_uint8(images) -> np.ndarray:
    """Pipeline output (float [0, 1] (n, H, W, 3 or 1) array or PIL list) -> uint8 (n, H, W, 3).

    round(255 x) as floor(255 x + 0.5), which equals DiT's clamp(127.5 z + 128).to(uint8) for z in [-1, 1].
    Grey images (one channel, e.g. the digits SiT) are repeated into RGB, as the Inception network needs.
    """
    if isinstance(images, list):
        images = np.stack([np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images])
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise PipelineCallError(f"the pipeline returned {images.shape}, not images (n, H, W, 3); video pipelines "
                                "are not supported for FID")
    if images.dtype == np.uint8:
        return images
    return np.clip(np.floor(images.astype(np.float64) * 255.0 + 0.5), 0, 255).astype(np.uint8)


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, 1 or 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), quantised by `to_uint8` as the FID
    sampler quantises pipeline output: reference images and samples meet the Inception network alike."""
    return to_uint8(((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())


class DenoiserTimer:
    """Wall time of every denoiser forward (synchronised on CUDA), as a context manager:

        with DenoiserTimer(pipe.unet, on_forward=tick) as timer:
            pipe(...)
        timer.times          # seconds of each forward; on_forward() is called after each
    """

    def __init__(self, denoiser: torch.nn.Module, on_forward=None):
        self.denoiser, self.on_forward = denoiser, on_forward
        self.times: list[float] = []
        self._start = None
        self._handles = []

    def __enter__(self) -> "DenoiserTimer":
        self._handles = [self.denoiser.register_forward_pre_hook(self._before),
                         self.denoiser.register_forward_hook(self._after)]
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False

    @property
    def mean(self) -> float:
        return float(np.mean(self.times)) if self.times else float("nan")

    def _sync(self):
        parameter = next(self.denoiser.parameters(), None)
        if parameter is not None and parameter.is_cuda:
            torch.cuda.synchronize()

    def _before(self, module, args):
        self._sync()
        self._start = time.perf_counter()

    def _after(self, module, args, output):
        self._sync()
        self.times.append(time.perf_counter() - self._start)
        if self.on_forward is not None:
            self.on_forward()
