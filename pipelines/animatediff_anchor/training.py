"""Building blocks of FAAC's training-based variant: the anchor passes through the frozen image model
(`hooks.MotionBypass`, the ghost motion modules) and the loss covers the other frames only."""

from __future__ import annotations

import torch

from diffusers_ext.ops import resolve_anchor


def non_anchor_loss(prediction: torch.Tensor, target: torch.Tensor, anchor: int = 0) -> torch.Tensor:
    """FAAC's training loss: mean squared error over the non-anchor frames of (B, C, F, h, w) tensors
    (the anchor passes through the frozen image model, `MotionBypass`, and is not trained on)."""
    frames = prediction.shape[2]
    if frames < 2:
        raise ValueError("the anchor-frame loss needs at least two frames")
    keep = [f for f in range(frames) if f != resolve_anchor(anchor, frames)]
    return torch.nn.functional.mse_loss(prediction[:, :, keep].float(), target[:, :, keep].float())
