"""benchmarks/combined_speed.py (issue 15): its run times are the sums its module doc states, and the
step-kind model it sums over is checked against a real run (and that check can fail), for both stacks."""

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


EXPECTED = {  # stack -> (probes, the combined row's step counts)
    "sd15": ({"stock": [0], "deepcache": [0, 1], "agent": [0, 8], "agent+deepcache": [0, 1, 8, 9]},
             "| agent+deepcache |", "3 full/early, 5 shallow/early, 8 shallow/late, 4 full/late"),
    "sd35": ({"stock": [0], "taylorseer": [0, 1, 2, 3], "t5": [0], "t5+taylorseer": [0, 1, 2, 3], "lina": [0],
              "lina+taylorseer": [0, 1, 2, 3]}, "| lina+taylorseer |", "8 full, 20 predicted"),
}


@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_quick_run_sums_the_probe_of_each_step_kind(bench, tmp_path, model):
    assert bench.main([model, "--quick", "--output", str(tmp_path / "c")]) == 0
    data = json.loads((tmp_path / "c.json").read_text())
    probes, row, counts = EXPECTED[model]
    assert data["probes"] == probes
    stack = bench.STACKS[model]
    for name, probe in data["probes"].items():
        kinds = stack.step_kinds(name, data["steps"])
        seconds = {}   # kind -> the probe's seconds of that kind, summed as the doc says: the kind's mean per step
        for i, s in zip(probe, data["per_call"][name][-1]):
            seconds.setdefault(kinds[i], []).append(s)
        assert data["runs"][name] == [pytest.approx(sum(sum(seconds[k]) / len(seconds[k]) for k in kinds))]
    table = (tmp_path / "c.md").read_text()
    assert row in table and counts in table
    assert data["deviation"]["stock"] == 0 and all(v > 0 for n, v in data["deviation"].items() if n != "stock")


def test_taylorseer_step_model_is_diffusers_refresh_rule(bench):
    kinds = bench.SD35.step_kinds("t5+taylorseer", 28)
    assert [i for i, k in enumerate(kinds) if k == ("full",)] == [0, 1, 2, 4, 9, 14, 19, 24]


@pytest.mark.parametrize("model, steps", [("sd15", 20), ("sd35", 12)])
def test_a_wrong_step_model_is_caught_by_the_real_run(bench, monkeypatch, model, steps):
    stack = bench.STACKS[model]
    real = stack.step_kinds

    def one_step_off(name, n):   # e.g. agent's phase ending one step late, TaylorSeer refreshing one step early
        kinds = real(name, n)
        flipped = (kinds[8][0], "early") if model == "sd15" else ("full",) if kinds[8] != ("full",) else ("predicted",)
        return kinds[:8] + [flipped] + kinds[9:]

    monkeypatch.setattr(stack, "step_kinds", one_step_off)
    with pytest.raises(RuntimeError, match="the timing model assumes"):
        bench.check_step_kinds(stack, steps)


@pytest.mark.parametrize("argv, message", [(["--side", "100"], "--side must be a multiple of 8, got 100"),
                                           (["sd3"], "invalid choice: 'sd3'"), (["--steps", "0"], "--steps")])
def test_bad_flags_exit_2_naming_the_flag_and_write_nothing(bench, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        bench.main([*argv, "--quick", "--output", str(tmp_path / "c")])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
