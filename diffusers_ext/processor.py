"""The base of every replacement processor, and the stock pre/post-processing of `Attention`.

A `PatchProcessor` wraps the processor it replaces (kept, never copied) and calls it whenever the
method should not act: outside the patch's `steps` schedule, or on inputs the method does not
handle (attention masks), with a one-time warning in the latter case. It is an `nn.Module`, so
trainable weights of a method sit in the model's `state_dict()` under `...<site>.processor.<name>`.

The processor protocol: diffusers' `Attention.forward` hands a `cross_attention_kwargs` /
`joint_attention_kwargs` entry only to a processor whose `__call__` names it. A `PatchProcessor`'s
`__call__` reports the wrapped original's signature (`inspect.signature(processor.__call__)`), so
every entry the original accepts (IP-Adapter's `scale` / `ip_adapter_masks`, a user's own
arguments) reaches the wrapper, which hands it to the original; while the method acts, entries it
cannot honour send the call to the original (one-time warning). `check_original` decides which
originals a method may wrap (the stock ones, `COMPOSABLE_PROCESSORS`, and classes declared with
`compose_with`); any other is refused by `patch` with an error naming its class, before the model
is touched. `InstalledGuard` refuses to run a model whose patched processors something replaced.

`run_self_attention` does what every diffusers self-attention processor does around the attention
itself (spatial norm, 4-D inputs, group norm, residual, output rescale) and hands the tokens to a
method's `tokens_fn(x) -> y`, which computes projections and attention and applies `attn.to_out`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Callable

import torch
from torch import nn

from diffusers_ext.ops import needs_plain_ops

logger = logging.getLogger("diffusers_ext")

# diffusers' processors whose computation is plain attention over the module's own projections
# (`to_q` / `to_k` / `to_v`, which fused-QKV modules keep; slicing and the kernels change only how):
# a method replacing attention at such a site loses nothing, and falls back to the processor itself.
COMPOSABLE_PROCESSORS = frozenset({
    "AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0", "SlicedAttnProcessor", "AttnProcessorNPU",
    "XFormersAttnProcessor", "JointAttnProcessor2_0", "FusedJointAttnProcessor2_0", "XFormersJointAttnProcessor",
})


_COMPOSABLE_CLASSES: set[type] = set()   # processors registered by `compose_with`


def compose_with(processor_class: type) -> type:
    """Declare that methods may wrap `processor_class` (a user's or another plugin's processor): the
    method replaces its attention where it acts, calls it everywhere else, and hands it every call that
    carries arguments it names (`cross_attention_kwargs` entries; one-time warning). Returns the class,
    so it also works as a class decorator."""
    if not isinstance(processor_class, type):
        raise TypeError(f"compose_with takes a processor class, got {processor_class!r}")
    _COMPOSABLE_CLASSES.add(processor_class)
    return processor_class


def check_original(original, site_name: str, method: str) -> None:
    """Raise a `PatchError` naming the processor class unless `method` may wrap `original`: a stock
    diffusers processor (`COMPOSABLE_PROCESSORS`, matched by class and module), a diffusers_ext one,
    or a class declared with `compose_with`."""
    from .errors import PatchError

    cls = type(original)
    if isinstance(original, (PatchProcessor, *_COMPOSABLE_CLASSES)) or (
            cls.__name__ in COMPOSABLE_PROCESSORS and cls.__module__.startswith("diffusers.")):
        return
    raise PatchError(
        f"method {method!r} would replace the processor {cls.__module__}.{cls.__qualname__} at {site_name}, which is "
        f"not a stock diffusers attention processor (IP-Adapter, a custom or another plugin's processor): its "
        f"computation would be lost. Patch the model before installing it, restore the stock processors "
        f"(`set_default_attn_processor()`), or declare it with `diffusers_ext.compose_with` if it is plain attention "
        f"plus arguments of its own"
    )


def check_denoiser(denoiser, method: str) -> None:
    """Raise a `PatchError` for a denoiser another plugin changed in a way no method composes with:
    tomesd's block classes merge tokens before attention, which then sees no latent grid."""
    from .errors import PatchError

    if getattr(denoiser, "_tome_info", None) is not None:
        raise PatchError(f"tomesd (`tomesd.apply_patch`) merges the tokens of this {type(denoiser).__name__}'s "
                         f"blocks before attention, and method {method!r} needs them on the latent grid: call "
                         "`tomesd.remove_patch(pipe)` first (agent and todo merge tokens themselves: `merge_ratio`)")


