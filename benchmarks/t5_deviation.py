"""T^5 starting point and design choices, measured on tiny random-weight models (offline):
relative deviation sum||patched - stock||^2 / sum||stock||^2 of the denoiser output, before and
after a short distillation (`diffusers_ext.distill`, same steps and lr for every row).

    python benchmarks/t5_deviation.py [--steps 60]
    python benchmarks/t5_deviation.py --quick       # smoke test: 2 rows, 2 steps
"""

from __future__ import annotations

import argparse
import time

import torch

import harness
PROMPTS = ["a cat", "a dog on a hill", "a red car at night", "a bowl of fruit", "a mountain lake"]
ROWS = [
    ("sd35", {}), ("sd35", {"text_tokens": "ttt"}), ("sd35", {"dual_attention": False}),
    ("sd35", {"inner_init_std": 0.002}), ("sd35", {"inner_init_std": 0.1}), ("sd35", {"conv_init": "default"}),
    ("dit", {}), ("dit", {"inner_init_std": 0.002}), ("dit", {"inner_init_std": 0.1}), ("dit", {"conv_init": "default"}),
]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-2)
    harness.add_output_argument(parser, harness.RESULTS / "t5_deviation.md")
    harness.add_quick_argument(parser, "the first row of each model, 2 steps")
    args = harness.apply_quick(parser, parser.parse_args(argv), steps=2)
    rows = [next(r for r in ROWS if r[0] == f) for f in ("sd35", "dit")] if args.quick else ROWS
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState

    from diffusers_ext.distill import DistillConfig, Distiller
    from diffusers_ext.testing import tiny_pipeline

    lines = harness.header(
        "T^5 deviation from the original model, before / after distillation (tiny models)", __file__, argv=argv,
        device="cpu", dtype=torch.float32, extra=[
            "Tiny random-weight models from `diffusers_ext.testing` (SD3.5 flavour: 2 blocks, block 0 dual-attention, "
            f"latent 8x8; DiT: 2 blocks, 8x8 tokens); {args.steps} steps, lr {args.lr}, batch 2, noise latents; "
            "deviation on 2 fixed held-out batches. Defaults: text_tokens=softmax, dual_attention=True, "
            "inner_init_std=0.02, conv_init=zero. seconds: wall time of the row's distillation (one run)."])
    lines += ["| model | options | deviation before | after | reduction | seconds |", "|---|---|---|---|---|---|"]
    for family, options in rows:
        AcceleratorState._reset_state(True)
        pipe = tiny_pipeline(family)
        extra = {"prompts": PROMPTS} if family != "dit" else {}
        config = DistillConfig(output_dir="/tmp/t5_deviation", max_steps=args.steps, lr=args.lr, batch_size=2,
                               progress=False, **extra)
        start = time.perf_counter()
        result = Distiller(pipe, "t5", config, options=options or None,
                           latent_size=8 if family != "dit" else None).train()
        seconds = time.perf_counter() - start
        lines.append(f"| {family} | {options or 'defaults'} | {result.deviation_before:.3e} | "
                     f"{result.deviation_after:.3e} | {result.deviation_before / result.deviation_after:.1f}x | "
                     f"{seconds:.1f} |")
        print(lines[-1], flush=True)
    output = harness.write_atomic(harness.output_path(args, ".md"), "\n".join(lines) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
