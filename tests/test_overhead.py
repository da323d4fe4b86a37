"""Per-call work that depends only on a layer's shape or parameters is done once, not on every call of
every layer: T^5's neighbourhood-attention layout (`ops._neighborhood_layout`), VCA's lambdas and head-split
embeddings, the mediators' interpolated bias tables and LINA's gates (`processor.frozen`). Overhead is counted in
dispatched aten ops per attention-layer call (no wall time); outputs must stay bit-identical to the
uncached computation, and a parameter update or a gradient must never see a stale value."""

from __future__ import annotations

import collections

import pytest
import torch
from helpers import denoiser_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import diffusers_ext as dx
from diffusers_ext import ops, processor
from diffusers_ext.testing import tiny_pipeline


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched inside the `with` block, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _no_cache(monkeypatch):
    """The code path before the caches: every value recomputed on every call."""
    import diffusers_ext.processors.lina as lina
    import diffusers_ext.processors.mediator as mediator
    import diffusers_ext.processors.vca as vca

    monkeypatch.setattr(ops, "_neighborhood_layout", ops._neighborhood_layout.__wrapped__)
    for module in (vca, mediator, lina):
        monkeypatch.setattr(module, "frozen", lambda cache, key, params, compute: compute())


def _patched(method: str, tiny: str = "dit"):
    """A tiny pipeline's denoiser patched with `method`, its new parameters perturbed (as after a fine-tune)
    -> (model, inputs)."""
    pipe = tiny_pipeline(tiny)
    model, kwargs = denoiser_inputs(pipe, batch=2)
    torch.manual_seed(0)
    dx.patch(pipe, method)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".processor." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model, kwargs


def _layer_ops(model, kwargs, calls: int = 2, layer: int = 0) -> tuple[list[collections.Counter], list[torch.Tensor]]:
    """The aten ops of attention layer `layer` (in module order) in each of `calls` forwards, and the
    forwards' outputs."""
    layer = [m for m in model.modules() if hasattr(m, "set_processor")][layer]
    counts, outputs = [], []

    def pre(module, args, kwargs):
        module._count = OpCount()
        module._count.__enter__()

    def post(module, args, kwargs, output):
        module._count.__exit__(None, None, None)
        counts.append(module._count.ops)

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True),
               layer.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            for _ in range(calls):
                outputs.append(model(**kwargs, return_dict=False)[0])
    finally:
        for handle in handles:
            handle.remove()
    return counts, outputs


# (method, tiny pipeline, layer, aten ops a warm call saves at least): T^5's neighbourhood layout, VCA's
# lambdas and embeddings, the mediators' bias tables, LINA's joined image + text gates (a decoder block)
CASES = [("t5", "dit", 0, 60), ("vca", "dit", 0, 30), ("mediator", "dit", 0, 25), ("lina", "sd3", -1, 4)]


@pytest.mark.parametrize("method, tiny, layer, saved", CASES)
def test_warm_layer_calls_dispatch_fewer_ops_with_identical_outputs(method, tiny, layer, saved, monkeypatch):
    model, kwargs = _patched(method, tiny)
    counts, outputs = _layer_ops(model, kwargs, layer=layer)
    with monkeypatch.context() as m:
        _no_cache(m)
        before_counts, before_outputs = _layer_ops(model, kwargs, layer=layer)
    warm, uncached = sum(counts[-1].values()), sum(before_counts[-1].values())
    assert warm <= uncached - saved, (method, warm, uncached)
    for out in outputs:
        assert torch.equal(out, before_outputs[-1])   # bit-identical to recomputing everything


def test_warm_t5_layer_builds_no_index_tensors():
    model, kwargs = _patched("t5")
    counts, _ = _layer_ops(model, kwargs)
    building = {"arange", "floor_divide", "remainder", "masked_fill_", "bitwise_and", "zeros"}
    assert not building & set(counts[-1]), counts[-1]


