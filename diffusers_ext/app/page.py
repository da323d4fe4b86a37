"""The app's page: the gr.Blocks layout and its events (the work is `runner.Worker`'s).

    from diffusers_ext.app.page import build_app, launch_app
    demo = build_app(AppConfig(max_steps=30))      # a gr.Blocks with its queue configured
    launch_app(demo, AppConfig())                  # or demo.launch(...) yourself
"""

from __future__ import annotations

import logging
from collections import defaultdict

import gradio as gr
import numpy as np
import pandas as pd

from diffusers_ext.compare import DEFAULT_PROMPT
from diffusers_ext.loading import SHIPPED_MODELS
from diffusers_ext.registry import all_methods

from .config import AppConfig
from .results import (CHART_X, CHART_Y, DEFAULT_GAIN, DIFFERENCE_GAINS, HISTORY_HEADERS, MAX_HISTORY, RunRecord,
                      absolute_difference, amplified, chart_rows, difference_caption, history_rows, options_text,
                      record_of, settings_text)
from .runner import HAS_VIDEO, VIDEO_METHOD, Worker, enlarge, error_message, suggested_method
from .widgets import option_fields, options_of

logger = logging.getLogger("diffusers_ext.app")


def method_help(name: str) -> str:
    """What the method does, the models it fits and whether it trains, in one line (the method field's info)."""
    info = all_methods()[name].info()
    kind = "training-free" if info["training_free"] else "needs a short fine-tune (here: its initial weights)"
    return f"{info['description']}; models: {', '.join(info['families'])}; {kind}"


def timings_markdown(method: str, stock_ms: float, patched_ms: float, extra: str = "") -> str:
    return (
        f"| | stock | {method} |\n|---|---|---|\n"
        f"| time per step | {stock_ms:.1f} ms | {patched_ms:.1f} ms |\n\n"
        f"**speed ratio** (stock / {method}): **{stock_ms / patched_ms:.2f}x**{extra}"
    )


def page_error(err: BaseException) -> gr.Error:
    """A failed generation as the page's error (a red "Error" toast that stays until closed), never a
    warning; its message is `error_message`'s (unexpected exceptions are logged there, with traceback)."""
    return gr.Error(error_message(err), duration=None, print_exception=False)


def shown_inputs(conditioning: str | None) -> tuple[bool, bool]:
    """(prompt shown, class label shown) for a model that takes `conditioning` ("text", "class",
    "unconditional"; None: not known before it runs, so both)."""
    if conditioning is None:
        return True, True
    return conditioning == "text", conditioning == "class"


def drop_averaged_eta(demo: gr.Blocks, concurrency_id: str = "pipeline") -> None:
    """No ETA from gradio's queue for the events of `concurrency_id`.

    Gradio announces as a request's ETA the mean duration of every earlier request of its event, whatever
    their model, steps, size or batch (the first also loaded the model), so a bigger request counts past
    "its" estimate. Gradio 6 has no switch for it: here the queue's timing table (`Queue.process_time_per_fn`)
    keeps no entry for these events, so no ETA is sent and the page shows the elapsed time next to the
    real progress (`runner.StepProgress`: the denoiser calls done and a time left measured on this request).
    """
    queue = getattr(demo, "_queue", None)
    table = getattr(queue, "process_time_per_fn", None)
    if not isinstance(table, defaultdict):
        logger.warning("diffusers-ext app: this gradio's queue has no timing table; its ETA stays")
        return

    class Untimed(defaultdict):
        def __missing__(self, fn):
            if getattr(fn, "concurrency_id", None) == concurrency_id:
                return self.default_factory()        # timed, then forgotten: no average, no ETA
            return super().__missing__(fn)

    queue.process_time_per_fn = Untimed(table.default_factory, table)


def result_gallery(images: list[np.ndarray], **update):
    """A gallery of result images, enlarged to show their pixels, as PNG (gradio's default WebP is lossy,
    and these pixels are compared); one column for one image, else two."""
    return gr.Gallery(value=[enlarge(image) for image in images] or None, columns=1 if len(images) < 2 else 2,
                      format="png", **update)


def difference_gallery(differences: list[np.ndarray] | None, gain: float):
    """The difference gallery of |stock - patched| images (`results.absolute_difference`) at `gain`, its
    scale in its label."""
    gain = float(gain or DEFAULT_GAIN)
    return result_gallery([amplified(d.astype(np.float32), gain) for d in differences or []],
                          label=difference_caption(gain))


