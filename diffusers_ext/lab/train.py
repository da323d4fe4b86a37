"""Resumable training of the lab II models: `python -m diffusers_ext.lab train {dit,unet,classifier} --out DIR`.

Every optimizer step is a function of (seed, step) only (`data.batch_at` draws the batch, its
augmentation and the step's noise from a generator seeded by the step; the global RNG, which DiT's
label dropout and the classifier's dropout read, is reseeded per step), so a run stopped at any
checkpoint and resumed continues bit for bit as if never stopped (same thread count).

- dit: SiT's linear interpolant (`digits.interpolant_batch`: x_t = t x1 + (1 - t) x0, velocity target,
  t ~ U[0, 1]), labels dropped to the null class with `uncond_prob` (DiT's embedder drops another 10 %).
- unet: DDPM loss on `config.prediction` (v-prediction by default; the first run's epsilon target),
  `DDPMScheduler()` (1000 steps, linear betas 1e-4 .. 0.02, pixel space), t uniform in {0..999}; the
  prompt is `ClassTokens(label)`, the null class with `uncond_prob`.
- classifier: cross-entropy on the training fonts; held-out accuracy (unseen font designs) at every
  checkpoint.
AdamW, linear warm-up then cosine decay over `steps`; a run continued past its schedule (`extend_to`)
restarts it warm at the step it had reached: warm-up again, then a cosine to the new end (SGDR's warm
restart; `config.restarts` lists the steps). Generators keep an EMA (the exported weights),
bf16 autocast on the CPU when `bf16`. Weights and optimizer state stay fp32.

DIR holds `checkpoint.pt` (the whole training state), `weights.safetensors` (the EMA weights, or the
classifier's) and `record.json` (config, loss curve, minutes, accuracy); each written to a temporary
file and renamed over the old one (`os.replace`), so a kill at any moment loses at most the steps since
the last checkpoint (every `checkpoint_minutes`, and on SIGTERM / the time limit).
"""

from __future__ import annotations

import copy
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..digits import interpolant_batch
from ..distill.loop import ema_update
from ..files import atomic_path, atomic_write_text, save_safetensors
from . import models
from .data import NUM_CLASSES, Glyphs, batch_at, load_glyphs

KINDS = ("dit", "unet", "classifier")
PREDICTIONS = ("epsilon", "v_prediction")     # the UNet's training targets; the transformer learns the interpolant's


@dataclass(frozen=True)
class TrainConfig:
    steps: int                      # length of the learning-rate schedule: training ends there
    batch_size: int
    lr: float
    warmup: int = 100
    ema_decay: float | None = 0.998  # None: no EMA (the classifier)
    uncond_prob: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = True
    checkpoint_minutes: float = 5.0
    prediction: str = "epsilon"     # the UNet's target (PREDICTIONS, diffusers' prediction_type); UNet runs only
    restarts: tuple[int, ...] = ()  # steps where the schedule restarted, warm, towards a new `steps` (extend_to)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")



DEFAULTS = {
    "dit": TrainConfig(steps=2000, batch_size=32, lr=1e-3),
    # v-prediction: epsilon on the linear schedule left the first run class-blind at high noise (docs/lab.md)
    "unet": TrainConfig(steps=4000, batch_size=32, lr=1e-3, prediction="v_prediction"),
    "classifier": TrainConfig(steps=2000, batch_size=128, lr=2e-3, warmup=50, ema_decay=None, uncond_prob=0.0,
                              weight_decay=1e-4, bf16=False),
}


class UNetWithTokens(nn.Module):
    """The glyph UNet and its class prompt as one trainable module: (sample, t, labels) -> epsilon."""

    def __init__(self, **unet_overrides):
        super().__init__()
        self.unet = models.glyph_unet(**unet_overrides)
        self.tokens = models.ClassTokens(self.unet.config.cross_attention_dim)

    def forward(self, sample, timestep, labels):
        return self.unet(sample, timestep, encoder_hidden_states=self.tokens(labels)).sample


