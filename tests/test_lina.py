"""LINA (processors/lina.py, ops LINA section): the gated linear attention against a dense N x M
reference of METHODS.md section 4, the gate's effect, resolution handling of the gate, weights
save / load, and distillation on tiny DiT and SD3.5 models."""

import pytest
import torch
import torch.nn.functional as F

import diffusers_ext as dx
from diffusers_ext.ops import gated_linear_attention
from diffusers_ext.testing import tiny_dit_transformer, tiny_pipeline, tiny_sd3_transformer, tiny_sd_unet


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dense(q, k, v, gk=None, gv=None, eps=1e-6):
    """The N x M form: w_ij = gk_j phi(q_i) . phi(k_j), O = w (gv v) / (sum_j w_ij + M eps)."""
    phi = lambda x: torch.relu(x) + 1e-6  # noqa: E731
    gk = torch.ones(1, 1, 1, 1, dtype=q.dtype) if gk is None else gk
    gv = torch.ones(1, 1, 1, 1, dtype=q.dtype) if gv is None else gv
    w = (phi(q) @ phi(k).transpose(-1, -2)) * gk.transpose(-1, -2)
    return (w @ (gv * v)) / (w.sum(-1, keepdim=True) + k.shape[-2] * eps)


def _qkv(B=2, h=3, N=20, M=20, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, h, n, d, generator=g, dtype=dtype) for n in (N, M, M))


def test_linear_attention_matches_dense_reference():
    q, k, v = _qkv(N=17, M=23)
    gk, gv = torch.rand(1, 3, 23, 1, dtype=torch.float64) * 2, torch.rand(1, 3, 23, 1, dtype=torch.float64) * 2
    torch.testing.assert_close(gated_linear_attention(q, k, v, gk, gv), _dense(q, k, v, gk, gv), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gated_linear_attention(q, k, v), _dense(q, k, v), rtol=1e-10, atol=1e-12)
    # a weighted average of the values: rows of w / sum w sum to ~1, so constant values pass through
    torch.testing.assert_close(gated_linear_attention(q, k, torch.full_like(v, 3.0), gk), torch.full_like(q, 3.0),
                               rtol=1e-4, atol=0)


def test_linear_attention_computes_in_fp32():
    q, k, v = _qkv(N=64, M=64, d=16, dtype=torch.float32, seed=1)
    out = gated_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = _dense(*(t.bfloat16().double() for t in (q, k, v)))  # the same bf16 inputs, exact arithmetic
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)


def test_zero_key_gate_removes_a_position():
    q, k, v = _qkv(N=9, M=12)
    gate = torch.rand(1, 3, 12, 1, dtype=torch.float64) + 0.5
    gate[:, :, 4] = 0
    out = gated_linear_attention(q, k, v, gate, gate)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 4], v2[:, :, 4] = 1e3, -1e3  # whatever position 4 holds, it contributes nothing
    assert torch.equal(gated_linear_attention(q, k2, v2, gate, gate), out)
    keep = [j for j in range(12) if j != 4]  # = attention over the other 11 positions (eps = 0)
    torch.testing.assert_close(
        gated_linear_attention(q, k, v, gate, gate, eps=0.0),
        gated_linear_attention(q, k[:, :, keep], v[:, :, keep], gate[:, :, keep], gate[:, :, keep], eps=0.0),
        rtol=1e-12, atol=1e-12)
    # a zero value gate alone still lets the key weigh in the normaliser: not a removal
    value_only = torch.ones_like(gate)
    value_only[:, :, 4] = 0
    assert not torch.allclose(gated_linear_attention(q, k, v, None, value_only),
                              gated_linear_attention(q, k[:, :, keep], v[:, :, keep]))


# --- one converted layer against a dense reference from the module's own weights ----------------------

def _heads(x, h):
    return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)


def _merge(o):
    return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)