def chart_update(history: list[RunRecord]):
    """The speed vs deviation chart of the runs comparable with the latest and its note (which settings);
    both hidden below two such runs."""
    rows = chart_rows(history)
    if not rows:
        return gr.ScatterPlot(value=None, visible=False), gr.Markdown("", visible=False)
    runs, frame = len(rows) - 1, pd.DataFrame(rows)
    x_high, y_high = frame[CHART_X].max() or 1.0, frame[CHART_Y].max()
    note = (f"{runs} runs at {settings_text(history[-1].settings)}; stock is (0, 1). Up: faster; right: further "
            f"from the stock images. Runs at other settings: the table below.")
    return (gr.ScatterPlot(value=frame, visible=True, x_lim=[-0.05 * x_high, 1.1 * x_high], y_lim=[0, 1.1 * y_high]),
            gr.Markdown(note, visible=True))


def build_app(config: AppConfig | None = None) -> gr.Blocks:
    """The demo as a `gr.Blocks`, its queue configured (one generation at a time, `queue_size` waiting)."""
    config = config or AppConfig()
    worker = Worker(config)
    methods = [name for name in all_methods() if name != VIDEO_METHOD]
    default_method = suggested_method(config.model, methods) or ("agent" if "agent" in methods else methods[0])
    models = list(dict.fromkeys([config.model, *config.models]))
    prompt_shown, class_shown = shown_inputs(worker.conditioning_of(config.model))

    with gr.Blocks(title="diffusers-ext", analytics_enabled=False) as demo:
        gr.Markdown("## diffusers-ext: stock vs patched, from the same seed\n"
                    + "".join(f"`{name}`: {model.description}; " for name, model in SHIPPED_MODELS.items())
                    + "all trained here on real images, offline; `tiny:*`: random weights (noise images; their "
                    "timings still compare the code paths).")
        with gr.Tab("Image"):
            history = gr.State([])           # RunRecord per run of this browser session
            differences = gr.State(None)     # the last run's |stock - patched| (float16): redrawn at another gain
            with gr.Row(equal_height=False):
                with gr.Column(scale=2, min_width=340):
                    with gr.Row():
                        model = gr.Dropdown(models, value=config.model, label="model",
                                            allow_custom_value=config.custom_models, elem_id="model",
                                            info="embedded (offline)" + (", a hub id or a local folder"
                                                                         if config.custom_models else ""))
                        method = gr.Dropdown(methods, value=default_method, label="method", elem_id="method",
                                             info=method_help(default_method))
                    prompt = gr.Textbox(DEFAULT_PROMPT, label="prompt", max_lines=3, elem_id="prompt",
                                        visible=prompt_shown, info="text-to-image models")
                    class_label = gr.Number(7, precision=0, label="class label", elem_id="class_label",
                                            visible=class_shown, info="class-conditional models: 0-9 for digits, "
                                                                      "0-35 (0-9, A-Z) for glyphs, 0-999 for ImageNet DiT / SiT")
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    status = gr.Markdown("", elem_id="status", min_height=64)
                    with gr.Accordion("generation settings", open=False, elem_id="settings"):
                        with gr.Row():
                            steps = gr.Number(min(worker.steps_of(config.model) or config.default_steps,
                                                  config.max_steps), precision=0,
                                              label="sampling steps", elem_id="steps",
                                              info=f"denoising steps of each run, 1 to {config.max_steps}; "
                                                   "set to the model's recipe when it has one")
                            batch = gr.Number(1, precision=0, label="batch size", info=f"1 to {config.max_batch}",
                                              elem_id="batch")
                        with gr.Row():
                            height = gr.Number(0, precision=0, label="height", elem_id="height",
                                               info=f"0: model default; at most {config.max_side}")
                            width = gr.Number(0, precision=0, label="width", elem_id="width",
                                              info=f"0: model default; at most {config.max_side}")
                        with gr.Row():
                            guidance = gr.Textbox("", label="guidance scale", placeholder="pipeline default",
                                                  info="empty: the pipeline's default", elem_id="guidance")
                            seed = gr.Number(0, precision=0, label="noise seed", elem_id="seed",
                                             info="the same for both runs")
                        warmup = gr.Checkbox(True, label="warm-up run first (fair timings)", elem_id="warmup")
                    with gr.Accordion(f"{default_method} options", open=False, elem_id="method-options") as options_box:
                        gr.Markdown("Passed to `dx.patch`; untouched fields keep the method's defaults for the model.")
                        image_fields = option_fields(methods)
                        image_options = [f.component(f.method == default_method) for f in image_fields]
                with gr.Column(scale=3):
                    timings = gr.Markdown("", elem_id="timings")
                    with gr.Row():
                        gallery = dict(columns=1, height=260, object_fit="contain", format="png")   # lossless
                        stock_images = gr.Gallery(label="stock", elem_id="stock-images", **gallery)
                        patched_images = gr.Gallery(label="patched", elem_id="patched-images", **gallery)
                        difference_images = gr.Gallery(label=difference_caption(DEFAULT_GAIN),
                                                       elem_id="difference-images", **gallery)
                    gain = gr.Radio(list(DIFFERENCE_GAINS), value=DEFAULT_GAIN, label="difference gain",
                                    elem_id="gain", info="the difference image: |stock - patched| per pixel "
                                                         "and channel, times this (images in [0, 1]; clipped)")
                    chart = gr.ScatterPlot(x=CHART_X, y=CHART_Y, color="method", tooltip=["run", CHART_X, CHART_Y],
                                           label="speed vs deviation, this session", visible=False,
                                           elem_id="chart")
                    chart_note = gr.Markdown("", visible=False, elem_id="chart-note")
                    with gr.Accordion("runs of this session", open=False, elem_id="history-box"):
                        history_table = gr.Dataframe(headers=HISTORY_HEADERS, interactive=False, elem_id="history",
                                                     wrap=True)
                        clear = gr.Button("clear the history", size="sm", elem_id="clear-history")

            def show_method(name):
                return [gr.update(info=method_help(name)), gr.Accordion(label=f"{name} options"),
                        *[gr.update(visible=f.method == name) for f in image_fields]]

            method.change(show_method, method, [method, options_box, *image_options], queue=False)

            def on_model(name, current):
                suggested = suggested_method(name, methods)
                prompt_, class_ = shown_inputs(worker.conditioning_of(name))
                recommended = worker.steps_of(name)      # the model's recipe, where it has one
                return (gr.update(value=suggested) if suggested and suggested != current else gr.update(),
                        gr.update(visible=prompt_), gr.update(visible=class_),
                        gr.update(value=min(recommended, config.max_steps)) if recommended else gr.update())

            model.change(on_model, [model, method], [method, prompt, class_label, steps], queue=False)

            image_inputs = [model, method, prompt, class_label, height, width, steps, guidance, batch, seed, warmup]

            def generate(*values, progress=gr.Progress()):
                (model_, method_, prompt_, label_, height_, width_, steps_, guidance_, batch_, seed_,
                 warmup_, gain_, history_) = values[:len(image_inputs) + 2]
                try:
                    options = options_of(method_, image_fields, list(values[len(image_inputs) + 2:]))
                    result = worker.compare_images(model_, method_, prompt_, label_, height_, width_, steps_,
                                                   guidance_, batch_, seed_, bool(warmup_), options, progress)
                except Exception as err:  # noqa: BLE001  (every failure: the page's error, never a stuck page)
                    raise page_error(err) from None
                c, s = result.comparison, result.comparison.summary
                history_ = [*(history_ or []), record_of(s, result.settings)][-MAX_HISTORY:]
                kept = [absolute_difference(a, b).astype(np.float16)       # float16: a quarter of the memory
                        for a, b in zip(c.stock.images, c.patched.images)]
                extra = (f"  \n{s['pipeline']}, {s['steps']} sampling steps, options: {options_text(s['options'])}; "
                         f"deviation from stock (relative L2 of the images) {s['image_rel_l2']:.4f}, "
                         f"largest pixel difference {s['image_max_abs']:.3f}")
                prompt_shown_, class_shown_ = shown_inputs(result.conditioning)
                return (result_gallery(c.stock.images), result_gallery(c.patched.images),
                        difference_gallery(kept, gain_),
                        timings_markdown(method_, s["stock_ms_per_step"], s["patched_ms_per_step"], extra), "Done.",
                        history_, *chart_update(history_), history_rows(history_), kept,
                        gr.update(visible=prompt_shown_), gr.update(visible=class_shown_))

            def clear_results():   # what is shown is always the last successful request's, or nothing
                return None, None, gr.Gallery(value=None), "", "", None

            run.click(clear_results, None,
                      [stock_images, patched_images, difference_images, timings, status, differences],
                      queue=False).then(
                generate, [*image_inputs, gain, history, *image_options],
                [stock_images, patched_images, difference_images, timings, status, history, chart, chart_note,
                 history_table, differences, prompt, class_label],
                concurrency_id="pipeline", concurrency_limit=1, show_progress_on=[status])
            gain.change(difference_gallery, [differences, gain], difference_images, queue=False)

            def clear_history():
                return [], *chart_update([]), []

            clear.click(clear_history, None, [history, chart, chart_note, history_table], queue=False)

        if HAS_VIDEO and VIDEO_METHOD in all_methods():
            with gr.Tab("Video (anchor frame)"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=340):
                        v_model = gr.Textbox(config.video_model, label="AnimateDiff model", elem_id="v_model")
                        v_prompt = gr.Textbox("portrait of a woman smiling", label="prompt", elem_id="v_prompt")
                        v_run = gr.Button("Generate video", variant="primary", elem_id="v_generate")
                        v_status = gr.Markdown("", elem_id="v_status", min_height=64)
                        gr.Markdown(f"**{VIDEO_METHOD}**: {method_help(VIDEO_METHOD)}.  \nStock AnimateDiff vs FAAC's "
                                    "anchor frame (the anchor frame is denoised by the image model; the others also "
                                    "attend to it).")
                        with gr.Accordion("generation settings", open=False, elem_id="v_settings"):
                            with gr.Row():
                                v_frames = gr.Number(8, precision=0, label="frames", info=f"2 to {config.max_frames}",
                                                     elem_id="v_frames")
                                v_steps = gr.Number(min(8, config.max_steps), precision=0, label="sampling steps",
                                                    info=f"denoising steps, 1 to {config.max_steps}",
                                                    elem_id="v_steps")
                            with gr.Row():
                                v_height = gr.Number(0, precision=0, label="height", info="0: model default")
                                v_width = gr.Number(0, precision=0, label="width", info="0: model default")
                            with gr.Row():
                                v_guidance = gr.Number(7.5, label="guidance scale")
                                v_seed = gr.Number(0, precision=0, label="noise seed")
                            v_photo = gr.Image(type="pil", label="photo to animate (optional: the anchor starts "
                                               "from its DDIM inversion)", sources=["upload"])
                        with gr.Accordion(f"{VIDEO_METHOD} options", open=False, elem_id="v_options"):
                            # every option of the method, except the frame count the video itself sets
                            video_fields = [f for f in option_fields([VIDEO_METHOD]) if f.option.name != "num_frames"]
                            video_options = [f.component(True) for f in video_fields]
                    with gr.Column(scale=3):
                        v_timings = gr.Markdown("", elem_id="v_timings")
                        with gr.Row():
                            v_stock = gr.Image(label="stock AnimateDiff", type="filepath", elem_id="v_stock")
                            v_anchor = gr.Image(label="anchor frame", type="filepath", elem_id="v_anchor")

                video_inputs = [v_model, v_prompt, v_frames, v_height, v_width, v_steps, v_guidance, v_seed,
                                v_photo]

                def generate_video(*values, progress=gr.Progress()):
                    (model_, prompt_, frames_, height_, width_, steps_, guidance_, seed_,
                     photo_) = values[:len(video_inputs)]
                    try:
                        options = options_of(VIDEO_METHOD, video_fields, list(values[len(video_inputs):]))
                        stock_path, anchor_path, stock_s, anchor_s = worker.compare_videos(
                            model_, prompt_, frames_, height_, width_, steps_, guidance_, seed_, options,
                            photo_, progress)
                    except Exception as err:  # noqa: BLE001
                        raise page_error(err) from None
                    return (str(stock_path), str(anchor_path),
                            timings_markdown(VIDEO_METHOD, stock_s * 1000, anchor_s * 1000), "Done.")

                def clear_video():
                    return None, None, "", ""

                video_outputs = [v_stock, v_anchor, v_timings, v_status]
                v_run.click(clear_video, None, video_outputs, queue=False).then(
                    generate_video, [*video_inputs, *video_options], video_outputs,
                    concurrency_id="pipeline", concurrency_limit=1, show_progress_on=[v_status])

    demo.queue(max_size=config.queue_size, default_concurrency_limit=1)
    drop_averaged_eta(demo)
    demo.diffusers_ext_config = config
    return demo


THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch_app(demo: gr.Blocks, config: AppConfig, **launch_kwargs):
    """`demo.launch` on the configured host and port, with local fonts only (no font download)."""
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("diffusers-ext app: serving on %s: anyone who reaches this address can use it", config.host)
    return demo.launch(server_name=config.host, server_port=config.port, theme=gr.themes.Default(**THEME_FONTS),
                       show_error=False, **launch_kwargs)
