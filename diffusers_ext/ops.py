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


def needs_plain_ops(*tensors) -> bool:
    """True while torch.compile traces or a gradient can reach one of `tensors` (non-tensors ignored): then
    no op writes into reused buffers in place (autograd and strided `out=` forbid it; compile breaks its
    graph on the latter) and nothing is served from a cache of earlier results (`processor.frozen`)."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


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


def pool_heads_on_grid(x: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> torch.Tensor:
    """`pool_on_grid` of per-head tokens, (B, h, H*W, d) -> (B, h, h'*w', d), pooled as (B, N, h*d) (the
    heads of a projection are a view of that: no copy)."""
    batch, heads, tokens, dim = x.shape
    pooled = pool_on_grid(x.transpose(1, 2).reshape(batch, tokens, heads * dim), grid, out_grid)
    return pooled.reshape(batch, -1, heads, dim).transpose(1, 2)


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

    def forward(self, x: torch.Tensor, grid: tuple[int, int], residual: bool = False) -> torch.Tensor:
        """DWConv(x), or x + DWConv(x) with `residual`: one conv whose kernel centre has 1 added (the
        same sum, without a second pass over x)."""
        image, lead = tokens_to_grid(x, grid)
        conv = self.conv
        weight = conv.weight
        if residual:
            centre = conv.kernel_size[0] // 2
            weight = weight + F.pad(weight.new_ones(1, 1, 1, 1), (centre,) * 4)   # (C, 1, k, k) + delta
        out = F.conv2d(image.to(weight.dtype), weight, conv.bias, padding=conv.padding, groups=conv.groups)
        return grid_to_tokens(out.to(x.dtype), lead)


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

def key_instance_norm(k: torch.Tensor, eps: float = 1.0, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Instance norm of keys over the tokens, per channel, no affine: (..., N, d) -> (..., N, d); with
    `scale` (broadcastable to (..., 1, d)), the norm of the rescaled keys k * scale, computed as
    (k - mean k) * scale / sqrt(scale^2 var k + eps) (the same value, without a pass to rescale k).

    Softmax ignores an offset shared by all keys; the TTT regression does not, so T^5 removes it.
    Statistics at least in fp32 (fp16 / bf16 upcast, fp64 stays fp64; biased variance, as
    `F.instance_norm`); returned in k's dtype."""
    work = k.to(upcast_dtype(k.dtype))
    centred = work - work.mean(dim=-2, keepdim=True)   # two passes: as exact as var_mean, 1.4x-6x faster on CPU
    var = (centred * centred).mean(dim=-2, keepdim=True)
    if scale is None:
        return (centred * torch.rsqrt(var + eps)).to(k.dtype)
    scale = scale.to(work.dtype)
    return (centred * (scale * torch.rsqrt(scale * scale * var + eps))).to(k.dtype)


def silu_derivative(z: torch.Tensor, sig: torch.Tensor | None = None, silu: torch.Tensor | None = None) -> torch.Tensor:
    """d SiLU(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z))) = sig + SiLU(z) (1 - sig); `sig` = sigmoid(z) and
    `silu` = z sig when the caller has them (two passes then instead of four)."""
    sig = torch.sigmoid(z) if sig is None else sig
    silu = z * sig if silu is None else silu
    return torch.addcmul(sig, silu, 1.0 - sig)


