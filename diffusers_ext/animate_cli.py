"""`diffusers-ext animate`: FAAC anchor-frame video on an AnimateDiff pipeline, written as GIF / MP4.

    diffusers-ext animate                                       # offline: the tiny AnimateDiff pipeline
    diffusers-ext animate --model <AnimateDiff pipeline id or folder> --prompt "a portrait" \
        --image photo.png --frames 16 --out portrait.mp4        # animate a photo, identity kept
"""

from __future__ import annotations

import argparse

DEFAULT_MODEL = "tiny:animatediff"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "animate", help="anchor-frame (FAAC) video with AnimateDiff, written as .gif or .mp4",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"AnimateDiff pipeline: hub id, local folder or tiny:animatediff (default {DEFAULT_MODEL})")
    parser.add_argument("--prompt", default="a portrait photo of a person smiling")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--image", default=None, help="a photo to animate: the anchor starts from its DDIM inversion")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--anchor", type=int, default=0, help="anchor frame index (-1 = last)")
    parser.add_argument("--mode", default="concat", choices=["concat", "replace"])
    parser.add_argument("--anchor-weight", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="outputs/animation.gif", help=".gif or .mp4")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    import torch
    from PIL import Image

    from diffusers_ext.loading import load_pipeline
    from diffusers_ext.pipelines.animatediff_anchor import animate

    if args.frames < 2 or args.steps < 1:
        raise ValueError(f"--frames must be >= 2 and --steps >= 1, got {args.frames} and {args.steps}")
    image = None
    if args.image is not None:
        image = Image.open(args.image).convert("RGB")  # FileNotFoundError is reported cleanly
    pipe = load_pipeline(args.model, dtype=args.dtype, device=args.device)
    pipe.set_progress_bar_config(disable=False)
    animate(pipe, args.prompt, image=image, num_frames=args.frames, anchor=args.anchor, mode=args.mode,
            anchor_weight=args.anchor_weight, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt, height=args.height, width=args.width,
            generator=torch.Generator("cpu").manual_seed(args.seed), output=args.out, fps=args.fps)
    print(f"wrote {args.out} ({args.frames} frames, anchor frame {args.anchor}, mode {args.mode})")
    return 0
