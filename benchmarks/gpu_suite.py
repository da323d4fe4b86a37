"""Every speed benchmark that matters, on one CUDA GPU, in one command within a wall-time budget.

    python benchmarks/gpu_suite.py                          # CUDA: the whole suite, ~8 minutes at most
    python benchmarks/gpu_suite.py --parts dit --dtypes bfloat16 --compile off
    python benchmarks/gpu_suite.py --device cpu --quick     # smoke test (CI): tiny shapes, seconds

Parts (random weights, the real architectures of benchmarks/agent_unet.py, lina_speed.py / t5_speed.py and
dit_attention.py; one classifier-free-guidance step, batch 2):

    unet   SD 1.5 UNet 512^2 / 1024^2 / 2048^2, SDXL UNet 1024^2: stock SDPA, agent (AgentSD's agent phase
           and its token-merging phase, the recipe's mean step), ToDo, tomesd (0.5) when installed
    sd35   SD3.5-medium transformer (24 blocks) 1024^2 / 2048^2: stock, T^5, LINA (their defaults); end to
           end, and per block (the dual-attention / plain block means, median of BLOCK_FORWARDS forwards
           timed block by block with harness.BlockTimer after the timed ones; eager only)
    dit    DiT-XL/2 (28 blocks) 256^2 / 512^2: stock, mediators (several counts; trained-like biases + DWC),
           VCA, LINA, T^5 (the variants of dit_attention.py)

every case in each of `--dtypes` (CUDA default fp16 and bf16), eager and with torch.compile (regional:
each transformer block holding an attention site is compiled, `module.compile()`). Each variant is its
own copy of the model (patched once), so a compiled variant compiles once; variants are timed with
benchmarks/harness.py (round-robin rounds after warm-up, median [min, max], CUDA-synchronised, peak
memory above the pre-call level). Ratios are to stock of the same case, dtype and compile setting in
this run. rel. L2 = ||out - stock|| / ||stock|| of the denoiser output; "nan" flags non-finite outputs.

Budget: `--budget` seconds of wall time from the start (default 440, so the run ends within 8
minutes), shared by the parts (`PART_SHARE`; time a part leaves over goes to the next). Cells (part,
case, dtype, compile) run in order, eager first; a cell starts only while its part has time left and
stops its timed rounds at the part's deadline (at least one); later cells are listed as skipped. A
variant that fails (out of memory, a compile error) is listed with its error, the others go on. The
tables (markdown + JSON, `benchmarks/results/gpu/<device name>/gpu_suite.*`) are rewritten atomically
after every cell, and once more on SIGTERM / SIGINT or `--budget` + 20 s, when the cell in progress is
marked cut short and the process exits 3.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts from here (before torch's import)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

import agent_unet  # noqa: E402
import dit_attention  # noqa: E402
import harness  # noqa: E402
from t5_speed import SD35_MEDIUM, SD35_NARROW, TEXT_TOKENS, block_kinds  # noqa: E402

import diffusers_ext as dx  # noqa: E402

BATCH = 2
BLOCK_FORWARDS = 3     # sd35: forwards per variant timed block by block (harness.BlockTimer), after the timed ones
PART_SHARE = {"unet": 0.4, "sd35": 0.3, "dit": 0.3}
CUT_GRACE_S = 20.0
CASES = {
    "unet": agent_unet.CASES,   # name -> (architecture, side)
    "sd35": {"sd35-1024": ("medium", 1024), "sd35-2048": ("medium", 2048)},
    "dit": {"dit-256": ("xl", 256), "dit-512": ("xl", 512)},
}
QUICK_CASES = {"unet": agent_unet.QUICK_CASES, "sd35": {"sd35-narrow-256": ("narrow", 256)},
               "dit": {"dit-narrow-256": ("narrow", 256)}}
QUICK_DIT = dict(num_attention_heads=2, attention_head_dim=32)   # --quick: DiT-XL/2's layout, narrow, 2 blocks
TITLES = {"unet": "SD UNets (SD 1.5, SDXL): agent, ToDo, tomesd", "sd35": "SD3.5-medium transformer: T^5, LINA",
          "dit": "DiT-XL/2: mediators, VCA, LINA, T^5"}


class CutShort(Exception):
    """SIGTERM / SIGINT / the budget's hard end: write the tables and stop."""


# --- one cell: the models of one case ---------------------------------------------------------------------

