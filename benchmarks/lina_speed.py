"""LINA speed and memory against stock attention, with T^5 beside it in the same run (random weights).

    python benchmarks/lina_speed.py core [--core-tokens 1024 4096 16384 65536]   # attention core vs SDPA
    python benchmarks/lina_speed.py dit  [--resolutions 512]  [--layers 2]         # DiT-XL/2 denoising step
    python benchmarks/lina_speed.py sd35 [--resolutions 1024 2048] [--layers 1]    # SD3.5-medium step

core: what replaces SDPA in one attention layer, one head group (h = `--core-heads` heads of d = 64;
the ratio does not depend on h): SDPA; LINA (KV gate + division-normalised ReLU linear attention in
fp32 + 5x5 depthwise conv of the layer input on the grid); T^5 (key norm, two 3x3 convs, inner step,
read-out). Configurations interleaved, min of `--repeats`. Also the analytic FLOPs of the whole
attention module (projections included) at the paper's N = 5120.
dit / sd35: one denoiser forward, batch 1 (SD3.5: 333 text tokens), each variant in its own
subprocess, min of `--repeats` x `--rounds` (rounds interleave the variants); `--layers` blocks measured with hooks and extrapolated to the full
depth (DiT-XL/2: 28 blocks; SD3.5-medium: 13 dual-attention + 11 plain; with `--layers 1` the one
block is dual-attention and stands in for the plain ones too, so the estimate is conservative for
the methods: a plain block has half the attention). Peak memory: what the forward adds on top of the
weights and inputs (CPU: resident-set high-water mark, VmHWM reset before the call, minus VmRSS at
the start; CUDA: peak allocation minus allocation at the start).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from t5_speed import SD35_MEDIUM, TEXT_TOKENS, _sync  # noqa: E402  (one definition of the SD3.5 config)

RESULTS = Path(__file__).parent / "results"
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, norm_type="ada_norm_zero", norm_elementwise_affine=False,
                num_embeds_ada_norm=1000)
VARIANTS = {
    "dit": {"stock": None, "t5": ("t5", {}), "lina": ("lina", {})},
    "sd35": {"stock": None, "t5": ("t5", {"text_tokens": "softmax"}), "t5-text-ttt": ("t5", {"text_tokens": "ttt"}),
             "lina": ("lina", {"text_tokens": "linear"}), "lina-text-softmax": ("lina", {"text_tokens": "softmax"})},
}


# --- memory ------------------------------------------------------------------------------------------

def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


_BASE = [0]


def _reset_peak(device):
    """Start a peak-memory window: CUDA peak allocation, or on CPU the resident-set high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        _BASE[0] = torch.cuda.memory_allocated()
        return
    try:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    _BASE[0] = _status("VmRSS")


def _peak_bytes(device) -> int:
    """Peak memory of the window above what was held at its start (inputs and weights excluded)."""
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status("VmHWM")
    return max(peak - _BASE[0], 0)


# --- children ----------------------------------------------------------------------------------------

