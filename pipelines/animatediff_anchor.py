"""FAAC anchor-frame video generation on diffusers' AnimateDiff pipelines (Li et al., 2023).

One frame of the video, the anchor, is denoised by the text-to-image model alone: the motion modules
leave it unchanged ("ghost" motion modules), so it keeps the personalised model's identity and
detail. Every other frame's spatial self-attention also reads the anchor's keys and values
(`processors/anchor_frame.py`), so identity and detail propagate from it. The anchor may start from
the DDIM inversion of a user's photo, so a real face can be animated with its identity kept; a
ControlNet / SparseControlNet driving signal (face landmarks, a rendered 3D face model) steers
expression and pose of the other frames.

    from diffusers_ext.pipelines.animatediff_anchor import animate
    out = animate(pipe, "a portrait", image=photo, num_frames=16, output="face.gif")

    with anchor_frame(pipe, anchor=0, mode="concat"):     # or enable_anchor_frame / disable_anchor_frame
        frames = pipe("a portrait", num_frames=16).frames

Works on `AnimateDiffPipeline`, `AnimateDiffControlNetPipeline` and
`AnimateDiffSparseControlNetPipeline` (anything with a `UNetMotionModel` as `pipe.unet`).

How the anchor is kept out of the motion modules: each motion module (`AnimateDiffTransformer3D`)
computes x + proj_out(blocks(proj_in(norm(x)))) along the frames; a forward hook puts the anchor
frame's input back in place of its output (identity for the anchor). The other frames still see the
anchor in their temporal attention. Resnets, spatial attention (plain self-attention for the anchor)
and cross-attention work per frame, so the anchor's denoising is exactly the image model's
(`image_model_unet` builds that model for comparison). With ControlNets the anchor's residuals are
zeroed (`control_anchor=False`, the default), so the anchor stays the image model alone and its DDIM
inversion round-trips; `control_anchor=True` lets the control act on the anchor too.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path
from typing import Any

import torch

import diffusers_ext as dx
from diffusers_ext.patching import patch_record

logger = logging.getLogger("diffusers_ext")

CONTROLLER_ATTRIBUTE = "_diffusers_ext_anchor"


# --- the image model inside a motion UNet -------------------------------------------------------------

def motion_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The motion modules (AnimateDiffTransformer3D) of a UNetMotionModel or SparseControlNetModel."""
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    return [m for m in model.modules() if isinstance(m, AnimateDiffTransformer3D)]


def image_model_unet(unet) -> torch.nn.Module:
    """The text-to-image UNet2DConditionModel inside a UNetMotionModel: same spatial weights, no motion."""
    from diffusers import UNet2DConditionModel, UNetMotionModel

    if not isinstance(unet, UNetMotionModel):
        raise TypeError(f"expected a UNetMotionModel, got {type(unet).__name__}")
    config = dict(unet.config)
    config["down_block_types"] = [t.replace("Motion", "2D") for t in config["down_block_types"]]
    config["up_block_types"] = [t.replace("Motion", "2D") for t in config["up_block_types"]]
    config["attention_head_dim"] = config["num_attention_heads"]
    config["num_attention_heads"] = None
    expected, optional = UNet2DConditionModel._get_signature_keys(UNet2DConditionModel)
    config = {k: v for k, v in config.items() if k in expected or k in optional}
    image_unet = UNet2DConditionModel(**config)
    weights = {k: v for k, v in unet.state_dict().items() if ".motion_modules." not in k}
    image_unet.load_state_dict(weights, strict=True)
    return image_unet.to(device=unet.device, dtype=unet.dtype)


# --- ghost motion modules and anchor-free control ------------------------------------------------------

def _resolve_anchor(anchor: int, frames: int) -> int:
    from diffusers_ext.processors.anchor_frame import resolve_anchor

    return resolve_anchor(anchor, frames)


