"""Attention mediators for DiT / SiT, with a step-wise dynamic mediator count
(Pu et al., "Efficient Diffusion Transformer with Step-wise Dynamic Attention Mediators", ECCV 2024).

n mediator tokens T (n a perfect square) are the queries average-pooled on the token grid:

    T = AdaptiveAvgPool(Q on the H x W grid -> sqrt(n) x sqrt(n))          (B, h, n, d)
    O = softmax(s Q T^T + B2) softmax(s T K^T + B1) V + DWC3x3(V)            then to_out

q / k / v / to_out are the pretrained ones. New parameters per layer (trainable, zero-initialised so
an untrained patch is exactly pooled-query agent attention with scale s in both stages):
- B1 (mediators -> tokens) and B2 (tokens -> mediators): a 7 x 7 table bilinearly interpolated to
  the token grid plus row and column terms (as in the released code), each held per head for a
  reference `bias_grid` x `bias_grid` mediator grid and bilinearly interpolated to the mediator grid
  in use, so one set of biases serves every count and every resolution (the released code keeps a
  separate set per count, tied to one latent size). Row / column terms are stored at `bias_rows`
  entries and interpolated to the grid height / width.
- DWC: a depthwise 3 x 3 conv of V on the grid (`ops.GridDepthwiseConv`).
Zero biases and a zero DWC are skipped at inference (a no-op to compute), never while training.

The mediator count per step (`mediators` = one count, or several used in order, fewer first):
- `switch_at=(0.4, 0.7)`: fractions of the run where the next count starts (default: even split);
- or the paper's adaptive switch, `switch_ratios=(r1, r2, ...)`: per sample, the change of the
  latent between consecutive steps, ||x_i - x_{i-1}|| (`switch_norm` "l2" or "l1"), is averaged over
  the first `switch_window` (K = 3) changes; afterwards a sample moves to count j + 1 once its change
  falls below r_j times that mean (monotone). The state is per sample, so it works with any batch
  size; the conditional and unconditional halves of a CFG batch carry the same latent, so they
  change alike and always use the same count. Samples with different counts run as separate groups.
  The latent is read by a forward pre-hook on the denoiser (removed when the patch is dropped);
  Heun's corrector call, at the time of the next step, counts as that step.
Counts are evaluated once per step; a count whose side exceeds the token grid is an error.
"""

from __future__ import annotations

import bisect
import math
import weakref

import torch
from torch import nn

from diffusers_ext.ops import GridDepthwiseConv, interpolated_bias, mediator_attention, pool_heads_on_grid, upcast_dtype
from diffusers_ext.processor import SelfAttentionProcessor, compute_dtype, frozen, merge_heads, project_kv, \
    project_out, project_q, split_heads
from diffusers_ext.registry import STEPS, Method, Option, boolean, number, one_of, register_method

DEFAULT_MEDIATORS = 64


# --- options ----------------------------------------------------------------------------------------

def _square_counts(value):
    """a perfect square (1, 4, 9, 16, ...) or a sequence of them"""
    counts = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(counts, (tuple, list)) or not counts:
        raise TypeError(f"expected a perfect square or a sequence of them, got {value!r}")
    out = []
    for n in counts:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or math.isqrt(n) ** 2 != n:
            raise ValueError(f"mediator counts must be perfect squares (1, 4, 9, 16, ...), got {n!r}")
        out.append(n)
    return tuple(out)


def _fractions(value):
    """`None`, or fractions in (0, 1): one number or a sequence"""
    if value is None:
        return None
    values = (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else tuple(value)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1 for v in values):
        raise ValueError(f"expected numbers in (0, 1), got {value!r}")
    return tuple(float(v) for v in values)


# --- the per-step count -----------------------------------------------------------------------------

