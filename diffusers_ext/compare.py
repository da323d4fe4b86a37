"""`diffusers-ext compare`: the stock and the patched pipeline from the same seed, side by side.

    diffusers-ext compare                                  # offline: the shipped digits SiT, mediators
    diffusers-ext compare --model tiny:sd                  # an embedded tiny SD pipeline, agent attention
    diffusers-ext compare --model runwayml/stable-diffusion-v1-5 --method agent --steps 50 \
        --prompt "a photo of an astronaut riding a horse" --option agent_steps="(0.0, 0.4)"

Prints the denoiser's time per step for both runs and their ratio, the deviation of the patched
image from the stock one, and writes the two images side by side.
"""

from __future__ import annotations

import ast
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_MODEL = "digits"
# the method `compare` (and the app) use when none is named, per model family
DEFAULT_METHODS = {"sd": "agent", "sdxl": "agent", "animatediff": "anchor_frame", "dit": "mediator", "sd3": "t5"}
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"


def parse_options(pairs: list[str] | None) -> dict:
    """["k=v", ...] -> {k: literal_eval(v) or the string v} (the `--option` flags of every command)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option expects key=value, got {pair!r}")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return options


class DenoiserTimer:
    """Wall time of every denoiser forward (synchronised on CUDA); `on_forward()` is called after each."""

    def __init__(self, denoiser: torch.nn.Module, on_forward=None):
        self.denoiser, self.times, self._start, self.on_forward = denoiser, [], None, on_forward
        self._handles = [
            denoiser.register_forward_pre_hook(self._before),
            denoiser.register_forward_hook(self._after),
        ]

    def _sync(self):
        if next(self.denoiser.parameters()).is_cuda:
            torch.cuda.synchronize()

    def _before(self, module, args):
        self._sync()
        self._start = time.perf_counter()

    def _after(self, module, args, output):
        self._sync()
        self.times.append(time.perf_counter() - self._start)
        if self.on_forward is not None:
            self.on_forward()

    def close(self):
        for handle in self._handles:
            handle.remove()


@dataclass
class RunResult:
    label: str
    seconds_per_step: float
    total_seconds: float
    image: np.ndarray  # (H, W, 3) float in [0, 1]; frames side by side for video pipelines
    images: list[np.ndarray] | None = None  # every output of the batch (images[0] is `image`)


def default_method(pipe) -> str:
    """`DEFAULT_METHODS` of the pipeline's model family."""
    from diffusers_ext.families import family_of, find_denoiser

    return DEFAULT_METHODS[family_of(find_denoiser(pipe)[0]).name]


def default_class_labels(pipe) -> list[int]:
    """Every class once for small label sets (the digits), else ImageNet's 207 (golden retriever)."""
    from diffusers_ext.eval.sampling import infer_num_classes

    classes = infer_num_classes(pipe)
    return list(range(classes)) if classes is not None and classes <= 16 else [207]


def _call_kwargs(pipe, prompt: str, class_label: int | list[int], steps: int, guidance: float | None,
                 height: int | None, width: int | None, seed: int, batch_size: int = 1) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    kwargs = {"num_inference_steps": steps, "generator": torch.Generator("cpu").manual_seed(seed),
              "output_type": "np"}
    if "class_labels" in params:
        kwargs["class_labels"] = list(class_label) if isinstance(class_label, (list, tuple)) else [class_label] * batch_size
    else:
        kwargs["prompt"] = prompt
        if batch_size != 1:
            if "num_images_per_prompt" in params:
                kwargs["num_images_per_prompt"] = batch_size
            elif "num_videos_per_prompt" in params:
                kwargs["num_videos_per_prompt"] = batch_size
            else:
                raise ValueError(f"{type(pipe).__name__} does not take a batch size")
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            if name not in params:
                raise ValueError(f"{type(pipe).__name__} does not take --{name}")
            kwargs[name] = value
    return kwargs


