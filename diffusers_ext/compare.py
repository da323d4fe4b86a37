r"""`diffusers-ext compare`: the stock and the patched pipeline from the same seed, side by side.

    diffusers-ext compare                                  # offline: the shipped glyph UNet, ToDo
    diffusers-ext compare --model digits                   # the shipped digits SiT, mediators
    diffusers-ext compare --model tiny:sd                  # an embedded tiny SD pipeline, agent attention
    diffusers-ext compare --model runwayml/stable-diffusion-v1-5 --method agent --steps 50 \
        --prompt "a photo of an astronaut riding a horse" --option agent_steps="(0.0, 0.4)"

Prints the denoiser's time per step for both runs and their ratio, the deviation of the patched
image from the stock one, and writes the two images side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .argtypes import finite_float, positive_int
from .families import families, family_of, find_denoiser
from .loading import EMBEDDED, SHIPPED_MODELS, embedded_method
from .pipeline_io import DenoiserTimer, call_kwargs, check_conditions, default_class_labels, images_of, recipe
from .registry import all_methods, parse_options, split_option_pairs
from .steps import partial_run

DEFAULT_MODEL = "glyphs-unet"   # the lab UNet with ToDo: a speed-up at stock quality (docs/lab.md)
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
DEFAULT_STEPS = 20   # for models without a recipe (`pipeline_io.recipe`)


@dataclass
class RunResult:
    label: str
    seconds_per_step: float
    total_seconds: float
    image: np.ndarray  # (H, W, 3) float in [0, 1]; frames side by side for video pipelines
    images: list[np.ndarray] | None = None  # every output of the batch (images[0] is `image`)


def default_method(pipe) -> str:
    """The default method of the pipeline's model family (`Family.default_method`)."""
    return family_of(find_denoiser(pipe)[0]).default_method


def run_once(pipe, label: str, kwargs: dict, denoiser: torch.nn.Module, on_forward=None) -> RunResult:
    start = time.perf_counter()
    with DenoiserTimer(denoiser, on_forward) as timer:
        output = pipe(**kwargs)
    total = time.perf_counter() - start
    images = images_of(output)
    return RunResult(label, timer.mean, total, images[0], images)


