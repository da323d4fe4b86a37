"""Mediator attention: math against a dense reference, interpolated biases, the count schedule."""

import gc
import math

import numpy as np
import pytest
import torch
from helpers import heads_of, pool_loop

import diffusers_ext as dx
from diffusers_ext.ops import interpolated_bias
from diffusers_ext.testing import tiny_dit_transformer, tiny_pipeline
from diffusers_ext.processors.mediator import MediatorAttnProcessor, MediatorCounts


def bilinear_matrix(src: int, dst: int) -> torch.Tensor:
    """(dst, src) weights of 1-D linear interpolation with half-pixel centres (align_corners=False)."""
    w = np.zeros((dst, src))
    for i in range(dst):
        x = min(max((i + 0.5) * src / dst - 0.5, 0.0), src - 1)
        lo = int(math.floor(x))
        hi = min(lo + 1, src - 1)
        w[i, lo] += 1 - (x - lo)
        w[i, hi] += x - lo
    return torch.tensor(w, dtype=torch.float32)


def dense_bias(table, rows, cols, mgrid, tgrid):
    heads, M0h, M0w, th, tw = table.shape
    mh, mw = bilinear_matrix(M0h, mgrid[0]), bilinear_matrix(M0w, mgrid[1])
    H, W = bilinear_matrix(th, tgrid[0]), bilinear_matrix(tw, tgrid[1])
    Rh, Rw = bilinear_matrix(rows.shape[-1], tgrid[0]), bilinear_matrix(cols.shape[-1], tgrid[1])
    t = torch.einsum("habxy,ma,nb,ix,jy->hmnij", table, mh, mw, H, W)
    r = torch.einsum("habx,ma,nb,ix->hmni", rows, mh, mw, Rh)
    c = torch.einsum("haby,ma,nb,jy->hmnj", cols, mh, mw, Rw)
    full = t + r[..., :, None] + c[..., None, :]
    return full.reshape(heads, mgrid[0] * mgrid[1], tgrid[0] * tgrid[1])


@pytest.mark.parametrize("mgrid,tgrid", [((8, 8), (16, 16)), ((4, 4), (8, 8)), ((12, 12), (32, 32)),
                                          ((3, 3), (12, 20)), ((2, 2), (64, 64))])
def test_interpolated_bias_matches_dense_bilinear(mgrid, tgrid):
    g = torch.Generator().manual_seed(0)
    table, rows, cols = torch.randn(2, 8, 8, 7, 7, generator=g), torch.randn(2, 8, 8, 16, generator=g), \
        torch.randn(2, 8, 8, 16, generator=g)
    torch.testing.assert_close(interpolated_bias(table, rows, cols, mgrid, tgrid),
                               dense_bias(table, rows, cols, mgrid, tgrid), atol=1e-5, rtol=1e-5)


def test_interpolated_bias_at_native_size_is_the_table():
    table, rows, cols = torch.randn(1, 4, 4, 6, 6), torch.randn(1, 4, 4, 6), torch.randn(1, 4, 4, 6)
    bias = interpolated_bias(table, rows, cols, (4, 4), (6, 6)).reshape(1, 16, 6, 6)
    expected = (table + rows[..., :, None] + cols[..., None, :]).reshape(1, 16, 6, 6)
    torch.testing.assert_close(bias, expected)


def _processor(pipe, count=4):
    record = dx.patch(pipe, "mediator", mediators=count)
    attn = pipe.transformer.transformer_blocks[0].attn1
    return record, attn, attn.processor


def _run_attention(record, attn, proc, x, grid):
    record.state.latent_hw = (grid[0] * 2, grid[1] * 2)       # DiT patch 2
    with torch.no_grad():
        return proc.attend(attn, x)


def dense_mediator_attention(attn, proc, x, grid, count):
    """The paper's equations with explicit softmax matrices."""
    heads, s = attn.heads, attn.scale
    q, k, v = (heads_of(f(x), heads) for f in (attn.to_q, attn.to_k, attn.to_v))
    side = int(count**0.5)
    t = pool_loop(q, grid, (side, side))
    tables = lambda p: (getattr(proc, p + "_table"), getattr(proc, p + "_rows"), getattr(proc, p + "_cols"))  # noqa
    b1 = dense_bias(*tables("to_tokens"), (side, side), grid)
    b2 = dense_bias(*tables("to_mediators"), (side, side), grid).transpose(-1, -2)
    a1 = torch.softmax(s * t @ k.transpose(-1, -2) + b1, -1)
    a2 = torch.softmax(s * q @ t.transpose(-1, -2) + b2, -1)
    o = a2 @ (a1 @ v)
    conv = proc.dwc.conv
    image = v.transpose(1, 2).reshape(x.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)
    dw = torch.nn.functional.conv2d(image, conv.weight, conv.bias, padding=1, groups=image.shape[1])
    o = o + heads_of(dw.flatten(2).transpose(1, 2), heads)
    o = o.transpose(1, 2).reshape(x.shape[0], -1, heads * q.shape[-1])
    return attn.to_out[0](o)


