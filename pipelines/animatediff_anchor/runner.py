"""The whole FAAC run (`animate`: inversion of a photo, the patch, the pipeline call, the video file) and
the compatibility wrappers around `dx.patch(pipe, "anchor_frame")`."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

import diffusers_ext as dx
from diffusers_ext.errors import PatchError
from diffusers_ext.families import family_of
from diffusers_ext.ops import resolve_anchor
from diffusers_ext.patching import PatchRecord
from diffusers_ext.registry import get_method

from .adapter import motion_adapter_loaded
from .export import save_video
from .hooks import check_pipeline
from .inversion import invert

logger = logging.getLogger("diffusers_ext")

METHOD = "anchor_frame"


def enable_anchor_frame(pipe, **options) -> PatchRecord:
    """`dx.patch(pipe, "anchor_frame", **options)` on an AnimateDiff pipeline (a TypeError for any other):
    the whole method, until `disable_anchor_frame` / `dx.unpatch`. Options: `dx.methods()`."""
    check_pipeline(pipe)
    return dx.patch(pipe, METHOD, **options)


def disable_anchor_frame(pipe, missing_ok: bool = False) -> None:
    """`dx.unpatch(pipe)` of an anchor-frame patch: the pipeline is stock again. A pipeline without one
    is an error unless `missing_ok` (a patch of another method is then left in place)."""
    record = dx.patch_record(pipe)
    if record is None or record.method != METHOD:
        if missing_ok:
            return
        found = "no patch" if record is None else f"a {record.method!r} patch"
        raise PatchError(f"{type(pipe).__name__} has no anchor frame enabled (it has {found})")
    dx.unpatch(pipe)


@contextlib.contextmanager
def anchor_frame(pipe, **options):
    """Context manager: `enable_anchor_frame(pipe, **options)` inside (yields the patch record), stock
    again on exit."""
    record = enable_anchor_frame(pipe, **options)
    try:
        yield record
    finally:
        disable_anchor_frame(pipe, missing_ok=True)


def animate(pipe, prompt: str | list[str] | None = None, *, image=None, num_frames: int = 16,
            num_inference_steps: int = 25, guidance_scale: float = 7.5, negative_prompt: str | None = None,
            height: int | None = None, width: int | None = None, generator: torch.Generator | None = None,
            latents: torch.Tensor | None = None, inversion_guidance_scale: float | None = None,
            inversion_refine_steps: int = 0, output: str | Path | None = None, fps: int = 8,
            motion_adapter=None, **kwargs: Any):
    """Generate a video with FAAC's anchor frame; returns the pipeline's output (`.frames`).

    kwargs: the `anchor_frame` method's options (anchor, mode, anchor_weight, steps, image_model_anchor,
        control_anchor: see `dx.methods()`; `num_frames` is set from the argument); the rest go to the
        pipeline (e.g. `conditioning_frames` for a ControlNet pipeline).
    image: a user's photo; the anchor frame starts from its DDIM inversion (same prompt, step count and,
        unless `inversion_guidance_scale` is given, guidance), so the anchor reproduces the photo and the
        other frames take its identity. Needs a DDIMScheduler (swapped in for this call if the pipeline has
        another one) and eta = 0.
    latents: (videos, C, frames, h, w) initial noise; drawn from `generator` if None.
    motion_adapter: a MotionAdapter or its folder (e.g. from `diffusers-ext animate-train`) whose motion
        modules replace the pipeline's for this call (restored after).
    output: write the frames of the first video to a .gif (PIL) or .mp4 (imageio + imageio-ffmpeg, or
        opencv-python) at `fps`.
    """
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    method = get_method(METHOD)
    options = {o.name: kwargs.pop(o.name) for o in method.options if o.name in kwargs}
    options["num_frames"] = num_frames
    check_pipeline(pipe)
    device = pipe.unet.device
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if height % pipe.vae_scale_factor or width % pipe.vae_scale_factor:
        raise ValueError(f"height and width must be multiples of {pipe.vae_scale_factor}; got {height} x {width}")
    anchor = resolve_anchor(method.resolve_options(family_of(pipe.unet).name, options)["anchor"], num_frames)
    videos = (len(prompt) if isinstance(prompt, list) else 1) * kwargs.get("num_videos_per_prompt", 1)
    shape = (videos, pipe.unet.config.in_channels, num_frames, height // pipe.vae_scale_factor,
             width // pipe.vae_scale_factor)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=pipe.unet.dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")

    scheduler = pipe.scheduler
    stack = contextlib.ExitStack()
    if motion_adapter is not None:
        stack.enter_context(motion_adapter_loaded(pipe, motion_adapter))
    if image is not None and not isinstance(scheduler, DDIMScheduler):
        logger.info("diffusers_ext: using DDIMScheduler for this call (the inverted anchor needs DDIM sampling)")
        pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    try:
        if image is not None:
            if kwargs.get("eta", 0.0) != 0.0:
                raise ValueError("an inverted anchor needs deterministic DDIM sampling (eta = 0)")
            inversion_prompt = prompt[0] if isinstance(prompt, list) else prompt
            noise = invert(pipe, image, inversion_prompt, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale if inversion_guidance_scale is None else inversion_guidance_scale,
                           negative_prompt=negative_prompt, height=height, width=width,
                           refine_steps=inversion_refine_steps)
            latents = latents.clone()
            latents[:, :, anchor] = noise.to(latents.dtype)
        with anchor_frame(pipe, **options):
            result = pipe(prompt, num_frames=num_frames, height=height, width=width,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          negative_prompt=negative_prompt, latents=latents, **kwargs)
    finally:
        pipe.scheduler = scheduler
        stack.close()
    if output is not None:
        frames = result.frames if hasattr(result, "frames") else result[0]
        save_video(frames[0], output, fps=fps)
    return result
