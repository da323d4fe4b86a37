"""T^5 speed and memory on the SD3.5-medium transformer architecture (random weights).

Part 1 - one denoising step (one transformer forward, batch 1, 333 text tokens) at 1024^2 and 2048^2:
stock joint attention against T^5 (text queries by softmax, the default, and by TTT). Each variant
runs in its own subprocess (peak memory = what the forward adds above the weights and inputs:
harness.PeakMemory); in each, `--repeats` timed forwards after `--warmup` untimed ones; `--rounds`
rounds interleave the variants' subprocesses; times are the median of all timed forwards with
[min, max] (benchmarks/harness.py), all variants in this one run. On the CPU the model has
`--layers` blocks (the first one dual-attention, as layers 0..12 of SD3.5-medium); per-block forward
times are measured with hooks (harness.BlockTimer) and extrapolated to the full 24 blocks
(13 dual-attention + 11 plain) plus the measured embedding / final-layer time, forward by forward.
Part 2 - the attention core alone (what replaces SDPA: key instance norm, the two grid convs, the
inner step and read-out) against SDPA at N = 1K..64K image tokens, h = `--core-heads` heads of
d = 64 (the ratio does not depend on h), `--repeats` interleaved rounds after `--warmup`.

    python benchmarks/t5_speed.py                     # CPU: 2 blocks, fp32
    python benchmarks/t5_speed.py --layers 24 --dtype bfloat16   # a GPU
    python benchmarks/t5_speed.py --quick             # smoke test: a narrow 1-block model, 256^2, 1K tokens
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import harness

SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# --quick: the same architecture, 2 heads of 32 and narrow text inputs (pos_embed_max_size 384 alone is 0.9 GB)
SD35_NARROW = dict(SD35_MEDIUM, num_attention_heads=2, attention_head_dim=32, caption_projection_dim=64,
                   joint_attention_dim=64, pooled_projection_dim=32, pos_embed_max_size=64)
TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens
VARIANTS = {"stock": None, "t5": {"text_tokens": "softmax"}, "t5-text-ttt": {"text_tokens": "ttt"}}


def default_warmup(cuda: bool) -> int:
    return 1 if cuda else 0  # the CPU has no kernels to warm up; a 2048^2 pass is minutes


def block_kinds(model) -> tuple[list[int], list[int]]:
    """Indices of the dual-attention and of the plain blocks."""
    dual = [i for i, b in enumerate(model.transformer_blocks) if getattr(b, "attn2", None) is not None]
    return dual, [i for i in range(len(model.transformer_blocks)) if i not in dual]


def step_result(timing: harness.Timing, blocks: harness.BlockTimer, warmup: int, model) -> dict:
    """What a step child reports, one value per timed forward: total, rest (embeddings and final layer), the
    mean dual-attention and plain block (None without such blocks); and the largest forward peak."""
    dual, plain = block_kinds(model)
    return {"total": timing.seconds, "rest": [t - b for t, b in zip(timing.seconds, blocks.per_call(warmup))],
            "dual": blocks.per_call(warmup, dual, statistics.mean) if dual else None,
            "plain": blocks.per_call(warmup, plain, statistics.mean) if plain else None,
            "peak_bytes": timing.peak_bytes}


def child_step(variant: str, resolution: int, layers: int, dtype: torch.dtype, device: torch.device, repeats: int,
               warmup: int, quick: bool = False):
    from diffusers import SD3Transformer2DModel

    import diffusers_ext as dx

    torch.manual_seed(0)
    base = SD35_NARROW if quick else SD35_MEDIUM
    config = dict(base, num_layers=layers, dual_attention_layers=tuple(range(min(13, max(1, layers // 2)))))
    if layers < 24:
        config["dual_attention_layers"] = (0,)
    model = SD3Transformer2DModel(**config).to(device, dtype).eval()
    if VARIANTS[variant] is not None:
        dx.patch(model, "t5", **VARIANTS[variant])
    side = resolution // 8
    x = torch.randn(1, 16, side, side, device=device, dtype=dtype)
    text = torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"], device=device, dtype=dtype)
    pooled = torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)

    def forward():
        return model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t)

    with torch.no_grad(), harness.BlockTimer(model.transformer_blocks, device) as blocks:
        timing = harness.interleaved({variant: forward}, repeats, warmup, device=device, memory=True,
                                     label=f"{resolution}^2 ")[variant]
    return step_result(timing, blocks, warmup, model)


def child_core(num_tokens: int, heads: int, dtype: torch.dtype, device: torch.device, repeats: int, warmup: int):
    from diffusers_ext.ops import GridDepthwiseConv, key_instance_norm, sdpa, ttt_attention

    torch.manual_seed(0)
    side = int(num_tokens**0.5)
    grid = (side, num_tokens // side)
    d = 64
    q, k, v = (torch.randn(1, heads, num_tokens, d, device=device, dtype=dtype) for _ in range(3))
    w1, w2 = (0.02 * torch.randn(heads, d, d, device=device, dtype=dtype) for _ in range(2))
    q_conv = GridDepthwiseConv(heads * d).to(device, dtype)
    k_conv = GridDepthwiseConv(heads * d).to(device, dtype)

    def local(conv, x):
        merged = x.transpose(1, 2).reshape(1, num_tokens, heads * d)
        return x + conv(merged, grid).view(1, num_tokens, heads, d).transpose(1, 2)

    def t5():
        return ttt_attention(local(q_conv, q), local(k_conv, key_instance_norm(k)), v, w1, w2, d**-0.5)

    def soft():
        return sdpa(q, k, v, d**-0.5)

    with torch.no_grad():
        timings = harness.interleaved({"sdpa": soft, "t5": t5}, repeats, warmup, device=device,
                                      label=f"{num_tokens} tokens ")
    return {name: t.seconds for name, t in timings.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: 2 on CPU, 24 on GPU)")
    parser.add_argument("--resolutions", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed forwards per subprocess / timed rounds of the core (default: 10 GPU, 1 CPU)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the step variants' subprocesses")
    harness.add_warmup_argument(parser, None, "default: 1 on GPU, 0 on CPU")
    parser.add_argument("--core-tokens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--core-heads", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a shared machine more threads made timings erratic)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    harness.add_output_argument(parser, harness.RESULTS / "t5_speed.md")
    harness.add_quick_argument(parser, "a narrow 1-block SD3.5 at 256^2, the core at 1024 tokens with 1 head")
    args = harness.apply_quick(parser, parser.parse_args(argv), layers=1, resolutions=[256], core_tokens=[1024],
                               core_heads=1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    layers = args.layers or (24 if cuda else 2)
    repeats = args.repeats or (10 if cuda else 1)
    warmup = args.warmup if args.warmup is not None else default_warmup(cuda)
    heads = args.core_heads or (24 if cuda else 2)
    if not cuda:
        torch.set_num_threads(args.threads)

    if args.child:
        kind, *rest = args.child
        if kind == "step":
            result = child_step(rest[0], int(rest[1]), layers, dtype, device, repeats, warmup, args.quick)
        else:
            result = child_core(int(rest[0]), heads, dtype, device, repeats, warmup)
        print(json.dumps(result))
        return

    common = ["--threads", str(args.threads), "--layers", str(layers), "--dtype", str(dtype).replace("torch.", ""),
              "--repeats", str(repeats), "--warmup", str(warmup), "--core-heads", str(heads),
              *(["--quick"] if args.quick else [])]
    lines = harness.header(
        "T^5 speed: SD3.5-medium transformer (random weights)", __file__, argv=argv, device=device, dtype=dtype,
        statistic=harness.statistic(args.rounds, warmup, repeats),
        extra=[f"Batch 1, {TEXT_TOKENS} text tokens" + (", a narrow model (2 heads x 32, --quick)" if args.quick else "")
               + "; compare ratios within this run.",
               "", f"## One denoising step (transformer forward), {layers} blocks measured"])
    if layers < 24:
        lines += ["Full 24-block time extrapolated from the measured per-block times, forward by forward: "
                  "embeddings/final layer + 13 x dual-attention block + 11 x plain block.", ""]
    rows = []
    for resolution in args.resolutions:
        calls = {v: {"total": [], "rest": [], "dual": [], "plain": [], "peak_bytes": 0} for v in VARIANTS}
        for _, variant in harness.schedule(list(VARIANTS), args.rounds):
            r = harness.run_child(__file__, ["--child", "step", variant, str(resolution), *common])
            pooled = calls[variant]
            for key in ("total", "rest", "dual"):
                pooled[key] += r[key]
            pooled["plain"] += r["plain"] if r["plain"] is not None else r["dual"]  # 1 block: the dual stands in
            pooled["peak_bytes"] = max(pooled["peak_bytes"], r["peak_bytes"])
        results = {}
        for name, c in calls.items():
            full = ([rest + 13 * dual + 11 * plain for rest, dual, plain in zip(c["rest"], c["dual"], c["plain"])]
                    if layers < 24 else c["total"])
            results[name] = {key: harness.Timing(name, values) for key, values in
                             (("total", c["total"]), ("dual", c["dual"]), ("plain", c["plain"]), ("full", full))}
            results[name]["peak_bytes"] = c["peak_bytes"]
        base = results["stock"]
        for name, r in results.items():
            tokens = (resolution // 16) ** 2
            rows.append([f"{resolution}^2", tokens, name, r["total"].cell(), r["dual"].cell(), r["plain"].cell(),
                         r["full"].cell(), f"{r['full'].speedup_over(base['full']):.2f}x",
                         f"{r['dual'].speedup_over(base['dual']):.2f}x / {r['plain'].speedup_over(base['plain']):.2f}x",
                         f"{r['peak_bytes'] / 2**30:.2f}"])
            print(rows[-1], flush=True)
    lines += harness.markdown_table(
        ["resolution", "image tokens", "variant", "measured forward s", "dual block s", "plain block s",
         "24-block est. s", "speed-up (24 blocks)", "per-block speed-up (dual / plain)",
         "forward peak (above weights) GiB"], rows)
    lines += ["", f"## Attention core alone: T^5 (key norm + grid convs + inner step + read-out) vs SDPA, "
              f"{heads} heads x 64, {repeats} interleaved round(s) after {warmup} warm-up", ""]
    rows = []
    for tokens in args.core_tokens:
        r = harness.run_child(__file__, ["--child", "core", str(tokens), *common])
        sdpa, t5 = harness.Timing("sdpa", r["sdpa"]), harness.Timing("t5", r["t5"])
        rows.append([tokens, sdpa.cell(".4f"), t5.cell(".4f"), f"{t5.speedup_over(sdpa):.1f}x"])
        print(rows[-1], flush=True)
    lines += harness.markdown_table(["N tokens", "SDPA s", "T^5 s", "speed-up"], rows)
    output = harness.write_atomic(harness.output_path(args, ".md"), "\n".join(lines) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