@pytest.mark.parametrize("grid,count", [((8, 8), 16), ((6, 10), 4), ((12, 12), 36)])
def test_trained_mediators_match_dense_reference(grid, count):
    pipe = tiny_pipeline("dit")
    record, attn, proc = _processor(pipe, count)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in proc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(2, grid[0] * grid[1], attn.inner_dim, generator=g)
    got = _run_attention(record, attn, proc, x, grid)
    with torch.no_grad():
        expected = dense_mediator_attention(attn, proc, x, grid, count)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_zero_init_is_pooled_query_agent_attention_exactly():
    """Zero biases and DWC: softmax(s Q T^T) softmax(s T K^T) V with T the queries pooled on 4 x 4
    cells, to float64 rounding (the layer run in float64)."""
    pipe = tiny_pipeline("dit")
    record, attn, proc = _processor(pipe, 16)
    assert all(not p.any() for p in proc.parameters())
    attn.double()
    grid = (8, 8)
    x = torch.randn(2, 64, attn.inner_dim, dtype=torch.float64)
    got = _run_attention(record, attn, proc, x, grid)
    with torch.no_grad():
        q, k, v = (heads_of(f(x), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        t = pool_loop(q, grid, (4, 4))
        soft = lambda a, b: torch.softmax(attn.scale * a @ b.transpose(-1, -2), -1)  # noqa: E731
        o = soft(q, t) @ (soft(t, k) @ v)
        expected = attn.to_out[0](o.permute(0, 2, 1, 3).reshape(2, 64, -1))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_schedule_switches_counts_at_the_right_steps():
    pipe = tiny_pipeline("dit")        # latent 16 x 16, patch 2 -> 8 x 8 tokens
    record = dx.patch(pipe, "mediator", mediators=(1, 4, 16), switch_at=(0.3, 0.6))
    counts = pipe.transformer.transformer_blocks[0].attn1.processor.counts
    used = []
    original = counts.groups
    counts.groups = lambda batch: used.append((record.state.step_index, original(batch))) or used[-1][1]
    pipe(class_labels=[1], num_inference_steps=10, output_type="latent")
    per_step = {step: groups[0][0] for step, groups in used}
    assert per_step == {0: 1, 1: 1, 2: 1, 3: 4, 4: 4, 5: 4, 6: 16, 7: 16, 8: 16, 9: 16}
    dx.unpatch(pipe)


def test_even_split_by_default_and_option_errors():
    pipe = tiny_pipeline("dit")
    assert dx.patch(pipe, "mediator", mediators=(4, 16)).options["switch_at"] == (0.5,)
    with pytest.raises(ValueError, match="perfect squares"):
        dx.patch(pipe, "mediator", mediators=(4, 15))
    with pytest.raises(ValueError, match="increasing"):
        dx.patch(pipe, "mediator", mediators=(4, 16, 64), switch_at=(0.5,))
    with pytest.raises(ValueError, match="not both"):
        dx.patch(pipe, "mediator", mediators=(4, 16), switch_at=(0.5,), switch_ratios=(0.5,))
    with pytest.raises(ValueError, match="decreasing"):
        dx.patch(pipe, "mediator", mediators=(4, 16, 64), switch_ratios=(0.3, 0.5))
    dx.patch(pipe, "mediator", mediators=81)                  # 9 x 9 > 8 x 8 tokens
    with pytest.raises(ValueError, match=r"81 mediators \(9 x 9\) do not fit the 8 x 8 token grid.*at most 64"):
        pipe(class_labels=[1], num_inference_steps=1, output_type="latent")
    dx.patch(pipe, "mediator", mediators=64)                  # 8 x 8: exactly the token grid, allowed
    pipe(class_labels=[1], num_inference_steps=1, output_type="latent")
    dx.unpatch(pipe)


@pytest.mark.parametrize("options,error,match", [
    (dict(mediators=()), ValueError, "perfect square or a sequence"),
    (dict(mediators=(4.0,)), ValueError, "perfect squares"),
    (dict(mediators=(True,)), ValueError, "perfect squares"),
    (dict(mediators=(0,)), ValueError, "perfect squares"),
    (dict(mediators=(4, 16, 9)), ValueError, r"fewer first.*got \(4, 16, 9\); e.g. \(4, 9, 16\)"),
    (dict(mediators=(4, 16), switch_at=0.0), ValueError, r"numbers in \(0, 1\)"),
    (dict(mediators=(4, 16), switch_at=1.0), ValueError, r"numbers in \(0, 1\)"),
    (dict(mediators=(4, 16), switch_at=(True,)), ValueError, r"numbers in \(0, 1\)"),
    (dict(mediators=(4, 16, 64), switch_ratios=(0.5, 0.5)), ValueError, "decreasing"),
])
def test_option_boundaries(options, error, match):
    with pytest.raises(error, match=match):
        dx.patch(tiny_dit_transformer(), "mediator", **options)


def test_option_forms_accepted():
    """One fraction for two counts, equal neighbouring counts, a single count as an int."""
    model = tiny_dit_transformer()
    assert dx.patch(model, "mediator", mediators=(4, 16), switch_at=0.25).options["switch_at"] == (0.25,)
    assert dx.patch(model, "mediator", mediators=(4, 4, 16)).options["mediators"] == (4, 4, 16)
    assert dx.patch(model, "mediator", mediators=16).options["mediators"] == (16,)


class FakeState:
    progress, step_index, timestep = 0.0, 0, 0.0


def test_adaptive_switch_is_per_sample():
    state = FakeState()
    counts = MediatorCounts(state, (4, 16, 64), None, (0.5, 0.25), 3, "l2")
    # sample 0 keeps changing by 1 per step, sample 1 slows down: 1, 1, 1, then 0.4, 0.2
    steps = [(1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (1.0, 0.4), (1.0, 0.2)]
    x = torch.zeros(2, 1, 1, 1)
    seen = []
    for i in range(len(steps) + 1):
        state.step_index, state.timestep, state.progress = i, float(i), i / 10
        counts.observe(x)
        seen.append(counts.groups(2))
        if i < len(steps):
            x = x + torch.tensor(steps[i]).reshape(2, 1, 1, 1)
    levels = [counts.levels.tolist()]
    assert [g[0][0] for g in seen[:4]] == [4, 4, 4, 4]
    assert [(c, idx.tolist()) for c, idx in seen[4]] == [(4, [0]), (16, [1])]
    assert [(c, idx.tolist()) for c, idx in seen[5]] == [(4, [0]), (64, [1])]
    assert levels == [[0, 2]]
    # a new run (progress back to 0) starts over
    state.step_index, state.timestep, state.progress = 0, 100.0, 0.0
    counts.observe(torch.zeros(3, 1, 1, 1))
    assert counts.groups(3) == [(4, None)] and counts.levels.tolist() == [0, 0, 0]


@pytest.mark.parametrize("norm, expected", [("l1", [1, 0]), ("l2", [0, 0])])
def test_adaptive_switch_measures_change_in_its_norm_and_needs_strictly_less(norm, expected):
    """Window 1, ratio 0.5. First change (1, 1, 1, 1) for both samples: baseline l1 4, l2 2. Second change
    (1.5, 0, 0, 0) and (2, 0, 0, 0): l1 1.5 < 2 switches sample 0, and sample 1's 2 is not below 2;
    l2 compares 1.5 and 2 with 1: neither switches."""
    state = FakeState()
    counts = MediatorCounts(state, (4, 16), None, (0.5,), 1, norm)
    x = torch.zeros(2, 1, 2, 2)
    changes = [torch.ones(2, 1, 2, 2), torch.tensor([[1.5, 0, 0, 0], [2.0, 0, 0, 0]]).reshape(2, 1, 2, 2)]
    for i in range(3):
        state.step_index, state.timestep, state.progress = i, float(i), i / 10
        counts.observe(x)
        counts.groups(2)
        if i < 2:
            x = x + changes[i]
    assert counts.levels.tolist() == expected


def test_the_latent_hook_reads_keyword_inputs_and_detaches_twice():
    class Denoiser(torch.nn.Module):
        def forward(self, hidden_states=None, sample=None):
            return hidden_states if hidden_states is not None else sample

    counts = MediatorCounts(FakeState(), (4, 16), None, (0.5,), 1, "l2")
    model = Denoiser()
    counts.attach(model)
    for key in ("hidden_states", "sample"):
        x = torch.randn(2, 3)
        model(**{key: x})
        assert torch.equal(counts._pending, x), key
    counts.detach()
    counts.detach()
    model(hidden_states=torch.zeros(2, 3))
    assert not torch.equal(counts._pending, torch.zeros(2, 3))


def test_samples_at_different_counts_each_get_their_own():
    """The adaptive switch's groups: sample 0 at 4 mediators and samples 1, 2 at 16 in one call are each
    the dense reference at their own count (the same as calling them alone), with a softmax scale
    other than d^-1/2."""
    pipe = tiny_pipeline("dit")
    record, attn, proc = _processor(pipe, (4, 16))
    attn.scale = 0.6 * attn.scale
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in proc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    proc.counts.groups = lambda batch: [(4, torch.tensor([0])), (16, torch.tensor([1, 2]))]
    x = torch.randn(3, 64, attn.inner_dim, generator=g)
    got = _run_attention(record, attn, proc, x, (8, 8))
    with torch.no_grad():
        expected = torch.cat([dense_mediator_attention(attn, proc, x[:1], (8, 8), 4),
                              dense_mediator_attention(attn, proc, x[1:], (8, 8), 16)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_zero_biases_train_and_a_changed_bias_is_seen():
    """The zero-bias shortcut is for inference: with gradients on, zero-initialised bias tables get
    gradients; and a bias set after a call that found them zero is applied on the next call."""
    pipe = tiny_pipeline("dit")
    record, attn, proc = _processor(pipe, 16)
    grid = (8, 8)
    record.state.latent_hw = (16, 16)
    x = torch.randn(2, 64, attn.inner_dim)
    proc.attend(attn, x).square().mean().backward()
    for name in ("to_tokens_table", "to_tokens_rows", "to_mediators_table", "to_mediators_cols"):
        assert getattr(proc, name).grad is not None and getattr(proc, name).grad.abs().sum() > 0, name
    _run_attention(record, attn, proc, x, grid)                 # no grad: the zero biases are skipped
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in proc.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    got = _run_attention(record, attn, proc, x, grid)
    with torch.no_grad():
        expected = dense_mediator_attention(attn, proc, x, grid, 16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_adaptive_switch_with_cfg_and_batch_and_unpatch_restores():
    pipe = tiny_pipeline("dit")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    stock = pipe(class_labels=[1, 2, 3], num_inference_steps=8, guidance_scale=4.0, generator=g(),
                 output_type="latent").images
    dx.patch(pipe, "mediator", mediators=(1, 4, 16), switch_ratios=(0.9, 0.6))
    counts = pipe.transformer.transformer_blocks[0].attn1.processor.counts
    log = []
    original = counts.groups
    counts.groups = lambda batch: log.append(original(batch)) or log[-1]
    pipe(class_labels=[1, 2, 3], num_inference_steps=8, guidance_scale=4.0, generator=g(), output_type="latent")
    assert counts.levels.shape == (6,)
    assert torch.equal(counts.levels[:3], counts.levels[3:])          # cond / uncond halves agree
    assert counts.levels.max() > 0                                      # it did switch
    assert any(len(groups) == 1 and groups[0][0] == 1 for groups in log)
    assert len(pipe.transformer._forward_pre_hooks) == 2          # the step tracker and the count switch
    dx.unpatch(pipe)
    del counts, original, log
    gc.collect()
    assert len(pipe.transformer._forward_pre_hooks) == 0
    again = pipe(class_labels=[1, 2, 3], num_inference_steps=8, guidance_scale=4.0, generator=g(),
                 output_type="latent").images
    assert np.array_equal(stock, again)


def test_weights_round_trip(tmp_path):
    from diffusers_ext.weights import save_weights

    pipe = tiny_pipeline("dit")
    record = dx.patch(pipe, "mediator", mediators=(4, 16))
    tensors = {}
    for name, p in pipe.transformer.named_parameters():
        if ".processor." in name:
            with torch.no_grad():
                p.normal_()
            tensors[name] = p.detach().clone()
    out = pipe(class_labels=[5], num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    save_weights(tmp_path, pipe.transformer, record, tensors)
    dx.unpatch(pipe)
    dx.patch(pipe, "mediator", weights=str(tmp_path))
    assert dx.patch_record(pipe).options["mediators"] == (4, 16)
    again = pipe(class_labels=[5], num_inference_steps=2, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(out, again, rtol=1e-5, atol=1e-6)


def _run_counts(counts, state, latents, times=None):
    """Feed the latents of consecutive calls; `times[i]` the call's (step_index, timestep, progress)."""
    for i, x in enumerate(latents):
        state.step_index, state.timestep, state.progress = times[i] if times else (i, float(i), i / 10)
        counts.observe(x)
        counts.groups(x.shape[0])


def test_adaptive_switch_restarts_only_on_a_new_run_and_ignores_corrector_calls():
    """Window 1, ratio 0.5; sample 1 slows down and switches at step 2. A Heun corrector call (same time and
    progress) neither restarts nor counts as a step; a new run of the same batch (progress back, or step 0
    at another time) starts over."""
    state = FakeState()
    counts = MediatorCounts(state, (4, 16), None, (0.5,), 1, "l2")
    zero = torch.zeros(2, 1, 1, 1)
    x1, x2 = zero + torch.tensor([1.0, 1.0]).view(2, 1, 1, 1), zero + torch.tensor([2.0, 1.1]).view(2, 1, 1, 1)
    _run_counts(counts, state, [zero, x1, x2])
    assert counts.levels.tolist() == [0, 1]
    _run_counts(counts, state, [x2 + 5], times=[(2, 2.0, 0.2)])      # corrector call at step 2: no change counted
    assert counts.levels.tolist() == [0, 1] and counts._changes == 2
    _run_counts(counts, state, [x2 + 5.05], times=[(3, 3.0, 0.3)])   # the next step measures from the corrector's latent
    assert counts.levels.tolist() == [1, 1]
    # a processor that sees another batch than the tracked one (e.g. a single call) uses the first count
    assert counts.groups(5) == [(4, None)]
    _run_counts(counts, state, [torch.zeros(3, 1, 1, 1)], times=[(4, 4.0, 0.4)])   # another batch: a new run
    assert counts.levels.tolist() == [0, 0, 0] and counts._changes == 0
    _run_counts(counts, state, [zero], times=[(1, 9.0, 0.05)])      # progress went back: a new run
    assert counts.levels.tolist() == [0, 0]
    _run_counts(counts, state, [zero, x1], times=[(0, 7.0, 0.0), (0, 8.0, 0.0)])  # step 0 at another time
    assert counts._changes == 0 and counts._time == 8.0                           # started over: no change


def test_adaptive_switch_l2_is_the_euclidean_norm():
    """Window 1, ratio 0.5: first change (1, 1, 1, 1) has l2 norm 2; a second change (0.9, 0, 0, 0) is below
    1 and switches (an l3 norm, 4^(1/3) / 2 = 0.79, would not)."""
    state = FakeState()
    counts = MediatorCounts(state, (4, 16), None, (0.5,), 1, "l2")
    x0 = torch.zeros(1, 1, 2, 2)
    x1 = x0 + 1
    x2 = x1 + torch.tensor([0.9, 0, 0, 0]).view(1, 1, 2, 2)
    _run_counts(counts, state, [x0, x1, x2])
    assert counts.levels.tolist() == [1]


def test_dwc_off_and_switch_norm_reach_the_processors():
    model = tiny_dit_transformer()
    record = dx.patch(model, "mediator", mediators=(4, 16), switch_ratios=(0.5,), switch_norm="l1", dwc=False)
    proc = record.processors()["transformer_blocks.0.attn1"]
    assert proc.dwc is None and proc.counts.norm == "l1"
    assert dx.patch(model, "mediator", mediators=(4, 16), switch_ratios=(0.5,)).processors()[
        "transformer_blocks.0.attn1"].counts.norm == "l2"
    record = dx.patch(model, "mediator", mediators=16, dwc=False)
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        out = model(x, timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 2])).sample
    assert torch.isfinite(out).all()


def test_adaptive_switch_measures_bf16_latents_in_fp32():
    """Window 1, ratio 0.5, bf16 latents: the first change has l2 norm 2, the second
    sqrt(3 * 0.5^2 + 0.498046875^2) = 0.99903 (all four values exact in bf16), a ratio of 0.49951 that
    switches. A norm taken in bf16 rounds 0.99903 to 1.0, the ratio to exactly 0.5, and would not switch."""
    state = FakeState()
    counts = MediatorCounts(state, (4, 16), None, (0.5,), 1, "l2")
    x0 = -torch.ones(1, 1, 2, 2, dtype=torch.bfloat16)
    x1 = torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16)
    x2 = torch.tensor([0.5, 0.5, 0.5, 0.498046875], dtype=torch.bfloat16).view(1, 1, 2, 2)
    assert float(torch.linalg.vector_norm((x2 - x1).flatten(1), dim=1)) == 1.0     # what bf16 would see
    _run_counts(counts, state, [x0, x1, x2])
    assert counts.levels.tolist() == [1]
