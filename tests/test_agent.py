"""Agent attention and grid token merging against straightforward dense references."""

import logging

import pytest
import torch
from diffusers_ext.patching import PatchRecord
from helpers import denoiser_inputs, run_denoiser
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import diffusers_ext as dx
from diffusers_ext.families import AttentionSite
from diffusers_ext.merge import destination_positions, match_on_grid
from diffusers_ext.ops import agent_attention, pool_on_grid
from diffusers_ext.registry import get_method
from diffusers_ext.steps import Schedule, StepState


def softmax_attention(q, k, v, scale):
    return torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v


# --- merging -----------------------------------------------------------------------------------------

def reference_match(x, grid, stride, ratio, dst_pos):
    """Loop-based bipartite matching: returns (merged tokens, unmerge map, agents) for batch row 0."""
    n = x.shape[0]
    dst = [int(p) for p in dst_pos]
    src = [p for p in range(n) if p not in set(dst)]
    unit = x / x.norm(dim=-1, keepdim=True)
    best = []
    for s in src:
        sims = torch.stack([unit[s] @ unit[d] for d in dst])
        best.append((float(sims.max()), s, int(sims.argmax())))
    ranked = sorted(best, key=lambda b: -b[0])
    r = min(int(ratio * n), len(src))
    merged, kept = ranked[:r], ranked[r:]
    groups = {j: [dst[j]] for j in range(len(dst))}
    for _, s, j in merged:
        groups[j].append(s)
    kept_src = [s for _, s, _ in kept]
    tokens = [x[s] for s in kept_src] + [x[groups[j]].mean(0) for j in range(len(dst))]
    row_of = {}
    for i, s in enumerate(kept_src):
        row_of[s] = i
    for j in range(len(dst)):
        for p in groups[j]:
            row_of[p] = len(kept_src) + j
    all_groups = {j: [dst[j]] for j in range(len(dst))}
    for _, s, j in best:
        all_groups[j].append(s)
    agents = torch.stack([x[all_groups[j]].mean(0) for j in range(len(dst))])
    return torch.stack(tokens), [row_of[p] for p in range(n)], agents


@pytest.mark.parametrize("grid, stride, ratio, random", [((8, 8), 2, 0.4, False), ((6, 10), 4, 0.5, True),
                                                        ((9, 7), 2, 0.3, True)])
def test_grid_merge_matches_loop_reference(grid, stride, ratio, random):
    torch.manual_seed(0)
    n = grid[0] * grid[1]
    x = torch.randn(1, n, 5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3) if random else None
    match = match_on_grid(x, grid, stride, ratio, gen)
    gen = torch.Generator().manual_seed(3) if random else None
    dst_pos = destination_positions(grid, stride, gen, x.device)
    tokens, rows, agents = reference_match(x[0], grid, stride, ratio, dst_pos)

    merged = match.merge(x)[0]
    # same multiset of merged tokens (the order of kept sources may differ on similarity ties)
    assert merged.shape == tokens.shape
    torch.testing.assert_close(merged[-len(dst_pos):], tokens[-len(dst_pos):])
    torch.testing.assert_close(torch.sort(merged[:-len(dst_pos)], dim=0)[0], torch.sort(tokens[:-len(dst_pos)], dim=0)[0])
    # unmerge: every position gets the value of the token it was merged into
    y = torch.randn(1, merged.shape[0], 3, dtype=torch.float64)
    restored = match.unmerge(match.merge(x))
    expected = torch.stack([tokens[rows[p]] for p in range(n)])
    torch.testing.assert_close(restored[0], expected)
    assert match.unmerge(y).shape == (1, n, 3)
    torch.testing.assert_close(match.agents(x)[0], agents)


