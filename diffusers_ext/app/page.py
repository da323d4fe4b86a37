"""The app's page: the gr.Blocks layout and its events (the work is `runner.Worker`'s).

    from diffusers_ext.app.page import build_app, launch_app
    demo = build_app(AppConfig(max_steps=30))      # a gr.Blocks with its queue configured
    launch_app(demo, AppConfig())                  # or demo.launch(...) yourself
"""

from __future__ import annotations

import logging

import gradio as gr

from diffusers_ext.compare import DEFAULT_PROMPT
from diffusers_ext.registry import all_methods

from .config import AppConfig
from .runner import HAS_VIDEO, VIDEO_METHOD, Worker, enlarge, error_message, suggested_method
from .widgets import option_fields, options_of

logger = logging.getLogger("diffusers_ext.app")


def method_help(name: str) -> str:
    info = all_methods()[name].info()
    kind = "training-free" if info["training_free"] else "needs a short fine-tune (here: its initial weights)"
    return f"**{name}**: {info['description']}  \nmodels: {', '.join(info['families'])}; {kind}"


def timings_markdown(method: str, stock_ms: float, patched_ms: float, extra: str = "") -> str:
    return (
        f"| | stock | {method} |\n|---|---|---|\n"
        f"| time per step | {stock_ms:.1f} ms | {patched_ms:.1f} ms |\n\n"
        f"**speed ratio** (stock / {method}): **{stock_ms / patched_ms:.2f}x**{extra}"
    )


def _fail(err: BaseException, outputs: int) -> tuple:
    message = error_message(err)
    gr.Warning(message)
    return (*([None] * outputs), "", f"**Error:** {message}")


