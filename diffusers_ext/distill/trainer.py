"""The distiller: a patched denoiser (student) learns to match the same denoiser unpatched (teacher)
on the same batches (`DistillData`), through the shared `TrainingLoop`.

One copy of the weights. The teacher is the student's own denoiser with every patched site's
processor swapped back to the original for a no-grad forward (`teacher_mode`). When inherited
weights train, the teacher must still see the pretrained values, so the distiller keeps a frozen
copy of only those tensors and runs the teacher with them through `torch.func.functional_call`.
Loss: mean squared error between the student's and the teacher's full outputs (both in fp32).
The result folder holds only the trained tensors (safetensors) plus the method and options (JSON).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..families import find_denoiser, get_family
from ..patching import RECORD_ATTRIBUTE, PatchRecord, patch
from ..registry import get_method
from ..weights import keep_pretrained
from .config import DistillConfig, DistillResult
from .data import Conditions, DistillData
from .loop import TrainingLoop, make_accelerator


@contextlib.contextmanager
def teacher_mode(denoiser: torch.nn.Module, record: PatchRecord, pretrained: dict[str, torch.Tensor] | None = None):
    """Inside: every patched site runs its original processor, and the tensors of `pretrained` (name ->
    stock value) hold their stock values (copied in, then back): the unpatched stock model. Restored after.
    (The per-step teacher passes its stock tensors through `functional_call` instead, without copies.)"""
    modules = dict(denoiser.named_modules())
    installed = {name: modules[name].processor for name in record.sites}
    guard = record.state.guard     # the check that the patch's processors are in place: off while swapped
    pause = guard.pause() if guard is not None else contextlib.nullcontext()
    pretrained = pretrained or {}
    own = denoiser.state_dict(keep_vars=True) if pretrained else {}      # not on the per-step teacher's path
    current = {name: own[name].detach().clone() for name in pretrained}
    try:
        with pause:
            for name in record.sites:
                modules[name].set_processor(record.originals[name])
            with torch.no_grad():
                for name, value in pretrained.items():
                    own[name].copy_(value)
            yield denoiser
    finally:
        with torch.no_grad():
            for name, value in current.items():
                own[name].copy_(value)
        for name, processor in installed.items():
            modules[name].set_processor(processor)


class Distiller:
    """Fine-tunes a method's parameters on `pipe_or_model` by matching the unpatched model's output.

    The model is patched with `method` and `options` (or already patched: `method=None`). Custom
    `conditions` (an object with `sample(batch_size, generator) -> kwargs`) replace the default
    prompts / class labels; `noising` ("flow" | "interpolant" | "ddpm") overrides the scheduler's.
    `data`: clean samples (N, C, H, W) in the denoiser's input space (latents, or pixels for a
    pixel-space model) to noise instead of `config.latents`, e.g. the training set of the model;
    for a class-conditional model with its `labels` (N,), each sample drawn with its own class.

    What trains, the method says (`Method.trainable_parameters`): "new" parameters it added train
    at `lr`, "inherited" pretrained ones it may adapt at `inherited_lr` (0 = frozen, the default);
    `config.inherited="all"` makes every pretrained weight of the denoiser inherited.
    """

    def __init__(self, pipe_or_model, method: str | None = None, config: DistillConfig | None = None, *,
                 options: dict[str, Any] | None = None, conditions: Conditions | None = None,
                 noising: str | None = None, latent_size: int | tuple[int, int] | None = None,
                 data: torch.Tensor | None = None, labels: torch.Tensor | None = None):
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
        self.accelerator = make_accelerator(config, find_unused_parameters=step_dependent)
        self.device = self.accelerator.device

        # what trains
        groups = self.method.trainable_parameters(record)
        if config.inherited == "all":
            groups = dict(groups, inherited=list(self.denoiser.parameters()))
        if config.inherited_lr > 0 and not groups.get("inherited"):
            raise ValueError(f"method {record.method!r} adapts no inherited weights: inherited_lr must be 0, "
                             f"got {config.inherited_lr} (or train every weight: inherited='all')")
        new_params = _unique(groups.get("new", []))
        inherited = _unique(groups.get("inherited", [])) if config.inherited_lr > 0 else []
        inherited_params = [p for p in inherited if all(p is not q for q in new_params)]
        if not new_params and not inherited_params:
            raise ValueError(f"method {record.method!r} has nothing to train on this model")
        names = {id(p): n for n, p in self.denoiser.named_parameters(remove_duplicate=False)}
        self.trained_names = {names[id(p)]: p for p in new_params + inherited_params}
        self.denoiser.requires_grad_(False)
        for p in self.trained_names.values():
            p.requires_grad_(True)
        # the teacher's values of the inherited weights that train: the stock model's, kept on the denoiser
        # (also for `unpatch`) before the first fine-tune changes them, so a model trained further, in memory or
        # from a weights folder, is still taught by the stock model and not by its own earlier fine-tune
        self.frozen = {name: value.to(self.device) for name, value in
                       keep_pretrained(self.denoiser, [names[id(p)] for p in inherited_params]).items()}

        self.data = DistillData(self.denoiser, self.pipe, get_family(record.family), config,
                                device=self.device, rank=self.accelerator.process_index,
                                shared_timestep=self.shared_timestep,
                                teacher_context=lambda: teacher_mode(self.denoiser, self.record, self.frozen),
                                conditions=conditions, noising=noising, latent_size=latent_size, data=data,
                                labels=labels)

        param_groups = [{"params": new_params, "lr": config.lr}]
        if inherited_params:
            param_groups.append({"params": inherited_params, "lr": config.inherited_lr})
        self.loop = TrainingLoop(self.accelerator, config, self.denoiser, param_groups,
                                 save_weights=self._write_weights, load_weights=self._read_weights)

    @property
    def conditions(self) -> Conditions:
        return self.data.conditions

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.data.latent_shape

    def sample_batch(self, step: int) -> dict[str, Any]:
        """Denoiser keyword arguments of one (per-process) batch: sample, timestep and conditions."""
        return self.data.sample_batch(step)

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
            return _output((model or self.loop.model)(**inputs)).float()

    def loss(self, inputs: dict[str, Any]) -> torch.Tensor:
        """MSE of student and teacher; with `config.guided_loss` (batches of conditional / unconditional pairs),
        plus the MSE of their guided outputs."""
        student, teacher, scale = self.student(inputs), self.teacher(inputs), self.config.guided_loss
        loss = F.mse_loss(student, teacher)
        if scale is not None:
            loss = loss + F.mse_loss(_guided(student, scale), _guided(teacher, scale))
        return loss

    @torch.no_grad()
    def evaluate(self, num_batches: int = 2, seed: int = 12345) -> float:
        """Relative deviation of the student from the teacher, sum ||s - t||^2 / sum ||t||^2, on fixed
        held-out batches (the same ones every call)."""
        error = norm = 0.0
        for i in range(num_batches):
            inputs = self.data.sample_batch(10**9 + i, seed=seed)
            target = self.teacher(inputs)
            error += float((self.student(inputs, self.denoiser) - target).pow(2).sum())
            norm += float(target.pow(2).sum())
        return error / max(norm, 1e-30)

    # --- training ---------------------------------------------------------------------------------------

    def train(self, evaluate: bool = True) -> DistillResult:
        """Resume if asked, train to `max_steps`, save to `output_dir`; deviations before and after."""
        self.loop.resume()
        result = DistillResult(Path(self.config.output_dir), self.loop.step)
        if evaluate:
            result.deviation_before = self.evaluate()
        # eval mode throughout: teacher and student must compute the same function of the same inputs
        # (no dropout; no random label dropout in DiT's class embedder, drawn from the global RNG)
        self.denoiser.eval()
        result.losses = self.loop.run(lambda index: self.loss(self.sample_batch(index)),
                                      desc=f"distill {self.record.method}")
        result.steps = self.loop.step
        self.loop.check_finite()   # nothing non-finite is ever saved
        if evaluate:
            result.deviation_after = self.evaluate()
        self.save(self.config.output_dir)
        self.accelerator.wait_for_everyone()
        return result

    # --- saving -----------------------------------------------------------------------------------------

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.trained_names.items()}

    def save(self, folder: str | os.PathLike) -> Path:
        """The trained tensors + method and options, loadable with `dx.patch(..., weights=folder)`."""
        folder = Path(folder)
        if self.accelerator.is_main_process:
            self._write_weights(folder)
        return folder

    def _write_weights(self, folder: Path) -> None:
        from ..weights import save_weights

        save_weights(folder, self.denoiser, self.record, self.trained_tensors())

    def _read_weights(self, folder: Path) -> None:
        from ..weights import load_weights, read_config

        config = read_config(folder)
        if config["method"] != self.record.method:
            raise ValueError(f"checkpoint {folder} is for method {config['method']!r}, not {self.record.method!r}")
        load_weights(folder, self.denoiser, config)


def distill(pipe_or_model, method: str, config: DistillConfig | None = None, **kwargs) -> DistillResult:
    """Patch `pipe_or_model` with `method`, fine-tune by distillation, save to `config.output_dir`.
    The model stays patched with the trained weights. `kwargs` go to `Distiller` (options=...)."""
    return Distiller(pipe_or_model, method, config, **kwargs).train()


def _guided(output: torch.Tensor, scale: float) -> torch.Tensor:
    """u + scale (c - u) of a (2B, ...) output whose first half is conditional, second unconditional: (B, ...)."""
    cond, uncond = output.chunk(2)
    return uncond + scale * (cond - uncond)


def _output(result) -> torch.Tensor:
    return result.sample if hasattr(result, "sample") else result[0]


def _unique(params) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