def test_destinations_one_per_cell_and_seeded():
    pos = destination_positions((8, 12), 4, torch.Generator().manual_seed(1), torch.device("cpu"))
    rows, cols = pos // 12, pos % 12
    assert sorted(zip((rows // 4).tolist(), (cols // 4).tolist())) == [(i, j) for i in range(2) for j in range(3)]
    again = destination_positions((8, 12), 4, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert torch.equal(pos, again)
    assert torch.equal(destination_positions((8, 12), 4, None, torch.device("cpu")),
                       torch.tensor([0, 4, 8, 48, 52, 56]))


def test_match_rejects_wrong_grid_and_skips_tiny_grids():
    with pytest.raises(ValueError, match="do not fill"):
        match_on_grid(torch.randn(1, 10, 4), (3, 3), 2, 0.5)
    assert match_on_grid(torch.randn(1, 9, 4), (3, 3), 4, 0.5) is None


# --- agent attention ---------------------------------------------------------------------------------

def test_agent_attention_op_matches_dense_equations():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, dtype=torch.float64) for _ in range(3))
    agents = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    s, s2, c = 8**-0.5, 8 ** (-0.5 * 0.3), 0.075
    expected = softmax_attention(q, agents, softmax_attention(agents, k, v, s), s2) + c * v
    torch.testing.assert_close(agent_attention(q, k, v, agents, s, s2, c), expected)


def _site():
    attn = Attention(query_dim=32, heads=4, dim_head=8)
    attn.set_processor(AttnProcessor2_0())
    return attn, AttentionSite("block.attn1", attn, "self", 0, 0)


def _processor(attn, site, latent_hw, agent_phase=True, **options):
    method = get_method("agent")
    resolved = method.resolve_options("sd", {"min_tokens": 1, **options})   # small test grids act
    state = StepState(schedules={"steps": Schedule(), "agent_steps": resolved["agent_steps"]})
    state.latent_hw = latent_hw
    state.update(999.0, 0, 50, 0.0 if agent_phase else 0.9)
    processor = method.make_processor(site, attn.processor, PatchRecord("agent", "sd", resolved, state))
    attn.set_processor(processor)
    return processor


def _dense_reference(attn, x, agents_x, k_scale2, k_shortcut, tokens=None):
    """to_out(softmax(s2 Q A^T) softmax(s A K^T) V + c V) with every step written out."""
    tokens = x if tokens is None else tokens
    heads = attn.heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2).double()

    q, k, v = split(attn.to_q(tokens)), split(attn.to_k(tokens)), split(attn.to_v(tokens))
    a = split(attn.to_q(agents_x))
    d = q.shape[-1]
    f = softmax_attention(a, k, v, d**-0.5)
    o = softmax_attention(q, a, f, d ** (-0.5 * k_scale2)) + k_shortcut * v
    o = o.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[1], -1).float()
    return attn.to_out[0](o)


