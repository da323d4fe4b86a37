"""LINA (processors/lina.py, ops LINA section): the gated linear attention against a dense N x M
reference of METHODS.md section 4, encoder blocks against LINA's released equations (loops over the
keys), the released encoder / decoder layout, float64 kept float64, the gate's effect, resolution
handling of the gate, weights save / load, and distillation on tiny DiT and SD3.5 models."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rounded_from_exact
from torch.overrides import TorchFunctionMode

import diffusers_ext as dx
from diffusers_ext.ops import gated_linear_attention
from diffusers_ext.registry import get_method
from diffusers_ext.testing import tiny_dit_transformer, tiny_pipeline, tiny_sd3_transformer, tiny_sd_unet

FP64 = dict(rtol=1e-12, atol=1e-12)
FP32 = dict(rtol=1e-5, atol=1e-5)


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


def _released_encoder(q, k, v):
    """LINA's released encoder attention (LinearAttentionEncoder.forward), written as a loop over the
    M key positions: phi = ReLU + 1e-6, kv = sum_j (phi(k_j) M^-1/2)^T (v_j M^-1/2),
    z_i = 1 / (phi(q_i) . mean_j phi(k_j) + 1e-6), O_i = (phi(q_i) kv) z_i."""
    q, k = torch.relu(q) + 1e-6, torch.relu(k) + 1e-6
    M = k.shape[-2]
    kv = torch.zeros(*k.shape[:2], k.shape[-1], v.shape[-1], dtype=q.dtype)
    k_sum = torch.zeros(*k.shape[:2], 1, k.shape[-1], dtype=q.dtype)
    for j in range(M):
        kv += (k[:, :, j:j + 1] * M ** -0.5).transpose(-1, -2) @ (v[:, :, j:j + 1] * M ** -0.5)
        k_sum += k[:, :, j:j + 1]
    z = 1 / ((q * (k_sum / M)).sum(-1, keepdim=True) + 1e-6)
    return (q @ kv) * z


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


def test_heads_of_a_projection_residual_in_place_and_the_gradient_path():
    """q / k / v as the heads of (B, N, h*d) projections (strided, read in place): the dense result,
    returned token-major; `residual` gets the result added in place; with a gradient (or compile) the
    functional path computes the same values and trains the gates."""
    batch, heads, tokens, dim = 2, 3, 20, 8
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(batch, tokens, heads * dim, generator=g, dtype=torch.float64)
               .view(batch, tokens, heads, dim).transpose(1, 2) for _ in range(3))
    gk, gv = (torch.rand(1, heads, tokens, 1, generator=g, dtype=torch.float64) + 0.5 for _ in range(2))
    residual = torch.randn(batch, tokens, heads, dim, generator=g, dtype=torch.float64).transpose(1, 2)
    expected = _dense(q, k, v, gk, gv)
    out = gated_linear_attention(q, k, v, gk, gv)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert out.transpose(1, 2).is_contiguous()                         # token-major: merging heads is free
    into = residual.clone()
    summed = gated_linear_attention(q, k, v, gk, gv, residual=into)
    assert summed.data_ptr() == into.data_ptr()
    torch.testing.assert_close(summed, residual + expected, rtol=1e-10, atol=1e-12)
    trained = gk.clone().requires_grad_()
    differentiable = gated_linear_attention(q, k, v, trained, gv, residual=residual)
    torch.testing.assert_close(differentiable, residual + expected, rtol=1e-12, atol=1e-12)
    differentiable.sum().backward()
    assert trained.grad is not None and trained.grad.abs().sum() > 0


@pytest.mark.parametrize("trained", ["q", "k", "v", "key_gate", "value_gate", "residual"])
def test_any_input_that_needs_a_gradient_gets_one(trained):
    """Whichever input requires a gradient (projections trained with the method, either gate, the conv
    branch), the function takes the differentiable path: the same values, and the gradient reaches it."""
    g = torch.Generator().manual_seed(7)
    inputs = dict(zip(("q", "k", "v"), _qkv(B=1, h=2, N=6, M=6, d=4, seed=7)))
    inputs.update(key_gate=torch.rand(1, 2, 6, 1, generator=g, dtype=torch.float64) + 0.5,
                  value_gate=torch.rand(1, 2, 6, 1, generator=g, dtype=torch.float64) + 0.5,
                  residual=torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64))
    with torch.no_grad():
        expected = gated_linear_attention(**{n: t.clone() for n, t in inputs.items()})
    inputs[trained] = inputs[trained].clone().requires_grad_()
    out = gated_linear_attention(**inputs)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert inputs[trained].grad is not None and inputs[trained].grad.abs().sum() > 0


def test_gates_of_fewer_dimensions_broadcast_as_documented():
    """Gates "broadcastable to (B, h, M, 1)": an (h, M, 1) gate is the (1, h, M, 1) one."""
    q, k, v = _qkv(B=2, h=3, N=5, M=7, d=4, seed=9)
    gk, gv = (torch.rand(1, 3, 7, 1, generator=torch.Generator().manual_seed(s), dtype=torch.float64) + 0.5
              for s in (1, 2))
    torch.testing.assert_close(gated_linear_attention(q, k, v, gk[0], gv[0]), gated_linear_attention(q, k, v, gk, gv),
                               rtol=0, atol=0)


def test_half_precision_in_gives_half_precision_out_on_every_path():
    """bf16 q / k / v: the result is bf16 without gates, with a (fp32) residual added in place, and on the
    differentiable path."""
    q, k, v = (t.bfloat16() for t in _qkv(B=1, h=2, N=6, M=6, d=4, dtype=torch.float32, seed=8))
    residual = torch.zeros(1, 2, 6, 4)
    gate = torch.ones(1, 2, 6, 1, requires_grad=True)
    assert gated_linear_attention(q, k, v).dtype == torch.bfloat16
    assert gated_linear_attention(q, k, v, residual=residual).dtype == torch.bfloat16
    assert gated_linear_attention(q, k, v, gate, residual=torch.zeros(1, 2, 6, 4)).dtype == torch.bfloat16


def test_ungated_attention_is_the_released_encoder():
    q, k, v = _qkv(N=17, M=23)
    torch.testing.assert_close(gated_linear_attention(q, k, v), _released_encoder(q, k, v), **FP64)
    q32, k32, v32 = q.float(), k.float(), v.float()  # fp32 in: within 1e-5 of the exact result
    torch.testing.assert_close(gated_linear_attention(q32, k32, v32).double(), _released_encoder(q, k, v), **FP32)


def test_linear_attention_computes_in_fp32():
    """bf16 in: computed in fp32 and rounded to bf16 once, so within half a bf16 ulp of the exact
    result on the same bf16 inputs (computing in bf16 rounds the memory and normaliser too)."""
    q, k, v = _qkv(N=64, M=64, d=16, dtype=torch.float32, seed=1)
    gk, gv = (torch.rand(1, 3, 64, 1, generator=torch.Generator().manual_seed(s)).bfloat16() for s in (2, 3))
    for gates in ((None, None), (gk, gv)):
        out = gated_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), *gates)
        assert out.dtype == torch.bfloat16
        exact = _dense(*(t.bfloat16().double() for t in (q, k, v)),  # the same bf16 inputs, exact arithmetic
                       *(None if g is None else g.double() for g in gates))
        assert_rounded_from_exact(out, exact)


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


class _Dtypes(TorchFunctionMode):
    """Records the dtype of every floating-point tensor a torch function returns inside the block."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.seen.add(t.dtype)
        return out


