"""T^5: attention linearised by test-time training (Li, Han et al., "Linearizing Vision Transformer
with Test-Time Training"). SD3 / SD3.5 joint attention and DiT self-attention; needs a short
fine-tune (`diffusers-ext distill`), then `dx.patch(pipe, "t5", weights=FOLDER)`.

Per head, with the inherited projections q, k, v (and the module's q/k RMS norms on SD3.5), the
released DiT5 block (`MixedAttention` in LeapLabTHU/Transformer-to-TTT, DiT5/models.py), the default
`local="neighborhood"`:

    o_local = NA_5x5(q, k, v)                              neighbourhood softmax attention, scale d^-1/2,
                                                           NATTEN borders, no position bias (as released)
    q~ = q * a_q + b_q,  k~ = k * a_k                      learned per-channel rescaling (init 1 and 0)
    k~ <- (k~ - mean_N k~) / sqrt(var_N k~ + 1)            key instance norm (no affine)
    q~ <- q~ + DWConv3x3(q~),  k~ <- k~ + DWConv3x3(k~)    on the image grid
    f(x) = SiLU(x W1) W2                                   W1, W2 (d x d) new
    W' = W - grad_W  s/(2N) sum_i ||f(k~_i) - v_i||^2      one closed-form step (`ops.ttt_inner_step`)
    o_ttt = SiLU(q~ W1') W2'
    o = 0.5 o_local + 0.5 o_ttt                             a fixed blend (the release has no blend weights)

then the inherited output projection. `local="none"` is the TTT branch alone (the release's
`TTTAttention`, without the rescaling): o = o_ttt with q~ = q, k~ = k. The release also has a key
offset b_k; the instance norm subtracts it again exactly, so it is left out here.

Cost is linear in the number of tokens. New parameters per converted layer: 2 h d^2 + 2 * 10 C,
plus 3 C for the rescaling with the local branch.

Choices (options; measured in docs/t5.md):
- `local`: "neighborhood" (the release, default) or "none"; `local_kernel`: its window side (5).
- `text_tokens` (SD3 joint attention): "ttt" - text keys/values join the image tokens in the inner
  step and text queries read the updated inner model too (everything linear); "softmax" - text
  keys/values join the inner step for the image queries, but the few text queries keep exact
  softmax attention over all keys (cost 4 M N d for M ~ 333 text tokens: still linear in N), so
  the text stream is unchanged at the start. Image and text keys are instance-normalised
  separately (their projections differ, so do their offsets). The grid convs, the rescaling and the
  local branch see image tokens only (the local branch attends image to image on the grid; text
  tokens are handled as without it).
- `blocks`: which transformer blocks convert ("all" or block indices); `dual_attention`: whether
  the extra image self-attention (`attn2`) of SD3.5's dual-attention blocks converts too.
- Start: W1, W2 ~ `trunc_normal_(std=0.02)` with torch's default absolute bounds +-2, as released
  (+-100 sigma: effectively untruncated). The rescaling starts at the identity (as released), so q and
  k start exactly as inherited; the convs are zero-initialised by default (the release uses torch's
  default conv init, `conv_init="default"`), so the TTT branch starts as inherited too. The small inner
  init makes o_ttt small, so a converted layer starts near 0.5 o_local (+ the projection's bias): the
  released blend is fixed at 0.5 and has no parameter to start nearer the inherited attention.
Not included: dilation of the local branch (the release uses 1). Attention masks fall back to stock
attention with a warning (stock SD3 ignores them).
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ext.ops import (
    GridDepthwiseConv, key_instance_norm, neighborhood_attention, sdpa, ttt_attention, ttt_inner_step, ttt_read,
)
from diffusers_ext.joint import BLOCKS, DUAL_ATTENTION, JointAttentionMethod, JointAttentionProcessor
from diffusers_ext.processor import (
    compute_dtype, merge_heads, project_kv, project_out, project_q, project_text, project_text_out, split_heads,
)
from diffusers_ext.registry import STEPS, Option, number, one_of, register_method

KEY_NORM_EPS = 1.0
LOCAL_WEIGHT = 0.5  # the release's blend: 0.5 neighbourhood attention + 0.5 TTT


class TTTAttnProcessor(JointAttentionProcessor):
    """T^5 attention on one SD3 joint-attention or image self-attention layer."""

    label = "T^5"

    def __init__(self, original, site, state, options):
        super().__init__(original, site, state)
        attn = site.module
        inner_dim = self.inner_dim
        self.text_tokens = options["text_tokens"]
        self.local = options["local"]
        self.kernel_size = options["local_kernel"]
        weight = attn.to_q.weight
        d, h = self.head_dim, self.heads
        factory = dict(device=weight.device, dtype=weight.dtype)
        std = options["inner_init_std"]
        self.w1 = nn.Parameter(nn.init.trunc_normal_(torch.empty(h, d, d), std=std).to(**factory))
        self.w2 = nn.Parameter(nn.init.trunc_normal_(torch.empty(h, d, d), std=std).to(**factory))
        zero = options["conv_init"] == "zero"
        self.q_conv = GridDepthwiseConv(inner_dim, 3, zero_init=zero).to(**factory)
        self.k_conv = GridDepthwiseConv(inner_dim, 3, zero_init=zero).to(**factory)
        if self.local != "none":  # the TTT branch's q / k rescaling, per channel: (h, 1, d)
            self.q_scale = nn.Parameter(torch.ones(h, 1, d, **factory))
            self.q_offset = nn.Parameter(torch.zeros(h, 1, d, **factory))
            self.k_scale = nn.Parameter(torch.ones(h, 1, d, **factory))

    # --- the pieces -----------------------------------------------------------------------------------

    def _conv_residual(self, conv: GridDepthwiseConv, x: torch.Tensor, grid) -> torch.Tensor:
        """x + DWConv3x3(x) on the grid; x (B, h, N, d)."""
        return split_heads(conv(merge_heads(x), grid, residual=True), self.heads)

    def _image_qk(self, q, k, grid):
        """The TTT branch's image queries and keys: rescaled (with the local branch), keys
        instance-normalised, then the residual grid convs on both."""
        k_scale = None
        if self.local != "none":
            q = torch.addcmul(self.q_offset.to(q.dtype), q, self.q_scale.to(q.dtype))   # q a_q + b_q, one pass
            k_scale = self.k_scale   # k a_k: folded into the norm
        k = key_instance_norm(k, KEY_NORM_EPS, k_scale)
        return self._conv_residual(self.q_conv, q, grid), self._conv_residual(self.k_conv, k, grid)

    def _inner(self, dtype):
        return self.w1.to(dtype), self.w2.to(dtype)

    def _blend(self, out_ttt, q, k, v, grid, scale):
        """Image tokens' output: the TTT branch, blended with neighbourhood attention of the inherited
        q, k, v (B, h, N, d) on the grid unless `local="none"`."""
        if self.local == "none":
            return out_ttt
        # LOCAL_WEIGHT local + (1 - LOCAL_WEIGHT) o_ttt, blended into o_ttt (a new tensor) as it is computed
        return neighborhood_attention(q, k, v, grid, self.kernel_size, scale, blend_into=out_ttt, weight=LOCAL_WEIGHT)

    # --- forward ---------------------------------------------------------------------------------------

    def self_attend(self, attn, x: torch.Tensor) -> torch.Tensor:
        """Image self-attention: x (B, N, C) on the grid -> (B, N, C_out) after `to_out`."""
        grid = self.grid_of(x.shape[1])
        dtype = compute_dtype(attn, x.dtype)
        q = project_q(attn, x).to(dtype)
        k, v = (t.to(dtype) for t in project_kv(attn, x))
        q_ttt, k_ttt = self._image_qk(q, k, grid)
        out = ttt_attention(q_ttt, k_ttt, v, *self._inner(dtype), attn.scale)
        return project_out(attn, self._blend(out, q, k, v, grid, attn.scale), x.dtype)

    def joint_attend(self, attn, x: torch.Tensor, c: torch.Tensor):
        """SD3 joint attention: image tokens x (B, N, C), text tokens c (B, M, C_text) ->
        (image output (B, N, C), text output (B, M, C_text) or, with `context_pre_only`, unprojected)."""
        grid = self.grid_of(x.shape[1])
        dtype = compute_dtype(attn, x.dtype)
        q = project_q(attn, x).to(dtype)
        k, v = (t.to(dtype) for t in project_kv(attn, x))
        q_text, k_text, v_text = (t.to(dtype) for t in project_text(attn, c))

        q_img, k_img = self._image_qk(q, k, grid)
        keys = torch.cat([k_img, key_instance_norm(k_text, KEY_NORM_EPS)], dim=2)
        values = torch.cat([v, v_text], dim=2)
        w1, w2 = ttt_inner_step(keys, values, *self._inner(dtype), attn.scale)
        num_image = x.shape[1]
        if self.text_tokens == "ttt":
            out = ttt_read(torch.cat([q_img, q_text], dim=2), w1, w2)
            out_image, out_text = out[:, :, :num_image], out[:, :, num_image:]
        elif attn.context_pre_only:  # the last block discards its text output: skip the softmax
            out_image, out_text = ttt_read(q_img, w1, w2), torch.zeros_like(q_text)
        else:  # exact softmax rows for the text queries over all (inherited, unnormalised) keys
            out_image = ttt_read(q_img, w1, w2)
            out_text = sdpa(q_text, torch.cat([k, k_text], dim=2), values, attn.scale)
        out_image = self._blend(out_image, q, k, v, grid, attn.scale)
        return project_out(attn, out_image, x.dtype), project_text_out(attn, out_text, c.dtype)


def _odd(value):
    """an odd integer (the window has a centre)"""
    if value % 2 != 1:
        raise ValueError(f"must be odd, got {value}")
    return value


@register_method
class T5Method(JointAttentionMethod):
    name = "t5"
    description = ("T^5: attention linearised by one closed-form test-time-training step, blended with 5x5 "
                   "neighbourhood attention as released (SD3/SD3.5 joint attention, DiT self-attention; "
                   "needs a short fine-tune)")
    saved_defaults = {"local": "none"}   # folders saved before `local` existed are TTT-only
    options = (
        STEPS,
        BLOCKS,
        DUAL_ATTENTION,
        Option("local", "neighborhood",
               "the released DiT5 mixed attention, 0.5 neighbourhood softmax + 0.5 TTT with learned q/k "
               "rescaling ('neighborhood'), or the TTT branch alone ('none')",
               one_of("neighborhood", "none")),
        Option("local_kernel", 5, "window side of the neighbourhood attention, odd (release: 5)",
               number(1, 63, integer=True)),
        Option("text_tokens", "softmax",
               "SD3 text queries: 'softmax' (exact attention over all keys, linear in image tokens) or 'ttt'",
               one_of("softmax", "ttt")),
        Option("inner_init_std", 0.02, "init std of the inner weights W1, W2 (paper: 0.02)",
               number(0.0, 1.0, low_open=True)),
        Option("conv_init", "zero", "init of the q/k depthwise convs: 'zero' (start as inherited) or torch 'default'",
               one_of("zero", "default")),
    )

    def check_options(self, options, family):
        try:
            _odd(options["local_kernel"])
        except ValueError as err:
            raise ValueError(f"option `local_kernel`: {err}") from None

    def make_processor(self, site, original, patch):
        return TTTAttnProcessor(original, site, patch.state, patch.options)
