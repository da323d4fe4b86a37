"""Accelerators stacked (issue 15): a 20-step SD 1.5 run with DeepCache, agent attention, and both.

    python benchmarks/combined_speed.py                 # SD 1.5 UNet (860M, random weights), 1024^2
    python benchmarks/combined_speed.py --quick         # smoke test: the tiny UNet, seconds

The run: a StableDiffusionPipeline holding the real SD 1.5 UNet (random weights: speed does not
depend on them), DDIM, `--steps` 20, classifier-free guidance (UNet batch 2). Configurations:

    stock              diffusers' SDPA attention
    deepcache          DeepCacheSDHelper, cache_interval 3, cache_branch_id 0 (its SD 1.5 example)
    agent              dx.patch(pipe, "agent"), AgentSD's recipe (agent attention in the first 40 % of steps)
    agent+deepcache    both: DeepCache enabled, then the patch

Every step of a run is one of at most four kinds of UNet call: a full call or a DeepCache-shallow
one (DeepCache's uniform rule: step i runs the whole UNet when (i - first step) % cache_interval == 0,
else only branch 0, its outermost blocks, reusing the rest), in agent's early phase (agent attention
and token merging) or its late phase (merging only). At 1024^2 a call takes up to a minute on this
CPU, so a run is not timed whole: each configuration runs a probe, the first step of each of its
kinds in run order, through the real pipeline objects (the DeepCache-wrapped UNet at the
scheduler's timesteps, the patch's step tracker placing each call in the run), and the run's time
is the sum over its 20 steps of the time of that step's kind, round by round. Before timing, the
step kinds are checked on the tiny pipeline running the whole run with both accelerators (which
steps ran the UNet's middle block; which had agent attention on), so the sum adds the steps the
real run makes.

Timed with benchmarks/harness.py: the probes of all configurations round-robin, `--warmup` untimed
rounds first; the median of the rounds' run times with [min, max]; speed-up = ratio of medians.
Deviation: relative L2 distance of each probe call's UNet output from the stock output of the same
call (same latent, same timestep), the mean over the probe: how far the approximation moves the
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
from agent_unet import build_unet
from diffusers_ext.argtypes import positive_int
from diffusers_ext.testing import tiny_pipeline

CONFIGS = ("stock", "deepcache", "agent", "agent+deepcache")
CACHE_INTERVAL, CACHE_BRANCH = 3, 0
AGENT_PHASE = "agent_steps"   # the agent option whose schedule splits the run into its two phases
TINY_AGENT = dict(min_tokens=1)   # the tiny UNet's layers are below agent's default 4096 tokens


def pipeline_around(unet=None):
    """The tiny SD pipeline's scheduler and text side around `unet` (default: its own tiny UNet); only
    the denoiser is timed."""
    pipe = tiny_pipeline("sd")
    if unet is not None:
        pipe.register_modules(unet=unet)
    pipe.vae_scale_factor = 8   # SD's VAE; the tiny one is never run (the calls take latents)
    return pipe


@contextlib.contextmanager
def configured(pipe, name: str, agent_options: dict):
    """`name`'s accelerators on `pipe` for the duration of the block (DeepCache first, then the patch)."""
    helper = None
    if "deepcache" in name:
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=CACHE_INTERVAL, cache_branch_id=CACHE_BRANCH)
        helper.enable()
    try:
        with dx.patched(pipe, "agent", **agent_options) if "agent" in name else contextlib.nullcontext():
            yield
    finally:
        if helper is not None:
            helper.disable()


def step_kinds(name: str, steps: int) -> list[tuple[str, str]]:
    """(cache kind, agent phase) of every step of `name`'s run: "full" / "shallow", "early" / "late";
    "-" where the configuration has no such accelerator."""
    from diffusers_ext.registry import get_method

    option = {o.name: o for o in get_method("agent").options}[AGENT_PHASE]
    start, end = option.default_for("sd")   # the part of the run, as index / steps (steps.Schedule)
    kinds = []
    for i in range(steps):
        cache = ("full" if i % CACHE_INTERVAL == 0 else "shallow") if "deepcache" in name else "-"
        phase = ("early" if start <= i / steps < end else "late") if "agent" in name else "-"
        kinds.append((cache, phase))
    return kinds


def check_step_kinds(steps: int) -> None:
    """Run the tiny pipeline with both accelerators and compare what each step did with `step_kinds`."""
    pipe = pipeline_around()
    seen = []
    with configured(pipe, "agent+deepcache", TINY_AGENT):
        record = dx.patch_record(pipe)
        ran_mid = []   # DeepCache replaces the skipped middle block's forward: its layers do not run
        handle = pipe.unet.mid_block.resnets[0].register_forward_hook(lambda *_: ran_mid.append(True))
        post = pipe.unet.register_forward_hook(lambda *_: seen.append(
            ("full" if ran_mid else "shallow", "early" if record.state.active.get(AGENT_PHASE) else "late"))
            or ran_mid.clear())
        try:
            with torch.no_grad():
                pipe(prompt="a", num_inference_steps=steps, guidance_scale=2.0, height=64, width=64,
                     output_type="latent", generator=torch.Generator().manual_seed(0))
        finally:
            handle.remove()
            post.remove()
    expected = step_kinds("agent+deepcache", steps)
    if seen != expected:
        raise RuntimeError(f"the run's steps were {seen}, the timing model assumes {expected}")