@dataclass
class Bench:
    """The variants of one case, ready to time: `calls[name]()` -> the denoiser output (a tensor).

    models: name -> the model the variant runs (variants may share one); reference: name -> a call
    giving the stock output that variant is compared with (default: stock's own output); blocks:
    name -> the transformer blocks to time per block (sd35); derive: adds derived timings (recipe).
    """

    calls: dict[str, Callable[[], torch.Tensor]]
    models: dict[str, torch.nn.Module]
    stack: contextlib.ExitStack
    reference: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    blocks: dict[str, list] = field(default_factory=dict)
    derive: Callable[[dict], dict] | None = None


def _built(build: Callable[[], torch.nn.Module], device, dtype) -> torch.nn.Module:
    """A model initialised on `device` (fast on a GPU), in `dtype`, in eval mode."""
    with torch.device(device):
        model = build()
    return model.to(device, dtype).eval()


def _patch_copies(base, keys: dict[str, str], configure: Callable[[Any, str], Any], stack) -> dict[str, Any]:
    """variant name -> its model: one copy of `base` per distinct key ("stock" keeps `base`), configured
    once (entered on `stack`, left when the cell ends)."""
    by_key = {}
    for key in dict.fromkeys(keys.values()):
        model = base if key == "stock" else copy.deepcopy(base)
        stack.enter_context(configure(model, key))
        by_key[key] = model
    return {name: by_key[key] for name, key in keys.items()}


def unet_bench(case: str, device, dtype) -> Bench:
    arch, side = {**CASES["unet"], **QUICK_CASES["unet"]}[case]
    base = _built(lambda: agent_unet.build_unet(arch), device, dtype)
    inputs = agent_unet.make_inputs(arch, side, device, dtype, batch=BATCH)
    keys = {"stock": "stock", "agent-early": "agent-early", "agent-late": "agent-early", "todo": "todo"}
    if importlib.util.find_spec("tomesd") is not None:
        keys["tomesd"] = "tomesd"
    stack = contextlib.ExitStack()
    models = _patch_copies(base, keys, agent_unet.configured, stack)

    def call(name):
        return lambda: agent_unet.forward(models[name], inputs, agent_unet.timestep(name), device)

    def derive(timings):
        if "agent-early" in timings and "agent-late" in timings:
            parts = [(timings["agent-early"], 0.4), (timings["agent-late"], 0.6)]
            return {"agent-recipe": harness.weighted("agent-recipe", parts)}
        return {}

    late_stock = lambda: agent_unet.forward(models["stock"], inputs, agent_unet.LATE_T, device)  # noqa: E731
    return Bench({name: call(name) for name in keys}, models, stack, reference={"agent-late": late_stock},
                 derive=derive)


def sd35_bench(case: str, device, dtype) -> Bench:
    from diffusers import SD3Transformer2DModel

    size, resolution = {**CASES["sd35"], **QUICK_CASES["sd35"]}[case]
    config = dict(SD35_NARROW, num_layers=2, dual_attention_layers=(0,)) if size == "narrow" else SD35_MEDIUM

    def build():
        torch.manual_seed(0)
        return SD3Transformer2DModel(**config)

    base = _built(build, device, dtype)
    g = torch.Generator().manual_seed(1)
    side = resolution // 8
    inputs = dict(hidden_states=torch.randn(BATCH, config["in_channels"], side, side, generator=g),
                  encoder_hidden_states=torch.randn(BATCH, TEXT_TOKENS, config["joint_attention_dim"], generator=g),
                  pooled_projections=torch.randn(BATCH, config["pooled_projection_dim"], generator=g))
    inputs = {k: v.to(device, dtype) for k, v in inputs.items()}
    inputs["timestep"] = torch.full((BATCH,), 500.0, device=device)
    keys = {"stock": "stock", "t5": "t5", "lina": "lina"}
    stack = contextlib.ExitStack()
    models = _patch_copies(base, keys, lambda m, key: contextlib.nullcontext() if key == "stock" else
                           dx.patched(m, key), stack)
    calls = {name: (lambda m=models[name]: m(**inputs, return_dict=False)[0]) for name in keys}
    return Bench(calls, models, stack, blocks={name: list(m.transformer_blocks) for name, m in models.items()})