class InstalledGuard:
    """Called before every forward of a patched denoiser: a `PatchError` if something replaced the
    patch's processors since (`fuse_qkv_projections`, `enable_attention_slicing`, `set_attn_processor`
    replace every processor), instead of a run that silently has no patch. `pairs`: (module, processor)."""

    def __init__(self, method: str, pairs: list):
        self.method = method
        self.pairs = pairs
        self.paused = 0

    @contextlib.contextmanager
    def pause(self):
        """Inside: no check (the distiller's teacher runs the original processors on purpose)."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def __call__(self) -> None:
        if self.paused:
            return
        replaced = [(module, processor) for module, processor in self.pairs if module.processor is not processor]
        if replaced:
            from .errors import PatchError

            now = sorted({type(module.processor).__name__ for module, _ in replaced})
            raise PatchError(
                f"the {self.method!r} processors at {len(replaced)} of {len(self.pairs)} patched sites were replaced "
                f"by {', '.join(now)} after dx.patch (fuse_qkv_projections, enable_attention_slicing and "
                f"set_attn_processor replace every processor): call that before dx.patch, or dx.unpatch first"
            )


def _signature_of(original) -> inspect.Signature | None:
    """The parameters `Attention.forward` inspects on `original` (as diffusers does), or None."""
    try:
        return inspect.signature(original.__call__)
    except (TypeError, ValueError):
        return None


class _AdvertisedCall:
    """`PatchProcessor.__call__`: on the class, `nn.Module.__call__` (what Python and torch.compile
    call); on an instance, the bound call whose `inspect.signature` is the wrapped original's."""

    def __get__(self, instance, owner=None):
        if instance is None:
            return nn.Module.__call__
        return _BoundCall(instance)


class _BoundCall:
    __slots__ = ("module",)

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return nn.Module.__call__(self.module, *args, **kwargs)

    @property
    def __signature__(self):
        return self.module.call_signature


class _ProcessorType(type):
    """Refuses `cls()` with a clear error: diffusers' `load_ip_adapter` rebuilds every processor by
    class with no arguments (copies and pickling do not come through here)."""

    def __call__(cls, *args, **kwargs):
        if not args and not kwargs:
            from .errors import PatchError

            raise PatchError(f"{cls.__name__} (diffusers_ext) cannot be rebuilt without its patch: a loader that "
                             "copies the attention processors by class (load_ip_adapter) ran after dx.patch; "
                             "call it before dx.patch, or dx.unpatch first")
        return super().__call__(*args, **kwargs)


class PatchProcessor(nn.Module, metaclass=_ProcessorType):
    """Base class: `forward` dispatches to `patched` when the method acts, else to the original."""

    __call__ = _AdvertisedCall()

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
        own = inspect.signature(self.forward)
        self.call_signature = _signature_of(original) or own   # what Attention.forward sees (see _BoundCall)

    def acts(self) -> bool:
        return self.state.active.get(self.schedule_key, True)

    def fallback(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, reason=None,
                 extra=None):
        """The original processor's call; `extra`: the processor arguments the caller passed."""
        if reason is not None and reason not in self._warned:
            self._warned.add(reason)
            logger.warning("diffusers_ext: %s at %s; using the stock attention there", reason, self.site_name)
        extra = dict(extra or {})
        if temb is not None:
            extra["temb"] = temb
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **extra)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **extra):
        """`extra`: `cross_attention_kwargs` entries the original names (they reach only it)."""
        if not self.acts():
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, extra=extra)
        if extra:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, extra=extra,
                                 reason=f"{self.label} does not use the processor arguments {sorted(extra)}")
        return self.patched(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def patched(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        raise NotImplementedError

    def grid_of(self, num_tokens: int) -> tuple[int, int]:
        """The (height, width) token grid of `num_tokens` image tokens, or a clear error."""
        grid = self.state.grid(num_tokens)
        if grid is None:
            raise ValueError(f"{self.label} at {self.site_name}: {num_tokens} tokens do not form a grid of the "
                             f"{self.state.latent_hw} latent (did another plugin, such as tomesd, merge tokens "
                             f"before this layer? {self.label} cannot share a block with it)")
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


def frozen(cache: dict, key, params, compute: Callable[[], object]):
    """`compute()`, kept in `cache[key]` and reused while no gradient can reach `params` (grad mode off,
    or none requires grad) and every one of them is unchanged (same storage, no in-place update since);
    recomputed otherwise, and always while compiling (the graph computes it). For per-call work that
    depends only on a layer's parameters (bias tables, lambdas): inference pays for it once."""
    if needs_plain_ops(*params):
        return compute()
    # the entry holds the parameter objects themselves: a replaced parameter cannot reuse their id or storage
    state = [(p, p.data_ptr(), p._version) for p in params]
    hit = cache.get(key)
    if hit is None or len(hit[0]) != len(state) or any(
            a is not b or (pa, va) != (pb, vb) for (a, pa, va), (b, pb, vb) in zip(hit[0], state)):
        with torch.inference_mode(False), torch.no_grad():   # plain tensors: they may serve autograd later
            hit = cache[key] = (state, compute())
    return hit[1]