def _tiny_dit(num_layers: int, dtype=torch.float32):
    """tiny_dit_transformer's configuration with `num_layers` blocks."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        sample_size=16, num_layers=num_layers, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        in_channels=4, out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        norm_elementwise_affine=False).eval().to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64), (torch.float32, FP32)])
def test_encoder_block_matches_released_equations(dtype, tol):
    """DiT: block 0 of 4 is an encoder block; its output is to_out(O) with O from the loop reference
    (float64, from the module's own weights): 1e-12 in float64 (the old fp32 cast of q could not
    reach it), 1e-5 in float32."""
    model = _tiny_dit(4, dtype)
    dx.patch(model, "lina")
    attn = model.transformer_blocks[0].attn1
    assert not attn.processor.decoder and not list(attn.processor.parameters())
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        got = attn(x.to(dtype))
        w = {name: getattr(attn, name).weight.double() for name in ("to_q", "to_k", "to_v")}
        b = {name: getattr(attn, name).bias.double() for name in ("to_q", "to_k", "to_v")}
        q, k, v = (_heads(F.linear(x, w[n], b[n]), attn.heads) for n in ("to_q", "to_k", "to_v"))
        ref = F.linear(_merge(_released_encoder(q, k, v)), attn.to_out[0].weight.double(), attn.to_out[0].bias.double())
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, **tol)


def test_joint_encoder_block_matches_released_equations():
    """SD3.5 (2 blocks): block 0 is an encoder block, joint attention and `attn2` alike; the text
    tokens join the keys and queries as LINA's prefix tokens, ungated. float64 against the loop
    reference at 1e-12."""
    model = tiny_sd3_transformer(sd35=True).eval().double()
    dx.patch(model, "lina")
    block = model.transformer_blocks[0]
    assert not block.attn.processor.decoder and not block.attn2.processor.decoder
    g = torch.Generator().manual_seed(2)
    x, c = (torch.randn(2, n, 32, generator=g, dtype=torch.float64) for n in (36, 5))
    attn = block.attn
    with torch.no_grad():
        got_image, got_text = attn(hidden_states=x, encoder_hidden_states=c)
        h = attn.heads
        q, k, v = attn.norm_q(_heads(attn.to_q(x), h)), attn.norm_k(_heads(attn.to_k(x), h)), _heads(attn.to_v(x), h)
        qc, kc = attn.norm_added_q(_heads(attn.add_q_proj(c), h)), attn.norm_added_k(_heads(attn.add_k_proj(c), h))
        vc = _heads(attn.add_v_proj(c), h)
        o = _released_encoder(torch.cat([q, qc], 2), torch.cat([k, kc], 2), torch.cat([v, vc], 2))
        ref_image, ref_text = attn.to_out[0](_merge(o[:, :, :36])), attn.to_add_out(_merge(o[:, :, 36:]))
        got_self = block.attn2(x)
        a2 = block.attn2
        q2, k2 = a2.norm_q(_heads(a2.to_q(x), h)), a2.norm_k(_heads(a2.to_k(x), h))
        ref_self = a2.to_out[0](_merge(_released_encoder(q2, k2, _heads(a2.to_v(x), h))))
    torch.testing.assert_close(got_image, ref_image, **FP64)
    torch.testing.assert_close(got_text, ref_text, **FP64)
    torch.testing.assert_close(got_self, ref_self, **FP64)


@pytest.mark.parametrize("layout", ["released", "gated"])
def test_float64_stays_float64(layout):
    """float64 in: every floating tensor inside the converted layer is float64 (encoder and decoder
    blocks, gate interpolation included); bf16 in: the attention runs in fp32, the output is bf16."""
    model = _tiny_dit(2, torch.float64)
    record = dx.patch(model, "lina", layout=layout)
    record.state.latent_hw = (24, 24)  # a 12 x 12 grid: the 8 x 8 gates are interpolated
    x = torch.randn(2, 144, 16, dtype=torch.float64)
    for block in model.transformer_blocks:
        with torch.no_grad(), _Dtypes() as recorded:
            out = block.attn1(x)
        assert out.dtype == torch.float64 and recorded.seen == {torch.float64}, recorded.seen
    model.to(torch.bfloat16)
    with torch.no_grad(), _Dtypes() as recorded:
        out = model.transformer_blocks[1].attn1(x.bfloat16())
    assert out.dtype == torch.bfloat16 and recorded.seen == {torch.bfloat16, torch.float32}, recorded.seen


def test_layout_splits_the_blocks():
    """"released": the model's blocks 0 .. n//2 - 1 are encoder blocks (no gate, no conv, no
    parameters: nothing to save or train), the rest decoder blocks; an odd count gives the decoder
    half the extra block; `blocks=` subsets keep the model's block index; "gated": all decoders."""
    def kinds(record):
        return [p.decoder for p in record.processors().values()]

    model = _tiny_dit(4)
    record = dx.patch(model, "lina")
    assert kinds(record) == [False, False, True, True]
    saved = [k for k in model.state_dict() if ".processor." in k]
    assert saved and all(k.startswith(("transformer_blocks.2.", "transformer_blocks.3.")) for k in saved)
    for i in (0, 1):
        proc = model.transformer_blocks[i].attn1.processor
        assert not hasattr(proc, "conv") and not hasattr(proc, "key_gate") and proc.gate_grid is None
    groups = get_method("lina").trainable_parameters(record)
    decoders = [p for i in (2, 3) for p in model.transformer_blocks[i].attn1.processor.parameters()]
    assert {id(p) for p in groups["new"]} == {id(p) for p in decoders} and len(decoders) == 2 * 4
    projections = {id(model.transformer_blocks[i].attn1.to_q.weight) for i in range(4)}
    assert projections <= {id(p) for p in groups["inherited"]}  # encoder blocks are converted layers too

    assert kinds(dx.patch(model, "lina", blocks=[2, 3])) == [True, True]  # model index, not subset position
    assert kinds(dx.patch(model, "lina", blocks=[1, 2])) == [False, True]
    assert kinds(dx.patch(model, "lina", layout="gated")) == [True] * 4
    assert kinds(dx.patch(_tiny_dit(5), "lina")) == [False, False, True, True, True]
    with pytest.raises(ValueError, match="layout"):
        dx.patch(model, "lina", layout="encoder")


