"""Short fine-tunes by distillation: a patched denoiser (student) learns to match the same denoiser
unpatched (teacher) on the same noised latents, timesteps and conditions. No dataset needed.

    from diffusers_ext.distill import DistillConfig, distill
    result = distill(pipe, "t5", DistillConfig(output_dir="t5-sd35", prompts="prompts.txt", max_steps=2000))
    dx.patch(pipe, "t5", weights="t5-sd35")              # later, in another process

Method-agnostic: the method says which parameters may train (`Method.trainable_parameters`:
"new" ones it added, "inherited" pretrained ones it may adapt); new ones train at `lr`, inherited
ones at `inherited_lr` (0 = frozen, the default).

One copy of the weights. The teacher is the student's own denoiser with every patched site's
processor swapped back to the original for a no-grad forward (`teacher_mode`). When inherited
weights train, the teacher must still see the pretrained values, so the trainer keeps a frozen
copy of only those tensors and runs the teacher with them through `torch.func.functional_call`.

What goes in (every batch, one random generator per (seed, step, rank): reproducible and resumable):
- conditions (`Conditions.sample`): text-to-image prompts from a list / file, encoded once with the
  pipeline's `encode_prompt` (SD, SDXL, SD3), or class labels (DiT / SiT); with probability
  `uncond_prob` the empty prompt / null class, so the unconditional branch of guidance is distilled too;
- clean latents: "noise" (x0 ~ N(0, I), the cheapest, off the data manifold), "trajectory" (states
  of the teacher's own sampling run from noise with the pipeline's scheduler: the inputs the model
  sees at inference, at the cost of extra teacher steps), or an image folder encoded with the VAE;
- noising from the pipeline's scheduler: flow matching (x_t = (1 - sigma) x0 + sigma eps, sigma
  shifted like the scheduler's `shift`; SD3), SiT's interpolant (x_t = t x0 + (1 - t) eps, t ~ U[0, 1],
  the model takes t itself; `SiTScheduler`) or DDPM (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps).
Loss: mean squared error between the student's and the teacher's full outputs (both in fp32).

accelerate throughout: CPU, one GPU, `accelerate launch` multi-GPU / multi-node (DDP), mixed precision
(autocast), gradient accumulation; checkpoints hold only the trained tensors plus the optimizer
state, and `resume="latest"` continues from the newest. The result folder holds only the trained
tensors (safetensors) plus the method and options (JSON); `dx.patch(pipe, method, weights=FOLDER)`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F

from .families import Family, find_denoiser, get_family
from .patching import RECORD_ATTRIBUTE, PatchRecord, patch
from .registry import get_method

TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class DistillConfig:
    """Everything a distillation run needs besides the model and the method."""

    output_dir: str = "distilled"
    # conditions
    prompts: Sequence[str] | str | None = None      # a list, or a text file with one prompt per line
    class_labels: Sequence[int] | None = None       # class-conditional models: labels to draw (default: all)
    uncond_prob: float = 0.1                        # share of empty prompts / null classes
    # inputs
    latents: str = "noise"                          # "noise" | "trajectory" | a folder of images
    trajectory_steps: int = 20                      # sampling steps of the teacher for "trajectory"
    shared_timestep: bool | None = None             # one timestep per batch; None: when the patch is step-dependent
    resolution: int | None = None                   # image pixels; default: the model's sample size
    # optimisation
    batch_size: int = 4
    max_steps: int = 1000
    lr: float = 1e-3
    inherited_lr: float = 0.0                       # 0 keeps the inherited weights frozen
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"                     # "no" | "fp16" | "bf16"
    cpu: bool = False                               # force the CPU even with a GPU
    # bookkeeping
    checkpoint_every: int = 0                       # optimizer steps between checkpoints (0: none)
    keep_checkpoints: int = 2
    resume: str | None = None                       # a checkpoint folder, or "latest" in output_dir
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.max_steps < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch_size, max_steps and gradient_accumulation_steps must be >= 1")
        if self.lr <= 0 or self.inherited_lr < 0:
            raise ValueError(f"lr must be > 0 and inherited_lr >= 0; got {self.lr}, {self.inherited_lr}")
        if not 0.0 <= self.uncond_prob <= 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1], got {self.uncond_prob}")
        if self.shared_timestep not in (None, True, False):
            raise ValueError(f"shared_timestep must be None (automatic), True or False, got {self.shared_timestep!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.latents in ("noise", "trajectory"):
            return
        if not Path(self.latents).is_dir():
            raise ValueError(f"latents must be 'noise', 'trajectory' or a folder of images; {self.latents!r} is none")


@dataclass
class DistillResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    deviation_before: float | None = None
    deviation_after: float | None = None


# =====================================================================================================
# Conditions
# =====================================================================================================

class Conditions(Protocol):
    """Draws the conditioning keyword arguments of the denoiser for a batch (tensors on the CPU)."""

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]: ...


def read_prompts(prompts: Sequence[str] | str) -> list[str]:
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError("no prompts: give a non-empty list or a file with one prompt per line")
    return prompts


class PromptConditions:
    """Text-to-image: prompts encoded once with the family's `encode_prompts` (the pipeline's
    `encode_prompt`), kept on the CPU. Row 0 of the table is the empty prompt (the unconditional
    branch of guidance); `Family.condition_kwargs` turns drawn rows into the denoiser's arguments."""

    def __init__(self, pipe, family: Family | str, prompts: Sequence[str] | str, uncond_prob: float = 0.1,
                 resolution: tuple[int, int] | None = None, chunk: int = 16):
        self.family = get_family(family) if isinstance(family, str) else family
        if self.family.conditioning != "text":
            raise ValueError(f"prompts are not supported for the {self.family.name!r} family "
                             "(class-conditional models take class labels)")
        self.prompts = read_prompts(prompts)
        self.uncond_prob = uncond_prob
        self.resolution = resolution
        encoded = [self._encode(pipe, ["", *self.prompts][i:i + chunk]) for i in range(0, len(self.prompts) + 1, chunk)]
        self.table = {key: torch.cat([e[key] for e in encoded]) for key in encoded[0]}

    @torch.no_grad()
    def _encode(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        device = getattr(pipe, "_execution_device", None) or pipe.device
        return {key: value.cpu() for key, value in self.family.encode_prompts(pipe, prompts, device).items()}

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        index = torch.randint(1, len(self.prompts) + 1, (batch_size,), generator=generator)
        index[torch.rand(batch_size, generator=generator) < self.uncond_prob] = 0
        return self.family.condition_kwargs({key: value[index] for key, value in self.table.items()}, self.resolution)


class ClassConditions:
    """Class-conditional models (DiT / SiT): uniform labels, the null class with `uncond_prob`."""

    def __init__(self, num_classes: int, labels: Sequence[int] | None = None, null_label: int | None = None,
                 uncond_prob: float = 0.1):
        self.labels = torch.as_tensor(list(labels) if labels is not None else range(num_classes), dtype=torch.long)
        if self.labels.numel() == 0 or int(self.labels.min()) < 0 or int(self.labels.max()) >= num_classes:
            raise ValueError(f"class labels must lie in 0..{num_classes - 1}")
        self.null_label = null_label
        self.uncond_prob = uncond_prob if null_label is not None else 0.0

    @classmethod
    def for_model(cls, denoiser, labels=None, uncond_prob: float = 0.1) -> "ClassConditions":
        from diffusers.models.embeddings import LabelEmbedding

        table = next((m for m in denoiser.modules() if isinstance(m, LabelEmbedding)), None)
        if table is None:
            raise ValueError(f"{type(denoiser).__name__} has no class-label embedding")
        has_null = table.embedding_table.num_embeddings > table.num_classes
        return cls(table.num_classes, labels, table.num_classes if has_null else None, uncond_prob)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        labels = self.labels[torch.randint(0, len(self.labels), (batch_size,), generator=generator)]
        if self.uncond_prob:
            labels[torch.rand(batch_size, generator=generator) < self.uncond_prob] = self.null_label
        return {"class_labels": labels}


def default_conditions(pipe, denoiser, family: str, config: DistillConfig,
                       resolution: tuple[int, int] | None) -> Conditions:
    family = get_family(family)
    if family.video:
        raise ValueError(f"distillation of {family.description} models is not supported yet")
    if family.conditioning == "class":
        return ClassConditions.for_model(denoiser, config.class_labels, config.uncond_prob)
    if config.prompts is None:
        raise ValueError(f"a text-to-image model ({family.name}) needs prompts: a list or a file, one prompt per line")
    if pipe is None:
        raise ValueError("prompts are encoded with the pipeline's text encoders: pass the pipeline, not the bare "
                         "denoiser (or pass your own `conditions=`)")
    return PromptConditions(pipe, family, config.prompts, config.uncond_prob, resolution)


# =====================================================================================================
# Noising
# =====================================================================================================

class Noising:
    """Noised latents and the timesteps the denoiser takes, as the pipeline's scheduler defines them."""

    def __init__(self, scheduler=None, kind: str | None = None):
        config = getattr(scheduler, "config", {}) or {}
        if kind is None:
            name = type(scheduler).__name__
            kind = "flow" if "FlowMatch" in name else "interpolant" if name == "SiTScheduler" else "ddpm"
        if kind not in ("flow", "interpolant", "ddpm"):
            raise ValueError(f"noising must be 'flow', 'interpolant' or 'ddpm', got {kind!r}")
        self.kind = kind
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        self.shift = float(config.get("shift", 1.0)) if kind == "flow" else 1.0
        if kind == "ddpm":
            abar = getattr(scheduler, "alphas_cumprod", None)
            if abar is None:
                from diffusers import DDPMScheduler

                abar = DDPMScheduler(num_train_timesteps=self.num_train_timesteps).alphas_cumprod
            self.alphas_cumprod = torch.as_tensor(abar, dtype=torch.float64)

    def add_noise(self, x0: torch.Tensor, generator: torch.Generator,
                  shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 (B, ...) -> (x_t, timestep (B,)) with fresh noise and random timesteps (one for the
        whole batch when `shared`)."""
        batch = x0.shape[0]
        draws = 1 if shared else batch
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.dtype)
        view = (batch,) + (1,) * (x0.ndim - 1)
        if self.kind == "interpolant":  # SiT: x_t = t x0 + (1 - t) eps, t ~ U[0, 1], the model takes t itself
            t = torch.rand(draws, generator=generator, dtype=torch.float64).expand(batch).contiguous()
            x_t = t.view(view).to(x0.dtype) * x0 + (1 - t).view(view).to(x0.dtype) * noise
            return x_t, t.float()
        if self.kind == "flow":
            u = torch.rand(draws, generator=generator, dtype=torch.float64).expand(batch).contiguous()
            sigma = self.shift * u / (1 + (self.shift - 1) * u)
            x_t = (1 - sigma).view(view).to(x0.dtype) * x0 + sigma.view(view).to(x0.dtype) * noise
            return x_t, (sigma * self.num_train_timesteps).float()
        t = torch.randint(0, self.num_train_timesteps, (draws,), generator=generator).expand(batch).contiguous()
        abar = self.alphas_cumprod[t].view(view)
        x_t = abar.sqrt().to(x0.dtype) * x0 + (1 - abar).sqrt().to(x0.dtype) * noise
        return x_t, t


# =====================================================================================================
# Teacher and student on one set of weights
# =====================================================================================================

@contextlib.contextmanager
def teacher_mode(denoiser: torch.nn.Module, record: PatchRecord):
    """Inside: every patched site runs its original processor (the unpatched model). Restored after."""
    modules = dict(denoiser.named_modules())
    installed = {name: modules[name].processor for name in record.sites}
    try:
        for name in record.sites:
            modules[name].set_processor(record.originals[name])
        yield denoiser
    finally:
        for name, processor in installed.items():
            modules[name].set_processor(processor)


def _output(result) -> torch.Tensor:
    return result.sample if hasattr(result, "sample") else result[0]


# =====================================================================================================
# The trainer
# =====================================================================================================

class Distiller:
    """Fine-tunes a method's parameters on `pipe_or_model` by matching the unpatched model's output.

    The model is patched with `method` and `options` (or already patched: `method=None`). Custom
    `conditions` (an object with `sample(batch_size, generator) -> kwargs`) replace the default
    prompts / class labels; `noising` ("flow" | "interpolant" | "ddpm") overrides the scheduler's.
    `data`: clean samples (N, C, H, W) in the denoiser's input space (latents, or pixels for a
    pixel-space model) to noise instead of `config.latents`, e.g. the training set of the model.
    """

    def __init__(self, pipe_or_model, method: str | None = None, config: DistillConfig | None = None, *,
                 options: dict[str, Any] | None = None, conditions: Conditions | None = None,
                 noising: str | None = None, latent_size: int | tuple[int, int] | None = None,
                 data: torch.Tensor | None = None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.config = config = config or DistillConfig()
        self.denoiser, self.pipe = find_denoiser(pipe_or_model)
        record = getattr(self.denoiser, RECORD_ATTRIBUTE, None)
        if method is not None and (record is None or record.method != method or options):
            record = patch(pipe_or_model, method, **(options or {}))
        if record is None:
            raise ValueError("the model is not patched: give a method to distill")
        self.record: PatchRecord = record
        self.method = get_method(record.method)

        # a step-dependent patch (a partial schedule, a dynamic mediator count) sets its state once per
        # call, from the first sample's timestep: every sample of a batch then shares one timestep
        step_dependent = self.method.step_dependent(record.options)
        self.shared_timestep = step_dependent if config.shared_timestep is None else config.shared_timestep
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision, cpu=config.cpu,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=step_dependent)],
        )
        self.device = self.accelerator.device

        # what trains
        groups = self.method.trainable_parameters(record)
        self.new_params = _unique(groups.get("new", []))
        inherited = _unique(groups.get("inherited", [])) if config.inherited_lr > 0 else []
        self.inherited_params = [p for p in inherited if all(p is not q for q in self.new_params)]
        if not self.new_params and not self.inherited_params:
            raise ValueError(f"method {record.method!r} has nothing to train on this model")
        names = {id(p): n for n, p in self.denoiser.named_parameters(remove_duplicate=False)}
        self.trained_names = {names[id(p)]: p for p in self.new_params + self.inherited_params}
        self.denoiser.requires_grad_(False)
        for p in self.trained_names.values():
            p.requires_grad_(True)
        # the teacher's pretrained values of inherited weights that train (only those are copied)
        self.frozen = {names[id(p)]: p.detach().clone() for p in self.inherited_params}

        # inputs
        self.latent_shape = self._latent_shape(latent_size)
        resolution = tuple(s * self._vae_scale() for s in self.latent_shape[-2:])
        self.conditions = conditions or default_conditions(self.pipe, self.denoiser, record.family, config, resolution)
        scheduler = getattr(self.pipe, "scheduler", None)
        if scheduler is None and noising is None:
            noising = get_family(record.family).noising
        self.noising = Noising(scheduler, noising)
        if data is not None:
            if data.ndim != 4 or tuple(data.shape[1:]) != self.latent_shape:
                raise ValueError(f"data must be (N, {', '.join(map(str, self.latent_shape))}) samples of the "
                                 f"denoiser's input, got {tuple(data.shape)}")
            self.image_latents = data.detach().float().cpu()
        elif config.latents not in ("noise", "trajectory"):
            self.image_latents = self._encode_images(config.latents)
        else:
            self.image_latents = None
        if config.latents == "trajectory" and scheduler is None:
            raise ValueError("latents='trajectory' samples with the pipeline's scheduler: pass the pipeline")

        # optimisation
        param_groups = [{"params": self.new_params, "lr": config.lr}]
        if self.inherited_params:
            param_groups.append({"params": self.inherited_params, "lr": config.inherited_lr})
        optimizer = torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)
        warmup = max(config.warmup_steps, 0)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        self.denoiser.to(self.device)
        for name, value in self.frozen.items():
            self.frozen[name] = value.to(self.device)
        if self.accelerator.num_processes > 1:
            self.model = self.accelerator.prepare_model(self.denoiser)
        else:  # one process: no wrapper, no rewritten `forward` on the user's model
            self.model = self.denoiser
        self.optimizer, self.lr_scheduler = self.accelerator.prepare(optimizer, lr_scheduler)
        self.step = 0

    # --- inputs -----------------------------------------------------------------------------------------

    def _vae_scale(self) -> int:
        vae = getattr(self.pipe, "vae", None)
        if vae is None:  # a pixel-space pipeline (vae=None) works on pixels; a bare denoiser: SD's VAE
            return 1 if self.pipe is not None and hasattr(self.pipe, "vae") else 8
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def _latent_shape(self, latent_size) -> tuple[int, int, int]:
        cfg = self.denoiser.config
        channels = cfg.in_channels
        if latent_size is None and self.config.resolution is not None:
            if self.config.resolution % self._vae_scale():
                raise ValueError(f"resolution {self.config.resolution} is not a multiple of the VAE's "
                                 f"downsampling {self._vae_scale()}")
            latent_size = self.config.resolution // self._vae_scale()
        if latent_size is None:
            latent_size = cfg.sample_size
        height, width = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
        patch_size = getattr(cfg, "patch_size", None) or 1
        if height % patch_size or width % patch_size:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {patch_size}")
        return channels, height, width

    @torch.no_grad()
    def _encode_images(self, folder: str) -> torch.Tensor:
        from PIL import Image

        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            raise ValueError("training on images needs the pipeline's VAE: pass the pipeline")
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not paths:
            raise ValueError(f"no images (.png, .jpg, .jpeg, .webp) in {folder}")
        height, width = (s * self._vae_scale() for s in self.latent_shape[1:])
        latents = []
        for start in range(0, len(paths), 8):
            batch = []
            for path in paths[start:start + 8]:
                image = Image.open(path).convert("RGB")
                scale = max(width / image.width, height / image.height)
                image = image.resize((math.ceil(image.width * scale), math.ceil(image.height * scale)), Image.BICUBIC)
                left, top = (image.width - width) // 2, (image.height - height) // 2
                image = image.crop((left, top, left + width, top + height))
                pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
                batch.append(pixels.permute(2, 0, 1).float() / 127.5 - 1)
            pixels = torch.stack(batch).to(vae.device, vae.dtype)
            z = vae.encode(pixels).latent_dist.mode().float()
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents.append(((z - shift) * vae.config.scaling_factor).cpu())
        return torch.cat(latents)

    def _generator(self, step: int) -> torch.Generator:
        rank = self.accelerator.process_index
        return torch.Generator().manual_seed((self.config.seed * 1_000_003 + step) * 1_009 + rank)

    def sample_batch(self, step: int) -> dict[str, Any]:
        """Denoiser keyword arguments of one (per-process) batch: sample, timestep and conditions."""
        generator = self._generator(step)
        batch = self.config.batch_size
        kwargs = self.conditions.sample(batch, generator)
        if self.config.latents == "trajectory" and self.image_latents is None:
            sample, timestep = self._trajectory_state(kwargs, generator)
        else:
            if self.image_latents is not None:
                x0 = self.image_latents[torch.randint(0, len(self.image_latents), (batch,), generator=generator)]
            else:
                x0 = torch.randn((batch, *self.latent_shape), generator=generator)
            sample, timestep = self.noising.add_noise(x0, generator, shared=self.shared_timestep)
        return self._inputs(sample, timestep, kwargs)

    @torch.no_grad()
    def _trajectory_state(self, kwargs, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A state of the teacher's own sampling run: random stop index among `trajectory_steps`."""
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(self.config.trajectory_steps)
        batch = self.config.batch_size
        stop = int(torch.randint(0, len(scheduler.timesteps), (1,), generator=generator))
        x = torch.randn((batch, *self.latent_shape), generator=generator).to(self.device) * getattr(scheduler, "init_noise_sigma", 1.0)
        cond = kwargs
        channels = self.latent_shape[0]
        scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)  # flow matching has none
        for t in scheduler.timesteps[:stop]:
            out = self.teacher(self._inputs(scale(x, t), t.expand(batch).to(self.device), cond))
            x = scheduler.step(out[:, :channels], t, x).prev_sample
        t = scheduler.timesteps[stop]
        return scale(x, t).cpu(), t.expand(batch).cpu()

    def _inputs(self, sample, timestep, cond) -> dict[str, Any]:
        """Denoiser keyword arguments on the device, floating tensors in the model's dtype."""
        key = get_family(self.record.family).input_key
        dtype = next(self.denoiser.parameters()).dtype
        return _to_device({key: sample, "timestep": timestep, **cond}, self.device, dtype)

    # --- forward passes ---------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The unpatched model's output (pretrained values of any training inherited weights)."""
        with teacher_mode(self.denoiser, self.record), self.accelerator.autocast():
            if self.frozen:
                result = torch.func.functional_call(self.denoiser, self.frozen, (), inputs, strict=False)
            else:
                result = self.denoiser(**inputs)
        return _output(result).float()

    def student(self, inputs: dict[str, Any], model=None) -> torch.Tensor:
        with self.accelerator.autocast():
            return _output((model or self.model)(**inputs)).float()

    def loss(self, inputs: dict[str, Any]) -> torch.Tensor:
        return F.mse_loss(self.student(inputs), self.teacher(inputs))

    @torch.no_grad()
    def evaluate(self, num_batches: int = 2, seed: int = 12345) -> float:
        """Relative deviation of the student from the teacher, sum ||s - t||^2 / sum ||t||^2, on fixed
        held-out batches (the same ones every call)."""
        saved = self.config.seed
        self.config.seed = seed
        try:
            error = norm = 0.0
            for i in range(num_batches):
                inputs = self.sample_batch(10**9 + i)
                target = self.teacher(inputs)
                error += float((self.student(inputs, self.denoiser) - target).pow(2).sum())
                norm += float(target.pow(2).sum())
        finally:
            self.config.seed = saved
        return error / max(norm, 1e-30)

    # --- training ---------------------------------------------------------------------------------------

    def train(self, evaluate: bool = True) -> DistillResult:
        config, accelerator = self.config, self.accelerator
        if config.resume:
            self.load_checkpoint(config.resume)
        result = DistillResult(Path(config.output_dir), self.step)
        if evaluate:
            result.deviation_before = self.evaluate()
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=self.step, desc=f"distill {self.record.method}",
                   disable=not (config.progress and accelerator.is_local_main_process))
        trained = list(self.trained_names.values())
        # eval mode throughout: teacher and student must compute the same function of the same inputs
        # (no dropout; no random label dropout in DiT's class embedder, drawn from the global RNG)
        self.denoiser.eval()
        micro = 0
        while self.step < config.max_steps:
            with accelerator.accumulate(self.model):
                loss = self.loss(self.sample_batch(self.step * config.gradient_accumulation_steps + micro))
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(trained, config.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            micro += 1
            result.losses.append(float(loss.detach()))
            if accelerator.sync_gradients:
                micro = 0
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses[-1]:.4g}")
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
        bar.close()
        result.steps = self.step
        if evaluate:
            result.deviation_after = self.evaluate()
        self.save(config.output_dir)
        accelerator.wait_for_everyone()
        return result

    # --- saving -----------------------------------------------------------------------------------------

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.trained_names.items()}

    def save(self, folder: str | os.PathLike) -> Path:
        """The trained tensors + method and options, loadable with `dx.patch(..., weights=folder)`."""
        from .weights import save_weights

        folder = Path(folder)
        if self.accelerator.is_main_process:
            save_weights(folder, self.denoiser, self.record, self.trained_tensors())
        return folder

    def save_checkpoint(self) -> Path | None:
        folder = Path(self.config.output_dir) / f"{CHECKPOINT_PREFIX}{self.step}"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.save(folder)
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "lr_scheduler": self.lr_scheduler.state_dict(), "config": asdict(self.config)},
                       folder / TRAINER_STATE)
            old = sorted(_checkpoints(self.config.output_dir))[:-self.config.keep_checkpoints or None]
            for _, path in old if self.config.keep_checkpoints else []:
                _remove_tree(path)
        self.accelerator.wait_for_everyone()
        return folder

    def load_checkpoint(self, where: str) -> None:
        from .weights import load_weights, read_config

        if where == "latest":
            found = sorted(_checkpoints(self.config.output_dir))
            if not found:
                return  # nothing yet: start from the beginning
            folder = found[-1][1]
        else:
            folder = Path(where)
        config = read_config(folder)
        if config["method"] != self.record.method:
            raise ValueError(f"checkpoint {folder} is for method {config['method']!r}, not {self.record.method!r}")
        load_weights(folder, self.denoiser, config)
        state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step = int(state["step"])


def distill(pipe_or_model, method: str, config: DistillConfig | None = None, **kwargs) -> DistillResult:
    """Patch `pipe_or_model` with `method`, fine-tune by distillation, save to `config.output_dir`.
    The model stays patched with the trained weights. `kwargs` go to `Distiller` (options=...)."""
    return Distiller(pipe_or_model, method, config, **kwargs).train()


# --- helpers ----------------------------------------------------------------------------------------------

def _unique(params) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _to_device(value, device, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device, dtype) for k, v in value.items()}
    return value


def _checkpoints(output_dir) -> list[tuple[int, Path]]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return found


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