def _images_of(output) -> list[np.ndarray]:
    """(H, W, 3) arrays in [0, 1]: each image (grey ones as RGB), or each video's frames side by side."""
    if hasattr(output, "images"):
        images = [np.asarray(image) for image in output.images]
        return [np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image for image in images]
    return [np.concatenate(list(np.asarray(video)), axis=1) for video in output.frames]  # (F, H, W, 3) each


def run_once(pipe, label: str, kwargs: dict, denoiser: torch.nn.Module, on_forward=None) -> RunResult:
    timer = DenoiserTimer(denoiser, on_forward)
    start = time.perf_counter()
    try:
        output = pipe(**kwargs)
    finally:
        timer.close()
    total = time.perf_counter() - start
    images = _images_of(output)
    return RunResult(label, float(np.mean(timer.times)) if timer.times else float("nan"), total, images[0], images)


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
    from diffusers_ext.families import find_denoiser

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

    pipe.set_progress_bar_config(disable=True)
    if warmup:
        for patched in (False, True):
            with dx.patched(pipe, method, **options) if patched else _nothing():
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


def compare(model: str = DEFAULT_MODEL, method: str | None = None, options: dict | None = None,
            prompt: str = DEFAULT_PROMPT, class_label: int | None = None, steps: int = 20, guidance: float | None = None,
            height: int | None = None, width: int | None = None, seed: int = 0, out: str | None = None,
            dtype: str = "auto", device: str = "auto", warmup: bool = True) -> dict:
    """Generate with the stock and the patched pipeline; returns a summary dict (and writes `out`).

    method None: the model family's default (`DEFAULT_METHODS`); class_label None: `default_class_labels`.
    """
    from diffusers_ext.loading import load_pipeline

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(model, dtype=dtype, device=device)
    method = method or default_method(pipe)
    labels = default_class_labels(pipe) if class_label is None else class_label
    kwargs = _call_kwargs(pipe, prompt, labels, steps, guidance, height, width, seed)
    result = compare_pipeline(pipe, method, options, kwargs, warmup=warmup)
    summary = {"model": model, **result.summary}
    if out is not None:
        side_by_side(result.stock, result.patched).save(out)
        summary["image"] = str(out)
    return summary


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="stock vs patched pipeline from one seed: time per step, ratio, side-by-side image",
        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id, local pipeline folder, digits or tiny:<family> (default {DEFAULT_MODEL}, "
                             "the shipped digits SiT, offline)")
    parser.add_argument("--method", default=None,
                        help="method name (see `diffusers-ext methods`); default per model family: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_METHODS.items()))
    parser.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option, repeatable")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--class-label", type=int, default=None,
                        help="class for class-conditional pipelines (default: every digit once for the digits "
                             "model, 207 for ImageNet ones)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the one-step warm-up runs")
    parser.add_argument("--out", default="outputs/compare.png", help="side-by-side image to write")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the summary as JSON here")
    parser.set_defaults(func=_main)

    methods = subparsers.add_parser("methods", help="list the methods, their model families and options")
    methods.set_defaults(func=_list_methods)


def _main(args) -> int:
    summary = compare(
        args.model, args.method, parse_options(args.option), args.prompt, args.class_label, args.steps,
        args.guidance_scale, args.height, args.width, args.seed, args.out, args.dtype, args.device, args.warmup,
    )
    print(
        f"{summary['pipeline']} ({summary['model']}), {summary['steps']} steps: "
        f"stock {summary['stock_ms_per_step']:.1f} ms/step | {summary['method']} "
        f"{summary['patched_ms_per_step']:.1f} ms/step | speed-up {summary['speedup']:.2f}x | "
        f"image rel. L2 difference {summary['image_rel_l2']:.4f}"
    )
    print(f"side-by-side image: {summary['image']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


def _list_methods(args) -> int:
    import diffusers_ext as dx

    for info in dx.methods():
        kind = "training-free" if info["training_free"] else "needs a short fine-tune"
        print(f"{info['name']}: {info['description']} [{kind}; families: {', '.join(info['families'])}]")
        for name, option in info["options"].items():
            print(f"    {name} = {option['default']!r}: {option['doc']}")
    return 0