@pytest.mark.parametrize("family", ["dit", "sd35"])
def test_released_and_gated_layouts_start_at_the_same_model(family):
    """An encoder block is a fresh decoder block without its identities (gates of 1, a zero conv):
    both layouts start bit-exactly at the same converted model."""
    if family == "dit":
        model, call = _tiny_dit(4), lambda m: _dit_call(m, 16)
    else:
        model, call = tiny_sd3_transformer(sd35=True).eval(), _sd3_call
    dx.patch(model, "lina", layout="gated")
    gated = call(model)
    dx.patch(model, "lina")
    assert torch.equal(call(model), gated)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, FP64), (torch.float32, FP32)])
@pytest.mark.parametrize("conv_on", ["input", "value"])
def test_self_processor_matches_dense_reference(conv_on, dtype, tol):
    torch.manual_seed(0)
    model = tiny_dit_transformer().eval().to(dtype)
    record = dx.patch(model, "lina", conv_on=conv_on)
    assert record.options["gate_grid"] == (8, 8)  # sample_size 16 / patch 2
    attn = model.transformer_blocks[1].attn1  # the decoder block of 2
    proc = attn.processor
    _randomise(proc)
    x = torch.randn(2, 64, 16, dtype=dtype)
    record.state.latent_hw = (16, 16)
    with torch.no_grad():
        got = attn(x)
        h = attn.heads
        q, k, v = _heads(attn.to_q(x), h), _heads(attn.to_k(x), h), _heads(attn.to_v(x), h)
        o = _dense(q, k, v, proc.key_gate, proc.value_gate)
        local = _conv_tokens(proc.conv, x if conv_on == "input" else _merge(v), (8, 8))
        ref = attn.to_out[0](_merge(o) + local)
    torch.testing.assert_close(got, ref, **tol)


