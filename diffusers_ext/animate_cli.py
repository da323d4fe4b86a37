r"""`diffusers-ext animate`: FAAC anchor-frame video on an AnimateDiff pipeline, written as GIF / MP4.

    diffusers-ext animate                                       # offline: the tiny AnimateDiff pipeline
    diffusers-ext animate --model <AnimateDiff pipeline id or folder> --prompt "a portrait" \
        --image photo.png --frames 16 --out portrait.mp4        # animate a photo, identity kept
    diffusers-ext animate --option image_model_anchor=False --option steps="(0.0, 0.5)"

`--anchor`, `--mode`, `--anchor-weight` and every `--option KEY=VALUE` are options of the method
`anchor_frame` (`diffusers-ext methods` lists them with their defaults), read by the registry's one
parser; what is not given takes the method's default.
"""

from __future__ import annotations

import argparse

from .argtypes import finite_float, positive_int

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
    parser.add_argument("--motion-adapter", default=None, help="a motion-adapter folder (e.g. from animate-train) "
                        "in place of the pipeline's motion modules")
    parser.add_argument("--frames", type=positive_int, default=16)
    parser.add_argument("--anchor", default=None, help="the option `anchor`: anchor frame index (-1 = last)")
    parser.add_argument("--mode", default=None, help="the option `mode`: concat or replace")
    parser.add_argument("--anchor-weight", default=None, help="the option `anchor_weight`")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="another option of the method anchor_frame, repeatable (e.g. image_model_anchor=False)")
    parser.add_argument("--steps", type=positive_int, default=25, help="denoising steps")
    parser.add_argument("--guidance-scale", type=finite_float, default=7.5)
    parser.add_argument("--height", type=positive_int, default=None)
    parser.add_argument("--width", type=positive_int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=positive_int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="outputs/animation.gif", help=".gif or .mp4")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    import torch
    from PIL import Image

    from diffusers_ext.errors import OptionError
    from diffusers_ext.loading import load_pipeline
    from diffusers_ext.pipelines.animatediff_anchor import animate
    from diffusers_ext.registry import parse_options, split_option_pairs

    if args.frames < 2 or args.steps < 1:
        raise ValueError(f"--frames must be >= 2 and --steps >= 1, got {args.frames} and {args.steps}")
    texts = split_option_pairs(args.option)
    for name, text in (("anchor", args.anchor), ("mode", args.mode), ("anchor_weight", args.anchor_weight)):
        if text is not None:
            if name in texts:
                raise OptionError(f"option `{name}` is given twice (--{name.replace('_', '-')} and --option)")
            texts[name] = text
    if "num_frames" in texts:
        raise OptionError("option `num_frames` is set by --frames here")
    options = parse_options(texts, "anchor_frame")
    from diffusers_ext.files import check_writable
    from diffusers_ext.loading import resolve_device

    check_writable(args.out, "--out")   # before any work, naming the real path
    resolve_device(args.device)
    image = None
    if args.image is not None:
        image = Image.open(args.image).convert("RGB")  # FileNotFoundError is reported cleanly
    pipe = load_pipeline(args.model, dtype=args.dtype, device=args.device)
    pipe.set_progress_bar_config(disable=False)
    animate(pipe, args.prompt, image=image, num_frames=args.frames, num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, height=args.height,
            width=args.width, generator=torch.Generator("cpu").manual_seed(args.seed), output=args.out,
            fps=args.fps, motion_adapter=args.motion_adapter, **options)
    given = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "defaults"
    print(f"wrote {args.out} ({args.frames} frames, anchor_frame options: {given})")
    return 0