def build_model(kind: str, overrides: dict | None = None) -> nn.Module:
    overrides = overrides or {}
    if kind == "dit":
        return models.glyph_transformer(**overrides)
    if kind == "unet":
        return UNetWithTokens(**overrides)
    if kind == "classifier":
        return models.GlyphClassifier(**overrides)
    raise ValueError(f"unknown model kind {kind!r}; kinds: {', '.join(KINDS)}")


def _drop_labels(labels: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    drop = torch.rand(len(labels), generator=generator) < prob
    return torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)


def step_loss(kind: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              generator: torch.Generator, config: TrainConfig, noise_scheduler=None) -> torch.Tensor:
    """The training loss of one batch (images (B, 1, 32, 32) in [-1, 1], labels (B,))."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        if kind == "classifier":
            return F.cross_entropy(model(images).float(), labels)
        labels = _drop_labels(labels, config.uncond_prob, generator)
        if kind == "dit":
            xt, t, target = interpolant_batch(images, generator)
            out = model(xt, timestep=t, class_labels=labels).sample
        else:
            noise = torch.randn(images.shape, generator=generator)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(images),), generator=generator)
            xt = noise_scheduler.add_noise(images, noise, t)
            target = noise if config.prediction == "epsilon" else noise_scheduler.get_velocity(images, noise, t)
            out = model(xt, t, labels)
    return F.mse_loss(out.float(), target)


def _schedule(config: TrainConfig):
    """lr factor of step s: linear warm-up, then cosine to 0 at `steps`, from the last restart <= s."""
    def factor(s: int) -> float:
        start = max((r for r in config.restarts if r <= s), default=0)
        s, steps = s - start, config.steps - start
        if s < config.warmup:
            return (s + 1) / config.warmup
        return 0.5 * (1 + math.cos(math.pi * (s - config.warmup) / max(1, steps - config.warmup)))
    return factor


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@torch.no_grad()
def held_out_accuracy(classifier: nn.Module, glyphs: Glyphs) -> float:
    images, labels = glyphs.split(held_out=True)
    return (classifier.predict(images) == labels).float().mean().item()


def train(kind: str, out: str | Path, *, minutes: float | None = None, resume: bool = False,
          config: TrainConfig | None = None, model_overrides: dict | None = None, glyphs: Glyphs | None = None,
          stop_at_step: int | None = None, extend_to: int | None = None, log=print) -> dict:
    """Train `kind` into folder `out` until `config.steps`, `minutes` of this call or `stop_at_step`
    (whichever first), checkpointing on the way; `resume` continues the run saved in `out`, and with
    `extend_to` past its schedule: a warm restart at the step it reached, to step `extend_to`.
    Returns the run record (also `out/record.json`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; kinds: {', '.join(KINDS)}")
    out = Path(out)
    checkpoint_path = out / "checkpoint.pt"
    saved = None
    if checkpoint_path.is_file():
        if not resume:
            raise FileExistsError(f"{checkpoint_path} exists: pass --resume to continue it, or another --out")
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if kind != saved["kind"]:
            raise ValueError(f"{checkpoint_path} is a {saved['kind']!r} run, not {kind!r}")
        config, model_overrides = TrainConfig(**saved["config"]), saved["model_overrides"]
        config = replace(config, restarts=tuple(config.restarts))   # a list after a JSON round trip
        if extend_to is not None:
            reached = saved["record"]["step"]
            if extend_to <= reached:
                raise ValueError(f"extend_to ({extend_to}) must be beyond the step the run reached ({reached})")
            config = replace(config, steps=extend_to, restarts=(*config.restarts, reached))
            saved["record"]["config"] = asdict(config)
    elif extend_to is not None:
        raise FileNotFoundError(f"no run to extend at {checkpoint_path}: extend_to continues a saved run")
    config = config or DEFAULTS[kind]
    out.mkdir(parents=True, exist_ok=True)
    glyphs = glyphs if glyphs is not None else load_glyphs()
    images, labels = glyphs.split(held_out=False)

    torch.manual_seed(config.seed)
    model = build_model(kind, model_overrides).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False) if config.ema_decay is not None else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    noise_scheduler = None
    if kind == "unet":
        from diffusers import DDPMScheduler

        noise_scheduler = DDPMScheduler()
    record = dict(kind=kind, config=asdict(config), model_overrides=model_overrides or {},
                  parameters=sum(p.numel() for p in model.parameters()), data=glyphs.stats(),
                  data_fingerprint=glyphs.fingerprint(), step=0, minutes=0.0, cpu_minutes=0.0, loss_curve=[],
                  held_out_accuracy=None, threads=torch.get_num_threads(), torch=torch.__version__)
    if saved is not None:
        model.load_state_dict(saved["model"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        record = saved["record"]
        if record["data_fingerprint"] != glyphs.fingerprint():
            raise ValueError(f"the glyph data differs from the data {checkpoint_path} was trained on "
                             "(other fonts installed?): cannot resume exactly")

    def save():
        if kind == "classifier":
            record["held_out_accuracy"] = held_out_accuracy(model, glyphs)
        state = dict(kind=kind, config=asdict(config), model_overrides=model_overrides or {},
                     model=model.state_dict(), ema=ema.state_dict() if ema is not None else None,
                     optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), record=record)
        _atomic_torch_save(state, checkpoint_path)
        weights = (ema if ema is not None else model).state_dict()
        save_safetensors(weights, out / "weights.safetensors", {"kind": kind, "step": str(record["step"])})
        atomic_write_text(out / "record.json", json.dumps(record, indent=1) + "\n")

    stop = {"signal": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    start, cpu_start = time.perf_counter(), time.process_time()
    minutes_before, cpu_before = record["minutes"], record["cpu_minutes"]
    last_save, window = start, []
    try:
        while record["step"] < config.steps and not stop["signal"]:
            step = record["step"]
            if stop_at_step is not None and step >= stop_at_step:
                break
            if minutes is not None and time.perf_counter() - start >= 60 * minutes:
                break
            x, y, generator = batch_at(images, labels, config.batch_size, step, config.seed)
            torch.manual_seed(config.seed * 1_000_003 + step)       # DiT's label dropout, dropout layers
            loss = step_loss(kind, model, x, y, generator, config, noise_scheduler)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema_update(list(ema.parameters()), list(model.parameters()), config.ema_decay, step)
            window.append(loss.item())
            record["step"] = step + 1
            record["minutes"] = minutes_before + (time.perf_counter() - start) / 60
            record["cpu_minutes"] = cpu_before + (time.process_time() - cpu_start) / 60
            if record["step"] % 50 == 0:
                record["loss_curve"].append([record["step"], round(sum(window) / len(window), 5)])
                log(f"{kind} step {record['step']}/{config.steps} loss {record['loss_curve'][-1][1]:.4f} "
                    f"{record['minutes']:.1f} min")
                window = []
            if time.perf_counter() - last_save >= 60 * config.checkpoint_minutes:
                save()
                last_save = time.perf_counter()
                if kind == "classifier":
                    log(f"classifier held-out accuracy {record['held_out_accuracy']:.4f}")
        save()
    finally:
        signal.signal(signal.SIGTERM, previous)
    log(f"{kind}: saved step {record['step']} to {out}")
    return record


def load_weights(kind: str, folder: str | Path) -> nn.Module:
    """The exported model (`weights.safetensors`, EMA for generators) of a run folder, in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    record = json.loads((folder / "record.json").read_text())
    model = build_model(kind, record["model_overrides"])
    model.load_state_dict(load_file(str(folder / "weights.safetensors")))
    return model.eval()


def with_config(kind: str, **changes) -> TrainConfig:
    """`DEFAULTS[kind]` with `changes` (e.g. a tiny test run). `prediction` is the UNet's alone."""
    if "prediction" in changes and kind != "unet":
        raise ValueError(f"prediction is the UNet's training target; a {kind} run has none to change")
    return replace(DEFAULTS[kind], **changes)
