"""Visual-Contrast Attention for DiT / SiT (Pu et al., "Linear Differential Vision Transformer", NeurIPS 2025).

n contrast tokens (n = 64, an 8 x 8 grid, for generation) come from the queries average-pooled on
the token grid, plus two learned embeddings that split them into a positive and a negative stream:

    T = AdaptiveAvgPool(Q -> sqrt(n) x sqrt(n));  t+ = T + e+,  t- = T + e-          (B, h, n, d)
    Stage I   [v+; v-] = softmax(s [t+; t-] K^T) V
              V^ = (1 - l_init) RMSNorm(v+ - l1 v-)                                   (B, h, n, d)
    Stage II  O = (1 - l_init) RMSNorm(softmax(s Q t+^T) V^ - l2 softmax(s Q t-^T) V^) + DWC3x3(V)
    l = exp(lq1 . lk1) - exp(lq2 . lk2) + l_init,  l_init = 0.8 - 0.6 exp(-0.3 depth)   (Diff Transformer)

Cost ~ 6 n N d per head (three n x N attentions) instead of 2 N^2 d. q / k / v / to_out are the
pretrained ones; new per layer: e+, e- (n x C), lq / lk (two lambdas x two pairs x d), two RMSNorm
gains (d, shared by the heads, as Diff Transformer's sub-layer norm) and the DWC.

Initialisation (our choice, the paper trains from scratch): e+ = e- = 0, so both streams are the
pooled queries and v+ - l v- = (1 - l) v+ whatever l is (l_init < 1); the RMSNorm then removes the
(1 - l) factor and the start is pooled-query agent attention except for the two RMSNorms, which fix
every token's (and every mediator's) RMS per head: that magnitude change is the distance from the
original the design imposes; `tests/test_vca.py` and the benchmark measure it. lq / lk ~ N(0, 0.1) as
in Diff Transformer (zero would freeze them: their gradient is proportional to each other),
RMSNorm gains 1, DWC 0. The RMSNorm loses the output magnitude (measured: a relative error of 15-20
on random DiT-XL/2 weights); with `calibrate=True` (default) the first patched batch sets the stage-II
gain per channel so that the output RMS matches pooled-query agent attention's (data-dependent, done
once and only while the gain is still exactly 1, so trained or loaded gains are never touched). A short distillation (`diffusers_ext.distill`) then learns e+/e-, l and
the gains. The reference code was not readable; the equations follow METHODS.md section 5.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffusers_ext.ops import (GridDepthwiseConv, diff_lambda, differential_attention, differential_read_norm,
                               lambda_init_for_depth, pool_heads_on_grid, rms_norm, sdpa, upcast_dtype)
from diffusers_ext.processor import SelfAttentionProcessor, compute_dtype, frozen, merge_heads, project_kv, \
    project_out, project_q, split_heads
from diffusers_ext.registry import STEPS, Method, Option, boolean, number, register_method


def _square(value):
    """a perfect square integer (4, 16, 64, ...)"""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or math.isqrt(value) ** 2 != value:
        raise ValueError(f"must be a perfect square (4, 16, 64, ...), got {value!r}")
    return value


class VCAAttnProcessor(SelfAttentionProcessor):
    """Visual-contrast attention on one DiT / SiT self-attention layer."""

    label = "VCA"

    def __init__(self, original, site, state, options):
        super().__init__(original, site, state)
        attn = site.module
        heads, dim = attn.heads, attn.inner_dim
        head_dim = dim // heads
        self.num_tokens = options["tokens"]
        self.lambda_init = lambda_init_for_depth(site.depth or 0)
        self.pos_embedding = nn.Parameter(torch.zeros(self.num_tokens, dim))      # e+
        self.neg_embedding = nn.Parameter(torch.zeros(self.num_tokens, dim))      # e-
        # lambda_q / lambda_k: (stage I, II) x (pair 1, 2) x d
        # seeded by depth: reproducible, and patching leaves the global RNG alone
        g = torch.Generator().manual_seed(1_000 + (site.depth or 0))
        self.lambda_q = nn.Parameter(torch.randn(2, 2, head_dim, generator=g) * options["lambda_std"])
        self.lambda_k = nn.Parameter(torch.randn(2, 2, head_dim, generator=g) * options["lambda_std"])
        self.norm1_weight = nn.Parameter(torch.ones(head_dim))
        self.norm2_weight = nn.Parameter(torch.ones(head_dim))
        with torch.random.fork_rng(devices=[]):     # nn.Conv2d's default init draws from the global RNG
            self.dwc = GridDepthwiseConv(dim, 3) if options["dwc"] else None
        self.calibrate = options["calibrate"]
        self._calibrated = False
        self._frozen: dict = {}   # `frozen` values of `_constants`

    @torch.no_grad()
    def _calibrate(self, out: torch.Tensor, reference: torch.Tensor, scale: float) -> None:
        """Once, while the stage-II gain is still at its init (all ones): set it per channel so the
        output RMS matches pooled-query agent attention's (the data-dependent part of the init)."""
        self._calibrated = True
        if not bool((self.norm2_weight == 1).all()):
            return                                   # trained or loaded gains: leave them
        unit = scale * rms_norm(out)
        work = upcast_dtype(reference.dtype)
        ratio = reference.to(work).pow(2).mean((0, 1, 2)).sqrt() / unit.to(work).pow(2).mean((0, 1, 2)).sqrt().clamp_min(1e-12)
        self.norm2_weight.copy_(ratio.to(self.norm2_weight.dtype))

    def lambdas(self) -> tuple[torch.Tensor, torch.Tensor]:
        l1, l2 = (diff_lambda(self.lambda_q[i, 0], self.lambda_k[i, 0], self.lambda_q[i, 1], self.lambda_k[i, 1],
                              self.lambda_init) for i in range(2))
        return l1, l2

    def _constants(self, heads: int, dtype: torch.dtype):
        """(e+, e- (1, h, n, d), l1, l2) in `dtype`: parameters only, so computed once for inference."""
        params = (self.pos_embedding, self.neg_embedding, self.lambda_q, self.lambda_k)

        def compute():
            e_pos, e_neg = (split_heads(e[None].to(dtype), heads) for e in (self.pos_embedding, self.neg_embedding))
            return (e_pos, e_neg, *(lam.to(dtype) for lam in self.lambdas()))

        return frozen(self._frozen, (heads, dtype), params, compute)

    def attend(self, attn, x: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, _ = x.shape
        grid = self.grid_of(num_tokens)
        side = math.isqrt(self.num_tokens)
        if side > min(grid):
            raise ValueError(f"{self.num_tokens} contrast tokens ({side} x {side}) do not fit the "
                             f"{grid[0]} x {grid[1]} token grid at {self.site_name}")
        dtype = compute_dtype(attn, x.dtype)
        q = project_q(attn, x).to(dtype)
        k, v = (t.to(dtype) for t in project_kv(attn, x))
        pooled = pool_heads_on_grid(q, grid, (side, side))                        # (B, h, n, d)
        e_pos, e_neg, l1, l2 = self._constants(attn.heads, dtype)
        t_pos, t_neg = pooled + e_pos, pooled + e_neg
        scale = 1.0 - self.lambda_init

        gathered = sdpa(torch.cat([t_pos, t_neg], dim=2), k, v, attn.scale)       # stage I
        v_pos, v_neg = gathered.split(self.num_tokens, dim=2)
        v_hat = scale * rms_norm(v_pos - l1 * v_neg, self.norm1_weight)
        if self.calibrate and not self._calibrated:
            out = differential_attention(q, t_pos, t_neg, v_hat, attn.scale, l2)
            self._calibrate(out, sdpa(q, pooled, v_pos, attn.scale), scale)
        local = split_heads(self.dwc(merge_heads(v), grid), attn.heads) if self.dwc is not None else None
        # stage II, normalised, + DWC(V) (written into the conv's new output)
        out = differential_read_norm(q, t_pos, t_neg, v_hat, attn.scale, l2, scale * self.norm2_weight, local)
        return project_out(attn, out, x.dtype)


@register_method
class VCAMethod(Method):
    name = "vca"
    families = ("dit",)
    training_free = False
    inherits_projections = True     # the papers train the whole network with the new parts
    description = "Visual-contrast attention (linear differential attention) on DiT / SiT; needs a short fine-tune"
    options = (
        STEPS,
        Option("tokens", 64, "number of contrast tokens per stream (a perfect square; 8 x 8 in the paper)", _square),
        Option("dwc", True, "depthwise 3x3 conv on V (zero-initialised)", boolean),
        Option("calibrate", True, "set the stage-II RMSNorm gain from the first batch (while still at init) so "
               "the output RMS matches pooled-query attention", boolean),
        Option("lambda_std", 0.1, "init std of the lambda re-parameterisation vectors", number(0.0, 1.0)),
    )

    def select_sites(self, sites, options, family):
        return [s for s in sites if s.role == "self"]

    def make_processor(self, site, original, patch):
        return VCAAttnProcessor(original, site, patch.state, patch.options)
