"""Agent attention for Stable Diffusion UNets, training-free (AgentSD; Han et al., ECCV 2024).

With n agent tokens A (n << N), self-attention becomes two ordinary softmax attentions:

    F = softmax(s A K^T) V                       agents gather from the tokens
    O = softmax(s2 Q A^T) F + k_shortcut * V     tokens read back;  s = d^-1/2,  s2 = s^k_scale2

AgentSD's training-free recipe (SD 1.5, 50 steps), the defaults here:
- the matching: ToMe bipartite matching computed on the transformer block's input, before
  `norm1` (`merge_metric="block_input"`, as AgentSD's and tomesd's patched blocks do), applied to
  the attention input norm1(x); `merge_metric="attention_input"` matches on norm1(x) itself;
- agents: with that matching on 4 x 4 cells, the `agent_ratio=0.95` share of the tokens (at most
  every source, so one agent per cell) averaged into their most similar cell representative,
  projected with `to_q` (`agent_source="merge"`); or average-pooled on the same cells
  (`agent_source="pool"`, the paper's general form, no matching);
- the tokens themselves are merged too (ToMe, `merge_ratio=0.4`) and unmerged after attention;
  with `merge_crossattn` / `merge_mlp` (off, as in AgentSD and tomesd) also around the block's
  cross-attention and feed-forward, with the same matching;
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
(SD 2.x) computes attention in fp32; the matching's similarities in at least fp32 (fp64 stays);
with `merge_crossattn` the cross-attention runs plain softmax attention on the merged tokens in
both phases (the release would hand it the agents in the agent phase, where its `k_shortcut * V`
of the 77 text tokens cannot be added to the image tokens). As in AgentSD, agent attention is
used only where it is cheaper: with fewer than half as many agents as (merged) tokens, else plain
attention.

The block input reaches the processor through hooks on its BasicTransformerBlock (`tap_block`,
installed by `AgentMethod.attach`, removed by `detach`); with `merge_metric="attention_input"`
and no cross-attention / feed-forward merging no hook is installed.
"""

from __future__ import annotations

import torch

from diffusers_ext.errors import PatchError
from diffusers_ext.merge import GridMerge, match_on_grid
from diffusers_ext.families import unet_self_attention
from diffusers_ext.ops import agent_attention, pool_on_grid, sdpa
from diffusers_ext.processor import SelfAttentionProcessor, compute_dtype, project_kv, project_out, project_q
from diffusers_ext.registry import STEPS, Method, Option, boolean, number, one_of, register_method, schedule


class BlockTap:
    """What the transformer block around a patched `attn1` hands over during one block call: the
    block's input (the matching metric of `merge_metric="block_input"`) and the matching the
    processor made, for the cross-attention / feed-forward hooks (`merge_crossattn`, `merge_mlp`).
    Filled by hooks on the block (`tap_block`), emptied when the block returns."""

    def __init__(self):
        self.block_input: torch.Tensor | None = None   # (B, N, C)
        self.match: GridMerge | None = None


def tap_block(block, tap: BlockTap, merge_crossattn: bool, merge_mlp: bool) -> list:
    """Hooks on a BasicTransformerBlock that fill `tap` for the call and wrap its cross-attention
    (`attn2`) and feed-forward (`ff`) in the tap's merge / unmerge; returns their handles."""

    def enter(module, args, kwargs):
        tap.block_input = args[0] if args else kwargs["hidden_states"]
        tap.match = None

    def leave(module, args, kwargs, output):
        tap.block_input = tap.match = None

    def merge_input(module, args):
        match = tap.match
        if match is None:
            return None
        x = args[0]
        if x.shape[:2] != (match.assign.shape[0], match.num_tokens):
            raise ValueError(f"token merging around {type(module).__name__}: got {tuple(x.shape)} for a matching "
                             f"of {match.assign.shape[0]} x {match.num_tokens} tokens (feed-forward chunking "
                             "splits the tokens; turn it off or use merge_mlp=False)")
        return (match.merge(x), *args[1:])

    def unmerge_output(module, args, output):
        return None if tap.match is None else tap.match.unmerge(output)

    handles = [block.register_forward_pre_hook(enter, with_kwargs=True),
               block.register_forward_hook(leave, with_kwargs=True)]
    wrapped = [block.attn2] if merge_crossattn and getattr(block, "attn2", None) is not None else []
    wrapped += [block.ff] if merge_mlp else []
    for module in wrapped:
        handles += [module.register_forward_pre_hook(merge_input), module.register_forward_hook(unmerge_output)]
    return handles


