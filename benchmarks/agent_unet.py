"""One denoising step of real SD UNet architectures (random weights): stock vs agent vs peers.

    python benchmarks/agent_unet.py                                  # every case below, CPU, fp32
    python benchmarks/agent_unet.py --cases sd15-512 sd15-1024 --repeats 2
    python benchmarks/agent_unet.py --device cuda --dtype float16    # on a GPU
    python benchmarks/agent_unet.py --quick                          # smoke test: a tiny UNet, seconds

Each case builds one UNet (SD 1.5: the default UNet2DConditionModel with cross_attention_dim 768,
860M parameters; SDXL: the SDXL base config, 2.6B) with random weights — speed does not depend on
weights — and times one forward at batch 2 (a classifier-free-guidance step) for:

    stock          diffusers' SDPA attention
    agent-early    agent attention + ToMe (AgentSD's first 40 % of steps; merge on 4x4 cells), on
                   every self-attention layer of >= 4096 tokens (the default placement)
    agent-l0       agent-early on the first level only (AgentSD's fixed max_downsample=1)
    agent-late     ToMe only, ratio 0.4 on 2x2 cells (AgentSD's last 60 % of steps)
    agent-recipe   0.4 * early + 0.6 * late: the default recipe's mean step
    agent-pool     agent-early with average-pooled agents instead of ToMe-matched ones
    agent-nomerge  agent-early without merging the tokens themselves (merge_ratio 0)
    tomesd         tomesd.apply_patch(unet, ratio=0.5) (SDXL: max_downsample=2, else it does nothing)
    todo           K/V downsampled 2x on the grid (ToDo), same layers as agent

Configurations are timed with benchmarks/harness.py: `--warmup` untimed rounds, then `--repeats`
round-robin rounds, so slow drifts of machine load hit all of them alike; the median of the rounds
with [min, max]. Reported: time, speed-up over stock (ratio of medians), peak memory above the
pre-forward level (harness.PeakMemory: CUDA max_memory_allocated; CPU the resident-set high-water
mark), and the relative L2 deviation of the UNet output from stock. Results accumulate in a JSON
file (one entry per case, each measured in one run) from which the markdown table is rewritten.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import sys
from pathlib import Path

import torch

import diffusers_ext as dx
import harness

CASES = {  # name -> (architecture, image side in pixels)
    "sd15-512": ("sd15", 512), "sd15-1024": ("sd15", 1024), "sd15-2048": ("sd15", 2048), "sdxl-1024": ("sdxl", 1024),
}
QUICK_CASES = {"tiny-128": ("tiny", 128)}  # --quick: diffusers_ext.testing's tiny SD UNet, text width 768
EARLY_T, LATE_T = 999.0, 400.0   # a bare UNet places t in [0, 1000): t=400 is at 60 % of the run


def build_unet(arch: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if arch == "tiny":
        from diffusers_ext.testing import tiny_sd_unet

        return tiny_sd_unet(cross_attention_dim=768)
    if arch == "sd15":
        return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    return UNet2DConditionModel(
        sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )


def make_inputs(arch: str, side: int, device, dtype, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    latent = side // 8
    kwargs = dict(sample=torch.randn(batch, 4, latent, latent, generator=g),
                  encoder_hidden_states=torch.randn(batch, 77, 2048 if arch == "sdxl" else 768, generator=g))
    if arch == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=g),
                                       "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * batch, dtype=torch.float32)}
    return {k: (v.to(device, dtype) if torch.is_tensor(v) else {kk: vv.to(device, dtype) for kk, vv in v.items()})
            for k, v in kwargs.items()}


def timestep(name: str) -> float:
    """agent-late is AgentSD's late phase: it runs (and is compared with stock) at the late timestep."""
    return LATE_T if name == "agent-late" else EARLY_T


@contextlib.contextmanager
def configured(unet, name: str):
    """Apply one configuration to the bare UNet for the duration of the block."""
    if name == "stock":
        yield
    elif name == "tomesd":
        import tomesd

        # SDXL has no attention at its first level, tomesd's default (max_downsample=1), where tomesd
        # would change nothing: there it merges on the second level, the finest one with attention
        sdxl = unet.config.addition_embed_type == "text_time"
        tomesd.apply_patch(unet, ratio=0.5, max_downsample=2 if sdxl else 1)
        try:
            yield
        finally:
            tomesd.remove_patch(unet)
    else:
        options = {
            "agent-early": {}, "agent-late": {}, "agent-pool": {"agent_source": "pool"},
            "agent-attninput": {"merge_metric": "attention_input"},   # ToMe match after norm1 (before AgentSD's)
            "agent-nomerge": {"merge_ratio": 0.0}, "agent-l0": {"max_downsample": 1, "min_tokens": 1},
            "todo": None,
        }[name]
        with dx.patched(unet, "todo") if options is None else dx.patched(unet, "agent", **options):
            yield


def forward(unet, inputs, timestep: float, device):
    """One UNet call; the sample goes positionally (tomesd's hook reads it from args)."""
    rest = {k: v for k, v in inputs.items() if k != "sample"}
    return unet(inputs["sample"], torch.tensor(timestep, device=device), **rest, return_dict=False)[0]


