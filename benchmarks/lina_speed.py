"""LINA speed and memory against stock attention, with T^5 beside it in the same run (random weights).

    python benchmarks/lina_speed.py core [--core-tokens 1024 4096 16384 65536]   # attention core vs SDPA
    python benchmarks/lina_speed.py dit  [--resolutions 512]  [--layers 2]         # DiT-XL/2 denoising step
    python benchmarks/lina_speed.py sd35 [--resolutions 1024 2048] [--layers 1]    # SD3.5-medium step
    python benchmarks/lina_speed.py core|dit|sd35 --quick                          # smoke tests, seconds

core: what replaces SDPA in one attention layer, one head group (h = `--core-heads` heads of d = 64;
the ratio does not depend on h): SDPA; LINA (KV gate + division-normalised ReLU linear attention in
fp32 + 5x5 depthwise conv of the layer input on the grid); T^5 (key norm, two 3x3 convs, inner step,
read-out). `--repeats` interleaved rounds after `--warmup`. Also the analytic FLOPs of the whole
attention module (projections included) at the paper's N = 5120.
dit / sd35: one denoiser forward, batch 1 (SD3.5: 333 text tokens), each variant in its own
subprocess, `--repeats` timed forwards after `--warmup` in each; `--rounds` rounds interleave the
variants' subprocesses; `--layers` blocks measured with hooks (harness.BlockTimer) and extrapolated,
forward by forward, to the full depth (DiT-XL/2: 28 blocks; SD3.5-medium: 13 dual-attention + 11
plain; with `--layers 1` the one block is dual-attention and stands in for the plain ones too, so the
estimate is conservative for the methods: a plain block has half the attention). Peak memory: what
the forward adds on top of the weights and inputs (harness.PeakMemory: CPU resident-set high-water
mark above the resident set at the start; CUDA peak allocation above the allocation at the start).
Every time is the median with [min, max] of benchmarks/harness.py.
"""

from __future__ import annotations

import argparse
import json

import torch

import harness
from t5_speed import SD35_MEDIUM, SD35_NARROW, TEXT_TOKENS, default_warmup, step_result  # one SD3.5 definition

DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, norm_type="ada_norm_zero", norm_elementwise_affine=False,
                num_embeds_ada_norm=1000)
DIT_NARROW = dict(DIT_XL_2, num_attention_heads=2, attention_head_dim=32)  # --quick
VARIANTS = {
    "dit": {"stock": None, "t5": ("t5", {}), "lina": ("lina", {})},
    "sd35": {"stock": None, "t5": ("t5", {"text_tokens": "softmax"}), "t5-text-ttt": ("t5", {"text_tokens": "ttt"}),
             "lina": ("lina", {"text_tokens": "linear"}), "lina-text-softmax": ("lina", {"text_tokens": "softmax"})},
}


# --- children ----------------------------------------------------------------------------------------