@pytest.mark.parametrize("rpb", [False, True])
def test_neighborhood_layout_is_built_once_and_bit_identical(rpb):
    ops._neighborhood_layout.cache_clear()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7 * 9, 8, generator=g) for _ in range(3))
    bias = torch.randn(3, 9, 9, generator=g) if rpb else None
    fresh = ops._neighborhood_layout.__wrapped__(7, 9, 5, ops.NEIGHBORHOOD_TILE, q.device, torch.float32)
    first = ops.neighborhood_attention(q, k, v, (7, 9), 5, 0.3, bias)
    second = ops.neighborhood_attention(q, k, v, (7, 9), 5, 0.3, bias)
    info = ops._neighborhood_layout.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    cached = ops._neighborhood_layout(7, 9, 5, ops.NEIGHBORHOOD_TILE, q.device, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh))
    assert torch.equal(first, second)
    assert not any(t.is_inference() for t in cached)


def test_neighborhood_layout_built_in_inference_mode_serves_autograd():
    ops._neighborhood_layout.cache_clear()
    q, k, v = (torch.randn(1, 1, 25, 4) for _ in range(3))
    with torch.inference_mode():
        ops.neighborhood_attention(q, k, v, (5, 5), 3, 0.5)
    q.requires_grad_(True)
    ops.neighborhood_attention(q, k, v, (5, 5), 3, 0.5).sum().backward()   # index_select saves the index
    assert q.grad is not None and bool(torch.isfinite(q.grad).all())


def test_frozen_recomputes_after_an_update_and_never_under_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    cache, computed = {}, []

    def compute():
        computed.append(1)
        return p.detach() * 2

    with torch.no_grad():
        a = processor.frozen(cache, "k", [p], compute)
        b = processor.frozen(cache, "k", [p], compute)
        assert a is b and len(computed) == 1
        p.add_(1.0)                                          # an in-place update (an optimiser step, a load)
        assert torch.equal(processor.frozen(cache, "k", [p], compute), torch.full((3,), 4.0))
        assert len(computed) == 2
    processor.frozen(cache, "k", [p], compute)               # grad mode with a trainable parameter
    processor.frozen(cache, "k", [p], compute)
    assert len(computed) == 4
    with torch.no_grad():                                    # a replaced parameter (loaded weights)
        other = torch.nn.Parameter(torch.full((3,), 7.0))
        assert torch.equal(processor.frozen(cache, "k", [other], lambda: other.detach() * 2), torch.full((3,), 14.0))


def test_vca_after_a_parameter_update_matches_the_uncached_output(monkeypatch):
    model, kwargs = _patched("vca")
    _, warm = _layer_ops(model, kwargs)
    attn_processor = next(m.processor for m in model.modules() if hasattr(m, "set_processor"))
    with torch.no_grad():
        attn_processor.lambda_q.add_(0.3)
        attn_processor.pos_embedding.add_(0.1)
    _, updated = _layer_ops(model, kwargs, calls=1)
    with monkeypatch.context() as m:
        _no_cache(m)
        _, uncached = _layer_ops(model, kwargs, calls=1)
    assert not torch.equal(updated[0], warm[-1])
    assert torch.equal(updated[0], uncached[0])
    model(**kwargs, return_dict=False)[0].square().mean().backward()   # training: gradients reach them
    assert attn_processor.lambda_q.grad is not None and attn_processor.pos_embedding.grad.abs().sum() > 0


def test_values_frozen_in_inference_mode_serve_autograd_later():
    p = torch.nn.Parameter(torch.ones(3), requires_grad=False)   # e.g. a gate kept fixed while training
    cache = {}
    with torch.inference_mode():
        processor.frozen(cache, "k", [p], lambda: p * 2)
    x = torch.ones(3, requires_grad=True)
    (x * processor.frozen(cache, "k", [p], lambda: p * 2)).sum().backward()   # mul saves the cached value
    assert torch.equal(x.grad, torch.full((3,), 2.0))
