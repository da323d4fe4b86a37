"""FAAC's training-based anchor frame: fine-tune AnimateDiff's motion modules on a user's videos.

The anchor frame of every clip passes through the frozen image model only (`hooks.MotionBypass`, the
ghost motion modules) and the noise-prediction loss covers the other frames (`non_anchor_loss`); the
spatial layers (the personalised image model), the VAE and the text encoder stay frozen. What trains:
the motion modules' weights, or a LoRA on their attention projections (`lora_rank`). Optionally the
training-free method's anchor-frame attention is on during training (`anchor_attention`: the patch
`anchor_frame`, whose ghost motion modules are the same bypass).

    result = train_motion(pipe, "videos/", MotionTrainConfig(output_dir="my-motion", frames=16))
    adapter = MotionAdapter.from_pretrained("my-motion")     # or animate(pipe, ..., motion_adapter="my-motion")

The optimisation is the distiller's `TrainingLoop` (accelerate: mixed precision, gradient accumulation,
checkpoints `<output_dir>/checkpoint-<step>` with exact resume, a progress bar, `accelerate launch`).
Batch i draws its clips, timesteps and noise from `batch_generator(seed, i, rank)`; noising and the
target (epsilon or v) follow DDPM with the pipeline scheduler's betas and prediction type.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffusers_ext.distill.loop import check_loop_config
from diffusers_ext.ops import resolve_anchor

TRAINED_NAME = "motion_train.safetensors"       # the trained tensors in a checkpoint folder
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def non_anchor_loss(prediction: torch.Tensor, target: torch.Tensor, anchor: int = 0) -> torch.Tensor:
    """FAAC's training loss: mean squared error over the non-anchor frames of (B, C, F, h, w) tensors
    (the anchor passes through the frozen image model, `MotionBypass`, and is not trained on)."""
    frames = prediction.shape[2]
    if frames < 2:
        raise ValueError("the anchor-frame loss needs at least two frames")
    keep = [f for f in range(frames) if f != resolve_anchor(anchor, frames)]
    return torch.nn.functional.mse_loss(prediction[:, :, keep].float(), target[:, :, keep].float())


@dataclass
class MotionTrainConfig:
    """A run of `MotionTrainer`. The optimisation and bookkeeping fields are the ones `TrainingLoop`
    reads (`distill.loop.LoopConfig`)."""

    output_dir: str = "motion-adapter"
    # data
    frames: int = 16                     # frames per clip
    stride: int = 1                      # take every stride-th source frame
    resolution: int | None = None        # square side in pixels (default: the model's sample size)
    prompt: str | None = None            # caption of videos without a <name>.txt sidecar
    cache_dir: str | None = None         # VAE latents of the clips (default <output_dir>/latents)
    uncond_prob: float = 0.0             # share of empty captions (trains the unconditional branch)
    # what trains
    anchor: int = 0                      # anchor frame index of each clip (negative: from the end)
    anchor_attention: bool = False       # the anchor-frame attention of the training-free method on too
    lora_rank: int = 0                   # 0: the motion modules' weights; > 0: a LoRA of this rank on them
    lora_alpha: float | None = None      # LoRA scale alpha / rank (default alpha = rank)
    gradient_checkpointing: bool = False
    # optimisation
    batch_size: int = 1
    max_steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    ema_decay: float = 0.0              # EMA of the trained weights, saved as the result (0: none)
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"          # "no" | "fp16" | "bf16"
    cpu: bool = False
    # bookkeeping
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None            # a checkpoint folder, or "latest" in output_dir
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        check_loop_config(self)
        if self.frames < 2 or self.stride < 1:
            raise ValueError(f"frames must be >= 2 and stride >= 1, got {self.frames}, {self.stride}")
        resolve_anchor(self.anchor, self.frames)
        if not 0.0 <= self.uncond_prob <= 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1], got {self.uncond_prob}")
        if self.lora_rank < 0 or (self.lora_alpha is not None and not self.lora_alpha > 0):
            raise ValueError(f"lora_rank must be >= 0 and lora_alpha > 0; got {self.lora_rank}, {self.lora_alpha}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {self.resolution}")


@dataclass
class MotionTrainResult:
    output_dir: Path
    steps: int
    clips: int
    losses: list[float] = field(default_factory=list)
    loss_before: float | None = None     # non-anchor loss on fixed batches of the training clips
    loss_after: float | None = None


class LoRAWeight(torch.nn.Module):
    """A low-rank update as a parametrization of a Linear weight (out, in): W + (alpha / r) up @ down.
    `up` starts at zero, so training starts from the pretrained motion modules exactly."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        out_features, in_features = weight.shape
        down = torch.randn(rank, in_features, generator=generator) / rank
        self.down = torch.nn.Parameter(down.to(weight.device, weight.dtype))
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=weight.dtype))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.up @ self.down).to(weight.dtype)


