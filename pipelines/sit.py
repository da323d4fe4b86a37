"""SiT (Scalable Interpolant Transformers, Ma et al. 2024): class-conditional generation with the DiT
network trained on the linear flow-matching interpolant.

    pipe = SiTPipeline(transformer=convert_dit_checkpoint("SiT-XL-2-256.pt"), vae=vae, scheduler=SiTScheduler())
    images = pipe(class_labels=[207, 360], num_inference_steps=250, guidance_scale=1.5, sampler="sde").images

The interpolant (SiT's linear `ICPlan`): x_t = t x_data + (1 - t) x_noise, t in [0, 1], t = 0 pure noise,
t = 1 data. The network predicts the velocity v(x_t, t) = E[x_data - x_noise | x_t] and receives
t itself as its `timestep` (see `convert.py`). Samplers (the integration runs from t = 0 to t = 1):

- "ode-euler": x <- x + dt v(x, t) on t_i = i / N, N model calls.
- "ode-heun":  the trapezoid predictor-corrector on the same grid, 2N model calls.
- "sde": Euler-Maruyama on  dx = [v + w(t) score] dt + sqrt(2 w(t)) dW  with SiT's defaults
  (diffusion form "sigma": w(t) = norm (1 - t); score from the velocity: (t v - x) / (1 - t)),
  on t_i = linspace(0, 1 - 0.04, N), then the "Mean" last step x + 0.04 * drift (no noise):
  N model calls; 250 steps is the SiT evaluation protocol.

Classifier-free guidance as in DiT / SiT: the batch is doubled with the null class (the number of
classes: 1000 for ImageNet), the guided velocity is v_u + g (v_c - v_u) on the first `guide_channels`
latent channels (3, the released samplers' convention, is the default for 4-channel latents; None
guides every channel) and the conditional velocity on the others. A network with learned sigma
(out_channels = 2 x in_channels) has its second half dropped. Latents are decoded with the VAE's
scaling factor (0.18215 for DiT / SiT's sd-vae-ft-*); with `vae=None` the model works in pixel space
(values in [-1, 1]; the digits model of `diffusers_ext.digits`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

SAMPLERS = ("ode-heun", "ode-euler", "sde")
NULL_CLASS = 1000


class SiTScheduler(SchedulerMixin, ConfigMixin):
    """The time grids and SDE coefficients of SiT's linear interpolant (no state between steps).

    `timesteps` (set by `set_timesteps`) lists the times of the first model call of each step, so
    a diffusers_ext step tracker finds the step index of every call (Heun's corrector call at
    t_{i+1} is located as step i + 1).
    """

    order = 1

    @register_to_config
    def __init__(self, last_step_size: float = 0.04, diffusion_norm: float = 1.0, num_train_timesteps: int = 1000):
        if not 0.0 <= last_step_size < 1.0:
            raise ValueError(f"last_step_size must be in [0, 1), got {last_step_size}")
        self.timesteps = torch.zeros(0)
        self.grid = torch.zeros(0)
        self.sampler = None

    def set_timesteps(self, num_inference_steps: int, sampler: str = "ode-heun", device=None) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < (2 if sampler == "sde" else 1):
            raise ValueError(f"num_inference_steps must be an integer >= {2 if sampler == 'sde' else 1}, "
                             f"got {num_inference_steps!r}")
        self.sampler = sampler
        if sampler == "sde":
            self.grid = torch.linspace(0.0, 1.0 - self.config.last_step_size, num_inference_steps, dtype=torch.float64)
            self.timesteps = self.grid.clone()
        else:
            self.grid = torch.linspace(0.0, 1.0, num_inference_steps + 1, dtype=torch.float64)
            self.timesteps = self.grid[:-1].clone()
        self.grid = self.grid.to(device) if device is not None else self.grid
        self.timesteps = self.timesteps.to(device) if device is not None else self.timesteps

    def progress_of_timestep(self, t: float) -> float:
        """Where a model call at time t sits in a run (read by diffusers_ext's step tracker for times
        off the sampling grid, e.g. in distillation): SiT integrates from t = 0 (noise) to 1 (data)."""
        return min(max(float(t), 0.0), 1.0)

    def diffusion(self, t: float) -> float:
        """w(t) of SiT's "sigma" diffusion form."""
        return self.config.diffusion_norm * (1.0 - t)

    def sde_drift(self, velocity: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        """v + w(t) score(x, t), score = (t v - x) / (1 - t) for the linear path."""
        return velocity + self.diffusion(t) * (t * velocity - x) / (1.0 - t)


class SiTPipeline(DiffusionPipeline):
    """Class-conditional SiT sampling. Components: `transformer` (DiTTransformer2DModel with SiT
    weights), `vae` (AutoencoderKL, or None for a pixel-space model), `scheduler` (`SiTScheduler`);
    optional `id2label`."""

    model_cpu_offload_seq = "transformer->vae"
    default_guidance_scale = 4.0   # SiT's sample sheets; an instance may set its own

    def __init__(self, transformer, vae, scheduler: SiTScheduler | None = None, id2label: dict | None = None):
        super().__init__()
        scheduler = scheduler if scheduler is not None else SiTScheduler()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        from .convert import use_original_time_embedding

        use_original_time_embedding(transformer)   # SiT weights come from the original code base
        self.labels = {}
        for key, value in (id2label or {}).items():
            for label in str(value).split(","):
                self.labels[label.lstrip().rstrip()] = int(key)
        self.labels = dict(sorted(self.labels.items()))

    @property
    def num_classes(self) -> int:
        """Number of classes of the transformer; its id is also the null class of guidance."""
        return getattr(self.transformer.config, "num_embeds_ada_norm", None) or NULL_CLASS

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """ImageNet label names -> class ids (as DiTPipeline)."""
        labels = [label] if isinstance(label, str) else label
        for name in labels:
            if name not in self.labels:
                raise ValueError(f"{name} does not exist. Please make sure to select one of: {', '.join(self.labels)}")
        return [self.labels[name] for name in labels]

    # --- the velocity field, with guidance ------------------------------------------------------------

    def velocity(self, x: torch.Tensor, t: float, class_labels: torch.Tensor, guidance_scale: float,
                 guide_channels: int | None) -> torch.Tensor:
        """Guided velocity at (x, t); x (B, C, H, W), class_labels (B,) -> (B, C, H, W)."""
        guided = guidance_scale != 1.0
        channels = x.shape[1]
        model_input = torch.cat([x, x]) if guided else x
        null = torch.full_like(class_labels, self.num_classes)
        labels = torch.cat([class_labels, null]) if guided else class_labels
        timestep = torch.full((model_input.shape[0],), float(t), device=x.device, dtype=x.dtype)
        out = self.transformer(model_input, timestep=timestep, class_labels=labels).sample
        if out.shape[1] == 2 * channels:      # learned sigma: drop the variance channels
            out = out[:, :channels]
        if not guided:
            return out
        cond, uncond = out.chunk(2)
        g = channels if guide_channels is None else guide_channels
        mixed = uncond[:, :g] + guidance_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([mixed, cond[:, g:]], dim=1)

    # --- sampling ------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 250,
        guidance_scale: float | None = None,
        sampler: str = "ode-heun",
        guide_channels: int | None | str = "auto",
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Sample images of `class_labels` (ids 0..999).

        guidance_scale: 1 disables guidance (SiT's evaluation: 1.5 for FID, 4.0 for its samples); None:
        the pipeline's `default_guidance_scale` (4.0; the digits model's pipeline sets 2.0).
        sampler: "ode-heun" (default, 2 calls a step), "ode-euler", or "sde" (Euler-Maruyama, 250 steps
        in the SiT protocol). guide_channels: guide the first k latent channels, None: all; "auto" is 3 for
        4-channel latents (DiT / SiT) and all channels otherwise.
        latents: initial noise (B, C, H, W) at t = 0. output_type: "pil", "np", "pt" or "latent".
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}; choose pil, np, pt or latent")
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}")
        config = self.transformer.config
        channels = config.in_channels
        if guide_channels == "auto":
            guide_channels = 3 if channels == 4 else None
        if guide_channels is not None and (isinstance(guide_channels, str) or not 1 <= guide_channels <= channels):
            raise ValueError(f"guide_channels must be \"auto\", None or in 1..{channels}, got {guide_channels!r}")
        param = next(self.transformer.parameters())
        try:
            device = self._execution_device
        except AttributeError:      # a transformer that is no diffusers model
            device = param.device
        labels = torch.as_tensor(class_labels, device=device).reshape(-1).long()
        num_classes = self.num_classes
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must be ids in 0..{num_classes - 1}, got {labels.tolist()}")
        batch = labels.numel()
        dtype = param.dtype
        size = config.sample_size
        if latents is None:
            latents = randn_tensor((batch, channels, size, size), generator=generator, device=device, dtype=dtype)
        elif latents.shape[:2] != (batch, channels):
            raise ValueError(f"latents must be ({batch}, {channels}, H, W), got {tuple(latents.shape)}")
        x = latents.to(device=device, dtype=dtype)

        self.scheduler.set_timesteps(num_inference_steps, sampler)
        grid = self.scheduler.grid.tolist()
        field = lambda x, t: self.velocity(x, t, labels, guidance_scale, guide_channels)  # noqa: E731
        if sampler == "sde":
            x = self._sample_sde(field, x, grid, generator)
        else:
            for i in self.progress_bar(range(num_inference_steps)):
                t, t_next = grid[i], grid[i + 1]
                v = field(x, t)
                if sampler == "ode-euler":
                    x = x + (t_next - t) * v
                else:
                    predicted = x + (t_next - t) * v
                    x = x + 0.5 * (t_next - t) * (v + field(predicted, t_next))

        if output_type == "latent":
            images = x
        else:
            images = x if self.vae is None else self.vae.decode(x / self.vae.config.scaling_factor).sample
            images = (images / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _sample_sde(self, field, x: torch.Tensor, grid: list[float], generator) -> torch.Tensor:
        """Euler-Maruyama on grid[:-1], then the noise-free "Mean" step of size last_step_size."""
        scheduler = self.scheduler
        dt = grid[1] - grid[0]
        for t in self.progress_bar(grid[:-1]):
            drift = scheduler.sde_drift(field(x, t), x, t)
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + drift * dt + math.sqrt(2.0 * scheduler.diffusion(t) * dt) * noise
        t = grid[-1]
        return x + scheduler.sde_drift(field(x, t), x, t) * scheduler.config.last_step_size


__all__ = ["SiTPipeline", "SiTScheduler", "SAMPLERS", "NULL_CLASS"]