def side_by_side(left: RunResult, right: RunResult) -> "PIL.Image.Image":  # noqa: F821
    from PIL import Image, ImageDraw

    tiles = []
    for result in (left, right):
        row = np.concatenate(result.images or [result.image], axis=1)   # the whole batch in a row
        array = (np.clip(row, 0, 1) * 255).round().astype(np.uint8)
        tile = Image.fromarray(array)
        scale = max(1, min(256 // max(tile.height, 1), 2048 // max(tile.width, 1)))   # small images: enlarged
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
        canvas = Image.new("RGB", (tile.width, tile.height + 22), "white")
        canvas.paste(tile, (0, 22))
        ImageDraw.Draw(canvas).text((4, 4), f"{result.label}: {result.seconds_per_step * 1000:.1f} ms/step",
                                    fill="black")
        tiles.append(canvas)
    out = Image.new("RGB", (tiles[0].width + tiles[1].width + 8, max(t.height for t in tiles)), "white")
    out.paste(tiles[0], (0, 0))
    out.paste(tiles[1], (tiles[0].width + 8, 0))
    return out


@dataclass
class Comparison:
    """Both runs of `compare_pipeline` and the summary that `compare` prints."""

    stock: RunResult
    patched: RunResult
    summary: dict


def compare_pipeline(pipe, method: str, options: dict | None, kwargs: dict, *, warmup: bool = True,
                     progress=None) -> Comparison:
    """Run `pipe(**kwargs)` stock and patched with `method` from the same seed (kwargs["generator"]'s).

    warmup: one-step runs of both first, so one-time costs (allocation, kernel selection) hit neither timing.
    progress: called as progress(done, total, phase) after every denoiser forward; `total` counts one
        forward per step (pipelines that call the denoiser more often report done > total).
    The patch is validated before any work and the pipeline is stock again on return (even on error).
    """
    import diffusers_ext as dx

    options = dict(options or {})
    denoiser, _ = find_denoiser(pipe)
    seed = kwargs["generator"].initial_seed()
    steps = kwargs["num_inference_steps"]
    dx.patch(pipe, method, **options)  # bad options / unsupported model fail here, before any work
    dx.unpatch(pipe)

    total = 2 * steps + (2 if warmup else 0)
    done = [0]

    def counted(phase: str):
        if progress is None:
            return None

        def on_forward():
            done[0] += 1
            progress(done[0], total, phase)

        return on_forward

    def fresh(**extra) -> dict:
        return {**kwargs, **extra, "generator": torch.Generator("cpu").manual_seed(seed)}

    if warmup:
        pipe.set_progress_bar_config(disable=progress is not None, desc="warm-up")   # progress from the start
        for patched in (False, True):
            with dx.patched(pipe, method, **options) if patched else contextlib.nullcontext(), partial_run():
                run_once(pipe, "warm-up", fresh(num_inference_steps=1), denoiser, counted("warm-up"))
    pipe.set_progress_bar_config(disable=progress is not None, desc="stock")
    stock = run_once(pipe, "stock", fresh(), denoiser, counted("stock"))
    pipe.set_progress_bar_config(disable=progress is not None, desc=method)
    with dx.patched(pipe, method, **options):
        fast = run_once(pipe, method, fresh(), denoiser, counted(method))

    difference = fast.image.astype(np.float64) - stock.image.astype(np.float64)
    summary = {
        "pipeline": type(pipe).__name__, "method": method, "options": options,
        "steps": steps, "stock_ms_per_step": stock.seconds_per_step * 1000,
        "patched_ms_per_step": fast.seconds_per_step * 1000,
        "speedup": stock.seconds_per_step / fast.seconds_per_step,
        "image_rel_l2": float(np.linalg.norm(difference) / max(np.linalg.norm(stock.image), 1e-12)),
        "image_max_abs": float(np.abs(difference).max()),
        "stock_total_s": stock.total_seconds, "patched_total_s": fast.total_seconds,
    }
    return Comparison(stock, fast, summary)


def compare(model: str = DEFAULT_MODEL, method: str | None = None, options: dict | list[str] | None = None,
            prompt: str | None = None, class_label: int | None = None, steps: int | None = None,
            guidance: float | None = None, height: int | None = None, width: int | None = None, seed: int = 0,
            out: str | None = None, dtype: str = "auto", device: str = "auto", warmup: bool = True,
            json_out: str | None = None) -> dict:
    """Generate with the stock and the patched pipeline; returns a summary dict (and writes `out`,
    and the summary as JSON to `json_out`).

    method None: an embedded model's (`loading.embedded_method`: ToDo for the default, the lab UNet), else
    the model family's default (`Family.default_method`); prompt None: `DEFAULT_PROMPT`
    for text models (a prompt for a class-conditional model is an error, as a class label for a text
    model); class_label None: `default_class_labels`; steps / guidance None: the model's recipe
    (`pipeline_io.recipe`), else `DEFAULT_STEPS` and the pipeline's guidance. options: typed values,
    or `--option` texts (["key=value", ...], read by each option's kind once the method is known).
    """
    from .files import atomic_write_text, check_writable
    from .loading import load_pipeline, resolve_device

    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    texts = split_option_pairs(options) if isinstance(options, list) else None   # syntax errors before loading
    if method is not None and texts is not None:
        parse_options(texts, method)                                  # unknown names before loading
    for flag, path in (("--out", out), ("--json", json_out)):
        if path is not None:
            check_writable(path, flag)                                # before any work, naming the real path
    resolve_device(device)
    pipe = load_pipeline(model, dtype=dtype, device=device)
    check_conditions(pipe, prompt="--prompt" if prompt is not None else None,
                     class_label="--class-label" if class_label is not None else None)
    method = method or embedded_method(model) or default_method(pipe)
    if texts is not None:
        options = parse_options(texts, method)
    labels = default_class_labels(pipe) if class_label is None else class_label
    recommended = recipe(pipe)   # what the call is not given: the model's recipe
    steps = steps or recommended.pop("num_inference_steps", DEFAULT_STEPS)
    guidance = recommended.pop("guidance_scale", guidance) if guidance is None else guidance
    recommended = {k: v for k, v in recommended.items() if k not in ("num_inference_steps", "guidance_scale")}
    kwargs = {**recommended, **call_kwargs(pipe, DEFAULT_PROMPT if prompt is None else prompt, labels, steps,
                                           guidance, height, width, seed)}
    result = compare_pipeline(pipe, method, options, kwargs, warmup=warmup)
    summary = {"model": model, **result.summary}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        side_by_side(result.stock, result.patched).save(out)
        summary["image"] = str(out)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(summary, indent=2))
    return summary


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="stock vs patched pipeline from one seed: time per step, ratio, side-by-side image",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id, local pipeline folder, an embedded model ({', '.join(EMBEDDED)}) or "
                             f"tiny:<family> (default {DEFAULT_MODEL}, the lab's glyph UNet, offline)")
    parser.add_argument("--method", default=None, choices=list(all_methods()),
                        help="default: the embedded model's own ("
                             + ", ".join(f"{name} {m.method}" for name, m in SHIPPED_MODELS.items() if m.method)
                             + "), else per model family: "
                             + ", ".join(f"{f.name} {f.default_method}" for f in families().values()))
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="method option, repeatable; each read by its kind (`diffusers-ext methods` lists them)")
    parser.add_argument("--prompt", default=None,
                        help=f"text-to-image pipelines (default {DEFAULT_PROMPT!r}); an error for class-conditional ones")
    parser.add_argument("--class-label", type=int, default=None,
                        help="class for class-conditional pipelines (default: the model's showcase, e.g. "
                             "'DIFFUSERS' for the glyph models, every digit once for the digits model, 207 for "
                             "ImageNet ones); an error for text-to-image ones")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="denoising steps (default: the model's recipe, e.g. 25 for glyphs-unet; "
                             f"else {DEFAULT_STEPS})")
    parser.add_argument("--guidance-scale", type=finite_float, default=None)
    parser.add_argument("--height", type=positive_int, default=None)
    parser.add_argument("--width", type=positive_int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the one-step warm-up runs")
    parser.add_argument("--out", default="outputs/compare.png", help="side-by-side image to write")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the summary as JSON here")
    parser.set_defaults(func=_main)

    methods = subparsers.add_parser("methods", help="list the methods, their model families and options")
    methods.add_argument("--markdown", action="store_true", help="print each method's option table in markdown")
    methods.set_defaults(func=_list_methods)


def _main(args) -> int:
    summary = compare(
        args.model, args.method, list(args.option or []), args.prompt, args.class_label, args.steps,
        args.guidance_scale, args.height, args.width, args.seed, args.out, args.dtype, args.device, args.warmup,
        json_out=args.json_out,
    )
    print(
        f"{summary['pipeline']} ({summary['model']}), {summary['steps']} steps: "
        f"stock {summary['stock_ms_per_step']:.1f} ms/step | {summary['method']} "
        f"{summary['patched_ms_per_step']:.1f} ms/step | speed-up {summary['speedup']:.2f}x | "
        f"image rel. L2 difference {summary['image_rel_l2']:.4f}"
    )
    print(f"side-by-side image: {summary['image']}")
    return 0


def _list_methods(args) -> int:
    from .registry import options_markdown

    for name, spec in all_methods().items():
        kind = "training-free" if spec.training_free else "needs a short fine-tune"
        if args.markdown:
            print(f"### `{name}`\n\n{spec.description} ({kind}; families: {', '.join(spec.families)})\n")
            print(options_markdown(name) + "\n")
            continue
        print(f"{name}: {spec.description} [{kind}; families: {', '.join(spec.families)}]")
        for option in spec.options:
            print(f"    {option.name} = {option.default!r} ({option.check.describe()}): {option.doc}")
    return 0