class MotionBypass:
    """Forward hooks that make every motion module of `model` the identity for the anchor frame.

    `active()` is read on every call (the hooks of `enable_anchor_frame` switch off once the patch
    they belong to is gone). `remove()` takes the hooks off. Also usable in a training loop (the FAAC
    training variant: the anchor passes through the frozen image model only).
    """

    def __init__(self, model: torch.nn.Module, anchor: int, active=lambda: True):
        modules = motion_modules(model)
        if not modules:
            raise ValueError(f"{type(model).__name__} has no motion modules (AnimateDiffTransformer3D)")
        self.anchor, self.active = anchor, active
        self._signature = inspect.signature(modules[0].forward)
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in modules]

    def _hook(self, module, args, kwargs, output):
        if not self.active():
            return None
        bound = self._signature.bind(*args, **kwargs).arguments
        hidden, frames = bound["hidden_states"], bound.get("num_frames", 1)
        anchor = _resolve_anchor(self.anchor, frames)
        keep = torch.zeros(1, frames, 1, 1, 1, dtype=torch.bool, device=output.device)
        keep[:, anchor] = True
        shape = (-1, frames) + tuple(output.shape[1:])
        return torch.where(keep, hidden.reshape(shape), output.reshape(shape)).reshape(output.shape)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class ControlAnchorMask:
    """A forward hook on a ControlNet that zeroes its residuals for the anchor frame.

    The residuals are (videos * frames, C, H, W), frames fastest. A SparseControlNetModel takes the
    5-D sample, so its frame count is read from it; a 2-D ControlNetModel (AnimateDiffControlNetPipeline)
    cannot tell, so `num_frames` must be set (`animate` sets it).
    """

    def __init__(self, controlnet: torch.nn.Module, anchor: int, active=lambda: True, num_frames: int | None = None):
        self.anchor, self.active, self.num_frames = anchor, active, num_frames
        self._signature = inspect.signature(controlnet.forward)
        self.handles = [controlnet.register_forward_hook(self._hook, with_kwargs=True)]

    def _frames(self, args, kwargs) -> int:
        sample = self._signature.bind(*args, **kwargs).arguments.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 5:
            return sample.shape[2]
        if self.num_frames is None:
            raise ValueError("the anchor frame's ControlNet residuals need the number of frames: call through "
                             "`animate(...)` or pass `num_frames` to `enable_anchor_frame`")
        return self.num_frames

    def _zero_anchor(self, x: torch.Tensor, frames: int, anchor: int) -> torch.Tensor:
        keep = torch.ones(1, frames, *([1] * (x.ndim - 1)), dtype=x.dtype, device=x.device)
        keep[:, anchor] = 0
        return (x.reshape(-1, frames, *x.shape[1:]) * keep).reshape(x.shape)

    def _hook(self, module, args, kwargs, output):
        if not self.active():
            return None
        frames = self._frames(args, kwargs)
        anchor = _resolve_anchor(self.anchor, frames)
        tuple_output = isinstance(output, tuple)
        down, mid = output if tuple_output else (output.down_block_res_samples, output.mid_block_res_sample)
        down = tuple(self._zero_anchor(x, frames, anchor) for x in down)
        mid = self._zero_anchor(mid, frames, anchor)
        if tuple_output:
            return down, mid
        output.down_block_res_samples, output.mid_block_res_sample = down, mid
        return output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class AnchorFrameController:
    """What `enable_anchor_frame` installed on a pipeline; `remove()` undoes it (see `disable_anchor_frame`)."""

    def __init__(self, pipe, record, anchor: int, image_model_anchor: bool, control_anchor: bool,
                 num_frames: int | None):
        self.pipe, self.record, self.anchor = pipe, record, anchor
        active = self.is_current
        self.bypass = [MotionBypass(pipe.unet, anchor, active)] if image_model_anchor else []
        self.control = []
        controlnet = getattr(pipe, "controlnet", None)
        if controlnet is not None:
            if not control_anchor:
                self.control.append(ControlAnchorMask(controlnet, anchor, active, num_frames))
            elif image_model_anchor and motion_modules(controlnet):  # SparseCtrl: its motion skips the anchor too
                self.bypass.append(MotionBypass(controlnet, anchor, active))

    def is_current(self) -> bool:
        """True while the pipeline's UNet still carries the patch this controller was made with."""
        return patch_record(self.pipe.unet) is self.record

    def set_num_frames(self, num_frames: int | None) -> None:
        for mask in self.control:
            mask.num_frames = num_frames

    def remove(self) -> None:
        for hooks in self.bypass + self.control:
            hooks.remove()
        self.bypass, self.control = [], []