def ttt_inner_step(k: torch.Tensor, v: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float):
    """One closed-form gradient step (lr 1) of the inner model on L = scale/(2N) sum ||f(k_i) - v_i||^2.

    k, v (B, h, N, d); w1, w2 (h, d, d) -> (W1', W2') each (B, h, d, d):

        z = k W1, a = SiLU(z), e = (a W2 - v) * scale / N
        G2 = a^T e,  G1 = k^T ((e W2^T) * SiLU'(z)),  W1' = W1 - G1,  W2' = W2 - G2

    Computed and returned at least in fp32: fp16 / bf16 inputs are upcast, because the update is small
    against W (|G| / |W| ~ 3e-3 at N = 16K with the 0.02 init, below bf16's resolution of W) and e's
    scale / N is below fp16's normal range; fp32 and fp64 inputs compute in their own dtype.
    Also for one head: k, v (B, N, d), w1, w2 (d, d). 4-D k and v are made contiguous once (the heads
    of a projection are a strided view that each 4-D matmul would copy again; a 3-D head view is read in
    place), and e is formed in place (one buffer for a W2 - v and its scaling).
    """
    work = upcast_dtype(k.dtype)
    k, v, w1, w2 = (x.to(work) for x in (k, v, w1, w2))
    if k.dim() > 3:
        k, v = k.contiguous(), v.contiguous()
    z = k @ w1
    sig = torch.sigmoid(z)
    a = z * sig
    e = (a @ w2).sub_(v).mul_(scale / k.shape[-2])
    grad_w2 = a.transpose(-1, -2) @ e
    grad_w1 = k.transpose(-1, -2) @ ((e @ w2.transpose(-1, -2)) * silu_derivative(z, sig, a))
    return w1 - grad_w1, w2 - grad_w2


