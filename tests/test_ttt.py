"""T^5 (processors/ttt.py, ops TTT section): closed forms against autograd and against a dense
reference of METHODS.md section 3 written here from the module's weights."""

import pytest
import torch
import torch.nn.functional as F

import diffusers_ext as dx
from diffusers_ext.ops import key_instance_norm, ttt_attention, ttt_inner_step
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


def test_key_instance_norm_matches_torch():
    k = 3 + 2 * torch.randn(2, 4, 50, 8)
    ref = F.instance_norm(k.transpose(-1, -2).reshape(2, 32, 50), eps=1.0).reshape(2, 4, 8, 50).transpose(-1, -2)
    torch.testing.assert_close(key_instance_norm(k, 1.0), ref, rtol=1e-5, atol=1e-5)


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


def _reference_joint(attn, proc, x, c, grid, text_tokens):
    h = attn.heads
    q, k, v = _heads(attn.to_q(x), h), _heads(attn.to_k(x), h), _heads(attn.to_v(x), h)
    qc, kc, vc = _heads(attn.add_q_proj(c), h), _heads(attn.add_k_proj(c), h), _heads(attn.add_v_proj(c), h)
    if attn.norm_q is not None:
        q, k, qc, kc = attn.norm_q(q), attn.norm_k(k), attn.norm_added_q(qc), attn.norm_added_k(kc)
    qi, ki = _conv(proc.q_conv, q, grid), _conv(proc.k_conv, _inorm(k), grid)
    keys, values = torch.cat([ki, _inorm(kc)], 2), torch.cat([v, vc], 2)
    if text_tokens == "ttt":
        o = _ttt(torch.cat([qi, qc], 2), keys, values, proc.w1, proc.w2, attn.scale)
        oi, oc = o[:, :, : x.shape[1]], o[:, :, x.shape[1]:]
    else:
        oi = _ttt(qi, keys, values, proc.w1, proc.w2, attn.scale)
        oc = torch.softmax(attn.scale * qc @ torch.cat([k, kc], 2).transpose(-1, -2), -1) @ values
    merge = lambda o: o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)  # noqa: E731
    return attn.to_out[0](merge(oi)), attn.to_add_out(merge(oc))


def _randomise(proc):
    with torch.no_grad():
        for p in proc.parameters():
            p.normal_(0, 0.2)


@pytest.mark.parametrize("text_tokens", ["softmax", "ttt"])
def test_joint_processor_matches_dense_reference(text_tokens):
    torch.manual_seed(0)
    model = tiny_sd3_transformer(sd35=True).eval()
    record = dx.patch(model, "t5", text_tokens=text_tokens)
    attn = model.transformer_blocks[0].attn
    proc = attn.processor
    _randomise(proc)
    x, c = torch.randn(2, 36, 32), torch.randn(2, 5, 32)
    record.state.latent_hw = (6, 6)
    with torch.no_grad():
        got = attn(hidden_states=x, encoder_hidden_states=c)
    ref = _reference_joint(attn, proc, x, c, (6, 6), text_tokens)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-5)


def test_self_processor_matches_dense_reference():
    torch.manual_seed(0)
    model = tiny_dit_transformer().eval()
    record = dx.patch(model, "t5")
    attn = model.transformer_blocks[1].attn1
    proc = attn.processor
    _randomise(proc)
    x = torch.randn(2, 64, 16)
    record.state.latent_hw = (16, 16)  # patch size 2 -> an 8 x 8 token grid
    with torch.no_grad():
        got = attn(x)
    h = attn.heads
    q, k, v = _heads(attn.to_q(x), h), _heads(attn.to_k(x), h), _heads(attn.to_v(x), h)
    o = _ttt(_conv(proc.q_conv, q, (8, 8)), _conv(proc.k_conv, _inorm(k), (8, 8)), v, proc.w1, proc.w2, attn.scale)
    ref = attn.to_out[0](o.transpose(1, 2).reshape(2, 64, -1))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


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
    assert 0 < float(proc.w1.std()) < 0.03
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
