"""Agent attention and grid token merging against straightforward dense references."""

import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers_ext.errors import PatchError
from diffusers_ext.patching import RECORD_ATTRIBUTE, PatchRecord
from helpers import assert_rounded_from_exact, denoiser_inputs, heads_of, pool_loop, run_denoiser
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import diffusers_ext as dx
from diffusers_ext.families import AttentionSite
from diffusers_ext.merge import destination_positions, match_on_grid
from diffusers_ext.ops import agent_attention
from diffusers_ext.registry import get_method
from diffusers_ext.steps import Schedule, StepState
from diffusers_ext.testing import tiny_sd_unet


def softmax_attention(q, k, v, scale):
    return torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v


# --- merging -----------------------------------------------------------------------------------------

class LoopMatch:
    """Bipartite matching of one batch row written with explicit loops (ToMe / AgentSD): matched on
    `metric` (N, C), applied to any values (N, C') laid out like it."""

    def __init__(self, metric, dst_pos, ratio):
        self.n = metric.shape[0]
        self.dst = [int(p) for p in dst_pos]
        self.src = [p for p in range(self.n) if p not in set(self.dst)]
        unit = metric / metric.norm(dim=-1, keepdim=True)
        best = []
        for s in self.src:
            sims = [float(unit[s] @ unit[d]) for d in self.dst]
            j = max(range(len(sims)), key=sims.__getitem__)
            best.append((sims[j], s, j))
        self.ranked = sorted(best, key=lambda b: -b[0])      # (similarity, source, destination index)
        self.r = min(int(ratio * self.n), len(self.src))

    def _split(self, count):
        """The sources left after merging the `count` most similar, and each destination's group."""
        groups = [[d] for d in self.dst]
        for _, s, j in self.ranked[:count]:
            groups[j].append(s)
        return [s for _, s, _ in self.ranked[count:]], groups

    def merge(self, values):
        kept, groups = self._split(self.r)
        return torch.stack([values[s] for s in kept] + [values[g].mean(0) for g in groups])

    def unmerge(self, merged):
        kept, groups = self._split(self.r)
        row_of = {s: i for i, s in enumerate(kept)}
        for j, group in enumerate(groups):
            row_of.update({p: len(kept) + j for p in group})
        return torch.stack([merged[row_of[p]] for p in range(self.n)])

    def agents(self, values, agent_ratio):
        """AgentSD's agents: the int(agent_ratio N) most similar sources (at most all) merged."""
        rest, groups = self._split(min(int(agent_ratio * self.n), len(self.src)))
        return torch.stack([values[s] for s in rest] + [values[g].mean(0) for g in groups])


def _rows_sorted(t):
    """Rows in a canonical order (for sets of tokens whose order is free)."""
    return t[t[:, 0].argsort()]


@pytest.mark.parametrize("grid, stride, ratio, agent_ratio, random", [((8, 8), 2, 0.4, 1.0, False),
                                                                      ((6, 10), 4, 0.5, 0.7, True),
                                                                      ((9, 7), 2, 0.3, 0.5, True)])
def test_grid_merge_matches_loop_reference(grid, stride, ratio, agent_ratio, random):
    """Matched on one tensor, applied to another, as AgentSD does (block input / its norm)."""
    torch.manual_seed(0)
    n = grid[0] * grid[1]
    metric, x = torch.randn(1, n, 5, dtype=torch.float64), torch.randn(1, n, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3) if random else None
    match = match_on_grid(metric, grid, stride, ratio, gen)
    gen = torch.Generator().manual_seed(3) if random else None
    dst_pos = destination_positions(grid, stride, gen, x.device)
    loop = LoopMatch(metric[0], dst_pos, ratio)
    tokens = loop.merge(x[0])
    exact = dict(rtol=0, atol=1e-12)

    merged = match.merge(x)[0]
    # destinations in cell order; the kept sources as a set (their order is free)
    assert merged.shape == tokens.shape
    torch.testing.assert_close(merged[-len(dst_pos):], tokens[-len(dst_pos):], **exact)
    torch.testing.assert_close(_rows_sorted(merged[:-len(dst_pos)]), _rows_sorted(tokens[:-len(dst_pos)]), **exact)
    # unmerge: every position gets the value of the token it was merged into
    torch.testing.assert_close(match.unmerge(match.merge(x))[0], loop.unmerge(tokens), **exact)
    y = torch.randn(1, merged.shape[0], 2, dtype=torch.float64)
    assert match.unmerge(y).shape == (1, n, 2)
    agents, expected = match.agents(x, agent_ratio)[0], loop.agents(x[0], agent_ratio)
    assert agents.shape == expected.shape == (match.num_agents(agent_ratio), 3)
    torch.testing.assert_close(_rows_sorted(agents), _rows_sorted(expected), **exact)