class MediatorCounts:
    """Which mediator count each sample uses at the current step; shared by a patch's processors."""

    def __init__(self, state, counts, switch_at, switch_ratios, window, norm):
        self.state, self.counts = state, counts
        self.switch_at, self.switch_ratios = switch_at, switch_ratios
        self.window, self.norm = window, norm
        self._pending: torch.Tensor | None = None
        self._handle = None
        self.reset()

    # the adaptive switch ---------------------------------------------------------------------------
    def reset(self):
        self.levels: torch.Tensor | None = None         # (B,) index into counts, per sample
        self._time = self._latent = self._progress = None
        self._changes = 0
        self._baseline: torch.Tensor | None = None       # (B,) mean change over the first K steps

    def observe(self, latent: torch.Tensor) -> None:
        """The denoiser's input of the coming call (called by the pre-hook)."""
        self._pending = latent.detach().to(upcast_dtype(latent.dtype)).clone()

    def attach(self, denoiser: nn.Module) -> None:
        ref = weakref.ref(self)

        def pre_hook(module, args, kwargs):
            counts = ref()
            if counts is None:
                return None
            sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
            if isinstance(sample, torch.Tensor):
                counts.observe(sample)
            return None

        self._handle = denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True)
        weakref.finalize(self, self._handle.remove)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _update(self, latent: torch.Tensor) -> None:
        state = self.state
        batch = latent.shape[0]
        restart = (
            self.levels is None or self.levels.shape[0] != batch or self._progress is None
            or state.progress < self._progress or state.step_index == 0 and self._time != state.timestep
        )
        self._progress = state.progress
        if restart:
            self.reset()
            self.levels = torch.zeros(batch, dtype=torch.long)
            self._time, self._latent, self._progress = state.timestep, latent, state.progress
            return
        if state.timestep == self._time:           # another call at the same time (Heun's corrector)
            self._latent = latent
            return
        ord_ = 2 if self.norm == "l2" else 1
        change = torch.linalg.vector_norm((latent - self._latent).flatten(1), ord=ord_, dim=1).cpu()
        self._time, self._latent = state.timestep, latent
        self._changes += 1
        if self._changes <= self.window:
            self._baseline = change / self.window + (0 if self._baseline is None else self._baseline)
            return
        for j, ratio in enumerate(self.switch_ratios):
            self.levels = torch.where(change < ratio * self._baseline, torch.clamp(self.levels, min=j + 1),
                                      self.levels)

    # what processors ask --------------------------------------------------------------------------
    def groups(self, batch: int) -> list[tuple[int, torch.Tensor | None]]:
        """[(count, sample indices or None for all)] for a batch of `batch` at the current step."""
        if self.switch_ratios is None:
            return [(self.counts[bisect.bisect_right(self.switch_at, self.state.progress)], None)]
        if self._pending is not None:
            self._update(self._pending)
            self._pending = None
        levels = self.levels
        if levels is None or levels.shape[0] != batch:
            levels = torch.zeros(batch, dtype=torch.long)
        present = torch.unique(levels).tolist()
        if len(present) == 1:
            return [(self.counts[present[0]], None)]
        return [(self.counts[j], torch.nonzero(levels == j).flatten()) for j in present]


# --- the processor -----------------------------------------------------------------------------------

class MediatorAttnProcessor(SelfAttentionProcessor):
    """Mediator attention on one DiT / SiT self-attention layer (see the module docstring)."""

    label = "mediator attention"

    def __init__(self, original, site, state, options, counts: MediatorCounts):
        super().__init__(original, site, state)
        attn = site.module
        heads, dim = attn.heads, attn.inner_dim
        grid, rows, table = options["bias_grid"], options["bias_rows"], options["bias_table"]
        object.__setattr__(self, "counts", counts)
        self.use_biases = options["biases"]
        if self.use_biases:
            zeros = lambda *shape: nn.Parameter(torch.zeros(heads, grid, grid, *shape))  # noqa: E731
            self.to_tokens_table, self.to_tokens_rows, self.to_tokens_cols = zeros(table, table), zeros(rows), zeros(rows)
            self.to_mediators_table, self.to_mediators_rows, self.to_mediators_cols = (
                zeros(table, table), zeros(rows), zeros(rows))
        with torch.random.fork_rng(devices=[]):     # nn.Conv2d's default init draws from the global RNG
            self.dwc = GridDepthwiseConv(dim, 3) if options["dwc"] else None
        self._zero_cache: dict[str, tuple] = {}
        self._frozen: dict = {}   # `frozen` bias tables

    def _is_zero(self, key: str, params) -> bool:
        """Are these parameters all zero (and not training)? Cached on the tensors' versions."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return False
        version = tuple((p.data_ptr(), p._version) for p in params)
        cached = self._zero_cache.get(key)
        if cached is None or cached[0] != version:
            cached = (version, all(not p.any() for p in params))
            self._zero_cache[key] = cached
        return cached[1]

    def biases(self, mediator_grid, token_grid, dtype):
        """(B1 (1, h, n, N), B2 (1, h, N, n)), or (None, None) where they are zero."""
        if not self.use_biases:
            return None, None
        to_tokens = (self.to_tokens_table, self.to_tokens_rows, self.to_tokens_cols)
        to_mediators = (self.to_mediators_table, self.to_mediators_rows, self.to_mediators_cols)
        if self._is_zero("biases", to_tokens + to_mediators):
            return None, None

        def compute():   # parameters only: computed once per grid and dtype for inference (`frozen`)
            b1 = interpolated_bias(*to_tokens, mediator_grid, token_grid)
            b2 = interpolated_bias(*to_mediators, mediator_grid, token_grid).transpose(-1, -2)
            return b1[None].to(dtype), b2[None].to(dtype)

        return frozen(self._frozen, (tuple(mediator_grid), tuple(token_grid), dtype), to_tokens + to_mediators,
                      compute)

    def attend(self, attn, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) on the token grid -> attention output after to_out (B, N, C_out)."""
        batch, num_tokens, _ = x.shape
        grid = self.grid_of(num_tokens)
        dtype = compute_dtype(attn, x.dtype)
        q = project_q(attn, x).to(dtype)
        k, v = (t.to(dtype) for t in project_kv(attn, x))
        groups = self.counts.groups(batch)
        out = torch.empty_like(q) if len(groups) > 1 else None
        for count, index in groups:
            side = math.isqrt(count)
            if side > min(grid):
                raise ValueError(f"{count} mediators ({side} x {side}) do not fit the {grid[0]} x {grid[1]} token "
                                 f"grid at {self.site_name}; use at most {min(grid) ** 2}")
            qg, kg, vg = (q, k, v) if index is None else (q[index], k[index], v[index])
            mediators = pool_heads_on_grid(qg, grid, (side, side))
            b1, b2 = self.biases((side, side), grid, dtype)
            o = mediator_attention(qg, kg, vg, mediators, attn.scale, b1, b2)
            if index is None:
                out = o
            else:
                out[index] = o
        if self.dwc is not None and not self._is_zero("dwc", list(self.dwc.parameters())):
            # added into the conv's new (token-major) output: merging the heads after is free
            out = split_heads(self.dwc(merge_heads(v), grid), attn.heads).add_(out)
        return project_out(attn, out, x.dtype)

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}, counts={self.counts.counts}"


