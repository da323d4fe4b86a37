"""The CUDA paths against fp32 CPU references: `pytest -m cuda` on a machine with a CUDA device
(collected and skipped elsewhere).

- every shared op of diffusers_ext/ops.py in fp16 and bf16 on the GPU against float64 on the CPU;
- every registered method on every tiny pipeline of its families, fp16 and bf16, eager: the patched
  denoiser (new parameters perturbed, as after a fine-tune) against the same patch in fp32 on the CPU;
  its error may be at most a few times the stock model's own half-precision error on the same inputs;
- the same with xformers' kernel behind `ops.sdpa` when xformers is installed, and with it turned off;
- every method compiled (torch.compile, inductor) in bf16 against the fp32 CPU reference.

The checks take the device as an argument (`check_*`), so they can be run on the CPU by hand.
"""

from __future__ import annotations

import pytest
import torch
from helpers import denoiser_inputs, run_denoiser

import diffusers_ext as dx
from diffusers_ext import merge, ops, registry
from diffusers_ext.testing import TINY_FAMILIES, tiny_pipeline

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pytest -m cuda)")]

HALF = (torch.float16, torch.bfloat16)
# relative L2 error an op may have in half precision against float64 (inputs ~ N(0, 1), rounding of the
# inputs included): about 2^-11 (fp16) / 2^-8 (bf16) per element, a few roundings deep
OP_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 4e-2}
# a patched denoiser's error in half precision may be this many times stock's, or this floor
MODEL_FACTOR = 4.0
MODEL_FLOOR = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
# agent / ToMe choose discrete matches from similarities of half-precision activations: a near tie
# can flip a match, which moves a few tokens; their floor is wider
DISCRETE_FLOOR = {"agent": 0.15}


def rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert bool(torch.isfinite(got).all()), "non-finite output"
    return float((got - ref).norm() / ref.norm())


# --- ops ------------------------------------------------------------------------------------------------

def _randn(*shape, generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _op_cases():
    """name -> (inputs from a generator, the op). Shapes: 2 x 2 heads, 64 tokens on an 8 x 8 grid, d = 16."""
    grid = (8, 8)

    def qkv(g):
        return [_randn(2, 2, 64, 16, generator=g) for _ in range(3)]

    conv = ops.GridDepthwiseConv(32, 3, zero_init=False).double()
    return {
        "sdpa": (qkv, lambda q, k, v: ops.sdpa(q, k, v, 0.25)),
        "agent_attention": (lambda g: [*qkv(g), _randn(2, 2, 4, 16, generator=g)],
                            lambda q, k, v, a: ops.agent_attention(q, k, v, a, 0.25, 0.25**0.3, 0.075)),
        "mediator_attention": (lambda g: [*qkv(g), _randn(2, 2, 16, 16, generator=g)],
                               lambda q, k, v, m: ops.mediator_attention(q, k, v, m, 0.25)),
        "gated_linear_attention": (lambda g: [*qkv(g), _randn(1, 2, 64, 1, generator=g).abs() + 0.5],
                                   lambda q, k, v, gate: ops.gated_linear_attention(q, k, v, gate, gate)),
        "ttt_attention": (lambda g: [*qkv(g), *(0.1 * _randn(2, 16, 16, generator=g) for _ in range(2))],
                          lambda q, k, v, w1, w2: ops.ttt_attention(q, ops.key_instance_norm(k), v, w1, w2, 0.25)),
        "neighborhood_attention": (qkv, lambda q, k, v: ops.neighborhood_attention(q, k, v, grid, 5, 0.25)),
        "differential_attention": (lambda g: [*qkv(g), _randn(2, 2, 4, 16, generator=g)],
                                   lambda q, k, v, t: ops.differential_attention(q, t, t.flip(2), v[:, :, :4], 0.25,
                                                                                 torch.tensor(0.5, dtype=q.dtype,
                                                                                              device=q.device))),
        "rms_norm": (lambda g: [_randn(2, 2, 64, 16, generator=g)], lambda x: ops.rms_norm(x)),
        "grid_depthwise_conv": (lambda g: [_randn(2, 64, 32, generator=g)],
                                lambda x: conv.to(x.device, x.dtype)(x, grid)),
    }


def check_op(name: str, device, dtype) -> float:
    """One op in `dtype` on `device` against float64 on the CPU -> the relative L2 error (asserted)."""
    make, op = _op_cases()[name]
    inputs = make(torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = op(*inputs)
        got = op(*(x.to(device, dtype) for x in inputs))
    assert got.dtype == dtype and got.device.type == torch.device(device).type
    error = rel_l2(got, ref)
    assert error < OP_TOLERANCE[dtype], f"{name} {dtype}: relative L2 {error:.2e} >= {OP_TOLERANCE[dtype]}"
    return error


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(_op_cases()))
def test_op_on_cuda_matches_float64_cpu(name, dtype):
    check_op(name, "cuda", dtype)


def check_grid_merge(device) -> None:
    """merge.py on `device`: every index tensor of the matching on the metric's device (the cells'
    representatives drawn from a generator on it), and merge / unmerge / agents equal to the same
    matching applied on the CPU."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    metric, x = _randn(2, 48, 5, generator=g), _randn(2, 48, 3, generator=g)
    match = merge.match_on_grid(metric.to(device), (6, 8), 2, 0.4, torch.Generator(device).manual_seed(0))
    indices = (match.src_pos, match.dst_pos, match.assign, match.order)
    assert all(t.device.type == device.type for t in indices)
    rows, cols = (match.dst_pos // 8).tolist(), (match.dst_pos % 8).tolist()
    assert sorted((r // 2, c // 2) for r, c in zip(rows, cols)) == [(i, j) for i in range(3) for j in range(4)]
    on_cpu = merge.GridMerge(48, *(t.cpu() for t in indices), match.num_merged)
    merged = match.merge(x.to(device))
    results = [(merged, on_cpu.merge(x)),
               (match.unmerge(merged), on_cpu.unmerge(on_cpu.merge(x))),
               *((match.agents(x.to(device), ratio), on_cpu.agents(x, ratio)) for ratio in (0.5, 1.0))]
    for got, expected in results:
        assert got.device.type == device.type
        torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=1e-12)


def test_grid_merge_on_cuda():
    check_grid_merge("cuda")


# --- methods on tiny pipelines ------------------------------------------------------------------------

def _cells():
    return [pytest.param(name, tiny, id=f"{name}-{tiny}")
            for name, spec in registry.all_methods().items()
            for family in spec.families
            for tiny, of in TINY_FAMILIES.items() if of == family]


def _perturb_new_parameters(model, seed: int = 1) -> None:
    """N(0, 0.05^2) on every parameter a patch added (as after a fine-tune), the same on any device / dtype."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".processor." in name:
                p.add_((0.05 * torch.randn(p.shape, generator=generator)).to(p))


def _output(tiny: str, method: str | None, device, dtype, compiled: bool = False) -> torch.Tensor:
    """The tiny pipeline's denoiser output (batch 2, the family's dummy inputs), patched with `method`
    (None: stock) after moving the model to `device` / `dtype`."""
    pipe = tiny_pipeline(tiny)
    model, kwargs = denoiser_inputs(pipe, batch=2)
    model.to(device, dtype)
    if method is not None:
        torch.manual_seed(0)   # methods that draw their initial weights from the global RNG draw the same
        dx.patch(pipe, method)
        _perturb_new_parameters(model)
    kwargs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
              for k, v in kwargs.items()}
    if compiled:
        model = torch.compile(model)
    return run_denoiser(model, kwargs)


