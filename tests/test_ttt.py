"""T^5 (processors/ttt.py, ops TTT and neighbourhood sections): closed forms against autograd, the
neighbourhood attention against a brute-force loop over every query, and each processor against a
dense reference of METHODS.md section 3 / the released DiT5 `MixedAttention`, written here from the
module's weights."""

import pytest
import torch
import torch.nn.functional as F

import diffusers_ext as dx
import diffusers_ext.ops as ops
from diffusers_ext.ops import key_instance_norm, neighborhood_attention, ttt_attention, ttt_inner_step
from diffusers_ext.processor import merge_heads, project_kv, project_out, project_q, split_heads
from diffusers_ext.testing import tiny_dit_transformer, tiny_sd3_transformer, tiny_sd_unet


def test_inner_step_matches_autograd():
    torch.manual_seed(0)
    B, h, N, d = 2, 3, 17, 8
    k, v = torch.randn(B, h, N, d, dtype=torch.float64), torch.randn(B, h, N, d, dtype=torch.float64)
    w1 = (0.3 * torch.randn(h, d, d, dtype=torch.float64)).requires_grad_()
    w2 = (0.3 * torch.randn(h, d, d, dtype=torch.float64)).requires_grad_()
    s = d**-0.5
    new1, new2 = ttt_inner_step(k, v, w1, w2, s)
    for b in range(B):  # the loss of one sequence: L = s / (2N) sum_i ||SiLU(k_i W1) W2 - v_i||^2
        loss = s / (2 * N) * (F.silu(k[b] @ w1) @ w2 - v[b]).pow(2).sum()
        g1, g2 = torch.autograd.grad(loss, (w1, w2))
        torch.testing.assert_close(new1[b], (w1 - g1).detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(new2[b], (w2 - g2).detach(), rtol=1e-10, atol=1e-12)


def test_ttt_attention_reads_updated_model_and_is_differentiable():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    w1, w2 = (torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = ttt_attention(q, k, v, w1, w2, 0.5)
    n1, n2 = ttt_inner_step(k, v, w1, w2, 0.5)
    torch.testing.assert_close(out, F.silu(q @ n1) @ n2)
    assert torch.autograd.gradcheck(lambda a, b: ttt_attention(q, k, v, a, b, 0.5), (w1, w2))


@pytest.mark.parametrize("chunk", [1, 28, 56, 112])   # elements of q a step: one head of 1, 1, 2, 3 samples
@pytest.mark.parametrize("shared_inner", [False, True])   # inner weights (h, d, d) or one (1, d, d) for all heads
def test_ttt_attention_in_chunks_is_the_same(monkeypatch, chunk, shared_inner):
    """One head of a few samples per step (as on the CPU) gives what all at once gives,
    in q's memory layout (heads of a projection: a (B, N, h, d) view); keys and values may be longer
    than the queries (joint attention)."""
    from diffusers_ext import ops

    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 7, 2, 4, dtype=torch.float64, generator=g).transpose(1, 2)   # (B, h, N, d) view
    k, v = (torch.randn(3, 2, 11, 4, dtype=torch.float64, generator=g) for _ in range(2))
    w1, w2 = (0.3 * torch.randn(1 if shared_inner else 2, 4, 4, dtype=torch.float64, generator=g) for _ in range(2))
    expected = torch.stack([torch.stack([ops.ttt_read(q[b, h], *ops.ttt_inner_step(
        k[b, h], v[b, h], w1[0 if shared_inner else h], w2[0 if shared_inner else h], 0.7)) for h in range(2)])
        for b in range(3)])
    torch.testing.assert_close(ttt_attention(q, k, v, w1, w2, 0.7), expected, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(ops, "TTT_CPU_CHUNK", chunk)
    chunked = ttt_attention(q, k, v, w1, w2, 0.7)
    torch.testing.assert_close(chunked, expected, rtol=1e-12, atol=1e-12)
    assert chunked.stride() == q.stride()


def test_key_instance_norm_matches_torch():
    k = 3 + 2 * torch.randn(2, 4, 50, 8)
    ref = F.instance_norm(k.transpose(-1, -2).reshape(2, 32, 50), eps=1.0).reshape(2, 4, 8, 50).transpose(-1, -2)
    torch.testing.assert_close(key_instance_norm(k, 1.0), ref, rtol=1e-5, atol=1e-5)


def test_half_precision_inner_step_keeps_the_update():
    """bf16 / fp16 inputs: the step runs in fp32 and returns fp32 W', so the update G (~1e-3 of W, below
    bf16's resolution of W) survives; it matches the fp64 step on the same rounded inputs."""
    torch.manual_seed(2)
    k = key_instance_norm(torch.randn(1, 2, 4096, 16, dtype=torch.float64))
    v = torch.randn(1, 2, 4096, 16, dtype=torch.float64)
    w1, w2 = (0.02 * torch.randn(2, 16, 16, dtype=torch.float64) for _ in range(2))
    for dtype in (torch.bfloat16, torch.float16):
        low = [x.to(dtype) for x in (k, v, w1, w2)]
        ref1, ref2 = ttt_inner_step(*(x.double() for x in low), 0.125)
        new1, new2 = ttt_inner_step(*low, 0.125)
        assert new1.dtype == new2.dtype == torch.float32
        for new, ref, w in ((new1, ref1, low[2]), (new2, ref2, low[3])):
            update, ref_update = w.double() - new.double(), w.double() - ref
            assert float((update - ref_update).norm() / ref_update.norm()) < 1e-4
        assert ops.ttt_read(low[0], new1, new2).dtype == dtype


def _window(i, length, kernel):
    """NATTEN's window start along one axis (its get_window_start, dilation 1), and the window size;
    an axis shorter than the kernel is one window."""
    if length < kernel:
        return 0, length
    half = kernel // 2
    start = max(i - half, 0) + ((length - i - half - 1) if i + half >= length else 0)
    return start, kernel


def _na_brute(q, k, v, grid, kernel, scale, rpb=None):
    """Neighbourhood attention, one query at a time: softmax over its window's keys."""
    height, width = grid
    out = torch.empty_like(q)
    for i in range(height):
        for j in range(width):
            (y0, ny), (x0, nx) = _window(i, height, kernel), _window(j, width, kernel)
            keys = [(y, x) for y in range(y0, y0 + ny) for x in range(x0, x0 + nx)]
            index = torch.tensor([y * width + x for y, x in keys])
            logits = scale * torch.einsum("bhd,bhkd->bhk", q[:, :, i * width + j], k[:, :, index])
            if rpb is not None:
                logits = logits + torch.stack([rpb[:, y - i + kernel - 1, x - j + kernel - 1] for y, x in keys], -1)
            out[:, :, i * width + j] = torch.einsum("bhk,bhkd->bhd", logits.softmax(-1), v[:, :, index])
    return out


NA_CASES = [((7, 9), 5), ((13, 10), 5), ((4, 6), 5), ((9, 9), 3), ((10, 12), 7), ((5, 5), 1), ((17, 3), 5), ((2, 2), 5)]


@pytest.mark.parametrize("grid,kernel", NA_CASES)
@pytest.mark.parametrize("with_rpb", [False, True])
def test_neighborhood_attention_matches_brute_force(grid, kernel, with_rpb):
    """Every query, corners and borders included (NATTEN's shifted windows), in fp64; fp32 close."""
    torch.manual_seed(3)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(2, 3, n, 5, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(3, 2 * kernel - 1, 2 * kernel - 1, dtype=torch.float64) if with_rpb else None
    ref = _na_brute(q, k, v, grid, kernel, 0.6, rpb)
    got = neighborhood_attention(q, k, v, grid, kernel, 0.6, rpb)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    low = neighborhood_attention(q.float(), k.float(), v.float(), grid, kernel, 0.6,
                                 None if rpb is None else rpb.float())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), ref, rtol=1e-5, atol=1e-5)


def test_neighborhood_attention_in_chunks_and_exact_windows(monkeypatch):
    """One (batch, head) row per step (the per-head bias picked per row), and with q = 0 every query
    averages exactly K x K values: v = one-hot token ids shows each window."""
    torch.manual_seed(4)
    grid, kernel, n = (11, 9), 5, 99
    q, k, v = (torch.randn(2, 3, n, 4, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(3, 9, 9, dtype=torch.float64)
    whole = neighborhood_attention(q, k, v, grid, kernel, 0.5, rpb)
    monkeypatch.setattr(ops, "NEIGHBORHOOD_CPU_CHUNK", 1)
    torch.testing.assert_close(neighborhood_attention(q, k, v, grid, kernel, 0.5, rpb), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole, _na_brute(q, k, v, grid, kernel, 0.5, rpb), rtol=1e-12, atol=1e-12)

    ids = torch.eye(n, dtype=torch.float64).expand(1, 1, n, n)
    seen = neighborhood_attention(torch.zeros(1, 1, n, n, dtype=torch.float64), ids, ids, grid, kernel, 1.0)[0, 0]
    for i in range(grid[0]):
        for j in range(grid[1]):
            (y0, _), (x0, _) = _window(i, grid[0], kernel), _window(j, grid[1], kernel)
            expect = torch.zeros(grid, dtype=torch.float64)
            expect[y0:y0 + kernel, x0:x0 + kernel] = 1 / kernel**2
            torch.testing.assert_close(seen[i * grid[1] + j].view(grid), expect, rtol=0, atol=1e-15)


def test_neighborhood_attention_blended_in_place(monkeypatch):
    """`blend_into`: lerp(into, attention, w) written into `into` step by step (one (sample, head) a step
    here), against the brute force; with a gradient, the same values through plain ops."""
    torch.manual_seed(6)
    grid, kernel, n = (7, 9), 5, 63
    q, k, v = (torch.randn(2, 3, n, 4, dtype=torch.float64) for _ in range(3))
    into = torch.randn(2, n, 3, 4, dtype=torch.float64).transpose(1, 2)      # a (B, N, h, d) view, as T^5's
    expected = torch.lerp(into, _na_brute(q, k, v, grid, kernel, 0.5), 0.3)
    monkeypatch.setattr(ops, "NEIGHBORHOOD_CPU_CHUNK", 1)
    target = into.clone()
    got = neighborhood_attention(q, k, v, grid, kernel, 0.5, blend_into=target, weight=0.3)
    assert got.data_ptr() == target.data_ptr()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    trained = into.clone().requires_grad_()
    plain = neighborhood_attention(q, k, v, grid, kernel, 0.5, blend_into=trained, weight=0.3)
    torch.testing.assert_close(plain, expected, rtol=1e-12, atol=1e-12)
    plain.sum().backward()
    torch.testing.assert_close(trained.grad, torch.full_like(into, 0.7))


def test_neighborhood_attention_gradients_and_errors():
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 1, 20, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(1, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: neighborhood_attention(*a[:3], (4, 5), 3, 0.7, a[3]), (q, k, v, rpb))
    with pytest.raises(ValueError, match="odd"):
        neighborhood_attention(q, k, v, (4, 5), 4, 0.7)
    with pytest.raises(ValueError, match="not a 5 x 5 grid"):
        neighborhood_attention(q, k, v, (5, 5), 3, 0.7)
    with pytest.raises(ValueError, match="rpb must be"):
        neighborhood_attention(q, k, v, (4, 5), 3, 0.7, torch.zeros(1, 3, 3))


# --- dense reference of one converted layer, from the module's own weights -------------------------------

def _heads(x, h):
    return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)


def _conv(conv, x, grid):  # x (B, h, N, d): residual depthwise conv over all h*d channels
    B, h, N, d = x.shape
    image = x.transpose(1, 2).reshape(B, grid[0], grid[1], h * d).permute(0, 3, 1, 2)
    y = F.conv2d(image, conv.conv.weight, conv.conv.bias, padding=1, groups=h * d)
    return x + y.permute(0, 2, 3, 1).reshape(B, N, h, d).transpose(1, 2)


def _inorm(k):
    return (k - k.mean(2, keepdim=True)) / (k.var(2, unbiased=False, keepdim=True) + 1).sqrt()


def _ttt(q, k, v, w1, w2, s):
    """Per batch and head, the plain loop over the equations (autograd for the inner step)."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            a1, a2 = w1[i].clone().requires_grad_(), w2[i].clone().requires_grad_()
            loss = s / (2 * k.shape[2]) * ((F.silu(k[b, i] @ a1) @ a2) - v[b, i]).pow(2).sum()
            g1, g2 = torch.autograd.grad(loss, (a1, a2))
            out[b, i] = F.silu(q[b, i] @ (a1 - g1)) @ (a2 - g2)
    return out


def _ttt_qk(proc, q, k, grid, local, key_offset):
    """The TTT branch's queries / keys; with the local branch the released rescaling, key offset included
    (the instance norm removes it: the processor has none)."""
    if local:
        q, k = q * proc.q_scale + proc.q_offset, k * proc.k_scale + key_offset
    return _conv(proc.q_conv, q, grid), _conv(proc.k_conv, _inorm(k), grid)


def _blend(o_ttt, q, k, v, grid, s, local):  # the released mix: 0.5 NA_5x5 + 0.5 TTT
    return 0.5 * _na_brute(q, k, v, grid, 5, s) + 0.5 * o_ttt if local else o_ttt


def _reference_joint(attn, proc, x, c, grid, text_tokens, local, key_offset):
    h = attn.heads
    q, k, v = _heads(attn.to_q(x), h), _heads(attn.to_k(x), h), _heads(attn.to_v(x), h)
    qc, kc, vc = _heads(attn.add_q_proj(c), h), _heads(attn.add_k_proj(c), h), _heads(attn.add_v_proj(c), h)
    if attn.norm_q is not None:
        q, k, qc, kc = attn.norm_q(q), attn.norm_k(k), attn.norm_added_q(qc), attn.norm_added_k(kc)
    qi, ki = _ttt_qk(proc, q, k, grid, local, key_offset)
    keys, values = torch.cat([ki, _inorm(kc)], 2), torch.cat([v, vc], 2)
    if text_tokens == "ttt":
        o = _ttt(torch.cat([qi, qc], 2), keys, values, proc.w1, proc.w2, attn.scale)
        oi, oc = o[:, :, : x.shape[1]], o[:, :, x.shape[1]:]
    else:
        oi = _ttt(qi, keys, values, proc.w1, proc.w2, attn.scale)
        oc = torch.softmax(attn.scale * qc @ torch.cat([k, kc], 2).transpose(-1, -2), -1) @ values
    oi = _blend(oi, q, k, v, grid, attn.scale, local)
    merge = lambda o: o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)  # noqa: E731
    return attn.to_out[0](merge(oi)), attn.to_add_out(merge(oc))


def _reference_self(attn, proc, x, grid, local, key_offset):
    h = attn.heads
    q, k, v = _heads(attn.to_q(x), h), _heads(attn.to_k(x), h), _heads(attn.to_v(x), h)
    qi, ki = _ttt_qk(proc, q, k, grid, local, key_offset)
    o = _blend(_ttt(qi, ki, v, proc.w1, proc.w2, attn.scale), q, k, v, grid, attn.scale, local)
    return attn.to_out[0](o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def _randomise(proc):
    with torch.no_grad():
        for p in proc.parameters():
            p.normal_(0, 0.2)
        for name in ("q_scale", "k_scale"):  # the rescaling around its identity start
            if hasattr(proc, name):
                getattr(proc, name).add_(1)


# fp64: the dense reference to ~1e-12; fp32: within 1e-5 of its own fp32 reference
PRECISIONS = [(torch.float64, 1e-12), (torch.float32, 1e-5)]


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("local", ["neighborhood", "none"])
@pytest.mark.parametrize("text_tokens", ["softmax", "ttt"])
def test_joint_processor_matches_dense_reference(text_tokens, local, dtype, tol):
    torch.manual_seed(0)
    model = tiny_sd3_transformer(sd35=True).eval().to(dtype)
    record = dx.patch(model, "t5", text_tokens=text_tokens, local=local)
    attn = model.transformer_blocks[0].attn
    attn.scale = 0.7 * attn.scale   # not d^-1/2, so a processor that drops the scale is seen
    proc = attn.processor
    _randomise(proc)
    x, c = torch.randn(2, 36, 32, dtype=dtype), torch.randn(2, 5, 32, dtype=dtype)
    record.state.latent_hw = (6, 6)  # a 6 x 6 token grid: windows shift at every border
    with torch.no_grad():
        got = attn(hidden_states=x, encoder_hidden_states=c)
    ref = _reference_joint(attn, proc, x, c, (6, 6), text_tokens, local == "neighborhood",
                           torch.randn(attn.heads, 1, 8, dtype=dtype))
    assert got[0].dtype == got[1].dtype == dtype
    torch.testing.assert_close(got[0], ref[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], ref[1], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("local", ["neighborhood", "none"])
def test_self_processor_matches_dense_reference(local, dtype, tol):
    torch.manual_seed(0)
    model = tiny_dit_transformer().eval().to(dtype)
    record = dx.patch(model, "t5", local=local)
    attn = model.transformer_blocks[1].attn1
    proc = attn.processor
    _randomise(proc)
    x = torch.randn(2, 64, 16, dtype=dtype)
    record.state.latent_hw = (16, 16)  # patch size 2 -> an 8 x 8 token grid
    with torch.no_grad():
        got = attn(x)
    ref = _reference_self(attn, proc, x, (8, 8), local == "neighborhood", torch.randn(attn.heads, 1, 8, dtype=dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def _previous_self_attend(attn, proc, x, grid):
    """T^5's self-attention as it was before the local branch, from the same ops."""
    q = project_q(attn, x)
    k, v = project_kv(attn, x)
    conv = lambda layer, t: t + split_heads(layer(merge_heads(t), grid), attn.heads)  # noqa: E731
    k = key_instance_norm(k, 1.0)
    out = ttt_attention(conv(proc.q_conv, q), conv(proc.k_conv, k), v, proc.w1, proc.w2, attn.scale)
    return project_out(attn, out, x.dtype)


def test_local_none_is_the_previous_form():
    """In fp64, to rounding: the residual convs now run as one conv with the identity in its kernel."""
    torch.manual_seed(0)
    model = tiny_dit_transformer().double().eval()
    record = dx.patch(model, "t5", local="none")
    attn = model.transformer_blocks[1].attn1
    proc = attn.processor
    _randomise(proc)
    assert sorted(n for n, _ in proc.named_parameters()) == [
        "k_conv.conv.bias", "k_conv.conv.weight", "q_conv.conv.bias", "q_conv.conv.weight", "w1", "w2"]
    x = torch.randn(2, 64, 16, dtype=torch.float64)
    record.state.latent_hw = (16, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _previous_self_attend(attn, proc, x, (8, 8)), rtol=1e-13, atol=1e-13)


def test_release_start_and_options():
    torch.manual_seed(0)
    model = tiny_dit_transformer().eval()
    dx.patch(model, "t5")
    proc = model.transformer_blocks[0].attn1.processor
    assert proc.local == "neighborhood" and proc.kernel_size == 5
    ones = torch.ones(2, 1, 8)
    assert torch.equal(proc.q_scale.detach(), ones) and torch.equal(proc.k_scale.detach(), ones)
    assert not proc.q_offset.detach().any() and proc.q_offset.shape == (2, 1, 8)
    # released init: trunc_normal_(std=0.02) with absolute bounds +-2, so values beyond 2 sigma exist
    inner = torch.cat([proc.w1.detach().flatten(), proc.w2.detach().flatten()])
    assert (inner.abs() > 2 * 0.02).any() and inner.abs().max() < 0.2
    with pytest.raises(ValueError, match="local_kernel.*odd"):
        dx.patch(model, "t5", local_kernel=4)
    with pytest.raises(ValueError, match="local"):
        dx.patch(model, "t5", local="natten")
    with pytest.raises(ValueError, match="inner_init_std"):
        dx.patch(model, "t5", inner_init_std=0.0)
    # the release's conv init: torch's default (random, one draw per conv), not zero
    proc = dx.patch(model, "t5", conv_init="default").denoiser.transformer_blocks[0].attn1.processor
    q_conv, k_conv = proc.q_conv.conv.weight.detach(), proc.k_conv.conv.weight.detach()
    assert q_conv.abs().min() > 0 and k_conv.abs().min() > 0 and not torch.equal(q_conv, k_conv)
    # every new parameter follows the model's dtype
    model64 = tiny_dit_transformer().eval().double()
    dx.patch(model64, "t5")
    assert {p.dtype for p in model64.transformer_blocks[0].attn1.processor.parameters()} == {torch.float64}


def _sd3_call(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c, p = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        return model(x, encoder_hidden_states=c, pooled_projections=p, timestep=torch.tensor([300.0, 700.0])).sample


def test_sites_options_and_exact_restore():
    model = tiny_sd3_transformer(sd35=True).eval()
    stock = _sd3_call(model)
    record = dx.patch(model, "t5")
    assert record.sites == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]
    patched = _sd3_call(model)
    assert patched.shape == stock.shape and torch.isfinite(patched).all() and not torch.equal(patched, stock)
    assert dx.patch(model, "t5", dual_attention=False).sites == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert dx.patch(model, "t5", blocks=[1]).sites == ["transformer_blocks.1.attn"]
    dx.unpatch(model)
    assert torch.equal(_sd3_call(model), stock)
    with pytest.raises(ValueError, match="no block"):
        dx.patch(model, "t5", blocks=[5])
    with pytest.raises(ValueError, match="text_tokens"):
        dx.patch(model, "t5", text_tokens="drop")
    with pytest.raises(TypeError, match="does not support"):
        dx.patch(tiny_sd_unet(), "t5")
    assert not hasattr(model, "_diffusers_ext_patch")


def test_zero_conv_start_and_resolution_error():
    model = tiny_dit_transformer().eval()
    dx.patch(model, "t5")
    proc = model.transformer_blocks[0].attn1.processor
    assert all(float(p.detach().abs().max()) == 0 for p in (*proc.q_conv.parameters(), *proc.k_conv.parameters()))
    assert 0 < float(proc.w1.detach().std()) < 0.03
    with pytest.raises(ValueError, match="do not form a grid"):
        proc.state.latent_hw = (9, 9)
        proc.self_attend(model.transformer_blocks[0].attn1, torch.randn(1, 64, 16))


def test_weights_roundtrip_and_mismatch(tmp_path):
    from diffusers_ext.weights import save_weights

    model = tiny_sd3_transformer(sd35=True).eval()
    record = dx.patch(model, "t5", text_tokens="ttt")
    for name in record.sites:
        _randomise(dict(model.named_modules())[name].processor)
    tensors = {k: v for k, v in model.state_dict().items() if ".processor." in k}
    save_weights(tmp_path, model, record, tensors)
    expected = _sd3_call(model)

    torch.manual_seed(0)
    fresh = tiny_sd3_transformer(sd35=True).eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".processor." not in k})
    loaded = dx.patch(fresh, "t5", weights=str(tmp_path))
    assert loaded.options["text_tokens"] == "ttt"
    torch.testing.assert_close(_sd3_call(fresh), expected)

    with pytest.raises(ValueError, match="do not fit|made for"):
        dx.patch(tiny_sd3_transformer(sd35=False), "t5", weights=str(tmp_path))
