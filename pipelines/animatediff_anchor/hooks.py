"""The image model inside an AnimateDiff UNet: FAAC's ghost motion modules and anchor-free control.

Each motion module (`AnimateDiffTransformer3D`) computes x + proj_out(blocks(proj_in(norm(x)))) along
the frames. A 1-frame input does not make it the identity (the residual branch still adds its
projection), so `MotionBypass` puts the anchor frame's input back in place of its output; the other
frames still see the anchor in their temporal attention. Resnets, spatial attention and
cross-attention work per frame, so the anchor's denoising is exactly the image model's
(`image_model_unet` builds that model for comparison). `ControlAnchorMask` zeroes a ControlNet's
residuals on the anchor. The method `anchor_frame` installs both (`AnchorFrameMethod.attach`).
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from diffusers_ext.ops import resolve_anchor


def check_pipeline(pipe) -> None:
    """An `UnsupportedModelError` (a TypeError) unless `pipe.unet` is a UNetMotionModel (an AnimateDiff pipeline)."""
    from diffusers import UNetMotionModel

    from diffusers_ext.errors import UnsupportedModelError

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNetMotionModel):
        raise UnsupportedModelError(f"{type(pipe).__name__} is not an AnimateDiff pipeline: the anchor frame "
                                    f"needs a UNetMotionModel as `pipe.unet`, got {type(unet).__name__}")


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


class MotionBypass:
    """Forward hooks that make every motion module of `model` the identity for the anchor frame.

    `remove()` takes the hooks off. Differentiable, so also usable in a training loop (the FAAC
    training variant: the anchor passes through the frozen image model only).
    """

    def __init__(self, model: torch.nn.Module, anchor: int):
        modules = motion_modules(model)
        if not modules:
            raise ValueError(f"{type(model).__name__} has no motion modules (AnimateDiffTransformer3D)")
        self.anchor = anchor
        self._signature = inspect.signature(modules[0].forward)
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in modules]

    def _hook(self, module, args, kwargs, output):
        bound = self._signature.bind(*args, **kwargs).arguments
        hidden, frames = bound["hidden_states"], bound.get("num_frames", 1)
        anchor = resolve_anchor(self.anchor, frames)
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

    def __init__(self, controlnet: torch.nn.Module, anchor: int, num_frames: int | None = None):
        self.anchor, self.num_frames = anchor, num_frames
        self._signature = inspect.signature(controlnet.forward)
        self.handles = [controlnet.register_forward_hook(self._hook, with_kwargs=True)]

    def _frames(self, args, kwargs) -> int:
        sample = self._signature.bind(*args, **kwargs).arguments.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 5:
            return sample.shape[2]
        if self.num_frames is None:
            raise ValueError("the anchor frame's ControlNet residuals need the number of frames: call through "
                             "`animate(...)` or patch with the option `num_frames`")
        return self.num_frames

    def _zero_anchor(self, x: torch.Tensor, frames: int, anchor: int) -> torch.Tensor:
        keep = torch.ones(1, frames, *([1] * (x.ndim - 1)), dtype=x.dtype, device=x.device)
        keep[:, anchor] = 0
        return (x.reshape(-1, frames, *x.shape[1:]) * keep).reshape(x.shape)

    def _hook(self, module, args, kwargs, output):
        frames = self._frames(args, kwargs)
        anchor = resolve_anchor(self.anchor, frames)
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


@contextlib.contextmanager
def image_model(pipe):
    """Inside, `pipe.unet` called on a 1-frame sample is the image model (its motion modules are the
    identity for that frame). Used by the inversion; ControlNets are not involved."""
    bypass = MotionBypass(pipe.unet, 0)
    try:
        yield pipe.unet
    finally:
        bypass.remove()
