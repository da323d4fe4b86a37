r"""`diffusers-ext animate-train`: FAAC's training-based anchor frame. Fine-tunes an AnimateDiff
pipeline's motion modules on your videos, the anchor frame passing through the frozen image model only,
and writes a motion adapter (MotionAdapter.from_pretrained / `diffusers-ext animate --motion-adapter`).

    diffusers-ext animate-train videos/ --output-dir my-motion --frames 8 --max-steps 50   # tiny, offline
    accelerate launch -m diffusers_ext.cli animate-train faces/ --model <AnimateDiff pipeline folder> \
        --output-dir face-motion --frames 16 --stride 2 --resolution 512 --prompt "a portrait" \
        --mixed-precision bf16 --gradient-checkpointing --checkpoint-every 500 --resume latest

VIDEOS: a video (.gif, .mp4, .webm) or a folder of them and of folders of frames; a `<name>.txt`
beside a video is its caption, --prompt the caption of the others.
"""

from __future__ import annotations

import argparse
import json

from .argtypes import finite_float, positive_int
from .distill.cli import add_loop_arguments

DEFAULT_MODEL = "tiny:animatediff"


def register(subparsers) -> None:
    p = subparsers.add_parser("animate-train", help="fine-tune AnimateDiff's motion modules on videos (FAAC's "
                              "training-based anchor frame)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", help="a video or a folder of videos / frame folders")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"AnimateDiff pipeline: hub id, local folder or tiny:animatediff (default {DEFAULT_MODEL})")
    p.add_argument("--output-dir", required=True, help="the motion adapter, checkpoints and the latent cache")
    p.add_argument("--prompt", help="caption of every video without a <name>.txt sidecar")
    p.add_argument("--frames", type=positive_int, default=16, help="frames per clip")
    p.add_argument("--stride", type=positive_int, default=1, help="take every stride-th source frame")
    p.add_argument("--resolution", type=positive_int, help="square side in pixels (default: the model's)")
    p.add_argument("--cache-dir", help="VAE latents of the clips (default: <output-dir>/latents)")
    p.add_argument("--uncond-prob", type=finite_float, default=0.0, help="share of empty captions")
    p.add_argument("--anchor", type=int, default=0, help="anchor frame of each clip (-1 = last)")
    p.add_argument("--anchor-attention", action="store_true",
                   help="the training-free anchor-frame attention on during training too")
    p.add_argument("--lora-rank", type=int, default=0, help="train a LoRA of this rank on the motion modules "
                   "(0: their weights); merged into the saved adapter")
    p.add_argument("--lora-alpha", type=finite_float, help="LoRA scale alpha / rank (default alpha = rank)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    add_loop_arguments(p, batch_size=1, lr=1e-4)
    p.set_defaults(func=run)


def run(args) -> int:
    from accelerate import PartialState

    from .loading import load_pipeline
    from .pipelines.animatediff_anchor.training import MotionTrainConfig, MotionTrainer, check_output_dir
    from .pipelines.animatediff_anchor.videos import check_videos

    config = MotionTrainConfig(
        output_dir=args.output_dir, frames=args.frames, stride=args.stride, resolution=args.resolution,
        prompt=args.prompt, cache_dir=args.cache_dir, uncond_prob=args.uncond_prob, anchor=args.anchor,
        anchor_attention=args.anchor_attention, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        gradient_checkpointing=args.gradient_checkpointing, batch_size=args.batch_size, max_steps=args.max_steps,
        lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm or None, ema_decay=args.ema_decay,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision, cpu=args.cpu, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, seed=args.seed, progress=not args.no_progress,
    )
    check_output_dir(config)                   # bad input fails before the model loads
    check_videos(args.videos, args.prompt)
    state = PartialState(cpu=args.cpu)
    pipe = load_pipeline(args.model, dtype=args.dtype, device=str(state.device))
    result = MotionTrainer(pipe, args.videos, config).train()
    if state.is_main_process:
        print(json.dumps({"output_dir": str(result.output_dir), "clips": result.clips, "steps": result.steps,
                          "final_loss": result.losses[-1] if result.losses else None,
                          "loss_before": result.loss_before, "loss_after": result.loss_after}))
    return 0
