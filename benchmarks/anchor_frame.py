"""Cost of FAAC's anchor frame per denoising step: one UNetMotionModel forward, stock vs anchor.

    python benchmarks/anchor_frame.py                                   # 256 x 256, 8 frames, CPU fp32
    python benchmarks/anchor_frame.py --size 512 --frames 16 --device cuda --dtype float16

The real AnimateDiff architecture with random weights (speed does not depend on weights): the SD 1.5
UNet (UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8), 860M parameters) plus a
MotionAdapter with the default config (mm_sd_v15_v2-like: 4 levels, 2 motion layers per block, motion
mid block). One forward of one video (`--videos 2` for a classifier-free-guidance step), timed
round-robin over the configurations `--repeats` times, keeping each one's fastest run:

    stock            diffusers' AnimateDiff
    anchor-concat    anchor K/V appended to every frame's own (weight 1) + ghost motion modules
    anchor-concat-w  the same with anchor_weight 0.5 (a masked softmax, another SDPA path)
    anchor-replace   every frame reads the anchor's K/V only (Text2Video-Zero-like) + ghost motion
    ghost-only       the anchor skips the motion modules, stock attention elsewhere (anchor_weight 0)

Writes benchmarks/results/anchor_frame.md (table, command, machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

CONFIGS = {
    "stock": None,
    "anchor-concat": dict(mode="concat", anchor_weight=1.0),
    "anchor-concat-w": dict(mode="concat", anchor_weight=0.5),
    "anchor-replace": dict(mode="replace", anchor_weight=1.0),
    "ghost-only": dict(mode="concat", anchor_weight=0.0),
}


class _Pipe:  # the least a pipeline needs for enable_anchor_frame: a `unet`
    def __init__(self, unet):
        self.unet = unet


def build(device, dtype):
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(0)
    unet = UNetMotionModel.from_unet2d(UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8),
                                       MotionAdapter())
    return unet.to(device=device, dtype=dtype).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--videos", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "anchor_frame.md"))
    args = parser.parse_args(argv)

    from diffusers_ext.pipelines.animatediff_anchor import disable_anchor_frame, enable_anchor_frame

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    unet = build(device, dtype)
    pipe = _Pipe(unet)
    side = args.size // 8
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(args.videos, 4, args.frames, side, side, generator=gen).to(device, dtype)
    text = torch.randn(args.videos * args.frames, 77, 768, generator=gen).to(device, dtype)

    def forward():
        with torch.no_grad():
            out = unet(sample, 500, encoder_hidden_states=text).sample
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    forward()  # warm-up
    best, outputs = {name: float("inf") for name in CONFIGS}, {}
    for repeat in range(args.repeats):
        for name, options in CONFIGS.items():
            if options is not None:
                enable_anchor_frame(pipe, **options)
            start = time.perf_counter()
            outputs[name] = forward().float().cpu()
            best[name] = min(best[name], time.perf_counter() - start)
            if options is not None:
                disable_anchor_frame(pipe)
            print(f"repeat {repeat} {name}: {best[name]:.2f} s", file=sys.stderr, flush=True)

    stock = outputs["stock"]
    rows = []
    for name in CONFIGS:
        deviation = ((outputs[name] - stock).norm() / stock.norm()).item()
        rows.append(f"| {name} | {best[name]:.2f} | {best[name] / best['stock']:.3f} | {deviation:.3f} |")
    command = "python benchmarks/anchor_frame.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = (f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}, device {args.device}")
    if device.type == "cuda":
        machine += f" ({torch.cuda.get_device_name()})"
    if hasattr(os, "getloadavg"):
        machine += f"; load average at the end {os.getloadavg()[0]:.1f} (other processes share the CPU)"
    table = "\n".join([
        "# FAAC anchor frame: cost per denoising step (one UNetMotionModel forward)",
        "",
        f"SD 1.5 UNet + default MotionAdapter (mm_sd_v15_v2-like), random weights, {args.size}x{args.size}, "
        f"{args.frames} frames, {args.videos} video(s) per forward, {args.dtype}; fastest of {args.repeats} "
        "round-robin runs.",
        "",
        "| configuration | s / step | x stock | rel. L2 deviation of eps from stock |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {machine}",
        "",
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
