"""Everything that makes a distillation batch: the denoiser's keyword arguments for one step.

One random generator per (seed, step, rank) draws, in this order:
- conditions (`Conditions.sample`): text-to-image prompts from a list / file, encoded once with the
  family's `encode_prompts` (the pipeline's `encode_prompt`: SD, SDXL, SD3), or class labels (DiT / SiT);
  with probability `uncond_prob` the empty prompt / null class, so the unconditional branch of guidance
  is distilled too;
- clean samples: "noise" (x0 ~ N(0, I), the cheapest, off the data manifold), or given data or an image
  folder encoded with the VAE (x0 drawn from them); or, instead of noised samples, "trajectory": the
  denoiser's own inputs recorded while the pipeline samples (`RecordedRuns`: guidance, sampler and
  scheduler exactly as at inference, recorded once before training);
- noising from the pipeline's scheduler (`Noising`): flow matching (x_t = (1 - sigma) x0 + sigma eps,
  sigma shifted like the scheduler's `shift`; SD3), SiT's interpolant (x_t = t x0 + (1 - t) eps,
  t ~ U[0, 1], the model takes t itself; `SiTScheduler`) or DDPM (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps).
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from ..families import Family, get_family
from ..files import IMAGE_SUFFIXES, image_files
from .config import DistillConfig

# =====================================================================================================
# Conditions
# =====================================================================================================

class Conditions(Protocol):
    """Draws the conditioning keyword arguments of the denoiser for a batch (tensors on the CPU). `guided_loss`
    also needs `can_pair`, `draw(batch_size, generator)` and `guidance_pairs(drawn)` (as `ClassConditions`)."""

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

    can_pair = True     # the empty prompt is the unconditional branch (`guidance_pairs`)

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

    def draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Indices (B,) of prompts drawn uniformly."""
        return torch.randint(0, len(self.prompts), (batch_size,), generator=generator)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        return self.of_prompts(self.draw(batch_size, generator), generator)

    def guidance_pairs(self, index: torch.Tensor) -> dict[str, Any]:
        """The conditions of `self.prompts[index]` (B,), then B empty prompts: (2B, ...)."""
        rows = torch.cat([index + 1, torch.zeros_like(index)])
        return self.family.condition_kwargs({key: value[rows] for key, value in self.table.items()}, self.resolution)

    def of_prompts(self, index: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
        """The conditions of `self.prompts[index]` (B,), each replaced by the empty prompt with `uncond_prob`."""
        rows = index + 1
        rows[torch.rand(len(rows), generator=generator) < self.uncond_prob] = 0
        return self.family.condition_kwargs({key: value[rows] for key, value in self.table.items()}, self.resolution)


class ClassConditions:
    """Class-conditional models (DiT / SiT): uniform labels, the null class with `uncond_prob`."""

    def __init__(self, num_classes: int, labels: Sequence[int] | None = None, null_label: int | None = None,
                 uncond_prob: float = 0.1):
        self.labels = torch.as_tensor(list(labels) if labels is not None else range(num_classes), dtype=torch.long)
        if self.labels.numel() == 0 or int(self.labels.min()) < 0 or int(self.labels.max()) >= num_classes:
            raise ValueError(f"class labels must lie in 0..{num_classes - 1}")
        self.num_classes = num_classes
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

    @property
    def can_pair(self) -> bool:
        """Whether the model has a null class (the unconditional branch of guidance)."""
        return self.null_label is not None

    def draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Class labels (B,) drawn uniformly from `self.labels`."""
        return self.labels[torch.randint(0, len(self.labels), (batch_size,), generator=generator)]

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        return self.of_labels(self.draw(batch_size, generator), generator)

    def guidance_pairs(self, labels: torch.Tensor) -> dict[str, Any]:
        """The labels (B,), then B null classes: (2B,)."""
        return {"class_labels": torch.cat([labels, torch.full_like(labels, self.null_label)])}

    def of_labels(self, labels: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
        """The conditions of samples of known classes `labels` (B,): each one replaced by the null
        class with `uncond_prob`."""
        labels = labels.clone()
        if self.uncond_prob:
            labels[torch.rand(len(labels), generator=generator) < self.uncond_prob] = self.null_label
        return {"class_labels": labels}


def image_paths(folder: str | os.PathLike) -> list[Path]:
    """The images of a folder, sorted by path."""
    paths = image_files(folder)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths


def image_captions(paths: list[Path]) -> list[str] | None:
    """Each image's caption, the text file beside it with the same name (`cat.png` -> `cat.txt`), in the
    order of `paths` (`image_paths`); None when no image has one. Some captioned, some not: an error."""
    files = [p.with_suffix(".txt") for p in paths]
    if not any(f.is_file() for f in files):
        return None
    captions = []
    for image, file in zip(paths, files):
        caption = " ".join(file.read_text(encoding="utf-8").split()) if file.is_file() else ""
        if not caption:
            raise ValueError(f"{image.name} has no caption ({file.name} is missing or empty); every image of a "
                             f"captioned folder needs one")
        captions.append(caption)
    return captions


def default_conditions(pipe, denoiser, family: Family | str, config: DistillConfig,
                       resolution: tuple[int, int] | None) -> Conditions:
    family = get_family(family) if isinstance(family, str) else family
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
# The sampler's own inputs
# =====================================================================================================

class RecordedRuns:
    """The denoiser's keyword arguments at every call of whole pipeline runs (`calls`: each run's
    pipeline arguments), recorded on the CPU by a forward pre-hook: what the model meets at
    inference, with the pipeline's guidance batch (conditional and unconditional halves), its
    sampler's extra calls (Heun's corrector) and its scheduler's input scaling. `context` is entered
    around the runs (the distiller's `teacher_mode`: the runs are the stock model's).

    `draw(batch_size, generator)`: `batch_size` samples (with replacement) of one recorded call drawn
    uniformly, so every step of a run trains alike and a batch shares one timestep. With `keep` (a
    file), the recording is saved there and reused by a run resumed with the same runs' arguments.
    """

    def __init__(self, pipe, denoiser: torch.nn.Module, input_key: str, calls: Sequence[dict[str, Any]],
                 context: Callable[[], Any], progress: bool = True, keep: Path | None = None):
        from tqdm.auto import tqdm

        from ..files import atomic_path

        self.input_key = input_key
        key = repr([{k: (v.initial_seed() if isinstance(v, torch.Generator) else v) for k, v in call.items()}
                    for call in calls])
        if keep is not None and keep.is_file():
            saved = torch.load(keep, weights_only=True)
            if saved["key"] == key:
                self.calls = saved["calls"]
                return
        self.calls: list[dict[str, Any]] = []
        signature = inspect.signature(denoiser.forward)

        def record(module, args, kwargs):
            self.calls.append(_detached(signature.bind_partial(*args, **kwargs).arguments))

        handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
        saved = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=True)
        try:
            with context(), torch.no_grad():
                for call in tqdm(calls, desc="recording the sampler's inputs", disable=not progress):
                    pipe(**call)
        finally:
            handle.remove()
            pipe._progress_bar_config = saved
        if not self.calls:
            raise ValueError(f"{type(pipe).__name__} never called its denoiser: nothing to record")
        if keep is not None:
            keep.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(keep) as tmp:
                torch.save({"key": key, "calls": self.calls}, tmp)

    def draw(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        call = self.calls[int(torch.randint(0, len(self.calls), (1,), generator=generator))]
        size = call[self.input_key].shape[0]
        return _select(call, torch.randint(0, size, (batch_size,), generator=generator), size)


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _select(value, index: torch.Tensor, size: int):
    """`value` with every tensor whose first dimension is the call's batch `size` indexed by `index`."""
    if isinstance(value, torch.Tensor):
        return value[index] if value.ndim and value.shape[0] == size else value
    if isinstance(value, dict):
        return {k: _select(v, index, size) for k, v in value.items()}
    return value


