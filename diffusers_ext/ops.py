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


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and normalisers compute in: fp32 for fp16 / bf16 / fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


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
        conv = lambda device: nn.Conv2d(  # noqa: E731
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias, device=device)
        if zero_init:  # built on the meta device: its random init would otherwise advance the global RNG
            self.conv = conv("meta").to_empty(device="cpu")
            nn.init.zeros_(self.conv.weight)
            if bias:
                nn.init.zeros_(self.conv.bias)
        else:
            self.conv = conv(None)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        image, lead = tokens_to_grid(x, grid)
        return grid_to_tokens(self.conv(image.to(self.conv.weight.dtype)).to(x.dtype), lead)


# =====================================================================================================
# TTT linearization (T^5; Li, Han et al., "Linearizing Vision Transformer with Test-Time Training").
# Shapes per head: q, k, v (B, h, N, d); inner weights W1, W2 (h, d, d) (or broadcastable to it).
#
#   k <- (k - mean_N k) / sqrt(var_N k + eps)              key_instance_norm   (eps = 1, no affine)
#   f(x) = SiLU(x W1) W2                                   the per-head inner model
#   L = s / (2N) sum_i ||f(k_i) - v_i||^2                  its self-supervised loss on the sequence
#   W' = W - dL/dW                                         ttt_inner_step (one full-batch step, lr 1)
#   o = SiLU(q W1') W2'                                    ttt_attention = step + read-out
# =====================================================================================================

