"""The demo app's pieces without a browser: options generated from the registry, bounds, safe defaults."""

import subprocess
import sys
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import app  # noqa: E402

from diffusers_ext.errors import OptionError  # noqa: E402
from diffusers_ext.registry import Method, Option, all_methods, get_method, number, one_of, register_method  # noqa: E402


def test_safe_defaults():
    config = app.parse_args([])
    assert config.host == "127.0.0.1"
    raised = app.parse_args(["--max-side", "2048", "--max-steps", "500", "--no-custom-models", "--models", "tiny:dit"])
    assert (raised.max_side, raised.max_steps, raised.custom_models, raised.models) == (2048, 500, False, ("tiny:dit",))
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            app.parse_args(["--max-batch", bad])


def _components(methods):
    return {(f.method, f.option.name): (f, f.component(True)) for f in app.option_fields(methods)}


def test_every_option_gets_the_widget_of_its_kind():
    """Each widget agrees with its option's check, probed here: a checkbox's two values pass, a number
    field's range is the one the check enforces, a dropdown offers exactly the values it accepts."""
    widgets = _components(list(all_methods()))
    assert {m for m, _ in widgets} == set(all_methods())
    for (method, name), (field, component) in widgets.items():
        option = field.option
        where = f"{method}.{name}"
        if isinstance(option.default, dict):                      # per-family default: empty = the model's
            assert isinstance(component, gr.Textbox) and component.value == "", where
            assert "default per model" in component.placeholder, where
        elif isinstance(component, gr.Checkbox):
            assert option.validate(True) is True and option.validate(False) is False, where
            with pytest.raises(OptionError):
                option.validate(1)
            assert component.value == option.default, where
        elif isinstance(component, gr.Number):
            assert component.value == option.default and option.validate(option.default) == option.default, where
            with pytest.raises(OptionError):
                option.validate("1")
            whole = component.precision == 0
            if whole:                                             # whole numbers: the check refuses halves
                with pytest.raises(OptionError):
                    option.validate(option.default + 0.5)
            else:
                option.validate(float(option.default))
            for bound, outside in ((option.low, -1), (option.high, 1)):
                if bound is not None:                              # stated in the field, enforced by the check
                    assert str(bound) in component.info, where
                    with pytest.raises(OptionError, match="must be"):
                        option.validate(bound + outside)
        elif isinstance(component, gr.Dropdown):
            offered = [value for _, value in component.choices]
            assert offered == list(option.choices) and component.value == option.default, where
            assert all(option.validate(value) == value for value in offered), where
            with pytest.raises(OptionError):
                option.validate("not a choice")
            assert not component.allow_custom_value, where
        else:
            assert isinstance(component, gr.Textbox) and component.value == "", where
            assert option.kind in ("schedule", "literal"), where


def test_option_widgets_by_hand():
    widgets = _components(list(all_methods()))
    kind = {key: type(component).__name__ for key, (_, component) in widgets.items()}
    assert kind["agent", "random_dst"] == "Checkbox"
    assert kind["agent", "agent_stride"] == "Number" and widgets["agent", "agent_stride"][1].precision == 0
    assert "[2, 16]" in widgets["agent", "agent_stride"][1].info
    assert kind["agent", "merge_ratio"] == "Number" and widgets["agent", "merge_ratio"][1].precision is None
    assert widgets["agent", "agent_source"][1].choices == [("merge", "merge"), ("pool", "pool")]
    assert widgets["agent", "max_downsample"][1].choices == [("1", 1), ("2", 2), ("4", 4), ("8", 8)]
    assert kind["todo", "max_downsample"] == "Textbox"            # per-family default ({"sdxl": 2, "*": 1})
    assert kind["lina", "text_gate_tokens"] == "Textbox"          # per-family default ({"sd3": 333, "*": 0})
    assert kind["agent", "agent_steps"] == "Textbox"              # a schedule
    assert widgets["agent", "steps"][1].placeholder == "default: whole run"
    assert kind["mediator", "mediators"] == "Textbox"             # a count or a tuple of counts


def test_options_are_parsed_and_defaults_left_out():
    fields = app.option_fields(["agent", "todo", "mediator"])
    at = {(f.method, f.option.name): i for i, f in enumerate(fields)}
    untouched = [f.option.default if f.widget != "textbox" else "" for f in fields]
    for method in ("agent", "todo", "mediator"):
        assert app.options_of(method, fields, untouched) == {}    # untouched form: the method's defaults
    values = list(untouched)
    values[at["agent", "merge_ratio"]] = 0.25
    values[at["agent", "agent_steps"]] = "(0, 3)"
    values[at["agent", "agent_source"]] = "pool"
    values[at["agent", "max_downsample"]] = 4
    values[at["agent", "random_dst"]] = False
    values[at["todo", "max_downsample"]] = " 2 "
    values[at["mediator", "mediators"]] = "[16, 32]"
    values[at["mediator", "switch_at"]] = "None"
    assert app.options_of("agent", fields, values) == {
        "merge_ratio": 0.25, "agent_steps": (0, 3), "agent_source": "pool", "max_downsample": 4, "random_dst": False}
    assert app.options_of("todo", fields, values) == {"max_downsample": 2}          # another method's ignored
    assert app.options_of("mediator", fields, values) == {"mediators": [16, 32], "switch_at": None}
    values[at["agent", "merge_ratio"]] = 7                          # passed on: the registry's check names it
    options = app.options_of("agent", fields, values)
    with pytest.raises(OptionError, match="merge_ratio.*must be <= 0.75, got 7"):
        get_method("agent").resolve_options("sd", options)


def test_a_new_method_appears_without_touching_the_app():
    @register_method
    class Probe(Method):
        name = "probe_for_app_test"
        families = ("dit",)
        options = (Option("ratio", 0.5, "a ratio", number(0, 1)), Option("kind", "a", "'a' or 'b'", one_of("a", "b")))

    try:
        widgets = {f.option.name: f.widget for f in app.option_fields(["probe_for_app_test"])}
        assert widgets == {"ratio": "number", "kind": "dropdown"}
        demo = app.build_app(app.AppConfig())
        method = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "method")
        assert ("probe_for_app_test", "probe_for_app_test") in method.choices
        kind = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "opt-probe_for_app_test-kind")
        assert kind.choices == [("a", "a"), ("b", "b")]
    finally:
        from diffusers_ext import registry

        registry._METHODS.pop("probe_for_app_test", None)


def test_app_subcommand_takes_the_same_flags():
    from diffusers_ext.app.config import config_of
    from diffusers_ext.cli import build_parser

    flags = ["--max-side", "2048", "--no-custom-models", "--models", "tiny:dit", "--port", "7861"]
    args = build_parser().parse_args(["app", *flags])
    assert args.command == "app" and callable(args.func)
    assert config_of(args) == app.parse_args(flags)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["app", "--queue-size", "0"])


def test_cli_without_gradio():
    """`diffusers-ext --help` and `diffusers-ext app --help` work without gradio; starting the app says what to install."""
    script = (
        "import sys; sys.modules['gradio'] = None\n"   # `import gradio` now fails as if it were not installed
        "from diffusers_ext.cli import main\n"
        "for argv in (['--help'], ['app', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, argv\n"
        "sys.exit(main(['app']))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "the demo app in the browser" in run.stdout and "--max-side" in run.stdout   # listed; its own help
    assert 'diffusers-ext app: error: the app needs gradio: pip install -e ".[app]"' in run.stderr


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
