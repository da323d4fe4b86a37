"""The digits lab: the shipped model draws the digits it is asked for; data, classifier, pixel-space SiT."""

import json

import pytest
import torch
from helpers import require_module

import diffusers_ext as dx
from diffusers_ext import digits
from diffusers_ext.pipelines.sit import SiTPipeline

require_module("sklearn", "the lab extra: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def data():
    return digits.load_digits_images()


@pytest.fixture(scope="module")
def classifier():
    return digits.load_classifier()


def test_data_and_augmentation(data):
    images, labels = data
    assert images.shape == (1797, 1, 16, 16) and labels.shape == (1797,)
    assert images.min() == -1 and images.max() == 1 and set(labels.tolist()) == set(range(10))
    batch = images[:16]
    same = digits.augment(batch, torch.Generator().manual_seed(0), strength=0.0)
    torch.testing.assert_close(same, batch, atol=1e-5, rtol=0)               # the identity map is exact
    moved = digits.augment(batch, torch.Generator().manual_seed(0))
    again = digits.augment(batch, torch.Generator().manual_seed(0))
    assert torch.equal(moved, again) and not torch.allclose(moved, batch, atol=0.05)
    assert moved.min() >= -1 - 1e-6 and moved.max() <= 1 + 1e-6
    blank = digits.augment(-torch.ones(4, 1, 16, 16), torch.Generator().manual_seed(0))
    assert torch.equal(blank, -torch.ones(4, 1, 16, 16))                      # what comes in from outside is background
    ink = (moved + 1).sum(dim=(1, 2, 3)) / (batch + 1).sum(dim=(1, 2, 3))
    assert ink.min() > 0.6 and ink.max() < 1.4                                 # a small map: the digit stays in view


def test_shipped_classifier_on_its_held_out_digits(data, classifier):
    images, labels = data
    _, test = digits.split_indices(len(images))
    accuracy = digits.class_accuracy(classifier, images[test], labels[test])
    recorded = json.loads((digits.ASSETS / "training.json").read_text())["classifier"]["held_out_accuracy"]
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(recorded, abs=1e-6)                     # the shipped file is the one trained
    with pytest.raises(ValueError, match="16, 16"):
        classifier.predict(torch.zeros(2, 1, 8, 8))


def test_shipped_model_draws_the_requested_digits(classifier):
    pipe = digits.digits_pipeline()
    labels = torch.arange(10).repeat(3)
    samples = digits.generate(pipe, labels, seed=1)
    assert samples.shape == (30, 1, 16, 16)
    accuracy = digits.class_accuracy(classifier, samples, labels)
    assert accuracy >= 0.8, accuracy                                         # chance is 0.1
    # the app's preselected model
    from diffusers_ext.loading import load_pipeline

    loaded = load_pipeline("digits")
    assert isinstance(loaded, SiTPipeline) and loaded.vae is None
    torch.testing.assert_close(loaded.transformer.state_dict(), pipe.transformer.state_dict(), atol=0, rtol=0)


def test_missing_weights_say_how_to_make_them(tmp_path, capsys):
    with pytest.raises(SystemExit):
        digits.main(["train", "--steps", "0", "--output", str(tmp_path)])
    assert "--steps and --classifier-steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="diffusers_ext.digits train"):
        digits.digits_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="diffusers_ext.digits train"):
        digits.load_classifier(tmp_path)


def test_pixel_space_sit_guides_with_its_own_null_class():
    torch.manual_seed(0)
    pipe = digits.make_pipeline(digits.digits_transformer().eval())
    pipe.set_progress_bar_config(disable=True)
    assert pipe.num_classes == 10 and pipe.get_label_ids(["3", "7"]) == [3, 7]
    x = torch.randn(2, 1, 16, 16)
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        guided = pipe.velocity(x, 0.3, labels, 2.5, None)
        t = torch.full((4,), 0.3)
        out = pipe.transformer(torch.cat([x, x]), timestep=t, class_labels=torch.tensor([3, 7, 10, 10])).sample
    cond, uncond = out.chunk(2)
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond))
    images = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 16, 16) and images.min() >= 0 and images.max() <= 1   # no VAE: pixels
    with pytest.raises(ValueError, match="0..9"):
        pipe(class_labels=[10], num_inference_steps=1)
    with pytest.raises(ValueError, match="guide_channels"):
        pipe(class_labels=[1], num_inference_steps=1, guide_channels=3)


def test_distillation_on_the_training_digits(data):
    from diffusers_ext.distill import DistillConfig, Distiller

    images, labels = data
    pipe = digits.digits_pipeline()
    config = DistillConfig(output_dir="unused", batch_size=4, max_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"data must be \(N, 1, 16, 16\)"):
        Distiller(pipe, "mediator", config, data=images[:, :, :8], labels=labels)
    dx.unpatch(pipe)
    trainer = Distiller(pipe, "mediator", config, data=images, labels=labels)
    assert trainer.latent_shape == (1, 16, 16)                               # pixel space: no VAE factor
    batch = trainer.sample_batch(0)
    assert batch["hidden_states"].shape == (4, 1, 16, 16)
    assert batch["class_labels"].max() <= 10                                 # 10 = the null class
    dx.unpatch(pipe)


def test_compare_on_the_digits_uses_their_family_method(tmp_path):
    from PIL import Image

    from diffusers_ext.compare import compare

    summary = compare("digits", steps=2, out=str(tmp_path / "side.png"), warmup=False)
    assert summary["model"] == "digits" and summary["pipeline"] == "SiTPipeline"
    assert summary["method"] == "mediator" and summary["speedup"] > 0
    image = Image.open(tmp_path / "side.png")
    assert image.width > 10 * 16 * 2 and image.mode == "RGB"                # every digit, both runs, enlarged


def test_fid_sampling_of_the_grey_digits(tmp_path):
    """`diffusers-ext sample` writes the one-channel digits as RGB uint8, quantised like every pipeline."""
    import numpy as np

    from diffusers_ext.eval.sampling import to_uint8

    grey = np.array([0.0, 0.2, 1.0], dtype=np.float32).reshape(1, 1, 3, 1)
    assert to_uint8(grey).shape == (1, 1, 3, 3)
    assert to_uint8(grey)[0, 0].tolist() == [[0] * 3, [51] * 3, [255] * 3]
    from diffusers_ext.cli import main

    assert main(["sample", "--model", "digits", "--num-samples", "2", "--steps", "1", "--no-progress",
                 "--output-dir", str(tmp_path)]) == 0
    images = np.load(tmp_path / "samples.npz")["arr_0"]
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 2]).all()
