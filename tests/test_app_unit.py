"""The demo app's pieces without a browser: options generated from the registry, bounds, safe defaults."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import require_module

gr = require_module("gradio")
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


# --- the page as a person uses it: inputs per model, labels, errors, progress, the comparison ----------

def _page(model="tiny:sd", max_steps=10):
    demo = app.build_app(app.AppConfig(model=model, max_steps=max_steps))
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    fns = {fn.name: fn for fn in demo.fns.values()}
    return demo, blocks, fns


def test_difference_image_against_a_direct_computation():
    from diffusers_ext.app.results import difference_caption, difference_image

    rng = np.random.default_rng(0)
    stock, patched = rng.random((3, 4, 3)), rng.random((3, 4, 3))
    patched[0, 0] = stock[0, 0]                                       # identical pixel: black
    for gain in (1, 4, 16):
        got = difference_image(stock, patched, gain)
        assert got.dtype == np.float64 and got.shape == (3, 4, 3)    # float64 in -> float64 out
        for index in np.ndindex(*stock.shape):                       # one value at a time, by hand
            expected = min(1.0, gain * abs(float(stock[index]) - float(patched[index])))
            assert got[index] == pytest.approx(expected, abs=1e-12), (gain, index)
    assert not difference_image(stock, patched, 4)[0, 0].any()
    assert difference_image(stock.astype(np.float32), patched.astype(np.float32), 4).dtype == np.float32
    with pytest.raises(ValueError, match="differ in shape"):
        difference_image(stock, patched[:2])
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="gain"):
            difference_image(stock, patched, bad)
    assert "x 16" in difference_caption(16) and "0.0625" in difference_caption(16)   # the scale is stated


def test_difference_gallery_follows_the_gain():
    """The page's difference gallery: |stock - patched| x gain as lossless PNG, the gain in its label."""
    from PIL import Image

    from diffusers_ext.app.page import difference_gallery

    difference = np.full((2, 2, 3), 0.1, dtype=np.float16)            # as the page keeps it
    for gain, level in ((4, round(0.4 * 255)), (16, 255)):            # 0.1 x 16 is clipped to white
        shown = difference_gallery([difference], gain)
        assert f"x {gain}" in shown.label
        path = shown.value[0]["image"]["path"]
        assert path.endswith(".png")
        pixels = np.asarray(Image.open(path))
        assert pixels.shape[:2] == (256, 256) and (pixels[..., :3] == level).all()


def test_inputs_shown_per_model_family(tmp_path):
    """Only what the model takes: a prompt for text models, a class label for class models; both while
    unknown (a hub id not in the local cache); switching when the model changes."""
    worker = app.Worker(app.AppConfig())
    text = ("tiny:sd", "tiny:sdxl", "tiny:sd3", "tiny:sd35", "tiny:animatediff")
    for model in text:
        assert worker.conditioning_of(model) == "text", model
    for model in ("digits", "tiny:dit", "tiny:sit"):
        assert worker.conditioning_of(model) == "class", model
    assert worker.conditioning_of("nobody/not-cached-anywhere") is None
    from diffusers_ext.testing import tiny_pipeline

    worker._model, worker._pipe = "nobody/not-cached-anywhere", tiny_pipeline("dit")   # once it has run: known
    assert worker.conditioning_of("nobody/not-cached-anywhere") == "class"
    for class_name, expected in (("DiTPipeline", "class"), ("StableDiffusionPipeline", "text"), ("Unknown", None)):
        folder = tmp_path / class_name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        assert worker.conditioning_of(str(folder)) == expected, class_name

    from diffusers_ext.app.page import shown_inputs

    assert shown_inputs("text") == (True, False) and shown_inputs("class") == (False, True)
    assert shown_inputs(None) == (True, True) and shown_inputs("unconditional") == (False, False)

    _, blocks, fns = _page("tiny:dit")                                # the page opens on a class model
    assert not blocks["prompt"].visible and blocks["class_label"].visible
    method, prompt, label, steps = fns["on_model"].fn("tiny:sd", "mediator")  # a text model is chosen
    assert method["value"] == "agent" and prompt["visible"] and not label["visible"]
    assert "value" not in steps                                       # no recipe: the steps field stays
    method, prompt, label, steps = fns["on_model"].fn("digits", "agent")
    assert method["value"] == "mediator" and not prompt["visible"] and label["visible"]
    _, prompt, label, _ = fns["on_model"].fn("someone/model", "agent")  # unknown until it runs: both
    assert prompt["visible"] and label["visible"]


def test_sampling_steps_follow_the_models_recipe():
    """The app, like compare and sample, starts from the model's recipe (digits: digits.SAMPLING's 12 Heun
    steps), on opening and when the model changes; models without one keep the configured default."""
    from diffusers_ext import digits

    worker = app.Worker(app.AppConfig())
    assert worker.steps_of("digits") == digits.SAMPLING["num_inference_steps"] == 12
    assert worker.steps_of("tiny:sd") is None and worker.steps_of("someone/model") is None
    worker._model, worker._pipe = "someone/model", digits.make_pipeline(digits.digits_transformer())
    assert worker.steps_of("someone/model") == 12                     # a held pipeline's own recipe
    _, blocks, fns = _page("digits", max_steps=50)
    assert blocks["steps"].value == 12
    assert fns["on_model"].fn("digits", "mediator")[3]["value"] == 12
    _, blocks, fns = _page("tiny:sd", max_steps=50)
    assert blocks["steps"].value == app.AppConfig().default_steps == 20
    assert fns["on_model"].fn("digits", "agent")[3]["value"] == 12
    _, _, fns = _page("tiny:sd", max_steps=10)                       # the recipe within the app's bound
    assert fns["on_model"].fn("digits", "agent")[3]["value"] == 10


