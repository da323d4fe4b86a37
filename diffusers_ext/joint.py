"""The shared base of the methods that convert transformer attention (T^5, LINA): which sites a
conversion takes, what a fine-tune of it trains, and the dispatch of a converted layer.

A converted layer is either SD3's joint attention over image + text tokens (`role="joint"`, the
module has `add_q_proj`) or image self-attention (DiT `attn1`, SD3.5's dual-attention `attn2`):

    JointAttentionProcessor.patched ->  joint_attend(attn, x (B, N, C), c (B, M, C_text))
                                          -> (image out (B, N, C), text out (B, M, C_text))
                                        self_attend(attn, x (B, N, C)) -> (B, N, C_out)

Attention masks and plain cross-attention fall back to the stock processor with a one-time warning.
"""

from __future__ import annotations

from .processor import PatchProcessor, run_self_attention
from .registry import Method, Option, boolean


def _blocks(value):
    """`"all"` or a non-empty list of distinct block indices >= 0"""
    if value == "all":
        return "all"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"expected 'all' or a list of block indices, got {value!r}")
    indices = tuple(value)
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
        raise ValueError(f"expected 'all' or a non-empty list of block indices >= 0, got {value!r}")
    return tuple(sorted(set(indices)))


# Which attention a conversion of a transformer replaces.
BLOCKS = Option("blocks", "all", "transformer blocks to convert: 'all' or a list of block indices", _blocks)
DUAL_ATTENTION = Option("dual_attention", True,
                        "SD3.5: also convert the image self-attention `attn2` of dual-attention blocks", boolean)


class JointAttentionProcessor(PatchProcessor):
    """A converted SD3 joint-attention or image self-attention layer: heads (`heads`, `head_dim`,
    `inner_dim`) read off the module; subclasses write `joint_attend` and `self_attend`."""

    def __init__(self, original, site, state):
        super().__init__(original, site, state)
        attn = site.module
        self.heads = attn.heads
        self.inner_dim = attn.to_q.out_features
        self.head_dim = self.inner_dim // attn.heads

    def patched(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        if attention_mask is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 reason=f"{self.label} does not take attention masks")
        if encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None:
            return self.joint_attend(attn, hidden_states, encoder_hidden_states)
        if encoder_hidden_states is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 reason=f"{self.label} replaces self- or joint attention, got cross-attention")
        return run_self_attention(attn, hidden_states, temb, lambda x: self.self_attend(attn, x))

    def joint_attend(self, attn, x, c):
        raise NotImplementedError

    def self_attend(self, attn, x):
        raise NotImplementedError


class JointAttentionMethod(Method):
    """A conversion of SD3 / SD3.5 joint attention and DiT / SiT self-attention (options `blocks`,
    `dual_attention`). A fine-tune trains the processors' new parameters ("new") and may adapt the
    converted layers' linear projections ("inherited": to_q/k/v, to_out, and for joint attention
    add_q/k/v_proj, to_add_out)."""

    families = ("sd3", "dit")
    training_free = False
    inherits_projections = True

    def select_sites(self, sites, options, family):
        roles = {"joint", "self"} if options["dual_attention"] else {"joint"}
        if family == "dit":
            roles = {"self"}
        chosen = [s for s in sites if s.role in roles]
        blocks = options["blocks"]
        if blocks != "all":
            depths = sorted({s.depth for s in chosen})
            missing = [b for b in blocks if b not in depths]
            if missing:
                have = f"blocks {depths[0]}..{depths[-1]}" if depths else "none"
                raise ValueError(f"option `blocks`: no block(s) {missing} with convertible attention; this model "
                                 f"has {have}")
            chosen = [s for s in chosen if s.depth in blocks]
        return chosen
