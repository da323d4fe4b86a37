"""The digits lab: a small class-conditional SiT trained here, offline, on scikit-learn's handwritten digits.

Random-weight models say nothing about image quality, and no pretrained weights can be downloaded on
the machines this project runs on. So the repository trains a real (small) model and ships it:

    pipe = digits_pipeline()                               # the shipped weights, pixel space, 16 x 16
    images = pipe(class_labels=[3, 7], num_inference_steps=12, guidance_scale=2.0).images

- Data: the 1797 8 x 8 digits of `sklearn.datasets.load_digits` (16 grey levels), upscaled bilinearly
  to 16 x 16 in [-1, 1], augmented on the fly by small random affine maps (rotation, scale, shift, shear).
- Model: a `DiTTransformer2DModel` working in pixel space (1 channel, patch size 1, so 256 tokens an
  image: mediators pool them to 16-64, a real reduction), 6 blocks of width 128 (4 heads), 10 classes
  plus the null class for guidance, trained on SiT's linear interpolant (velocity target, t ~ U[0, 1],
  the model takes t itself, exactly what `SiTPipeline` and the distillation trainer use).
- Classifier: a small CNN on the same 16 x 16 images (`DigitClassifier`), trained with the same
  augmentation on 80 % of the digits; its held-out accuracy is recorded with the weights. It scores
  generated images: the share classified as the digit that was asked for.

`python -m diffusers_ext.digits train` retrains both and rewrites `diffusers_ext/assets/digits/` (about
30 min on a 2-core CPU; the record of the run is `assets/digits/training.json`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ASSETS = Path(__file__).parent / "assets" / "digits"
RESOLUTION = 16
NUM_CLASSES = 10
TRANSFORMER_CONFIG = dict(
    sample_size=RESOLUTION, patch_size=1, in_channels=1, out_channels=1, num_layers=6,
    num_attention_heads=4, attention_head_dim=32, num_embeds_ada_norm=NUM_CLASSES,
    norm_type="ada_norm_zero", norm_elementwise_affine=False,
)
# what the lab samples with (few steps: the model is small and the images smooth)
SAMPLING = dict(num_inference_steps=12, guidance_scale=2.0, sampler="ode-heun")


# --- data -------------------------------------------------------------------------------------------------

def load_digits_images(resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits -> (images (1797, 1, R, R) in [-1, 1], labels (1797,) int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data comes with scikit-learn: pip install 'diffusers-ext[lab]'") from err
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)   # (N, 1, 8, 8) in [0, 1]
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.from_numpy(digits.target).long()


def split_indices(n: int, held_out: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random (train, test) split of range(n)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(round(n * (1 - held_out)))
    return order[:cut], order[cut:]


def augment(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random affine maps of images (B, C, H, W) in [-1, 1]: rotation up to 12 degrees, scale 0.9-1.1,
    shear up to 0.1 and a shift up to 1/8 of the side (times `strength`); the background stays -1."""
    b = images.shape[0]
    u = lambda: torch.rand(b, generator=generator) * 2 - 1  # noqa: E731  (uniform in [-1, 1])
    angle = u() * math.radians(12) * strength
    scale = 1 + u() * 0.1 * strength
    shear = u() * 0.1 * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos, -sin + shear, u() * 0.25 * strength], dim=1),
        torch.stack([sin, cos, u() * 0.25 * strength], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    ink = F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return ink - 1


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless shuffled epochs of augmented (images, labels) batches."""
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield augment(images[index], generator), labels[index]


# --- the classifier ---------------------------------------------------------------------------------------

class GreyImageClassifier(nn.Module):
    """Base of the labs' classifiers: `forward` maps (B, 1, resolution, resolution) images in [-1, 1]
    to logits; `predict` gives class ids in batches, in eval mode."""

    resolution = RESOLUTION

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Class ids (B,) of images (B, 1 or 3, resolution, resolution) in [-1, 1] (3 channels are averaged)."""
        if images.shape[1] == 3:
            images = images.mean(dim=1, keepdim=True)
        size = self.resolution
        if images.shape[1:] != (1, size, size):
            raise ValueError(f"the classifier takes (B, 1, {size}, {size}) images, got {tuple(images.shape)}")
        was_training = self.training
        self.eval()
        out = torch.cat([self(chunk.float()).argmax(1) for chunk in images.split(batch_size)])
        self.train(was_training)
        return out


class DigitClassifier(GreyImageClassifier):
    """A small CNN: (B, 1, 16, 16) images in [-1, 1] -> (B, 10) logits."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     progress: bool = True) -> tuple[DigitClassifier, float]:
    """Train `DigitClassifier` on 80 % of the digits; returns (model in eval mode, held-out accuracy)."""
    from tqdm.auto import tqdm

    images, labels = load_digits_images()
    train, test = split_indices(len(images))
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    data = batches(images[train], labels[train], batch_size, torch.Generator().manual_seed(seed))
    model.train()
    for _ in tqdm(range(steps), desc="classifier", disable=not progress):
        x, y = next(data)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    accuracy = (model.predict(images[test]) == labels[test]).float().mean().item()
    return model, accuracy


def load_classifier(folder: str | Path | None = None) -> DigitClassifier:
    """The classifier saved by `train` (`classifier.safetensors` in `folder`, default the shipped one)."""
    from safetensors.torch import load_file

    path = Path(folder or ASSETS) / "classifier.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no digit classifier at {path}; train one with `python -m diffusers_ext.digits train`")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# --- the generator ----------------------------------------------------------------------------------------

def digits_transformer():
    """The untrained digits transformer (`TRANSFORMER_CONFIG`), with the original DiT / SiT time embedding."""
    from diffusers import DiTTransformer2DModel

    from .pipelines.convert import use_original_time_embedding

    model = DiTTransformer2DModel(**TRANSFORMER_CONFIG)
    use_original_time_embedding(model)
    return model


def make_pipeline(transformer):
    """A pixel-space `SiTPipeline` around `transformer`, labels "0".."9", guidance 2 by default."""
    from .pipelines.sit import SiTPipeline, SiTScheduler

    pipe = SiTPipeline(transformer=transformer, vae=None, scheduler=SiTScheduler(),
                       id2label={i: str(i) for i in range(NUM_CLASSES)})
    pipe.default_guidance_scale = SAMPLING["guidance_scale"]   # 4.0, SiT's default, over-saturates the digits
    pipe.recipe = dict(SAMPLING)   # what every command uses unless told otherwise (pipeline_io.recipe)
    return pipe


def digits_pipeline(folder: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The shipped digits SiT (`assets/digits/transformer`) as a pixel-space `SiTPipeline`, in eval mode."""
    from diffusers import DiTTransformer2DModel

    path = Path(folder or ASSETS) / "transformer"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no digits model at {path}; train one with `python -m diffusers_ext.digits train`")
    transformer = DiTTransformer2DModel.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)
    return make_pipeline(transformer.eval())