def _conv_tokens(conv, x, grid):  # x (B, N, C) -> depthwise conv on the grid -> (B, N, C)
    B, N, C = x.shape
    image = x.reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2)
    y = F.conv2d(image, conv.conv.weight, conv.conv.bias, padding=conv.conv.padding, groups=C)
    return y.permute(0, 2, 3, 1).reshape(B, N, C)


def _randomise(proc):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in proc.named_parameters():
            if "gate" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 2)
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("conv_on", ["input", "value"])
def test_self_processor_matches_dense_reference(conv_on):
    torch.manual_seed(0)
    model = tiny_dit_transformer().eval()
    record = dx.patch(model, "lina", conv_on=conv_on)
    assert record.options["gate_grid"] == (8, 8)  # sample_size 16 / patch 2
    attn = model.transformer_blocks[1].attn1
    proc = attn.processor
    _randomise(proc)
    x = torch.randn(2, 64, 16)
    record.state.latent_hw = (16, 16)
    with torch.no_grad():
        got = attn(x)
        h = attn.heads
        q, k, v = _heads(attn.to_q(x), h), _heads(attn.to_k(x), h), _heads(attn.to_v(x), h)
        o = _dense(q, k, v, proc.key_gate, proc.value_gate)
        local = _conv_tokens(proc.conv, x if conv_on == "input" else _merge(v), (8, 8))
        ref = attn.to_out[0](_merge(o) + local)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("text_tokens,gate_tokens", [("linear", 3), ("softmax", 9)])
def test_joint_processor_matches_dense_reference(text_tokens, gate_tokens):
    torch.manual_seed(0)
    model = tiny_sd3_transformer(sd35=True).eval()
    record = dx.patch(model, "lina", text_tokens=text_tokens, text_gate_tokens=gate_tokens, gate_grid=(6, 6))
    attn = model.transformer_blocks[0].attn
    proc = attn.processor
    _randomise(proc)
    x, c = torch.randn(2, 36, 32), torch.randn(2, 5, 32)
    record.state.latent_hw = (6, 6)
    with torch.no_grad():
        got = attn(hidden_states=x, encoder_hidden_states=c)
        h = attn.heads
        q, k, v = _heads(attn.to_q(x), h), _heads(attn.to_k(x), h), _heads(attn.to_v(x), h)
        qc, kc, vc = _heads(attn.add_q_proj(c), h), _heads(attn.add_k_proj(c), h), _heads(attn.add_v_proj(c), h)
        q, k, qc, kc = attn.norm_q(q), attn.norm_k(k), attn.norm_added_q(qc), attn.norm_added_k(kc)
        # text gates over the first `gate_tokens` text positions, 1 beyond (5 text tokens here)
        text_k, text_v = torch.ones(1, h, 5, 1), torch.ones(1, h, 5, 1)
        n = min(gate_tokens, 5)
        text_k[:, :, :n], text_v[:, :, :n] = proc.text_key_gate[:, :, :n], proc.text_value_gate[:, :, :n]
        gk, gv = torch.cat([proc.key_gate, text_k], 2), torch.cat([proc.value_gate, text_v], 2)
        keys, values = torch.cat([k, kc], 2), torch.cat([v, vc], 2)
        oi = _dense(q, keys, values, gk, gv)
        if text_tokens == "linear":
            oc = _dense(qc, keys, values, gk, gv)
        else:
            oc = torch.softmax(attn.scale * qc @ keys.transpose(-1, -2), -1) @ values
        ref_image = attn.to_out[0](_merge(oi) + _conv_tokens(proc.conv, x, (6, 6)))
        ref_text = attn.to_add_out(_merge(oc))
    torch.testing.assert_close(got[0], ref_image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], ref_text, rtol=1e-4, atol=1e-5)


# --- resolution ----------------------------------------------------------------------------------------