def ttt_read(q: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The updated inner model applied to the queries: SiLU(q W1') W2'; q (B, h, N, d) -> (B, h, N, d)
    in q's dtype, computed in the wider of q's and W's dtypes (fp16 / bf16 queries read the fp32
    W' of `ttt_inner_step` in fp32, so the update is not rounded away)."""
    work = torch.promote_types(q.dtype, w1.dtype)
    return (F.silu(q.to(work) @ w1.to(work)) @ w2.to(work)).to(q.dtype)


TTT_CPU_CHUNK = 1 << 19  # elements of q per step on the CPU (2 MB fp32: the step's buffers stay in cache; at
                         # DiT-XL's 4096 x 72 one head of one sample a step, 1.8x faster than a sample a step;
                         # at the lab's (64, 4, 1024, 32) one head of 16 samples)


def ttt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """TTT attention: learn the inner model on (k, v) by one step, read it with q. Linear in N
    (about 14 N d^2 flops per head against 4 N^2 d for softmax attention); no N x N matrix.
    q (B, h, N, d); k, v (B, h, M, d); w1, w2 (h, d, d) or (1, d, d) -> (B, h, N, d) in q's layout.
    Keys are used as given (normalise them first with `key_instance_norm`). Samples and heads are
    independent: on the CPU one head of a few samples a step (`TTT_CPU_CHUNK` elements of q; a head of a
    projection is a strided (B, N, d) view the matmuls read in place), elsewhere all at once."""
    batch, heads = q.shape[:2]
    if q.device.type != "cpu":
        return ttt_read(q, *ttt_inner_step(k, v, w1, w2, scale))
    samples = max(1, TTT_CPU_CHUNK // q[0, 0].numel())
    out = torch.empty_like(q)   # q's layout: heads of a projection stay a (B, N, h, d) view, read by merge_heads free
    for head in range(heads):
        inner = [w[0] if w.shape[0] == 1 else w[head] for w in (w1, w2)]
        for i in range(0, batch, samples):
            part = slice(i, i + samples)
            out[part, head] = ttt_read(q[part, head], *ttt_inner_step(k[part, head], v[part, head], *inner, scale))
    return out


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


CONTRAST_CPU_CHUNK = 1 << 18  # logits per step on the CPU (1 MB fp32: a step's logits stay in cache)


def differential_read_norm(q: torch.Tensor, k_pos: torch.Tensor, k_neg: torch.Tensor, v: torch.Tensor, scale: float,
                           lam, weight: torch.Tensor, out: torch.Tensor | None = None,
                           eps: float = 1e-5) -> torch.Tensor:
    """out + rms_norm(differential_attention(q, k_pos, k_neg, v, scale, lam), weight, eps): VCA's stage
    II with its sub-layer norm. q (B, h, N, d); k_pos / k_neg / v (B, h, n, d) with few keys n; weight
    (d,); out (B, h, N, d) or None (zeros). Returns (B, h, N, d) in q's dtype.

    On the CPU without gradients or compile, the sum is written into `out` in place (its storage is
    reused) a few samples of one head at a time, so a step's logits (., N, 2n), probabilities and
    read-out stay in cache: softmax(s q [k+; k-]^T) per half, times [v; -lam v], normalised and added,
    one pass over the output instead of seven (at least fp32). Elsewhere the plain form above."""
    if q.device.type != "cpu" or needs_plain_ops(q, k_pos, k_neg, v, weight, lam, out):
        normed = rms_norm(differential_attention(q, k_pos, k_neg, v, scale, lam), weight, eps)
        return normed if out is None else out + normed
    batch, heads, tokens, dim = q.shape
    num_keys = k_pos.shape[2]
    work = upcast_dtype(q.dtype)
    if out is None:
        out = q.new_zeros(batch, tokens, heads, dim).transpose(1, 2)
    keys = torch.cat([k_pos, k_neg], 2).to(work).transpose(-1, -2) * scale          # s [k+; k-]^T (B, h, d, 2n)
    v = v.to(work)
    values = torch.cat([v, -lam * v], 2)                                            # [v; -lam v]  (B, h, 2n, d)
    weight = weight.to(work)
    step = max(1, min(batch, CONTRAST_CPU_CHUNK // (tokens * 2 * num_keys)))
    for head in range(heads):
        for start in range(0, batch, step):
            rows = slice(start, start + step)
            logits = q[rows, head].to(work) @ keys[rows, head]                        # (b, N, 2n)
            probs = logits.view(-1, tokens, 2, num_keys).softmax(-1).view(-1, tokens, 2 * num_keys)
            read = probs @ values[rows, head]                                         # (b, N, d)
            inv_rms = torch.linalg.vector_norm(read, dim=-1, keepdim=True).square_().div_(dim).add_(eps).rsqrt_()
            out[rows, head].addcmul_(read.mul_(inv_rms), weight)
    return out.to(q.dtype)


# =====================================================================================================
# LINA: division-normalised ReLU linear attention with a KV gate (Wang et al.; SANA's kernel form).
# Shapes per head: q (B, h, N, d); k, v (B, h, M, d); gates broadcastable to (B, h, M, 1).
#
#   phi(x) = ReLU(x) + 1e-6                                      the feature map (strictly positive)
#   k~_j = gk_j phi(k_j),  v~_j = gv_j v_j                         the KV gate (per head, per position)
#   S = (1/M) sum_j k~_j^T v~_j   (d x d),   z = (1/M) sum_j k~_j   the linear memory and its normaliser
#   O_i = phi(q_i) S / (phi(q_i) . z + eps)                        gated_linear_attention (fp32)
#
# Equivalently O_i = sum_j w_ij gv_j v_j / (sum_j w_ij + M eps), w_ij = gk_j phi(q_i) . phi(k_j): a
# weighted average of the gated values; a key gate of 0 at position j removes j exactly.
# =====================================================================================================

LINEAR_FEATURE_EPS = 1e-6


def gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_gate: torch.Tensor | None = None,
                           value_gate: torch.Tensor | None = None, eps: float = 1e-6,
                           residual: torch.Tensor | None = None) -> torch.Tensor:
    """Division-normalised ReLU linear attention with a KV gate, computed at `upcast_dtype(q.dtype)`.

    q (B, h, N, d) and k (B, h, M, d) are raw projections (phi is applied here); v (B, h, M, e);
    key_gate / value_gate broadcastable to (B, h, M, 1) or None (= 1). Returns (B, h, N, e) in q's
    dtype (computed in fp32 for fp16 / bf16 / fp32, in fp64 for fp64), laid out token-major (a
    (B, N, h, e) tensor seen through a transpose, so merging the heads is free). `residual`
    ((B, h, N, e) at the work dtype, or None) is added to the result in place and returned (LINA's
    decoder passes its fresh conv branch: no extra pass, no extra tensor). The memory and normaliser
    are means over the M keys (LINA's form; keeps fp32 sums of 64K tokens well scaled), so `eps` acts
    on the mean: O = phi(q) S / (phi(q) . z + eps). Without gates this is LINA's encoder attention.
    Cost 4 N d e + 2 M d e flops per head (softmax attention: 4 N M d); no N x M matrix.

    Computed without a pass to add phi's 1e-6 or to rescale keys: with X1 = [ReLU(X) | 1] and
    E = [I ; 1e-6 1^T] ((d + 1) x d), phi(X) = X1 E, so
        [S | z] = E^T [K1^T (gk gv v) | K1^T gk] / M
        [num | den] = Q1 (E [S | z]),   O = num / (den + eps)
    where E^T and E act on the small (d + 1) x (e + 1) memory only; gates of 1 give the ungated result
    bit for bit. On the CPU a head at a time (each head's q / k / v are strided views, read in place by
    the matmuls); on other devices all heads at once."""
    dtype = q.dtype
    work = upcast_dtype(dtype)
    q, k, v = q.to(work), k.to(work), v.to(work)
    heads, d, num_keys, e = q.shape[1], q.shape[-1], k.shape[-2], v.shape[-1]
    functional = needs_plain_ops(q, k, v, key_gate, value_gate, residual)
    queries, keys = _relu_and_ones(q, functional), _relu_and_ones(k, functional)   # Q1, K1
    key_weight = _per_head(key_gate, heads, num_keys, q)                                  # gk (.., h, M, 1)
    if value_gate is not None:
        v = v * _per_head(value_gate, heads, num_keys, q)
    if key_gate is not None:
        v = v * key_weight
    if functional:
        head_outputs = []
    else:   # each head written as soon as it is computed, into residual or a new token-major tensor
        out = residual if residual is not None else q.new_empty(q.shape[0], q.shape[2], heads, e).transpose(1, 2)
    for head in ([slice(i, i + 1) for i in range(heads)] if q.device.type == "cpu" else [slice(None)]):
        keys_t = keys[:, head].transpose(-1, -2)
        memory = torch.cat([keys_t @ v[:, head], keys_t @ key_weight[:, head]], -1)      # K1^T [gk gv v | gk]
        memory = (memory[..., :d, :] + LINEAR_FEATURE_EPS * memory[..., d:, :]) / num_keys   # [S | z]
        memory = torch.cat([memory, LINEAR_FEATURE_EPS * memory.sum(-2, keepdim=True)], -2)  # E [S | z]
        both = queries[:, head] @ memory                                       # [num | den]  (.., N, e + 1)
        num, den = both[..., :e], both[..., e:] + eps
        if functional:
            head_outputs.append(num / den)
        elif residual is None:
            torch.div(num, den, out=out[:, head])
        else:
            out[:, head].addcdiv_(num, den)
    if functional:
        out = torch.cat(head_outputs, dim=1)
        out = out if residual is None else residual + out
    return out.to(dtype)


def _relu_and_ones(x: torch.Tensor, functional: bool) -> torch.Tensor:
    """[ReLU(x) | 1]: (B, h, n, d) -> (B, h, n, d + 1), laid out token-major (B, n, h, d + 1)."""
    tokens_major = x.transpose(1, 2)
    if functional:
        return F.pad(F.relu(tokens_major), (0, 1), value=1.0).transpose(1, 2)
    out = x.new_empty(*tokens_major.shape[:-1], x.shape[-1] + 1)
    torch.clamp_min(tokens_major, 0, out=out[..., :-1])
    out[..., -1] = 1
    return out.transpose(1, 2)


def _per_head(gate: torch.Tensor | None, heads: int, tokens: int, like: torch.Tensor) -> torch.Tensor:
    """A gate broadcastable to (B, h, M, 1) (None: ones) as a (B or 1, h, M, 1) view, at like's dtype.
    The ones are a real tensor: an expanded scalar would take another matmul kernel (other rounding)."""
    gate = like.new_ones(1, heads, tokens, 1) if gate is None else gate.to(like.dtype)
    gate = gate.reshape((1,) * (4 - gate.dim()) + tuple(gate.shape))
    return gate.expand(gate.shape[0], heads, tokens, 1)


# =====================================================================================================
# Neighbourhood attention (NAT, Hassani et al.; NATTEN's 2-D `na2d` without dilation), in plain torch.
# Shapes per head: q, k, v (B, h, N, d) with N = H*W tokens row-major on their grid.
#
#   s(i) = clamp(i - K//2, 0, L - K)        window start along an axis of length L (NATTEN's borders:
#                                           shifted inwards, never padded, so every query sees K x K keys)
#   O_ij = sum_{(y, x) in window(i, j)} softmax_(y, x)(scale q_ij . k_yx + rpb[y - i + K-1, x - j + K-1]) v_yx
#
# An axis shorter than K (NATTEN refuses those) has the whole axis as its window.
# =====================================================================================================

NEIGHBORHOOD_TILE = 4           # queries per tile side (4 x 4 tiles: the least wasted logits on CPU)
NEIGHBORHOOD_CPU_CHUNK = 1 << 17  # logits per step on the CPU (512 KB fp32: a chunk's logits stay in a core's L2)


def _neighborhood_axis(length: int, kernel_size: int, tile: int, device):
    """The tiling of one grid axis of `length` positions for windows of `kernel_size`.

    -> queries (n, t): the query index of each tile slot (tiles of t = min(tile, L) queries; slots past
    the axis repeat its last query); keys (n, R): the R = min(t + K' - 1, L) key indices a tile's
    windows cover (K' = min(K, L)); inside (n, t, R): key in the query's window; offsets (n, t, R):
    key - query."""
    kernel = min(kernel_size, length)
    tile = min(tile, length)
    num_tiles = -(-length // tile)
    region = min(tile + kernel - 1, length)
    queries = torch.arange(num_tiles * tile, device=device).clamp(max=length - 1).view(num_tiles, tile)
    starts = (queries - kernel_size // 2).clamp(0, length - kernel)                   # window starts (n, t)
    keys = starts[:, :1].clamp(max=length - region) + torch.arange(region, device=device)
    inside = (keys[:, None, :] >= starts[..., None]) & (keys[:, None, :] < starts[..., None] + kernel)
    return queries, keys, inside, keys[:, None, :] - queries[..., None]


@functools.lru_cache(maxsize=64)
def _neighborhood_layout(height: int, width: int, kernel_size: int, tile: int, device: torch.device,
                         dtype: torch.dtype):
    """What `neighborhood_attention` needs of a grid besides q, k, v; built once per (grid, kernel, tile,
    device, dtype) and reused by every layer and call (it is the same for all of them):

    query_index (Q,) / key_index (K,): token indices in the tile layout (tile (Y, X), then row-major
    inside it); slot (N,): each token's place in the query layout; bias (tiles, per tile, region): 0 inside
    a query's window, -inf outside, in `dtype`; dy (ny, ty, ry) / dx (nx, tx, rx): key - query offsets (for
    a relative position bias). Built outside inference mode, so the tensors also serve autograd later."""
    with torch.inference_mode(False), torch.no_grad():
        qy, ky, in_y, dy = _neighborhood_axis(height, kernel_size, tile, device)
        qx, kx, in_x, dx = _neighborhood_axis(width, kernel_size, tile, device)
        (ny, ty), (nx, tx), ry, rx = qy.shape, qx.shape, ky.shape[1], kx.shape[1]
        num_tiles, per_tile, region = ny * nx, ty * tx, ry * rx
        query_index = (qy[:, None, :, None] * width + qx[None, :, None, :]).reshape(-1)  # (ny, nx, ty, tx)
        key_index = (ky[:, None, :, None] * width + kx[None, :, None, :]).reshape(-1)    # (ny, nx, ry, rx)
        i = torch.arange(height, device=device)[:, None]
        j = torch.arange(width, device=device)[None, :]
        slot = (((i // ty) * nx + j // tx) * per_tile + (i % ty) * tx + j % tx).reshape(-1)  # token -> its slot
        inside = (in_y[:, None, :, None, :, None] & in_x[None, :, None, :, None, :]).reshape(num_tiles, per_tile,
                                                                                           region)
        bias = torch.zeros(inside.shape, dtype=dtype, device=device).masked_fill_(~inside, float("-inf"))
    return query_index, key_index, slot, bias, dy, dx


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int],
                           kernel_size: int, scale: float, rpb: torch.Tensor | None = None,
                           blend_into: torch.Tensor | None = None, weight: float = 1.0) -> torch.Tensor:
    """2-D neighbourhood softmax attention with NATTEN's border semantics (see the section comment).

    q, k, v (B, h, N, d) on the (H, W) grid; `kernel_size` odd; `rpb` None or a relative position bias
    (h, 2K-1, 2K-1), added to the logit of key (y, x) for query (i, j) at [y - i + K-1, x - j + K-1].
    -> (B, h, N, d) in q's dtype. Memory and time linear in N, no N x N matrix: the grid is cut into
    4 x 4 query tiles; each tile gathers the (4 + K - 1)^2 keys / values its windows cover (4x the
    keys for K = 5), and its logits are masked to each query's own K x K window. Logits and softmax
    at least in fp32 (fp16 / bf16 q, k upcast per tile; fp64 stays fp64), probabilities @ v in v's dtype.
    With `blend_into` (B, h, N, d): returns torch.lerp(blend_into, attention, weight), written into
    `blend_into` step by step (in place, no tensor for the attention alone) unless a gradient is needed or
    torch.compile traces."""
    if kernel_size < 1 or kernel_size % 2 != 1:
        raise ValueError(f"neighborhood_attention: kernel_size must be an odd number >= 1, got {kernel_size}")
    height, width = grid
    batch, heads, tokens, dim = q.shape
    if tokens != height * width:
        raise ValueError(f"neighborhood_attention: {tokens} tokens are not a {height} x {width} grid")
    if rpb is not None and tuple(rpb.shape) != (heads, 2 * kernel_size - 1, 2 * kernel_size - 1):
        raise ValueError(f"neighborhood_attention: rpb must be ({heads}, {2 * kernel_size - 1}, "
                         f"{2 * kernel_size - 1}), got {tuple(rpb.shape)}")
    if blend_into is not None and needs_plain_ops(q, k, v, rpb, blend_into):
        return torch.lerp(blend_into, neighborhood_attention(q, k, v, grid, kernel_size, scale, rpb), weight)
    work = upcast_dtype(q.dtype)
    # compiled: traced into the graph (dynamo ignores an lru_cache); eager: built once per grid
    build = _neighborhood_layout.__wrapped__ if torch.compiler.is_compiling() else _neighborhood_layout
    layout = build(height, width, kernel_size, NEIGHBORHOOD_TILE, q.device, work)
    query_index, key_index, slot, bias, dy, dx = layout
    num_tiles, per_tile, region = bias.shape
    if rpb is not None:
        last = kernel_size - 1
        rel = rpb.to(work)[:, (dy + last).clamp(0, 2 * last)[:, None, :, None, :, None],
                           (dx + last).clamp(0, 2 * last)[None, :, None, :, None, :]]  # (h, ny, nx, ty, tx, ry, rx)
        bias = rel.reshape(heads, num_tiles, per_tile, region) + bias

    # q's layout: heads of a projection stay a (B, N, h, d) view, read by merge_heads free
    out = torch.empty_like(q) if blend_into is None else blend_into
    step = max(1, NEIGHBORHOOD_CPU_CHUNK // (num_tiles * per_tile * region)) if q.device.type == "cpu" else heads
    for b in range(batch):
        for start in range(0, heads, step):
            part = slice(start, start + step)   # heads; each gathers its tiles' queries and key / value regions
            qt = q[b, part].index_select(1, query_index).view(-1, num_tiles, per_tile, dim)
            kt = k[b, part].index_select(1, key_index).view(-1, num_tiles, region, dim)
            vt = v[b, part].index_select(1, key_index).view(-1, num_tiles, region, dim)
            chunk_bias = bias if rpb is None else bias[part]
            logits = torch.matmul(qt.to(work), kt.to(work).transpose(-1, -2)).mul_(scale).add_(chunk_bias)  # in place
            weights = logits.softmax(-1).to(v.dtype)
            tokens_out = torch.matmul(weights, vt).view(-1, num_tiles * per_tile, dim).index_select(1, slot)
            if blend_into is None:
                out[b, part] = tokens_out
            else:
                out[b, part].lerp_(tokens_out, weight)
    return out


# =====================================================================================================
# FAAC anchor-frame attention (Li et al., 2023). q, k, v: (videos * frames, h, N, d), frames fastest;
# per frame f, anchor a, weight w, scale s:
#
#   anchor frame:   O_a = softmax(s Q_a K_a^T) V_a                       (the image model's attention)
#   mode "concat":  O_f = softmax(s Q_f [K_f ; K_a]^T + [0 ; log w]) [V_f ; V_a]
#   mode "replace": O_f = (1 - w) softmax(s Q_f K_f^T) V_f + w softmax(s Q_f K_a^T) V_a
# =====================================================================================================

ANCHOR_FRAME_MODES = ("concat", "replace")


def resolve_anchor(anchor: int, num_frames: int) -> int:
    """The anchor's frame index in [0, num_frames) (negative counts from the end)."""
    if not -num_frames <= anchor < num_frames:
        raise ValueError(f"anchor frame {anchor} is outside a video of {num_frames} frames")
    return anchor % num_frames


def anchor_frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, anchor: int,
                           scale: float, mode: str = "concat", weight: float = 1.0) -> torch.Tensor:
    """Anchor-frame attention of whole videos.

    q, k, v: (videos * frames, h, N, d), frames fastest; `anchor` a resolved index in [0, num_frames).
    Returns (videos * frames, h, N, d): the anchor frame's plain self-attention, and for every other
    frame attention over its own and the anchor's keys and values (`mode`, `weight`, as above).
    """
    import math

    if mode not in ANCHOR_FRAME_MODES:
        raise ValueError(f"mode must be one of {ANCHOR_FRAME_MODES}, got {mode!r}")
    batch_frames, heads, tokens, dim = q.shape
    videos = batch_frames // num_frames
    q, k, v = (t.view(videos, num_frames, heads, tokens, dim) for t in (q, k, v))
    k_a, v_a = k[:, anchor], v[:, anchor]                                            # (B, h, N, d)
    out = torch.empty_like(q)
    out[:, anchor] = sdpa(q[:, anchor], k_a, v_a, scale)
    others = [f for f in range(num_frames) if f != anchor]
    if not others:
        return out.view(batch_frames, heads, tokens, dim)
    q_o, k_o, v_o = q[:, others], k[:, others], v[:, others]                           # (B, F-1, h, N, d)
    n_o = len(others)

    if mode == "concat":
        k_cat = torch.cat([k_o, k_a[:, None].expand_as(k_o)], dim=-2).flatten(0, 1)    # (B(F-1), h, 2N, d)
        v_cat = torch.cat([v_o, v_a[:, None].expand_as(v_o)], dim=-2).flatten(0, 1)
        if weight == 1.0:
            o = sdpa(q_o.flatten(0, 1), k_cat, v_cat, scale)
        else:
            bias = torch.zeros(2 * tokens, dtype=q.dtype, device=q.device)
            bias[tokens:] = math.log(weight) if weight > 0 else float("-inf")
            o = F.scaled_dot_product_attention(q_o.flatten(0, 1), k_cat, v_cat, attn_mask=bias[None], scale=scale)
        out[:, others] = o.view(videos, n_o, heads, tokens, dim)
    else:
        # Every other frame's queries read the same anchor keys: one attention per video, (F-1) N queries.
        q_seq = q_o.permute(0, 2, 1, 3, 4).reshape(videos, heads, n_o * tokens, dim)
        from_anchor = sdpa(q_seq, k_a, v_a, scale).view(videos, heads, n_o, tokens, dim).permute(0, 2, 1, 3, 4)
        if weight == 1.0:
            out[:, others] = from_anchor
        else:
            own = sdpa(q_o.flatten(0, 1), k_o.flatten(0, 1), v_o.flatten(0, 1), scale)
            own = own.view(videos, n_o, heads, tokens, dim)
            out[:, others] = own if weight == 0.0 else (1.0 - weight) * own + weight * from_anchor
    return out.view(batch_frames, heads, tokens, dim)