def interpolant_batch(x1: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SiT's linear interpolant: t ~ U[0, 1], x_t = t x1 + (1 - t) x0, target v = x1 - x0 (x0 ~ N(0, I))."""
    t = torch.rand(x1.shape[0], generator=generator)
    x0 = torch.randn(x1.shape, generator=generator)
    tt = t.view(-1, 1, 1, 1)
    return tt * x1 + (1 - tt) * x0, t, x1 - x0


def train_generator(steps: int = 1300, batch_size: int = 64, lr: float = 1e-3, warmup: int = 100,
                    ema_decay: float = 0.995, uncond_prob: float = 0.1, seed: int = 0, bf16: bool = True,
                    progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train the digits SiT from scratch on all 1797 digits; returns (EMA model in eval mode, record).

    AdamW at `lr` with linear warm-up and cosine decay; class labels replaced by the null class with
    `uncond_prob` (for guidance), on top of which DiT's label embedder drops another 10 % in train mode
    (its `class_dropout_prob`, from the seeded global RNG): 19 % unconditional in all with the defaults.
    bf16 autocast on the CPU when `bf16` (weights and optimizer in fp32).
    """
    from tqdm.auto import tqdm

    images, labels = load_digits_images()
    torch.manual_seed(seed)
    model = digits_transformer().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    from .distill.loop import ema_update

    generator = torch.Generator().manual_seed(seed)
    data = batches(images, labels, batch_size, generator)
    losses, start = [], time.perf_counter()
    bar = tqdm(range(steps), desc="digits SiT", disable=not progress)
    for step in bar:
        x1, y = next(data)
        y = torch.where(torch.rand(len(y), generator=generator) < uncond_prob, torch.full_like(y, NUM_CLASSES), y)
        xt, t, target = interpolant_batch(x1, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(xt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(out.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema_update(list(ema.parameters()), list(model.parameters()), ema_decay, step)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    record = dict(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay,
                  uncond_prob=uncond_prob, seed=seed, bf16=bf16, minutes=(time.perf_counter() - start) / 60,
                  final_loss=sum(losses[-100:]) / min(100, len(losses)),
                  loss_curve=[round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 4) for i in range(0, len(losses), 100)])
    return ema, record


def generate(pipe, class_labels: torch.Tensor, seed: int = 0, batch_size: int = 100, **sampling) -> torch.Tensor:
    """Samples (B, 1, 16, 16) in [-1, 1] of `class_labels` with the digits recipe (`SAMPLING`, updated by
    `sampling`), deterministic in `seed` (`pipeline_io.class_samples`)."""
    from .pipeline_io import class_samples

    return class_samples(pipe, class_labels, seed, batch_size, **{**SAMPLING, **sampling})


def class_accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of `images` (B, 1, 16, 16) in [-1, 1] that `classifier` assigns to `labels`."""
    return (classifier.predict(images) == torch.as_tensor(labels)).float().mean().item()


# --- command line -----------------------------------------------------------------------------------------

def train(output: str | Path = ASSETS, generator_steps: int = 1300, classifier_steps: int = 1500,
          seed: int = 0, progress: bool = True) -> dict:
    """Train the classifier and the generator; write them (safetensors) and `training.json` to `output`."""
    from .files import save_pretrained, save_safetensors

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    classifier, accuracy = train_classifier(steps=classifier_steps, seed=seed, progress=progress)
    save_safetensors(classifier.state_dict(), output / "classifier.safetensors")
    classifier_minutes = (time.perf_counter() - start) / 60
    model, record = train_generator(steps=generator_steps, seed=seed, progress=progress)
    save_pretrained(model, output / "transformer")
    labels = torch.arange(NUM_CLASSES).repeat_interleave(20)
    samples = generate(make_pipeline(model), labels, seed=seed)
    record = dict(generator=record, classifier=dict(steps=classifier_steps, held_out_accuracy=accuracy,
                                                      minutes=classifier_minutes),
                  sample_class_accuracy=class_accuracy(classifier, samples, labels), sampling=SAMPLING,
                  torch=torch.__version__, threads=torch.get_num_threads())
    (output / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_ext.digits", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train", help="train the classifier and the digits SiT, write them to --output")
    run.add_argument("--output", default=str(ASSETS))
    run.add_argument("--steps", type=int, default=1300, help="generator optimizer steps (batch 64)")
    run.add_argument("--classifier-steps", type=int, default=1500)
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.classifier_steps < 1:
        parser.error("--steps and --classifier-steps must be >= 1")
    record = train(args.output, args.steps, args.classifier_steps, args.seed)
    print(json.dumps({k: v for k, v in record.items() if k != "generator"}, indent=1))
    print(f"generator: {record['generator']['minutes']:.1f} min, final loss {record['generator']['final_loss']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