def test_processor_pooled_agents_without_merging_matches_dense():
    torch.manual_seed(0)
    attn, site = _site()
    _processor(attn, site, (8, 12), agent_source="pool", merge_ratio=0.0, agent_stride=4)
    x = torch.randn(2, 96, 32)
    with torch.no_grad():
        out = attn(x)
        agents = pool_on_grid(x, (8, 12), (2, 3))
        expected = _dense_reference(attn, x, agents, 0.3, 0.075)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_processor_merged_agents_and_tokens_matches_dense():
    torch.manual_seed(1)
    attn, site = _site()
    _processor(attn, site, (8, 8), agent_source="merge", merge_ratio=0.4, agent_stride=2, random_dst=False,
               k_scale2=0.5, k_shortcut=0.1)
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        out = attn(x)
        dst = destination_positions((8, 8), 2, None, x.device)
        tokens, rows, agents = reference_match(x[0].double(), (8, 8), 2, 0.4, dst)
        merged_out = _dense_reference(attn, x, agents[None].float(), 0.5, 0.1, tokens=tokens[None].float())
        expected = merged_out[0][rows][None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_late_phase_is_token_merged_softmax_attention():
    torch.manual_seed(2)
    attn, site = _site()
    _processor(attn, site, (8, 8), agent_phase=False, merge_ratio=0.5, merge_stride=2, random_dst=False)
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        out = attn(x)
        tokens, rows, _ = reference_match(x[0].double(), (8, 8), 2, 0.5, destination_positions((8, 8), 2, None, x.device))
        t = tokens[None].float()
        q, k, v = (attn.to_q(t), attn.to_k(t), attn.to_v(t))
        split = lambda z: z.view(1, -1, 4, 8).transpose(1, 2)  # noqa: E731
        o = softmax_attention(split(q), split(k), split(v), 8**-0.5).transpose(1, 2).reshape(1, -1, 32)
        expected = attn.to_out[0](o)[0][rows][None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_no_merge_outside_agent_steps_is_stock_exactly():
    torch.manual_seed(3)
    attn, site = _site()
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        stock = attn(x)
        _processor(attn, site, (8, 8), agent_phase=False, merge_ratio=0.0)
        assert torch.equal(attn(x), stock)


def test_upcast_attention_computes_in_fp32():
    torch.manual_seed(4)
    attn, site = _site()
    attn.upcast_attention = True
    attn.to(torch.bfloat16)
    _processor(attn, site, (8, 8), agent_source="pool", merge_ratio=0.0, agent_stride=4)
    x = torch.randn(1, 64, 32).to(torch.bfloat16)
    with torch.no_grad():
        out = attn(x)
        reference = _dense_reference(attn.float(), x.float(), pool_on_grid(x.float(), (8, 8), (2, 2)), 0.3, 0.075)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)


def test_cfg_halves_get_the_same_treatment():
    torch.manual_seed(5)
    attn, site = _site()
    _processor(attn, site, (8, 8))
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        out = attn(torch.cat([x, x]))
        single = attn(x)
    assert torch.equal(out[0], out[1])
    torch.testing.assert_close(out[:1], single, atol=1e-6, rtol=1e-5)


def test_masks_fall_back_to_stock_with_a_warning(caplog):
    attn, site = _site()
    x = torch.randn(1, 64, 32)
    mask = torch.zeros(1, 1, 64)
    with torch.no_grad():
        stock = attn(x, attention_mask=mask)
        _processor(attn, site, (8, 8))
        with caplog.at_level(logging.WARNING, logger="diffusers_ext"):
            out = attn(x, attention_mask=mask)
    assert torch.equal(out, stock)
    assert "masks" in caplog.text


def test_pipeline_is_deterministic_and_leaves_global_rng_alone(pipeline_of):
    pipe = pipeline_of("sd")
    model, kwargs = denoiser_inputs(pipe)
    stock = run_denoiser(model, kwargs)
    with dx.patched(pipe, "agent", agent_steps=(0.0, 1.0)):
        rng = torch.random.get_rng_state()
        first = run_denoiser(model, kwargs)
        second = run_denoiser(model, kwargs)
        assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.equal(first, second)
    assert first.shape == stock.shape and torch.isfinite(first).all()
    deviation = (first - stock).norm() / stock.norm()
    assert 0 < deviation < 0.5


def test_sdxl_default_acts_and_animatediff_spares_motion_modules(pipeline_of):
    sdxl = pipeline_of("sdxl")
    model, kwargs = denoiser_inputs(sdxl)
    stock = run_denoiser(model, kwargs)
    record = dx.patch(sdxl, "agent")
    try:
        assert record.sites and all(".attn1" in n for n in record.sites)
        out = run_denoiser(model, kwargs)
        assert torch.isfinite(out).all() and not torch.equal(out, stock)   # it acts on SDXL by default
    finally:
        dx.unpatch(sdxl)
    video = pipeline_of("animatediff")
    with dx.patched(video, "agent", agent_steps=(0.0, 1.0), agent_stride=2) as record:
        assert record.sites and not any("motion_modules" in name for name in record.sites)
        model, kwargs = denoiser_inputs(video)
        assert torch.isfinite(run_denoiser(model, kwargs)).all()


def test_agent_full_pipeline_runs_with_guidance(pipeline_of):
    pipe = pipeline_of("sd")
    with dx.patched(pipe, "agent"):
        image = pipe("a cat", num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                     output_type="np").images
    assert image.shape == (1, 64, 64, 3) and (image >= 0).all() and (image <= 1).all()


def test_option_errors():
    for bad in [dict(merge_ratio=0.9), dict(agent_stride=1), dict(k_shortcut=2.0), dict(random_dst="yes"),
                dict(max_downsample=3), dict(agent_stride=2, merge_ratio=0.75 + 0.01)]:
        with pytest.raises(ValueError):
            get_method("agent").resolve_options("sd", bad)


# --- ToDo (the peer in processors/todo.py) --------------------------------------------------------------

@pytest.mark.parametrize("mode", ["nearest", "avg"])
def test_todo_matches_dense_downsampled_attention(mode):
    torch.manual_seed(6)
    attn, site = _site()
    method = get_method("todo")
    options = method.resolve_options("sd", {"factor": 2, "mode": mode})
    state = StepState(schedules={"steps": Schedule()})
    state.latent_hw = (8, 6)
    state.update(999.0, 0, 10, 0.0)
    attn.set_processor(method.make_processor(site, attn.processor, PatchRecord("todo", "sd", options, state)))
    x = torch.randn(2, 48, 32)
    with torch.no_grad():
        out = attn(x)
        image = x.view(2, 8, 6, 32)
        if mode == "nearest":
            small = image[:, ::2, ::2]
        else:
            small = image.view(2, 4, 2, 3, 2, 32).mean(dim=(2, 4))
        small = small.reshape(2, 12, 32)
        split = lambda z: z.view(2, -1, 4, 8).transpose(1, 2)  # noqa: E731
        o = softmax_attention(split(attn.to_q(x)), split(attn.to_k(small)), split(attn.to_v(small)), 8**-0.5)
        expected = attn.to_out[0](o.transpose(1, 2).reshape(2, 48, 32))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_min_tokens_places_agent_attention(pipeline_of, monkeypatch):
    """Layers of >= min_tokens tokens act, and always the finest level; smaller ones run stock."""
    from diffusers_ext.processors.agent import AgentAttnProcessor

    acted = []
    attend = AgentAttnProcessor.attend
    monkeypatch.setattr(AgentAttnProcessor, "attend", lambda self, attn, x: acted.append(
        (self.level, x.shape[1])) or attend(self, attn, x))
    pipe = pipeline_of("sd")                    # 32 x 32 latent: level 0 has 1024 tokens, level 1 has 256
    model, kwargs = denoiser_inputs(pipe)
    for options, expected in [({}, {(0, 1024)}), ({"min_tokens": 256}, {(0, 1024), (1, 256)}),
                              ({"max_downsample": 1, "min_tokens": 1}, {(0, 1024)})]:
        acted.clear()
        with dx.patched(pipe, "agent", **options):
            run_denoiser(model, kwargs)
        assert set(acted) == expected, options