def child_step(model_kind: str, variant: str, resolution: int, layers: int, dtype, device, repeats: int) -> dict:
    import diffusers_ext as dx

    torch.manual_seed(0)
    if model_kind == "dit":
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(**dict(DIT_XL_2, num_layers=layers, sample_size=resolution // 8))
        inputs = dict(hidden_states=torch.randn(1, 4, resolution // 8, resolution // 8),
                      timestep=torch.tensor([500]), class_labels=torch.tensor([207]))
    else:
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel(**dict(SD35_MEDIUM, num_layers=layers, dual_attention_layers=(0,)))
        inputs = dict(hidden_states=torch.randn(1, 16, resolution // 8, resolution // 8),
                      encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 4096),
                      pooled_projections=torch.randn(1, 2048), timestep=torch.tensor([500.0]))
    model = model.to(device, dtype).eval()
    inputs = {k: v.to(device, dtype) if v.is_floating_point() and k != "timestep" else v.to(device)
              for k, v in inputs.items()}
    spec = VARIANTS[model_kind][variant]
    if spec is not None:
        dx.patch(model, spec[0], **spec[1])

    block_times: dict[int, list[float]] = {}
    starts = {}

    def pre(i):
        def hook(module, args, kwargs):
            _sync(device)
            starts[i] = time.perf_counter()
        return hook

    def post(i):
        def hook(module, args, kwargs, out):
            _sync(device)
            block_times.setdefault(i, []).append(time.perf_counter() - starts[i])
        return hook

    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_pre_hook(pre(i), with_kwargs=True)
        block.register_forward_hook(post(i), with_kwargs=True)
    totals, peak = [], 0
    with torch.no_grad():
        for _ in range(repeats):
            _reset_peak(device)
            _sync(device)
            start = time.perf_counter()
            model(**inputs)
            _sync(device)
            totals.append(time.perf_counter() - start)
            peak = max(peak, _peak_bytes(device))
    best = min(range(repeats), key=lambda r: totals[r])
    blocks = [block_times[i][best] for i in range(len(model.transformer_blocks))]
    dual = [t for t, b in zip(blocks, model.transformer_blocks) if getattr(b, "attn2", None) is not None]
    plain = [t for t, b in zip(blocks, model.transformer_blocks) if getattr(b, "attn2", None) is None]
    return {"total": totals[best], "rest": totals[best] - sum(blocks), "blocks": blocks,
            "dual": sum(dual) / len(dual) if dual else None, "plain": sum(plain) / len(plain) if plain else None,
            "peak_bytes": peak}


def child_core(num_tokens: int, heads: int, dtype, device, repeats: int) -> dict:
    from diffusers_ext.ops import GridDepthwiseConv, gated_linear_attention, key_instance_norm, sdpa, ttt_attention

    torch.manual_seed(0)
    side = int(num_tokens**0.5)
    grid, d, width = (side, num_tokens // side), 64, heads * 64
    x = torch.randn(1, num_tokens, width, device=device, dtype=dtype)   # the layer input (for LINA's conv)
    q, k, v = (torch.randn(1, heads, num_tokens, d, device=device, dtype=dtype) for _ in range(3))
    gates = [torch.rand(1, heads, num_tokens, 1, device=device, dtype=dtype) + 0.5 for _ in range(2)]
    conv5 = GridDepthwiseConv(width, 5, zero_init=False).to(device, dtype)
    w1, w2 = (0.02 * torch.randn(heads, d, d, device=device, dtype=dtype) for _ in range(2))
    q_conv, k_conv = (GridDepthwiseConv(width, 3, zero_init=False).to(device, dtype) for _ in range(2))

    def split(t):
        return t.view(1, num_tokens, heads, d).transpose(1, 2)

    def merge(t):
        return t.transpose(1, 2).reshape(1, num_tokens, width)

    def lina():
        out = gated_linear_attention(q.float(), k, v, *gates)
        return (out + split(conv5(x, grid)).float()).to(dtype)

    def t5():
        qq, kk = q + split(q_conv(merge(q), grid)), key_instance_norm(k)
        return ttt_attention(qq, kk + split(k_conv(merge(kk), grid)), v, w1, w2, d**-0.5)

    fns = {"sdpa": lambda: sdpa(q, k, v, d**-0.5), "lina": lina, "t5": t5}
    times = {name: [] for name in fns}
    peaks = {name: 0 for name in fns}
    with torch.no_grad():
        for _ in range(repeats):  # interleaved
            for name, fn in fns.items():
                _reset_peak(device)
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
                peaks[name] = max(peaks[name], _peak_bytes(device))
    return {name: min(t) for name, t in times.items()} | {f"{n}_peak": p for n, p in peaks.items()}


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- FLOPs -------------------------------------------------------------------------------------------

def module_flops(n: int, width: int, head_dim: int, kernel: int = 5) -> tuple[float, float]:
    """(softmax, LINA) multiply-add x 2 FLOPs of one self-attention module with its 4 projections."""
    projections = 4 * 2 * n * width * width
    softmax = projections + 4 * n * n * width
    linear = projections + 4 * n * head_dim * width + 2 * n * width + 2 * kernel * kernel * n * width
    return softmax, linear


# --- main --------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("core", "dit", "sd35"))
    parser.add_argument("--layers", type=int, default=None, help="blocks measured (default: CPU 2 DiT / 1 SD3.5)")
    parser.add_argument("--resolutions", type=int, nargs="*", default=None)
    parser.add_argument("--variants", nargs="*", default=None, help="subset of the variants")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of all variants (CPU dit: 3)")
    parser.add_argument("--core-tokens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--core-heads", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if not cuda:
        torch.set_num_threads(args.threads)

    if args.child:
        kind, *rest = args.child
        if kind == "core":
            out = child_core(int(rest[0]), args.core_heads, dtype, device, args.repeats)
        else:
            out = child_step(kind, rest[0], int(rest[1]), args.layers, dtype, device, args.repeats)
        print(json.dumps(out))
        return

    header = [
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores "
        f"({'GPU ' + torch.cuda.get_device_name() if cuda else 'CPU only, shared with other jobs: load average ' + '%.1f' % os.getloadavg()[0] + ' at the start'}), "
        f"torch {torch.__version__}, {args.threads} thread(s), {dtype}, batch 1. Ratios are within this run.", "",
    ]
    common = ["--threads", str(args.threads), "--dtype", str(dtype).replace("torch.", ""), "--core-heads",
              str(args.core_heads)]
    if args.part == "core":
        repeats = args.repeats or 3
        lines = ["# LINA attention core vs SDPA (and T^5), one head group", "", *header,
                 f"{args.core_heads} head(s) x 64; min of {repeats} interleaved repeats (1 at >= 64K tokens). "
                 "LINA = KV gate + fp32 division-normalised ReLU linear attention + 5x5 depthwise conv of the "
                 "layer input; T^5 = key norm + two 3x3 convs + inner step + read-out. Peak = the call's own "
                 "resident-memory high-water mark above its start (VmHWM - VmRSS).", "",
                 "| N tokens | SDPA s | LINA s | T^5 s | LINA speed-up | T^5 speed-up | peak MiB SDPA / LINA / T^5 |",
                 "|---|---|---|---|---|---|---|"]
        for n in args.core_tokens:
            r = run_child(["core", "--child", "core", str(n), "--repeats", str(1 if n >= 65536 else repeats), *common])
            lines.append(f"| {n} | {r['sdpa']:.4f} | {r['lina']:.4f} | {r['t5']:.4f} | {r['sdpa'] / r['lina']:.1f}x | "
                         f"{r['sdpa'] / r['t5']:.1f}x | {r['sdpa_peak'] / 2**20:.0f} / {r['lina_peak'] / 2**20:.0f} / "
                         f"{r['t5_peak'] / 2**20:.0f} |")
            print(lines[-1], flush=True)
        lines += ["", "Analytic FLOPs of one self-attention module including its q/k/v/out projections "
                  "(softmax: 8 N C^2 + 4 N^2 C; LINA: 8 N C^2 + 4 N d C + 2 N C + 50 N C):", "",
                  "| model width | N | softmax GFLOPs | LINA GFLOPs | LINA saves |", "|---|---|---|---|---|"]
        for width, head_dim, label in ((1152, 72, "DiT-XL (C 1152, d 72)"), (1536, 64, "SD3.5-medium (C 1536, d 64)")):
            for n in (1024, 4096, 5120, 16384):
                s, li = module_flops(n, width, head_dim)
                lines.append(f"| {label} | {n} | {s / 1e9:.1f} | {li / 1e9:.1f} | {100 * (1 - li / s):.0f} % |")
        out = RESULTS / "lina_speed_core.md"
    else:
        cpu_layers = 2 if args.part == "dit" else 1
        layers = args.layers or (28 if args.part == "dit" and cuda else 24 if cuda else cpu_layers)
        repeats = args.repeats or (10 if cuda else 1)
        rounds = args.rounds or (1 if cuda or args.part == "sd35" else 3)
        resolutions = args.resolutions if args.resolutions is not None else ([512] if args.part == "dit" else [1024, 2048])
        variants = args.variants or list(VARIANTS[args.part])
        full = 28 if args.part == "dit" else 24
        title = ("DiT-XL/2" if args.part == "dit" else "SD3.5-medium") + " denoising step (one transformer forward)"
        lines = [f"# LINA speed: {title}, random weights, with T^5 beside it", "", *header,
                 f"{layers} block(s) measured, min of {repeats} repeat(s) x {rounds} interleaved round(s) "
                 "(each variant in its own subprocess); full-depth estimate = embeddings/final layer + "
                 + ("28 x block" if args.part == "dit" else "13 x dual-attention block + 11 x plain block "
                    "(with 1 measured block: 24 x the dual-attention block)") + ".", "",
                 "| resolution | image tokens | variant | measured forward s | per block s | per-block speed-up | "
                 f"{full}-block est. s | speed-up ({full} blocks) | forward peak (above weights) GiB |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for resolution in resolutions:
            results = {}
            for _ in range(rounds):  # variants interleaved round by round; the fastest round of each kept
                for variant in variants:
                    r = run_child([args.part, "--child", args.part, variant, str(resolution), "--layers", str(layers),
                                   "--repeats", str(repeats), *common])
                    print(variant, r, flush=True)
                    if variant not in results or r["total"] < results[variant]["total"]:
                        results[variant] = r
            for r in results.values():
                block = r["dual"] if r["dual"] is not None else r["plain"]
                plain = r["plain"] if r["plain"] is not None else block
                r["block"] = block
                r["full"] = r["rest"] + (28 * block if args.part == "dit" else 13 * block + 11 * plain)
            base = results.get("stock")
            for name, r in results.items():
                tokens = (resolution // 16) ** 2
                speed = (lambda a, b: f"{a / b:.2f}x") if base else (lambda a, b: "-")
                lines.append(f"| {resolution}^2 | {tokens} | {name} | {r['total']:.2f} | {r['block']:.2f} | "
                             f"{speed(base['block'] if base else 1, r['block'])} | {r['full']:.1f} | "
                             f"{speed(base['full'] if base else 1, r['full'])} | {r['peak_bytes'] / 2**30:.2f} |")
                print(lines[-1], flush=True)
        out = RESULTS / f"lina_speed_{args.part}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