@pytest.mark.parametrize("text_tokens,gate_tokens,gate_grid,gate_resize,conv_on,grid", [
    ("linear", 3, (6, 6), "interpolate", "input", (6, 6)), ("softmax", 9, (6, 6), "interpolate", "value", (6, 6)),
    ("linear", 0, (6, 6), "interpolate", "input", (6, 6)),   # ungated text: the text part of the joined gate is 1
    ("linear", 3, (4, 4), "reset", "value", (4, 9)),         # image gates reset at another grid: the image part is 1
])
def test_joint_processor_matches_dense_reference(text_tokens, gate_tokens, gate_grid, gate_resize, conv_on, grid):
    """Also at an eps and a softmax scale other than the defaults (0.05; 0.7 d^-1/2), so dropping either
    is seen."""
    torch.manual_seed(0)
    model = tiny_sd3_transformer(sd35=True).eval()
    record = dx.patch(model, "lina", layout="gated", text_tokens=text_tokens, text_gate_tokens=gate_tokens,
                      gate_grid=gate_grid, gate_resize=gate_resize, conv_on=conv_on, eps=0.05)
    attn = model.transformer_blocks[0].attn  # a decoder block with its text output (block 1 discards it)
    attn.scale = 0.7 * attn.scale
    proc = attn.processor
    _randomise(proc)
    x, c = torch.randn(2, 36, 32), torch.randn(2, 5, 32)
    record.state.latent_hw = grid   # patch size 1: the token grid
    with torch.no_grad():
        got = attn(hidden_states=x, encoder_hidden_states=c)
        h = attn.heads
        q, k, v = _heads(attn.to_q(x), h), _heads(attn.to_k(x), h), _heads(attn.to_v(x), h)
        qc, kc, vc = _heads(attn.add_q_proj(c), h), _heads(attn.add_k_proj(c), h), _heads(attn.add_v_proj(c), h)
        q, k, qc, kc = attn.norm_q(q), attn.norm_k(k), attn.norm_added_q(qc), attn.norm_added_k(kc)
        # text gates over the first `gate_tokens` text positions, 1 beyond (5 text tokens here)
        text_k, text_v = torch.ones(1, h, 5, 1), torch.ones(1, h, 5, 1)
        n = min(gate_tokens, 5)
        if n:
            text_k[:, :, :n], text_v[:, :, :n] = proc.text_key_gate[:, :, :n], proc.text_value_gate[:, :, :n]
        image_k, image_v = proc.key_gate, proc.value_gate
        if gate_grid != grid:  # "reset": gates of 1 on a grid they were not trained for
            image_k, image_v = torch.ones(1, h, 36, 1), torch.ones(1, h, 36, 1)
        gk, gv = torch.cat([image_k, text_k], 2), torch.cat([image_v, text_v], 2)
        keys, values = torch.cat([k, kc], 2), torch.cat([v, vc], 2)
        oi = _dense(q, keys, values, gk, gv, eps=0.05)
        if text_tokens == "linear":
            oc = _dense(qc, keys, values, gk, gv, eps=0.05)
        else:
            oc = torch.softmax(attn.scale * qc @ keys.transpose(-1, -2), -1) @ values
        local = _conv_tokens(proc.conv, x if conv_on == "input" else _merge(v), grid)
        ref_image = attn.to_out[0](_merge(oi) + local)
        ref_text = attn.to_add_out(_merge(oc))
    torch.testing.assert_close(got[0], ref_image, **FP32)
    torch.testing.assert_close(got[1], ref_text, **FP32)


