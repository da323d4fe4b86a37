"""FAAC's training-based anchor frame: video clips, the motion-module trainer, the saved adapter, the command."""

import copy

import numpy as np
import pytest
import torch
from helpers import require_module
from PIL import Image

from diffusers_ext.cli import main
from diffusers_ext.patching import patch_record
from diffusers_ext.pipelines import animatediff_anchor as faac
from diffusers_ext.pipelines.animatediff_anchor.synthetic import synthetic_video, write_synthetic_videos
from diffusers_ext.pipelines.animatediff_anchor.videos import read_clips, resize_crop
from diffusers_ext.testing import tiny_pipeline as _build

FRAMES, SIDE = 4, 16  # clips of 4 frames, 16 x 16 pixels (8 x 8 latents): seconds on 2 cores
_PIPELINES = {}


def tiny_pipeline(family):
    """A fresh copy of the tiny pipeline (copied, not rebuilt: the trainer changes its weights)."""
    if family not in _PIPELINES:
        _PIPELINES[family] = _build(family)
    return copy.deepcopy(_PIPELINES[family])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    write_synthetic_videos(folder, count=4, frames=8, size=24, seed=0)
    return folder


def _config(out, **kwargs):
    base = dict(output_dir=str(out), frames=FRAMES, resolution=SIDE, batch_size=2, max_steps=12, lr=3e-3,
                cpu=True, progress=False)
    return faac.MotionTrainConfig(**{**base, **kwargs})


def _is_motion(name):
    return ".motion_modules." in f".{name}"


@pytest.fixture(scope="module")
def trained(videos, tmp_path_factory):
    """A short run on the synthetic set: (trainer, result, held-out clips)."""
    out = tmp_path_factory.mktemp("run") / "adapter"
    held_out = tmp_path_factory.mktemp("held_out")
    write_synthetic_videos(held_out, count=3, frames=8, size=24, seed=7)
    trainer = faac.MotionTrainer(tiny_pipeline("animatediff"), videos, _config(out, batch_size=1, max_steps=8))
    clips = faac.load_clips(trainer.pipe.vae, held_out, frames=FRAMES, height=SIDE, width=SIDE)
    before = trainer.evaluate(clips)
    result = trainer.train(evaluate=False)
    return trainer, result, clips, before


# --- data ----------------------------------------------------------------------------------------------

