"""The quality lab: every DiT / SiT method on the shipped digits SiT (a real trained model), training-free
and after a short distillation fine-tune, in one run.

    .venv/bin/python benchmarks/quality_lab.py                      # ~50 min on a 2-core CPU
    .venv/bin/python benchmarks/quality_lab.py --num 100 --distill-steps 20 --only mediator   # a quick look

Per configuration (stock; each method training-free; each method distilled from the stock model on
the digits, all its new parameters at `--lr` and the inherited ones at `--inherited-lr`):
- FID: `--num` samples (the ten digits equally often, fixed noise per index) against all 1797 training
  digits, Inception pool features of the FID tool (diffusers_ext.eval), 16 x 16 grey as RGB;
- class accuracy: the share of samples the shipped digit classifier assigns to the requested digit;
- deviation: relative L2 distance of the samples from the stock model's samples of the same noise;
- speed: the stock denoiser's time over the patched one's, one call at batch `--batch` x 2 (guidance),
  configurations timed round-robin, median of `--repeats` rounds;
- fine-tune: the distillation's wall time (batch `--distill-batch`, `--distill-steps` steps).
Floor rows: `--num` real digits against all of them (a subset of the reference, so optimistic), and the
classifier's accuracy on its held-out 20 %. Sampling: diffusers_ext.digits.SAMPLING (Heun, 12 steps,
guidance 2). Writes benchmarks/results/quality_lab.md, .json and quality_lab_samples.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import diffusers_ext as dx
from diffusers_ext import digits
from diffusers_ext.distill import DistillConfig, Distiller
from diffusers_ext.eval.inception import InceptionNetwork, extract_features
from diffusers_ext.eval.metrics import compute_statistics, frechet_distance
from diffusers_ext.eval.sampling import to_uint8

RESULTS = Path(__file__).parent / "results"
CONFIGS = {  # name -> (method, options)
    "mediators n=64": ("mediator", dict(mediators=64)),
    "mediators 16->64": ("mediator", dict(mediators=(16, 64))),
    "VCA 64": ("vca", dict(tokens=64)),
    "LINA": ("lina", {}),
    "T^5": ("t5", {}),
}


def to_uint8_rgb(images: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) in [-1, 1] -> uint8 (B, H, W, 3), quantised as the FID sampler does (`to_uint8`)."""
    return to_uint8(((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())


class Scorer:
    def __init__(self, reference: torch.Tensor, batch: int = 8):   # batch 8: fastest on a 2-core CPU
        self.network = InceptionNetwork()
        self.batch = batch
        mu, sigma = compute_statistics(self.pool(reference, "reference"))
        self.reference = (mu, sigma)

    def pool(self, images: torch.Tensor, desc: str) -> np.ndarray:
        arr = to_uint8_rgb(images)
        chunks = (arr[i:i + self.batch] for i in range(0, len(arr), self.batch))
        return extract_features(self.network, chunks, total=len(arr), desc=f"features {desc}")["pool"]

    def fid(self, images: torch.Tensor, desc: str) -> float:
        mu, sigma = compute_statistics(self.pool(images, desc))
        return frechet_distance(mu, sigma, *self.reference)


def time_denoisers(pipes: dict, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds of one denoiser call (batch x 2, guidance) per configuration, round-robin."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, 1, digits.RESOLUTION, digits.RESOLUTION, generator=g)
    labels = torch.cat([torch.arange(batch) % 10, torch.full((batch,), digits.NUM_CLASSES)])
    t = torch.full((2 * batch,), 0.5)
    times = {name: [] for name in pipes}
    with torch.no_grad():
        for round_ in range(repeats + 1):
            for name, pipe in pipes.items():
                start = time.perf_counter()
                pipe.transformer(x, timestep=t, class_labels=labels)
                if round_:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=300, help="samples per configuration (a multiple of 10)")
    parser.add_argument("--distill-steps", type=int, default=150)
    parser.add_argument("--distill-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--inherited-lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=50, help="timing: images per denoiser call (x 2 with guidance)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", nargs="*", default=None, help="methods to run (default: all)")
    parser.add_argument("--out", default=str(RESULTS / "quality_lab"))
    args = parser.parse_args(argv)
    if args.num % 10:
        parser.error("--num must be a multiple of 10")
    torch.set_num_threads(os.cpu_count() or 1)

    data, _ = digits.load_digits_images()
    classifier = digits.load_classifier()
    labels = torch.arange(10).repeat(args.num // 10)
    scorer = Scorer(data)
    rows, samples, pipes = [], {}, {}

    def evaluate(name: str, method: str | None, mode: str, pipe, minutes: float | None, extra: dict):
        start = time.perf_counter()
        images = digits.generate(pipe, labels, seed=0)
        sample_minutes = (time.perf_counter() - start) / 60
        key = f"{name} ({mode})" if method else name
        samples[key], pipes[key] = images, pipe
        stock = samples.get("stock", images)
        row = dict(name=name, method=method, mode=mode, fid=scorer.fid(images, f"{name} {mode}"),
                   accuracy=digits.class_accuracy(classifier, images, labels),
                   deviation=float((images - stock).norm() / stock.norm()), finetune_minutes=minutes,
                   sampling_minutes=sample_minutes, key=key, **extra)
        rows.append(row)
        print(json.dumps(row), flush=True)

    evaluate("stock", None, "", digits.digits_pipeline(), None, {})
    real = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:args.num]]
    floor = dict(fid_real_subset=scorer.fid(real, "real"),
                 classifier_held_out=json.loads((digits.ASSETS / "training.json").read_text())["classifier"]["held_out_accuracy"])

    for name, (method, options) in CONFIGS.items():
        if args.only and method not in args.only:
            continue
        pipe = digits.digits_pipeline()
        dx.patch(pipe, method, **options)
        evaluate(name, method, "training-free", pipe, None, {})

        pipe = digits.digits_pipeline()
        with tempfile.TemporaryDirectory() as folder:
            config = DistillConfig(output_dir=folder, batch_size=args.distill_batch, max_steps=args.distill_steps,
                                   lr=args.lr, inherited_lr=args.inherited_lr, progress=True)
            start = time.perf_counter()
            result = Distiller(pipe, method, config, options=options, data=data).train()
            minutes = (time.perf_counter() - start) / 60
        evaluate(name, method, "distilled", pipe, minutes,
                 dict(deviation_before=result.deviation_before, deviation_after=result.deviation_after))

    seconds = time_denoisers(pipes, args.batch, args.repeats)
    for row in rows:
        row["ms_per_call"] = seconds[row["key"]] * 1000
        row["speed"] = seconds["stock"] / seconds[row["key"]]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(command=" ".join(["python benchmarks/quality_lab.py", *(argv if argv is not None else sys.argv[1:])]),
                num=args.num, distill_steps=args.distill_steps, distill_batch=args.distill_batch, lr=args.lr,
                inherited_lr=args.inherited_lr, sampling=digits.SAMPLING, batch=args.batch, repeats=args.repeats,
                torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                **floor)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    write_markdown(out.with_suffix(".md"), meta, rows)
    write_grid(out.parent / (out.name + "_samples.png"), samples)
    print(out.with_suffix(".md").read_text())
    return 0


def write_markdown(path: Path, meta: dict, rows: list[dict]) -> None:
    lines = [
        "# Quality lab: every DiT / SiT method on the shipped digits SiT",
        "",
        f"Command: `{meta['command']}` (CPU, {meta['threads']} threads, torch {meta['torch']}).",
        "",
        f"{meta['num']} samples per row (each digit equally often, the same noise in every row), "
        f"Heun {meta['sampling']['num_inference_steps']} steps, guidance {meta['sampling']['guidance_scale']}. "
        "FID against all 1797 training digits (Inception pool features, 16 x 16 grey as RGB); class accuracy by the "
        "shipped classifier; deviation = relative L2 distance of the samples from the stock samples of the same "
        f"noise; speed = stock time / patched time of one denoiser call at batch {meta['batch']} x 2 (median of "
        f"{meta['repeats']} round-robin rounds). Distilled: {meta['distill_steps']} steps at batch "
        f"{meta['distill_batch']} on the digits (new parameters at lr {meta['lr']}, inherited at {meta['inherited_lr']}).",
        "",
        "| configuration | mode | FID | class accuracy | deviation | speed | fine-tune |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tune = f"{r['finetune_minutes']:.1f} min" if r["finetune_minutes"] is not None else "-"
        lines.append(f"| {r['name']} | {r['mode'] or '-'} | {r['fid']:.2f} | {100 * r['accuracy']:.1f} % | "
                     f"{r['deviation']:.3f} | {r['speed']:.2f}x | {tune} |")
    lines += [
        "",
        f"Floors: {meta['num']} real digits against all of them (a subset of the reference, so optimistic): "
        f"FID {meta['fid_real_subset']:.2f}; the classifier's accuracy on its held-out 20 %: "
        f"{100 * meta['classifier_held_out']:.1f} %.",
        "",
        "Samples: `quality_lab_samples.png` (one row per configuration, digits 0-9).",
    ]
    path.write_text("\n".join(lines) + "\n")


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
            img = to_uint8_rgb(samples[name][c:c + 1])[0, :, :, 0]
            tile = Image.fromarray(255 - img).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (label_w + c * side, r * side))
    canvas.save(path)


if __name__ == "__main__":
    raise SystemExit(main())
