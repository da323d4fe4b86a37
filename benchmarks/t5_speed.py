"""T^5 speed and memory on the SD3.5-medium transformer architecture (random weights).

Part 1 - one denoising step (one transformer forward, batch 1, 333 text tokens) at 1024^2 and 2048^2:
stock joint attention against T^5 (text queries by softmax, the default, and by TTT). Each variant
runs in its own subprocess (peak memory = that process's peak RSS on CPU, torch's peak allocation on
CUDA); times are the median of `--repeats` after one warm-up, all variants in this one run. On the
CPU the model has `--layers` blocks (the first one dual-attention, as layers 0..12 of SD3.5-medium);
per-block forward times are measured with hooks and extrapolated to the full 24 blocks
(13 dual-attention + 11 plain) plus the measured embedding / final-layer time.
Part 2 - the attention core alone (what replaces SDPA: key instance norm, the two grid convs, the
inner step and read-out) against SDPA at N = 1K..64K image tokens, h = `--core-heads` heads of
d = 64 (the ratio does not depend on h).

    python benchmarks/t5_speed.py                     # CPU: 2 blocks, fp32
    python benchmarks/t5_speed.py --layers 24 --dtype bfloat16   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "t5_speed.md"
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens
WARMUP = 1 if torch.cuda.is_available() else 0  # the CPU has no kernels to warm up; a 2048^2 pass is minutes
VARIANTS = {"stock": None, "t5": {"text_tokens": "softmax"}, "t5-text-ttt": {"text_tokens": "ttt"}}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def child_step(variant: str, resolution: int, layers: int, dtype: torch.dtype, device: torch.device, repeats: int):
    from diffusers import SD3Transformer2DModel

    import diffusers_ext as dx

    torch.manual_seed(0)
    config = dict(SD35_MEDIUM, num_layers=layers, dual_attention_layers=tuple(range(min(13, max(1, layers // 2)))))
    if layers < 24:
        config["dual_attention_layers"] = (0,)
    model = SD3Transformer2DModel(**config).to(device, dtype).eval()
    if VARIANTS[variant] is not None:
        dx.patch(model, "t5", **VARIANTS[variant])
    side = resolution // 8
    x = torch.randn(1, 16, side, side, device=device, dtype=dtype)
    text = torch.randn(1, TEXT_TOKENS, 4096, device=device, dtype=dtype)
    pooled = torch.randn(1, 2048, device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)

    block_times: dict[int, list[float]] = {}
    starts = {}

    def pre(index):
        def hook(module, args, kwargs):
            _sync(device)
            starts[index] = time.perf_counter()
        return hook

    def post(index):
        def hook(module, args, kwargs, out):
            _sync(device)
            block_times.setdefault(index, []).append(time.perf_counter() - starts[index])
        return hook

    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_pre_hook(pre(i), with_kwargs=True)
        block.register_forward_hook(post(i), with_kwargs=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    totals = []
    with torch.no_grad():
        for r in range(repeats + WARMUP):
            _sync(device)
            start = time.perf_counter()
            model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t)
            _sync(device)
            totals.append(time.perf_counter() - start)
            if r < WARMUP:
                block_times.clear()
    totals = totals[WARMUP:]
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    blocks = {i: statistics.median(v) for i, v in block_times.items()}
    total = statistics.median(totals)
    dual = [blocks[i] for i, b in enumerate(model.transformer_blocks) if b.attn2 is not None]
    plain = [blocks[i] for i, b in enumerate(model.transformer_blocks) if b.attn2 is None]
    return {"total": total, "rest": total - sum(blocks.values()), "dual": statistics.mean(dual),
            "plain": statistics.mean(plain) if plain else None, "peak_bytes": peak}


def child_core(num_tokens: int, heads: int, dtype: torch.dtype, device: torch.device, repeats: int):
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

    out = {}
    with torch.no_grad():
        for name, fn in (("sdpa", soft), ("t5", t5)):
            times = []
            for r in range(repeats + WARMUP):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times.append(time.perf_counter() - start)
            out[name] = statistics.median(times[WARMUP:])
    return out


def run_child(args_list: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: 2 on CPU, 24 on GPU)")
    parser.add_argument("--resolutions", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--core-tokens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--core-heads", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a shared machine more threads made timings erratic)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    layers = args.layers or (24 if cuda else 2)
    repeats = args.repeats or (10 if cuda else 1)
    heads = args.core_heads or (24 if cuda else 2)
    if not cuda:
        torch.set_num_threads(args.threads)

    if args.child:
        kind, *rest = args.child
        if kind == "step":
            result = child_step(rest[0], int(rest[1]), layers, dtype, device, repeats)
        else:
            result = child_core(int(rest[0]), heads, dtype, device, repeats)
        print(json.dumps(result))
        return

    common = ["--threads", str(args.threads), "--layers", str(layers), "--dtype", str(dtype).replace("torch.", ""), "--repeats", str(repeats),
              "--core-heads", str(heads)]
    lines = [
        "# T^5 speed: SD3.5-medium transformer (random weights)", "",
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
        f"{torch.cuda.get_device_name() if cuda else 'CPU only'}, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, dtype {dtype}, batch 1, {TEXT_TOKENS} text tokens, "
        f"median of {repeats} after {WARMUP} warm-up; other jobs shared the machine, so compare ratios within this run.", "",
        f"## One denoising step (transformer forward), {layers} blocks measured", "",
    ]
    if layers < 24:
        lines += ["Full 24-block time extrapolated from the measured per-block times: embeddings/final layer + "
                  "13 x dual-attention block + 11 x plain block.", ""]
    lines += ["| resolution | image tokens | variant | measured forward s | dual block s | plain block s | "
              "24-block est. s | speed-up (24 blocks) | per-block speed-up (dual / plain) | peak memory GiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for resolution in args.resolutions:
        results = {v: run_child(["--child", "step", v, str(resolution), *common]) for v in VARIANTS}
        for name, r in results.items():
            plain = r["plain"] if r["plain"] is not None else r["dual"]
            r["full"] = r["rest"] + 13 * r["dual"] + 11 * plain if layers < 24 else r["total"]
            r["plain_or_dual"] = plain
        base = results["stock"]
        for name, r in results.items():
            tokens = (resolution // 16) ** 2
            lines.append(
                f"| {resolution}^2 | {tokens} | {name} | {r['total']:.2f} | {r['dual']:.2f} | "
                f"{r['plain_or_dual']:.2f} | {r['full']:.2f} | {base['full'] / r['full']:.2f}x | "
                f"{base['dual'] / r['dual']:.2f}x / {base['plain_or_dual'] / r['plain_or_dual']:.2f}x | "
                f"{r['peak_bytes'] / 2**30:.2f} |")
            print(lines[-1], flush=True)
    lines += ["", f"## Attention core alone: T^5 (key norm + grid convs + inner step + read-out) vs SDPA, "
              f"{heads} heads x 64", "", "| N tokens | SDPA s | T^5 s | speed-up |", "|---|---|---|---|"]
    for tokens in args.core_tokens:
        r = run_child(["--child", "core", str(tokens), *common])
        lines.append(f"| {tokens} | {r['sdpa']:.4f} | {r['t5']:.4f} | {r['sdpa'] / r['t5']:.1f}x |")
        print(lines[-1], flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