def _inputs_of(module):
    """A list that receives the input of every call of `module` (and the hook's handle)."""
    seen = []
    return seen, module.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))


@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_bf16_decoder_block_rounds_once(family):
    """bf16 model: the gated linear attention plus the conv runs in fp32 and is rounded to bf16 once, at
    the output projection's input (within half a bf16 step of the float64 result from the same bf16
    projections and the same bf16 conv); rounding the attention to bf16 before the sum misses it."""
    torch.manual_seed(0)
    if family == "dit":
        model, size, text = _tiny_dit(2, torch.bfloat16), 8, 0
        record = dx.patch(model, "lina")
        attn = model.transformer_blocks[1].attn1
    else:
        model, size, text = tiny_sd3_transformer(sd35=True).eval().to(torch.bfloat16), 6, 5
        record = dx.patch(model, "lina", layout="gated", gate_grid=(6, 6), text_gate_tokens=3)
        attn = model.transformer_blocks[0].attn
    proc = attn.processor
    _randomise(proc)
    record.state.latent_hw = (2 * size, 2 * size)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, size * size, attn.to_q.in_features, generator=g).bfloat16()
    seen, handle = _inputs_of(attn.to_out[0])
    with torch.no_grad():
        if text:
            c = torch.randn(2, text, 32, generator=g).bfloat16()
            attn(hidden_states=x, encoder_hidden_states=c)
        else:
            attn(x)
        handle.remove()
        h = attn.heads
        q, k, v = (_heads(getattr(attn, name)(x), h) for name in ("to_q", "to_k", "to_v"))
        gk, gv = proc.key_gate, proc.value_gate
        if text:
            q, k = attn.norm_q(q), attn.norm_k(k)
            kc, vc = attn.norm_added_k(_heads(attn.add_k_proj(c), h)), _heads(attn.add_v_proj(c), h)
            k, v = torch.cat([k, kc], 2), torch.cat([v, vc], 2)
            ones = torch.ones(1, h, text - 3, 1, dtype=gk.dtype)
            gk = torch.cat([gk, proc.text_key_gate[:, :, :3], ones], 2)
            gv = torch.cat([gv, proc.text_value_gate[:, :, :3], ones], 2)
        exact = _merge(_dense(*(t.double() for t in (q, k, v, gk, gv)))) + proc.conv(x, (size, size)).double()
    assert seen[0].dtype == torch.bfloat16
    assert_rounded_from_exact(seen[0], exact)


