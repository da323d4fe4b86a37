"""benchmarks/gpu_suite.py, the one-command GPU suite: its CPU smoke test (`--device cpu --quick`) writes
whole tables whose ratios follow from its own raw times, every variant of every part is there, and a run
cut short or out of budget still writes its tables and says so."""

from __future__ import annotations

import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def suite():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("gpu_suite")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def quick_run(suite, tmp_path_factory):
    """One `--device cpu --quick` run of every part, tables in a temp dir -> (exit status, JSON, markdown)."""
    stem = tmp_path_factory.mktemp("gpu_suite") / "suite"
    status = suite.main(["--device", "cpu", "--quick", "--output", str(stem)], started=time.perf_counter())
    data = json.loads(stem.with_suffix(".json").read_text())
    return status, data, stem.with_suffix(".md").read_text()


def test_quick_run_times_every_variant_of_every_part(suite, quick_run):
    status, data, _ = quick_run
    assert status == 0
    cells = {(c["part"], c["case"]): c for c in data["cells"]}
    assert set(cells) == {(part, case) for part, cases in suite.QUICK_CASES.items() for case in cases}
    assert all(c["status"] == "done" and not c["failed"] for c in cells.values())
    unet = cells["unet", "tiny-128"]["rows"]
    assert {"stock", "agent-early", "agent-late", "agent-recipe", "todo"} <= set(unet)
    assert set(cells["sd35", "sd35-narrow-256"]["rows"]) == {"stock", "t5", "lina"}
    dit = cells["dit", "dit-narrow-256"]["rows"]
    assert {"stock", "LINA", "T^5", "VCA n=64 (trained-like)", "mediators n=64"} <= set(dit)
    assert data["device"] == "cpu" and "--quick" in data["command"]


def test_quick_run_ratios_follow_from_the_raw_times(quick_run):
    _, data, _ = quick_run
    for cell in data["cells"]:
        rows = cell["rows"]
        stock = statistics.median(rows["stock"]["seconds"])
        for name, row in rows.items():
            assert len(row["seconds"]) == cell["rounds"] >= 1
            assert row["median"] == pytest.approx(statistics.median(row["seconds"]))
            assert row["speedup"] == pytest.approx(stock / row["median"])
        early, late, recipe = (rows.get(n) for n in ("agent-early", "agent-late", "agent-recipe"))
        if recipe:   # AgentSD's recipe: 40 % agent phase + 60 % merging phase, round by round
            assert recipe["seconds"] == pytest.approx([0.4 * e + 0.6 * la for e, la in
                                                       zip(early["seconds"], late["seconds"])])


def test_quick_run_outputs_are_finite_and_methods_move_them(quick_run):
    _, data, _ = quick_run
    for cell in data["cells"]:
        for name, row in cell["rows"].items():
            assert row["rel_l2"] == row["rel_l2"], f"{cell['case']} {name}: non-finite output"   # not nan
            if name == "stock":
                assert row["rel_l2"] == 0.0
            else:   # every method approximates attention: its output differs from stock's, boundedly
                assert 0.0 < row["rel_l2"] < 1.0, (cell["case"], name, row["rel_l2"])
    sd35 = next(c for c in data["cells"] if c["part"] == "sd35")["rows"]
    for name, row in sd35.items():   # the narrow SD3.5 has a dual-attention block and a plain one
        assert len(row["block_dual"]) == len(row["block_plain"]) == 1
        assert row["block_dual_speedup"] == pytest.approx(sd35["stock"]["block_dual"][0] / row["block_dual"][0])


def test_quick_run_markdown_states_the_run_and_lists_every_row(quick_run):
    _, data, text = quick_run
    assert text.startswith("# GPU suite")
    assert "Command: `python benchmarks/gpu_suite.py --device cpu --quick" in text
    assert "device cpu" in text and "Statistic: median of 1 interleaved round(s)" in text
    for cell in data["cells"]:
        for name, row in cell["rows"].items():
            line = next(l for l in text.splitlines() if l.startswith(f"| {cell['case']} | float32 | eager | {name} |"))
            assert f"| {row['speedup']:.2f}x |" in line


def test_out_of_budget_cells_are_listed_as_skipped(suite, tmp_path):
    stem = tmp_path / "suite"
    status = suite.main(["--device", "cpu", "--quick", "--budget", "1e-6", "--output", str(stem)],
                        started=time.perf_counter())
    data = json.loads(stem.with_suffix(".json").read_text())
    assert status == 0 and len(data["cells"]) == 3
    assert all(c["status"].startswith("skipped") and not c["rows"] for c in data["cells"])
    text = stem.with_suffix(".md").read_text()
    assert text.count("(no cell of this part finished)") == 3 and "skipped: the part's share" in text


def test_a_cut_short_run_writes_the_finished_cells_and_exits_3(suite, tmp_path, monkeypatch):
    finished = {"part": "unet", "case": "tiny-128", "dtype": "float32", "compile": False, "status": "done",
                "failed": {}, "rounds": 1, "rows": {"stock": {"seconds": [2.0], "median": 2.0, "min": 2.0, "max": 2.0,
                                                               "speedup": 1.0, "peak_mib": 1.0, "rel_l2": 0.0}}}
    calls = []

    def fake_cell(part, case, dtype, compiled, args, device, deadline):
        calls.append(part)
        if len(calls) == 2:
            raise suite.CutShort("SIGTERM")
        return dict(finished)

    monkeypatch.setattr(suite, "run_cell", fake_cell)
    stem = tmp_path / "suite"
    status = suite.main(["--device", "cpu", "--quick", "--output", str(stem)], started=time.perf_counter())
    assert status == 3 and calls == ["unet", "sd35"]
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [c["status"] for c in data["cells"]] == ["done", "cut short", "not run: cut short (SIGTERM)"]
    text = stem.with_suffix(".md").read_text()
    assert "| tiny-128 | float32 | eager | stock | 2000.0 [2000.0, 2000.0] | 1.00x |" in text


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "no CUDA device here"),
    (["--device", "cpu", "--quick", "--cases", "sd15-512"], "--cases: unknown ['sd15-512']"),
    (["--device", "cpu", "--quick", "--repeats", "0"], "--repeats >= 1"),
])
def test_bad_arguments_are_one_line_errors(suite, argv, message, capsys, tmp_path):
    if argv[1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_:
        suite.main([*argv, "--output", str(tmp_path / "suite")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())   # nothing written
