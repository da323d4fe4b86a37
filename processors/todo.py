"""ToDo: token downsampling of keys and values (Smith et al., 2024), training-free.

Every query is kept; keys and values come from the tokens downsampled on their grid by `factor`:

    O = softmax(s Q K_down^T) V_down,   K_down, V_down = to_k, to_v of Down_factor(x)

Down is nearest-neighbour interpolation (ToDo's default) or average pooling (`mode="avg"`).
Attention cost falls by factor^2. It is a peer to agent attention on the same UNet layers
(`attn1` of the highest-resolution blocks by default), offered so both can be compared side by side.
"""

from __future__ import annotations

import math

import torch.nn.functional as F

from diffusers_ext.families import unet_self_attention
from diffusers_ext.ops import grid_to_tokens, sdpa, tokens_to_grid
from diffusers_ext.processor import SelfAttentionProcessor, compute_dtype, project_kv, project_out, project_q
from diffusers_ext.registry import STEPS, Method, Option, number, one_of, register_method


class ToDoAttnProcessor(SelfAttentionProcessor):
    """Self-attention with keys and values from the grid downsampled by `factor`."""

    label = "ToDo"

    def __init__(self, original, site, state, options):
        super().__init__(original, site, state)
        self.factor = options["factor"]
        self.mode = options["mode"]

    def attend(self, attn, x):
        """x (B, N, C) -> (B, N, C_out)."""
        grid = self.grid_of(x.shape[1])
        image, lead = tokens_to_grid(x, grid)
        size = (math.ceil(grid[0] / self.factor), math.ceil(grid[1] / self.factor))
        if self.mode == "nearest":
            small = F.interpolate(image, size=size, mode="nearest")
        else:
            small = F.adaptive_avg_pool2d(image, size)
        dtype = compute_dtype(attn, x.dtype)
        q = project_q(attn, x).to(dtype)
        k, v = (t.to(dtype) for t in project_kv(attn, grid_to_tokens(small, lead)))
        return project_out(attn, sdpa(q, k, v, attn.scale), x.dtype)


@register_method
class ToDoMethod(Method):
    name = "todo"
    families = ("sd", "sdxl", "animatediff")
    training_free = True
    description = "Token downsampling of keys/values on UNet self-attention (ToDo, training-free peer)"
    options = (
        STEPS,
        Option("factor", 2, "downsampling factor of keys and values on the grid", number(2, 8, integer=True)),
        Option("mode", "nearest", "'nearest' (ToDo) or 'avg' pooling", one_of("nearest", "avg")),
        Option("max_downsample", {"sdxl": 2, "*": 1}, "patch UNet levels with at most this downsampling",
               one_of(1, 2, 4, 8)),
    )

    def select_sites(self, sites, options, family):
        return unet_self_attention(sites, options["max_downsample"])

    def make_processor(self, site, original, patch):
        return ToDoAttnProcessor(original, site, patch.state, patch.options)