def build_app(config: AppConfig | None = None) -> gr.Blocks:
    """The demo as a `gr.Blocks`, its queue configured (one generation at a time, `queue_size` waiting)."""
    config = config or AppConfig()
    worker = Worker(config)
    methods = [name for name in all_methods() if name != VIDEO_METHOD]
    default_method = suggested_method(config.model, methods) or ("agent" if "agent" in methods else methods[0])
    models = list(dict.fromkeys([config.model, *config.models]))

    with gr.Blocks(title="diffusers-ext", analytics_enabled=False) as demo:
        gr.Markdown("# diffusers-ext\nThe stock and the patched pipeline from the same seed, side by side: "
                    "time per denoising step and the speed ratio. `digits` is a small SiT trained in this "
                    "repository on handwritten digits (class label 0-9): real images, offline. The `tiny:*` "
                    "models are random, so their images are noise; their timings still compare the code paths.")
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column(scale=1):
                    model = gr.Dropdown(models, value=config.model, label="model",
                                        allow_custom_value=config.custom_models, elem_id="model",
                                        info="embedded (offline)" + (", a hub id or a local folder" if config.custom_models else ""))
                    method = gr.Dropdown(methods, value=default_method, label="method", elem_id="method")
                    method_info = gr.Markdown(method_help(default_method))
                    prompt = gr.Textbox(DEFAULT_PROMPT, label="prompt", info="text-to-image models", elem_id="prompt")
                    class_label = gr.Number(7, precision=0, label="class label", elem_id="class_label",
                                            info="class-conditional models: 0-9 for digits, 0-999 for ImageNet DiT / SiT")
                    with gr.Row():
                        height = gr.Number(0, precision=0, label="height", elem_id="height",
                                           info=f"0: model default; at most {config.max_side}")
                        width = gr.Number(0, precision=0, label="width", elem_id="width",
                                          info=f"0: model default; at most {config.max_side}")
                    with gr.Row():
                        steps = gr.Number(min(config.default_steps, config.max_steps), precision=0, label="steps",
                                          info=f"1 to {config.max_steps}", elem_id="steps")
                        batch = gr.Number(1, precision=0, label="batch size", info=f"1 to {config.max_batch}",
                                          elem_id="batch")
                    with gr.Row():
                        guidance = gr.Textbox("", label="guidance scale", placeholder="pipeline default",
                                              info="empty: the pipeline's default", elem_id="guidance")
                        seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                    warmup = gr.Checkbox(True, label="warm-up run first (fair timings)", elem_id="warmup")
                    with gr.Accordion("method options", open=True):
                        image_fields = option_fields(methods)
                        image_options = [f.component(f.method == default_method) for f in image_fields]
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    status = gr.Markdown("", elem_id="status")
                    timings = gr.Markdown("", elem_id="timings")
                    with gr.Row():
                        stock_images = gr.Gallery(label="stock", elem_id="stock-images", columns=2, height="auto")
                        patched_images = gr.Gallery(label="patched", elem_id="patched-images", columns=2, height="auto")

            def show_method(name):
                return [method_help(name), *[gr.update(visible=f.method == name) for f in image_fields]]

            method.change(show_method, method, [method_info, *image_options], queue=False)

            def pick_method(name, current):
                suggested = suggested_method(name, methods)
                return gr.update(value=suggested) if suggested and suggested != current else gr.update()

            model.change(pick_method, [model, method], method, queue=False)

            image_inputs = [model, method, prompt, class_label, height, width, steps, guidance, batch, seed, warmup]

            def generate(*values, progress=gr.Progress()):
                (model_, method_, prompt_, label_, height_, width_, steps_, guidance_, batch_, seed_,
                 warmup_) = values[:len(image_inputs)]
                try:
                    options = options_of(method_, image_fields, list(values[len(image_inputs):]))
                    result = worker.compare_images(model_, method_, prompt_, label_, height_, width_, steps_,
                                                   guidance_, batch_, seed_, bool(warmup_), options, progress)
                except Exception as err:  # noqa: BLE001  (every failure becomes a message, never a stuck page)
                    return _fail(err, 2)
                s = result.summary
                given = ", ".join(f"{k}={v!r}" for k, v in s["options"].items()) or "defaults"
                extra = (f"  \n{s['pipeline']}, {s['steps']} steps, options: {given}; image difference "
                         f"(relative L2) {s['image_rel_l2']:.4f}")
                return ([enlarge(i) for i in result.stock.images], [enlarge(i) for i in result.patched.images],
                        timings_markdown(method_, s["stock_ms_per_step"], s["patched_ms_per_step"], extra),
                        "Done.")

            run.click(generate, [*image_inputs, *image_options], [stock_images, patched_images, timings, status],
                      concurrency_id="pipeline", concurrency_limit=1)

        if HAS_VIDEO and VIDEO_METHOD in all_methods():
            with gr.Tab("Video (anchor frame)"):
                with gr.Row():
                    with gr.Column(scale=1):
                        gr.Markdown(method_help(VIDEO_METHOD) + "  \nStock AnimateDiff vs FAAC's anchor frame "
                                    "(the anchor frame is denoised by the image model; the others also attend to it).")
                        v_model = gr.Textbox(config.video_model, label="AnimateDiff model", elem_id="v_model")
                        v_prompt = gr.Textbox("portrait of a woman smiling", label="prompt", elem_id="v_prompt")
                        with gr.Row():
                            v_frames = gr.Number(8, precision=0, label="frames", info=f"2 to {config.max_frames}",
                                                 elem_id="v_frames")
                            v_steps = gr.Number(min(8, config.max_steps), precision=0, label="steps",
                                                info=f"1 to {config.max_steps}", elem_id="v_steps")
                        with gr.Row():
                            v_height = gr.Number(0, precision=0, label="height", info="0: model default")
                            v_width = gr.Number(0, precision=0, label="width", info="0: model default")
                        with gr.Row():
                            v_guidance = gr.Number(7.5, label="guidance scale")
                            v_seed = gr.Number(0, precision=0, label="seed")
                        v_photo = gr.Image(type="pil", label="photo to animate (optional: the anchor starts from "
                                           "its DDIM inversion)", sources=["upload"])
                        # every option of the method, except the frame count the video itself sets
                        video_fields = [f for f in option_fields([VIDEO_METHOD]) if f.option.name != "num_frames"]
                        video_options = [f.component(True) for f in video_fields]
                        v_run = gr.Button("Generate video", variant="primary", elem_id="v_generate")
                    with gr.Column(scale=2):
                        v_status = gr.Markdown("", elem_id="v_status")
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
                        return _fail(err, 2)
                    return (str(stock_path), str(anchor_path),
                            timings_markdown(VIDEO_METHOD, stock_s * 1000, anchor_s * 1000), "Done.")

                v_run.click(generate_video, [*video_inputs, *video_options], [v_stock, v_anchor, v_timings, v_status],
                            concurrency_id="pipeline", concurrency_limit=1)

    demo.queue(max_size=config.queue_size, default_concurrency_limit=1)
    demo.diffusers_ext_config = config
    return demo


THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch_app(demo: gr.Blocks, config: AppConfig, **launch_kwargs):
    """`demo.launch` on the configured host and port, with local fonts only (no font download)."""
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("diffusers-ext app: serving on %s: anyone who reaches this address can use it", config.host)
    return demo.launch(server_name=config.host, server_port=config.port, theme=gr.themes.Default(**THEME_FONTS),
                       show_error=False, **launch_kwargs)
