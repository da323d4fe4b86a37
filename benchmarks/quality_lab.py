"""The quality lab: every DiT / SiT method on the shipped digits SiT (a real trained model), training-free
and after a short distillation fine-tune, in one run.

    python benchmarks/quality_lab.py                      # ~50 min on a 2-core CPU
    python benchmarks/quality_lab.py --num 100 --distill-steps 20 --only mediator   # a quick look
    python benchmarks/quality_lab.py --quick              # smoke test: mediators, 10 samples, 1 step

Per configuration (stock; each method training-free; each method distilled from the stock model on
the digits, all its new parameters at `--lr` and the inherited ones at `--inherited-lr`):
- FID: `--num` samples (the ten digits equally often, fixed noise per index) against all 1797 training
  digits, Inception pool features of the FID tool (diffusers_ext.eval), 16 x 16 grey as RGB;
- class accuracy: the share of samples the shipped digit classifier assigns to the requested digit;
- deviation: relative L2 distance of the samples from the stock model's samples of the same noise;
- speed: the stock denoiser's time over the patched one's, one call at batch `--batch` x 2 (guidance),
  configurations timed round-robin (benchmarks/harness.py), median of `--repeats` rounds after `--warmup`;
- fine-tune: the distillation's wall time (batch `--distill-batch`, `--distill-steps` steps).
Floor rows: `--num` real digits against all of them (a subset of the reference, so optimistic), and the
classifier's accuracy on its held-out 20 %. Sampling: diffusers_ext.digits.SAMPLING (Heun, 12 steps,
guidance 2). Writes benchmarks/results/quality_lab.md, .json and quality_lab_samples.png.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import diffusers_ext as dx
import harness
from diffusers_ext import digits, files
from diffusers_ext.distill import DistillConfig, Distiller
from diffusers_ext.eval.metrics import frechet_distance
from diffusers_ext.pipeline_io import tensor_to_uint8
from study import RowCache, Scorer, file_digest

CONFIGS = {  # name -> (method, options)
    "mediators n=64": ("mediator", dict(mediators=64)),
    "mediators 16->64": ("mediator", dict(mediators=(16, 64))),
    "VCA 64": ("vca", dict(tokens=64)),
    "LINA": ("lina", {}),                               # released layout: encoder half without gate / conv
    "LINA (every block gated)": ("lina", dict(layout="gated")),
    "T^5": ("t5", {}),                                  # released mixed attention: 0.5 NA 5x5 + 0.5 TTT
    "T^5 (TTT only)": ("t5", dict(local="none")),
}
QUICK_REFERENCE = 10  # --quick: FID against the first 10 training digits only, and
QUICK_SAMPLING = dict(num_inference_steps=2)  # 2 sampling steps instead of 12


def time_denoisers(pipes: dict, batch: int, repeats: int, warmup: int) -> dict[str, harness.Timing]:
    """One denoiser call (batch x 2, guidance) per configuration, round-robin (harness.interleaved)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, 1, digits.RESOLUTION, digits.RESOLUTION, generator=g)
    labels = torch.cat([torch.arange(batch) % 10, torch.full((batch,), digits.NUM_CLASSES)])
    t = torch.full((2 * batch,), 0.5)
    calls = {name: (lambda pipe=pipe: pipe.transformer(x, timestep=t, class_labels=labels))
             for name, pipe in pipes.items()}
    with torch.no_grad():
        return harness.interleaved(calls, repeats, warmup)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=300, help="samples per configuration (a multiple of 10)")
    parser.add_argument("--distill-steps", type=int, default=150)
    parser.add_argument("--distill-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--inherited-lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=50, help="timing: images per denoiser call (x 2 with guidance)")
    parser.add_argument("--repeats", type=int, default=7, help="timing: round-robin rounds")
    harness.add_warmup_argument(parser)
    parser.add_argument("--only", nargs="*", default=None, help="methods to run (default: all)")
    parser.add_argument("--rows", nargs="*", default=None, choices=list(CONFIGS), metavar="NAME",
                        help=f"configurations to run (default: all of the --only methods); one of: {', '.join(CONFIGS)}")
    harness.add_output_argument(parser, harness.RESULTS / "quality_lab", "--out")
    parser.add_argument("--cache", default="lab_runs/quality_lab_cache", metavar="DIR",
                        help="finished rows (samples, metrics, fine-tuned weights) and fine-tune checkpoints: a "
                             "stopped run resumes from them; timing is always measured afresh (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="recompute every row, keep nothing")
    harness.add_quick_argument(parser, f"the mediator rows, 10 samples in 2 steps against {QUICK_REFERENCE} reference "
                                       "digits, 1 distillation step at batch 4, timing at batch 2, 1 round")
    args = harness.apply_quick(parser, parser.parse_args(argv), num=10, distill_steps=1, distill_batch=4, batch=2,
                               repeats=1, only=["mediator"])
    if args.num % 10:
        parser.error("--num must be a multiple of 10")
    torch.set_num_threads(os.cpu_count() or 1)

    data, data_labels = digits.load_digits_images()
    classifier = digits.load_classifier()
    labels = torch.arange(10).repeat(args.num // 10)
    reference = data[:QUICK_REFERENCE] if args.quick else data
    sampling = {**digits.SAMPLING, **(QUICK_SAMPLING if args.quick else {})}
    cache = RowCache(None if args.no_cache else args.cache)
    scorer = Scorer(reference, cache=cache)
    model_digest = file_digest(digits.ASSETS / "transformer" / "diffusion_pytorch_model.safetensors")
    common = dict(num=args.num, sampling=sampling, reference=len(reference), model=model_digest)
    rows, samples, pipes = [], {}, {}

    def settings_of(name: str, method: str | None, options: dict, mode: str) -> dict:
        tune = dict(distill_steps=args.distill_steps, distill_batch=args.distill_batch, lr=args.lr,
                    inherited_lr=args.inherited_lr, labels="own") if mode == "distilled" else {}
        return dict(name=name, method=method, options=options, mode=mode, **common, **tune)

    def evaluate(settings: dict, pipe, extra: dict):
        """The row of `settings` (from the cache, else computed and cached); keeps its samples and pipe."""
        name, method, mode = settings["name"], settings["method"], settings["mode"]
        key = f"{name} ({mode})" if method else name
        cached = cache.load(settings)
        if cached is not None:
            row, images = cached
            row.pop("settings", None)
            print(f"{key}: from the cache", flush=True)
        else:
            start = time.perf_counter()
            images = digits.generate(pipe, labels, seed=0, **sampling)
            sample_minutes = (time.perf_counter() - start) / 60
            stock = samples.get("stock", images)
            row = dict(name=name, method=method, mode=mode, fid=scorer.fid(images, f"{name} {mode}"),
                       accuracy=digits.class_accuracy(classifier, images, labels),
                       deviation=float((images - stock).norm() / stock.norm()),
                       sampling_minutes=sample_minutes, key=key, finetune_minutes=None)
            row.update(extra)
            cache.store(settings, row, images)
        samples[key], pipes[key] = images, pipe
        rows.append(row)
        print(json.dumps(row), flush=True)

    evaluate(settings_of("stock", None, {}, ""), digits.digits_pipeline(), {})
    real = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:args.num]]
    real_statistics = scorer.statistics(real, "real", cache)
    floor = dict(fid_real_subset=frechet_distance(*real_statistics, *scorer.reference),
                 classifier_held_out=json.loads((digits.ASSETS / "training.json").read_text())["classifier"]["held_out_accuracy"])

    with tempfile.TemporaryDirectory() as scratch:
        for name, (method, options) in CONFIGS.items():
            if (args.only and method not in args.only) or (args.rows and name not in args.rows):
                continue
            pipe = digits.digits_pipeline()
            dx.patch(pipe, method, **options)
            evaluate(settings_of(name, method, options, "training-free"), pipe, {})

            settings = settings_of(name, method, options, "distilled")
            folder = cache.distill_dir(settings, Path(scratch) / name)
            pipe = digits.digits_pipeline()
            if cache.load(settings) is not None:    # trained before: its weights, for the timing
                dx.patch(pipe, method, weights=str(folder), **options)
                evaluate(settings, pipe, {})
                continue
            resume = "latest" if any(folder.glob("checkpoint-*")) else None
            config = DistillConfig(output_dir=str(folder), batch_size=args.distill_batch, max_steps=args.distill_steps,
                                   lr=args.lr, inherited_lr=args.inherited_lr, progress=True,
                                   checkpoint_every=25 if cache.root is not None else 0, keep_checkpoints=1,
                                   resume=resume)
            start = time.perf_counter()
            result = Distiller(pipe, method, config, options=options, data=data, labels=data_labels).train()
            minutes = (time.perf_counter() - start) / 60
            # a resumed fine-tune: minutes of this call only, deviation_before at the checkpoint it resumed
            evaluate(settings, pipe, dict(finetune_minutes=minutes, deviation_before=result.deviation_before,
                                          deviation_after=result.deviation_after, resumed=resume is not None))

    timings = time_denoisers(pipes, args.batch, args.repeats, args.warmup)
    for row in rows:
        t = timings[row["key"]]
        row.update(ms_per_call=t.median * 1000, ms_min=t.min * 1000, ms_max=t.max * 1000,
                   speed=t.speedup_over(timings["stock"]))

    out = harness.output_stem(args)
    meta = dict(command=harness.command(__file__, argv), num=args.num, distill_steps=args.distill_steps,
                distill_batch=args.distill_batch, lr=args.lr, inherited_lr=args.inherited_lr, sampling=sampling,
                batch=args.batch, repeats=args.repeats, warmup=args.warmup, torch=torch.__version__,
                threads=torch.get_num_threads(), machine=harness.machine("cpu", torch.float32),
                reference=len(reference), **floor)
    harness.write_json(harness.output_path(args, ".json"), dict(meta=meta, rows=rows))
    write_markdown(harness.output_path(args, ".md"), meta, rows, argv)
    with files.atomic_path(out.with_name(out.name + "_samples.png")) as tmp:
        write_grid(tmp, samples)
    print(harness.output_path(args, ".md").read_text())
    return 0


def write_markdown(path: Path, meta: dict, rows: list[dict], argv=None) -> None:
    lines = harness.header(
        "Quality lab: every DiT / SiT method on the shipped digits SiT", __file__, argv=argv, device="cpu",
        dtype=torch.float32, statistic=harness.statistic(meta["repeats"], meta["warmup"]), extra=[
            f"{meta['num']} samples per row (each digit equally often, the same noise in every row), "
            f"Heun {meta['sampling']['num_inference_steps']} steps, guidance {meta['sampling']['guidance_scale']}. "
            f"FID against {'all 1797' if meta['reference'] == 1797 else meta['reference']} training digits (Inception "
            "pool features, 16 x 16 grey as RGB); class accuracy by the shipped classifier; deviation = relative L2 "
            "distance of the samples from the stock samples of the same noise; speed = stock time / patched time of "
            f"one denoiser call at batch {meta['batch']} x 2 (medians of the round-robin rounds). Distilled: "
            f"{meta['distill_steps']} steps at batch {meta['distill_batch']} on the digits (new parameters at lr "
            f"{meta['lr']}, inherited at {meta['inherited_lr']})."])
    table = []
    for r in rows:
        tune = f"{r['finetune_minutes']:.1f} min" if r["finetune_minutes"] is not None else "-"
        table.append([r["name"], r["mode"] or "-", f"{r['fid']:.2f}", f"{100 * r['accuracy']:.1f} %",
                      f"{r['deviation']:.3f}", f"{r['speed']:.2f}x", tune])
    lines += harness.markdown_table(["configuration", "mode", "FID", "class accuracy", "deviation", "speed",
                                     "fine-tune"], table)
    lines += [
        "",
        f"Floors: {meta['num']} real digits against all of them (a subset of the reference, so optimistic): "
        f"FID {meta['fid_real_subset']:.2f}; the classifier's accuracy on its held-out 20 %: "
        f"{100 * meta['classifier_held_out']:.1f} %.",
        "",
        f"Samples: `{path.stem}_samples.png` (one row per configuration, digits 0-9).",
    ]
    harness.write_atomic(path, "\n".join(lines) + "\n")


def write_grid(path: Path, samples: dict[str, torch.Tensor], scale: int = 3) -> None:
    from PIL import Image, ImageDraw

    names = list(samples)
    side = digits.RESOLUTION * scale
    label_w = 190
    canvas = Image.new("L", (label_w + 10 * side, len(names) * side), 255)
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(names):
        draw.text((4, r * side + side // 3), name, fill=0)
        for c in range(10):
            img = tensor_to_uint8(samples[name][c:c + 1])[0, :, :, 0]
            tile = Image.fromarray(255 - img).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (label_w + c * side, r * side))
    canvas.save(path)


if __name__ == "__main__":
    raise SystemExit(main())
