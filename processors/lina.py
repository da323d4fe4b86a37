"""LINA: linear attention with a KV gate (Wang et al.), as a conversion of a pretrained DiT / SiT or
SD3 / SD3.5 model; needs a short fine-tune (`diffusers-ext distill MODEL lina`), then
`dx.patch(pipe, "lina", weights=FOLDER)`.

Per head, with the inherited projections q, k, v (and SD3.5's q/k RMS norms), computed at
`ops.upcast_dtype` of the input (fp32 for fp16 / bf16 / fp32, fp64 for fp64), returned in its dtype:

    phi(x) = ReLU(x) + 1e-6
    encoder block:  O_i = phi(q_i) mean_j(phi(k_j)^T v_j) / (phi(q_i) . mean_j phi(k_j) + eps);  out = to_out(O)
    decoder block:  k~_j = gk_j phi(k_j),  v~_j = gv_j v_j       KV gate: new, per head and token position, init 1
                    O_i = phi(q_i) mean_j(k~_j^T v~_j) / (phi(q_i) . mean_j k~_j + eps)   (`ops.gated_linear_attention`)
                    out = to_out(O + DWConv5x5(x))               locality conv on the image grid, new, zero-init

`layout="released"` (default) is LINA's released model
(`diffnext/models/vision_transformer_linear_decouple1_kvscale1_high_res.py`): blocks with index
< num_blocks // 2 of the model (its `depth // 2`; an odd count gives the decoder half the extra
block) are encoder blocks, without gate or conv, and have no new parameters; the others are decoder
blocks. `layout="gated"`: every block is a decoder block. Block
indices are the model's (`site.depth`), also when `blocks=` converts a subset.

As in LINA's code the key and value gates are two parameters (1 x h x N x 1), the normaliser uses
the gated keys (so a key gate of 0 removes a position exactly), and the depthwise conv reads the
layer's input tokens x (`conv_on="input"`; "value" convolves v instead). The conversion starts at
plain linear attention + 0: the conv is zero-initialised and the gates are 1. No RoPE: the released
configurations run without it (`rotary_pos_embed` false) and DiT / SD3 carry absolute positions.

Resolution: the gates belong to the token grid they were trained on (`gate_grid`, default the
model's native grid `sample_size / patch_size`, saved with the weights). At another grid they are
bilinearly interpolated (`gate_resize="interpolate"`, default) or dropped (`"reset"`: gates of 1).

SD3 joint attention (`text_tokens`, `text_gate_tokens`): text keys / values enter the same linear
memory as the image tokens, with their own per-position gates over the first `text_gate_tokens`
text positions (default 333 = 77 CLIP + 256 T5 tokens of the SD3 pipelines; later positions get 1,
as LINA gates its condition tokens). Text queries read the same memory ("linear", default: the whole
layer is linear), or keep exact softmax over all keys ("softmax": cost 4 M N d for M text queries,
more than the linear core at d = 64; the text stream then starts unchanged). The conv sees image
tokens only. Attention masks fall back to stock attention with a warning (stock SD3 ignores them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusers_ext.ops import GridDepthwiseConv, gated_linear_attention, sdpa, upcast_dtype
from diffusers_ext.families import family_of
from diffusers_ext.joint import BLOCKS, DUAL_ATTENTION, JointAttentionMethod, JointAttentionProcessor
from diffusers_ext.processor import frozen, merge_heads, project_kv, project_out, project_q, project_text, \
    project_text_out, split_heads
from diffusers_ext.registry import STEPS, Option, number, one_of, register_method

LAYOUTS = ("released", "gated")
GATE_PARAMETERS = ("key_gate", "value_gate", "text_key_gate", "text_value_gate")


def _grid_or_auto(value):
    """`None` (the model's native token grid) or a (height, width) pair of positive integers"""
    if value is None or value == "auto":
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"expected None or a (height, width) pair, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        raise ValueError(f"expected two positive integers, got {value!r}")
    return tuple(value)


def _odd_kernel(value):
    """an odd integer in [1, 31]"""
    value = number(1, 31, integer=True)(value)
    if value % 2 != 1:
        raise ValueError(f"must be odd, got {value}")
    return value


def resize_gate(gate: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a per-position gate on its token grid: (1, h, H*W, 1) -> (1, h, H'*W', 1).
    align_corners=False, at `upcast_dtype` of the gate (a gate already at `new_grid` is returned as is)."""
    if tuple(grid) == tuple(new_grid):
        return gate
    heads = gate.shape[1]
    image = gate.reshape(1, heads, *grid)
    image = F.interpolate(image.to(upcast_dtype(gate.dtype)), size=tuple(new_grid), mode="bilinear",
                          align_corners=False)
    return image.reshape(1, heads, -1, 1).to(gate.dtype)


def encoder_blocks(layout: str, denoiser) -> int:
    """How many leading blocks of `denoiser` are LINA encoder blocks (no gate, no conv): half its
    transformer blocks rounded down for "released" (LINA's `depth // 2`), none for "gated"."""
    if layout == "gated":
        return 0
    num_blocks = 1 + max(site.depth for site in family_of(denoiser).find_sites(denoiser))
    return num_blocks // 2


def fit_sequence_gate(gate: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """A per-position gate over a token sequence, cut or padded with 1 to `length` positions."""
    if gate is None:
        return None
    have = gate.shape[2]
    if length <= have:
        return gate[:, :, :length]
    return torch.cat([gate, gate.new_ones(1, gate.shape[1], length - have, 1)], dim=2)


class LinaAttnProcessor(JointAttentionProcessor):
    """LINA attention on one SD3 joint-attention or image self-attention layer, an encoder block
    (`decoder=False`: plain linear attention, no parameters) or a decoder block.

    A decoder block's new parameters: `conv` (depthwise k x k on the grid), `key_gate` / `value_gate`
    (1, h, H*W, 1) on the gate grid, and for joint attention `text_key_gate` / `text_value_gate`
    (1, h, T, 1). The gates are created by `build_gates` (the method calls it once the model's native
    grid is known)."""

    label = "LINA"

    def __init__(self, original, site, state, options, decoder: bool = True):
        super().__init__(original, site, state)
        attn = site.module
        inner_dim = self.inner_dim
        self.decoder = decoder
        self.text_tokens = options["text_tokens"]
        self.gate_resize = options["gate_resize"]
        self.conv_on = options["conv_on"]
        self.eps = options["eps"]
        self.joint = site.role == "joint"
        self.gate_grid: tuple[int, int] | None = None
        self._text_gate_tokens = options["text_gate_tokens"] if self.joint and decoder else 0
        self._frozen: dict = {}   # `frozen` gates of `_gates`
        if not decoder:
            return
        if self.conv_on == "input" and attn.to_q.in_features != inner_dim:
            raise ValueError(f"LINA at {site.name}: conv_on='input' needs the attention input width "
                             f"({attn.to_q.in_features}) to equal its inner width ({inner_dim}); use conv_on='value'")
        weight = attn.to_q.weight
        self.conv = GridDepthwiseConv(inner_dim, options["conv_kernel"]).to(device=weight.device, dtype=weight.dtype)

    def build_gates(self, grid: tuple[int, int]) -> None:
        """Create the gates (all ones) for the image token grid `grid` (and the text positions)."""
        factory = dict(device=self.conv.conv.weight.device, dtype=self.conv.conv.weight.dtype)
        self.gate_grid = tuple(grid)
        self.key_gate = nn.Parameter(torch.ones(1, self.heads, grid[0] * grid[1], 1, **factory))
        self.value_gate = nn.Parameter(torch.ones(1, self.heads, grid[0] * grid[1], 1, **factory))
        if self._text_gate_tokens:
            self.text_key_gate = nn.Parameter(torch.ones(1, self.heads, self._text_gate_tokens, 1, **factory))
            self.text_value_gate = nn.Parameter(torch.ones(1, self.heads, self._text_gate_tokens, 1, **factory))

    # --- the pieces -----------------------------------------------------------------------------------

    def image_gates(self, grid: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(key gate, value gate) (1, h, H*W, 1) for the image grid `grid`, or (None, None) = 1."""
        if self.gate_grid is None:
            raise RuntimeError(f"LINA at {self.site_name}: gates not built (patch through `dx.patch`)")
        if tuple(grid) == self.gate_grid:
            return self.key_gate, self.value_gate
        if self.gate_resize == "reset":
            return None, None
        return resize_gate(self.key_gate, self.gate_grid, grid), resize_gate(self.value_gate, self.gate_grid, grid)

    def text_gates(self, length: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self._text_gate_tokens:
            return None, None
        return fit_sequence_gate(self.text_key_gate, length), fit_sequence_gate(self.text_value_gate, length)

    def _gates(self, grid: tuple[int, int], num_text: int | None = None):
        """(key gate, value gate) of a decoder block: the image gates on `grid`, joined with the text gates
        over `num_text` positions for joint attention; (1, h, N [+ M], 1) or None (= 1). Parameters only,
        so inference computes them once per shape (`frozen`)."""

        def compute():
            image = self.image_gates(grid)
            if num_text is None:
                return image
            text = self.text_gates(num_text)
            return tuple(_join(i, t, grid[0] * grid[1], num_text, self.heads) for i, t in zip(image, text))

        params = [p for p in (getattr(self, name, None) for name in GATE_PARAMETERS) if p is not None]
        return frozen(self._frozen, (tuple(grid), num_text), params, compute)

    def _local(self, x: torch.Tensor, v: torch.Tensor, grid, dtype: torch.dtype) -> torch.Tensor:
        """DWConv on the grid of the input tokens x (B, N, C) or of the values v (B, h, N, d) -> (B, h, N, d)
        in `dtype`."""
        source = x if self.conv_on == "input" else merge_heads(v)
        return split_heads(self.conv(source, grid), self.heads).to(dtype)

    # --- forward ---------------------------------------------------------------------------------------

    def self_attend(self, attn, x: torch.Tensor) -> torch.Tensor:
        """Image self-attention: x (B, N, C) -> (B, N, C_out) after `to_out` (a decoder block: on the grid)."""
        work = upcast_dtype(x.dtype)
        q = project_q(attn, x)
        k, v = project_kv(attn, x)
        if not self.decoder:
            return project_out(attn, gated_linear_attention(q.to(work), k, v, eps=self.eps), x.dtype)
        grid = self.grid_of(x.shape[1])
        local = self._local(x, v, grid, work)   # a new tensor: the attention is added into it
        out = gated_linear_attention(q.to(work), k, v, *self._gates(grid), eps=self.eps, residual=local)
        return project_out(attn, out, x.dtype)

    def joint_attend(self, attn, x: torch.Tensor, c: torch.Tensor):
        """SD3 joint attention: image tokens x (B, N, C), text tokens c (B, M, C_text) ->
        (image output (B, N, C), text output (B, M, C_text) or, with `context_pre_only`, unprojected)."""
        work = upcast_dtype(x.dtype)
        num_image, num_text = x.shape[1], c.shape[1]
        q = project_q(attn, x)
        k, v = project_kv(attn, x)
        q_text, k_text, v_text = project_text(attn, c)
        keys, values = torch.cat([k, k_text.to(k.dtype)], dim=2), torch.cat([v, v_text.to(v.dtype)], dim=2)
        key_gate = value_gate = None
        if self.decoder:
            grid = self.grid_of(num_image)
            key_gate, value_gate = self._gates(grid, num_text)

        read_text = self.text_tokens == "linear" and not attn.context_pre_only
        queries = torch.cat([q, q_text.to(q.dtype)], dim=2) if read_text else q
        out = gated_linear_attention(queries.to(work), keys, values, key_gate, value_gate, eps=self.eps)
        out_image = out[:, :, :num_image]
        if self.decoder:
            out_image = out_image + self._local(x, v, grid, work)
        if read_text:
            out_text = out[:, :, num_image:]
        elif attn.context_pre_only:  # the last block discards its text output
            out_text = torch.zeros_like(q_text)
        else:  # exact (ungated) softmax rows for the text queries over all keys
            out_text = sdpa(q_text, keys.to(q_text.dtype), values.to(q_text.dtype), attn.scale)

        return project_out(attn, out_image, x.dtype), project_text_out(attn, out_text, c.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {'decoder' if self.decoder else 'encoder'} block"


def _join(image_gate, text_gate, num_image: int, num_text: int, heads: int):
    """One gate over [image tokens, text tokens]; a missing part is 1; both missing -> None."""
    if image_gate is None and text_gate is None:
        return None
    like = image_gate if image_gate is not None else text_gate
    ones = lambda n: like.new_ones(1, heads, n, 1)  # noqa: E731
    return torch.cat([image_gate if image_gate is not None else ones(num_image),
                      text_gate if text_gate is not None else ones(num_text)], dim=2)


@register_method
class LinaMethod(JointAttentionMethod):
    name = "lina"
    description = ("LINA: division-normalised ReLU linear attention with a learnable KV gate and a depthwise "
                   "conv (SD3/SD3.5 joint attention, DiT/SiT self-attention; needs a short fine-tune)")
    saved_defaults = {"layout": "gated"}   # folders saved before `layout` existed gated every block
    options = (
        STEPS,
        BLOCKS,
        DUAL_ATTENTION,
        Option("layout", "released",
               "'released': LINA's model, blocks < num_blocks // 2 plain linear attention (no gate, no conv), the "
               "rest with both; 'gated': every block with KV gate and conv", one_of(*LAYOUTS)),
        Option("text_tokens", "linear",
               "SD3 text queries: 'linear' (read the gated linear memory) or 'softmax' (exact attention over all keys)",
               one_of("linear", "softmax")),
        Option("gate_grid", None, "image token grid (H, W) the KV gate is trained at; None: the model's native grid",
               _grid_or_auto),
        Option("gate_resize", "interpolate",
               "at another grid: 'interpolate' the gate bilinearly, or 'reset' it to 1", one_of("interpolate", "reset")),
        Option("text_gate_tokens", {"sd3": 333, "*": 0},
               "SD3: text positions with their own KV gate (later positions: 1); 0 = ungated text",
               number(0, 100_000, integer=True)),
        Option("conv_on", "input", "what the depthwise conv reads: the layer's 'input' tokens (LINA) or the 'value's",
               one_of("input", "value")),
        Option("conv_kernel", 5, "size of the depthwise conv (LINA: 5)", _odd_kernel),
        Option("eps", 1e-6, "eps of the division normalisation (on the mean over keys)", number(0.0, 1.0)),
    )

    def check_options(self, options, family):
        if family == "dit" and options["text_gate_tokens"]:
            raise ValueError("option `text_gate_tokens`: DiT / SiT have no text tokens; leave it 0")

    def prepare(self, patch):
        """The block split of `layout`, once per patch: blocks below `resources["encoder_blocks"]`
        (the model's block index) are encoder blocks."""
        patch.resources["encoder_blocks"] = encoder_blocks(patch.options["layout"], patch.denoiser)

    def make_processor(self, site, original, patch):
        decoder = site.depth >= patch.resources["encoder_blocks"]
        return LinaAttnProcessor(original, site, patch.state, patch.options, decoder=decoder)

    def resolve_for_model(self, options, denoiser):
        """`gate_grid` None -> the model's native token grid (so a weights folder states the grid its
        gates belong to)."""
        if options["gate_grid"] is None:
            options["gate_grid"] = family_of(denoiser).native_grid(denoiser)
        options["gate_grid"] = tuple(options["gate_grid"])

    def attach(self, patch):
        """Build the decoder blocks' gates at the resolved `gate_grid`."""
        for processor in patch.processors().values():
            if processor.decoder:
                processor.build_gates(patch.options["gate_grid"])