def dit_bench(case: str, device, dtype) -> Bench:
    size, resolution = {**CASES["dit"], **QUICK_CASES["dit"]}[case]
    dims, layers = (QUICK_DIT, 2) if size == "narrow" else (dit_attention.XL, 28)
    base = _built(lambda: dit_attention.build(dims, layers, resolution), device, dtype)
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
              for k, v in dit_attention.inputs(resolution, batch=BATCH).items()}
    table = dit_attention.variants((resolution // 16) ** 2)
    stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def configure(model, name):
        method, options, trained = table[name]
        dit_attention.apply(model, method, options, trained, resolution)
        try:
            yield
        finally:
            if method is not None:
                dx.unpatch(model)

    models = _patch_copies(base, {name: name if table[name][0] else "stock" for name in table},
                           lambda m, key: configure(m, key), stack)
    calls = {name: (lambda m=models[name]: m(**inputs, return_dict=False)[0]) for name in table}
    return Bench(calls, models, stack)


BENCHES = {"unet": unet_bench, "sd35": sd35_bench, "dit": dit_bench}


# --- running a cell --------------------------------------------------------------------------------------

def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:160]}"


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _deviation(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not bool(torch.isfinite(out).all()):
        return math.nan
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def run_cell(part: str, case: str, dtype: torch.dtype, compiled: bool, args, device, deadline: float) -> dict:
    """Time every variant of one (part, case, dtype, compile) cell -> its JSON entry."""
    entry = {"part": part, "case": case, "dtype": str(dtype).replace("torch.", ""), "compile": compiled,
             "status": "done", "failed": {}, "rows": {}}
    bench = BENCHES[part](case, device, dtype)
    sync = harness.synchronizer(device)
    try:
        with torch.no_grad():
            if compiled:
                for model in {id(m): m for m in bench.models.values()}.values():
                    harness.compile_regions(model, args.compile_backend)
            calls = dict(bench.calls)
            for name in list(calls):   # the first warm-up call, alone: compiles, calibrates, finds failures
                try:
                    calls[name]()
                    sync()
                except CutShort:
                    raise
                except Exception as err:   # out of memory, a compile error: this variant only
                    entry["failed"][name] = _one_line(err)
                    del calls[name]
                    _free(device)
            if "stock" not in calls:
                entry["status"] = f"failed: stock {entry['failed']['stock']}"
                return entry
            timings = harness.interleaved(calls, args.repeats, args.warmup - 1, device=device, memory=True,
                                          deadline=deadline, label=f"{case} {entry['dtype']}"
                                          f"{' compiled' if compiled else ''} ")
            references = {name: ref() for name, ref in bench.reference.items() if name in calls}
            # per block: separate forwards with hooks (their synchronisation would slow the timed ones)
            timers = {name: harness.BlockTimer(bench.blocks[name], device)
                      for name in calls if name in bench.blocks and not compiled}
            for name, timer in timers.items():
                with timer:
                    for _ in range(1 if args.quick else BLOCK_FORWARDS):
                        calls[name]()
        outputs = {name: t.value for name, t in timings.items()}
        deviations = {name: _deviation(out, references.get(name, outputs["stock"])) for name, out in outputs.items()}
        if bench.derive:
            derived = bench.derive(timings)
            if "agent-recipe" in derived:
                deviations["agent-recipe"] = 0.4 * deviations["agent-early"] + 0.6 * deviations["agent-late"]
            timings.update(derived)
        stock = timings["stock"]
        for name, t in timings.items():
            row = {"seconds": t.seconds, "median": t.median, "min": t.min, "max": t.max,
                   "speedup": t.speedup_over(stock),
                   "peak_mib": None if t.peak_bytes is None else t.peak_bytes / 2**20, "rel_l2": deviations[name]}
            if name in timers:
                dual, plain = block_kinds(bench.models[name])
                for kind, indices in (("dual", dual), ("plain", plain)):
                    row[f"block_{kind}"] = timers[name].per_call(0, indices, statistics.mean) if indices else None
            entry["rows"][name] = row
        for name, row in entry["rows"].items():
            for kind in ("dual", "plain"):
                mine, base = row.get(f"block_{kind}"), entry["rows"]["stock"].get(f"block_{kind}")
                if mine and base:
                    row[f"block_{kind}_speedup"] = statistics.median(base) / statistics.median(mine)
        entry["rounds"] = len(stock.seconds)
        return entry
    finally:
        bench.stack.close()
        del bench
        if compiled:
            torch._dynamo.reset()
        _free(device)


# --- the plan, the tables --------------------------------------------------------------------------------

def plan(args) -> list[tuple[str, str, str, bool]]:
    """(part, case, dtype, compiled) in run order: per part, eager cells first, then compiled ones."""
    cells = []
    for part in args.parts:
        cases = [c for c in (QUICK_CASES if args.quick else CASES)[part] if not args.cases or c in args.cases]
        modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        cells += [(part, case, dtype, compiled) for compiled in modes for dtype in args.dtypes for case in cases]
    return cells


def _cell_key(entry) -> str:
    return f"{entry['part']}/{entry['case']}/{entry['dtype']}/{'compiled' if entry['compile'] else 'eager'}"


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else ("nan" if isinstance(value, float) and math.isnan(value) else f"{value:{fmt}}")


def write_tables(entries: list[dict], md_path, json_path, run_header: list[str], meta: dict) -> None:
    harness.write_json(json_path, {**meta, "cells": entries})
    lines = [*run_header]
    for part in dict.fromkeys(e["part"] for e in entries):
        lines += [f"## {TITLES[part]}", ""]
        per_block = part == "sd35"
        columns = ["case", "dtype", "compile", "variant", "ms / step", "speed-up", "peak MiB", "rel. L2 vs stock",
                   "rounds"] + (["per-block speed-up (dual / plain)"] if per_block else [])
        rows, notes = [], []
        for e in (e for e in entries if e["part"] == part):
            mode = "compiled" if e["compile"] else "eager"
            for name, r in e["rows"].items():
                row = [e["case"], e["dtype"], mode, name,
                       harness.spread(1e3 * r["median"], 1e3 * r["min"], 1e3 * r["max"], ".1f"),
                       f"{r['speedup']:.2f}x", _fmt(r["peak_mib"], ".0f"), _fmt(r["rel_l2"], ".4f"), e["rounds"]]
                if per_block:
                    ratios = [r.get(f"block_{kind}_speedup") for kind in ("dual", "plain")]
                    row.append(" / ".join("-" if x is None else f"{x:.2f}x" for x in ratios))
                rows.append(row)
            for name, err in e["failed"].items():
                notes.append(f"- {e['case']} {e['dtype']} {mode}: {name} failed ({err})")
            if e["status"] != "done":
                notes.append(f"- {e['case']} {e['dtype']} {mode}: {e['status']}")
        lines += harness.markdown_table(columns, rows) if rows else ["(no cell of this part finished)"]
        lines += ["", *notes, ""] if notes else [""]
    harness.write_atomic(md_path, "\n".join(lines) + "\n")


def device_slug(device: torch.device) -> str:
    """The folder name of a device: its GPU name in lower case with dashes ("nvidia-h100-80gb-hbm3"), or "cpu"."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


# --- main ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default; cuda:N) or cpu (for --quick)")
    parser.add_argument("--parts", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                        help=f"only these cases: {', '.join(c for p in CASES.values() for c in p)} "
                             f"(--quick: {', '.join(c for p in QUICK_CASES.values() for c in p)})")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float16", "bfloat16", "float32"],
                        help="default: float16 bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--compile", default=None, choices=["off", "on", "both"],
                        help="eager, torch.compile'd or both (default: both on CUDA, off on the CPU)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default: inductor on CUDA, 'eager' on the CPU: dynamo traces, "
                             "no code generation)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (CPU runs only; default 1: on a shared machine more made timings erratic)")
    parser.add_argument("--budget", type=float, default=440.0, help="seconds of wall time from the start (default 440)")
    parser.add_argument("--repeats", type=int, default=5, help="timed round-robin rounds (fewer at a part's deadline)")
    harness.add_warmup_argument(parser, 2, "the first is each variant's call alone; at least 1")
    harness.add_output_argument(parser, harness.RESULTS / "gpu" / "<device>" / "gpu_suite")
    harness.add_quick_argument(parser, "a tiny UNet, a narrow 2-block SD3.5 and DiT at 128^2 / 256^2, 1 round "
                                       "after 1 warm-up")
    args = harness.apply_quick(parser, parser.parse_args(argv), repeats=1, warmup=1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (torch.cuda.is_available() is False); "
                     "use --device cpu --quick for the smoke test")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: must be cuda, cuda:N or cpu")
    if args.budget <= 0 or args.repeats < 1 or args.warmup < 1 or args.threads < 1:
        parser.error(f"need --budget > 0, --repeats >= 1, --warmup >= 1 and --threads >= 1; got {args.budget}, "
                     f"{args.repeats}, {args.warmup}, {args.threads}")
    known = {c for p in (QUICK_CASES if args.quick else CASES).values() for c in p}
    if args.cases and set(args.cases) - known:
        parser.error(f"--cases: unknown {sorted(set(args.cases) - known)}; "
                     f"{'with' if args.quick else 'without'} --quick they are {sorted(known)}")
    cuda = device.type == "cuda"
    args.dtypes = args.dtypes or (["float16", "bfloat16"] if cuda else ["float32"])
    args.compile = args.compile or ("both" if cuda else "off")
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "eager")
    if not plan(args):
        parser.error("--parts / --cases select no case")
    return args, device


def main(argv=None, started: float | None = None) -> int:
    """Run the suite; the budget counts from `started` (a time.perf_counter() value; default: this
    module's import). Returns the exit status: 0, or 3 when cut short."""
    args, device = parse_args(argv)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    # every variant's blocks share one code object: allow their graphs (variants x shapes) side by side
    limits = {name: getattr(torch._dynamo.config, name) for name in ("recompile_limit", "cache_size_limit")
              if args.compile != "off" and hasattr(torch._dynamo.config, name)}
    for name, value in limits.items():
        setattr(torch._dynamo.config, name, max(value, 64))
    try:
        return run(args, device, argv, (T0 if started is None else started) + args.budget)
    finally:
        torch.set_num_threads(threads)
        for name, value in limits.items():
            setattr(torch._dynamo.config, name, value)


def run(args, device, argv, end: float) -> int:
    """The suite's cells in order until `end` (a time.perf_counter() value); tables after each."""
    torch.manual_seed(0)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    default = harness.RESULTS / "gpu" / device_slug(device) / "gpu_suite"
    md_path = harness.output_path(args, ".md", default)
    json_path = harness.output_path(args, ".json", default)
    run_header = harness.header(
        "GPU suite: one denoising step of SD 1.5 / SDXL / SD3.5-medium / DiT-XL/2 (random weights)", __file__,
        argv=argv, device=device, statistic=harness.statistic(args.repeats, args.warmup),
        extra=[f"Batch {BATCH} (a classifier-free-guidance step). Speed-up = stock median / variant median of the "
               "same case, dtype and compile setting in this run. Peak = memory a call adds above its start "
               "(CUDA: peak allocation). rel. L2 = ||out - stock|| / ||stock||. 'rounds': timed rounds actually run "
               f"(a part stops at its share of the {args.budget:.0f} s budget). compiled = every transformer block "
               f"compiled (`module.compile(backend={args.compile_backend!r})`). agent-recipe = 0.4 x agent-early + "
               "0.6 x agent-late; sd35 per-block speed-ups are of the mean dual-attention / plain block (eager)."])
    meta = {"command": harness.command(__file__, argv), "device": str(device), "device_slug": device_slug(device),
            "machine": harness.machine(device), "budget_s": args.budget, "batch": BATCH}
    cells = plan(args)
    entries: list[dict] = []

    def cut(signum, frame):
        raise CutShort(signal.Signals(signum).name)

    previous = {s: signal.signal(s, cut) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    signal.setitimer(signal.ITIMER_REAL, max(end + CUT_GRACE_S - time.perf_counter(), 0.01))
    status = 0
    try:
        for index, (part, case, dtype, compiled) in enumerate(cells):
            left = [p for p in dict.fromkeys(c[0] for c in cells[index:])]
            share = PART_SHARE[part] / sum(PART_SHARE[p] for p in left)
            if index == 0 or cells[index - 1][0] != part:
                part_deadline = time.perf_counter() + max(end - time.perf_counter(), 0.0) * share
            entry = {"part": part, "case": case, "dtype": dtype, "compile": compiled, "failed": {}, "rows": {}}
            if time.perf_counter() >= part_deadline:
                entry["status"] = "skipped: the part's share of the budget was spent"
            else:
                print(f"cell {_cell_key(entry)} ({part_deadline - time.perf_counter():.0f} s left for {part})",
                      file=sys.stderr, flush=True)
                try:
                    entry = run_cell(part, case, getattr(torch, dtype), compiled, args, device, part_deadline)
                except CutShort:
                    entries.append({**entry, "status": "cut short"})
                    raise
                except Exception as err:  # e.g. out of memory building the model: the next cell goes on
                    entry["status"] = f"failed: {_one_line(err)}"
                    _free(device)
            entries.append(entry)
            write_tables(entries, md_path, json_path, run_header, meta)
            _free(device)   # the cell's models, before the next cell builds its own
    except CutShort as why:
        done = {_cell_key(e) for e in entries}
        for part, case, dtype, compiled in cells:
            entry = {"part": part, "case": case, "dtype": dtype, "compile": compiled, "failed": {}, "rows": {},
                     "status": f"not run: cut short ({why})"}
            if _cell_key(entry) not in done:
                entries.append(entry)
        print(f"gpu_suite: cut short by {why}; the finished cells are in {md_path}", file=sys.stderr)
        status = 3
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in previous.items():
            signal.signal(s, handler)
    write_tables(entries, md_path, json_path, run_header, meta)
    print(md_path.read_text())
    print(f"wrote {md_path} and {json_path.name} ({time.perf_counter() - T0:.0f} s)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
