"""Agent attention for Stable Diffusion UNets, training-free (AgentSD; Han et al., ECCV 2024).

With n agent tokens A (n << N), self-attention becomes two ordinary softmax attentions:

    F = softmax(s A K^T) V                       agents gather from the tokens
    O = softmax(s2 Q A^T) F + k_shortcut * V     tokens read back;  s = d^-1/2,  s2 = s^k_scale2

AgentSD's training-free recipe (SD 1.5, 50 steps), the defaults here:
- agents: ToMe bipartite matching of the block input on 4 x 4 cells, every other token averaged
  into its most similar cell representative, projected with `to_q` (`agent_source="merge"`); or
  average-pooled on the same cells (`agent_source="pool"`, the paper's general form, no matching);
- the tokens themselves are merged too (ToMe, `merge_ratio=0.4`) and unmerged after attention;
- agent attention in the first 40 % of steps (`agent_steps`); in the other steps of `steps` only
  token merging (on 2 x 2 cells, `merge_stride`), or stock attention with `merge_ratio=0`;
- self-attention (`attn1`) of the highest-resolution blocks only (ToMe's `max_downsample=1`, 5 of
  16 blocks in SD 1.x), written for 512^2 images, where that level is a 64 x 64 grid.

Where, here (a choice, measured in benchmarks/results/agent_unet.md): every self-attention layer
of at least `min_tokens=4096` tokens (a 64 x 64 grid, what AgentSD patches at 512^2), and always
the finest level that has attention. At 512^2 on SD 1.x this is exactly AgentSD's placement; at
1024^2 it adds the 64 x 64 second level, which ToMe's fixed `max_downsample=1` would leave as
full softmax attention over 4,096 tokens; on SDXL (no attention at its first level) it is the
second level, so the patch always acts. `max_downsample` bounds the levels considered, and a
choice that selects no layer is an error, never a silent no-op.
- k_scale2 = 0.3 (a much sharper read-back softmax), k_shortcut = 0.075 (stands in for the
  trained depthwise conv of V), no agent biases (they need training).

Where we differ from the released code, on purpose: random cell representatives come from a
generator seeded by (`seed`, block, step), never the global RNG, so a run is reproducible and
the conditional and unconditional halves of a CFG batch always match the same way; attention
masks fall back to stock attention with a warning instead of being ignored; `upcast_attention`
(SD 2.x) computes attention in fp32. As in AgentSD, agent attention is used only where it is
cheaper: with fewer than half as many agents as (merged) tokens, else plain attention.
"""

from __future__ import annotations

import torch

from diffusers_ext.merge import match_on_grid
from diffusers_ext.families import unet_self_attention
from diffusers_ext.ops import agent_attention, pool_on_grid, sdpa
from diffusers_ext.processor import SelfAttentionProcessor, compute_dtype, project_kv, project_out, project_q
from diffusers_ext.registry import STEPS, Method, Option, boolean, number, one_of, register_method, schedule