def test_matching_keeps_fp64():
    """Two sources closer to their destination than fp32 resolves: fp64 ranks them right."""
    e1, e2 = torch.eye(2, dtype=torch.float64)
    metric = torch.stack([e1, e1 + 2e-5 * e2, e2, e1 + 1e-5 * e2])[None]   # destination: position 0
    match = match_on_grid(metric, (2, 2), 2, 0.25)                            # r = 1 source merged
    assert match.src_pos[match.merged[0]].tolist() == [3]
    unit = metric[0].float() / metric[0].float().norm(dim=-1, keepdim=True)
    assert unit[1] @ unit[0] == unit[3] @ unit[0]                             # a tie in fp32
    assert match.merge(metric).dtype == torch.float64


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
    """An agent processor on a bare Attention (no block around it: it matches on its input)."""
    method = get_method("agent")
    resolved = method.resolve_options("sd", {"min_tokens": 1, "merge_metric": "attention_input", **options})
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
    f = softmax_attention(a, k, v, attn.scale)                       # the layer's scale s (d^-1/2 unless set)
    o = softmax_attention(q, a, f, attn.scale**k_scale2) + k_shortcut * v
    o = o.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[1], -1).float()
    return attn.to_out[0](o)


def test_processor_pooled_agents_without_merging_matches_dense():
    torch.manual_seed(0)
    attn, site = _site()
    attn.scale = 0.6 * attn.scale   # not d^-1/2: both stages must use the layer's scale
    _processor(attn, site, (8, 12), agent_source="pool", merge_ratio=0.0, agent_stride=4)
    x = torch.randn(2, 96, 32)
    with torch.no_grad():
        out = attn(x)
        agents = pool_loop(x, (8, 12), (2, 3))
        expected = _dense_reference(attn, x, agents, 0.3, 0.075)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("merge_ratio", [0.4, 0.0])   # 0: no token merging, the agents still from the matching
