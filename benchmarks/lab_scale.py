"""Constant factors on a small model: every DiT method on a 1024-token, 6-block pixel-space DiT, the
quality lab II scale (issue 19), against stock SDPA in one run.

    python benchmarks/lab_scale.py                  # width 128 (4 heads of 32), batch 64, 3 rounds
    python benchmarks/lab_scale.py --width 96       # the glyph SiT's width (3 heads)
    python benchmarks/lab_scale.py --quick          # smoke test: batch 2, 1 round
    python benchmarks/lab_scale.py --compile        # every variant compiled (inductor), stock too

The model is `lab.models.glyph_transformer` (32 x 32 pixels, patch 1: 1024 tokens) with random weights;
the methods' new parameters are filled with small random values as after a fine-tune
(`dit_attention.apply`, trained=True), so no zero-initialised branch is skipped. One denoiser call at
t = 0.5 per variant, round-robin (benchmarks/harness.py), then one attention layer alone the same way.
Writes benchmarks/results/lab_scale.md. With `--compile` every variant's blocks are compiled
(`harness.compile_regions`, inductor: on the CPU it fuses the elementwise passes into C++ loops) and so is
the attention layer timed alone (`torch.compile(layer)`); the warm-up rounds (3) compile, untimed. Writes
benchmarks/results/lab_scale_compiled.md.
"""

from __future__ import annotations

import argparse

import torch

import harness
from dit_attention import apply
from diffusers_ext.lab.models import glyph_transformer

LAYER = 4   # the block whose attention layer is timed alone (a decoder block of LINA's released layout)
VARIANTS = {  # name -> (method, options)
    "stock": (None, {}),
    "mediators n=64": ("mediator", dict(mediators=64)),
    "VCA n=64": ("vca", dict(tokens=64)),
    "LINA (released)": ("lina", {}),
    "T^5 (released)": ("t5", {}),
    "T^5 (TTT only)": ("t5", dict(local="none")),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128, help="model width, a multiple of 32 (heads of 32)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed round-robin rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS)[1:], default=list(VARIANTS)[1:],
                        help="the methods to time against stock (default: all)")
    harness.add_warmup_argument(parser, None, "default 1; 3 with --compile")
    parser.add_argument("--compile", action="store_true",
                        help="compile every variant (its blocks, and the layer timed alone) with inductor")
    harness.add_output_argument(parser, harness.RESULTS / "lab_scale")
    harness.add_quick_argument(parser, "batch 2, 1 round")
    args = harness.apply_quick(parser, parser.parse_args(argv), batch=2, repeats=1)
    if args.compile:
        # block 0's input has another layout than the others', and every variant's processors differ: a few
        # graphs per variant, compiled in the first two warm-up rounds; allow them all (the default limit, 8,
        # would leave the later variants running eagerly)
        args.warmup = 3 if args.warmup is None else args.warmup
        if args.warmup < 2:
            parser.error(f"--compile compiles in the first two warm-up rounds: give --warmup 2 or more, "
                         f"got {args.warmup}")
        torch._dynamo.config.recompile_limit = 8 * len(VARIANTS)
    args.warmup = 1 if args.warmup is None else args.warmup
    if args.width % 32 or args.width < 32:
        parser.error(f"--width must be a positive multiple of 32, got {args.width}")
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 32, 32, generator=g)
    t = torch.full((args.batch,), 0.5)
    labels = torch.arange(args.batch) % 37
    tokens = torch.randn(args.batch, 32 * 32, args.width, generator=g)   # one attention layer's input
    calls, layers = {}, {}
    for name in ["stock", *args.variants]:
        method, options = VARIANTS[name]
        model = glyph_transformer(num_attention_heads=args.width // 32).eval()
        apply(model, method, options, True, 8 * 32)          # latent_hw = 32 x 32 tokens
        attention = model.transformer_blocks[LAYER].attn1
        if args.compile:
            attention = torch.compile(attention)               # a compiled wrapper: the block keeps its own
            harness.compile_regions(model)
        calls[name] = lambda model=model: model(x, timestep=t, class_labels=labels).sample
        layers[name] = lambda attention=attention: attention(tokens)
    with torch.no_grad():
        timings = harness.interleaved(calls, args.repeats, args.warmup)
        layer_timings = harness.interleaved(layers, args.repeats, args.warmup)

    def row(name):
        model_time, layer_time = timings[name], layer_timings[name]
        return [name, harness.spread(1000 * model_time.median, 1000 * model_time.min, 1000 * model_time.max, ".1f")
                + " ms", f"{model_time.speedup_over(timings['stock']):.2f}x",
                harness.spread(1000 * layer_time.median, 1000 * layer_time.min, 1000 * layer_time.max, ".1f") + " ms",
                f"{layer_time.speedup_over(layer_timings['stock']):.2f}x"]

    rows = [row(name) for name in timings]
    lines = harness.header(
        "Constant factors at the lab scale: a 1024-token, 6-block DiT", __file__, argv=argv, device="cpu",
        dtype=torch.float32, statistic=harness.statistic(args.repeats, args.warmup), extra=[
            f"Pixel-space DiT (lab.models.glyph_transformer), 32 x 32 at patch 1 (1024 tokens), 6 blocks, width "
            f"{args.width} ({args.width // 32} heads of 32), random weights, the methods' new parameters random as "
            f"after a fine-tune; one denoiser call at batch {args.batch}, and (timed after the calls, in rounds "
            f"of their own) one attention layer of block {LAYER} (`attn1`, to_q / k / v and to_out included) on "
            f"random tokens: what the method changes, without the blocks' shared MLP and norms."
            + (" Every variant compiled (inductor): the blocks (`harness.compile_regions`) and the layer timed "
               "alone; compiled in the warm-up rounds." if args.compile else "")])
    lines += harness.markdown_table(["variant", "time per call", "speed-up", "attention layer", "layer speed-up"],
                                    rows)
    default = harness.RESULTS / "lab_scale_compiled" if args.compile else None
    harness.write_atomic(harness.output_path(args, default=default), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