def key_instance_norm(k: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Instance norm of keys over the tokens, per channel, no affine: (..., N, d) -> (..., N, d).

    Softmax ignores an offset shared by all keys; the TTT regression does not, so T^5 removes it.
    Statistics at least in fp32 (fp16 / bf16 upcast, fp64 stays fp64; biased variance, as
    `F.instance_norm`); returned in k's dtype."""
    work = k.to(upcast_dtype(k.dtype))
    var, mean = torch.var_mean(work, dim=-2, keepdim=True, unbiased=False)
    return ((work - mean) * torch.rsqrt(var + eps)).to(k.dtype)


def silu_derivative(z: torch.Tensor, sig: torch.Tensor | None = None) -> torch.Tensor:
    """d SiLU(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z)))."""
    sig = torch.sigmoid(z) if sig is None else sig
    return sig * (1.0 + z * (1.0 - sig))


def ttt_inner_step(k: torch.Tensor, v: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float):
    """One closed-form gradient step (lr 1) of the inner model on L = scale/(2N) sum ||f(k_i) - v_i||^2.

    k, v (B, h, N, d); w1, w2 (h, d, d) -> (W1', W2') each (B, h, d, d):

        z = k W1, a = SiLU(z), e = (a W2 - v) * scale / N
        G2 = a^T e,  G1 = k^T ((e W2^T) * SiLU'(z)),  W1' = W1 - G1,  W2' = W2 - G2
    """
    num_tokens = k.shape[-2]
    z = k @ w1
    sig = torch.sigmoid(z)
    a = z * sig
    e = (a @ w2 - v) * (scale / num_tokens)
    grad_w2 = a.transpose(-1, -2) @ e
    grad_w1 = k.transpose(-1, -2) @ ((e @ w2.transpose(-1, -2)) * silu_derivative(z, sig))
    return w1 - grad_w1, w2 - grad_w2


def ttt_read(q: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The updated inner model applied to the queries: SiLU(q W1') W2'; q (B, h, N, d) -> (B, h, N, d)."""
    return F.silu(q @ w1) @ w2


def ttt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """TTT attention: learn the inner model on (k, v) by one step, read it with q. Linear in N
    (about 14 N d^2 flops per head against 4 N^2 d for softmax attention); no N x N matrix.
    q (B, h, N, d); k, v (B, h, M, d); w1, w2 (h, d, d) -> (B, h, N, d). Keys are used as given
    (normalise them first with `key_instance_norm`)."""
    w1_new, w2_new = ttt_inner_step(k, v, w1, w2, scale)
    return ttt_read(q, w1_new, w2_new)


# =====================================================================================================
# Mediator tokens and VCA (DiT / SiT): interpolated position biases, biased two-stage attention,
# RMSNorm without affine, differential attention with the Diff-Transformer lambda.
# =====================================================================================================

def attention_with_bias(q, k, v, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale q k^T + bias) v; `bias` broadcastable to (B, h, N, M) or None (then `sdpa`)."""
    if bias is None:
        return sdpa(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)


def mediator_attention(q, k, v, mediators, scale: float, bias_to_tokens=None, bias_to_mediators=None):
    """Two-stage attention through n mediator tokens T (Pu et al., ECCV 2024):

        F = softmax(s T K^T + B1) V        mediators gather      (B, h, n, d)
        O = softmax(s Q T^T + B2) F        tokens read back      (B, h, N, d)

    q (B, h, N, d); k, v (B, h, M, d); mediators (B, h, n, d); B1 (.., h, n, M), B2 (.., h, N, n)
    or None. Without biases it is agent attention with both scales s (`agent_attention`)."""
    if bias_to_tokens is None and bias_to_mediators is None:
        return agent_attention(q, k, v, mediators, scale, scale)
    gathered = attention_with_bias(mediators, k, v, scale, bias_to_tokens)
    return attention_with_bias(q, mediators, gathered, scale, bias_to_mediators)


def interpolated_bias(table: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                      mediator_grid: tuple[int, int], token_grid: tuple[int, int]) -> torch.Tensor:
    """Position bias between a mediator grid and a token grid from resolution-free tables.

    table (h, Mh, Mw, Th, Tw): bilinear over both grids; rows (h, Mh, Mw, R) and cols (h, Mh, Mw, R'):
    per token row / column terms, linear over the token axis, bilinear over the mediator grid.
    -> (h, mh*mw, H*W): bias[m, (i, j)] = table~[m, i, j] + rows~[m, i] + cols~[m, j].
    Interpolation is align_corners=False, so a table already at the target size is used as is.
    """
    heads = table.shape[0]
    (mh, mw), (height, width) = mediator_grid, token_grid

    def over_mediators(x):                       # (h, Mh, Mw, *rest) -> (h, mh*mw, *rest)
        rest = x.shape[3:]
        if x.shape[1:3] != (mh, mw):
            flat = x.permute(0, *range(3, x.ndim), 1, 2).reshape(-1, 1, *x.shape[1:3])
            flat = F.interpolate(flat, size=(mh, mw), mode="bilinear", align_corners=False)
            x = flat.reshape(heads, *rest, mh, mw).permute(0, -2, -1, *range(1, 1 + len(rest)))
        return x.reshape(heads, mh * mw, *rest)

    def over_tokens(x, size):                     # (h, n, *R) -> (h, n, *size)
        if tuple(x.shape[2:]) == tuple(size):
            return x
        mode = "bilinear" if len(size) == 2 else "linear"
        flat = F.interpolate(x.reshape(-1, 1, *x.shape[2:]), size=size, mode=mode, align_corners=False)
        return flat.reshape(heads, mh * mw, *size)

    bias = over_tokens(over_mediators(table), (height, width))
    bias = bias + over_tokens(over_mediators(rows), (height,))[..., :, None]
    bias = bias + over_tokens(over_mediators(cols), (width,))[..., None, :]
    return bias.reshape(heads, mh * mw, height * width)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) (* weight), computed at least in fp32 (fp64 stays fp64),
    returned in x's dtype."""
    work = upcast_dtype(x.dtype)
    y = x.to(work) * torch.rsqrt(x.to(work).pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(work) if weight is not None else y).to(x.dtype)


def diff_lambda(lq1, lk1, lq2, lk2, lambda_init: float) -> torch.Tensor:
    """Diff Transformer's re-parameterised lambda: exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,
    at least in fp32 (fp64 parameters stay fp64)."""
    work = upcast_dtype(lq1.dtype)
    return torch.exp((lq1 * lk1).sum(-1).to(work)) - torch.exp((lq2 * lk2).sum(-1).to(work)) + lambda_init


def lambda_init_for_depth(depth: int) -> float:
    """Diff Transformer's depth-dependent lambda_init = 0.8 - 0.6 exp(-0.3 depth) (depth from 0)."""
    import math

    return 0.8 - 0.6 * math.exp(-0.3 * depth)


def differential_attention(q, k_pos, k_neg, v, scale: float, lam) -> torch.Tensor:
    """(softmax(s q k+^T) - lam softmax(s q k-^T)) v as two fused attentions; lam a scalar (tensor)."""
    return sdpa(q, k_pos, v, scale) - lam * sdpa(q, k_neg, v, scale)


# =====================================================================================================
# LINA: division-normalised ReLU linear attention with a KV gate (Wang et al.; SANA's kernel form).
# Shapes per head: q (B, h, N, d); k, v (B, h, M, d); gates broadcastable to (B, h, M, 1).
#
#   phi(x) = ReLU(x) + 1e-6                                      relu_feature_map
#   k~_j = gk_j phi(k_j),  v~_j = gv_j v_j                         the KV gate (per head, per position)
#   S = (1/M) sum_j k~_j^T v~_j   (d x d),   z = (1/M) sum_j k~_j   the linear memory and its normaliser
#   O_i = phi(q_i) S / (phi(q_i) . z + eps)                        gated_linear_attention (fp32)
#
# Equivalently O_i = sum_j w_ij gv_j v_j / (sum_j w_ij + M eps), w_ij = gk_j phi(q_i) . phi(k_j): a
# weighted average of the gated values; a key gate of 0 at position j removes j exactly.
# =====================================================================================================

LINEAR_FEATURE_EPS = 1e-6


def relu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """LINA's kernel feature map phi(x) = ReLU(x) + 1e-6 (strictly positive, so z never vanishes)."""
    return F.relu(x) + LINEAR_FEATURE_EPS


def gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_gate: torch.Tensor | None = None,
                           value_gate: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Division-normalised ReLU linear attention with a KV gate, computed in fp32.

    q (B, h, N, d) and k (B, h, M, d) are raw projections (phi is applied here); v (B, h, M, d);
    key_gate / value_gate broadcastable to (B, h, M, 1) or None (= 1). Returns (B, h, N, d) in q's
    dtype (computed in fp32, or fp64 for fp64 inputs). The memory and normaliser are means over the M keys (LINA's form; keeps fp32 sums of
    64K tokens well scaled), so `eps` acts on the mean: O = phi(q) S / (phi(q) . z + eps).
    Cost 4 N d^2 + 2 M d^2 flops per head (softmax attention: 4 N M d); no N x M matrix.
    """
    dtype = q.dtype
    work = upcast_dtype(dtype)  # fp32 (fp64 stays fp64)
    q, k, v = relu_feature_map(q.to(work)), relu_feature_map(k.to(work)), v.to(work)
    if key_gate is not None:
        k = k * key_gate.to(work)
    if value_gate is not None:
        v = v * value_gate.to(work)
    inv_m = 1.0 / k.shape[-2]
    memory = (k.transpose(-1, -2) * inv_m) @ v                  # S (B, h, d, d)
    normaliser = k.mean(dim=-2, keepdim=True).transpose(-1, -2)  # z (B, h, d, 1)
    return ((q @ memory) / (q @ normaliser + eps)).to(dtype)
