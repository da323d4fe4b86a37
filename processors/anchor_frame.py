"""FAAC anchor frame for AnimateDiff, training-free (Li et al., 2023, "FAAC: Facial Animation Generation
with Anchor Frame and Conditional Control"): the method `dx.patch(pipe, "anchor_frame")`, whole.

Adding a motion module to a (personalised) text-to-image model costs identity and detail. FAAC keeps
one frame, the anchor `a`, as the image model's own output and lets every other frame's spatial
self-attention read the anchor's keys and values, so identity and detail propagate from it. One
patch does both halves:

- attention (the processor here, kernel `ops.anchor_frame_attention`), on the UNet's spatial
  self-attention (`attn1`, role "self") only; the motion modules' temporal attention is never touched:

    anchor frame:   O_a = softmax(s Q_a K_a^T) V_a                       (the image model's attention)
    mode "concat":  O_f = softmax(s Q_f [K_f ; K_a]^T + [0 ; log w]) [V_f ; V_a]
    mode "replace": O_f = (1 - w) softmax(s Q_f K_f^T) V_f + w softmax(s Q_f K_a^T) V_a

  "concat" adds log w to the logits of the anchor keys: w = 1 is plain concatenation (the paper),
  w = 0 ignores the anchor (stock attention), w > 1 leans on it. "replace" with w = 1 is the paper's
  replacement (every frame reads only the anchor: Text2Video-Zero's cross-frame attention); a w in
  (0, 1) blends the two outputs.
- the method's lifecycle (`attach` / `detach`, hooks from `pipelines/animatediff_anchor/hooks.py`):
  with `image_model_anchor` (default) the motion modules leave the anchor frame unchanged ("ghost"
  motion modules), so the anchor is denoised by the image model alone; when the patched pipeline has
  a `controlnet`, its residuals are zeroed on the anchor (unless `control_anchor`), or, with
  `control_anchor`, a SparseControlNet's own motion modules skip the anchor too. `dx.unpatch` removes
  every hook. A bare UNetMotionModel gets the motion bypass (no pipeline, so no control hooks).

Shapes: spatial layers of UNetMotionModel see (videos * frames, N, C), frames fastest within a
video; the frame count comes from the step tracker (`state.num_frames`, the 5-D sample's frames).
With classifier-free guidance each half of the batch is a video with its own anchor. `steps`
limits the attention; the motion bypass and the control mask act on every step.

Choices: the anchor frame itself gets plain self-attention (concatenating its own keys twice with
weight w gives the same softmax mathematically, at twice the cost); the anchor index may be negative
(Python indexing, -1 = last frame) and is checked against the frame count at run time (and at patch
time when `num_frames` is given); attention masks fall back to stock attention with a warning;
`upcast_attention` computes in fp32.
"""

from __future__ import annotations

import dataclasses

import torch

from diffusers_ext.ops import ANCHOR_FRAME_MODES as MODES
from diffusers_ext.ops import anchor_frame_attention, resolve_anchor
from diffusers_ext.pipelines.animatediff_anchor.hooks import ControlAnchorMask, MotionBypass, motion_modules
from diffusers_ext.processor import PatchProcessor, compute_dtype, project_kv, project_out, project_q, run_self_attention
from diffusers_ext.registry import STEPS, Method, Option, boolean, number, one_of, register_method

MAX_FRAMES = 1024


def _frame_count(value):
    """`None`, or an integer in [1, 1024]"""
    return None if value is None else number(1, MAX_FRAMES, integer=True)(value)


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
    description = ("FAAC anchor frame: the anchor frame skips the motion modules and every other frame's "
                   "spatial self-attention also reads its keys and values (AnimateDiff, training-free)")
    options = (
        dataclasses.replace(STEPS, doc="part of the run where the attention acts (fractions or step indices); "
                            "the motion bypass and the control mask act on every step"),
        Option("anchor", 0, "index of the anchor frame (negative counts from the end: -1 = last)",
               number(-MAX_FRAMES, MAX_FRAMES - 1, integer=True)),
        Option("mode", "concat", "'concat': anchor K/V appended to each frame's own; 'replace': the anchor's "
               "instead of the frame's own (blended by anchor_weight)", one_of(*MODES)),
        Option("anchor_weight", 1.0, "share of the anchor: concat adds log(w) to the anchor logits (0 = stock, "
               "1 = plain concatenation); replace blends (1-w) own + w anchor (w in [0, 1])", number(0.0, 100.0)),
        Option("image_model_anchor", True, "the anchor frame skips the motion modules (FAAC's ghost motion "
               "modules): it is denoised by the image model alone", boolean),
        Option("control_anchor", False, "with a ControlNet on the pipeline, let it act on the anchor frame too "
               "(default: its residuals are zeroed there)", boolean),
        Option("num_frames", None, "frames per video, needed only for a 2-D ControlNet called outside "
               "`animate` (it sees the frames flattened into the batch)", _frame_count),
    )

    def check_options(self, options, family):
        if options["mode"] == "replace" and options["anchor_weight"] > 1.0:
            raise ValueError(f"option `anchor_weight` must be in [0, 1] with mode 'replace'; "
                             f"got {options['anchor_weight']}")
        if options["num_frames"] is not None:
            resolve_anchor(options["anchor"], options["num_frames"])

    def select_sites(self, sites, options, family):
        return [s for s in sites if s.role == "self"]

    def make_processor(self, site, original, patch):
        return AnchorFrameAttnProcessor(original, site, patch.state, patch.options)

    def attach(self, patch):
        """The ghost motion modules on the denoiser and, on a pipeline with a `controlnet`, the anchor's
        control mask (or, with `control_anchor`, a SparseControlNet's motion bypass)."""
        options, anchor = patch.options, patch.options["anchor"]
        hooks = patch.resources["hooks"] = []  # filled as installed: `detach` also undoes a failed attach
        if options["image_model_anchor"]:
            hooks.append(MotionBypass(patch.denoiser, anchor))
        controlnet = getattr(patch.pipeline, "controlnet", None)
        if controlnet is None:
            return
        if not options["control_anchor"]:
            hooks.append(ControlAnchorMask(controlnet, anchor, options["num_frames"]))
        elif options["image_model_anchor"] and motion_modules(controlnet):  # SparseCtrl: its motion skips the anchor
            hooks.append(MotionBypass(controlnet, anchor))

    def detach(self, patch):
        for hooks in patch.resources.pop("hooks", []):
            hooks.remove()