# --- resolution ----------------------------------------------------------------------------------------

def _dit_call(model, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, size, size, generator=g)
    with torch.no_grad():
        return model(x, timestep=torch.tensor([100, 700]), class_labels=torch.tensor([3, 5])).sample


def test_gate_resize_interpolate_and_reset():
    model = tiny_dit_transformer().eval()
    dx.patch(model, "lina")
    proc = model.transformer_blocks[1].attn1.processor  # the decoder block
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
    model.transformer_blocks[1].attn1.processor.load_state_dict(proc.state_dict())
    assert model.transformer_blocks[1].attn1.processor.image_gates((12, 12)) == (None, None)
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


def test_gate_resize_is_bilinear_in_fp32():
    """A bf16 gate is interpolated in fp32 and rounded once: against F.interpolate's bilinear
    (align_corners=False) written out as a 1-D interpolation per axis in float64."""
    from diffusers_ext.processors.lina import resize_gate

    gate = (1 + torch.rand(1, 2, 3 * 4, 1, generator=torch.Generator().manual_seed(0))).bfloat16()

    def axis(n_in, n_out):  # (n_out, n_in) weights of half-pixel-centre linear interpolation
        w = torch.zeros(n_out, n_in, dtype=torch.float64)
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            lo = min(int(src), n_in - 1)
            hi, frac = min(lo + 1, n_in - 1), src - lo
            w[i, lo] += 1 - frac
            w[i, hi] += frac
        return w

    exact = axis(3, 7) @ gate.double().view(2, 3, 4) @ axis(4, 5).T      # (h, 7, 5)
    got = resize_gate(gate, (3, 4), (7, 5))
    assert got.dtype == torch.bfloat16 and got.shape == (1, 2, 35, 1)
    assert_rounded_from_exact(got.view(2, 7, 5), exact)
    assert resize_gate(gate, (3, 4), (3, 4)) is gate


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
    assert record.options["layout"] == "released"
    proc = model.transformer_blocks[1].attn.processor  # the decoder block of 2
    assert not proc.conv.conv.weight.detach().any() and not proc.conv.conv.bias.detach().any()
    assert proc.key_gate.shape == (1, 4, 1024, 1) and torch.all(proc.text_value_gate == 1)
    block = model.transformer_blocks[0]  # the encoder block: no new parameters
    assert not list(block.attn.processor.parameters()) and not list(block.attn2.processor.parameters())
    gated = dx.patch(model, "lina", layout="gated")
    assert not hasattr(model.transformer_blocks[0].attn2.processor, "text_key_gate")  # image-only self-attention
    assert hasattr(model.transformer_blocks[0].attn.processor, "text_key_gate") and gated.sites == record.sites
    record = dx.patch(model, "lina")
    patched = _sd3_call(model)
    assert torch.isfinite(patched).all() and not torch.equal(patched, stock)
    assert dx.patch(model, "lina", dual_attention=False, blocks=[1]).sites == ["transformer_blocks.1.attn"]
    dx.unpatch(model)
    assert torch.equal(_sd3_call(model), stock) and not hasattr(model, "_diffusers_ext_patch")
    for bad, match in [(dict(gate_resize="nearest"), "gate_resize"), (dict(gate_grid=(8,)), "gate_grid"),
                       (dict(text_tokens="ttt"), "text_tokens"), (dict(conv_kernel=4), "conv_kernel"),
                       (dict(blocks=[7]), "no block"), (dict(layout="all"), "layout")]:
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
    assert not any(k.startswith("transformer_blocks.0.") for k in tensors)  # the encoder block has none
    save_weights(tmp_path, model, record, tensors)
    expected = _sd3_call(model)

    fresh = tiny_sd3_transformer(sd35=True).eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".processor." not in k})
    loaded = dx.patch(fresh, "lina", weights=str(tmp_path))
    assert loaded.options["gate_grid"] == (8, 8) and loaded.options["text_gate_tokens"] == 16
    torch.testing.assert_close(_sd3_call(fresh), expected)
    with pytest.raises(ValueError, match="do not fit"):  # gates trained at 8 x 8 do not load as 4 x 4
        dx.patch(fresh, "lina", weights=str(tmp_path), gate_grid=(4, 4))

    record = dx.patch(model, "lina", layout="gated", gate_grid=(8, 8))  # a gated folder loads as gated
    for name in record.sites:
        _randomise(dict(model.named_modules())[name].processor)
    save_weights(tmp_path / "gated", model, record, {k: v for k, v in model.state_dict().items() if ".processor." in k})
    expected = _sd3_call(model)
    loaded = dx.patch(fresh, "lina", weights=str(tmp_path / "gated"))
    assert loaded.options["layout"] == "gated" and all(p.decoder for p in loaded.processors().values())
    torch.testing.assert_close(_sd3_call(fresh), expected)


