"""Quality lab II: every method on the glyph models (docs/lab.md, "Lab II"), speed and quality in one run.

    python benchmarks/glyph_lab.py                       # the whole study (hours of CPU; resumable)
    python benchmarks/glyph_lab.py --part sit            # the SiT rows only (or: unet, curves)
    python benchmarks/glyph_lab.py --quick               # smoke test: 36 samples, 2 steps, tiny budgets

Models: the shipped lab II models (`diffusers_ext/assets/glyphs`, or `--models DIR` written by
`python -m diffusers_ext.lab export`): a pixel-space SiT with 1024 tokens an image and an SD-layout
UNet whose finest self-attention has 1024 tokens. Per configuration:
- FID: `--num` samples (the 36 classes equally often, the same noise in every row) against the shipped
  reference statistics of all 4140 glyph images (Inception pool features, grey as RGB);
- class accuracy: the shipped glyph classifier (held-out fonts: see `training.json`);
- deviation: relative L2 distance of the samples from the stock samples of the same noise;
- speed: stock / patched time of one denoiser call at batch `--batch` x 2 (guidance), every
  configuration of the part timed round-robin in this run (benchmarks/harness.py);
- fine-tune (SiT methods with trainable parts): a distillation from the stock model on the training
  glyphs, `--distill-minutes` of this CPU (the step count is calibrated once and kept in the cache).
Noise floor (every table): the FID of `--num` real glyphs, class-balanced, against the same statistics,
over `--floor-draws` draws (`study.Scorer.noise_floor`): rows closer than its spread are not told apart.
Curves (`--part curves`): quality after 0, 2, 5, 10, 20 minutes of fine-tune, one run per method,
evaluated at its checkpoints (the lr is constant after warm-up, so a run resumed to a later step is
the run that went there directly).

Everything finished is cached under `--cache` (benchmarks/study.py): a stopped study resumes where it
stopped, and a finished one re-times all rows in a few minutes; `--cached-only` writes the tables of the
rows finished so far and trains and samples nothing. Writes benchmarks/results/glyph_lab_<part>.md
/ .json and, for the SiT and the curves, plots (`*_speed_fid.png`, `*_curves.png`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import diffusers_ext as dx
import harness
from diffusers_ext import files
from diffusers_ext.argtypes import non_negative_float, positive_float, positive_int
from diffusers_ext.distill import DistillConfig, Distiller
from diffusers_ext.distill.config import INHERITED_SCOPES
from diffusers_ext.distill.loop import MIXED_PRECISIONS
from diffusers_ext.lab import pipelines as lab
from diffusers_ext.lab.data import NUM_CLASSES, load_glyphs
from diffusers_ext.pipeline_io import class_samples
from study import RowCache, Scorer, file_digest

SIT_ROWS = {  # name -> (method, options); trainable methods get a training-free and a distilled row
    "mediators n=64": ("mediator", dict(mediators=64)),
    "mediators n=16": ("mediator", dict(mediators=16)),
    "mediators 16->64": ("mediator", dict(mediators=(16, 64))),
    "mediators n=64, no DWC": ("mediator", dict(mediators=64, dwc=False)),   # the fine-tune without the V conv
    "VCA 64": ("vca", dict(tokens=64)),
    "LINA": ("lina", {}),
    "T^5": ("t5", {}),
    "T^5 (TTT only)": ("t5", dict(local="none")),
}
UNET_ROWS = {  # the speed / quality trade-off of the three training-free UNet methods over their settings
    **{f"agent, merge {r}": ("agent", dict(merge_ratio=r)) for r in (0.2, 0.4, 0.6)},
    "agent, whole run": ("agent", dict(agent_steps=None)),
    **{f"ToDo {f}x{f}": ("todo", dict(factor=f)) for f in (2, 3, 4)},
    **{f"tomesd {r}": ("tomesd", dict(ratio=r)) for r in (0.3, 0.5, 0.7)},
}
CURVE_METHODS = {name: SIT_ROWS[name] for name in ("mediators n=64", "VCA 64", "LINA", "T^5")}
CURVE_MINUTES = (0, 2, 5, 10, 20)
# fine-tune settings added after the first cached rows, with the defaults those rows were made with
ADDED_DEFAULTS = dict(inherited="sites", ema_decay=0.0, uncond_prob=0.1, mixed_precision="no", guided_loss=None)


def apply(pipe, method: str, options: dict, weights: str | None = None):
    """Patch `pipe` with one of our methods, or with tomesd (a peer: `tomesd.apply_patch` on the UNet)."""
    if method == "tomesd":
        import tomesd

        tomesd.apply_patch(pipe.unet, max_downsample=1, **options)
    else:
        dx.patch(pipe, method, weights=weights, **options)
    return pipe


def denoiser_call(pipe, batch: int):
    """One guided denoiser call (batch x 2) of `pipe` at mid-run, as a closure for the timer."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, 1, 32, 32, generator=g)
    labels = torch.cat([torch.arange(batch) % NUM_CLASSES, torch.full((batch,), NUM_CLASSES)])
    if hasattr(pipe, "transformer"):
        t = torch.full((2 * batch,), 0.5)
        return lambda: pipe.transformer(x, timestep=t, class_labels=labels)
    prompts = pipe.class_tokens(labels)
    return lambda: pipe.unet(x, torch.tensor(500), encoder_hidden_states=prompts)