def _check_pipeline(pipe) -> None:
    from diffusers import UNetMotionModel

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNetMotionModel):
        raise TypeError(f"{type(pipe).__name__} is not an AnimateDiff pipeline: the anchor frame needs a "
                        f"UNetMotionModel as `pipe.unet`, got {type(unet).__name__}")


def enable_anchor_frame(pipe, *, anchor: int = 0, mode: str = "concat", anchor_weight: float = 1.0,
                        steps=None, image_model_anchor: bool = True, control_anchor: bool = False,
                        num_frames: int | None = None) -> AnchorFrameController:
    """Turn an AnimateDiff pipeline into FAAC's anchor-frame pipeline (until `disable_anchor_frame`).

    anchor, mode, anchor_weight, steps: the `anchor_frame` attention patch (see processors/anchor_frame.py).
    image_model_anchor: the anchor frame skips the motion modules (denoised by the image model alone).
    control_anchor: let a ControlNet act on the anchor frame too (default: its residuals are zeroed there).
    num_frames: needed only for a 2-D ControlNet called outside `animate`.
    """
    _check_pipeline(pipe)
    disable_anchor_frame(pipe, missing_ok=True)
    record = dx.patch(pipe, "anchor_frame", anchor=anchor, mode=mode, anchor_weight=anchor_weight, steps=steps)
    controller = AnchorFrameController(pipe, record, anchor, image_model_anchor, control_anchor, num_frames)
    setattr(pipe.unet, CONTROLLER_ATTRIBUTE, controller)
    return controller


def disable_anchor_frame(pipe, missing_ok: bool = False) -> None:
    """Remove the hooks and the attention patch of `enable_anchor_frame`: the pipeline is stock again."""
    controller = getattr(pipe.unet, CONTROLLER_ATTRIBUTE, None)
    if controller is None:
        if missing_ok:
            return
        raise ValueError(f"{type(pipe).__name__} has no anchor frame enabled")
    controller.remove()
    if controller.is_current():
        dx.unpatch(pipe)
    delattr(pipe.unet, CONTROLLER_ATTRIBUTE)


@contextlib.contextmanager
def anchor_frame(pipe, **options):
    """Context manager: `enable_anchor_frame(pipe, **options)` inside, stock again on exit."""
    controller = enable_anchor_frame(pipe, **options)
    try:
        yield controller
    finally:
        disable_anchor_frame(pipe, missing_ok=True)


@contextlib.contextmanager
def image_model(pipe):
    """Inside, `pipe.unet` called on a 1-frame sample is the image model (its motion modules are the
    identity for that frame). Used by the inversion; ControlNets are not involved."""
    bypass = MotionBypass(pipe.unet, 0)
    try:
        yield pipe.unet
    finally:
        bypass.remove()


# --- DDIM inversion of the anchor frame ----------------------------------------------------------------

