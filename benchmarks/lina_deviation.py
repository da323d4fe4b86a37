"""LINA starting point and design choices, measured on tiny random-weight models (offline): relative
deviation sum||patched - stock||^2 / sum||stock||^2 of the denoiser output before and after a short
distillation (`diffusers_ext.distill`, same steps and lr for every row), T^5 defaults beside it.

    python benchmarks/lina_deviation.py [--steps 60] [--lr 3e-3]
    python benchmarks/lina_deviation.py --quick       # smoke test: 2 rows, 2 steps
"""

from __future__ import annotations

import argparse
import time

import torch

import harness
PROMPTS = ["a cat", "a dog on a hill", "a red car at night", "a bowl of fruit", "a mountain lake"]
ROWS = [  # (family, method, options, inherited_lr)
    ("sd35", "lina", {}, 0.0), ("sd35", "lina", {"text_tokens": "softmax"}, 0.0),
    ("sd35", "lina", {"conv_on": "value"}, 0.0), ("sd35", "lina", {"text_gate_tokens": 0}, 0.0),
    ("sd35", "lina", {}, 3e-3), ("sd35", "t5", {}, 0.0),
    ("dit", "lina", {}, 0.0), ("dit", "lina", {"conv_on": "value"}, 0.0), ("dit", "lina", {}, 3e-3),
    ("dit", "lina", {"conv_on": "value"}, 3e-3), ("dit", "t5", {}, 0.0),
]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3)
    harness.add_output_argument(parser, harness.RESULTS / "lina_deviation.md")
    harness.add_quick_argument(parser, "the first row of each model, 2 steps")
    args = harness.apply_quick(parser, parser.parse_args(argv), steps=2)
    rows = [next(r for r in ROWS if r[0] == f) for f in ("sd35", "dit")] if args.quick else ROWS
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState

    from diffusers_ext.distill import DistillConfig, Distiller
    from diffusers_ext.testing import tiny_pipeline

    lines = harness.header(
        "LINA deviation from the original model, before / after distillation (tiny models)", __file__, argv=argv,
        device="cpu", dtype=torch.float32, extra=[
            "Tiny random-weight models from `diffusers_ext.testing` (SD3.5 flavour: 2 blocks, block 0 dual-attention, "
            f"latent 8x8, 333 text tokens; DiT: 2 blocks, 8x8 tokens); {args.steps} steps, lr {args.lr} for the new "
            "parameters (inherited projections at `inherited_lr`, 0 = frozen), batch 2, noise latents; deviation on 2 "
            "fixed held-out batches. LINA defaults: text_tokens=linear, conv_on=input, text_gate_tokens=333 (SD3), "
            "gates 1, conv zero. seconds: wall time of the row's distillation (one run)."])
    lines += ["| model | method | options | inherited_lr | deviation before | after | reduction | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for family, method, options, inherited_lr in rows:
        AcceleratorState._reset_state(True)
        pipe = tiny_pipeline(family)
        extra = {"prompts": PROMPTS} if family != "dit" else {}
        config = DistillConfig(output_dir="/tmp/lina_deviation", max_steps=args.steps, lr=args.lr, batch_size=2,
                               inherited_lr=inherited_lr, progress=False, **extra)
        start = time.perf_counter()
        result = Distiller(pipe, method, config, options=options or None,
                           latent_size=8 if family != "dit" else None).train()
        seconds = time.perf_counter() - start
        lines.append(f"| {family} | {method} | {options or 'defaults'} | {inherited_lr:g} | "
                     f"{result.deviation_before:.3e} | {result.deviation_after:.3e} | "
                     f"{result.deviation_before / result.deviation_after:.1f}x | {seconds:.1f} |")
        print(lines[-1], flush=True)
    output = harness.write_atomic(harness.output_path(args, ".md"), "\n".join(lines) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
