"""Knowing the denoising step inside attention.

diffusers pipelines do not tell attention processors which step they are in. A forward pre-hook on
the denoiser reads the `timestep` argument (and the latent's spatial size) before every call and
writes them into a `StepState` that the processors of one patch share. It is a torch hook, run by
`Module.__call__`, not a wrapper of `forward`: a plugin that replaces the instance's `forward` and
later puts back the one it saved (DeepCache's `disable()`) cannot drop it.

Where the step sits in the run:
- patched through a pipeline: the timestep is located in `pipe.scheduler.timesteps` (looked up at
  call time, so swapping the scheduler after patching is fine); `progress = index / len(timesteps)`.
- a timestep the scheduler does not list (e.g. in distillation): the scheduler's own
  `progress_of_timestep(t)` where it has one (SiT: t itself), else, as for a bare denoiser, the
  timestep is placed in the model's training range, `progress = 1 - (t + 1) / num_train_timesteps`
  (t = 999 of 1000 is the start of a run).

Processors never read the raw timestep: every `Schedule` of a patch is evaluated once per forward
into a plain bool (`state.active[key]`), so torch.compile sees at most two values per schedule and
does not recompile every step.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class Schedule:
    """When a component of a method acts: `start <= position < end`.

    Floats are fractions of the denoising run (0.0 = first step, 1.0 = after the last); ints are
    step indices into the scheduler's timesteps. `Schedule.parse` accepts `None` / "all" (always),
    a `(start, end)` pair of floats or of ints.
    """

    start: float | int = 0.0
    end: float | int = 1.0

    @property
    def by_index(self) -> bool:
        return isinstance(self.start, int) and isinstance(self.end, int)

    @property
    def always(self) -> bool:
        return not self.by_index and self.start <= 0.0 and self.end >= 1.0

    @classmethod
    def parse(cls, value: Any, name: str = "steps") -> "Schedule":
        if isinstance(value, Schedule):
            return value
        if value is None or value == "all":
            return cls()
        if isinstance(value, str) or not hasattr(value, "__len__") or len(value) != 2:
            raise ValueError(f"`{name}` must be None, 'all', or a (start, end) pair; got {value!r}")
        start, end = value
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (start, end)):
            raise ValueError(f"`{name}` must hold two numbers; got {value!r}")
        if isinstance(start, int) and isinstance(end, int):
            if not 0 <= start < end:
                raise ValueError(f"`{name}` as step indices needs 0 <= start < end; got {value!r}")
            return cls(start, end)
        start, end = float(start), float(end)
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(
                f"`{name}` as fractions of the run needs 0 <= start < end <= 1; got {value!r} "
                "(use two ints for step indices)"
            )
        return cls(start, end)

    def contains(self, step_index: int | None, progress: float) -> bool:
        if self.by_index:
            if step_index is None:
                raise RuntimeError(
                    "a schedule given as step indices needs the pipeline's scheduler to know the step; "
                    "patch the pipeline rather than the bare denoiser, or give fractions of the run"
                )
            return self.start <= step_index < self.end
        return self.start <= progress < self.end or (self.end >= 1.0 and progress >= 1.0)

    def acts_in(self, num_steps: int) -> bool:
        """Whether some step of a run of `num_steps` falls in the schedule (step i is at progress i / n)."""
        if self.by_index:
            return self.start < num_steps
        # the first step at or after `start` is floor(start n) or the next one (float rounding): it acts
        # unless it lies at or past `end`, and every later step lies further on (runs every denoiser call)
        first = min(num_steps - 1, math.floor(self.start * num_steps))
        return any(self.contains(i, i / num_steps) for i in (first, first + 1) if i < num_steps)


_PARTIAL_RUN = contextvars.ContextVar("diffusers_ext_partial_run", default=False)


@contextlib.contextmanager
def partial_run():
    """Inside: runs that stand for part of a real one (a one-step warm-up) may miss a schedule given
    as step indices; elsewhere a schedule that lies outside the run is an `OptionError`."""
    token = _PARTIAL_RUN.set(True)
    try:
        yield
    finally:
        _PARTIAL_RUN.reset(token)


@dataclass
class StepState:
    """What the processors of one patch read; filled by `StepTracker` before every denoiser call."""

    schedules: dict[str, Schedule] = field(default_factory=dict)
    active: dict[str, bool] = field(default_factory=dict)
    timestep: float | None = None
    step_index: int | None = None
    num_steps: int | None = None
    progress: float = 0.0
    latent_hw: tuple[int, int] | None = None
    num_frames: int | None = None
    guard: Any = None   # called before every forward: raises if the patch's processors were replaced

    def update(self, timestep, step_index, num_steps, progress) -> None:
        self.timestep, self.step_index, self.num_steps, self.progress = timestep, step_index, num_steps, progress
        if num_steps is not None and not _PARTIAL_RUN.get():
            for key, s in self.schedules.items():
                if not s.acts_in(num_steps):
                    from .errors import OptionError

                    where = (f"step indices 0..{num_steps - 1}" if s.by_index else
                             f"its steps start at fractions {', '.join(f'{i / num_steps:g}' for i in range(min(num_steps, 4)))}"
                             + (", ..." if num_steps > 4 else ""))
                    raise OptionError(
                        f"option `{key}`=({s.start}, {s.end}) never acts in this run of {num_steps} steps ({where}); "
                        "give a part of the run that holds a step, e.g. (0.0, 0.4)")
        self.active = {key: s.contains(step_index, progress) for key, s in self.schedules.items()}

    def grid(self, num_tokens: int) -> tuple[int, int] | None:
        """(height, width) of an image grid of `num_tokens` tokens at some downsampling 2**k of the
        latent (UNet levels round up, as stride-2 convs with padding do; DiT / SD3 patchify divides),
        or None when the tokens are not such a grid."""
        if self.latent_hw is None:
            return None
        height, width = self.latent_hw
        for k in range(8):
            d = 2**k
            gh, gw = math.ceil(height / d), math.ceil(width / d)
            if gh * gw == num_tokens:
                return gh, gw
            if gh * gw < num_tokens:
                return None
        return None


def _first_value(t: Any) -> float:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0].item())
    return float(t)


class StepTracker:
    """Reads `timestep` and the latent shape of every call of `denoiser` into `state` (a forward
    pre-hook from construction until `remove()`)."""

    def __init__(self, denoiser: torch.nn.Module, state: StepState, pipeline=None,
                 num_train_timesteps: int | None = None):
        self.state = state
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self.num_train_timesteps = num_train_timesteps or DEFAULT_TRAIN_TIMESTEPS
        # the class's forward: another plugin may have wrapped the instance's in (*args, **kwargs) (DeepCache)
        self._signature = inspect.signature(type(denoiser).forward.__get__(denoiser))
        self._handle = denoiser.register_forward_pre_hook(self.pre_forward, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def _scheduler(self):
        pipe = self._pipeline() if self._pipeline is not None else None
        return getattr(pipe, "scheduler", None)

    def locate(self, t: float) -> tuple[int | None, int | None, float]:
        """(step_index, num_steps, progress) of timestep `t`."""
        scheduler = self._scheduler()
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is not None and len(timesteps) > 0:
            ts = torch.as_tensor(timesteps).detach().to("cpu", torch.float64)
            distance = (ts - t).abs()
            index = int(distance.argmin())
            if distance[index] <= 1e-3 * max(1.0, abs(t)):
                return index, len(ts), index / len(ts)
        if hasattr(scheduler, "progress_of_timestep"):  # a scheduler with its own time convention (SiT)
            return None, None, scheduler.progress_of_timestep(t)
        train_steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
        train_steps = train_steps or self.num_train_timesteps
        return None, None, min(max(1.0 - (t + 1.0) / train_steps, 0.0), 1.0)

    @torch.compiler.disable  # plain Python bookkeeping: never traced, so it adds no per-step guards
    def pre_forward(self, module, args, kwargs):
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        sample = next(iter(bound.values()), None)
        if isinstance(sample, torch.Tensor) and sample.ndim >= 4:
            self.state.latent_hw = tuple(sample.shape[-2:])
            self.state.num_frames = sample.shape[2] if sample.ndim == 5 else None
        timestep = bound.get("timestep")
        if timestep is None:
            raise ValueError(
                f"{type(module).__name__} was called without a `timestep`; a diffusers_ext patch needs it "
                "to know the denoising step"
            )
        if self.state.guard is not None:
            self.state.guard()
        t = _first_value(timestep)
        self.state.update(t, *self.locate(t))