def child_step(model_kind: str, variant: str, resolution: int, layers: int, dtype, device, repeats: int,
               warmup: int, quick: bool = False) -> dict:
    import diffusers_ext as dx

    torch.manual_seed(0)
    if model_kind == "dit":
        from diffusers import DiTTransformer2DModel

        config = DIT_NARROW if quick else DIT_XL_2
        model = DiTTransformer2DModel(**dict(config, num_layers=layers, sample_size=resolution // 8))
        inputs = dict(hidden_states=torch.randn(1, 4, resolution // 8, resolution // 8),
                      timestep=torch.tensor([500]), class_labels=torch.tensor([207]))
    else:
        from diffusers import SD3Transformer2DModel

        config = dict(SD35_NARROW if quick else SD35_MEDIUM, num_layers=layers, dual_attention_layers=(0,))
        model = SD3Transformer2DModel(**config)
        inputs = dict(hidden_states=torch.randn(1, 16, resolution // 8, resolution // 8),
                      encoder_hidden_states=torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"]),
                      pooled_projections=torch.randn(1, config["pooled_projection_dim"]),
                      timestep=torch.tensor([500.0]))
    model = model.to(device, dtype).eval()
    inputs = {k: v.to(device, dtype) if v.is_floating_point() and k != "timestep" else v.to(device)
              for k, v in inputs.items()}
    spec = VARIANTS[model_kind][variant]
    if spec is not None:
        dx.patch(model, spec[0], **spec[1])

    with torch.no_grad(), harness.BlockTimer(model.transformer_blocks, device) as blocks:
        timing = harness.interleaved({variant: lambda: model(**inputs)}, repeats, warmup, device=device,
                                     memory=True, label=f"{resolution}^2 ")[variant]
    return step_result(timing, blocks, warmup, model)


def child_core(num_tokens: int, heads: int, dtype, device, repeats: int, warmup: int) -> dict:
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
    with torch.no_grad():
        timings = harness.interleaved(fns, repeats, warmup, device=device, memory=True,
                                      label=f"{num_tokens} tokens ")
    return {name: t.seconds for name, t in timings.items()} | {f"{n}_peak": t.peak_bytes for n, t in timings.items()}


# --- FLOPs -------------------------------------------------------------------------------------------

def module_flops(n: int, width: int, head_dim: int, kernel: int = 5) -> tuple[float, float]:
    """(softmax, LINA) multiply-add x 2 FLOPs of one self-attention module with its 4 projections."""
    projections = 4 * 2 * n * width * width
    softmax = projections + 4 * n * n * width
    linear = projections + 4 * n * head_dim * width + 2 * n * width + 2 * kernel * kernel * n * width
    return softmax, linear


# --- main --------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("core", "dit", "sd35"))
    parser.add_argument("--layers", type=int, default=None, help="blocks measured (default: CPU 2 DiT / 1 SD3.5)")
    parser.add_argument("--resolutions", type=int, nargs="*", default=None)
    parser.add_argument("--variants", nargs="*", default=None, help="subset of the variants")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--repeats", type=int, default=None,
                        help="core: interleaved rounds (default 3); dit / sd35: timed forwards per subprocess")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of all variants (CPU dit: 3)")
    harness.add_warmup_argument(parser, None, "default: core 1 (0 at >= 64K tokens); dit / sd35 1 on GPU, 0 on CPU")
    parser.add_argument("--core-tokens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--core-heads", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    harness.add_output_argument(parser, harness.RESULTS / "lina_speed_<part>.md")
    harness.add_quick_argument(parser, "core: 256 and 1024 tokens; dit / sd35: a narrow 1-block model at 128^2 / "
                                       "256^2, 1 forward (sd35: stock, t5, lina)")
    args = parser.parse_args(argv)
    quick = {"core": dict(core_tokens=[256, 1024]),
             "dit": dict(layers=1, resolutions=[128], repeats=1, rounds=1),
             "sd35": dict(layers=1, resolutions=[256], repeats=1, rounds=1,
                          variants=["stock", "t5", "lina"])}[args.part]
    args = harness.apply_quick(parser, args, **quick)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if not cuda:
        torch.set_num_threads(args.threads)

    if args.child:
        kind, *rest = args.child
        if kind == "core":
            out = child_core(int(rest[0]), args.core_heads, dtype, device, args.repeats, args.warmup)
        else:
            out = child_step(kind, rest[0], int(rest[1]), args.layers, dtype, device, args.repeats, args.warmup,
                             args.quick)
        print(json.dumps(out))
        return

    common = ["--threads", str(args.threads), "--dtype", str(dtype).replace("torch.", ""), "--core-heads",
              str(args.core_heads), *(["--quick"] if args.quick else [])]
    if args.part == "core":
        repeats = args.repeats or 3
        warmup = 1 if args.warmup is None else args.warmup
        lines = harness.header(
            "LINA attention core vs SDPA (and T^5), one head group", __file__, argv=argv, device=device, dtype=dtype,
            statistic=harness.statistic(repeats, warmup) + " At >= 64K tokens: 1 round, no warm-up.",
            extra=[f"{args.core_heads} head(s) x 64, batch 1, {args.threads} thread(s). LINA = KV gate + fp32 "
                   "division-normalised ReLU linear attention + 5x5 depthwise conv of the layer input; T^5 = key "
                   "norm + two 3x3 convs + inner step + read-out. Peak = the call's own memory above its start "
                   "(harness.PeakMemory, the largest of the rounds)."])
        rows = []
        for n in args.core_tokens:
            big = n >= 65536
            r = harness.run_child(__file__, ["core", "--child", "core", str(n), "--repeats", str(1 if big else repeats),
                                             "--warmup", str(0 if big else warmup), *common])
            sdpa, lina, t5 = (harness.Timing(name, r[name]) for name in ("sdpa", "lina", "t5"))
            peaks = " / ".join(f"{r[name + '_peak'] / 2**20:.0f}" for name in ("sdpa", "lina", "t5"))
            rows.append([n, sdpa.cell(".4f"), lina.cell(".4f"), t5.cell(".4f"), f"{lina.speedup_over(sdpa):.1f}x",
                         f"{t5.speedup_over(sdpa):.1f}x", peaks])
            print(rows[-1], flush=True)
        lines += harness.markdown_table(["N tokens", "SDPA s", "LINA s", "T^5 s", "LINA speed-up", "T^5 speed-up",
                                         "peak MiB SDPA / LINA / T^5"], rows)
        lines += ["", "Analytic FLOPs of one self-attention module including its q/k/v/out projections "
                  "(softmax: 8 N C^2 + 4 N^2 C; LINA: 8 N C^2 + 4 N d C + 2 N C + 50 N C):", ""]
        rows = []
        for width, head_dim, label in ((1152, 72, "DiT-XL (C 1152, d 72)"), (1536, 64, "SD3.5-medium (C 1536, d 64)")):
            for n in (1024, 4096, 5120, 16384):
                s, li = module_flops(n, width, head_dim)
                rows.append([label, n, f"{s / 1e9:.1f}", f"{li / 1e9:.1f}", f"{100 * (1 - li / s):.0f} %"])
        lines += harness.markdown_table(["model width", "N", "softmax GFLOPs", "LINA GFLOPs", "LINA saves"], rows)
    else:
        cpu_layers = 2 if args.part == "dit" else 1
        layers = args.layers or (28 if args.part == "dit" and cuda else 24 if cuda else cpu_layers)
        repeats = args.repeats or (10 if cuda else 1)
        rounds = args.rounds or (1 if cuda or args.part == "sd35" else 3)
        warmup = args.warmup if args.warmup is not None else default_warmup(cuda)
        resolutions = args.resolutions if args.resolutions is not None else ([512] if args.part == "dit" else [1024, 2048])
        variants = args.variants or list(VARIANTS[args.part])
        full = 28 if args.part == "dit" else 24
        title = ("DiT-XL/2" if args.part == "dit" else "SD3.5-medium") + " denoising step (one transformer forward)"
        lines = harness.header(
            f"LINA speed: {title}, random weights, with T^5 beside it", __file__, argv=argv, device=device,
            dtype=dtype, statistic=harness.statistic(rounds, warmup, repeats),
            extra=[f"Batch 1, {args.threads} thread(s)" + (", a narrow model (2 heads x 32, --quick)" if args.quick
                                                            else "")
                   + f"; {layers} block(s) measured; full-depth estimate, forward by forward = embeddings/final "
                   "layer + " + ("28 x block" if args.part == "dit" else "13 x dual-attention block + 11 x plain "
                                 "block (with 1 measured block: 24 x the dual-attention block)") + "."])
        rows = []
        for resolution in resolutions:
            calls = {v: {"total": [], "block": [], "full": [], "peak_bytes": 0} for v in variants}
            for _, variant in harness.schedule(variants, rounds):  # round-robin over the variants' subprocesses
                r = harness.run_child(__file__, [args.part, "--child", args.part, variant, str(resolution), "--layers",
                                                 str(layers), "--repeats", str(repeats), "--warmup", str(warmup),
                                                 *common])
                block = r["dual"] if r["dual"] is not None else r["plain"]
                plain = r["plain"] if r["plain"] is not None else block
                pooled = calls[variant]
                pooled["total"] += r["total"]
                pooled["block"] += block
                pooled["full"] += [rest + (28 * b if args.part == "dit" else 13 * b + 11 * p)
                                   for rest, b, p in zip(r["rest"], block, plain)]
                pooled["peak_bytes"] = max(pooled["peak_bytes"], r["peak_bytes"])
            results = {name: {key: harness.Timing(name, c[key]) for key in ("total", "block", "full")}
                       for name, c in calls.items()}
            base = results.get("stock")
            for name, r in results.items():
                tokens = (resolution // 16) ** 2

                def speedup(key):
                    return f"{r[key].speedup_over(base[key]):.2f}x" if base else "-"

                rows.append([f"{resolution}^2", tokens, name, r["total"].cell(), r["block"].cell(), speedup("block"),
                             r["full"].cell(".1f"), speedup("full"), f"{calls[name]['peak_bytes'] / 2**30:.2f}"])
                print(rows[-1], flush=True)
        lines += harness.markdown_table(
            ["resolution", "image tokens", "variant", "measured forward s", "per block s", "per-block speed-up",
             f"{full}-block est. s", f"speed-up ({full} blocks)", "forward peak (above weights) GiB"], rows)
    output = harness.write_atomic(harness.output_path(args, ".md", harness.RESULTS / f"lina_speed_{args.part}.md"),
                                  "\n".join(lines) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
