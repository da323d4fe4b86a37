"""Accelerators stacked (issue 15): a step cache and an attention method on one run, ratios to stock.

    python benchmarks/combined_speed.py              # SD 1.5 UNet (860M, random weights), 1024^2: DeepCache x agent
    python benchmarks/combined_speed.py sd35         # SD3.5-medium transformer (2.5B), 1024^2: TaylorSeer x T^5, LINA
    python benchmarks/combined_speed.py sd35 --quick # smoke test: a narrow 2-block model, seconds (also sd15)

Two stacks, each a run through real pipeline objects with classifier-free guidance (denoiser batch 2):
- sd15: a StableDiffusionPipeline holding the real SD 1.5 UNet, DDIM, 20 steps. DeepCache
  (`DeepCacheSDHelper`, cache_interval 3, cache_branch_id 0: its SD 1.5 example) alone, agent attention
  alone (`dx.patch(pipe, "agent")`, AgentSD's recipe: agent attention in the first 40 % of steps,
  merging only after), and both (DeepCache enabled, then the patch).
- sd35: a StableDiffusion3Pipeline holding the real SD3.5-medium transformer (13 dual-attention + 11
  joint blocks), flow-matching Euler, 28 steps (the pipeline's default), 333 text tokens. diffusers'
  TaylorSeer cache (`apply_taylorseer_cache`, its defaults: cache_interval 5, disable_cache_before_step
  3, max_order 1, bf16 factors; it predicts every block's attention output between refreshes) alone,
  T^5 and LINA alone (their defaults), and each with TaylorSeer (the cache applied first, then the
  patch). This diffusers' SD3 pipeline sets no cache context, so the run sets one, as a `CacheMixin`
  model's pipeline would.

Every step of a run is one of a few kinds of denoiser call: sd15 a full or a DeepCache-shallow call
(step i runs the whole UNet when i % cache_interval == 0, else only branch 0, its outermost blocks)
in agent's early or late phase; sd35 a full call or a TaylorSeer-predicted one (step i computes when
i < disable_cache_before_step or (i - disable_cache_before_step - 1) % cache_interval == 0, else every
attention module returns its Taylor prediction). At 1024^2 a call takes up to minutes on this CPU, so
a run is not timed whole: each configuration runs a probe and the run's time is the sum over its steps
of the time of that step's kind, round by round. A probe is the first step of each kind in run order
(sd15: the patch's step tracker places each call in the run); TaylorSeer counts the calls it sees, so
its probe is the run's first steps up to the first predicted one, and a kind's time is the mean of
the probe's calls of that kind. Before timing, the step kinds are checked on the tiny pipeline running
the whole run with both accelerators (which steps ran the middle block / computed attention; which had
agent attention on), so the sum adds the steps the real run makes.

Timed with benchmarks/harness.py: the probes of all configurations round-robin, `--warmup` untimed
rounds first; the median of the rounds' run times with [min, max]; speed-up = ratio of medians.
Deviation: relative L2 distance of the denoiser output at the first step of each kind from the stock
output of the same call (same latent, same timestep), averaged: how far the approximation moves the
function at random weights, not image quality.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

import diffusers_ext as dx
import harness
from diffusers_ext.argtypes import positive_int
from diffusers_ext.testing import tiny_pipeline


def first_of_each_kind(kinds: list[tuple]) -> list[int]:
    """The step indices where each kind first occurs, in run order."""
    firsts = {}
    for i, kind in enumerate(kinds):
        firsts.setdefault(kind, i)
    return sorted(firsts.values())


class SD15:
    """DeepCache x agent attention on the SD 1.5 UNet."""

    key, title, cache, cache_title = "sd15", "SD 1.5", "deepcache", "DeepCache"
    configs = ("stock", "deepcache", "agent", "agent+deepcache")
    steps, side, quick_side = 20, 1024, 64
    CACHE_INTERVAL, CACHE_BRANCH = 3, 0
    AGENT_PHASE = "agent_steps"   # the agent option whose schedule splits the run into its two phases
    TINY_AGENT = dict(min_tokens=1)   # the tiny UNet's layers are below agent's default 4096 tokens
    run_line = ("{steps} DDIM steps at {side}^2, guidance (UNet batch 2); DeepCache cache_interval 3, "
                "cache_branch_id 0; agent: its defaults (AgentSD's recipe).")

    @staticmethod
    def pipeline(real: bool):
        """The tiny SD pipeline's scheduler and text side around the real UNet (or its own tiny one)."""
        pipe = tiny_pipeline("sd")
        if real:
            from agent_unet import build_unet

            pipe.register_modules(unet=build_unet("sd15").eval())
        pipe.vae_scale_factor = 8   # SD's VAE; the tiny one is never run (the calls take latents)
        return pipe

    @staticmethod
    def caller(pipe, side: int):
        unet = pipe.unet
        g = torch.Generator().manual_seed(1)
        latent = torch.randn(2, unet.config.in_channels, side // 8, side // 8, generator=g)
        text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
        timesteps = pipe.scheduler.timesteps
        return lambda i: unet(latent, timesteps[i], encoder_hidden_states=text, return_dict=False)[0]

    @classmethod
    @contextlib.contextmanager
    def configured(cls, pipe, name: str, quick: bool):
        """`name`'s accelerators on `pipe` for the duration of the block (DeepCache first, then the patch)."""
        helper = None
        if "deepcache" in name:
            from DeepCache import DeepCacheSDHelper

            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=cls.CACHE_INTERVAL, cache_branch_id=cls.CACHE_BRANCH)
            helper.enable()
        try:
            options = cls.TINY_AGENT if quick else {}
            with dx.patched(pipe, "agent", **options) if "agent" in name else contextlib.nullcontext():
                yield
        finally:
            if helper is not None:
                helper.disable()

    @classmethod
    def step_kinds(cls, name: str, steps: int) -> list[tuple[str, str]]:
        """(cache kind, agent phase) of every step of `name`'s run: "full" / "shallow", "early" / "late";
        "-" where the configuration has no such accelerator."""
        from diffusers_ext.registry import get_method

        option = {o.name: o for o in get_method("agent").options}[cls.AGENT_PHASE]
        start, end = option.default_for("sd")   # the part of the run, as index / steps (steps.Schedule)
        kinds = []
        for i in range(steps):
            cache = ("full" if i % cls.CACHE_INTERVAL == 0 else "shallow") if "deepcache" in name else "-"
            phase = ("early" if start <= i / steps < end else "late") if "agent" in name else "-"
            kinds.append((cache, phase))
        return kinds

    @classmethod
    def probe(cls, name: str, steps: int) -> list[int]:
        return first_of_each_kind(cls.step_kinds(name, steps))

    @classmethod
    def observed_kinds(cls, steps: int) -> list[tuple[str, str]]:
        """What each step of the tiny pipeline's whole run did with both accelerators on: whether the middle
        block ran (DeepCache replaces the skipped block's forward, so its layers do not run) and the phase."""
        pipe = cls.pipeline(real=False)
        with cls.configured(pipe, cls.configs[-1], quick=True):
            state = dx.patch_record(pipe).state
            return observe_run(pipe, pipe.unet, pipe.unet.mid_block.resnets[0], steps, 64, lambda ran: (
                "full" if ran else "shallow", "early" if state.active.get(cls.AGENT_PHASE) else "late"))


