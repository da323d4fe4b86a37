"""Cost of FAAC's anchor frame per denoising step: one UNetMotionModel forward, stock vs anchor.

    python benchmarks/anchor_frame.py                                   # 256 x 256, 8 frames, CPU fp32
    python benchmarks/anchor_frame.py --size 512 --frames 16 --device cuda --dtype float16
    python benchmarks/anchor_frame.py --quick                           # smoke test: a tiny UNet, seconds

The real AnimateDiff architecture with random weights (speed does not depend on weights): the SD 1.5
UNet (UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8), 860M parameters) plus a
MotionAdapter with the default config (mm_sd_v15_v2-like: 4 levels, 2 motion layers per block, motion
mid block). One forward of one video (`--videos 2` for a classifier-free-guidance step), timed with
benchmarks/harness.py: `--warmup` untimed rounds, then `--repeats` round-robin rounds over the
configurations; the median of the rounds with [min, max]:

    stock            diffusers' AnimateDiff
    anchor-concat    anchor K/V appended to every frame's own (weight 1) + ghost motion modules
    anchor-concat-w  the same with anchor_weight 0.5 (a masked softmax, another SDPA path)
    anchor-replace   every frame reads the anchor's K/V only (Text2Video-Zero-like) + ghost motion
    ghost-only       the anchor skips the motion modules, stock attention elsewhere (anchor_weight 0)

Writes benchmarks/results/anchor_frame.md (table, command, machine).
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import harness

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


def build(device, dtype, tiny: bool = False):
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(0)
    if tiny:  # --quick: diffusers_ext.testing's tiny AnimateDiff UNet (cross-attention width 32)
        from diffusers_ext.testing import tiny_pipeline

        return tiny_pipeline("animatediff").unet.to(device=device, dtype=dtype).eval()
    unet = UNetMotionModel.from_unet2d(UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8),
                                       MotionAdapter())
    return unet.to(device=device, dtype=dtype).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--videos", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed round-robin rounds")
    harness.add_warmup_argument(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    harness.add_output_argument(parser, harness.RESULTS / "anchor_frame.md", "--out")
    harness.add_quick_argument(parser, "a tiny AnimateDiff UNet, 64 x 64, 2 frames, 1 round after 1 warm-up")
    args = harness.apply_quick(parser, parser.parse_args(argv), size=64, frames=2, repeats=1)

    from diffusers_ext.pipelines.animatediff_anchor import disable_anchor_frame, enable_anchor_frame

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    unet = build(device, dtype, tiny=args.quick)
    pipe = _Pipe(unet)
    side = args.size // 8
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(args.videos, 4, args.frames, side, side, generator=gen).to(device, dtype)
    text = torch.randn(args.videos * args.frames, 77, unet.config.cross_attention_dim, generator=gen).to(device, dtype)

    def forward():
        with torch.no_grad():
            return unet(sample, 500, encoder_hidden_states=text).sample

    @contextlib.contextmanager
    def configured(name):
        if CONFIGS[name] is None:
            yield
            return
        enable_anchor_frame(pipe, **CONFIGS[name])
        try:
            yield
        finally:
            disable_anchor_frame(pipe)

    timings = harness.interleaved({name: forward for name in CONFIGS}, args.repeats, args.warmup, device=device,
                                  context=configured)
    stock = timings["stock"]
    rows = []
    for name, t in timings.items():
        out, ref = t.value.float().cpu(), stock.value.float().cpu()
        deviation = ((out - ref).norm() / ref.norm()).item()
        rows.append([name, t.cell(), f"{t.median / stock.median:.3f}", f"{deviation:.3f}"])
    model = ("tiny AnimateDiff UNet (diffusers_ext.testing)" if args.quick else
             "SD 1.5 UNet + default MotionAdapter (mm_sd_v15_v2-like)")
    lines = harness.header(
        "FAAC anchor frame: cost per denoising step (one UNetMotionModel forward)", __file__, argv=argv,
        device=device, dtype=dtype, statistic=harness.statistic(args.repeats, args.warmup),
        extra=[f"{model}, random weights, {args.size}x{args.size}, {args.frames} frames, {args.videos} video(s) "
               "per forward; x stock = configuration median / stock median."])
    lines += harness.markdown_table(["configuration", "s / step", "x stock", "rel. L2 deviation of eps from stock"],
                                    rows)
    table = "\n".join(lines) + "\n"
    harness.write_atomic(harness.output_path(args, ".md"), table)
    print(table)


if __name__ == "__main__":
    main()
