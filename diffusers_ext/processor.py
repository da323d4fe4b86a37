"""The base of every replacement processor, and the stock pre/post-processing of `Attention`.

A `PatchProcessor` wraps the processor it replaces (kept, never copied) and calls it whenever the
method should not act: outside the patch's `steps` schedule, or on inputs the method does not
handle (attention masks), with a one-time warning in the latter case. It is an `nn.Module`, so
trainable weights of a method sit in the model's `state_dict()` under `...<site>.processor.<name>`.

`run_self_attention` does what every diffusers self-attention processor does around the attention
itself (spatial norm, 4-D inputs, group norm, residual, output rescale) and hands the tokens to a
method's `tokens_fn(x) -> y`, which computes projections and attention and applies `attn.to_out`.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger("diffusers_ext")


class PatchProcessor(nn.Module):
    """Base class: `forward` dispatches to `patched` when the method acts, else to the original."""

    label = "this method"  # how messages name the method, e.g. "agent attention"

    def __init__(self, original, site, state, schedule_key: str = "steps"):
        super().__init__()
        # Plain attributes, not submodules: the original may itself be an nn.Module (IP-Adapter...).
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "state", state)
        self.site_name = site.name
        self.depth = site.depth
        self.schedule_key = schedule_key
        self._warned: set[str] = set()

    def acts(self) -> bool:
        return self.state.active.get(self.schedule_key, True)

    def fallback(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, reason=None):
        if reason is not None and reason not in self._warned:
            self._warned.add(reason)
            logger.warning("diffusers_ext: %s at %s; using the stock attention there", reason, self.site_name)
        extra = {} if temb is None else {"temb": temb}
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **extra)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if not self.acts():
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self.patched(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def patched(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        raise NotImplementedError

    def grid_of(self, num_tokens: int) -> tuple[int, int]:
        """The (height, width) token grid of `num_tokens` image tokens, or a clear error."""
        grid = self.state.grid(num_tokens)
        if grid is None:
            raise ValueError(f"{self.label} at {self.site_name}: {num_tokens} tokens do not form a grid of the "
                             f"{self.state.latent_hw} latent")
        return grid

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}"


class SelfAttentionProcessor(PatchProcessor):
    """A method that replaces unmasked image self-attention: `attend(attn, x)` maps the tokens
    x (B, N, C) to the output after `attn.to_out` (B, N, C_out). Cross-attention calls and
    attention masks fall back to the stock processor (with a one-time warning)."""

    def patched(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        if encoder_hidden_states is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 reason=f"{self.label} replaces self-attention only, got encoder states")
        if attention_mask is not None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 reason=f"{self.label} does not take attention masks")
        return run_self_attention(attn, hidden_states, temb, lambda x: self.attend(attn, x))

    def attend(self, attn, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, h*d) -> (B, h, N, d)"""
    batch, tokens, _ = x.shape
    return x.view(batch, tokens, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) -> (B, N, h*d)"""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def project_q(attn, x: torch.Tensor) -> torch.Tensor:
    """Queries of tokens x (B, N, C) -> (B, h, N, d), with the module's q-norm if it has one."""
    q = split_heads(attn.to_q(x), attn.heads)
    return attn.norm_q(q) if attn.norm_q is not None else q


def project_kv(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of tokens x (B, M, C) -> two (B, h, M, d), with the k-norm if any."""
    k = split_heads(attn.to_k(x), attn.heads)
    v = split_heads(attn.to_v(x), attn.heads)
    return (attn.norm_k(k) if attn.norm_k is not None else k), v


def project_text(attn, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SD3 joint attention's text stream: tokens c (B, M, C_text) -> q, k, v (B, h, M, d) through
    `add_{q,k,v}_proj`, with the added q/k norms (SD3.5's RMSNorm) where the module has them."""
    q = split_heads(attn.add_q_proj(c), attn.heads)
    k = split_heads(attn.add_k_proj(c), attn.heads)
    v = split_heads(attn.add_v_proj(c), attn.heads)
    if attn.norm_added_q is not None:
        q = attn.norm_added_q(q)
    if attn.norm_added_k is not None:
        k = attn.norm_added_k(k)
    return q, k, v


def project_text_out(attn, o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Text heads (B, h, M, d) -> (B, M, C_text): `to_add_out`, except in a `context_pre_only`
    block, whose text output the model discards (returned unprojected)."""
    o = merge_heads(o).to(dtype)
    return o if attn.context_pre_only else attn.to_add_out(o)


def project_out(attn, o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Heads (B, h, N, d) -> output projection and dropout -> (B, N, C_out) in `dtype`."""
    o = merge_heads(o).to(dtype)
    return attn.to_out[1](attn.to_out[0](o))


def run_self_attention(attn, hidden_states: torch.Tensor, temb, tokens_fn: Callable[[torch.Tensor], torch.Tensor]):
    """The stock wrapping of self-attention around `tokens_fn((B, N, C)) -> (B, N, C_out)`."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
    if image_shape is not None:
        batch, channels, height, width = image_shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    out = tokens_fn(hidden_states)

    if image_shape is not None:
        out = out.transpose(-1, -2).reshape(image_shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def compute_dtype(attn, dtype: torch.dtype) -> torch.dtype:
    """At least fp32 where the module asks for upcast attention (SD 2.x; fp64 stays fp64), else the
    activations' dtype."""
    return torch.promote_types(dtype, torch.float32) if getattr(attn, "upcast_attention", False) else dtype