class SD35:
    """diffusers' TaylorSeer cache x T^5 / LINA on the SD3.5-medium transformer."""

    key, title, cache, cache_title = "sd35", "SD3.5-medium", "taylorseer", "TaylorSeer"
    configs = ("stock", "taylorseer", "t5", "t5+taylorseer", "lina", "lina+taylorseer")
    steps, side, quick_side = 28, 1024, 128
    TEXT_TOKENS = 333   # 77 CLIP + 256 T5 tokens
    run_line = ("{steps} flow-matching Euler steps at {side}^2, guidance (transformer batch 2), 333 text tokens; "
                "TaylorSeer: diffusers' defaults (cache_interval 5, disable_cache_before_step 3, max_order 1, "
                "bf16 factors, every attention module predicted); T^5 / LINA: their defaults.")

    @staticmethod
    def taylorseer_config():
        from diffusers.hooks import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig()

    @staticmethod
    def pipeline(real: bool):
        """The tiny SD3.5 pipeline's scheduler around the real SD3.5-medium transformer (or a narrow 2-block
        one of the same layout for --quick; the tiny pipeline's own is used by the step-kind check)."""
        from diffusers import SD3Transformer2DModel

        from t5_speed import SD35_MEDIUM, SD35_NARROW

        pipe = tiny_pipeline("sd35")
        torch.manual_seed(0)
        config = SD35_MEDIUM if real else dict(SD35_NARROW, num_layers=2, dual_attention_layers=(0,))
        pipe.register_modules(transformer=SD3Transformer2DModel(**config).eval())
        return pipe

    @classmethod
    def caller(cls, pipe, side: int):
        model = pipe.transformer
        g = torch.Generator().manual_seed(1)
        latent = torch.randn(2, model.config.in_channels, side // 8, side // 8, generator=g)
        text = torch.randn(2, cls.TEXT_TOKENS, model.config.joint_attention_dim, generator=g)
        pooled = torch.randn(2, model.config.pooled_projection_dim, generator=g)
        timesteps = pipe.scheduler.timesteps
        return lambda i: model(hidden_states=latent, timestep=timesteps[i].expand(2), encoder_hidden_states=text,
                               pooled_projections=pooled, return_dict=False)[0]

    @classmethod
    @contextlib.contextmanager
    def configured(cls, pipe, name: str, quick: bool):
        """`name`'s accelerators on `pipe` for the block: fresh TaylorSeer hooks (a run's state) in their
        cache context, then the patch."""
        from diffusers.hooks import HookRegistry, apply_taylorseer_cache
        from diffusers.hooks.hooks import CacheContext, _set_cache_context
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        model = pipe.transformer
        cached = "taylorseer" in name
        if cached:
            apply_taylorseer_cache(model, cls.taylorseer_config())
            _set_cache_context(model, CacheContext("run"))
        method = name.split("+")[0]
        try:
            with dx.patched(pipe, method) if method in ("t5", "lina") else contextlib.nullcontext():
                yield
        finally:
            if cached:
                _set_cache_context(model, None)
                HookRegistry.check_if_exists_or_initialize(model).remove_hook(_TAYLORSEER_CACHE_HOOK, recurse=True)

    @classmethod
    def step_kinds(cls, name: str, steps: int) -> list[tuple[str]]:
        """("full",) or ("predicted",) for every step of `name`'s run (TaylorSeer's refresh rule)."""
        config = cls.taylorseer_config()
        before, interval = config.disable_cache_before_step, config.cache_interval
        if "taylorseer" not in name:
            return [("full",)] * steps
        return [("full",) if i < before or (i - before - 1) % interval == 0 else ("predicted",) for i in range(steps)]

    @classmethod
    def probe(cls, name: str, steps: int) -> list[int]:
        """TaylorSeer's state advances with every call: the run's first steps, to its first of each kind."""
        return list(range(max(first_of_each_kind(cls.step_kinds(name, steps))) + 1))

    @classmethod
    def observed_kinds(cls, steps: int) -> list[tuple[str]]:
        """What each step of the tiny pipeline's whole run did with TaylorSeer and T^5 on: whether the
        first block's attention computed (its query projection ran) or was predicted."""
        pipe = tiny_pipeline("sd35")
        with cls.configured(pipe, "t5+taylorseer", quick=True):
            model = pipe.transformer
            return observe_run(pipe, model, model.transformer_blocks[0].attn.to_q, steps, 32,
                               lambda ran: ("full" if ran else "predicted",))


def observe_run(pipe, denoiser, marker, steps: int, side: int, kind_of) -> list[tuple]:
    """Run `pipe` for `steps` (guided, latents out) and return kind_of(whether `marker` ran) for each
    denoiser call, in call order."""
    seen, ran = [], []
    handle = marker.register_forward_hook(lambda *_: ran.append(True))
    post = denoiser.register_forward_hook(lambda *_: seen.append(kind_of(bool(ran))) or ran.clear())
    try:
        with torch.no_grad():
            pipe(prompt="a", num_inference_steps=steps, guidance_scale=2.0, height=side, width=side,
                 output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
        post.remove()
    return seen


STACKS = {stack.key: stack for stack in (SD15, SD35)}


def check_step_kinds(stack, steps: int) -> None:
    """Run the tiny pipeline with both accelerators and compare what each step did with `stack.step_kinds`."""
    seen = stack.observed_kinds(steps)
    expected = stack.step_kinds(stack.configs[-1], steps)
    if seen != expected:
        raise RuntimeError(f"the run's steps were {seen}, the timing model assumes {expected}")


def run_seconds(kinds: list[tuple], probe: list[int], seconds: list[float]) -> float:
    """One round's run time: the sum over the run's steps of the mean probe time of that step's kind."""
    by_kind: dict[tuple, list[float]] = {}
    for i, s in zip(probe, seconds):
        by_kind.setdefault(kinds[i], []).append(s)
    return sum(statistics.mean(by_kind[k]) for k in kinds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", choices=tuple(STACKS), default="sd15", help="which stack (default sd15)")
    parser.add_argument("--side", type=positive_int, default=None, help="image side in pixels (latent side / 8; "
                        "default 1024)")
    parser.add_argument("--steps", type=positive_int, default=None, help="steps of the run (default: sd15 20, sd35 28)")
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed round-robin rounds")
    harness.add_warmup_argument(parser)
    harness.add_output_argument(parser, harness.RESULTS / "combined_speed")   # sd35: combined_speed_sd35
    harness.add_quick_argument(parser, "the tiny SD UNet at 64^2 (agent on every layer) or a narrow 2-block SD3.5 "
                                       "transformer at 128^2, 1 round, no warm-up")
    args = harness.apply_quick(parser, parser.parse_args(argv), repeats=1, warmup=0)
    stack = STACKS[args.model]
    side = args.side or (stack.quick_side if args.quick else stack.side)
    steps = args.steps or stack.steps
    if side % 8:
        parser.error(f"--side must be a multiple of 8, got {side}")
    stem = harness.RESULTS / ("combined_speed" if args.model == "sd15" else f"combined_speed_{args.model}")

    check_step_kinds(stack, steps)
    pipe = stack.pipeline(real=not args.quick)
    pipe.scheduler.set_timesteps(steps)
    call = stack.caller(pipe, side)
    configs = stack.configs
    probes = {name: stack.probe(name, steps) for name in configs}
    per_call: dict[str, list[list[float]]] = {name: [] for name in configs}   # round -> seconds of each probe step
    outputs: dict[str, dict[int, torch.Tensor]] = {name: {} for name in configs}

    def run_probe(name: str):
        seconds = []
        for i in probes[name]:
            start = time.perf_counter()
            outputs[name][i] = call(i)
            seconds.append(time.perf_counter() - start)
        per_call[name].append(seconds)

    compared = {name: first_of_each_kind(stack.step_kinds(name, steps)) for name in configs}
    with torch.no_grad():
        harness.interleaved({name: (lambda name=name: run_probe(name)) for name in configs}, args.repeats,
                            args.warmup, label=f"{side}^2 ",
                            context=lambda name: stack.configured(pipe, name, args.quick))
        for name in configs[1:]:   # stock outputs at every step another configuration is compared at (untimed)
            for i in compared[name]:
                if i not in outputs["stock"]:
                    outputs["stock"][i] = call(i)

    runs = {name: harness.Timing(name, [run_seconds(stack.step_kinds(name, steps), probes[name], r)
                                        for r in per_call[name][-args.repeats:]])
            for name in configs}
    deviation = {name: statistics.mean(float((outputs[name][i] - outputs["stock"][i]).norm()
                                             / outputs["stock"][i].norm()) for i in compared[name])
                 for name in configs}

    cache, cache_title = stack.cache, stack.cache_title
    extra = [f"The run: {stack.run_line.format(steps=steps, side=side)}",
             "Run time = the sum over the run's steps of the probe time of that step's kind (module doc), "
             "round by round; the step kinds were checked on the tiny pipeline's whole run.",
             f"Speed-up = stock / configuration (ratios of medians); vs {cache_title} = {cache} / configuration.",
             "rel. L2 = mean over the first step of each kind of ||out - stock|| / ||stock|| at the same latent "
             "and timestep."]
    lines = harness.header(f"Stacked accelerators on {stack.title} at {side}^2: a {steps}-step run",
                           __file__, argv=argv if argv is not None else sys.argv[1:], device="cpu",
                           dtype=torch.float32, statistic=harness.statistic(args.repeats, args.warmup), extra=extra)
    rows = []
    for name in configs:
        kinds = stack.step_kinds(name, steps)
        counts = ", ".join(f"{kinds.count(k)} {'/'.join(p for p in k if p != '-') or 'full'}"
                           for k in dict.fromkeys(kinds))
        rows.append([name, runs[name].cell(), f"{runs[name].speedup_over(runs['stock']):.2f}x",
                     f"{runs[name].speedup_over(runs[cache]):.2f}x", counts, f"{deviation[name]:.4f}"])
    lines += harness.markdown_table(["configuration", "run (s)", "speed-up", f"vs {cache_title}", "steps by kind",
                                     "rel. L2 vs stock"], rows)
    md = harness.output_path(args, ".md", stem)
    harness.write_atomic(md, "\n".join(lines) + "\n")
    harness.write_json(harness.output_path(args, ".json", stem), dict(
        command=harness.command(__file__, argv), model=args.model, side=side, steps=steps, repeats=args.repeats,
        warmup=args.warmup, per_call=per_call, probes=probes, runs={n: runs[n].seconds for n in configs},
        deviation=deviation))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
