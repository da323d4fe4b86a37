"""benchmarks/combined_speed.py (issue 15): its run times are the sums its module doc states, and the
step-kind model it sums over is checked against a real run (and that check can fail)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("combined_speed")


def test_quick_run_sums_the_probe_of_each_step_kind(bench, tmp_path):
    assert bench.main(["--quick", "--output", str(tmp_path / "c")]) == 0
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["probes"] == {"stock": [0], "deepcache": [0, 1], "agent": [0, 8], "agent+deepcache": [0, 1, 8, 9]}
    for name, probe in data["probes"].items():
        kinds = bench.step_kinds(name, 20)
        seconds = dict(zip((kinds[i] for i in probe), data["per_call"][name][-1]))
        assert data["runs"][name] == [pytest.approx(sum(seconds[k] for k in kinds))]
    table = (tmp_path / "c.md").read_text()
    assert "| agent+deepcache |" in table and "3 full/early, 5 shallow/early, 8 shallow/late, 4 full/late" in table
    assert data["deviation"]["stock"] == 0 and all(v > 0 for n, v in data["deviation"].items() if n != "stock")


def test_a_wrong_step_model_is_caught_by_the_real_run(bench, monkeypatch):
    real = bench.step_kinds

    def one_step_off(name, steps):   # e.g. agent's phase ending one step late
        kinds = real(name, steps)
        return kinds[:8] + [(kinds[8][0], "early")] + kinds[9:]

    monkeypatch.setattr(bench, "step_kinds", one_step_off)
    with pytest.raises(RuntimeError, match="the timing model assumes"):
        bench.check_step_kinds(20)
