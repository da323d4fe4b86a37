"""benchmarks/harness.py: the statistic, the round-robin order, synchronisation, block timing, peak
memory, the header and the atomic output. Fake clocks stand in for time, so nothing here sleeps."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from diffusers_ext import files

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py"
_spec = importlib.util.spec_from_file_location("bench_harness", _PATH)
harness = importlib.util.module_from_spec(_spec)
sys.modules["bench_harness"] = harness  # dataclasses resolve the module by name
_spec.loader.exec_module(harness)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def scripted(clock: FakeClock, durations: list[float], log: list | None = None, name: str = ""):
    """A variant whose successive calls take `durations` seconds of the fake clock."""
    it = iter(durations)

    def call():
        if log is not None:
            log.append(name)
        clock.advance(next(it))
        return name

    return call


def test_timing_statistic_is_the_median_with_min_and_max():
    t = harness.Timing("x", [3.0, 1.0, 2.0, 10.0])
    assert t.median == 2.5          # even count: the mean of the two middle values
    assert (t.min, t.max) == (1.0, 10.0)
    assert t.cell(".1f") == "2.5 [1.0, 10.0]"
    assert harness.Timing("y", [5.0, 1.0, 4.0]).median == 4.0


def test_interleaved_times_round_robin_after_warmup_and_skips_the_warmup():
    clock, log = FakeClock(), []
    variants = {"a": scripted(clock, [100.0, 1.0, 2.0, 3.0], log, "a"),   # the first call is the warm-up
                "b": scripted(clock, [200.0, 5.0, 4.0, 9.0], log, "b")}
    timings = harness.interleaved(variants, rounds=3, warmup=1, clock=clock, progress=False)
    assert log == ["a", "b"] * 4
    assert timings["a"].seconds == [1.0, 2.0, 3.0]
    assert timings["b"].seconds == [5.0, 4.0, 9.0]
    assert timings["b"].median == 5.0 and timings["b"].min == 4.0 and timings["b"].max == 9.0
    assert timings["a"].value == "a"


def test_interleaved_without_warmup_times_every_call():
    clock = FakeClock()
    timings = harness.interleaved({"a": scripted(clock, [7.0, 8.0])}, rounds=2, warmup=0, clock=clock,
                                  progress=False)
    assert timings["a"].seconds == [7.0, 8.0]


def test_schedule_order():
    assert list(harness.schedule(["a", "b"], rounds=2, warmup=1)) == [
        (-1, "a"), (-1, "b"), (0, "a"), (0, "b"), (1, "a"), (1, "b")]


def test_interleaved_rejects_no_rounds():
    with pytest.raises(ValueError):
        harness.interleaved({"a": lambda: None}, rounds=0, progress=False)


def test_sync_brackets_the_timed_span_and_gc_runs_before_it(monkeypatch):
    events, clock = [], FakeClock()
    monkeypatch.setattr(harness.gc, "collect", lambda: events.append("gc"))

    def read():
        events.append("clock")
        return clock()

    def call():
        events.append("call")
        clock.advance(1.0)

    harness.interleaved({"a": call}, rounds=1, warmup=0, clock=read, sync=lambda: events.append("sync"),
                        progress=False)
    assert events == ["gc", "sync", "clock", "call", "sync", "clock"]


def test_cpu_synchronizer_does_nothing_and_cuda_one_synchronises(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    harness.synchronizer("cpu")()
    harness.synchronizer(None)()
    assert calls == []
    harness.synchronizer("cuda:0")()
    assert calls == [torch.device("cuda:0")]


def test_context_is_entered_around_each_call_outside_the_timing():
    clock, entered = FakeClock(), []

    @contextlib.contextmanager
    def context(name):
        entered.append(name)
        clock.advance(100.0)   # patching is slow, but must not count
        yield
        clock.advance(100.0)

    timings = harness.interleaved({"a": scripted(clock, [1.0, 2.0, 3.0]), "b": scripted(clock, [4.0, 5.0, 6.0])},
                                  rounds=2, warmup=1, clock=clock, context=context, progress=False)
    assert entered == ["a", "b"] * 3
    assert timings["a"].seconds == [2.0, 3.0] and timings["b"].seconds == [5.0, 6.0]


def test_speedups_are_ratios_of_medians():
    timings = {"stock": harness.Timing("stock", [2.0, 2.0, 2.0]), "fast": harness.Timing("fast", [1.0, 1.0, 5.0])}
    ratios = harness.speedups(timings, "stock")
    assert ratios == {"stock": 1.0, "fast": 2.0}   # a mean (2.33 s) would give 0.86x, a min the same 2x
    assert timings["fast"].speedup_over(timings["stock"]) == 2.0


def test_weighted_combines_round_by_round():
    early = harness.Timing("early", [1.0, 3.0, 2.0], peak_bytes=10)
    late = harness.Timing("late", [10.0, 30.0, 100.0], peak_bytes=20)
    recipe = harness.weighted("recipe", [(early, 0.4), (late, 0.6)])
    assert recipe.seconds == pytest.approx([6.4, 19.2, 60.8])
    assert recipe.peak_bytes == 20
    with pytest.raises(ValueError):
        harness.weighted("bad", [(early, 0.5), (harness.Timing("short", [1.0]), 0.5)])


class Advance(torch.nn.Module):
    def __init__(self, clock: FakeClock, seconds: float):
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def forward(self, x):
        self.clock.advance(self.seconds)
        return x


def test_block_timer_times_each_module_and_removes_its_hooks():
    clock = FakeClock()
    blocks = [Advance(clock, 1.0), Advance(clock, 2.0), Advance(clock, 4.0)]
    model = torch.nn.Sequential(*blocks)
    with harness.BlockTimer(blocks, clock=clock) as timer:
        model(torch.zeros(1))
        clock.advance(50.0)             # between forwards: belongs to no block
        model(torch.zeros(1))
    model(torch.zeros(1))               # after the block: not recorded
    assert timer.seconds == [[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]
    assert [t.seconds for t in timer.timings(skip=1)] == [[1.0], [2.0], [4.0]]
    assert timer.per_call() == [7.0, 7.0]
    assert timer.per_call(skip=1, indices=[0, 2], combine=lambda s: sum(s) / len(s)) == [2.5]


def test_peak_memory_sees_a_freed_allocation():
    with harness.PeakMemory("cpu") as mem:
        x = torch.ones(16 * 2**20)      # 64 MiB, touched
        del x
    assert mem.peak >= 60 * 2**20


def test_peak_memory_sampling_fallback(monkeypatch):
    monkeypatch.setattr(harness, "_reset_high_water_mark", lambda: False)
    with harness.PeakMemory("cpu") as mem:
        assert mem._sampler is not None
        x = torch.ones(16 * 2**20)
        mem._stop.wait(0.05)            # long enough for the 2 ms sampler
        del x
    assert mem.peak >= 60 * 2**20


def test_interleaved_records_the_largest_peak_of_the_timed_calls():
    sizes = iter([64, 1, 2])            # the warm-up's large allocation must not count

    def call():
        x = torch.ones(next(sizes) * 2**18)   # MiB
        return float(x[0])

    timing = harness.interleaved({"a": call}, rounds=2, warmup=1, memory=True, progress=False)["a"]
    assert timing.peak_bytes is not None and timing.peak_bytes < 32 * 2**20


def test_header_states_command_machine_and_statistic(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/thing.py", "--quick", "--name", "a b"])
    lines = harness.header("A title", "/somewhere/else/thing.py", device="cpu", dtype=torch.float16,
                           statistic=harness.statistic(5, 2), extra=["what the table holds"])
    text = "\n".join(lines)
    assert lines[0] == "# A title"
    assert "Command: `python benchmarks/thing.py --quick --name 'a b'`" in text
    assert f"torch {torch.__version__}" in text and f"{os.cpu_count()} cores" in text
    assert "device cpu" in text and "dtype float16" in text
    assert "median of 5 interleaved round(s) after 2 warm-up round(s)" in text and "[min, max]" in text
    assert "load average" in text and harness.STARTED.strftime("%Y-%m-%d") in text
    assert lines[-2:] == ["what the table holds", ""]
    # argv given explicitly (main(argv)) wins over sys.argv
    assert "Command: `python benchmarks/thing.py --repeats 3`" in "\n".join(
        harness.header("t", "thing.py", argv=["--repeats", "3"]))


def test_statistic_of_subprocess_rounds_counts_every_call():
    assert "median of all 6 timed calls" in harness.statistic(3, 0, repeats=2)


def _parser(default):
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    harness.add_output_argument(parser, default, "--out")
    harness.add_quick_argument(parser, "tiny")
    return parser


def test_output_paths(tmp_path):
    parser = _parser(tmp_path / "results" / "table")
    args = parser.parse_args([])
    assert harness.output_path(args, ".md") == tmp_path / "results" / "table.md"
    assert harness.output_path(args, ".json") == tmp_path / "results" / "table.json"
    args = parser.parse_args(["--output", str(tmp_path / "x.md")])
    assert harness.output_path(args, ".json") == tmp_path / "x.json"
    args = parser.parse_args(["--out", str(tmp_path / "run.v2")])   # the older flag name, a stem with a dot
    assert harness.output_path(args, ".md") == tmp_path / "run.v2.md"
    # --quick never writes over the committed table
    args = parser.parse_args(["--quick"])
    assert harness.output_path(args, ".md") == harness.QUICK_DIR / "table.md"
    assert harness.output_path(args, ".md", default=tmp_path / "other.md") == harness.QUICK_DIR / "other.md"


def test_apply_quick_keeps_explicit_flags(tmp_path):
    parser = _parser(tmp_path / "t")
    assert harness.apply_quick(parser, parser.parse_args(["--quick"]), repeats=1).repeats == 1
    assert harness.apply_quick(parser, parser.parse_args(["--quick", "--repeats", "3"]), repeats=1).repeats == 3
    assert harness.apply_quick(parser, parser.parse_args([]), repeats=1).repeats == 5


def test_write_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "table.md"
    harness.write_atomic(path, "old\n")
    harness.write_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert os.listdir(path.parent) == ["table.md"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask   # an ordinary file, not mkstemp's 0600


def test_atomic_path_leaves_no_partial_file_on_exception(tmp_path):
    path = tmp_path / "table.md"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with files.atomic_path(path) as tmp:
            tmp.write_text("half a ta")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["table.md"]
    fresh = tmp_path / "fresh.json"
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(fresh) as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt
    assert not fresh.exists() and os.listdir(tmp_path) == ["table.md"]


def test_markdown_table():
    assert harness.markdown_table(["a", "b"], [[1, "x"]]) == ["| a | b |", "|---|---|", "| 1 | x |"]


def test_interleaved_deadline_stops_before_a_round_that_would_overrun():
    clock = FakeClock()
    # warm-up round 10 s; timed rounds 3 s each (a 1 s + b 2 s)
    variants = {"a": scripted(clock, [5.0] + [1.0] * 5), "b": scripted(clock, [5.0] + [2.0] * 5)}
    timings = harness.interleaved(variants, rounds=5, warmup=1, clock=clock, progress=False, deadline=17.5)
    # rounds end at 13, 16; a third would end at 19 > 17.5: both variants keep the same 2 rounds
    assert timings["a"].seconds == [1.0, 1.0] and timings["b"].seconds == [2.0, 2.0]


def test_interleaved_deadline_keeps_at_least_one_round():
    clock = FakeClock()
    timings = harness.interleaved({"a": scripted(clock, [50.0, 1.0, 1.0])}, rounds=2, warmup=1, clock=clock,
                                  progress=False, deadline=0.0)
    assert timings["a"].seconds == [1.0]


# --- benchmarks/study.py: the class-balanced draw of the FID noise floor ------------------------------------

def _study():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(_PATH.parent))
        return importlib.import_module("study")


def test_the_noise_floor_draws_every_class_equally_without_repeats_and_by_seed():
    study = _study()
    labels = torch.tensor([0, 1, 2] * 5 + [2, 2])            # 5, 5 and 7 members
    draw = study.balanced_draw(labels, 9, seed=3)
    assert sorted(labels[draw].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(set(draw.tolist())) == 9
    assert torch.equal(draw, study.balanced_draw(labels, 9, seed=3))
    assert any(not torch.equal(draw, study.balanced_draw(labels, 9, seed=s)) for s in range(4, 8))
    with pytest.raises(ValueError, match="class 0 has 5 items, fewer than the 6 a draw takes"):
        study.balanced_draw(labels, 18, seed=0)