def test_processor_merged_agents_and_tokens_matches_dense(merge_ratio):
    torch.manual_seed(1)
    attn, site = _site()
    _processor(attn, site, (8, 8), agent_source="merge", merge_ratio=merge_ratio, agent_stride=2, random_dst=False,
               k_scale2=0.5, k_shortcut=0.1)
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        out = attn(x)
        loop = LoopMatch(x[0].double(), destination_positions((8, 8), 2, None, x.device), merge_ratio)
        tokens, agents = loop.merge(x[0].double()), loop.agents(x[0].double(), 0.95)
        merged_out = _dense_reference(attn, x, agents[None].float(), 0.5, 0.1, tokens=tokens[None].float())
        expected = loop.unmerge(merged_out[0])[None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_late_phase_is_token_merged_softmax_attention():
    torch.manual_seed(2)
    attn, site = _site()
    attn.scale = 0.6 * attn.scale
    _processor(attn, site, (8, 8), agent_phase=False, merge_ratio=0.5, merge_stride=2, random_dst=False)
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        out = attn(x)
        loop = LoopMatch(x[0].double(), destination_positions((8, 8), 2, None, x.device), 0.5)
        t = loop.merge(x[0].double())[None].float()
        q, k, v = (attn.to_q(t), attn.to_k(t), attn.to_v(t))
        split = lambda z: z.view(1, -1, 4, 8).transpose(1, 2)  # noqa: E731
        o = softmax_attention(split(q), split(k), split(v), attn.scale).transpose(1, 2).reshape(1, -1, 32)
        expected = loop.unmerge(attn.to_out[0](o)[0])[None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grid", [(8, 8), (16, 8)])
def test_agents_not_fewer_than_half_the_tokens_fall_back_to_merged_softmax_attention(grid):
    """Pooled agents on 2 x 2 cells and half the tokens merged away: as many agents x 2 as tokens
    left, so agent attention would cost more than it saves and plain attention runs on the merged
    tokens (AgentSD's rule, 2n < N). On the 16 x 8 grid the cells are 8 x 4: their count is 32, not
    4 x 4 or 8 x 8."""
    torch.manual_seed(3)
    attn, site = _site()
    _processor(attn, site, grid, agent_source="pool", agent_stride=2, merge_ratio=0.5, random_dst=False)
    tokens = grid[0] * grid[1]
    x = torch.randn(1, tokens, 32)
    with torch.no_grad():
        out = attn(x)
        loop = LoopMatch(x[0].double(), destination_positions(grid, 2, None, x.device), 0.5)
        t = loop.merge(x[0].double())[None].float()
        assert t.shape[1] == 2 * (grid[0] // 2) * (grid[1] // 2)
        split = lambda z: z.view(1, -1, 4, 8).transpose(1, 2)  # noqa: E731
        o = softmax_attention(split(attn.to_q(t)), split(attn.to_k(t)), split(attn.to_v(t)), attn.scale)
        expected = loop.unmerge(attn.to_out[0](o.transpose(1, 2).reshape(1, -1, 32))[0])[None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_random_destinations_are_seeded_and_differ_from_the_top_left():
    """random_dst: the cell representatives are drawn (seeded: the same call twice is the same), so the merged
    output differs from the top-left choice."""
    torch.manual_seed(4)
    attn, site = _site()
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        _processor(attn, site, (8, 8), agent_phase=False, merge_ratio=0.5, merge_stride=2, random_dst=True)
        drawn = attn(x)
        assert torch.equal(attn(x), drawn)
        _processor(attn, site, (8, 8), agent_phase=False, merge_ratio=0.5, merge_stride=2, random_dst=False)
        assert not torch.allclose(attn(x), drawn)


def test_no_merge_outside_agent_steps_is_stock_exactly():
    torch.manual_seed(3)
    attn, site = _site()
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        stock = attn(x)
        _processor(attn, site, (8, 8), agent_phase=False, merge_ratio=0.0)
        assert torch.equal(attn(x), stock)


def _bf16_upcast_site():
    """A bare attention (4 heads of 8) with SD 2.x's upcast_attention, to_out the identity, in bf16."""
    attn, site = _site()
    attn.upcast_attention = True
    with torch.no_grad():
        attn.to_out[0].weight.copy_(torch.eye(32))
        attn.to_out[0].bias.zero_()
    return attn.to(torch.bfloat16), site


def test_upcast_attention_computes_in_fp32():
    """SD 2.x's upcast_attention on a bf16 module: projections in bf16 (the module's), attention in fp32,
    the output rounded to bf16 once. The reference takes the same bf16 projections, computes the
    attention in float64 and checks the output is within half a bf16 ulp of it (to_out is the identity;
    inputs are multiples of 1/8, so the pooled agents are exact in bf16)."""
    torch.manual_seed(4)
    attn, site = _bf16_upcast_site()
    _processor(attn, site, (8, 8), agent_source="pool", merge_ratio=0.0, agent_stride=4)
    x = (torch.randint(-8, 9, (2, 64, 32)) / 8).to(torch.bfloat16)
    with torch.no_grad():
        out = attn(x)
        agents = pool_loop(x.double(), (8, 8), (2, 2)).to(torch.bfloat16)
        q, k, v, a = (heads_of(f(z), 4).double() for f, z in
                      ((attn.to_q, x), (attn.to_k, x), (attn.to_v, x), (attn.to_q, agents)))
        o = softmax_attention(q, a, softmax_attention(a, k, v, 8**-0.5), 8 ** (-0.5 * 0.3)) + 0.075 * v
        exact = o.transpose(1, 2).reshape(2, 64, 32)
    assert out.dtype == torch.bfloat16
    assert_rounded_from_exact(out, exact)


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


# --- the whole transformer block, as AgentSD patches it ---------------------------------------------------

def _linear(layer, x):
    out = x @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


def _layer_norm(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)


def _row_attention(attn, tokens, context, agents=None, k_scale2=0.3, k_shortcut=0.075):
    """One batch row: to_out of softmax attention, or of AgentSD's agent attention
    softmax(s2 Q A^T) softmax(s A K^T) V + c V, with every step written out."""
    def heads(t):
        return t.view(t.shape[0], attn.heads, -1).transpose(0, 1)

    q, k, v = heads(_linear(attn.to_q, tokens)), heads(_linear(attn.to_k, context)), heads(_linear(attn.to_v, context))
    d = q.shape[-1]
    if agents is None:
        o = softmax_attention(q, k, v, d**-0.5)
    else:
        a = heads(_linear(attn.to_q, agents))
        o = softmax_attention(q, a, softmax_attention(a, k, v, d**-0.5), d ** (-0.5 * k_scale2)) + k_shortcut * v
    return _linear(attn.to_out[0], o.transpose(0, 1).reshape(tokens.shape[0], -1))


def _row_feed_forward(ff, y):
    hidden, gate = _linear(ff.net[0].proj, y).chunk(2, dim=-1)      # GEGLU
    return _linear(ff.net[2], hidden * F.gelu(gate))


def reference_block(block, x, context, grid, stride, agent_phase, options):
    """AgentSD's patched BasicTransformerBlock (agentsd/patch.py, `_forward`) on one batch row x (N, C):
    m, u = matching(metric); x += u(attn1(m(norm1(x)), agents of norm1(x))); x += u_c(attn2(m_c(norm2(x))));
    x += u_m(ff(m_m(norm3(x)))), with m_c, m_m = m only where merge_crossattn / merge_mlp."""
    y = _layer_norm(block.norm1, x)
    metric = x if options["merge_metric"] == "block_input" else y
    match = LoopMatch(metric, destination_positions(grid, stride, None, x.device), options["merge_ratio"])
    tokens = match.merge(y)
    agents = match.agents(y, options["agent_ratio"]) if agent_phase else None
    if agents is not None and 2 * agents.shape[0] >= tokens.shape[0]:
        agents = None                                                  # AgentSD: only where cheaper
    x = x + match.unmerge(_row_attention(block.attn1, tokens, tokens, agents))

    def around(fn, y, merged):
        return match.unmerge(fn(match.merge(y))) if merged else fn(y)

    x = x + around(lambda t: _row_attention(block.attn2, t, context), _layer_norm(block.norm2, x),
                   options["merge_crossattn"])
    return x + around(lambda t: _row_feed_forward(block.ff, t), _layer_norm(block.norm3, x), options["merge_mlp"])


def _run_tiny_unet(dtype, timestep, options, block_path=("down_blocks", 0, "attentions", 0, "transformer_blocks", 0)):
    """A tiny SD UNet (16 x 16 latent, batch 2) patched with `options`: (record options, the
    watched block, its input / text states / output)."""
    torch.manual_seed(0)
    unet = tiny_sd_unet().to(dtype).eval()
    sample = torch.randn(2, 4, 16, 16, dtype=dtype)
    context = torch.randn(2, 7, 32, dtype=dtype)
    block = unet
    for step in block_path:
        block = block[step] if isinstance(step, int) else getattr(block, step)
    seen = {}
    with dx.patched(unet, "agent", random_dst=False, **options) as record:
        handle = block.register_forward_hook(
            lambda m, args, kwargs, out: seen.update(x=args[0], c=kwargs["encoder_hidden_states"], out=out),
            with_kwargs=True)
        try:
            with torch.no_grad():
                unet(sample, timestep, encoder_hidden_states=context)
        finally:
            handle.remove()
    return record.options, block, seen


def _todo(attn, site, latent_hw, **options):
    """A ToDo processor (factor 2 unless given) on a bare Attention whose latent grid is `latent_hw`."""
    method = get_method("todo")
    state = StepState(schedules={"steps": Schedule()})
    state.latent_hw = latent_hw
    state.update(999.0, 0, 10, 0.0)
    record = PatchRecord("todo", "sd", method.resolve_options("sd", {"factor": 2, **options}), state)
    attn.set_processor(method.make_processor(site, attn.processor, record))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("timestep, options", [
    (999.0, {}),                                                        # agent phase, AgentSD's recipe
    (999.0, {"agent_ratio": 0.8, "merge_crossattn": True, "merge_mlp": True}),
    (999.0, {"merge_metric": "attention_input"}),
    (200.0, {"merge_crossattn": True}),                                 # ToMe phase (2 x 2 cells)
])
def test_patched_block_matches_agentsd_block_reference(dtype, tol, timestep, options):
    resolved, block, seen = _run_tiny_unet(dtype, timestep, options)
    agent_phase = timestep == 999.0
    stride = resolved["agent_stride"] if agent_phase else resolved["merge_stride"]
    with torch.no_grad():
        expected = torch.stack([reference_block(block, seen["x"][b].double(), seen["c"][b].double(), (16, 16), stride,
                                                agent_phase, resolved) for b in range(2)])
    assert seen["out"].dtype == dtype
    torch.testing.assert_close(seen["out"].double(), expected, rtol=tol, atol=tol)


def test_block_input_and_attention_input_match_different_tokens():
    _, block, by_block = _run_tiny_unet(torch.float64, 999.0, {})
    _, _, by_attention = _run_tiny_unet(torch.float64, 999.0, {"merge_metric": "attention_input"})
    assert torch.equal(by_block["x"], by_attention["x"])        # first block: the same input
    x = by_block["x"][0]
    dst = destination_positions((16, 16), 4, None, x.device)
    with torch.no_grad():
        y = _layer_norm(block.norm1, x)
        assert LoopMatch(x, dst, 0.4).ranked[:102] != LoopMatch(y, dst, 0.4).ranked[:102]
    assert (by_block["out"] - by_attention["out"]).abs().max() > 1e-6


def _hook_counts(model):
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()
            if m._forward_pre_hooks or m._forward_hooks}


def test_block_hooks_installed_per_option_and_removed_exactly(pipeline_of):
    pipe = pipeline_of("sd")
    model, kwargs = denoiser_inputs(pipe)
    before = _hook_counts(model)
    tracked = {**before, "": (1, 0)}     # every patch's step tracker: one forward pre-hook on the denoiser
    stock = run_denoiser(model, kwargs)
    with dx.patched(pipe, "agent", merge_metric="attention_input"):
        assert _hook_counts(model) == tracked                     # nothing to hand over: no block hooks
    for wrapped in ("attn2", "ff"):                               # one kind of merging needs the hooks
        options = {"merge_crossattn": wrapped == "attn2", "merge_mlp": wrapped == "ff"}
        with dx.patched(pipe, "agent", merge_metric="attention_input", **options) as record:
            blocks = {name.rpartition(".")[0] for name in record.sites}
            assert _hook_counts(model) == {**tracked, **{b: (1, 1) for b in blocks},
                                           **{f"{b}.{wrapped}": (1, 1) for b in blocks}}
    with dx.patched(pipe, "agent") as record:                     # the default: the block input, no wrapping
        blocks = {name.rpartition(".")[0] for name in record.sites}
        assert _hook_counts(model) == {**tracked, **{b: (1, 1) for b in blocks}}
        run_denoiser(model, kwargs)                               # sets the step and the latent grid
        block = model.get_submodule(sorted(blocks)[0])
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 256, block.norm1.normalized_shape[0], generator=g)
        c = torch.randn(2, 7, block.attn2.to_k.in_features, generator=g)
        with torch.no_grad():   # the block called with keywords reads its input as it does positionally
            torch.testing.assert_close(block(hidden_states=x, encoder_hidden_states=c),
                                       block(x, encoder_hidden_states=c), rtol=0, atol=0)
    with dx.patched(pipe, "agent", merge_crossattn=True, merge_mlp=True) as record:
        blocks = {name.rpartition(".")[0] for name in record.sites}
        expected = {**tracked, **{b: (1, 1) for b in blocks},
                    **{f"{b}.{m}": (1, 1) for b in blocks for m in ("attn2", "ff")}}
        assert _hook_counts(model) == expected
        agent_out = run_denoiser(model, kwargs)
        taps = [p.tap for p in record.processors().values()]
        assert all(t.block_input is None and t.match is None for t in taps)   # nothing outlives a call
    assert _hook_counts(model) == before
    assert torch.equal(run_denoiser(model, kwargs), stock) and not torch.equal(agent_out, stock)


def test_cfg_halves_match_alike_on_the_block_input(pipeline_of):
    pipe = pipeline_of("sd")
    model, kwargs = denoiser_inputs(pipe, batch=1)
    doubled = {**kwargs, "sample": kwargs["sample"].repeat(2, 1, 1, 1),
               "encoder_hidden_states": kwargs["encoder_hidden_states"].repeat(2, 1, 1)}
    with dx.patched(pipe, "agent", merge_crossattn=True, merge_mlp=True):
        out = run_denoiser(model, doubled)
        single = run_denoiser(model, kwargs)
    assert torch.equal(out[0], out[1])
    torch.testing.assert_close(out[:1], single, atol=1e-5, rtol=1e-5)


def test_block_input_needs_the_block_and_mlp_merging_refuses_chunking():
    attn, site = _site()
    _processor(attn, site, (8, 8), merge_metric="block_input")
    with pytest.raises(RuntimeError, match="merge_metric='block_input' needs the input of the transformer block"):
        with torch.no_grad():
            attn(torch.randn(1, 64, 32))
    for container in (False, True):    # a self-attention whose parent is not a transformer block (no norm1)
        unet = tiny_sd_unet().eval()
        block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
        if container:                    # the layer moved into a plain container
            holder = torch.nn.Module()
            holder.attn1 = block.attn1
            del block.attn1
            block.holder = holder
        else:
            del block.norm1
        with pytest.raises(PatchError, match="need the transformer block"):
            dx.patch(unet, "agent")
        assert not hasattr(unet, RECORD_ATTRIBUTE) and all(
            type(m.processor).__module__.startswith("diffusers.") for m in unet.modules() if hasattr(m, "processor"))
    unet = tiny_sd_unet().eval()
    for module in unet.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            module.set_chunk_feed_forward(64, dim=1)
    with dx.patched(unet, "agent", merge_mlp=True), torch.no_grad(), pytest.raises(ValueError, match="chunking"):
        unet(torch.randn(1, 4, 16, 16), 999.0, encoder_hidden_states=torch.randn(1, 7, 32))


def test_torch_compile_with_block_hooks_does_not_recompile_every_step(pipeline_of):
    """The hooks hand tensors over within a call: new steps add no graphs, compiled = eager."""
    from torch._dynamo.utils import counters

    pipe = pipeline_of("sd")
    model, kwargs = denoiser_inputs(pipe)
    torch._dynamo.reset()
    counters.clear()
    try:
        with dx.patched(pipe, "agent", merge_crossattn=True, merge_mlp=True):
            compiled = torch.compile(model, backend="eager")
            with torch.no_grad():
                # the agent phase (t = 999: 0 % of the run) and the ToMe phase (t = 500: 50 %)
                first = [compiled(**{**kwargs, "timestep": torch.tensor(t)}, return_dict=False)[0]
                         for t in (999.0, 500.0)]
                graphs = counters["stats"]["unique_graphs"]
                for t in (900.0, 300.0):        # new steps of both phases
                    compiled(**{**kwargs, "timestep": torch.tensor(t)}, return_dict=False)
            assert counters["stats"]["unique_graphs"] == graphs, "new steps compiled new graphs"
            eager = run_denoiser(model, {**kwargs, "timestep": torch.tensor(999.0)})
        torch.testing.assert_close(first[0], eager, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


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
                dict(max_downsample=3), dict(agent_stride=2, merge_ratio=0.75 + 0.01), dict(merge_metric="norm"),
                dict(agent_ratio=1.5), dict(merge_mlp="yes"), dict(merge_crossattn=1)]:
        with pytest.raises(ValueError):
            get_method("agent").resolve_options("sd", bad)
    with pytest.raises(ValueError, match="agent attention would never run; agent_ratio must exceed 0.700"):
        get_method("agent").resolve_options("sd", dict(agent_ratio=0.7))     # 0.3 agents vs 0.6 tokens
    with pytest.raises(ValueError, match="at most 0.750, the sources of agent_stride 2"):
        get_method("agent").resolve_options("sd", dict(agent_stride=2, merge_ratio=0.6))
    get_method("agent").resolve_options("sd", dict(agent_ratio=0.71))
    get_method("agent").resolve_options("sd", dict(agent_stride=2, merge_ratio=0.75, agent_source="pool"))  # the edge
    get_method("agent").resolve_options("sd", dict(agent_ratio=0.5, agent_source="pool"))   # pooled: unused


# --- ToDo (the peer in processors/todo.py) --------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("mode", ["nearest", "avg"])
def test_todo_matches_dense_downsampled_attention(mode, dtype, tol):
    torch.manual_seed(6)
    attn, site = _site()
    attn.to(dtype)
    _todo(attn, site, (8, 6), mode=mode)
    x = torch.randn(2, 48, 32, dtype=dtype)
    with torch.no_grad():
        out = attn(x)
        image = x.double().view(2, 8, 6, 32)
        if mode == "nearest":
            small = image[:, ::2, ::2]
        else:
            small = image.view(2, 4, 2, 3, 2, 32).mean(dim=(2, 4))
        small = small.reshape(2, 12, 32)
        expected = torch.stack([_row_attention(attn, x[b].double(), small[b]) for b in range(2)])
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_todo_honours_the_layer_scale_and_upcast_attention():
    """A layer whose softmax scale is not d^-1/2 keeps it; SD 2.x's upcast_attention on a bf16 module:
    bf16 projections, attention in fp32, the output rounded to bf16 once (within half a bf16 ulp of
    the float64 attention of the same projections; to_out is the identity, inputs multiples of 1/8)."""
    torch.manual_seed(7)
    attn, site = _site()
    attn.scale = 0.2
    _todo(attn, site, (8, 8))
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        small = x.view(2, 8, 8, 32)[:, ::2, ::2].reshape(2, 16, 32)
        q, k, v = heads_of(attn.to_q(x), 4), heads_of(attn.to_k(small), 4), heads_of(attn.to_v(small), 4)
        expected = attn.to_out[0](softmax_attention(q, k, v, 0.2).transpose(1, 2).reshape(2, 64, 32))
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-4)

    attn, site = _bf16_upcast_site()
    _todo(attn, site, (8, 8))
    x = (torch.randint(-8, 9, (2, 64, 32)) / 8).to(torch.bfloat16)
    with torch.no_grad():
        out = attn(x)
        small = x.view(2, 8, 8, 32)[:, ::2, ::2].reshape(2, 16, 32)
        q, k, v = (heads_of(f(z), 4).double() for f, z in ((attn.to_q, x), (attn.to_k, small), (attn.to_v, small)))
        exact = softmax_attention(q, k, v, 8**-0.5).transpose(1, 2).reshape(2, 64, 32)
    assert out.dtype == torch.bfloat16
    assert_rounded_from_exact(out, exact)


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
