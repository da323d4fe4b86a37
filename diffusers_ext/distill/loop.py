"""The optimisation any fine-tune shares, whatever its loss and data: `TrainingLoop`.

accelerate throughout: CPU, one GPU, `accelerate launch` multi-GPU / multi-node (DDP), mixed precision
(autocast), gradient accumulation. AdamW over the given parameter groups (each with its own lr), a
linear warmup, gradient clipping, an optional exponential moving average of the trained weights
(`ema_decay`), a progress bar. Checkpoints (`<output_dir>/checkpoint-<step>`) hold what the caller's
`save_weights` writes (the averaged weights when `ema_decay` > 0: the run's result at that step) plus
the optimizer and lr-schedule state and the raw weights; `resume="latest"` continues from the newest.
The loss draws its own batch from the index it is given, so a resumed run sees the same batches as an
uninterrupted one.

    accelerator = make_accelerator(config)
    loop = TrainingLoop(accelerator, config, model, [{"params": params, "lr": 1e-4}],
                        save_weights=write_folder, load_weights=read_folder)
    loop.resume()
    losses = loop.run(lambda index: loss_of_batch(index))
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ..errors import TrainingError

TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_PREFIX = "checkpoint-"


class LoopConfig(Protocol):
    """The fields the loop reads (a dataclass: it is saved with each checkpoint); `DistillConfig` has them."""

    output_dir: str
    max_steps: int                      # optimizer steps
    weight_decay: float
    warmup_steps: int                   # linear warmup of every group's lr (0: none)
    max_grad_norm: float | None         # clip the trained parameters' gradient norm (None / 0: no clipping)
    ema_decay: float                    # EMA of the trained weights, the run's result (0: none, the last iterate)
    gradient_accumulation_steps: int
    mixed_precision: str                # "no" | "fp16" | "bf16"
    cpu: bool
    checkpoint_every: int               # optimizer steps between checkpoints (0: none)
    keep_checkpoints: int               # the newest this many are kept (0: all)
    resume: str | None                  # a checkpoint folder, or "latest" in output_dir
    progress: bool


MIXED_PRECISIONS = ("no", "fp16", "bf16")


def check_loop_config(config) -> None:
    """Refuse optimisation and bookkeeping fields the loop cannot run (every fine-tune config calls this
    from `__post_init__`): counts >= 1, lr finite and > 0, weight decay / clipping finite and >= 0,
    warmup and checkpoint counts >= 0, a known mixed precision. Raises ValueError naming the field."""
    for name in ("batch_size", "max_steps", "gradient_accumulation_steps"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("lr", "weight_decay", "max_grad_norm"):
        value = getattr(config, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr}")
    for name in ("weight_decay", "max_grad_norm", "warmup_steps", "checkpoint_every", "keep_checkpoints"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not 0.0 <= config.ema_decay < 1.0:   # (nan fails too)
        raise ValueError(f"ema_decay must be in [0, 1) (0: no averaging), got {config.ema_decay}")
    if config.mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, "
                         f"got {config.mixed_precision!r}")


@torch.no_grad()
def ema_update(average: list[torch.Tensor], weights: list[torch.Tensor], decay: float, step: int) -> None:
    """average <- average + (1 - d) (weights - average) after the 0-based optimizer step `step`, with
    d = min(decay, (1 + step) / (10 + step)): the usual warm-up, so a short run's average is not dominated
    by its starting point. Every trainer's EMA (the loop's, the lab's and the digits model's)."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(average, [w.detach() for w in weights], 1.0 - d)


def batch_generator(seed: int, index: int, rank: int = 0) -> torch.Generator:
    """The random generator of batch `index` on process `rank`: a run's batches depend on (seed, index,
    rank) only, so a resumed run draws what an uninterrupted one would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) * 1_009 + rank)


def make_accelerator(config: LoopConfig, find_unused_parameters: bool = False):
    """The run's `accelerate.Accelerator` (DDP may need `find_unused_parameters` when some trained
    parameters sit idle in a step)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(
        mixed_precision=config.mixed_precision, cpu=config.cpu,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )


