"""Every "tested" claim in README.md and docs/*.md names a test that the default suite (what CI runs:
`pytest -q`, slow tests deselected) collects; and tests skip only where CI could not run them anyway."""

import ast
import re
from pathlib import Path

import pytest
from helpers import missing

ROOT = Path(__file__).resolve().parents[1]

# (document, a phrase next to the word "tested", the tests that back it: file::function)
CLAIMS = [
    ("docs/agent.md", "add no recompiles",
     ["test_agent.py::test_torch_compile_with_block_hooks_does_not_recompile_every_step"]),
    ("docs/distill.md", "restores every pretrained weight",
     ["test_distill.py::test_inherited_all_trains_every_pretrained_weight"]),
    ("docs/distill.md", "pair by pair against the formula",
     ["test_distill.py::test_guided_loss_pairs_each_sample_with_its_unconditional_twin"]),
    ("docs/distill.md", "resume == uninterrupted", ["test_distill.py::test_training_loop_resume_continues_exactly",
                                                    "test_distill.py::test_checkpoint_resume_equals_uninterrupted"]),
    ("docs/fid.md", "bit-identical whatever the batch",
     ["test_eval_sampling.py::test_dit_samples_do_not_depend_on_batch",
      "test_eval_sampling.py::test_text_to_image_latents_per_sample"]),
    ("docs/fid.md", "2 processes (torchrun, CPU)",
     ["test_eval_sampling.py::test_two_processes_give_the_same_samples_as_one",
      "test_eval_sampling.py::test_resume_after_kill_equals_uninterrupted"]),
    ("docs/fid.md", "checks the command end to end",
     ["test_eval_end_to_end.py::test_fid_command_matches_an_independent_reference"]),
    ("docs/fid.md", "pixel-by-pixel reference of the TF1 formula",
     ["test_eval_inception.py::test_tf1_resize_matches_explicit_reference"]),
    ("docs/fid.md", "the features are the same, tested",
     ["test_eval_inception.py::test_batched_extraction_equals_one_by_one"]),
    ("docs/lab.md", "Fixed (on main, tested)",
     ["test_distill.py::test_labelled_data_is_drawn_with_its_own_class",
      "test_contract.py::test_inherited_group_is_every_linear_layer_of_the_patched_sites",
      "test_distill.py::test_trajectory_records_the_stock_pipelines_own_guided_calls"]),
    ("docs/lina.md", "the output ignores whatever that position", ["test_lina.py::test_zero_key_gate_removes_a_position"]),
    ("docs/mediator.md", "exactly pooled-query agent attention",
     ["test_mediator.py::test_zero_init_is_pooled_query_agent_attention_exactly"]),
    ("docs/mediator.md", "always take the same count",
     ["test_mediator.py::test_adaptive_switch_with_cfg_and_batch_and_unpatch_restores"]),
    ("docs/sit.md", "independent re-implementation of the original forward",
     ["test_sit.py::test_converter_matches_original_network"]),
    ("docs/testing.md", "the network id (now tested)",
     ["test_eval_data.py::test_feature_cache_is_keyed_by_content"]),
    ("docs/vca.md", "the start does not depend on lambda",
     ["test_vca.py::test_start_point_is_lambda_free_and_close_to_pooled_attention"]),
    ("docs/vca.md", "tested against the equation in fp64",
     ["test_vca.py::test_stage_two_with_its_norm_is_the_plain_form"]),
]
# uses of the word that claim no test: (document, phrase next to it)
NOT_CLAIMS = [
    ("docs/compatibility.md", "the pipelines tested"),     # the pipelines the compatibility tests use
    ("docs/t5.md", "it has not been tested on real weights"),
]


def _flat(path: str) -> str:
    return " ".join((ROOT / path).read_text(encoding="utf-8").split())


def _documents() -> list[str]:
    return ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def _test_functions(file: str) -> dict[str, ast.FunctionDef]:
    tree = ast.parse((ROOT / "tests" / file).read_text(encoding="utf-8"))
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def _is_slow(node: ast.AST) -> bool:
    return any("mark.slow" in ast.unparse(d) for d in getattr(node, "decorator_list", []))


def test_every_tested_claim_is_listed():
    """A new "tested" in the docs must be added to CLAIMS with its tests (or to NOT_CLAIMS)."""
    unlisted = []
    for doc in _documents():
        text = _flat(doc)
        phrases = [p for d, p, *_ in CLAIMS + NOT_CLAIMS if d == doc]
        for match in re.finditer(r"\btested\b", text, re.I):
            around = text[max(0, match.start() - 120):match.end() + 120]
            if not any(p in around for p in phrases):
                unlisted.append(f"{doc}: ...{text[max(0, match.start() - 60):match.end() + 40]}...")
    assert not unlisted, "claims of 'tested' without a test listed in CLAIMS:\n" + "\n".join(unlisted)


@pytest.mark.parametrize("doc, phrase, tests", CLAIMS, ids=[f"{d}:{p}" for d, p, _ in CLAIMS])
def test_claimed_tests_exist_and_run_by_default(doc, phrase, tests):
    assert phrase in _flat(doc), f"{doc} no longer says {phrase!r}: update CLAIMS"
    for test in tests:
        file, name = test.split("::")
        functions = _test_functions(file)
        assert name in functions, f"{doc} ({phrase!r}) names {test}, which does not exist"
        assert not _is_slow(functions[name]), f"{test} backs a claim in {doc} but is marked slow: CI does not run it"
        module = ast.parse((ROOT / "tests" / file).read_text(encoding="utf-8"))
        assert not any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                       and "slow" in ast.unparse(n.value) for n in module.body), f"{file} is marked slow as a whole"


def test_slow_is_deselected_by_default_and_missing_tools_fail_in_ci(monkeypatch):
    """setup.cfg deselects only `slow`; `missing` (what a test lacks from setup.sh / the dev extra)
    skips here and fails under CI=true."""
    config = (ROOT / "setup.cfg").read_text(encoding="utf-8")
    assert re.search(r'^addopts = -m "not slow"', config, re.M)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        missing("needs chromium")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="needs chromium"):
        missing("needs chromium")
