"""`diffusers-ext distill`: fine-tune a method's parameters by distillation from the unpatched model.

    diffusers-ext distill tiny:dit t5 --output-dir out --max-steps 200
    accelerate launch --num_processes 8 -m diffusers_ext.cli distill stabilityai/stable-diffusion-3.5-medium t5 \\
        --prompts prompts.txt --output-dir t5-sd35 --mixed-precision bf16 --max-steps 2000 --resume latest
"""

from __future__ import annotations

import argparse
import json

from ..argtypes import finite_float, positive_int
from .config import INHERITED_SCOPES
from .loop import MIXED_PRECISIONS


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="fine-tune a method by distillation from the original model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="hub id, pipeline folder, or tiny:<family>")
    p.add_argument("method", help="the method to fine-tune, e.g. t5")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a method option, repeatable, each read by its kind, e.g. --option text_tokens=ttt "
                        "(`diffusers-ext methods` lists them)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--prompts", help="text file, one prompt per line (text-to-image models)")
    p.add_argument("--class-labels", help="comma-separated class labels to draw (class-conditional models)")
    p.add_argument("--uncond-prob", type=finite_float, default=0.1)
    p.add_argument("--guided-loss", type=finite_float, default=None, metavar="SCALE",
                   help="also distil the guided output at this guidance scale: every sample paired with its "
                        "unconditional twin (half of each batch; --uncond-prob is then not drawn)")
    p.add_argument("--latents", default="noise", help="'noise', 'trajectory' or a folder of images")
    p.add_argument("--trajectory-runs", type=positive_int, default=8,
                   help="'trajectory': pipeline runs of --batch-size samples recorded before training")
    p.add_argument("--trajectory-steps", type=positive_int, default=None,
                   help="their sampling steps (default: the pipeline's recipe, else 20)")
    p.add_argument("--trajectory-guidance", type=finite_float, default=None,
                   help="their guidance scale (default: the recipe's, else the pipeline's)")
    p.add_argument("--resolution", type=int, help="image size in pixels (default: the model's)")
    add_loop_arguments(p, batch_size=4, lr=1e-3)
    p.add_argument("--inherited-lr", type=finite_float, default=0.0, help="lr of inherited weights (0: frozen)")
    p.add_argument("--inherited", choices=INHERITED_SCOPES, default="sites",
                   help="which pretrained weights --inherited-lr trains: the method's (its patched layers' "
                        "projections) or all of the denoiser's")
    p.set_defaults(func=run)


def add_loop_arguments(p: argparse.ArgumentParser, *, batch_size: int, lr: float) -> None:
    """The flags of the fields the shared `TrainingLoop` reads (`loop.LoopConfig`), plus batch size and
    model dtype: every training command (`distill`, `animate-train`) takes them the same way."""
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--max-steps", type=positive_int, default=1000)
    p.add_argument("--lr", type=finite_float, default=lr)
    p.add_argument("--weight-decay", type=finite_float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=finite_float, default=1.0, help="0: no clipping")
    p.add_argument("--ema-decay", type=finite_float, default=0.0,
                   help="exponential moving average of the trained weights, saved as the result (0: none)")
    p.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    p.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default="no")
    p.add_argument("--dtype", default="float32", help="dtype the model is loaded in (keep float32 for training)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", help="a checkpoint folder, or 'latest' (in --output-dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from accelerate import PartialState

    from ..loading import load_pipeline
    from ..registry import parse_options
    from .config import DistillConfig
    from .trainer import Distiller

    from ..files import check_writable_folder

    options = parse_options(args.option, args.method)   # bad options fail before the model loads
    check_writable_folder(args.output_dir, "--output-dir")
    state = PartialState(cpu=args.cpu)
    labels = [int(x) for x in args.class_labels.split(",")] if args.class_labels else None
    config = DistillConfig(
        output_dir=args.output_dir, prompts=args.prompts, class_labels=labels, uncond_prob=args.uncond_prob,
        guided_loss=args.guided_loss,
        latents=args.latents, trajectory_runs=args.trajectory_runs, trajectory_steps=args.trajectory_steps,
        trajectory_guidance=args.trajectory_guidance, resolution=args.resolution,
        batch_size=args.batch_size, max_steps=args.max_steps, lr=args.lr, inherited_lr=args.inherited_lr,
        inherited=args.inherited, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm or None, ema_decay=args.ema_decay,
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        cpu=args.cpu, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        resume=args.resume, seed=args.seed, progress=not args.no_progress,
    )
    pipe = load_pipeline(args.model, dtype=args.dtype, device=str(state.device))
    result = Distiller(pipe, args.method, config, options=options).train()
    if state.is_main_process:
        print(json.dumps({"output_dir": str(result.output_dir), "steps": result.steps,
                          "final_loss": result.losses[-1] if result.losses else None,
                          "deviation_before": result.deviation_before, "deviation_after": result.deviation_after}))
    return 0