class TrainingLoop:
    """Trains `param_groups` (AdamW groups: `{"params": [...], "lr": ...}`) of `model` to minimise
    `loss(batch_index)`. `model` moves to the accelerator's device and is wrapped for DDP when there
    are several processes (`self.model`; one process: the model itself, no rewritten `forward`).
    `save_weights(folder)` writes the trained tensors (called on the main process only);
    `load_weights(folder)` reads them back on resume.

    With `config.ema_decay` > 0 the loop keeps an exponential moving average of the trained weights
    (`ema_update`); `run` returns with the average in the model, and checkpoints write it as their
    weights."""

    def __init__(self, accelerator, config: LoopConfig, model: torch.nn.Module, param_groups: list[dict[str, Any]], *,
                 save_weights: Callable[[Path], Any], load_weights: Callable[[Path], Any]):
        self.accelerator, self.config = accelerator, config
        self.save_weights, self.load_weights = save_weights, load_weights
        self.parameters = [p for group in param_groups for p in group["params"]]
        optimizer = torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)
        warmup = max(config.warmup_steps, 0)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        model.to(accelerator.device)
        self.model = accelerator.prepare_model(model) if accelerator.num_processes > 1 else model
        self.optimizer, self.lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
        self.step = 0  # optimizer steps done
        self.ema = [p.detach().clone() for p in self.parameters] if config.ema_decay else None
        self._raw: list[torch.Tensor] | None = None   # the iterate while the average sits in the model

    def run(self, loss: Callable[[int], torch.Tensor], desc: str = "train") -> list[float]:
        """Optimizer steps until `config.max_steps`; `loss(i)` is the loss of micro-batch
        i = step * gradient_accumulation_steps + micro. Returns every micro-batch's loss."""
        config, accelerator = self.config, self.accelerator
        from tqdm.auto import tqdm

        self._swap_in_raw()
        bar = tqdm(total=config.max_steps, initial=self.step, desc=desc,
                   disable=not (config.progress and accelerator.is_local_main_process))
        losses: list[float] = []
        micro = 0
        while self.step < config.max_steps:
            with accelerator.accumulate(self.model):
                index = self.step * config.gradient_accumulation_steps + micro
                value = loss(index)
                losses.append(float(value.detach()))
                if not math.isfinite(losses[-1]):
                    bar.close()
                    raise TrainingError(
                        f"the loss is {losses[-1]} at optimizer step {self.step + 1} (micro-batch {index}); the run "
                        "stopped and saved nothing: lower the learning rate or clip gradients (--max-grad-norm)")
                accelerator.backward(value)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(self.parameters, config.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            micro += 1
            if accelerator.sync_gradients:
                micro = 0
                self.step += 1
                self._update_ema()
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
        bar.close()
        self._swap_in_average()
        return losses

    # --- the average --------------------------------------------------------------------------------------

    def _update_ema(self) -> None:
        if self.ema is not None:
            ema_update(self.ema, self.parameters, self.config.ema_decay, self.step - 1)

    @torch.no_grad()
    def _swap_in_average(self) -> None:
        """The model takes the average; the iterate is kept (`_raw`) to go on training or to checkpoint."""
        if self.ema is None or self._raw is not None:
            return
        self._raw = [p.detach().clone() for p in self.parameters]
        torch._foreach_copy_([p.detach() for p in self.parameters], self.ema)

    @torch.no_grad()
    def _swap_in_raw(self) -> None:
        if self._raw is None:
            return
        torch._foreach_copy_([p.detach() for p in self.parameters], self._raw)
        self._raw = None

    def _raw_weights(self) -> list[torch.Tensor]:
        return self._raw if self._raw is not None else [p.detach() for p in self.parameters]

    def save_checkpoint(self) -> Path:
        """`<output_dir>/checkpoint-<step>`: the weights plus the optimizer and lr-schedule state;
        older checkpoints beyond `keep_checkpoints` are removed."""
        self.check_finite()
        folder = Path(self.config.output_dir) / f"{CHECKPOINT_PREFIX}{self.step}"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                     "lr_scheduler": self.lr_scheduler.state_dict(), "config": asdict(self.config)}
            training = self._raw is None   # the iterate is in the model (mid-run): put it back after saving
            if self.ema is not None:        # the folder's weights are the average; the iterate goes on from here
                state["raw"] = [t.clone() for t in self._raw_weights()]
            self._swap_in_average()         # (nothing without an average)
            self.save_weights(folder)
            if training:
                self._swap_in_raw()
            torch.save(state, folder / TRAINER_STATE)
            old = sorted(checkpoints(self.config.output_dir))[:-self.config.keep_checkpoints or None]
            for _, path in old if self.config.keep_checkpoints else []:
                _remove_tree(path)
        self.accelerator.wait_for_everyone()
        return folder

    def check_finite(self) -> None:
        """A `TrainingError` when a trained parameter holds nan / inf (never saved as a result)."""
        bad = sum(1 for p in self.parameters if not bool(torch.isfinite(p.detach()).all()))
        if bad:
            raise TrainingError(f"{bad} trained parameter tensor(s) hold nan or inf after step {self.step}; the run "
                                "stopped and saved nothing: lower the learning rate or clip gradients (--max-grad-norm)")

    def resume(self) -> None:
        """Continue from `config.resume` (a checkpoint folder, or "latest": the newest in
        `output_dir`, none yet: start from the beginning); nothing when it is None."""
        where = self.config.resume
        if not where:
            return
        if where == "latest":
            found = sorted(checkpoints(self.config.output_dir))
            if not found:
                return
            folder = found[-1][1]
        else:
            folder = Path(where)
        self.load_weights(folder)
        state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False)
        with torch.no_grad():
            if self.ema is not None:      # the folder's weights: the average (or the iterate, if made without one)
                torch._foreach_copy_(self.ema, [p.detach() for p in self.parameters])
            if "raw" in state:
                torch._foreach_copy_([p.detach() for p in self.parameters], [t.to(p.device) for t, p in
                                                                             zip(state["raw"], self.parameters)])
        self._raw = None
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step = int(state["step"])


def checkpoints(output_dir) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in `output_dir`, unordered."""
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