class AgentAttnProcessor(SelfAttentionProcessor):
    """Agent attention + token merging on one UNet self-attention layer."""

    label = "agent attention"

    def __init__(self, original, site, state, options):
        super().__init__(original, site, state)
        self.merge_ratio = options["merge_ratio"]
        self.merge_stride = options["merge_stride"]
        self.agent_stride = options["agent_stride"]
        self.agent_source = options["agent_source"]
        self.agent_ratio = options["agent_ratio"]
        self.merge_metric = options["merge_metric"]
        self.share_match = options["merge_crossattn"] or options["merge_mlp"]
        self.tap = BlockTap()   # filled by the hooks AgentMethod.attach puts on the block
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

    def metric(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens the matching compares, (B, N, C): the block input, or x itself."""
        if self.merge_metric == "attention_input":
            return x
        block_input = self.tap.block_input
        if block_input is None or block_input.shape[:2] != x.shape[:2]:
            raise RuntimeError(f"{self.label} at {self.site_name}: merge_metric='block_input' needs the input of "
                               "the transformer block around this layer, and none was handed over for these "
                               f"{x.shape[1]} tokens (the layer was called outside its block?); use "
                               "merge_metric='attention_input'")
        return block_input

    def attend(self, attn, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) on the image grid -> attention output after `to_out` (B, N, C_out)."""
        grid = self.grid_of(x.shape[1])
        agent_phase = self.state.active.get("agent_steps", True)
        stride = self.agent_stride if agent_phase else self.merge_stride
        needs_match = self.merge_ratio > 0 or (agent_phase and self.agent_source == "merge")
        match = None
        if needs_match:
            match = match_on_grid(self.metric(x), grid, stride, self.merge_ratio, self._generator())
        merging = match is not None and match.num_merged > 0
        if merging and self.share_match:
            self.tap.match = match   # the block's cross-attention / feed-forward hooks merge with it too

        tokens = match.merge(x) if merging else x
        dtype = compute_dtype(attn, x.dtype)
        q = project_q(attn, tokens).to(dtype)
        k, v = (t.to(dtype) for t in project_kv(attn, tokens))

        matched_agents = self.agent_source == "merge" and match is not None
        cells = (grid[0] // self.agent_stride, grid[1] // self.agent_stride)
        num_agents = match.num_agents(self.agent_ratio) if matched_agents else cells[0] * cells[1]
        if agent_phase and 0 < 2 * num_agents < tokens.shape[1]:
            agents = match.agents(x, self.agent_ratio) if matched_agents else pool_on_grid(x, grid, cells)
            agents = project_q(attn, agents).to(dtype)
            out = agent_attention(q, k, v, agents, attn.scale, attn.scale**self.k_scale2, self.k_shortcut)
        else:
            out = sdpa(q, k, v, attn.scale)

        out = project_out(attn, out, x.dtype)
        return match.unmerge(out) if merging else out


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
        Option("agent_ratio", 0.95, "share of the tokens merged into the agents (at most every source: one agent "
               "per cell)", number(0.0, 1.0)),
        Option("merge_metric", "block_input", "what the ToMe matching compares: the block input before norm1 "
               "('block_input', AgentSD) or the attention input ('attention_input')",
               one_of("block_input", "attention_input")),
        Option("merge_ratio", 0.4, "share of tokens merged away before attention (0 disables ToMe)",
               number(0.0, 0.75)),
        Option("merge_stride", 2, "ToMe cell size outside the agent steps", number(2, 8, integer=True)),
        Option("merge_crossattn", False, "merge the tokens for the block's cross-attention too (ToMe)", boolean),
        Option("merge_mlp", False, "merge the tokens for the block's feed-forward too (ToMe)", boolean),
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
        agents = 1 - min(options["agent_ratio"], stride_cells)          # agents per token
        if options["agent_source"] == "merge" and 2 * agents >= 1 - options["merge_ratio"]:
            raise ValueError(f"option `agent_ratio` {options['agent_ratio']} (at most {stride_cells:.3f}, the "
                             f"sources of agent_stride {options['agent_stride']}) leaves {agents:.3f} agents per "
                             f"token, not fewer than half of the {1 - options['merge_ratio']:.3f} left by merge_ratio "
                             f"{options['merge_ratio']}: agent attention would never run; agent_ratio must exceed "
                             f"{(1 + options['merge_ratio']) / 2:.3f}")

    def select_sites(self, sites, options, family):
        return unet_self_attention(sites, options["max_downsample"])

    def make_processor(self, site, original, patch):
        return AgentAttnProcessor(original, site, patch.state, patch.options)

    def attach(self, patch):
        processors = patch.processors()
        finest = min(p.level for p in processors.values())
        for processor in processors.values():
            processor.finest = processor.level == finest
        options = patch.options
        if options["merge_metric"] == "attention_input" and not (options["merge_crossattn"] or options["merge_mlp"]):
            return                                   # the processors need nothing from their blocks
        modules = dict(patch.denoiser.named_modules())
        handles = patch.resources.setdefault("block_hooks", [])
        for name, processor in processors.items():
            block = modules.get(name.rpartition(".")[0])
            if getattr(block, "attn1", None) is not modules[name] or not hasattr(block, "norm1"):
                raise PatchError(f"agent attention at {name}: merge_metric='block_input', merge_crossattn and "
                                 "merge_mlp need the transformer block (with norm1, attn1) around the layer, and "
                                 "there is none; use merge_metric='attention_input' without them")
            handles += tap_block(block, processor.tap, options["merge_crossattn"], options["merge_mlp"])

    def detach(self, patch):
        for handle in patch.resources.pop("block_hooks", []):
            handle.remove()