def _dit_call(model, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, size, size, generator=g)
    with torch.no_grad():
        return model(x, timestep=torch.tensor([100, 700]), class_labels=torch.tensor([3, 5])).sample


def test_gate_resize_interpolate_and_reset():
    model = tiny_dit_transformer().eval()
    dx.patch(model, "lina")
    proc = model.transformer_blocks[0].attn1.processor
    with torch.no_grad():  # a smooth gate: a ramp over the rows of the 8 x 8 grid, per head
        ramp = torch.linspace(0.2, 1.8, 8).repeat_interleave(8)
        proc.key_gate.copy_(torch.stack([ramp, ramp.flip(0)]).view(1, 2, 64, 1))
    assert proc.image_gates((8, 8))[0] is proc.key_gate  # the training grid: the parameter itself
    big = proc.image_gates((12, 12))[0]
    expected = F.interpolate(proc.key_gate.detach().view(1, 2, 8, 8), size=(12, 12), mode="bilinear",
                             align_corners=False).view(1, 2, 144, 1)
    torch.testing.assert_close(big.detach(), expected)
    column = big.detach().view(2, 12, 12)
    assert torch.all(column[0, 1:, 0] >= column[0, :-1, 0]) and torch.allclose(column[0, 0], column[0, 0, :1])
    big.sum().backward()  # gradients flow to the stored gate through the interpolation
    assert proc.key_gate.grad is not None and proc.key_gate.grad.abs().sum() > 0
    interpolated = _dit_call(model, 24)  # a 12 x 12 token grid

    dx.patch(model, "lina", gate_resize="reset")
    model.transformer_blocks[0].attn1.processor.load_state_dict(proc.state_dict())
    assert model.transformer_blocks[0].attn1.processor.image_gates((12, 12)) == (None, None)
    reset = _dit_call(model, 24)
    assert torch.isfinite(interpolated).all() and not torch.allclose(interpolated, reset)
    dx.patch(model, "lina")  # fresh gates of 1: interpolating them is the same as resetting
    ones = _dit_call(model, 24)
    dx.patch(model, "lina", gate_resize="reset")
    torch.testing.assert_close(_dit_call(model, 24), ones, rtol=1e-5, atol=1e-6)


def test_sequence_text_gate_cut_and_padded():
    from diffusers_ext.processors.lina import fit_sequence_gate

    gate = torch.arange(1.0, 5.0).view(1, 1, 4, 1)
    assert fit_sequence_gate(gate, 2).flatten().tolist() == [1.0, 2.0]
    assert fit_sequence_gate(gate, 6).flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 1.0, 1.0]


# --- the patch: start point, options, restore, weights ----------------------------------------------------

def _sd3_call(model, seed=0, text=7):
    g = torch.Generator().manual_seed(seed)
    x, c, p = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, text, 32, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        return model(x, encoder_hidden_states=c, pooled_projections=p, timestep=torch.tensor([300.0, 700.0])).sample


def test_start_point_options_and_exact_restore():
    model = tiny_sd3_transformer(sd35=True).eval()
    stock = _sd3_call(model)
    record = dx.patch(model, "lina")
    assert record.sites == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]
    assert record.options["gate_grid"] == (32, 32) and record.options["text_gate_tokens"] == 333
    proc = model.transformer_blocks[0].attn.processor
    assert not proc.conv.conv.weight.detach().any() and not proc.conv.conv.bias.detach().any()
    assert proc.key_gate.shape == (1, 4, 1024, 1) and torch.all(proc.text_value_gate == 1)
    assert not hasattr(model.transformer_blocks[0].attn2.processor, "text_key_gate")  # image-only self-attention
    patched = _sd3_call(model)
    assert torch.isfinite(patched).all() and not torch.equal(patched, stock)
    assert dx.patch(model, "lina", dual_attention=False, blocks=[1]).sites == ["transformer_blocks.1.attn"]
    dx.unpatch(model)
    assert torch.equal(_sd3_call(model), stock) and not hasattr(model, "_diffusers_ext_patch")
    for bad, match in [(dict(gate_resize="nearest"), "gate_resize"), (dict(gate_grid=(8,)), "gate_grid"),
                       (dict(text_tokens="ttt"), "text_tokens"), (dict(conv_kernel=4), "conv_kernel"),
                       (dict(blocks=[7]), "no block")]:
        with pytest.raises(ValueError, match=match):
            dx.patch(model, "lina", **bad)
    with pytest.raises(ValueError, match="text_gate_tokens"):
        dx.patch(tiny_dit_transformer(), "lina", text_gate_tokens=77)
    with pytest.raises(TypeError, match="does not support"):
        dx.patch(tiny_sd_unet(), "lina")
    with pytest.raises(ValueError, match="do not form a grid"):
        dx.patch(model, "lina")
        _sd3_call_latent(model, 5)


