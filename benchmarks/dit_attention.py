"""One denoising step of the DiT-XL/2 architecture (random weights): stock attention vs mediators
(several counts, trained-like non-zero biases, the dynamic schedule averaged over a 250-step run),
VCA, and LINA / T^5 where registered; wall-clock ratios in one run, plus FLOPs.

    .venv/bin/python benchmarks/dit_attention.py --layers 2 --resolutions 256 512 1024 --repeats 3

DiT-XL/2: 28 layers, 16 heads x 72, patch 2, 4 -> 8 channels; latent = resolution / 8; batch 2 (cfg).
Timing uses `--layers` blocks (the other 26 are identical); ratios are per step of that model, in
which every block has the same ratio, so they are the per-layer ratios of the full model up to the
(tiny) embedding and final layer. FLOPs are counted with torch's FlopCounterMode on 1- and 2-block
models and extrapolated to 28 blocks (and to SiT-B/2, the paper's FLOP setting: 12 blocks, 12 x 64).
Variants are timed round-robin (repeats rounds of every variant), median per variant.
Writes benchmarks/results/dit_attention.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import diffusers_ext as dx

XL = dict(num_attention_heads=16, attention_head_dim=72)
B2 = dict(num_attention_heads=12, attention_head_dim=64)
STEPS = 250
DYNAMIC = ((16, 64), 0.5)      # counts, switch: 16 for the first half of the run, 64 after


def build(size: dict, layers: int, resolution: int):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**size, num_layers=layers, patch_size=2, in_channels=4, out_channels=8,
                                  sample_size=resolution // 8, norm_type="ada_norm_zero",
                                  norm_elementwise_affine=False, num_embeds_ada_norm=1000)
    return model.eval()


def inputs(resolution: int, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    latent = resolution // 8
    return dict(hidden_states=torch.randn(batch, 4, latent, latent, generator=g),
                timestep=torch.full((batch,), 500, dtype=torch.long),
                class_labels=torch.tensor([1, 1000] * (batch // 2)))


def variants(num_tokens: int):
    """name -> (method, options, trained) ; trained: fill the new parameters with random values."""
    out = {"stock": (None, {}, False)}
    for count in (16, 64, 256):
        if count * 4 <= num_tokens:
            out[f"mediators n={count}"] = ("mediator", dict(mediators=count), False)
    out["mediators n=64, trained biases+DWC"] = ("mediator", dict(mediators=64), True)
    out["VCA n=64 (trained-like)"] = ("vca", dict(tokens=64), True)
    methods = {m["name"]: m for m in dx.methods()}
    for name in ("lina", "t5"):
        if name in methods and "dit" in methods[name]["families"]:
            out[name.upper() if name == "lina" else "T^5"] = (name, {}, True)
    return out


def apply(model, method, options, trained, resolution):
    if method is None:
        return
    dx.patch(model, method, **options)
    if trained:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".processor." in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
    record = dx.patch_record(model)
    record.state.latent_hw = (resolution // 8, resolution // 8)


def flops(model, x) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the math backend decomposes attention into counted matmuls (the fused CPU kernel is not counted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**x)
    return counter.get_total_flops()


def full_depth_flops(size, resolution, method, options, trained, depth):
    """Count 1- and 2-block models, extrapolate to `depth` blocks (batch 1, one image)."""
    x = inputs(resolution, batch=2)
    x = {k: v[:1] for k, v in x.items()}
    counts = []
    for layers in (1, 2):
        model = build(size, layers, resolution)
        apply(model, method, options, trained, resolution)
        counts.append(flops(model, x))
    per_layer = counts[1] - counts[0]
    return counts[0] + (depth - 1) * per_layer


def timed(model, x) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(**x)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "dit_attention.md"))
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    rows, flop_rows = [], []
    for resolution in args.resolutions:
        num_tokens = (resolution // 16) ** 2
        table = variants(num_tokens)
        models = {}
        for name, (method, options, trained) in table.items():
            model = build(XL, args.layers, resolution)
            apply(model, method, options, trained, resolution)
            models[name] = model
        x = inputs(resolution)
        for model in models.values():            # warm-up
            timed(model, x)
        times = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                times[name].append(timed(model, x))
            print(resolution, {k: round(statistics.median(v), 3) for k, v in times.items()}, flush=True)
        median = {k: statistics.median(v) for k, v in times.items()}
        (small, large), switch = DYNAMIC
        if f"mediators n={small}" in median and f"mediators n={large}" in median:
            steps_small = round(switch * STEPS)
            median[f"dynamic {small}->{large} @{switch} (avg over {STEPS} steps)"] = (
                steps_small * median[f"mediators n={small}"] + (STEPS - steps_small) * median[f"mediators n={large}"]
            ) / STEPS
        stock = median["stock"]
        for name, seconds in median.items():
            rows.append((resolution, num_tokens, name, seconds, stock / seconds))
        del models

        # FLOPs at full depth (XL/2: 28 blocks; B/2: 12 blocks), one image
        for label, size, depth in (("DiT-XL/2", XL, 28), ("SiT-B/2", B2, 12)):
            base = full_depth_flops(size, resolution, None, {}, False, depth)
            for name, (method, options, trained) in table.items():
                if label == "SiT-B/2" and method not in (None, "mediator"):
                    continue
                f = base if method is None else full_depth_flops(size, resolution, method, options, trained, depth)
                flop_rows.append((label, resolution, name, f, 1 - f / base))

    cpu = platform.processor() or platform.machine()
    lines = [
        "# DiT-XL/2 one denoising step: stock vs mediators vs VCA (random weights)", "",
        f"Command: `.venv/bin/python benchmarks/dit_attention.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        f"Machine: {cpu}, {os.cpu_count()} CPU threads visible, torch {torch.__version__}, fp32, CPU, "
        f"no GPU; batch 2 (cfg); {args.layers} of the 28 DiT-XL/2 blocks timed (every block has the same "
        f"ratio); median of {args.repeats} round-robin repeats after a warm-up. Load average at the "
        f"start: {os.getloadavg()[0]:.1f}; the ratios come from one interleaved run.", "",
        "speed-up = stock seconds / variant seconds (> 1 is faster). 'trained' variants have random "
        "non-zero new parameters (biases / DWC / embeddings), the cost of a fine-tuned model; the "
        "untrained mediator patch skips zero biases and the zero DWC.", "",
        "| resolution | tokens | variant | seconds / step | speed-up |", "|---|---|---|---|---|",
    ]
    lines += [f"| {r}^2 | {n} | {name} | {s:.3f} | {ratio:.2f}x |" for r, n, name, s, ratio in rows]
    lines += ["", "## FLOPs (FlopCounterMode, one image, extrapolated to full depth)", "",
              "| model | resolution | variant | GFLOPs | saving vs stock |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {r}^2 | {name} | {f / 1e9:.1f} | {saving * 100:.1f} % |" for m, r, name, f, saving in flop_rows]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
