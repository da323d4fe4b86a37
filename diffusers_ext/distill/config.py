"""What a distillation run is given (`DistillConfig`) and what it returns (`DistillResult`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .loop import check_loop_config


# What `inherited_lr` trains besides the method's new parameters: "sites", the pretrained weights the method
# offers (`Method.trainable_parameters`: the patched attention layers' projections); "all", every pretrained
# weight of the denoiser (the papers' full fine-tunes).
INHERITED_SCOPES = ("sites", "all")

# `guided_loss` = w: each batch is B/2 conditional samples and the same noised inputs under the unconditional
# condition (the empty prompt / the null class; `uncond_prob` is not drawn then), and the loss adds
# MSE(u_s + w (c_s - u_s), u_t + w (c_t - u_t)), student s against teacher t, to the per-call MSE. Guided sampling
# follows u + w (c - u), which scales an error in the condition's direction c - u by w; the per-call loss sees that
# error at its own size (on the glyph SiT c - u is a tenth of the output's norm).


@dataclass
class DistillConfig:
    """Everything a distillation run needs besides the model and the method. The optimisation and
    bookkeeping fields are the ones `TrainingLoop` reads (`loop.LoopConfig`, checked by
    `loop.check_loop_config`)."""

    output_dir: str = "distilled"
    # conditions
    prompts: Sequence[str] | str | None = None      # a list, or a text file with one prompt per line
    class_labels: Sequence[int] | None = None       # class-conditional models: labels to draw (default: all)
    uncond_prob: float = 0.1                        # share of empty prompts / null classes
    guided_loss: float | None = None                # also distil the guided output at this scale (above)
    # inputs
    latents: str = "noise"                          # "noise" | "trajectory" | a folder of images
    trajectory_runs: int = 8                        # "trajectory": pipeline runs (of batch_size samples) recorded
    trajectory_steps: int | None = None             # their steps; None: the pipeline's recipe, else 20
    trajectory_guidance: float | None = None        # their guidance scale; None: the recipe's / the pipeline's
    shared_timestep: bool | None = None             # one timestep per batch; None: when the patch is step-dependent
    resolution: int | None = None                   # image pixels; default: the model's sample size
    # optimisation
    batch_size: int = 4
    max_steps: int = 1000
    lr: float = 1e-3
    inherited_lr: float = 0.0                       # 0 keeps the inherited weights frozen
    inherited: str = "sites"                        # which: "sites" (the method's) | "all" (INHERITED_SCOPES)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    ema_decay: float = 0.0                          # EMA of the trained weights, saved as the result (0: none)
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
        check_loop_config(self)
        for name in ("inherited_lr", "uncond_prob"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.inherited_lr < 0:
            raise ValueError(f"inherited_lr must be >= 0, got {self.inherited_lr}")
        if self.inherited not in INHERITED_SCOPES:
            raise ValueError(f"inherited must be one of {', '.join(INHERITED_SCOPES)}, got {self.inherited!r}")
        if self.inherited != "sites" and self.inherited_lr == 0:
            raise ValueError(f"inherited={self.inherited!r} trains pretrained weights: give inherited_lr > 0")
        if not 0.0 <= self.uncond_prob <= 1.0:
            raise ValueError(f"uncond_prob must be in [0, 1], got {self.uncond_prob}")
        if not _is_count(self.trajectory_runs):
            raise ValueError(f"trajectory_runs must be an integer >= 1, got {self.trajectory_runs!r}")
        if self.trajectory_steps is not None and not _is_count(self.trajectory_steps):
            raise ValueError(f"trajectory_steps must be None (the pipeline's recipe) or an integer >= 1, "
                             f"got {self.trajectory_steps!r}")
        if self.trajectory_guidance is not None and not (math.isfinite(self.trajectory_guidance)
                                                         and self.trajectory_guidance >= 1):
            raise ValueError(f"trajectory_guidance must be None (the recipe's) or a finite number >= 1, "
                             f"got {self.trajectory_guidance!r}")
        if self.guided_loss is not None:
            if not (isinstance(self.guided_loss, (int, float)) and math.isfinite(self.guided_loss)
                    and self.guided_loss > 1):
                raise ValueError(f"guided_loss must be None (the per-call loss only) or a guidance scale > 1, "
                                 f"got {self.guided_loss!r}")
            if self.batch_size % 2:
                raise ValueError(f"guided_loss pairs every sample with its unconditional twin: batch_size must be "
                                 f"even, got {self.batch_size}")
            if self.latents == "trajectory":
                raise ValueError("guided_loss pairs noised samples with their unconditional twins; "
                                 "latents='trajectory' replays the pipeline's own calls: use one or the other")
        if self.shared_timestep not in (None, True, False):
            raise ValueError(f"shared_timestep must be None (automatic), True or False, got {self.shared_timestep!r}")
        if self.latents in ("noise", "trajectory"):
            return
        if not Path(self.latents).is_dir():
            raise ValueError(f"latents must be 'noise', 'trajectory' or a folder of images; {self.latents!r} is none")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class DistillResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    deviation_before: float | None = None
    deviation_after: float | None = None