# --- distillation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["dit", "sd35"])
def test_distillation_reduces_deviation(tmp_path, family):
    """Tiny DiT starts within 0.15 % of stock: the gates and conv alone do not halve that, so its
    projections adapt too (inherited_lr; 2.4x); on tiny SD3.5 the new parameters alone do it (in the
    released layout those of block 1 only: 2.1x; all blocks gated: 3.4x)."""
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


def test_weights_saved_before_layout_existed_load_as_gated(pipeline_of, tmp_path):
    """A folder without `layout` in its options was trained with gates everywhere: it loads as gated."""
    import json

    import diffusers_ext as dx
    from diffusers_ext.weights import CONFIG_NAME, save_weights

    pipe = pipeline_of("dit")
    record = dx.patch(pipe, "lina", layout="gated")
    try:
        tensors = {f"{name}.processor.{key}": value for name, proc in record.processors().items()
                   for key, value in proc.state_dict().items()}
        save_weights(tmp_path, pipe.transformer, record, tensors)
    finally:
        dx.unpatch(pipe)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["options"]["layout"]                       # as written before the option existed
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    record = dx.patch(pipe, "lina", weights=str(tmp_path))
    try:
        assert record.options["layout"] == "gated"
    finally:
        dx.unpatch(pipe)


@pytest.mark.parametrize("options,match", [
    (dict(gate_grid="8x8"), "pair"), (dict(gate_grid=(8, 0)), "positive integers"),
    (dict(gate_grid=(8, True)), "positive integers"), (dict(gate_grid=(8, 8.0)), "positive integers"),
    (dict(gate_grid="ab"), "pair"), (dict(conv_kernel=-1), "conv_kernel"),
    (dict(conv_kernel=0), "conv_kernel"), (dict(conv_kernel=33), "conv_kernel"), (dict(conv_kernel=3.0), "conv_kernel"),
])
def test_option_boundaries(options, match):
    with pytest.raises(ValueError, match=match):
        dx.patch(tiny_dit_transformer(), "lina", **options)