def test_the_two_steps_fields_are_labelled_apart():
    """No method option shares a label with a generation field (sampling steps vs the `steps` schedule)."""
    _, blocks, _ = _page()
    generation = {blocks[name].label for name in ("steps", "batch", "height", "width", "guidance", "seed")}
    assert blocks["steps"].label == "sampling steps"
    assert blocks["opt-agent-steps"].label == "steps (schedule)"
    for method in all_methods():
        labels = [blocks[f"opt-{method}-{option.name}"].label for option in get_method(method).options
                  if f"opt-{method}-{option.name}" in blocks]
        assert len(set(labels)) == len(labels) and not generation & set(labels), method


def test_options_and_settings_are_collapsed_and_the_button_is_by_the_choice():
    demo, blocks, _ = _page()
    assert not blocks["settings"].open and not blocks["method-options"].open
    order = [getattr(b, "elem_id", None) for b in demo.blocks.values()]   # creation order = page order
    assert order.index("generate") < order.index("settings") < order.index("method-options")
    assert order.index("generate") < order.index("steps") and order.index("generate") < order.index("opt-agent-seed")


def test_errors_are_errors_not_warnings(monkeypatch):
    """A refused request raises gr.Error (a red toast that stays), never gr.Warning; the message is the
    check's; an unexpected failure is an internal error naming its type."""
    warned = []
    monkeypatch.setattr(gr, "Warning", lambda *a, **k: warned.append(a))
    _, _, fns = _page()
    generate = fns["generate"]
    values = [component.value for component in generate.inputs]
    at = {getattr(c, "elem_id", None): i for i, c in enumerate(generate.inputs)}
    values[at["steps"]] = 500
    with pytest.raises(gr.Error) as raised:
        generate.fn(*values)
    assert "steps must be between 1 and 10, got 500" in raised.value.message and "--max-steps" in raised.value.message
    assert raised.value.duration is None and not raised.value.print_exception
    values[at["steps"]] = 2
    values[at["opt-agent-merge_ratio"]] = 7
    with pytest.raises(gr.Error, match="merge_ratio"):
        generate.fn(*values)
    assert not warned

    from diffusers_ext.app.page import page_error

    internal = page_error(RuntimeError("boom"))
    assert isinstance(internal, gr.Error) and "internal error (RuntimeError: boom)" in internal.message


def test_progress_counts_real_calls_and_measures_the_time_left():
    from diffusers_ext.app.runner import StepProgress, seconds_text

    now, shown = [0.0], []
    report = StepProgress(lambda fraction, desc: shown.append((fraction, desc)), clock=lambda: now[0])
    report(1, 10, "warm-up")
    report(2, 10, "warm-up")
    now[0] = 10.0
    report(3, 10, "stock")              # the first timed call: no pace yet
    now[0] = 10.5
    report(4, 10, "stock")              # 0.5 s per call, 6 calls left: 3 s
    now[0] = 12.0
    report(6, 10, "agent")              # (12 - 10) / 3 calls, 4 left: 2.67 s -> 3 s
    assert [f for f, _ in shown] == [0.1, 0.2, 0.3, 0.4, 0.6]
    assert shown[0][1] == "warm-up run: denoiser call 1 of 10" and "left" not in shown[2][1]
    assert shown[3][1] == "stock run: denoiser call 4 of 10, about 3 s left"
    assert shown[4][1] == "agent run: denoiser call 6 of 10, about 3 s left"
    assert (seconds_text(59.4), seconds_text(125)) == ("59 s", "2 min 5 s")


def test_the_queue_announces_no_averaged_eta():
    """Gradio's ETA is the mean of earlier requests (any size): none is kept for the generations."""
    demo, _, fns = _page()
    table = demo._queue.process_time_per_fn
    table[fns["generate"]].add(30.0)                 # what the queue does after each request
    table[fns["generate_video"]].add(30.0)
    assert fns["generate"] not in table and fns["generate_video"] not in table
    table[fns["show_method"]].add(1.0)               # other events keep gradio's bookkeeping
    assert table[fns["show_method"]].avg_time == 1.0


def test_session_history_and_speed_vs_deviation_chart():
    from diffusers_ext.app.results import CHART_X, CHART_Y, chart_rows, history_rows, record_of

    def summary(method, stock_ms, patched_ms, deviation, **options):
        return {"method": method, "options": options, "stock_ms_per_step": stock_ms,
                "patched_ms_per_step": patched_ms, "image_rel_l2": deviation}

    small, large = {"model": "tiny:sd", "size": "64x64"}, {"model": "tiny:sd", "size": "128x128"}
    history = [record_of(summary("agent", 100.0, 50.0, 0.02), small)]
    assert chart_rows(history) == []                                   # one run: a table says it all
    history.append(record_of(summary("todo", 90.0, 60.0, 0.01, factor=4), small))
    history.append(record_of(summary("agent", 300.0, 100.0, 0.05), large))
    assert chart_rows(history) == []                                   # the latest settings have one run
    history.append(record_of(summary("agent", 310.0, 155.0, 0.04, merge_ratio=0.2), large))
    rows = chart_rows(history)
    assert [(r["run"], r[CHART_X], r[CHART_Y]) for r in rows] == [
        ("stock", 0.0, 1.0), ("#3 agent", 0.05, 3.0), ("#4 agent (merge_ratio=0.2)", 0.04, 2.0)]
    table = history_rows(history)
    assert [row[0] for row in table] == [4, 3, 2, 1]                   # newest first
    assert table[2][1:7] == ["todo", "factor=4", 90.0, 60.0, 1.5, 0.01] and "64x64" in table[2][7]