def run_case(case: str, configs: list[str], repeats: int, warmup: int, device, dtype) -> dict:
    arch, side = {**CASES, **QUICK_CASES}[case]
    unet = build_unet(arch).to(device, dtype).eval()
    inputs = make_inputs(arch, side, device, dtype)
    calls = {name: (lambda name=name: forward(unet, inputs, timestep(name), device)) for name in configs}
    with torch.no_grad():
        timings = harness.interleaved(calls, repeats, warmup, device=device, memory=True, label=f"{case} ",
                                      context=lambda name: configured(unet, name))
        # the stock reference output at the late timestep, for agent-late's deviation
        late_stock = forward(unet, inputs, LATE_T, device).float().cpu() if "agent-late" in configs else None
    outputs = {name: timings[name].value.float().cpu() for name in configs}
    deviation = {}
    for name in configs:
        reference = late_stock if name == "agent-late" else outputs["stock"]
        deviation[name] = float((outputs[name] - reference).norm() / reference.norm())
    if "agent-early" in timings and "agent-late" in timings:
        parts = [(timings["agent-early"], 0.4), (timings["agent-late"], 0.6)]
        timings["agent-recipe"] = harness.weighted("agent-recipe", parts)
        deviation["agent-recipe"] = 0.4 * deviation["agent-early"] + 0.6 * deviation["agent-late"]
    stock = timings["stock"]
    rows = {name: {"seconds": t.median, "seconds_min": t.min, "seconds_max": t.max, "speedup": t.speedup_over(stock),
                   "peak_mib": t.peak_bytes / 2**20, "rel_l2": deviation[name]}
            for name, t in timings.items()}
    return {"case": case, "arch": arch, "side": side, "batch": 2, "repeats": repeats, "warmup": warmup, "rows": rows}


ORDER = ["stock", "agent-early", "agent-attninput", "agent-late", "agent-recipe", "agent-pool", "agent-nomerge",
         "agent-l0", "tomesd", "todo"]


def write_table(results: dict, path, run_header: list[str]) -> None:
    legacy = any("seconds_min" not in r for e in results.values() for r in e["rows"].values())
    lines = [
        *run_header,
        "Each case is measured in one run; cases may come from separate runs (dates below, the JSON keeps each",
        "case's command). Speed-up = stock time / configuration time (medians of the same run).",
        "agent-recipe = 0.4 x agent-early + 0.6 x agent-late (AgentSD's 40 % / 60 % split of the run), round by round.",
        "rel. L2 = ||out - stock|| / ||stock|| of the UNet output (random weights: a measure of how far",
        "the approximation moves the function, not of image quality). Peak = memory above the",
        "pre-forward level (CPU: resident-set high-water mark).",
        *(["Times without [min, max] come from earlier runs that kept the fastest of the repeats."] if legacy else []),
        "",
    ]
    rows = []
    for case in {**CASES, **QUICK_CASES}:
        if case not in results:
            continue
        entry = results[case]
        for name in ORDER:
            if name in entry["rows"]:
                r = entry["rows"][name]
                seconds = (harness.spread(r["seconds"], r["seconds_min"], r["seconds_max"]) if "seconds_min" in r
                           else f"{r['seconds']:.2f}")
                rows.append([case, name, seconds, f"{r['speedup']:.2f}x", f"{r['peak_mib']:.0f}", f"{r['rel_l2']:.4f}",
                             entry["date"]])
    lines += harness.markdown_table(["case", "configuration", "time (s)", "speed-up", "peak (MiB)",
                                     "rel. L2 vs stock", "measured"], rows)
    harness.write_atomic(path, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=[*CASES, *QUICK_CASES])
    parser.add_argument("--configs", nargs="+", default=[c for c in ORDER if c != "agent-recipe"])
    parser.add_argument("--repeats", type=int, default=2, help="timed round-robin rounds")
    harness.add_warmup_argument(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", default=None, help="the accumulated results (default: the --output stem + .json)")
    harness.add_output_argument(parser, harness.RESULTS / "agent_unet", "--out")
    harness.add_quick_argument(parser, f"case {', '.join(QUICK_CASES)} (a tiny UNet), 1 round after 1 warm-up")
    args = harness.apply_quick(parser, parser.parse_args(argv), cases=list(QUICK_CASES), repeats=1)
    if "stock" not in args.configs:
        parser.error("--configs must include stock (the reference)")

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    json_path = Path(args.json) if args.json else harness.output_path(args, ".json")
    md_path = harness.output_path(args, ".md")
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    run_header = harness.header("Agent attention on SD UNets: one denoising step (batch 2), random weights",
                                __file__, argv=argv, device=device, dtype=dtype,
                                statistic=harness.statistic(args.repeats, args.warmup))
    for case in args.cases:
        print(f"case {case}", flush=True)
        entry = run_case(case, args.configs, args.repeats, args.warmup, device, dtype)
        entry.update(date=datetime.date.today().isoformat(), device=args.device, dtype=args.dtype,
                     command=harness.command(__file__, argv))
        results[case] = entry
        harness.write_json(json_path, results)
        write_table(results, md_path, run_header)
        gc.collect()
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
