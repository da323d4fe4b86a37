"""Short fine-tunes by distillation: a patched denoiser (student) learns to match the same denoiser
unpatched (teacher) on the same noised latents, timesteps and conditions. No dataset needed.

    from diffusers_ext.distill import DistillConfig, distill
    result = distill(pipe, "t5", DistillConfig(output_dir="t5-sd35", prompts="prompts.txt", max_steps=2000))
    dx.patch(pipe, "t5", weights="t5-sd35")              # later, in another process

Method-agnostic: the method says which parameters may train (`Method.trainable_parameters`).

- `config`: `DistillConfig` (what a run is given), `DistillResult` (what it returns);
- `data`: conditions, noising, clean samples and trajectory states: everything that makes a batch;
- `trainer`: `Distiller` (teacher and student on one set of weights, the loss, evaluation, saving);
- `loop`: `TrainingLoop`, the accelerate optimisation loop with checkpoints and resume, for any loss;
- `cli`: `diffusers-ext distill`.
"""

from .config import DistillConfig, DistillResult
from .data import ClassConditions, Conditions, DistillData, Noising, PromptConditions, default_conditions, read_prompts
from .loop import TrainingLoop, make_accelerator
from .trainer import Distiller, distill, teacher_mode

__all__ = [
    "ClassConditions", "Conditions", "DistillConfig", "DistillData", "DistillResult", "Distiller", "Noising",
    "PromptConditions", "TrainingLoop", "default_conditions", "distill", "make_accelerator", "read_prompts",
    "teacher_mode",
]