class AgentAttnProcessor(SelfAttentionProcessor):
    """Agent attention + token merging on one UNet self-attention layer."""

    label = "agent attention"

    def __init__(self, original, site, state, options):
        super().__init__(original, site, state)
        self.merge_ratio = options["merge_ratio"]
        self.merge_stride = options["merge_stride"]
        self.agent_stride = options["agent_stride"]
        self.agent_source = options["agent_source"]
        self.k_scale2 = options["k_scale2"]
        self.k_shortcut = options["k_shortcut"]
        self.random_dst = options["random_dst"]
        self.seed = options["seed"]
        self.level = site.level
        self.min_tokens = options["min_tokens"]
        self.finest = False  # set by AgentMethod.attach: the finest patched level always acts

    def patched(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        num_tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states[0, 0].numel()
        small = num_tokens < self.min_tokens and not self.finest
        if small or (self.merge_ratio == 0 and not self.state.active.get("agent_steps", True)):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)  # exact stock
        return super().patched(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    @torch.compiler.disable  # reads the step: kept out of compiled graphs so steps add no guards
    def _generator(self) -> torch.Generator | None:
        if not self.random_dst:
            return None
        step = self.state.step_index
        step = step if step is not None else round(self.state.progress * 10_000)
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.depth * 10_007 + step)

    def attend(self, attn, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) on the image grid -> attention output after `to_out` (B, N, C_out)."""
        grid = self.grid_of(x.shape[1])
        agent_phase = self.state.active.get("agent_steps", True)
        stride = self.agent_stride if agent_phase else self.merge_stride
        needs_match = self.merge_ratio > 0 or (agent_phase and self.agent_source == "merge")
        match = match_on_grid(x, grid, stride, self.merge_ratio, self._generator()) if needs_match else None

        tokens = match.merge(x) if match is not None and match.num_merged else x
        dtype = compute_dtype(attn, x.dtype)
        q = project_q(attn, tokens).to(dtype)
        k, v = (t.to(dtype) for t in project_kv(attn, tokens))

        num_agents = (grid[0] // self.agent_stride) * (grid[1] // self.agent_stride)
        if agent_phase and 0 < 2 * num_agents < tokens.shape[1]:
            if self.agent_source == "merge" and match is not None:
                agents = match.agents(x)
            else:
                agents = pool_on_grid(x, grid, (grid[0] // self.agent_stride, grid[1] // self.agent_stride))
            agents = project_q(attn, agents).to(dtype)
            out = agent_attention(q, k, v, agents, attn.scale, attn.scale**self.k_scale2, self.k_shortcut)
        else:
            out = sdpa(q, k, v, attn.scale)

        out = project_out(attn, out, x.dtype)
        return match.unmerge(out) if match is not None and match.num_merged else out


@register_method
class AgentMethod(Method):
    name = "agent"
    families = ("sd", "sdxl", "animatediff")
    training_free = True
    description = "Agent attention + token merging on UNet self-attention (AgentSD, training-free)"
    options = (
        STEPS,
        Option("agent_steps", (0.0, 0.4), "part of the run with agent attention; elsewhere token merging only",
               schedule("agent_steps")),
        Option("max_downsample", 8, "consider UNet levels with at most this downsampling", one_of(1, 2, 4, 8)),
        Option("min_tokens", 4096, "act on layers of at least this many tokens (and always the finest level)",
               number(1, None, integer=True)),
        Option("agent_stride", 4, "one agent per agent_stride x agent_stride cell", number(2, 16, integer=True)),
        Option("agent_source", "merge", "agents by ToMe matching ('merge', AgentSD) or average pooling ('pool')",
               one_of("merge", "pool")),
        Option("merge_ratio", 0.4, "share of tokens merged away before attention (0 disables ToMe)",
               number(0.0, 0.75)),
        Option("merge_stride", 2, "ToMe cell size outside the agent steps", number(2, 8, integer=True)),
        Option("k_scale2", 0.3, "read-back softmax scale exponent: s2 = d^(-0.5 k_scale2)", number(0.0, 4.0)),
        Option("k_shortcut", 0.075, "weight of the V shortcut (stands in for the trained DWC)", number(0.0, 1.0)),
        Option("random_dst", True, "random cell representative (seeded), else the top-left token", boolean),
        Option("seed", 0, "seed of the cell representatives' generator", number(0, 2**31 - 1, integer=True)),
    )

    def check_options(self, options, family):
        stride_cells = 1 - 1 / options["agent_stride"] ** 2
        if options["merge_ratio"] > stride_cells:
            raise ValueError(f"option `merge_ratio` {options['merge_ratio']} exceeds the sources available "
                             f"with agent_stride {options['agent_stride']} ({stride_cells:.3f})")

    def select_sites(self, sites, options, family):
        return unet_self_attention(sites, options["max_downsample"])

    def make_processor(self, site, original, patch):
        return AgentAttnProcessor(original, site, patch.state, patch.options)

    def attach(self, patch):
        processors = list(patch.processors().values())
        finest = min(p.level for p in processors)
        for processor in processors:
            processor.finest = processor.level == finest