def _lora_layers(unet) -> list[torch.nn.Linear]:
    from diffusers.models.attention_processor import Attention

    from .hooks import motion_modules

    layers = []
    for module in motion_modules(unet):
        for attn in (m for m in module.modules() if isinstance(m, Attention)):
            layers += [attn.get_submodule(name) for name in LORA_TARGETS]
    return layers


def check_output_dir(config: MotionTrainConfig) -> None:
    """Refuse to train over a finished motion adapter unless the run resumes (nothing is overwritten)."""
    if (Path(config.output_dir) / "config.json").is_file() and not config.resume:
        raise ValueError(f"{config.output_dir} already holds a motion adapter: choose another output folder, "
                         "or continue its run with resume='latest' (--resume latest)")


class MotionTrainer:
    """Fine-tunes the motion modules of an AnimateDiff pipeline's UNet on video clips (FAAC's
    training-based anchor frame). `clips` (a `videos.VideoClips`) replaces reading `videos`.

    The pipeline must be unpatched; the trainer installs its hooks only while it trains or evaluates.
    After `train`, `pipe.unet` holds the trained motion modules (a LoRA merged in) and `output_dir`
    the motion adapter."""

    def __init__(self, pipe, videos: str | os.PathLike | None = None, config: MotionTrainConfig | None = None, *,
                 clips=None):
        from diffusers import DDPMScheduler

        from diffusers_ext.distill.loop import TrainingLoop, make_accelerator
        from diffusers_ext.errors import PatchError
        from diffusers_ext.families import get_family
        from diffusers_ext.patching import patch_record

        from .hooks import check_pipeline, motion_modules
        from .videos import load_clips

        self.config = config = config or MotionTrainConfig()
        check_pipeline(pipe)
        check_output_dir(config)
        if patch_record(pipe) is not None:
            raise PatchError(f"the pipeline carries a {patch_record(pipe).method!r} patch: unpatch it before "
                             "training (the trainer installs the anchor frame itself)")
        self.pipe, self.unet = pipe, pipe.unet
        self.accelerator = make_accelerator(config)
        self.device, self.rank = self.accelerator.device, self.accelerator.process_index

        # data: clips as latents (cached on disk), captions encoded once
        if clips is None:
            if videos is None:
                raise ValueError("give the videos (a folder or a file) or `clips`")
            side = config.resolution or self.unet.config.sample_size * pipe.vae_scale_factor
            if side % pipe.vae_scale_factor:
                raise ValueError(f"resolution {side} is not a multiple of the VAE's downsampling {pipe.vae_scale_factor}")
            cache = config.cache_dir or str(Path(config.output_dir) / "latents")
            with self.accelerator.main_process_first():
                clips = load_clips(pipe.vae, videos, frames=config.frames, stride=config.stride, height=side,
                                   width=side, prompt=config.prompt, cache_dir=cache,
                                   main_process=self.accelerator.is_main_process)
        if clips.latents.shape[2] != config.frames:
            raise ValueError(f"clips have {clips.latents.shape[2]} frames, the config asks for {config.frames}")
        self.clips = clips
        captions = sorted(set(clips.captions))
        row = {caption: i + 1 for i, caption in enumerate(captions)}  # row 0: the empty caption
        self.caption_rows = torch.tensor([row[c] for c in clips.captions])
        with torch.no_grad():
            encoded = get_family("animatediff").encode_prompts(pipe, ["", *captions], self.device)
        self.embeddings = encoded["encoder_hidden_states"].detach().cpu()
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

        # what trains
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        self.unet.requires_grad_(False)
        if config.lora_rank:
            from torch.nn.utils import parametrize

            generator = torch.Generator().manual_seed(config.seed)
            alpha = config.lora_alpha or float(config.lora_rank)
            for layer in _lora_layers(self.unet):
                lora = LoRAWeight(layer.weight, config.lora_rank, alpha, generator)
                parametrize.register_parametrization(layer, "weight", lora)
            params = [p for layer in _lora_layers(self.unet) for p in layer.parametrizations.weight[0].parameters()]
        else:
            params = [p for module in motion_modules(self.unet) for p in module.parameters()]
        for p in params:
            p.requires_grad_(True)
        names = {id(p): n for n, p in self.unet.named_parameters()}
        self.trained = {names[id(p)]: p for p in params}
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.loop = TrainingLoop(self.accelerator, config, self.unet, [{"params": params, "lr": config.lr}],
                                 save_weights=self._write_checkpoint, load_weights=self._read_checkpoint)

    # --- batches and the loss ---------------------------------------------------------------------------

    def sample_batch(self, index: int, seed: int | None = None, clips=None) -> dict[str, Any]:
        """Batch `index`: the UNet's keyword arguments (noised clips (B, C, F, h, w), timesteps (B,),
        text (B * F, L, D)) and the target (B, C, F, h, w), on the device."""
        from diffusers_ext.distill.loop import batch_generator

        config = self.config
        latents, rows = (self.clips.latents, self.caption_rows) if clips is None else clips
        generator = batch_generator(config.seed if seed is None else seed, index, self.rank)
        pick = torch.randint(0, latents.shape[0], (config.batch_size,), generator=generator)
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        rows = rows[pick].clone()
        rows[torch.rand(config.batch_size, generator=generator) < config.uncond_prob] = 0
        prediction = self.noise_scheduler.config.prediction_type
        if prediction == "epsilon":
            target = noise
        elif prediction == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        else:
            raise ValueError(f"prediction type {prediction!r} is not supported (epsilon or v_prediction)")
        dtype = self.unet.dtype
        frames = x0.shape[2]
        return {"sample": self.noise_scheduler.add_noise(x0, noise, t).to(self.device, dtype),
                "timestep": t.to(self.device),
                "encoder_hidden_states": self.embeddings[rows].repeat_interleave(frames, 0).to(self.device, dtype),
                "target": target.to(self.device)}

    def loss(self, index: int, seed: int | None = None, clips=None, model=None) -> torch.Tensor:
        """The non-anchor noise-prediction loss of batch `index` (run inside `hooked()`)."""
        batch = self.sample_batch(index, seed, clips)
        target = batch.pop("target")
        with self.accelerator.autocast():
            prediction = (model or self.loop.model)(**batch).sample
        return non_anchor_loss(prediction.float(), target.float(), self.config.anchor)

    @contextlib.contextmanager
    def hooked(self, anchor_attention: bool | None = None):
        """Inside: the anchor passes through the image model only (and, with `anchor_attention`, default
        the config's, the other frames' spatial attention reads it); the UNet is as it was outside."""
        import diffusers_ext as dx

        from .hooks import MotionBypass

        if self.config.anchor_attention if anchor_attention is None else anchor_attention:
            with dx.patched(self.unet, "anchor_frame", anchor=self.config.anchor):
                yield
            return
        bypass = MotionBypass(self.unet, self.config.anchor)
        try:
            yield
        finally:
            bypass.remove()

    @torch.no_grad()
    def evaluate(self, clips=None, num_batches: int = 4, seed: int = 12345,
                 anchor_attention: bool | None = None) -> float:
        """Mean non-anchor loss on fixed batches (the same every call) of the training clips or of
        `clips` (held-out `VideoClips`, captions encoded here); `anchor_attention`: as `hooked`."""
        data = None
        if clips is not None:
            from diffusers_ext.families import get_family

            captions = sorted(set(clips.captions))
            row = {caption: i + len(self.embeddings) for i, caption in enumerate(captions)}
            encoded = get_family("animatediff").encode_prompts(self.pipe, captions, self.device)
            saved, self.embeddings = self.embeddings, torch.cat([self.embeddings, encoded["encoder_hidden_states"].cpu()])
            data = (clips.latents, torch.tensor([row[c] for c in clips.captions]))
        try:
            with self.hooked(anchor_attention):
                return sum(float(self.loss(10**9 + i, seed, data, model=self.unet)) for i in range(num_batches)) / num_batches
        finally:
            if clips is not None:
                self.embeddings = saved

    # --- training and saving ----------------------------------------------------------------------------

    def train(self, evaluate: bool = True) -> MotionTrainResult:
        """Resume if asked, train to `max_steps`, merge a LoRA, save the motion adapter to `output_dir`."""
        self.loop.resume()
        result = MotionTrainResult(Path(self.config.output_dir), self.loop.step, len(self.clips))
        if evaluate:
            result.loss_before = self.evaluate()
        with self.hooked():
            result.losses = self.loop.run(self.loss, desc="animate-train")
        result.steps = self.loop.step
        self.loop.check_finite()          # a diverged run saves nothing
        self.merge()
        if evaluate:
            result.loss_after = self.evaluate()
        self.save(self.config.output_dir)
        self.accelerator.wait_for_everyone()
        return result

    def merge(self) -> None:
        """Fold a LoRA into the motion modules' weights (plain Linear layers again); then nothing trains."""
        from torch.nn.utils import parametrize

        for layer in _lora_layers(self.unet):
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        self.unet.requires_grad_(False)
        self.unet.eval()
        if self.config.gradient_checkpointing:
            self.unet.disable_gradient_checkpointing()

    def save(self, folder: str | os.PathLike) -> Path:
        """The motion adapter (MotionAdapter folder, safetensors; a LoRA merged in) on the main process."""
        from .adapter import save_motion_adapter

        if self.accelerator.is_main_process:
            save_motion_adapter(self.pipe, folder)
        return Path(folder)

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.trained.items()}

    def _write_checkpoint(self, folder: Path) -> None:
        from diffusers_ext.files import save_safetensors

        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.trained_tensors(), folder / TRAINED_NAME)

    def _read_checkpoint(self, folder: Path) -> None:
        from safetensors.torch import load_file

        path = Path(folder) / TRAINED_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not an animate-train checkpoint (no {TRAINED_NAME})")
        tensors = load_file(str(path))
        if set(tensors) != set(self.trained):
            raise ValueError(f"checkpoint {folder} holds other tensors than this run trains (a LoRA checkpoint "
                             "for a full run, or the other way round?): resume with the same --lora-rank")
        for name, tensor in tensors.items():
            if tensor.shape != self.trained[name].shape:
                raise ValueError(f"checkpoint {folder} does not fit this model: {name} is {tuple(tensor.shape)}, "
                                 f"expected {tuple(self.trained[name].shape)}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                self.trained[name].copy_(tensor)


def train_motion(pipe, videos, config: MotionTrainConfig | None = None, **kwargs) -> MotionTrainResult:
    """Fine-tune `pipe`'s motion modules on `videos` (FAAC's training-based anchor frame) and save the
    motion adapter to `config.output_dir`; `kwargs` go to `MotionTrainer`."""
    return MotionTrainer(pipe, videos, config, **kwargs).train()