# =====================================================================================================
# Batches
# =====================================================================================================

class DistillData:
    """The batches of a distillation run: `sample_batch(step)` -> the denoiser's keyword arguments
    (input (B, C, H, W), timestep (B,), conditions) on `device`, floating tensors in the model's dtype.

    `family` says the denoiser's input name and the fallback noising; `teacher_context` makes the
    pipeline the stock model while "trajectory" runs are recorded. `conditions`, `noising` and `data` (clean
    samples (N, C, H, W) in the denoiser's input space) override what `config` would choose.
    A class-conditional model's `data` comes with its `labels` (N,): each sample is drawn with its
    own class (or the null class, `uncond_prob`), the pairs the model meets when it samples. Drawn
    with random classes instead, a glyph "A" noised under the label "7" is an input the sampler never
    makes, and on most of them the teacher's answer follows the image, not the label.
    """

    def __init__(self, denoiser: torch.nn.Module, pipe, family: Family, config: DistillConfig, *,
                 device: torch.device, rank: int, shared_timestep: bool,
                 teacher_context: Callable[[], Any], conditions: Conditions | None = None,
                 noising: str | None = None, latent_size: int | tuple[int, int] | None = None,
                 data: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        self.denoiser, self.pipe, self.family, self.config = denoiser, pipe, family, config
        self.device, self.rank, self.shared_timestep = device, rank, shared_timestep
        self.latent_shape = self._latent_shape(latent_size)
        resolution = tuple(s * self._vae_scale() for s in self.latent_shape[-2:])
        folder = config.latents if data is None and config.latents not in ("noise", "trajectory") else None
        paths = image_paths(folder) if folder is not None else None   # listed once: captions pair with images
        captions = (image_captions(paths) if paths is not None and conditions is None
                    and family.conditioning == "text" else None)
        self.captioned = captions is not None       # each image drawn with its own caption
        if self.captioned:
            if config.prompts is not None:
                raise ValueError(f"the images in {folder} have captions, which are their prompts: give no prompts")
            conditions = PromptConditions(pipe, family, captions, config.uncond_prob, resolution)
        self.conditions = conditions or default_conditions(pipe, denoiser, family, config, resolution)
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None and noising is None:
            noising = family.noising
        self.noising = Noising(scheduler, noising)
        self.labels = None
        if data is not None:
            if data.ndim != 4 or tuple(data.shape[1:]) != self.latent_shape:
                raise ValueError(f"data must be (N, {', '.join(map(str, self.latent_shape))}) samples of the "
                                 f"denoiser's input, got {tuple(data.shape)}")
            self.clean = data.detach().float().cpu()
            self.labels = self._check_labels(labels, len(data))
            if self.labels is not None:
                keep = torch.isin(self.labels, self.conditions.labels)   # `config.class_labels` only
                if not keep.any():
                    raise ValueError(f"no sample of data is of the classes to draw {self.conditions.labels.tolist()}")
                self.clean, self.labels = self.clean[keep], self.labels[keep]
        elif labels is not None:
            raise ValueError("labels name the classes of data: give them with data")
        elif paths is not None:
            self.clean = self._encode_images(paths)
        else:
            self.clean = None  # x0 ~ N(0, I), or trajectory states
        if config.guided_loss is not None and not getattr(self.conditions, "can_pair", False):
            raise ValueError("guided_loss needs the unconditional branch of guidance: these conditions have none "
                             "(a class-conditional model without a null class, or conditions without guidance_pairs)")
        self.runs = None
        if config.latents == "trajectory" and self.clean is None:
            if pipe is None:
                raise ValueError("latents='trajectory' records the pipeline's own runs: pass the pipeline")
            self.runs = RecordedRuns(pipe, denoiser, family.input_key, self._trajectory_calls(), teacher_context,
                                     progress=config.progress, keep=Path(config.output_dir) / f"trajectory-{rank}.pt")

    # --- shapes -----------------------------------------------------------------------------------------

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

    def _check_labels(self, labels: torch.Tensor | None, count: int) -> torch.Tensor | None:
        if self.family.conditioning != "class":
            if labels is not None:
                raise ValueError(f"labels are class labels; the {self.family.name!r} family is conditioned on text")
            return None
        if labels is None:
            raise ValueError("data for a class-conditional model needs its class labels (labels=, one per sample): "
                             "samples drawn with random classes teach the student inputs the sampler never makes")
        if not isinstance(self.conditions, ClassConditions):
            raise ValueError("labels are drawn through ClassConditions; custom conditions cannot take them")
        labels = torch.as_tensor(labels)
        if labels.shape != (count,) or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be {count} integer class labels (one per sample of data), "
                             f"got {labels.dtype} of shape {tuple(labels.shape)}")
        labels = labels.long().cpu()
        classes = self.conditions.num_classes
        if int(labels.min()) < 0 or int(labels.max()) >= classes:
            raise ValueError(f"labels must lie in 0..{classes - 1}, got {int(labels.min())}..{int(labels.max())}")
        return labels

    # --- clean samples ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode_images(self, paths: list[Path]) -> torch.Tensor:
        """The VAE latents of the images at `paths`, each resized to cover the latent size and centre-cropped."""
        from PIL import Image

        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            raise ValueError("training on images needs the pipeline's VAE: pass the pipeline")
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

    def _trajectory_calls(self) -> list[dict[str, Any]]:
        """The pipeline arguments of the recorded runs: `trajectory_runs` runs of `batch_size` samples from
        noise, at the pipeline's recipe (`pipeline_io.recipe`) unless `trajectory_steps` /
        `trajectory_guidance` say otherwise; run i's conditions and noise from generator (seed, -1 - i)."""
        from ..pipeline_io import call_kwargs, call_parameters, recipe

        config = self.config
        defaults = recipe(self.pipe)
        steps = config.trajectory_steps or defaults.get("num_inference_steps", 20)
        guidance = config.trajectory_guidance
        if guidance is None:
            guidance = defaults.get("guidance_scale")
        takes_size = "height" in call_parameters(self.pipe)
        height, width = ((s * self._vae_scale() for s in self.latent_shape[1:]) if takes_size else (None, None))
        calls = []
        for run in range(config.trajectory_runs):
            generator = self.generator(-1 - run)
            if isinstance(self.conditions, ClassConditions):
                labels = self.conditions.labels[torch.randint(0, len(self.conditions.labels), (config.batch_size,),
                                                              generator=generator)]
                condition = dict(prompt="", class_label=labels.tolist())
            elif isinstance(self.conditions, PromptConditions):
                prompts = self.conditions.prompts
                condition = dict(prompt=prompts[int(torch.randint(0, len(prompts), (1,), generator=generator))],
                                 class_label=0)
            else:
                raise ValueError("latents='trajectory' draws prompts or class labels; custom conditions cannot "
                                 "say what to pass the pipeline")
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            call = call_kwargs(self.pipe, steps=steps, guidance=guidance, height=height, width=width, seed=seed,
                               batch_size=config.batch_size, **condition)
            calls.append({**defaults, **call, "num_inference_steps": steps, "output_type": "latent"})
        return calls

    # --- batches ----------------------------------------------------------------------------------------

    def generator(self, step: int, seed: int | None = None) -> torch.Generator:
        """The generator of batch `step` on this rank (`seed`: the config's unless given)."""
        from .loop import batch_generator

        return batch_generator(self.config.seed if seed is None else seed, step, self.rank)

    def sample_batch(self, step: int, seed: int | None = None) -> dict[str, Any]:
        """Denoiser keyword arguments of one (per-process) batch: sample, timestep and conditions."""
        generator = self.generator(step, seed)
        if self.config.guided_loss is not None:
            return self._guidance_pairs(generator)
        batch = self.config.batch_size
        if self.labels is not None or self.captioned:      # each sample with its own class or caption
            index = torch.randint(0, len(self.clean), (batch,), generator=generator)
            cond = (self.conditions.of_labels(self.labels[index], generator) if self.labels is not None
                    else self.conditions.of_prompts(index, generator))
            sample, timestep = self.noising.add_noise(self.clean[index], generator, shared=self.shared_timestep)
            return self.inputs(sample, timestep, cond)
        if self.runs is not None:        # the sampler's own inputs, as recorded
            return _to_device(self.runs.draw(batch, generator), self.device, self._dtype())
        cond = self.conditions.sample(batch, generator)
        if self.clean is not None:
            x0 = self.clean[torch.randint(0, len(self.clean), (batch,), generator=generator)]
        else:
            x0 = torch.randn((batch, *self.latent_shape), generator=generator)
        sample, timestep = self.noising.add_noise(x0, generator, shared=self.shared_timestep)
        return self.inputs(sample, timestep, cond)

    def _guidance_pairs(self, generator: torch.Generator) -> dict[str, Any]:
        """B/2 conditional samples, then the same noised inputs (noise, timestep) under the unconditional
        condition: the pairs of `config.guided_loss`."""
        half = self.config.batch_size // 2
        if self.labels is not None or self.captioned:      # each sample with its own class or caption
            index = torch.randint(0, len(self.clean), (half,), generator=generator)
            keys, x0 = (self.labels[index] if self.labels is not None else index), self.clean[index]
        else:
            keys = self.conditions.draw(half, generator)
            x0 = (self.clean[torch.randint(0, len(self.clean), (half,), generator=generator)] if self.clean is not None
                  else torch.randn((half, *self.latent_shape), generator=generator))
        sample, timestep = self.noising.add_noise(x0, generator, shared=self.shared_timestep)
        return self.inputs(torch.cat([sample, sample]), torch.cat([timestep, timestep]),
                           self.conditions.guidance_pairs(keys))

    def inputs(self, sample, timestep, cond) -> dict[str, Any]:
        """Denoiser keyword arguments on the device, floating tensors in the model's dtype."""
        return _to_device({self.family.input_key: sample, "timestep": timestep, **cond}, self.device, self._dtype())

    def _dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype


def _to_device(value, device, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device, dtype) for k, v in value.items()}
    return value
