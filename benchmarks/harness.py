"""The one benchmark harness: how every script in benchmarks/ times, states and writes its numbers.

What is measured
- `interleaved`: wall-clock seconds (time.perf_counter) of every call of every variant. First
  `warmup` untimed rounds, then `rounds` timed rounds; in each round every variant runs once, in
  turn (round-robin), so a slow drift of the machine's load hits all variants alike. gc.collect()
  runs before each call and a variant's `context` (patch / unpatch) is entered around it, both
  outside the timed span. On CUDA the device is synchronised before the clock starts and after
  the call returns, so a time is the call's device work, not its launch.
- The statistic, the only one: the median of the timed rounds, with the min and max in brackets,
  "1.23 [1.20, 1.31]" (`Timing.cell`); a speed-up is the ratio of two medians of the same run.
- `BlockTimer`: seconds of every call of each module of a list (forward pre / post hooks,
  synchronised on CUDA): per-block figures of one model forward.
- `PeakMemory`: the memory a block adds above the level at its start. CUDA: peak allocation minus
  the allocation at entry. CPU (Linux): the resident-set high-water mark (VmHWM, reset at entry
  through /proc/self/clear_refs) minus the resident set at entry; where the mark cannot be reset,
  the resident set sampled every 2 ms.

What is written
- `header`: the table's title, the exact command, the machine (arch, CPU model, cores, torch,
  threads, device and GPU name, dtype), the date, the load average at the start and the statistic.
- `add_output_argument` / `output_path`: the one `--output` flag (a file or a path stem; each
  table gets its suffix, .md / .json). `--quick` runs write under QUICK_DIR unless `--output`
  is given, so a smoke test never overwrites a committed table in benchmarks/results.
- `write_atomic`: a table appears whole or not at all (`diffusers_ext.files.atomic_path`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import torch

from diffusers_ext import files

STARTED = datetime.datetime.now()  # the run's start (this module is imported first thing)
LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
QUICK_DIR = Path(tempfile.gettempdir()) / "diffusers_ext_benchmarks"
RESULTS = Path(__file__).parent / "results"


# --- the statistic --------------------------------------------------------------------------------

def spread(median: float, low: float, high: float, fmt: str = ".2f") -> str:
    """One table cell: "median [min, max]"."""
    return f"{median:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


@dataclass
class Timing:
    """Seconds of every timed call of one variant, in round order."""

    name: str
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None  # the largest PeakMemory of the timed calls, when measured
    value: Any = None              # what the variant's last call returned

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)

    def cell(self, fmt: str = ".2f") -> str:
        """The table cell of this timing: median [min, max]."""
        return spread(self.median, self.min, self.max, fmt)

    def speedup_over(self, baseline: "Timing") -> float:
        """baseline median / this median: > 1 when this variant is faster."""
        return baseline.median / self.median


def speedups(timings: dict[str, Timing], baseline: str) -> dict[str, float]:
    """Speed-up of every variant over `baseline` (ratios of medians, within one run)."""
    return {name: t.speedup_over(timings[baseline]) for name, t in timings.items()}


def weighted(name: str, parts: Sequence[tuple[Timing, float]]) -> Timing:
    """A derived variant, round by round: seconds[r] = sum(weight * part.seconds[r]).

    E.g. a recipe that spends 40 % of its steps in one configuration and 60 % in another. The parts
    come from one `interleaved` run, so round r of each was measured side by side; the peak is the
    largest of the parts'.
    """
    lengths = {len(t.seconds) for t, _ in parts}
    if len(lengths) != 1:
        raise ValueError(f"{name}: parts have different numbers of rounds {sorted(lengths)}")
    seconds = [sum(w * t.seconds[r] for t, w in parts) for r in range(lengths.pop())]
    peaks = [t.peak_bytes for t, _ in parts if t.peak_bytes is not None]
    return Timing(name, seconds, peak_bytes=max(peaks) if peaks else None)


def statistic(rounds: int, warmup: int, repeats: int | None = None) -> str:
    """The sentence a header states about its times."""
    if repeats is None:
        what = f"median of {rounds} interleaved round(s) after {warmup} warm-up round(s)"
    else:  # each variant in its own process per round, `repeats` calls in each
        what = (f"median of all {rounds * repeats} timed calls per variant: {repeats} call(s) after {warmup} "
                f"warm-up call(s) in each of {rounds} interleaved round(s), every round running each variant "
                "in its own process")
    return f"Statistic: {what}; [min, max] in brackets; speed-ups are ratios of medians within this run."


# --- timing ---------------------------------------------------------------------------------------

def synchronizer(device=None) -> Callable[[], None]:
    """A function that waits for `device`'s queued work: torch.cuda.synchronize on CUDA, else nothing."""
    if device is not None and torch.device(device).type == "cuda":
        device = torch.device(device)
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def schedule(names: Sequence[str], rounds: int, warmup: int = 0) -> Iterator[tuple[int, str]]:
    """(round, name) in run order: `warmup` untimed rounds (round < 0), then `rounds` timed rounds
    (0, 1, ...); every round runs every name once, in the given order (round-robin)."""
    for round_ in range(-warmup, rounds):
        for name in names:
            yield round_, name


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, *, device=None,
                context: Callable[[str], ContextManager] | None = None, memory: bool = False,
                label: str = "", progress: bool = True, clock: Callable[[], float] = time.perf_counter,
                sync: Callable[[], None] | None = None, deadline: float | None = None) -> dict[str, Timing]:
    """Time every variant in `rounds` round-robin rounds after `warmup` untimed ones (module doc).

    variants: name -> a call without arguments (its result is kept as Timing.value of the last call).
    context: name -> a context manager entered around each call of that variant, outside the timed
    span (patch before, unpatch after). memory: measure PeakMemory of each timed call as well
    (Timing.peak_bytes: the largest). device: synchronised around each call when it is CUDA.
    deadline: a `clock()` value; after the first timed round, no round starts that would end after
    it (judged by the last round's duration), so every variant keeps the same number of rounds, >= 1.
    clock / sync: replaceable for tests.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    sync = sync or synchronizer(device)
    timings = {name: Timing(name) for name in variants}
    names = list(variants)
    round_start = last_round = None
    for round_, name in schedule(names, rounds, warmup):
        if deadline is not None and name == names[0]:
            now = clock()
            if round_start is not None:
                last_round = now - round_start
            round_start = now
            if round_ > 0 and now + last_round > deadline:
                break
        measure = memory and round_ >= 0
        with context(name) if context else contextlib.nullcontext():
            gc.collect()
            with PeakMemory(device) if measure else contextlib.nullcontext() as peak:
                sync()
                start = clock()
                value = variants[name]()
                sync()
                elapsed = clock() - start
        timing = timings[name]
        timing.value = value
        if round_ >= 0:
            timing.seconds.append(elapsed)
            if measure:
                timing.peak_bytes = max(timing.peak_bytes or 0, peak.peak)
        if progress:
            when = "warm-up" if round_ < 0 else f"round {round_ + 1}/{rounds}"
            print(f"  {label}{when} {name}: {elapsed:.4g} s", file=sys.stderr, flush=True)
    return timings


class BlockTimer:
    """Seconds of every call of each module in `modules`, from forward pre / post hooks.

    On CUDA the device is synchronised at both hooks, so a block's time is its own work. The hooks
    live while the `with` block does. `seconds[i]` lists module i's calls in order; `timings(skip)`
    drops the first `skip` calls of each (the warm-up).
    """

    def __init__(self, modules: Iterable[torch.nn.Module], device=None, *,
                 clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] | None = None):
        self.modules = list(modules)
        self.seconds: list[list[float]] = [[] for _ in self.modules]
        self._clock, self._sync = clock, sync or synchronizer(device)
        self._starts: list[float] = [0.0] * len(self.modules)
        self._handles: list = []

    def _pre(self, index: int):
        def hook(module, args):
            self._sync()
            self._starts[index] = self._clock()
        return hook

    def _post(self, index: int):
        def hook(module, args, output):
            self._sync()
            self.seconds[index].append(self._clock() - self._starts[index])
        return hook

    def __enter__(self) -> "BlockTimer":
        for i, module in enumerate(self.modules):
            self._handles.append(module.register_forward_pre_hook(self._pre(i)))
            self._handles.append(module.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def timings(self, skip: int = 0) -> list[Timing]:
        return [Timing(f"block {i}", s[skip:]) for i, s in enumerate(self.seconds)]

    def per_call(self, skip: int = 0, indices: Sequence[int] | None = None,
                 combine: Callable[[Sequence[float]], float] = sum) -> list[float]:
        """combine(the seconds of the modules `indices`, default all) for every call after the first `skip`."""
        chosen = [self.seconds[i][skip:] for i in (range(len(self.modules)) if indices is None else indices)]
        return [combine(call) for call in zip(*chosen)]


# --- memory ---------------------------------------------------------------------------------------

def _proc_status(field_name: str) -> int:
    """A memory field of /proc/self/status in bytes (0 where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_high_water_mark() -> bool:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status("VmHWM") > 0


class PeakMemory:
    """Peak memory the `with` block adds above the level at its entry, in bytes (`.peak`; module doc)."""

    def __init__(self, device=None):
        self.device = torch.device(device if device is not None else "cpu")
        self.peak = 0
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _proc_status("VmRSS")
        if not _reset_high_water_mark():  # no resettable mark: sample the resident set instead
            self._sampled, self._stop = self._base, threading.Event()

            def sample():
                while not self._stop.wait(0.002):
                    self._sampled = max(self._sampled, _proc_status("VmRSS"))

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            top = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is None:
            top = _proc_status("VmHWM")
        else:
            self._stop.set()
            self._sampler.join()
            top = max(self._sampled, _proc_status("VmRSS"))
        self.peak = max(top - self._base, 0)
        return False


# --- subprocesses ---------------------------------------------------------------------------------

def run_child(script: str | os.PathLike, args: Sequence[str]) -> dict:
    """Run `python script *args` in a fresh process (its own memory, nothing shared with the other
    variants) and return the JSON object on the last line of its stdout; its stderr passes through."""
    proc = subprocess.run([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} exited with {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- compiling -------------------------------------------------------------------------------------

def compile_regions(model: torch.nn.Module, backend: str = "inductor") -> int:
    """torch.compile every module that directly holds an attention site (the transformer blocks), in place;
    returns how many. Identical blocks share their compiled code, so this compiles in a fraction of the time of
    the whole model."""
    from diffusers_ext.families import family_of

    modules = dict(model.named_modules())
    parents = {site.name.rpartition(".")[0] for site in family_of(model).find_sites(model)}
    for name in parents:
        modules[name].compile(backend=backend)
    return len(parents)


# --- header ---------------------------------------------------------------------------------------

def command(script: str | os.PathLike, argv: Sequence[str] | None = None) -> str:
    """The command line that reproduces this run: python benchmarks/<script> <arguments>."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *args])


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def machine(device=None, dtype=None) -> str:
    """arch (CPU model), cores, torch, threads, device (GPU name), dtype."""
    model = cpu_model()
    parts = [platform.machine() + (f" ({model})" if model else ""), f"{os.cpu_count()} cores",
             f"torch {torch.__version__}", f"{torch.get_num_threads()} thread(s)"]
    if device is not None:
        device = torch.device(device)
        gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
        parts.append(f"device {device}{gpu}")
    if dtype is not None:
        parts.append(f"dtype {str(dtype).replace('torch.', '')}")
    return ", ".join(parts)


def header(title: str, script: str | os.PathLike, *, argv: Sequence[str] | None = None, device=None, dtype=None,
           statistic: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The markdown lines every table starts with: title, command, machine, date and load, statistic.

    argv: the script's arguments (default sys.argv[1:]); statistic: `statistic(...)` for a timing
    table, None for one that times nothing; extra: lines after these (what the table holds).
    """
    load = f", load average {LOAD_AT_START:.1f} at the start" if LOAD_AT_START is not None else ""
    lines = [f"# {title}", "",
             f"Command: `{command(script, argv)}`  ",
             f"Machine: {machine(device, dtype)}  ",
             f"Run: {STARTED:%Y-%m-%d %H:%M}{load}" + ("  " if statistic else "")]
    if statistic:
        lines.append(statistic)
    return lines + [""] + ([*extra, ""] if extra else [])


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table's lines: header, separator, one line per row."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


# --- command line and output ---------------------------------------------------------------------

def add_output_argument(parser: argparse.ArgumentParser, default: str | os.PathLike, *aliases: str) -> None:
    """The one `--output PATH` flag (aliases: the script's older names for it)."""
    try:
        shown = Path(default).resolve().relative_to(Path.cwd())
    except ValueError:
        shown = default
    parser.add_argument("--output", *aliases, default=None, metavar="PATH",
                        help=f"the table: a file or a path stem, each table gets its suffix (.md, .json); "
                             f"default {shown}; with --quick a file of that name under {QUICK_DIR}")
    parser.set_defaults(output_default=str(default))


def add_quick_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """`--quick`: a smoke test of the whole script on tiny shapes in seconds (numbers meaningless)."""
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {what} (flags given explicitly still win); the table goes under "
                             f"{QUICK_DIR} unless --output is given")


def add_warmup_argument(parser: argparse.ArgumentParser, default: int | None = 1, note: str = "") -> None:
    note = f" ({note})" if note else ""
    parser.add_argument("--warmup", type=int, default=default,
                        help=f"untimed warm-up rounds of every variant before the timed ones{note}")


def apply_quick(parser: argparse.ArgumentParser, args: argparse.Namespace, **values) -> argparse.Namespace:
    """With --quick, set each option the user left at its default to the quick value."""
    if getattr(args, "quick", False):
        for name, value in values.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    return args


def output_stem(args: argparse.Namespace, default: str | os.PathLike | None = None) -> Path:
    """--output without its table suffix; unset: `default` (else the parser's), under QUICK_DIR with --quick."""
    if args.output:
        path = Path(args.output)
    else:
        path = Path(default if default is not None else args.output_default)
        if getattr(args, "quick", False):
            path = QUICK_DIR / path.name
    return path.with_suffix("") if path.suffix in (".md", ".json") else path


def output_path(args: argparse.Namespace, suffix: str = ".md", default: str | os.PathLike | None = None) -> Path:
    """The file of one table of this run: the output stem + `suffix`."""
    stem = output_stem(args, default)
    return stem.with_name(stem.name + suffix)


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a table whole or not at all (`files.atomic_path`), creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(path, text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_atomic(path, json.dumps(data, indent=2) + "\n")
