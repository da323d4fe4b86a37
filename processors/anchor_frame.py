"""FAAC anchor-frame attention for AnimateDiff, training-free (Li et al., 2023, "FAAC: Facial Animation
Generation with Anchor Frame and Conditional Control").

Adding a motion module to a (personalised) text-to-image model costs identity and detail. FAAC keeps
one frame, the anchor `a`, as the image model's own output and lets every other frame's spatial
self-attention read the anchor's keys and values, so identity and detail propagate from it. With
per-frame queries Q_f, keys K_f, values V_f (each (h, N, d) for N pixels) and weight w:

    anchor frame:   O_a = softmax(s Q_a K_a^T) V_a                       (the image model's attention)
    mode "concat":  O_f = softmax(s Q_f [K_f ; K_a]^T + [0 ; log w]) [V_f ; V_a]
    mode "replace": O_f = (1 - w) softmax(s Q_f K_f^T) V_f + w softmax(s Q_f K_a^T) V_a

"concat" adds log w to the logits of the anchor keys: w = 1 is plain concatenation (the paper),
w = 0 ignores the anchor (stock attention), w > 1 leans on it. "replace" with w = 1 is the paper's
replacement (every frame reads only the anchor: Text2Video-Zero's cross-frame attention); a w in
(0, 1) blends the two outputs. Installed on the UNet's spatial self-attention (`attn1`, role "self")
only; the motion modules' temporal attention is never touched.

Shapes: spatial layers of UNetMotionModel see (videos * frames, N, C), frames fastest within a
video; the frame count comes from the step tracker (`state.num_frames`, the 5-D sample's frames).
With classifier-free guidance each half of the batch is a video with its own anchor.

The other half of FAAC, the anchor frame denoised by the image model alone (the motion modules
leave it unchanged), is not an attention processor: `diffusers_ext.pipelines.animatediff_anchor`
wraps the motion modules for that (`enable_anchor_frame`, `animate`). `dx.patch(pipe,
"anchor_frame")` alone installs the attention half.

Choices: the anchor frame itself gets plain self-attention (concatenating its own keys twice with
weight w gives the same softmax mathematically, at twice the cost); the anchor index may be negative
(Python indexing, -1 = last frame) and is checked against the frame count at run time; attention
masks fall back to stock attention with a warning; `upcast_attention` computes in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffusers_ext.ops import sdpa
from diffusers_ext.processor import PatchProcessor, compute_dtype, project_kv, project_out, project_q, run_self_attention
from diffusers_ext.registry import STEPS, Method, Option, number, one_of, register_method

MODES = ("concat", "replace")


def resolve_anchor(anchor: int, num_frames: int) -> int:
    """The anchor's frame index in [0, num_frames) (negative counts from the end)."""
    if not -num_frames <= anchor < num_frames:
        raise ValueError(f"anchor frame {anchor} is outside a video of {num_frames} frames")
    return anchor % num_frames


def anchor_frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, anchor: int,
                           scale: float, mode: str = "concat", weight: float = 1.0) -> torch.Tensor:
    """Anchor-frame attention of whole videos.

    q, k, v: (videos * frames, h, N, d), frames fastest. Returns (videos * frames, h, N, d): the anchor
    frame's plain self-attention, and for every other frame attention over its own and the anchor's
    keys and values, as in the module docstring (`mode`, `weight`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
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


class AnchorFrameAttnProcessor(PatchProcessor):
    """FAAC anchor-frame attention on one spatial self-attention layer of an AnimateDiff UNet."""

    def __init__(self, original, site, state, options):
        super().__init__(original, site, state)
        self.anchor = options["anchor"]
        self.mode = options["mode"]
        self.anchor_weight = float(options["anchor_weight"])

    def patched(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        if encoder_hidden_states is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 reason="anchor-frame attention replaces self-attention only, got encoder states")
        if attention_mask is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 reason="anchor-frame attention does not take attention masks")
        frames = self.state.num_frames
        if frames is None:
            raise ValueError(
                f"anchor-frame attention at {self.site_name}: the number of frames is unknown (the denoiser "
                "was not called with a 5-D (batch, channels, frames, height, width) sample)"
            )
        resolve_anchor(self.anchor, frames)  # a clear error before any work
        if frames == 1:  # a single frame is its own anchor: plain self-attention
            return self.fallback(attn, hidden_states, None, None, temb)
        if hidden_states.shape[0] % frames:
            raise ValueError(f"anchor-frame attention at {self.site_name}: batch {hidden_states.shape[0]} "
                             f"is not a whole number of {frames}-frame videos")
        return run_self_attention(attn, hidden_states, temb, lambda x: self.attend(attn, x, frames))

    def attend(self, attn, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x (videos * frames, N, C) -> attention output after `to_out` (videos * frames, N, C_out)."""
        dtype = compute_dtype(attn, x.dtype)
        q = project_q(attn, x).to(dtype)
        k, v = (t.to(dtype) for t in project_kv(attn, x))
        out = anchor_frame_attention(q, k, v, frames, resolve_anchor(self.anchor, frames), attn.scale,
                                     self.mode, self.anchor_weight)
        return project_out(attn, out, x.dtype)


@register_method
class AnchorFrameMethod(Method):
    name = "anchor_frame"
    families = ("animatediff",)
    training_free = True
    description = ("FAAC anchor frame: every frame's spatial self-attention also reads the anchor frame's "
                   "keys and values (AnimateDiff, training-free)")
    options = (
        STEPS,
        Option("anchor", 0, "index of the anchor frame (negative counts from the end: -1 = last)",
               number(-1024, 1023, integer=True)),
        Option("mode", "concat", "'concat': anchor K/V appended to each frame's own; 'replace': the anchor's "
               "instead of the frame's own (blended by anchor_weight)", one_of(*MODES)),
        Option("anchor_weight", 1.0, "share of the anchor: concat adds log(w) to the anchor logits (0 = stock, "
               "1 = plain concatenation); replace blends (1-w) own + w anchor (w in [0, 1])", number(0.0, 100.0)),
    )

    def check_options(self, options, family):
        if options["mode"] == "replace" and options["anchor_weight"] > 1.0:
            raise ValueError(f"option `anchor_weight` must be in [0, 1] with mode 'replace'; "
                             f"got {options['anchor_weight']}")

    def select_sites(self, sites, options, family):
        return [s for s in sites if s.role == "self"]

    def make_processor(self, site, original, patch):
        return AnchorFrameAttnProcessor(original, site, patch.state, patch.options)