@register_method
class MediatorMethod(Method):
    name = "mediator"
    families = ("dit",)
    training_free = False
    inherits_projections = True     # the papers train the whole network with the new parts
    description = ("Attention mediators with a step-wise dynamic count (DiT / SiT); training-free as "
                   "pooled-query agent attention, fine-tune the biases and DWC for quality")
    options = (
        STEPS,
        Option("mediators", DEFAULT_MEDIATORS,
               "mediator count (a perfect square), or several used in order through the run, fewer first, e.g. (16, 64)",
               _square_counts),
        Option("switch_at", None, "fractions of the run where the next count starts (default: even split)",
               _fractions),
        Option("switch_ratios", None, "adaptive switch: per-sample change ratios (r1 > r2 > ...) that move a "
               "sample to the next count (the paper's rule); replaces switch_at", _fractions),
        Option("switch_window", 3, "adaptive switch: the first K step changes form the reference mean",
               number(1, 100, integer=True)),
        Option("switch_norm", "l2", "adaptive switch: norm of the latent change", one_of("l2", "l1")),
        Option("biases", True, "learned position biases B1, B2 (zero-initialised)", boolean),
        Option("dwc", True, "depthwise 3x3 conv on V (zero-initialised)", boolean),
        Option("bias_grid", 8, "reference mediator grid side of the bias parameters", number(1, 64, integer=True)),
        Option("bias_table", 7, "side of the interpolated bias table", number(1, 64, integer=True)),
        Option("bias_rows", 16, "entries of the row / column bias terms", number(1, 1024, integer=True)),
    )

    def check_options(self, options, family):
        counts = options["mediators"]
        steps = len(counts) - 1
        if any(a > b for a, b in zip(counts, counts[1:])):
            raise ValueError(f"option `mediators`: counts are used in order through the run, fewer first "
                             f"(the paper's schedule), got {counts}; e.g. {tuple(sorted(counts))}")
        if options["switch_ratios"] is not None:
            if options["switch_at"] is not None:
                raise ValueError("give either `switch_at` (a fixed schedule) or `switch_ratios` (adaptive), not both")
            ratios = options["switch_ratios"]
            if len(ratios) != steps or any(a <= b for a, b in zip(ratios, ratios[1:])):
                raise ValueError(f"option `switch_ratios`: {len(counts)} counts need {steps} decreasing ratios, "
                                 f"got {ratios}")
        elif options["switch_at"] is None:
            options["switch_at"] = tuple((i + 1) / len(counts) for i in range(steps))
        elif len(options["switch_at"]) != steps or list(options["switch_at"]) != sorted(set(options["switch_at"])):
            raise ValueError(f"option `switch_at`: {len(counts)} counts need {steps} increasing fractions, "
                             f"got {options['switch_at']}")

    def select_sites(self, sites, options, family):
        return [s for s in sites if s.role == "self"]

    def step_dependent(self, options):
        return super().step_dependent(options) or len(options["mediators"]) > 1

    def prepare(self, patch):
        """One count switch per patch, shared by all its processors."""
        options = patch.options
        patch.resources["counts"] = MediatorCounts(patch.state, options["mediators"], options["switch_at"],
                                                   options["switch_ratios"], options["switch_window"],
                                                   options["switch_norm"])

    def make_processor(self, site, original, patch):
        return MediatorAttnProcessor(original, site, patch.state, patch.options, patch.resources["counts"])

    def attach(self, patch):
        counts = patch.resources["counts"]
        if counts.switch_ratios is not None:  # the adaptive switch reads the latent
            counts.attach(patch.denoiser)

    def detach(self, patch):
        patch.resources["counts"].detach()