def probe(name: str, steps: int) -> list[int]:
    """The first step of each kind of `name`'s run, in run order."""
    firsts = {}
    for i, kind in enumerate(step_kinds(name, steps)):
        firsts.setdefault(kind, i)
    return sorted(firsts.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=positive_int, default=1024, help="image side in pixels (latent side / 8)")
    parser.add_argument("--steps", type=positive_int, default=20, help="steps of the run")
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed round-robin rounds")
    harness.add_warmup_argument(parser)
    harness.add_output_argument(parser, harness.RESULTS / "combined_speed")
    harness.add_quick_argument(parser, "the tiny SD UNet at 64^2 (agent on every layer), 1 round, no warm-up")
    args = harness.apply_quick(parser, parser.parse_args(argv), repeats=1, warmup=0, side=64)
    if args.side % 8:
        parser.error(f"--side must be a multiple of 8, got {args.side}")

    check_step_kinds(args.steps)
    pipe = pipeline_around(None if args.quick else build_unet("sd15").eval())
    unet = pipe.unet
    pipe.scheduler.set_timesteps(args.steps)
    timesteps = pipe.scheduler.timesteps
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(2, unet.config.in_channels, args.side // 8, args.side // 8, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)

    def call(i: int) -> torch.Tensor:
        return pipe.unet(latent, timesteps[i], encoder_hidden_states=text, return_dict=False)[0]

    per_call: dict[str, list[list[float]]] = {name: [] for name in CONFIGS}   # round -> seconds of each probe step
    outputs: dict[str, dict[int, torch.Tensor]] = {name: {} for name in CONFIGS}

    def run_probe(name: str):
        seconds = []
        for i in probe(name, args.steps):
            start = time.perf_counter()
            outputs[name][i] = call(i)
            seconds.append(time.perf_counter() - start)
        per_call[name].append(seconds)

    agent_options = TINY_AGENT if args.quick else {}
    with torch.no_grad():
        harness.interleaved({name: (lambda name=name: run_probe(name)) for name in CONFIGS}, args.repeats,
                            args.warmup, label=f"{args.side}^2 ", context=lambda name: configured(pipe, name, agent_options))
        for name in CONFIGS[1:]:   # stock outputs at every step another probe visited (untimed)
            for i in probe(name, args.steps):
                if i not in outputs["stock"]:
                    outputs["stock"][i] = call(i)

    runs = {}
    for name in CONFIGS:
        steps_of = probe(name, args.steps)
        kinds = step_kinds(name, args.steps)
        first_of_kind = {kinds[i]: position for position, i in enumerate(steps_of)}
        timed_rounds = per_call[name][-args.repeats:]
        runs[name] = harness.Timing(name, [sum(r[first_of_kind[k]] for k in kinds) for r in timed_rounds])
    deviation = {name: statistics.mean(float((outputs[name][i] - outputs["stock"][i]).norm()
                                             / outputs["stock"][i].norm()) for i in probe(name, args.steps))
                 for name in CONFIGS}

    extra = [f"The run: {args.steps} DDIM steps at {args.side}^2, guidance (UNet batch 2); DeepCache cache_interval "
             f"{CACHE_INTERVAL}, cache_branch_id {CACHE_BRANCH}; agent: its defaults (AgentSD's recipe).",
             "Run time = the sum over the run's steps of the probe time of that step's kind (module doc), "
             "round by round; the step kinds were checked on the tiny pipeline's whole run.",
             "Speed-up = stock / configuration (ratios of medians); vs DeepCache = deepcache / configuration.",
             "rel. L2 = mean over the probe calls of ||out - stock|| / ||stock|| at the same latent and timestep."]
    lines = harness.header(f"Stacked accelerators on SD 1.5 at {args.side}^2: a {args.steps}-step run",
                           __file__, argv=argv if argv is not None else sys.argv[1:], device="cpu",
                           dtype=torch.float32, statistic=harness.statistic(args.repeats, args.warmup), extra=extra)
    rows = []
    for name in CONFIGS:
        kinds = step_kinds(name, args.steps)
        counts = ", ".join(f"{kinds.count(k)} {'/'.join(p for p in k if p != '-') or 'full'}"
                           for k in dict.fromkeys(kinds))
        rows.append([name, runs[name].cell(), f"{runs[name].speedup_over(runs['stock']):.2f}x",
                     f"{runs[name].speedup_over(runs['deepcache']):.2f}x", counts, f"{deviation[name]:.4f}"])
    lines += harness.markdown_table(["configuration", "run (s)", "speed-up", "vs DeepCache", "steps by kind",
                                     "rel. L2 vs stock"], rows)
    md = harness.output_path(args, ".md")
    harness.write_atomic(md, "\n".join(lines) + "\n")
    harness.write_json(harness.output_path(args, ".json"), dict(
        command=harness.command(__file__, argv), side=args.side, steps=args.steps, repeats=args.repeats,
        warmup=args.warmup, per_call=per_call, probes={n: probe(n, args.steps) for n in CONFIGS},
        runs={n: runs[n].seconds for n in CONFIGS}, deviation=deviation))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