def test_clips_follow_frames_and_stride_in_every_format(tmp_path):
    cv2 = require_module("cv2", "opencv-python, installed with the eval extra")
    video, _ = synthetic_video(1, frames=8, size=SIDE)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i, frame in enumerate(video):
        Image.fromarray(frame).save(frames_dir / f"{i:04d}.png")
    images = [Image.fromarray(frame) for frame in video]
    images[0].save(tmp_path / "v.gif", save_all=True, append_images=images[1:], duration=100)
    writer = cv2.VideoWriter(str(tmp_path / "v.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8, (SIDE, SIDE))
    for frame in video:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    writer = cv2.VideoWriter(str(tmp_path / "v.webm"), cv2.VideoWriter_fourcc(*"VP80"), 8, (SIDE, SIDE))
    for frame in video:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()

    # 3 frames at stride 2 span 5 source frames: one clip (0, 2, 4) of an 8-frame video
    expected = torch.from_numpy(video[[0, 2, 4]]).permute(0, 3, 1, 2).float()[None] / 127.5 - 1
    for source in (frames_dir, tmp_path / "v.gif"):
        torch.testing.assert_close(read_clips(source, 3, 2, SIDE, SIDE), expected, rtol=0, atol=0)
    for lossy in ("v.mp4", "v.webm"):
        clip = read_clips(tmp_path / lossy, 3, 2, SIDE, SIDE)
        assert clip.shape == expected.shape and float((clip - expected).abs().mean()) < 0.1, lossy
    assert read_clips(frames_dir, 2, 1, SIDE, SIDE).shape[0] == 4  # non-overlapping clips of 2


def test_resize_covers_then_crops_the_centre():
    pixels = np.zeros((24, 48, 3), np.uint8)
    pixels[:, :16, 0] = pixels[:, 16:32, 1] = pixels[:, 32:, 2] = 255  # red | green | blue thirds
    crop = np.asarray(resize_crop(Image.fromarray(pixels), 16, 16))
    # cover: 48 x 24 -> 32 x 16; centre crop keeps resized columns 8..23 = source columns 12..36
    assert crop.shape == (16, 16, 3)
    assert crop[8, 0].argmax() == 0 and crop[8, 8].argmax() == 1 and crop[8, 15].argmax() == 2


def test_latents_are_cached_and_reused(videos, tmp_path):
    vae = tiny_pipeline("animatediff").vae
    first = faac.load_clips(vae, videos, frames=FRAMES, height=SIDE, width=SIDE, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4 and len(first) == 8  # 4 videos x 2 clips
    assert first.captions[0] == (videos / "clip-000.txt").read_text().strip()
    for file in tmp_path.glob("*.safetensors"):  # the second read must come from the cache
        from safetensors.torch import save_file

        save_file({"latents": torch.zeros(2, 4, FRAMES, 8, 8)}, str(file))
    assert float(faac.load_clips(vae, videos, frames=FRAMES, height=SIDE, width=SIDE,
                                 cache_dir=tmp_path).latents.abs().sum()) == 0.0


# --- the trainer ---------------------------------------------------------------------------------------

def test_short_run_lowers_the_non_anchor_loss_and_trains_only_motion(trained):
    trainer, result, clips, before = trained
    assert result.steps == 8 and result.clips == 8
    assert trainer.evaluate(clips) < 0.97 * before            # held-out clips, fixed batches
    stock = tiny_pipeline("animatediff")
    changed = {n for n, p in trainer.pipe.unet.state_dict().items() if not torch.equal(p, stock.unet.state_dict()[n])}
    assert changed and all(_is_motion(n) for n in changed)   # the image model stays frozen, bit for bit
    for name in ("vae", "text_encoder"):
        for key, value in getattr(stock, name).state_dict().items():
            assert torch.equal(getattr(trainer.pipe, name).state_dict()[key], value)


def test_anchor_frame_output_stays_the_image_models(trained):
    trainer, *_ = trained
    stock = tiny_pipeline("animatediff")
    image_unet = faac.image_model_unet(stock.unet)     # the untrained image model
    sample = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(3))
    embeds = stock.encode_prompt("a red square", "cpu", 1, False)[0]
    for anchor in (0, 2):
        with torch.no_grad():
            alone = image_unet(sample[:, :, anchor], 300, encoder_hidden_states=embeds).sample
            bypass = faac.MotionBypass(trainer.pipe.unet, anchor)
            bypass_stock = faac.MotionBypass(stock.unet, anchor)
            try:
                video = trainer.pipe.unet(sample, 300, encoder_hidden_states=embeds.repeat_interleave(FRAMES, 0)).sample
                video_stock = stock.unet(sample, 300, encoder_hidden_states=embeds.repeat_interleave(FRAMES, 0)).sample
            finally:
                bypass.remove()
                bypass_stock.remove()
        torch.testing.assert_close(video[:, :, anchor], alone, rtol=1e-5, atol=1e-5)
        others = [f for f in range(FRAMES) if f != anchor]
        assert not torch.allclose(video[:, :, others], video_stock[:, :, others], atol=1e-4)  # training acted


def test_trained_adapter_loads_back(trained):
    from diffusers import MotionAdapter

    trainer, result, *_ = trained
    adapter = MotionAdapter.from_pretrained(result.output_dir)
    ours = {k: v for k, v in trainer.pipe.unet.state_dict().items() if _is_motion(k)}
    assert len(ours) == len(adapter.state_dict())
    for key, value in adapter.state_dict().items():
        assert torch.equal(value, ours[key])

    fresh = tiny_pipeline("animatediff")
    kwargs = dict(num_frames=FRAMES, num_inference_steps=2, height=SIDE, width=SIDE, output_type="latent")
    stock = faac.animate(fresh, "a red square", generator=torch.Generator().manual_seed(0), **kwargs).frames
    loaded = faac.animate(fresh, "a red square", generator=torch.Generator().manual_seed(0),
                          motion_adapter=result.output_dir, **kwargs).frames
    reference = faac.animate(trainer.pipe, "a red square", generator=torch.Generator().manual_seed(0), **kwargs).frames
    torch.testing.assert_close(loaded, reference, rtol=0, atol=0)
    assert not torch.allclose(loaded, stock, atol=1e-4)
    again = faac.animate(fresh, "a red square", generator=torch.Generator().manual_seed(0), **kwargs).frames
    torch.testing.assert_close(again, stock, rtol=0, atol=0)  # the pipeline's own motion modules are back


def test_resume_equals_uninterrupted(videos, tmp_path):
    cache = str(tmp_path / "cache")
    straight = faac.MotionTrainer(tiny_pipeline("animatediff"), videos,
                                  _config(tmp_path / "a", max_steps=2, batch_size=1, cache_dir=cache))
    straight.train(evaluate=False)
    first = faac.MotionTrainer(tiny_pipeline("animatediff"), videos,
                               _config(tmp_path / "b", max_steps=1, batch_size=1, checkpoint_every=1, cache_dir=cache))
    first.train(evaluate=False)
    assert [p.name for p in (tmp_path / "b").glob("checkpoint-*")] == ["checkpoint-1"]
    resumed = faac.MotionTrainer(tiny_pipeline("animatediff"), videos,
                                 _config(tmp_path / "b", max_steps=2, batch_size=1, resume="latest", cache_dir=cache))
    result = resumed.train(evaluate=False)
    assert result.steps == 2 and len(result.losses) == 1
    for name, value in straight.trained_tensors().items():
        torch.testing.assert_close(resumed.trained_tensors()[name], value, rtol=1e-5, atol=1e-7)


def test_lora_starts_at_the_model_trains_only_itself_and_merges(videos, tmp_path):
    stock = tiny_pipeline("animatediff")
    trainer = faac.MotionTrainer(tiny_pipeline("animatediff"), videos,
                                 _config(tmp_path / "lora", lora_rank=2, lora_alpha=4.0, max_steps=2, batch_size=1))
    assert all(".parametrizations.weight.0." in n for n in trainer.trained)
    plain = faac.MotionTrainer(stock, videos, _config(tmp_path / "plain", batch_size=1))
    with torch.no_grad(), trainer.hooked():
        lora_loss = trainer.loss(0)
    with torch.no_grad(), plain.hooked():
        torch.testing.assert_close(lora_loss, plain.loss(0), rtol=1e-6, atol=0)  # up = 0: the pretrained model
    base = {n: v.clone() for n, v in stock.unet.state_dict().items()}
    trainer.train(evaluate=False)
    merged = trainer.pipe.unet.state_dict()
    changed = {n for n, v in merged.items() if not torch.equal(v, base[n])}
    assert changed and all(_is_motion(n) and n.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for n in changed)
    for name in changed:  # W + (alpha / r) up @ down, from the trained LoRA tensors
        prefix = name[: -len(".weight")]
        up = trainer.trained[f"{prefix}.parametrizations.weight.0.up"].detach()
        down = trainer.trained[f"{prefix}.parametrizations.weight.0.down"].detach()
        torch.testing.assert_close(merged[name], base[name] + 2.0 * up @ down, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(videos, tmp_path):
    grads = []
    for checkpointing in (False, True):
        trainer = faac.MotionTrainer(tiny_pipeline("animatediff"), videos,
                                     _config(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing))
        with trainer.hooked():
            trainer.loss(0).backward()
        grads.append([p.grad.clone() for p in trainer.trained.values()])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_anchor_attention_during_training_acts_and_leaves_no_patch(videos, tmp_path):
    plain = faac.MotionTrainer(tiny_pipeline("animatediff"), videos, _config(tmp_path / "p"))
    attention = faac.MotionTrainer(tiny_pipeline("animatediff"), videos,
                                   _config(tmp_path / "a", anchor_attention=True, max_steps=1, batch_size=1))
    with torch.no_grad(), plain.hooked(), attention.hooked():
        assert patch_record(attention.unet) is not None
        assert not torch.allclose(plain.loss(0), attention.loss(0))
    assert patch_record(attention.unet) is None
    attention.train(evaluate=False)
    assert patch_record(attention.unet) is None


# --- the command and bad input -------------------------------------------------------------------------

def test_animate_train_command_writes_a_loadable_adapter(videos, tmp_path, capsys):
    from diffusers import MotionAdapter

    out = tmp_path / "adapter"
    argv = ["animate-train", str(videos), "--output-dir", str(out), "--frames", str(FRAMES), "--resolution",
            str(SIDE), "--max-steps", "2", "--cpu", "--no-progress"]
    assert main(argv) == 0
    assert '"steps": 2' in capsys.readouterr().out
    MotionAdapter.from_pretrained(out)
    assert main(["animate", "--motion-adapter", str(out), "--frames", str(FRAMES), "--steps", "1", "--height",
                 str(SIDE), "--width", str(SIDE), "--out", str(tmp_path / "v.gif")]) == 0
    assert (tmp_path / "v.gif").is_file()
    assert main(argv) == 2  # a finished adapter is never trained over
    assert "already holds a motion adapter" in capsys.readouterr().err


def _bad_inputs(root):
    cases = {}
    (root / "unreadable").mkdir()
    (root / "unreadable" / "a.gif").write_bytes(b"not a gif")
    (root / "unreadable" / "a.txt").write_text("a clip")
    cases["unreadable"] = "cannot read video"
    write_synthetic_videos(root / "short", count=1, frames=3, size=SIDE)
    cases["short"] = "has 3 frames; a clip of 4 frames at stride 1 needs 4"
    mixed = root / "mixed" / "clip"
    mixed.mkdir(parents=True)
    for i, size in enumerate((16, 16, 20, 16)):
        Image.new("RGB", (size, size)).save(mixed / f"{i}.png")
    (root / "mixed" / "clip.txt").write_text("a clip")
    cases["mixed"] = "different sizes"
    write_synthetic_videos(root / "unsupported", count=1, frames=8, size=SIDE)
    (root / "unsupported" / "notes.pdf").write_bytes(b"%PDF")
    cases["unsupported"] = "unsupported file"
    write_synthetic_videos(root / "uncaptioned", count=1, frames=8, size=SIDE)
    (root / "uncaptioned" / "clip-000.txt").unlink()
    cases["uncaptioned"] = "no caption for"
    return cases


def test_bad_videos_are_one_line_errors(tmp_path, capsys):
    for name, message in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{name}"
        code = main(["animate-train", str(tmp_path / name), "--output-dir", str(out), "--frames", str(FRAMES),
                     "--resolution", str(SIDE), "--max-steps", "1", "--cpu", "--no-progress"])
        ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffusers-ext")]
        assert code == 2 and len(ours) == 1 and message in ours[0], (name, ours)
        assert not (out / "config.json").exists() and not list(out.glob("checkpoint-*"))


def test_bad_settings_are_refused(videos, tmp_path):
    with pytest.raises(ValueError, match="frames must be >= 2"):
        faac.MotionTrainConfig(frames=1)
    with pytest.raises(ValueError, match="anchor"):
        faac.MotionTrainConfig(frames=4, anchor=4)
    with pytest.raises(ValueError, match="multiple of the VAE"):
        faac.MotionTrainer(tiny_pipeline("animatediff"), videos, _config(tmp_path, resolution=15))
    with pytest.raises(TypeError, match="not an AnimateDiff pipeline"):
        faac.MotionTrainer(tiny_pipeline("sd"), videos, _config(tmp_path))
    first = faac.MotionTrainer(tiny_pipeline("animatediff"), videos, _config(tmp_path / "lora", lora_rank=2, max_steps=1,
                                                                            checkpoint_every=1))
    first.train(evaluate=False)
    with pytest.raises(ValueError, match="same --lora-rank"):
        faac.MotionTrainer(tiny_pipeline("animatediff"), videos,
                           _config(tmp_path / "lora", max_steps=2, resume=str(tmp_path / "lora" / "checkpoint-1"))).train()
