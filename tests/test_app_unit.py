"""The demo app's pieces without a browser: options generated from the registry, bounds, safe defaults."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("gradio")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import app  # noqa: E402

from diffusers_ext.registry import Method, Option, all_methods, number, one_of, register_method  # noqa: E402


def test_safe_defaults():
    config = app.parse_args([])
    assert config.host == "127.0.0.1"
    raised = app.parse_args(["--max-side", "2048", "--max-steps", "500", "--no-custom-models", "--models", "tiny:dit"])
    assert (raised.max_side, raised.max_steps, raised.custom_models, raised.models) == (2048, 500, False, ("tiny:dit",))
    with pytest.raises(SystemExit):
        app.parse_args(["--max-batch", "0"])


def test_option_widgets_follow_the_checks():
    fields = {(f.method, f.option.name): f for f in app.option_fields(list(all_methods()))}
    assert fields["agent", "random_dst"].kind == "checkbox"
    assert fields["agent", "agent_stride"].kind == "integer"
    assert fields["agent", "merge_ratio"].kind == "number"
    assert (fields["agent", "agent_source"].kind, fields["agent", "agent_source"].choices) == ("choice", ["merge", "pool"])
    assert fields["todo", "max_downsample"].kind == "text"           # per-family default
    assert fields["agent", "agent_steps"].kind == "text"             # a schedule
    assert fields["mediator", "mediators"].kind == "text"            # a count or a tuple of counts


def test_options_are_parsed_and_defaults_left_out():
    fields = app.option_fields(["agent"])
    by_name = {f.option.name: i for i, f in enumerate(fields)}
    values = [f.option.default if f.kind != "text" else "" for f in fields]
    assert app.options_of("agent", fields, values) == {}              # untouched form: the method's defaults
    values[by_name["merge_ratio"]] = 0.25
    values[by_name["agent_steps"]] = "(0, 3)"
    values[by_name["agent_source"]] = "pool"
    values[by_name["random_dst"]] = False
    assert app.options_of("agent", fields, values) == {
        "merge_ratio": 0.25, "agent_steps": (0, 3), "agent_source": "pool", "random_dst": False}
    assert app.options_of("todo", fields, values) == {}               # another method's fields are ignored


def test_a_new_method_appears_without_touching_the_app():
    @register_method
    class Probe(Method):
        name = "probe_for_app_test"
        families = ("dit",)
        options = (Option("ratio", 0.5, "a ratio", number(0, 1)), Option("kind", "a", "'a' or 'b'", one_of("a", "b")))

    try:
        kinds = {f.option.name: f.kind for f in app.option_fields(["probe_for_app_test"])}
        assert kinds == {"ratio": "number", "kind": "choice"}
        demo = app.build_app(app.AppConfig())
        method = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "method")
        assert ("probe_for_app_test", "probe_for_app_test") in method.choices
        assert any(getattr(b, "elem_id", None) == "opt-probe_for_app_test-kind" for b in demo.blocks.values())
    finally:
        from diffusers_ext import registry

        registry._METHODS.pop("probe_for_app_test", None)


def test_bounds_and_models_are_checked_on_the_server():
    worker = app.Worker(app.AppConfig(max_steps=5, max_side=64, custom_models=False))
    with pytest.raises(app.InputError, match="steps must be between 1 and 5.*--max-steps"):
        worker.check_int("steps", 6, 1, 5, "--max-steps")
    with pytest.raises(app.InputError, match="whole number"):
        worker.check_int("steps", 2.5, 1, 5)
    with pytest.raises(app.InputError, match="between 8 and 64"):
        worker.check_side("height", 128)
    assert worker.check_side("height", 0) is None
    with pytest.raises(app.InputError, match="not offered"):
        worker.check_model("someone/model")
    with pytest.raises(app.InputError, match="guidance"):
        worker.check_float("guidance scale", "abc")
    open_worker = app.Worker(app.AppConfig())
    assert open_worker.check_model(" owner/name ") == "owner/name"
    with pytest.raises(app.InputError, match="neither a hub id"):
        open_worker.check_model("../../etc/passwd")


def test_queue_serves_one_generation_at_a_time():
    config = app.AppConfig(queue_size=3)
    demo = app.build_app(config)
    assert demo._queue.max_size == 3
    generates = [fn for fn in demo.fns.values() if fn.name in ("generate", "generate_video")]
    assert generates and all(fn.concurrency_limit == 1 and fn.concurrency_id == "pipeline" for fn in generates)


def test_only_safetensors_weights_are_loaded(tmp_path):
    import torch

    from diffusers_ext.loading import load_pipeline
    from diffusers_ext.testing import tiny_pipeline

    torch.manual_seed(0)
    tiny_pipeline("dit").save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(OSError, match="only safetensors"):
        load_pipeline(str(tmp_path / "pickled"), use_safetensors=True)