def trajectory_fields(args) -> dict:
    """The `DistillConfig` fields of `--latents trajectory`; {} when the fine-tune is on the glyphs."""
    return dict(latents="trajectory", trajectory_runs=args.trajectory_runs) if args.latents == "trajectory" else {}


def finetune_config(args, **fields) -> DistillConfig:
    """The fine-tunes' `DistillConfig` at the command line's recipe (`fields`: the run's own, e.g. its folder and
    steps); `DistillConfig` checks the settings, so `main` builds one before anything loads."""
    return DistillConfig(batch_size=args.distill_batch, lr=args.lr, inherited_lr=args.inherited_lr,
                         inherited=args.inherited, ema_decay=args.ema_decay, uncond_prob=args.uncond_prob,
                         mixed_precision=args.mixed_precision, guided_loss=args.guided_loss, warmup_steps=10, **fields,
                         **trajectory_fields(args))


class Study:
    """The rows of one part: cached evaluation of configurations of one model (module doc)."""

    def __init__(self, args, part: str, scorer: Scorer, classifier, train: tuple[torch.Tensor, torch.Tensor]):
        self.args, self.part, self.scorer, self.classifier = args, part, scorer, classifier
        self.train_images, self.train_labels = train      # the SiT's training glyphs and their classes
        loader = lab.glyph_sit_pipeline if part != "unet" else lab.glyph_unet_pipeline
        self.load = lambda: loader(args.models)
        self.sampling = dict(lab.SIT_SAMPLING if part != "unet" else lab.UNET_SAMPLING)
        if args.quick:
            self.sampling["num_inference_steps"] = 2
        self.labels = torch.arange(NUM_CLASSES).repeat(args.num // NUM_CLASSES)
        weights = Path(args.models or lab.ASSETS) / ("transformer" if part != "unet" else "unet")
        self.common = dict(part=part, num=args.num, sampling=self.sampling,
                           model=file_digest(next(weights.glob("*.safetensors"))))
        self.cache = RowCache(None if args.no_cache else Path(args.cache))
        self.rows, self.samples, self.pipes = [], {}, {}

    def settings(self, name: str, method: str | None, options: dict, mode: str, **more) -> dict:
        return dict(name=name, method=method, options=options, mode=mode, **self.common, **more)

    def evaluate(self, settings: dict, pipe, extra: dict | None = None, keep_pipe: bool = True) -> dict:
        key = settings["name"] + (f" ({settings['mode']})" if settings["mode"] else "")
        cached = self.cache.load(settings)
        if cached is None and self.args.cached_only:
            return None
        if cached is not None:
            row, images = cached
            row.pop("settings", None)
        else:
            start = time.perf_counter()
            images = class_samples(pipe, self.labels, batch_size=72, **self.sampling)
            stock = self.samples.get("stock", images)
            row = dict(name=settings["name"], method=settings["method"], mode=settings["mode"], key=key,
                       fid=self.scorer.fid(images, key), sampling_minutes=(time.perf_counter() - start) / 60,
                       accuracy=float((self.classifier.predict(images) == self.labels).float().mean()),
                       deviation=float((images - stock).norm() / stock.norm()), finetune_minutes=None)
            row.update(extra or {})
            self.cache.store(settings, row, images)
        self.samples.setdefault(key, images)
        if keep_pipe:
            self.pipes[key] = pipe
        self.rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
        return row

    def recipe(self) -> dict:
        """The fine-tune's settings: part of the cache key of every fine-tuned row."""
        args = self.args
        # settings added since the first rows enter the key only when used, so those rows keep their keys
        added = {k: getattr(args, k) for k, default in ADDED_DEFAULTS.items() if getattr(args, k) != default}
        return dict(distill_batch=args.distill_batch, lr=args.lr, inherited_lr=args.inherited_lr, **added,
                    **(trajectory_fields(self.args) or dict(labels="own")))

    def distiller(self, pipe, method: str, options: dict, **config) -> Distiller:
        """A distillation of `method` at the recipe: on the training glyphs, each drawn with its own class,
        or on the stock model's own guided sampling runs at the SiT's recipe (`--latents trajectory`)."""
        data = {} if trajectory_fields(self.args) else dict(data=self.train_images, labels=self.train_labels)
        return Distiller(pipe, method, finetune_config(self.args, **config), options=options, **data)

    def distill(self, settings: dict, pipe, method: str, options: dict, steps: int, scratch: Path):
        """Fine-tune `pipe` (patched in place) to `steps`, resuming from the row's checkpoints."""
        folder = self.cache.distill_dir(settings, scratch / settings["name"])
        resume = "latest" if any(folder.glob("checkpoint-*")) else None
        distiller = self.distiller(pipe, method, options, output_dir=str(folder), max_steps=steps, resume=resume,
                                   checkpoint_every=max(1, steps // 10) if self.cache.root else 0,
                                   keep_checkpoints=1, progress=True)
        start = time.perf_counter()
        result = distiller.train()
        return result, (time.perf_counter() - start) / 60

    def steps_per_minute(self, method: str, options: dict) -> float:
        """Fine-tune steps per minute of this CPU for `method` at the recipe, measured once (8 steps after 2)
        and cached."""
        # what changes a step's cost besides the method and batch (autocast; every weight's gradients), named when
        # not the default: rate-curves-mediator-16-bf16-all.json
        costs = "".join(f"-{getattr(self.args, k)}" for k in ("mixed_precision", "inherited")
                        if getattr(self.args, k) != ADDED_DEFAULTS[k])
        name = f"rate-{self.part}-{method}-{self.args.distill_batch}{costs}.json"
        path = self.cache.root / name if self.cache.root else None
        if path is not None and path.is_file():
            return json.loads(path.read_text())["steps_per_minute"]
        with tempfile.TemporaryDirectory() as folder:
            times = []
            for steps in (2, 10):
                distiller = self.distiller(self.load(), method, options, output_dir=f"{folder}/{steps}",
                                           max_steps=steps, progress=False)
                start = time.perf_counter()
                distiller.train(evaluate=False)
                times.append(time.perf_counter() - start)
        rate = 8 / max(1e-6, (times[1] - times[0]) / 60)
        if path is not None:
            harness.write_json(path, dict(steps_per_minute=rate, method=method, machine=harness.machine("cpu")))
        return rate

    def time_all(self) -> None:
        timings = harness.interleaved({k: denoiser_call(p, self.args.batch) for k, p in self.pipes.items()},
                                      self.args.repeats, self.args.warmup)
        for row in self.rows:
            if row["key"] in timings:
                t = timings[row["key"]]
                row.update(ms_per_call=t.median * 1000, ms_min=t.min * 1000, ms_max=t.max * 1000,
                           speed=t.speedup_over(timings["stock"]))


def run_sit(study: Study, scratch: Path) -> None:
    args = study.args
    study.evaluate(study.settings("stock", None, {}, ""), study.load())
    for name, (method, options) in SIT_ROWS.items():
        if args.rows and name not in args.rows:
            continue
        study.evaluate(study.settings(name, method, options, "training-free"), apply(study.load(), method, options))
        if args.distill_minutes == 0:       # training-free rows only
            continue
        steps = max(1, round(args.distill_minutes * study.steps_per_minute(method, options)))
        settings = study.settings(name, method, options, "distilled", distill_steps=steps, **study.recipe())
        pipe = study.load()
        if study.cache.load(settings) is not None:
            study.evaluate(settings, apply(pipe, method, options, str(study.cache.distill_dir(settings, scratch))))
            continue
        if args.cached_only:
            continue
        result, minutes = study.distill(settings, pipe, method, options, steps, scratch)
        study.evaluate(settings, pipe, dict(finetune_minutes=minutes, distill_steps=steps,
                                            deviation_before=result.deviation_before,
                                            deviation_after=result.deviation_after))


def run_unet(study: Study, scratch: Path) -> None:
    study.evaluate(study.settings("stock", None, {}, ""), study.load())
    for name, (method, options) in UNET_ROWS.items():
        if study.args.rows and name not in study.args.rows:
            continue
        if method == "tomesd" and importlib.util.find_spec("tomesd") is None:
            print(f"{name}: skipped, tomesd is not installed (pip install tomesd)", flush=True)
            continue
        study.evaluate(study.settings(name, method, options, "training-free"), apply(study.load(), method, options))


def run_curves(study: Study, scratch: Path) -> None:
    """One fine-tune per method, evaluated after each of `--curve-minutes` (0 = training-free)."""
    args = study.args
    study.evaluate(study.settings("stock", None, {}, ""), study.load())
    minutes = sorted(set(args.curve_minutes))
    for name, (method, options) in CURVE_METHODS.items():
        if args.rows and name not in args.rows:
            continue
        rate = study.steps_per_minute(method, options)
        # teacher="stock": the points after the first are trained further by a new distiller on the same model;
        # before session 14 its teacher took the first student's inherited weights as the stock ones
        # (`weights.keep_pretrained`), so rows cached without this key are stale
        base = study.settings(name, method, options, "curve", rate=round(rate, 3), teacher="stock", **study.recipe())
        pipe = study.load()
        for m in minutes:
            if m == 0:      # training-free: the same point for every recipe
                study.evaluate(study.settings(f"{name} @ 0 min", method, options, "curve"),
                               apply(study.load(), method, options), dict(curve=name, minutes=0), keep_pipe=False)
                continue
            steps = round(m * rate)
            settings = dict(base, name=f"{name} @ {m} min", steps=steps)
            # every point trains the same run further: the run's folder is the method's, not the point's
            folder_settings = dict(base, name=name)
            if study.cache.load(settings) is None:
                if args.cached_only:
                    continue
                study.distill(folder_settings, pipe, method, options, steps, scratch)
            study.evaluate(settings, pipe, dict(curve=name, minutes=m, distill_steps=steps), keep_pipe=False)


def write_tables(study: Study, argv, floor: list[float]) -> None:
    args, rows = study.args, study.rows
    stem = harness.output_stem(args, harness.RESULTS / f"glyph_lab_{study.part}")
    meta = dict(command=harness.command(__file__, argv), part=study.part, num=args.num, sampling=study.sampling,
                batch=args.batch, repeats=args.repeats, warmup=args.warmup, distill_minutes=args.distill_minutes,
                fine_tune=study.recipe(), noise_floor=floor,
                machine=harness.machine("cpu", torch.float32), threads=torch.get_num_threads())
    harness.write_json(stem.with_name(stem.name + ".json"), dict(meta=meta, rows=rows))
    lines = harness.header(
        f"Quality lab II: the glyph {'SiT' if study.part != 'unet' else 'UNet'} ({study.part})", __file__, argv=argv,
        device="cpu", dtype=torch.float32, statistic=harness.statistic(args.repeats, args.warmup), extra=[
            f"{args.num} samples a row ({NUM_CLASSES} classes equally often, the same noise in every row), "
            f"{study.sampling}. FID against all glyph images (shipped statistics); class accuracy by the shipped "
            "classifier; deviation = relative L2 distance from the stock samples of the same noise; speed = stock / "
            f"patched time of one denoiser call at batch {args.batch} x 2.",
            f"Noise floor: {args.num} real glyphs (the same class mix, fonts drawn at random) score FID "
            f"{harness.spread(statistics.median(floor), min(floor), max(floor))} against the statistics over "
            f"{len(floor)} draws: a perfect model's FID at this sample count, and how far a row moves by chance.",
            f"Fine-tune (distilled and curve rows): {json.dumps(study.recipe())}."])
    table = []
    for r in rows:
        speed = f"{r['speed']:.2f}x" if "speed" in r else "-"
        tune = f"{r['finetune_minutes']:.1f} min" if r.get("finetune_minutes") is not None else (
            f"{r['minutes']} min" if "minutes" in r else "-")
        table.append([r["name"], r["mode"] or "-", f"{r['fid']:.2f}", f"{100 * r['accuracy']:.1f} %",
                      f"{r['deviation']:.3f}", speed, tune])
    lines += harness.markdown_table(["configuration", "mode", "FID", "class accuracy", "deviation", "speed",
                                     "fine-tune"], table)
    harness.write_atomic(stem.with_name(stem.name + ".md"), "\n".join(lines) + "\n")
    plot(study, stem, floor)
    print("\n".join(lines))


def plot(study: Study, stem: Path, floor: list[float]) -> None:
    """speed vs FID (one point per row, stock marked); for curves, FID and accuracy against minutes; the
    real-data noise floor as a grey band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = study.rows
    if study.part == "curves":
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        stock = next(r for r in rows if r["name"] == "stock")
        for curve in dict.fromkeys(r["curve"] for r in rows if "curve" in r):
            points = sorted((r["minutes"], r) for r in rows if r.get("curve") == curve)
            left.plot([m for m, _ in points], [r["fid"] for _, r in points], marker="o", label=curve)
            right.plot([m for m, _ in points], [100 * r["accuracy"] for _, r in points], marker="o", label=curve)
        left.axhline(stock["fid"], color="k", ls="--", label="stock")
        left.axhspan(min(floor), max(floor), color="0.85", label="real glyphs (noise floor)")
        right.axhline(100 * stock["accuracy"], color="k", ls="--", label="stock")
        left.set(xlabel="fine-tune minutes (this CPU)", ylabel="FID", title="FID")
        right.set(xlabel="fine-tune minutes (this CPU)", ylabel="class accuracy (%)", title="class accuracy")
        left.legend(fontsize=8)
        path = stem.with_name(stem.name + "_curves.png")
    else:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in rows:
            if "speed" not in r:
                continue
            marker = "*" if r["name"] == "stock" else ("o" if r["mode"] == "distilled" else "^")
            ax.scatter(r["speed"], r["fid"], marker=marker, s=120 if r["name"] == "stock" else 40)
            ax.annotate(r["key"], (r["speed"], r["fid"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhspan(min(floor), max(floor), color="0.85", label="real glyphs (noise floor)")
        ax.set(xlabel="speed-up over stock (denoiser call)", ylabel="FID (lower is better)",
               title=f"glyph {study.part}: speed vs FID (star: stock)")
        path = stem.with_name(stem.name + "_speed_fid.png")
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("sit", "unet", "curves"), nargs="+", default=["sit", "unet", "curves"])
    parser.add_argument("--models", default=None, help="exported models folder (default: the shipped ones)")
    parser.add_argument("--num", type=positive_int, default=720, help="samples a row (a multiple of 36)")
    parser.add_argument("--rows", nargs="*", default=None, help="configuration names to run (default: all)")
    parser.add_argument("--distill-minutes", type=non_negative_float, default=10.0,
                        help="fine-tune budget of a distilled row (0: training-free rows only)")
    parser.add_argument("--curve-minutes", type=non_negative_float, nargs="+", default=list(CURVE_MINUTES),
                        help="fine-tune minutes at which the curves are evaluated (0: training-free)")
    parser.add_argument("--distill-batch", type=positive_int, default=16)
    parser.add_argument("--latents", choices=("data", "trajectory"), default="data",
                        help="fine-tune inputs: the training glyphs noised, or the stock model's own guided runs")
    parser.add_argument("--trajectory-runs", type=positive_int, default=12,
                        help="--latents trajectory: sampling runs of --distill-batch glyphs recorded")
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--inherited-lr", type=non_negative_float, default=1e-4)
    parser.add_argument("--inherited", choices=INHERITED_SCOPES, default=ADDED_DEFAULTS["inherited"],
                        help="pretrained weights the fine-tune trains at --inherited-lr: the method's (its patched "
                             "layers' projections) or every weight of the SiT")
    parser.add_argument("--uncond-prob", type=non_negative_float, default=ADDED_DEFAULTS["uncond_prob"],
                        help="share of fine-tune samples drawn with the null class (guided sampling calls "
                             "both: 0.5)")
    parser.add_argument("--guided-loss", type=positive_float, default=ADDED_DEFAULTS["guided_loss"], metavar="SCALE",
                        help="fine-tunes also distil the guided output at this scale (the SiT samples at 4), each "
                             "glyph paired with its null-class twin (DistillConfig.guided_loss)")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default=ADDED_DEFAULTS["mixed_precision"],
                        help="autocast of the fine-tunes (bf16 uses the CPU's bf16 units: more steps a minute)")
    parser.add_argument("--ema-decay", type=non_negative_float, default=ADDED_DEFAULTS["ema_decay"],
                        help="fine-tunes keep an EMA of the trained weights and are evaluated with it (0: none)")
    parser.add_argument("--batch", type=positive_int, default=16, help="timing: images per denoiser call (x 2 with guidance)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timing: round-robin rounds")
    parser.add_argument("--floor-draws", type=positive_int, default=5,
                        help="draws of --num real glyphs for the FID noise floor")
    parser.add_argument("--cache", default="lab_runs/glyph_lab_cache", help="finished rows and fine-tunes (resume)")
    parser.add_argument("--no-cache", action="store_true", help="recompute everything, keep nothing")
    parser.add_argument("--cached-only", action="store_true",
                        help="write the tables of the rows already finished (a stopped study), train and sample nothing")
    harness.add_warmup_argument(parser)
    harness.add_output_argument(parser, harness.RESULTS / "glyph_lab")
    harness.add_quick_argument(parser, "36 samples in 2 steps, 0.05-minute fine-tunes, timing at batch 2, 1 round")
    args = harness.apply_quick(parser, parser.parse_args(argv), num=36, distill_minutes=0.05, distill_batch=4,
                               batch=2, repeats=1, floor_draws=2, curve_minutes=[0, 0.05])
    if args.num % NUM_CLASSES:
        parser.error(f"--num must be a multiple of {NUM_CLASSES}")
    if args.cached_only and args.no_cache:
        parser.error("--cached-only reads the cache that --no-cache turns off: give one of them")
    if args.guided_loss is not None and args.uncond_prob != ADDED_DEFAULTS["uncond_prob"]:
        parser.error("--guided-loss draws half of each batch on the null class: give no --uncond-prob")
    try:
        finetune_config(args)
    except ValueError as err:
        parser.error(f"the fine-tune's settings: {err}")
    torch.set_num_threads(os.cpu_count() or 1)
    glyphs = load_glyphs()
    train = glyphs.split(held_out=False)
    classifier = lab.load_classifier(args.models)
    try:
        reference = lab.reference_statistics(args.models)
    except FileNotFoundError:                # a models folder exported without statistics (tests): compute them
        reference = None
    if reference is None and args.quick:
        print(f"no reference statistics in {args.models}: --quick scores against the first {NUM_CLASSES} glyphs")
    cache = RowCache(None if args.no_cache else args.cache)
    scorer = Scorer((glyphs.images[:NUM_CLASSES] if args.quick else glyphs.images) if reference is None else None,
                    reference_statistics=reference, cache=cache)
    floor = scorer.noise_floor(glyphs.images, glyphs.labels, args.num, args.floor_draws, cache)
    with tempfile.TemporaryDirectory() as scratch:
        for part in args.part:
            study = Study(args, part, scorer, classifier, train)
            {"sit": run_sit, "unet": run_unet, "curves": run_curves}[part](study, Path(scratch))
            if part != "curves":
                study.time_all()
            write_tables(study, argv, floor)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