def check_method(method: str, tiny: str, device, dtype, compiled: bool = False) -> tuple[float, float]:
    """The patched denoiser in `dtype` on `device` against fp32 on the CPU -> (its error, stock's error);
    asserts the bound of the module docstring."""
    stock = rel_l2(_output(tiny, None, device, dtype), _output(tiny, None, "cpu", torch.float32))
    reference = _output(tiny, method, "cpu", torch.float32)
    error = rel_l2(_output(tiny, method, device, dtype, compiled), reference)
    floor = max(MODEL_FLOOR[dtype], DISCRETE_FLOOR.get(method, 0.0))
    bound = max(MODEL_FACTOR * stock, floor)
    assert error <= bound, (f"{method} on {tiny} {dtype}{' compiled' if compiled else ''}: relative L2 {error:.3e} "
                            f"against fp32 CPU, stock's own {stock:.3e}, bound {bound:.3e}")
    return error, stock


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method, tiny", _cells())
def test_method_on_cuda_matches_fp32_cpu(method, tiny, dtype, monkeypatch):
    monkeypatch.setattr(ops, "_xformers_ops", lambda: None)   # torch's own SDPA kernels (xformers: below)
    check_method(method, tiny, "cuda", dtype)


def _xformers():
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        pytest.skip("xformers is not installed (or not built for this torch)")
    ops._xformers_ops.cache_clear()
    if ops._xformers_ops() is None:
        pytest.skip("xformers is turned off (DIFFUSERS_EXT_XFORMERS=0)")
    return ops._xformers_ops()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_sdpa_takes_xformers_kernel_and_matches(dtype, monkeypatch):
    xops = _xformers()
    calls = []
    kernel = xops.memory_efficient_attention
    monkeypatch.setattr(xops, "memory_efficient_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    assert check_op("sdpa", "cuda", dtype) < OP_TOLERANCE[dtype]
    assert calls, "ops.sdpa did not use xformers on CUDA half precision"


@pytest.mark.parametrize("method, tiny", [c for c in _cells() if c.values[1] in ("sd", "sd3", "dit")])
def test_method_with_xformers_matches_fp32_cpu(method, tiny):
    _xformers()
    check_method(method, tiny, "cuda", torch.float16)


@pytest.mark.parametrize("method, tiny", [pytest.param(name, next(t for t, f in TINY_FAMILIES.items()
                                                                  if f == spec.families[0]), id=name)
                                          for name, spec in registry.all_methods().items()])
def test_compiled_method_on_cuda_matches_fp32_cpu(method, tiny, monkeypatch):
    monkeypatch.setattr(ops, "_xformers_ops", lambda: None)
    check_method(method, tiny, "cuda", torch.bfloat16, compiled=True)

