"""Shared attention math, written once. Shapes: (B, h, N, d) per head unless said otherwise.

    sdpa(q, k, v, scale)                     softmax(scale q k^T) v through the fused kernel
    agent_attention(q, k, v, a, s1, s2, c)   softmax(s2 q a^T) softmax(s1 a k^T) v + c v
    pool_on_grid(x, grid, out_grid)          average-pool tokens laid out on an image grid
    GridDepthwiseConv(channels, k)           depthwise k x k conv of tokens on their grid (a layer)
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=None)
def _xformers_ops():
    """xformers' ops module, or None. Imported lazily and only for CUDA (it warns loudly on CPU)."""
    if os.environ.get("DIFFUSERS_EXT_XFORMERS", "1") == "0":
        return None
    try:
        import xformers.ops as xops
    except Exception:  # not installed, or built for another torch
        return None
    return xops


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q k^T) v; q (B, h, N, d), k / v (B, h, M, d) -> (B, h, N, d).

    Runs through torch's fused scaled_dot_product_attention, or xformers' memory-efficient kernel on
    CUDA when xformers is installed (set DIFFUSERS_EXT_XFORMERS=0 to turn that off)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not torch.is_grad_enabled():
        xops = _xformers_ops()
        if xops is not None:
            out = xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
            )
            return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def agent_attention(q, k, v, agents, scale: float, agent_scale: float, shortcut: float = 0.0, shortcut_v=None):
    """Two-stage agent attention (Agent Attention, Han et al. 2024):

        F = softmax(scale * A K^T) V          agents gather from the tokens   (B, h, n, d)
        O = softmax(agent_scale * Q A^T) F    tokens read back from the agents (B, h, N, d)
        O = O + shortcut * V_s                (V_s = `shortcut_v`, default V; needs N == M)

    q (B, h, N, d); k, v (B, h, M, d); agents (B, h, n, d). Both stages are ordinary softmax
    attention and run through `sdpa`: cost 4 n (N + M) d per head instead of 4 N M d.
    """
    gathered = sdpa(agents, k, v, scale)
    out = sdpa(q, agents, gathered, agent_scale)
    if shortcut:
        out = out + shortcut * (v if shortcut_v is None else shortcut_v)
    return out


def tokens_to_grid(x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Size]:
    """(..., N, C) with N = H*W row-major -> ((prod(...), C, H, W), the leading shape)."""
    height, width = grid
    lead, channels = x.shape[:-2], x.shape[-1]
    return x.reshape(-1, height, width, channels).permute(0, 3, 1, 2), lead


def grid_to_tokens(x: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """(prod(lead), C, H, W) -> (*lead, H*W, C)."""
    batch, channels, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(*lead, height * width, channels)


def pool_on_grid(x: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling of tokens on their grid: (..., H*W, C) -> (..., h*w, C)."""
    image, lead = tokens_to_grid(x, grid)
    return grid_to_tokens(F.adaptive_avg_pool2d(image, out_grid), lead)


class GridDepthwiseConv(nn.Module):
    """Depthwise `kernel_size` x `kernel_size` conv of tokens on their image grid (zero padding).

    (..., N, C) with N = H*W -> same shape. Zero-initialised by default, so a model that gains
    one starts exactly where it was (mediators' DWC(V), T^5's q/k convs, LINA's locality conv).
    """

    def __init__(self, channels: int, kernel_size: int = 3, zero_init: bool = True, bias: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)
        if zero_init:
            nn.init.zeros_(self.conv.weight)
            if bias:
                nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        image, lead = tokens_to_grid(x, grid)
        return grid_to_tokens(self.conv(image.to(self.conv.weight.dtype)).to(x.dtype), lead)