def _alphas(scheduler, t: int, num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_bar at t, alpha_bar at the DDIM step before t), exactly as DDIMScheduler.step pairs them."""
    previous = t - scheduler.config.num_train_timesteps // num_inference_steps
    alpha_t = scheduler.alphas_cumprod[t]
    alpha_prev = scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod
    return alpha_t, alpha_prev


def encode_image(pipe, image, height: int | None = None, width: int | None = None, generator=None) -> torch.Tensor:
    """A PIL image / array / tensor -> VAE latent (1, C, h, w), scaled as the UNet expects."""
    from diffusers.image_processor import VaeImageProcessor

    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor).preprocess(image, height, width)
    pixels = pixels.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
    with torch.no_grad():
        latent = pipe.vae.encode(pixels).latent_dist.mean
    return latent * pipe.vae.config.scaling_factor


@torch.no_grad()
def invert(pipe, image=None, prompt: str | None = "", *, latent: torch.Tensor | None = None,
           num_inference_steps: int = 50, guidance_scale: float = 1.0, negative_prompt: str | None = None,
           height: int | None = None, width: int | None = None, refine_steps: int = 0) -> torch.Tensor:
    """DDIM inversion of an image (or a VAE `latent` (1, C, h, w)) with the image model: the noise
    latent (1, C, h, w) that deterministic DDIM sampling (eta = 0) with the same prompt, guidance and
    step count turns back into the image's latent.

    Each step runs the DDIM update backwards, x_t = sqrt(a_t) x0(eps) + sqrt(1 - a_t) eps with
    eps = eps(x_prev, t) (the usual approximation of eps(x_t, t)); `refine_steps` > 0 re-evaluates
    eps at the current estimate of x_t that many times (a fixed-point iteration, closer round trip at
    that many extra UNet calls per step). The pipeline's scheduler must be a DDIMScheduler.
    """
    from diffusers import DDIMScheduler

    _check_pipeline(pipe)
    scheduler = pipe.scheduler
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(f"DDIM inversion needs pipe.scheduler to be a DDIMScheduler, got {type(scheduler).__name__}; "
                        "set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
    if latent is None:
        if image is None:
            raise ValueError("invert needs an `image` or a `latent`")
        latent = encode_image(pipe, image, height, width)
    device = pipe.unet.device
    latent = latent.to(device=device, dtype=pipe.unet.dtype)
    cfg = guidance_scale > 1.0
    embeds, negative = pipe.encode_prompt(prompt, device, latent.shape[0], cfg, negative_prompt)
    embeds = torch.cat([negative, embeds]) if cfg else embeds

    def eps(x: torch.Tensor, t) -> torch.Tensor:
        x_in = torch.cat([x, x]) if cfg else x
        noise = pipe.unet(x_in[:, :, None], t, encoder_hidden_states=embeds).sample[:, :, 0]
        if cfg:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        return noise

    scheduler.set_timesteps(num_inference_steps, device=device)
    x = latent
    with image_model(pipe), pipe.progress_bar(total=num_inference_steps) as progress:
        for t in scheduler.timesteps.flip(0):
            alpha_t, alpha_prev = (a.to(device=device, dtype=torch.float32) for a in _alphas(scheduler, int(t), num_inference_steps))
            x_prev = x.float()
            x0_of = lambda e: (x_prev - (1 - alpha_prev).sqrt() * e) / alpha_prev.sqrt()  # noqa: E731
            noise = eps(x, t).float()
            x_t = alpha_t.sqrt() * x0_of(noise) + (1 - alpha_t).sqrt() * noise
            for _ in range(refine_steps):
                noise = eps(x_t.to(latent.dtype), t).float()
                x_t = alpha_t.sqrt() * x0_of(noise) + (1 - alpha_t).sqrt() * noise
            x = x_t.to(latent.dtype)
            progress.update()
    return x


# --- the whole run -------------------------------------------------------------------------------------

def animate(pipe, prompt: str | list[str] | None = None, *, image=None, num_frames: int = 16, anchor: int = 0,
            mode: str = "concat", anchor_weight: float = 1.0, steps=None, image_model_anchor: bool = True,
            control_anchor: bool = False, num_inference_steps: int = 25, guidance_scale: float = 7.5,
            negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
            generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
            inversion_guidance_scale: float | None = None, inversion_refine_steps: int = 0,
            output: str | Path | None = None, fps: int = 8, **pipe_kwargs: Any):
    """Generate a video with FAAC's anchor frame; returns the pipeline's output (`.frames`).

    image: a user's photo; the anchor frame starts from its DDIM inversion (same prompt, step count and,
        unless `inversion_guidance_scale` is given, guidance), so the anchor reproduces the photo and the
        other frames take its identity. Needs a DDIMScheduler (swapped in for this call if the pipeline has
        another one) and eta = 0.
    latents: (videos, C, frames, h, w) initial noise; drawn from `generator` if None.
    output: write the frames of the first video to a .gif (PIL) or .mp4 (imageio + imageio-ffmpeg, or
        opencv-python) at `fps`.
    pipe_kwargs: passed to the pipeline (e.g. `conditioning_frames` for a ControlNet pipeline).
    Other options: see `enable_anchor_frame`.
    """
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    _check_pipeline(pipe)
    device = pipe.unet.device
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if height % pipe.vae_scale_factor or width % pipe.vae_scale_factor:
        raise ValueError(f"height and width must be multiples of {pipe.vae_scale_factor}; got {height} x {width}")
    _resolve_anchor(anchor, num_frames)
    videos = (len(prompt) if isinstance(prompt, list) else 1) * pipe_kwargs.get("num_videos_per_prompt", 1)
    shape = (videos, pipe.unet.config.in_channels, num_frames, height // pipe.vae_scale_factor,
             width // pipe.vae_scale_factor)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=pipe.unet.dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")

    scheduler = pipe.scheduler
    if image is not None and not isinstance(scheduler, DDIMScheduler):
        logger.info("diffusers_ext: using DDIMScheduler for this call (the inverted anchor needs DDIM sampling)")
        pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    try:
        if image is not None:
            if pipe_kwargs.get("eta", 0.0) != 0.0:
                raise ValueError("an inverted anchor needs deterministic DDIM sampling (eta = 0)")
            inversion_prompt = prompt[0] if isinstance(prompt, list) else prompt
            noise = invert(pipe, image, inversion_prompt, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale if inversion_guidance_scale is None else inversion_guidance_scale,
                           negative_prompt=negative_prompt, height=height, width=width,
                           refine_steps=inversion_refine_steps)
            latents = latents.clone()
            latents[:, :, _resolve_anchor(anchor, num_frames)] = noise.to(latents.dtype)
        with anchor_frame(pipe, anchor=anchor, mode=mode, anchor_weight=anchor_weight, steps=steps,
                          image_model_anchor=image_model_anchor, control_anchor=control_anchor,
                          num_frames=num_frames):
            result = pipe(prompt, num_frames=num_frames, height=height, width=width,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          negative_prompt=negative_prompt, latents=latents, **pipe_kwargs)
    finally:
        pipe.scheduler = scheduler
    if output is not None:
        frames = result.frames if hasattr(result, "frames") else result[0]
        save_video(frames[0], output, fps=fps)
    return result


# --- writing videos -----------------------------------------------------------------------------------

def _to_pil(frames) -> list:
    import numpy as np
    from PIL import Image

    images = []
    for frame in frames:
        if isinstance(frame, Image.Image):
            images.append(frame.convert("RGB"))
            continue
        array = frame.detach().cpu().float().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        images.append(Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array))
    return images


def save_video(frames, path: str | Path, fps: int = 8) -> Path:
    """Write frames (PIL images, or arrays / tensors in [0, 1]) to a .gif (PIL) or .mp4 file.

    MP4 goes through diffusers' `export_to_video`, which needs `imageio` + `imageio-ffmpeg` (or, as its
    legacy fallback, `opencv-python`)."""
    path = Path(path)
    images = _to_pil(frames)
    if not images:
        raise ValueError("no frames to write")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    elif suffix == ".mp4":
        import importlib.util

        if importlib.util.find_spec("imageio") is None and importlib.util.find_spec("cv2") is None:
            raise ImportError("writing MP4 needs `pip install imageio imageio-ffmpeg` (or opencv-python); "
                              "GIF needs nothing more")
        from diffusers.utils import export_to_video

        export_to_video(images, str(path), fps=fps)
    else:
        raise ValueError(f"unknown video format {path.suffix!r}; use .gif or .mp4")
    return path


# --- the training-based variant (building blocks) ------------------------------------------------------

def non_anchor_loss(prediction: torch.Tensor, target: torch.Tensor, anchor: int = 0) -> torch.Tensor:
    """FAAC's training loss: mean squared error over the non-anchor frames of (B, C, F, h, w) tensors
    (the anchor passes through the frozen image model, `MotionBypass`, and is not trained on)."""
    frames = prediction.shape[2]
    if frames < 2:
        raise ValueError("the anchor-frame loss needs at least two frames")
    keep = [f for f in range(frames) if f != _resolve_anchor(anchor, frames)]
    return torch.nn.functional.mse_loss(prediction[:, :, keep].float(), target[:, :, keep].float())