def _sd3_call_latent(model, size):
    record = dx.patch_record(model)
    record.state.latent_hw = (size, size)
    attn = model.transformer_blocks[1].attn
    attn.processor.joint_attend(attn, torch.randn(1, 64, 32), torch.randn(1, 3, 32))


def test_weights_roundtrip_and_grid_mismatch(tmp_path):
    from diffusers_ext.weights import save_weights

    model = tiny_sd3_transformer(sd35=True).eval()
    record = dx.patch(model, "lina", gate_grid=(8, 8), text_gate_tokens=16)
    for name in record.sites:
        _randomise(dict(model.named_modules())[name].processor)
    tensors = {k: v for k, v in model.state_dict().items() if ".processor." in k}
    assert any("text_key_gate" in k for k in tensors) and any(k.endswith("conv.conv.weight") for k in tensors)
    save_weights(tmp_path, model, record, tensors)
    expected = _sd3_call(model)

    fresh = tiny_sd3_transformer(sd35=True).eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".processor." not in k})
    loaded = dx.patch(fresh, "lina", weights=str(tmp_path))
    assert loaded.options["gate_grid"] == (8, 8) and loaded.options["text_gate_tokens"] == 16
    torch.testing.assert_close(_sd3_call(fresh), expected)
    with pytest.raises(ValueError, match="do not fit"):  # gates trained at 8 x 8 do not load as 4 x 4
        dx.patch(fresh, "lina", weights=str(tmp_path), gate_grid=(4, 4))


# --- distillation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["dit", "sd35"])
def test_distillation_reduces_deviation(tmp_path, family):
    """Tiny DiT starts within 0.15 % of stock: the gates and conv alone do not halve that, so its
    projections adapt too (inherited_lr); on tiny SD3.5 the new parameters alone do it."""
    from accelerate.state import AcceleratorState

    from diffusers_ext.distill import DistillConfig, Distiller

    AcceleratorState._reset_state(True)
    extra = ({"prompts": ["a cat", "a dog on a hill", "a red car at night"]} if family == "sd35"
             else {"inherited_lr": 3e-3})
    config = DistillConfig(output_dir=str(tmp_path / "out"), max_steps=60, lr=3e-3, batch_size=2, progress=False,
                           **extra)
    pipe = tiny_pipeline(family)
    result = Distiller(pipe, "lina", config, latent_size=8 if family == "sd35" else None).train()
    AcceleratorState._reset_state(True)
    assert result.deviation_before / result.deviation_after >= 2.0, (result.deviation_before, result.deviation_after)
    denoiser = pipe.transformer
    trained = _dit_call(denoiser, 16) if family == "dit" else _sd3_call(denoiser, text=333)
    dx.unpatch(pipe)
    dx.patch(pipe, "lina", weights=str(tmp_path / "out"))  # a fresh patch loads what the trainer saved
    again = _dit_call(denoiser, 16) if family == "dit" else _sd3_call(denoiser, text=333)
    torch.testing.assert_close(again, trained)