def test_option_forms_and_what_they_build():
    """gate_grid "auto" = the native grid, a non-square grid gives H*W gate positions, conv_kernel 1 and 31
    are the ends of its range (the conv is that size), every new parameter in the model's dtype."""
    model = tiny_dit_transformer().eval().double()
    assert dx.patch(model, "lina", gate_grid="auto").options["gate_grid"] == (8, 8)
    assert dx.patch(model, "lina", gate_grid=(1, 4)).options["gate_grid"] == (1, 4)   # one row is a grid
    proc = dx.patch(model, "lina", gate_grid=(4, 6), conv_kernel=31).processors()["transformer_blocks.1.attn1"]
    assert proc.key_gate.shape == proc.value_gate.shape == (1, 2, 24, 1)
    assert proc.conv.conv.weight.shape[-2:] == (31, 31)
    assert {p.dtype for p in proc.parameters()} == {torch.float64}
    proc = dx.patch(model, "lina", conv_kernel=1).processors()["transformer_blocks.1.attn1"]
    assert proc.conv.conv.weight.shape[-2:] == (1, 1)
    sd3 = tiny_sd3_transformer(sd35=True).eval().double()
    proc = dx.patch(sd3, "lina", layout="gated", text_gate_tokens=4).processors()["transformer_blocks.0.attn"]
    assert proc.text_key_gate.shape == (1, sd3.transformer_blocks[0].attn.heads, 4, 1)
    assert {p.dtype for p in proc.parameters()} == {torch.float64}


def test_conv_on_input_needs_matching_widths():
    """A layer whose input width differs from its inner width: conv_on='input' is refused by name, 'value'
    works."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                  num_attention_heads=2, in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
    attn = model.transformer_blocks[1].attn1
    attn.to_q = torch.nn.Linear(16, 24)   # inner width 24 (3 heads of 8) from input width 16
    attn.to_k, attn.to_v = torch.nn.Linear(16, 24), torch.nn.Linear(16, 24)
    attn.to_out[0], attn.heads, attn.inner_dim = torch.nn.Linear(24, 16), 3, 24
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn1: conv_on='input' needs .*\(16\).*\(24\)"):
        dx.patch(model, "lina", blocks=[1])
    record = dx.patch(model, "lina", blocks=[1], conv_on="value")
    assert record.processors()["transformer_blocks.1.attn1"].conv.conv.weight.shape[0] == 24


def test_gates_are_computed_per_grid_at_inference():
    """The inference cache of the gates is keyed by the grid: a call at 12 x 12 after one at 8 x 8 uses the
    12 x 12 gates (as a fresh patch does), and the 8 x 8 call after it the 8 x 8 ones."""
    model = tiny_dit_transformer().eval()
    dx.patch(model, "lina")
    _randomise(model.transformer_blocks[1].attn1.processor)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first, big, again = _dit_call(model, 16), _dit_call(model, 24), _dit_call(model, 16)
    dx.patch(model, "lina")
    model.load_state_dict(state)
    torch.testing.assert_close(big, _dit_call(model, 24), rtol=0, atol=0)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@pytest.mark.parametrize("block", [0, 1])
def test_self_attention_uses_the_eps_option(block):
    """eps=0.5 (not the default) in the encoder (block 0) and decoder (block 1) blocks of a DiT."""
    torch.manual_seed(0)
    model = tiny_dit_transformer().eval().double()
    record = dx.patch(model, "lina", eps=0.5)
    attn = model.transformer_blocks[block].attn1
    proc = attn.processor
    _randomise(proc)
    x = torch.randn(2, 64, 16, dtype=torch.float64)
    record.state.latent_hw = (16, 16)
    with torch.no_grad():
        got = attn(x)
        q, k, v = (_heads(getattr(attn, n)(x), attn.heads) for n in ("to_q", "to_k", "to_v"))
        if block == 0:
            ref = attn.to_out[0](_merge(_dense(q, k, v, eps=0.5)))
        else:
            local = _conv_tokens(proc.conv, x, (8, 8))
            ref = attn.to_out[0](_merge(_dense(q, k, v, proc.key_gate, proc.value_gate, eps=0.5)) + local)
    torch.testing.assert_close(got, ref, **FP64)


def test_blocks_say_what_they_are():
    model = tiny_dit_transformer()
    record = dx.patch(model, "lina")
    reprs = [repr(p) for p in record.processors().values()]
    assert "encoder block" in reprs[0] and "decoder block" in reprs[1]
