"""One denoising step of the DiT-XL/2 architecture (random weights): stock attention vs mediators
(several counts, trained-like non-zero biases, the dynamic schedule averaged over a 250-step run),
VCA, and LINA / T^5 where registered; wall-clock ratios in one run, plus FLOPs.

    python benchmarks/dit_attention.py --layers 2 --resolutions 256 512 1024 --repeats 3
    python benchmarks/dit_attention.py --quick      # smoke test: 1 block at 256^2, 1 round

DiT-XL/2: 28 layers, 16 heads x 72, patch 2, 4 -> 8 channels; latent = resolution / 8; batch 2 (cfg).
Timing uses `--layers` blocks (the other 26 are identical); ratios are per step of that model, in
which every block has the same ratio, so they are the per-layer ratios of the full model up to the
(tiny) embedding and final layer. FLOPs are counted with torch's FlopCounterMode on 1- and 2-block
models and extrapolated to 28 blocks (and to SiT-B/2, the paper's FLOP setting: 12 blocks, 12 x 64).
Variants are timed with benchmarks/harness.py: `--warmup` untimed rounds, then `--repeats` round-robin
rounds of every variant; the median per variant with [min, max].
Writes benchmarks/results/dit_attention.md.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

import diffusers_ext as dx
import harness

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
                    p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p))  # .to: a GPU or half model
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=3, help="timed round-robin rounds")
    harness.add_warmup_argument(parser)
    harness.add_output_argument(parser, harness.RESULTS / "dit_attention.md")
    harness.add_quick_argument(parser, "1 block at 256^2, 1 round after 1 warm-up")
    args = harness.apply_quick(parser, parser.parse_args(argv), layers=1, resolutions=[256], repeats=1)
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
        calls = {name: (lambda model=model: model(**x)) for name, model in models.items()}
        timings = harness.interleaved(calls, args.repeats, args.warmup, label=f"{resolution}^2 ")
        (small, large), switch = DYNAMIC
        if f"mediators n={small}" in timings and f"mediators n={large}" in timings:
            steps_small = round(switch * STEPS)
            name = f"dynamic {small}->{large} @{switch} (avg over {STEPS} steps)"
            timings[name] = harness.weighted(name, [(timings[f"mediators n={small}"], steps_small / STEPS),
                                                    (timings[f"mediators n={large}"], (STEPS - steps_small) / STEPS)])
        stock = timings["stock"]
        for name, t in timings.items():
            rows.append([f"{resolution}^2", num_tokens, name, t.cell(".3f"), f"{t.speedup_over(stock):.2f}x"])
        del models, calls, timings

        # FLOPs at full depth (XL/2: 28 blocks; B/2: 12 blocks), one image
        for label, size, depth in (("DiT-XL/2", XL, 28), ("SiT-B/2", B2, 12)):
            base = full_depth_flops(size, resolution, None, {}, False, depth)
            for name, (method, options, trained) in table.items():
                if label == "SiT-B/2" and method not in (None, "mediator"):
                    continue
                f = base if method is None else full_depth_flops(size, resolution, method, options, trained, depth)
                flop_rows.append([label, f"{resolution}^2", name, f"{f / 1e9:.1f}", f"{(1 - f / base) * 100:.1f} %"])

    lines = harness.header(
        "DiT-XL/2 one denoising step: stock vs mediators vs VCA (random weights)", __file__, argv=argv,
        device="cpu", dtype=torch.float32, statistic=harness.statistic(args.repeats, args.warmup),
        extra=[f"Batch 2 (cfg); {args.layers} of the 28 DiT-XL/2 blocks timed (every block has the same ratio).", "",
               "speed-up = stock seconds / variant seconds (> 1 is faster). 'trained' variants have random "
               "non-zero new parameters (biases / DWC / embeddings), the cost of a fine-tuned model; the "
               "untrained mediator patch skips zero biases and the zero DWC. The dynamic row combines the "
               "n=16 and n=64 rows round by round."])
    lines += harness.markdown_table(["resolution", "tokens", "variant", "seconds / step", "speed-up"], rows)
    lines += ["", "## FLOPs (FlopCounterMode, one image, extrapolated to full depth)", ""]
    lines += harness.markdown_table(["model", "resolution", "variant", "GFLOPs", "saving vs stock"], flop_rows)
    harness.write_atomic(harness.output_path(args, ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
