"""VCA: math against a dense reference, the start point, options."""

import math

import pytest
import torch
from helpers import assert_rounded_from_exact, heads_of, pool_loop

import diffusers_ext as dx
from diffusers_ext.testing import tiny_pipeline

# Diff Transformer's lambda_init = 0.8 - 0.6 exp(-0.3 depth) of the layer `_patched` watches (block 1)
LAMBDA_INIT = 0.8 - 0.6 * math.exp(-0.3 * 1)


def _patched(tokens=16):
    pipe = tiny_pipeline("dit")
    record = dx.patch(pipe, "vca", tokens=tokens)
    attn = pipe.transformer.transformer_blocks[1].attn1
    return pipe, record, attn, attn.processor


def _attend(record, attn, proc, x, grid):
    record.state.latent_hw = (2 * grid[0], 2 * grid[1])
    with torch.no_grad():
        return proc.attend(attn, x)


def rms(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def dense_vca(attn, proc, x, grid):
    """METHODS.md section 5 with explicit softmax matrices."""
    h, s = attn.heads, attn.scale
    q, k, v = (heads_of(f(x), h) for f in (attn.to_q, attn.to_k, attn.to_v))
    side = int(proc.num_tokens**0.5)
    t = pool_loop(q, grid, (side, side))
    tp = t + heads_of(proc.pos_embedding[None], h)
    tn = t + heads_of(proc.neg_embedding[None], h)
    lam = []
    for i in range(2):
        lq, lk = proc.lambda_q[i], proc.lambda_k[i]
        lam.append(torch.exp(lq[0] @ lk[0]) - torch.exp(lq[1] @ lk[1]) + LAMBDA_INIT)
    soft = lambda a, b: torch.softmax(s * a @ b.transpose(-1, -2), -1)  # noqa: E731
    vp, vn = soft(tp, k) @ v, soft(tn, k) @ v
    c = 1 - LAMBDA_INIT
    v_hat = c * rms(vp - lam[0] * vn, proc.norm1_weight)
    o = c * rms((soft(q, tp) - lam[1] * soft(q, tn)) @ v_hat, proc.norm2_weight)
    conv = proc.dwc.conv
    image = v.transpose(1, 2).reshape(x.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)
    dw = torch.nn.functional.conv2d(image, conv.weight, conv.bias, padding=1, groups=image.shape[1])
    o = o + heads_of(dw.flatten(2).transpose(1, 2), h)
    return attn.to_out[0](o.transpose(1, 2).reshape(x.shape[0], -1, h * q.shape[-1]))


@pytest.mark.parametrize("grid,tokens,scale", [((8, 8), 16, None), ((6, 10), 4, None), ((12, 12), 64, None),
                                               ((4, 4), 16, None), ((8, 8), 16, 0.3)])
def test_vca_matches_dense_reference(grid, tokens, scale):
    """Also: contrast tokens exactly as wide as the grid (4 x 4 on 4 x 4), and a layer whose softmax
    scale is not d^-1/2 (both stages must use the layer's own)."""
    pipe, record, attn, proc = _patched(tokens)
    if scale is not None:
        attn.scale = scale
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in proc.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(2, grid[0] * grid[1], attn.inner_dim, generator=g)
    with torch.no_grad():
        expected = dense_vca(attn, proc, x, grid)
    torch.testing.assert_close(_attend(record, attn, proc, x, grid), expected, atol=1e-5, rtol=1e-4)


def _stage_two_case(dtype=torch.float64):
    """(q as the heads of a projection, t+, t-, V^, lam, weight, scale, out, the equation's result)."""
    batch, heads, tokens, n, dim = 3, 2, 20, 4, 8
    g = torch.Generator().manual_seed(5)
    f64 = dict(generator=g, dtype=torch.float64)
    q = torch.randn(batch, tokens, heads * dim, **f64).view(batch, tokens, heads, dim).transpose(1, 2)
    t_pos, t_neg, values = (torch.randn(batch, heads, n, dim, **f64) for _ in range(3))
    lam, weight, scale = torch.tensor(0.3, dtype=torch.float64), torch.rand(dim, **f64) + 0.5, 0.4
    out = torch.randn(batch, tokens, heads, dim, **f64).transpose(1, 2)
    soft = lambda a, b: torch.softmax(scale * a @ b.transpose(-1, -2), -1)  # noqa: E731
    normed = rms((soft(q, t_pos) - lam * soft(q, t_neg)) @ values, weight)
    return q, t_pos, t_neg, values, lam, weight, scale, out, normed


# logits a step: every sample at once / two samples (of 3) / one sample
@pytest.mark.parametrize("chunk", [1 << 18, 2 * 20 * 2 * 4, 1])
def test_stage_two_with_its_norm_is_the_plain_form(monkeypatch, chunk):
    """`differential_read_norm` (the CPU's in-cache form: accumulated into `out` in place) against the
    stage-II equation with explicit softmax matrices, fp64; without `out`; bf16 queries."""
    from diffusers_ext import ops
    monkeypatch.setattr(ops, "CONTRAST_CPU_CHUNK", chunk)
    q, t_pos, t_neg, values, lam, weight, scale, out, normed = _stage_two_case()
    into = out.clone()
    got = ops.differential_read_norm(q, t_pos, t_neg, values, scale, lam, weight, into)
    assert got.data_ptr() == into.data_ptr()
    torch.testing.assert_close(got, out + normed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ops.differential_read_norm(q, t_pos, t_neg, values, scale, lam, weight), normed,
                               rtol=1e-12, atol=1e-12)
    rounded = [t.bfloat16() for t in (q, t_pos, t_neg, values)]        # bf16 in: computed in fp32, rounded once
    half = ops.differential_read_norm(*rounded[:3], rounded[3], scale, lam, weight.float())
    assert half.dtype == torch.bfloat16
    bq, bp, bn, bv = (t.double() for t in rounded)
    soft = lambda a, b: torch.softmax(scale * a @ b.transpose(-1, -2), -1)  # noqa: E731
    assert_rounded_from_exact(half, rms((soft(bq, bp) - lam * soft(bq, bn)) @ bv, weight.float().double()))


@pytest.mark.parametrize("trained", range(7))   # q, t+, t-, V^, lam, the gain, out
def test_stage_two_takes_the_plain_ops_for_any_input_needing_a_gradient(trained):
    """Whichever input requires a gradient, the plain ops run: the same values, and the gradient reaches it."""
    from diffusers_ext import ops
    q, t_pos, t_neg, values, lam, weight, scale, out, normed = _stage_two_case()
    inputs = [q, t_pos, t_neg, values, lam, weight, out]
    inputs[trained] = inputs[trained].clone().requires_grad_()
    q, t_pos, t_neg, values, lam, weight, out = inputs
    plain = ops.differential_read_norm(q, t_pos, t_neg, values, scale, lam, weight, out)
    torch.testing.assert_close(plain, out.detach() + normed, rtol=1e-12, atol=1e-12)
    plain.sum().backward()
    assert inputs[trained].grad is not None and inputs[trained].grad.abs().sum() > 0
    if trained != 6:   # without `out`: the normalised stage II alone
        torch.testing.assert_close(ops.differential_read_norm(q, t_pos, t_neg, values, scale, lam, weight), normed,
                                   rtol=1e-12, atol=1e-12)


def test_start_point_is_lambda_free_and_close_to_pooled_attention():
    """At init the output does not depend on lambda (e+ = e-), and we measure the distance to the
    exact attention and to pooled-query agent attention (the RMSNorms rescale every token)."""
    pipe, record, attn, proc = _patched(16)
    grid = (8, 8)
    x = torch.randn(2, 64, attn.inner_dim)
    out = _attend(record, attn, proc, x, grid)
    with torch.no_grad():
        proc.lambda_q.mul_(3.0)
    torch.testing.assert_close(_attend(record, attn, proc, x, grid), out)
    assert proc.lambdas()[0].item() != pytest.approx(LAMBDA_INIT)
    with torch.no_grad():
        proc.lambda_q.div_(3.0)
    assert proc.lambdas()[0].item() == pytest.approx(LAMBDA_INIT, abs=0.2)
    assert proc.lambda_init == pytest.approx(LAMBDA_INIT, abs=1e-12)
    assert pipe.transformer.transformer_blocks[0].attn1.processor.lambda_init == pytest.approx(0.2, abs=1e-12)


def test_vca_patch_runs_restores_and_checks():
    pipe = tiny_pipeline("dit")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    stock = pipe(class_labels=[1, 2], num_inference_steps=2, generator=g(), output_type="np").images
    state = torch.random.get_rng_state()
    dx.patch(pipe, "vca", tokens=16)
    assert torch.equal(state, torch.random.get_rng_state())            # patching leaves the global RNG alone
    patched = pipe(class_labels=[1, 2], num_inference_steps=2, generator=g(), output_type="np").images
    assert patched.shape == stock.shape
    dx.unpatch(pipe)
    assert (pipe(class_labels=[1, 2], num_inference_steps=2, generator=g(), output_type="np").images == stock).all()
    with pytest.raises(ValueError, match="perfect square"):
        dx.patch(pipe, "vca", tokens=10)
    dx.patch(pipe, "vca", tokens=81)
    with pytest.raises(ValueError, match="do not fit"):
        pipe(class_labels=[1], num_inference_steps=1)
    dx.unpatch(pipe)
    with pytest.raises(TypeError, match="does not support"):
        dx.patch(tiny_pipeline("sd"), "vca")


def test_vca_gradients_reach_new_parameters():
    pipe, record, attn, proc = _patched(16)
    record.state.latent_hw = (16, 16)
    x = torch.randn(1, 64, attn.inner_dim)
    proc.attend(attn, x).square().mean().backward()
    for name in ("pos_embedding", "neg_embedding", "lambda_q", "lambda_k", "norm1_weight", "norm2_weight"):
        assert getattr(proc, name).grad is not None and getattr(proc, name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("scale", [None, 0.3])
def test_calibration_matches_pooled_attention_rms_once_and_spares_trained_gains(scale):
    """The first batch sets the stage-II gain so that the output's RMS per channel (over batch, heads
    and tokens) is that of pooled-query agent attention softmax(s Q T^T) softmax(s T K^T) V on it
    (to_out is the identity here, so the output is the heads merged; the zero DWC adds nothing)."""
    pipe, record, attn, proc = _patched(16)
    if scale is not None:           # a layer whose softmax scale is not d^-1/2: the reference uses it too
        attn.scale = scale
    with torch.no_grad():
        attn.to_out[0].weight.copy_(torch.eye(attn.inner_dim))
        attn.to_out[0].bias.zero_()
    x = torch.randn(2, 64, attn.inner_dim)
    out = heads_of(_attend(record, attn, proc, x, (8, 8)).double(), attn.heads)
    with torch.no_grad():
        q, k, v = (heads_of(f(x).double(), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        t = pool_loop(q, (8, 8), (4, 4))
        soft = lambda a, b: torch.softmax(attn.scale * a @ b.transpose(-1, -2), -1)  # noqa: E731
        pooled = soft(q, t) @ (soft(t, k) @ v)
    rms_per_channel = lambda o: o.pow(2).mean((0, 1, 2)).sqrt()  # noqa: E731
    assert not torch.allclose(rms_per_channel(pooled), rms_per_channel(pooled).mean().expand(out.shape[-1]),
                              rtol=1e-2)                                       # the channels do differ
    torch.testing.assert_close(rms_per_channel(out), rms_per_channel(pooled), rtol=1e-5, atol=0)
    gain = proc.norm2_weight.detach().clone()
    assert not torch.equal(gain, torch.ones_like(gain))
    _attend(record, attn, proc, torch.randn(2, 64, attn.inner_dim), (8, 8))
    assert torch.equal(gain, proc.norm2_weight)                            # once only
    pipe, record, attn, proc = _patched(16)
    with torch.no_grad():
        proc.norm2_weight.fill_(0.7)                                      # a trained / loaded gain
    _attend(record, attn, proc, x, (8, 8))
    assert torch.all(proc.norm2_weight == 0.7)


def test_token_counts_must_be_perfect_squares_and_fit_the_grid():
    pipe = tiny_pipeline("dit")
    for bad in (True, 4.0, 0, -4, 3, 10):
        with pytest.raises(ValueError, match="perfect square"):
            dx.patch(pipe, "vca", tokens=bad)
    for good in (1, 4):
        dx.patch(pipe, "vca", tokens=good)
        dx.unpatch(pipe)
    pipe, record, attn, proc = _patched(64)
    with pytest.raises(ValueError, match=r"64 contrast tokens \(8 x 8\) do not fit the 6 x 10 token grid"):
        _attend(record, attn, proc, torch.randn(1, 60, attn.inner_dim), (6, 10))


def test_new_parameters_per_layer_are_the_documented_ones():
    """e+, e- (n, C); lambda_q, lambda_k (stage, pair, d); two RMSNorm gains (d); the DWC only with
    `dwc=True`; the lambda vectors differ between layers (seeded by depth) and are reproducible."""
    pipe, record, attn, proc = _patched(16)
    d = attn.inner_dim // attn.heads
    shapes = {n: tuple(p.shape) for n, p in proc.named_parameters()}
    assert shapes == {"pos_embedding": (16, attn.inner_dim), "neg_embedding": (16, attn.inner_dim),
                      "lambda_q": (2, 2, d), "lambda_k": (2, 2, d), "norm1_weight": (d,), "norm2_weight": (d,),
                      "dwc.conv.weight": (attn.inner_dim, 1, 3, 3), "dwc.conv.bias": (attn.inner_dim,)}
    first = pipe.transformer.transformer_blocks[0].attn1.processor
    assert not torch.equal(first.lambda_q, proc.lambda_q) and not torch.equal(first.lambda_k, proc.lambda_k)
    _, _, _, again = _patched(16)
    assert torch.equal(again.lambda_q, proc.lambda_q) and torch.equal(again.lambda_k, proc.lambda_k)
    pipe = tiny_pipeline("dit")
    dx.patch(pipe, "vca", tokens=16, dwc=False)
    assert not any("dwc" in n for n, _ in pipe.transformer.transformer_blocks[1].attn1.processor.named_parameters())


def test_without_calibration_the_gain_stays_at_its_init():
    pipe = tiny_pipeline("dit")
    dx.patch(pipe, "vca", tokens=16, calibrate=False)
    record, attn = dx.patch_record(pipe), pipe.transformer.transformer_blocks[1].attn1
    _attend(record, attn, attn.processor, torch.randn(2, 64, attn.inner_dim), (8, 8))
    assert torch.equal(attn.processor.norm2_weight, torch.ones_like(attn.processor.norm2_weight))


def test_constants_follow_the_model_dtype_after_a_call():
    """The frozen e+ / e- / lambdas are keyed by dtype: a float32 call, then the model in float64, gives
    the float64 dense reference to float64 precision (stale float32 constants miss it by ~1e-7)."""
    pipe, record, attn, proc = _patched(16)
    x = torch.randn(2, 64, attn.inner_dim)
    _attend(record, attn, proc, x, (8, 8))
    pipe.transformer.to(torch.float64)
    with torch.no_grad():
        for p in proc.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    x = x.double()
    with torch.no_grad():
        expected = dense_vca(attn, proc, x, (8, 8))
    torch.testing.assert_close(_attend(record, attn, proc, x, (8, 8)), expected, atol=1e-12, rtol=1e-10)
