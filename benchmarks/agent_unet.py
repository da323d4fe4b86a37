"""One denoising step of real SD UNet architectures (random weights): stock vs agent vs peers.

    python benchmarks/agent_unet.py                                  # every case below, CPU, fp32
    python benchmarks/agent_unet.py --cases sd15-512 sd15-1024 --repeats 2
    python benchmarks/agent_unet.py --device cuda --dtype float16    # on a GPU

Each case builds one UNet (SD 1.5: the default UNet2DConditionModel with cross_attention_dim 768,
860M parameters; SDXL: the SDXL base config, 2.6B) with random weights — speed does not depend on
weights — and times one forward at batch 2 (a classifier-free-guidance step) for:

    stock          diffusers' SDPA attention
    agent-early    agent attention + ToMe (AgentSD's first 40 % of steps; merge on 4x4 cells), on
                   every self-attention layer of >= 4096 tokens (the default placement)
    agent-l0       agent-early on the first level only (AgentSD's fixed max_downsample=1)
    agent-late     ToMe only, ratio 0.4 on 2x2 cells (AgentSD's last 60 % of steps)
    agent-recipe   0.4 * early + 0.6 * late: the default recipe's mean step
    agent-pool     agent-early with average-pooled agents instead of ToMe-matched ones
    agent-nomerge  agent-early without merging the tokens themselves (merge_ratio 0)
    tomesd         tomesd.apply_patch(unet, ratio=0.5) (SDXL: max_downsample=2, else it does nothing)
    todo           K/V downsampled 2x on the grid (ToDo), same layers as agent

Configurations are timed round-robin, `--repeats` times, keeping each one's fastest run, so slow
drifts of machine load hit all of them alike. Reported: time, speed-up over stock, peak memory
above the pre-forward baseline (CUDA: max_memory_allocated; CPU: sampled RSS), and the relative
L2 deviation of the UNet output from stock. Results accumulate in a JSON file (one entry per
case, each measured in one run) from which the markdown table is rewritten.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

import diffusers_ext as dx

HERE = Path(__file__).parent
CASES = {  # name -> (architecture, image side in pixels)
    "sd15-512": ("sd15", 512), "sd15-1024": ("sd15", 1024), "sd15-2048": ("sd15", 2048), "sdxl-1024": ("sdxl", 1024),
}
EARLY_T, LATE_T = 999.0, 400.0   # a bare UNet places t in [0, 1000): t=400 is at 60 % of the run


def build_unet(arch: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if arch == "sd15":
        return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    return UNet2DConditionModel(
        sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )


def make_inputs(arch: str, side: int, device, dtype, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    latent = side // 8
    kwargs = dict(sample=torch.randn(batch, 4, latent, latent, generator=g),
                  encoder_hidden_states=torch.randn(batch, 77, 768 if arch == "sd15" else 2048, generator=g))
    if arch == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=g),
                                       "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * batch, dtype=torch.float32)}
    return {k: (v.to(device, dtype) if torch.is_tensor(v) else {kk: vv.to(device, dtype) for kk, vv in v.items()})
            for k, v in kwargs.items()}


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or RSS sampled every 2 ms."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base, self._max, self._stop = self._rss(), 0, False

        def sample():
            while not self._stop:
                self._max = max(self._max, self._rss())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop = True
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self._base
        return False


@contextlib.contextmanager
def configured(unet, name: str):
    """Apply one configuration to the bare UNet for the duration of the block."""
    if name == "stock":
        yield EARLY_T
    elif name == "tomesd":
        import tomesd

        # SDXL has no attention at its first level, tomesd's default (max_downsample=1), where tomesd
        # would change nothing: there it merges on the second level, the finest one with attention
        sdxl = unet.config.addition_embed_type == "text_time"
        tomesd.apply_patch(unet, ratio=0.5, max_downsample=2 if sdxl else 1)
        try:
            yield EARLY_T
        finally:
            tomesd.remove_patch(unet)
    else:
        options, timestep = {
            "agent-early": ({}, EARLY_T), "agent-late": ({}, LATE_T),
            "agent-pool": ({"agent_source": "pool"}, EARLY_T),
            "agent-nomerge": ({"merge_ratio": 0.0}, EARLY_T),
            "agent-l0": ({"max_downsample": 1, "min_tokens": 1}, EARLY_T),
            "todo": (None, EARLY_T),
        }[name]
        with dx.patched(unet, "todo") if options is None else dx.patched(unet, "agent", **options):
            yield timestep


def forward(unet, inputs, timestep: float, device):
    """One UNet call; the sample goes positionally (tomesd's hook reads it from args)."""
    rest = {k: v for k, v in inputs.items() if k != "sample"}
    return unet(inputs["sample"], torch.tensor(timestep, device=device), **rest, return_dict=False)[0]


def run_case(case: str, configs: list[str], repeats: int, device, dtype) -> dict:
    arch, side = CASES[case]
    unet = build_unet(arch).to(device, dtype).eval()
    inputs = make_inputs(arch, side, device, dtype)
    best, memory, outputs = {}, {}, {}
    with torch.no_grad():
        for repeat in range(repeats):
            for name in configs:
                with configured(unet, name) as timestep:
                    gc.collect()
                    with PeakMemory(device) as mem:
                        start = time.perf_counter()
                        out = forward(unet, inputs, timestep, device)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        elapsed = time.perf_counter() - start
                best[name] = min(best.get(name, float("inf")), elapsed)
                memory[name] = max(memory.get(name, 0), mem.peak)
                outputs.setdefault(name, out.float().cpu())
                print(f"  {case} {name:14s} repeat {repeat}: {elapsed:8.2f} s", flush=True)
    # the stock reference output at the late timestep, for agent-late's deviation
    late_stock = None
    if "agent-late" in configs:
        with torch.no_grad():
            late_stock = forward(unet, inputs, LATE_T, device).float().cpu()
    rows = {}
    for name in configs:
        reference = late_stock if name == "agent-late" else outputs["stock"]
        deviation = float((outputs[name] - reference).norm() / reference.norm())
        rows[name] = {"seconds": best[name], "speedup": best["stock"] / best[name],
                      "peak_mib": memory[name] / 2**20, "rel_l2": deviation}
    if "agent-early" in rows and "agent-late" in rows:
        seconds = 0.4 * best["agent-early"] + 0.6 * best["agent-late"]
        rows["agent-recipe"] = {"seconds": seconds, "speedup": best["stock"] / seconds,
                                "peak_mib": max(rows["agent-early"]["peak_mib"], rows["agent-late"]["peak_mib"]),
                                "rel_l2": 0.4 * rows["agent-early"]["rel_l2"] + 0.6 * rows["agent-late"]["rel_l2"]}
    return {"case": case, "arch": arch, "side": side, "batch": 2, "repeats": repeats, "rows": rows}


ORDER = ["stock", "agent-early", "agent-late", "agent-recipe", "agent-pool", "agent-nomerge", "agent-l0", "tomesd",
         "todo"]


def write_table(results: dict, path: Path, meta: dict) -> None:
    lines = [
        "# Agent attention on SD UNets: one denoising step (batch 2), random weights",
        "",
        f"Machine: {meta['machine']}; device {meta['device']}, dtype {meta['dtype']}; torch {meta['torch']}.",
        "Command: `" + meta["command"] + "` (each case measured in one run; cases may come from separate runs,",
        "dates below). Speed-up = stock time / configuration time, fastest of the repeats, round-robin.",
        "agent-recipe = 0.4 x agent-early + 0.6 x agent-late (AgentSD's 40 % / 60 % split of the run).",
        "rel. L2 = ||out - stock|| / ||stock|| of the UNet output (random weights: a measure of how far",
        "the approximation moves the function, not of image quality). Peak = memory above the",
        "pre-forward level (CPU: sampled RSS).",
        "",
        "| case | configuration | time (s) | speed-up | peak (MiB) | rel. L2 vs stock | measured |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for case in CASES:
        if case not in results:
            continue
        entry = results[case]
        for name in ORDER:
            if name in entry["rows"]:
                r = entry["rows"][name]
                lines.append(f"| {case} | {name} | {r['seconds']:.2f} | {r['speedup']:.2f}x | {r['peak_mib']:.0f} | "
                             f"{r['rel_l2']:.4f} | {entry['date']} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--configs", nargs="+", default=[c for c in ORDER if c != "agent-recipe"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", default=str(HERE / "results" / "agent_unet.json"))
    parser.add_argument("--out", default=str(HERE / "results" / "agent_unet.md"))
    args = parser.parse_args(argv)
    if "stock" not in args.configs:
        parser.error("--configs must include stock (the reference)")

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        if device.type == "cpu" else torch.cuda.get_device_name(),
        "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
        "command": "python benchmarks/agent_unet.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    for case in args.cases:
        print(f"case {case}", flush=True)
        entry = run_case(case, args.configs, args.repeats, device, dtype)
        entry["date"] = datetime.date.today().isoformat()
        entry.update({k: meta[k] for k in ("device", "dtype", "command")})
        results[case] = entry
        json_path.write_text(json.dumps(results, indent=2))
        write_table(results, Path(args.out), meta)
        gc.collect()
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
