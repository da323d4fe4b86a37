"""`patch`, `unpatch`, `patched`: the one-line pipeline patch.

    import diffusers_ext as dx
    dx.patch(pipe, "agent")                 # pipeline or bare denoiser
    dx.unpatch(pipe)                        # bit-exact restore
    with dx.patched(pipe, "agent", steps=(0.0, 0.5)):
        image = pipe(prompt).images[0]

A patch replaces the processors of the sites the method selects, keeps the originals to restore
them, and attaches a step tracker to the denoiser (see `steps.py`). Patching a patched model
replaces the first patch cleanly. The record lives on the denoiser as `_diffusers_ext_patch`; it is
also the patch's context for the method's lifecycle hooks (`Method.prepare / attach / detach`).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import PatchError, UnsupportedModelError
from .families import AttentionSite, describe_sites, family_of, find_denoiser
from .processor import InstalledGuard, check_denoiser, check_original
from .registry import get_method
from .steps import StepState, StepTracker

RECORD_ATTRIBUTE = "_diffusers_ext_patch"


@dataclass
class PatchRecord:
    """One patch: what it changed (enough to undo it exactly) and the method's per-patch context.

    method, family, options: the method, the family name, the resolved options.
    state: the step state the patch's processors read (set by the step tracker every forward).
    originals: site name -> the processor the patch replaced.
    resources: the method's per-patch shared objects (built in `Method.prepare`), e.g. the mediator
        count switch all processors of a patch read.
    denoiser / pipeline: the patched model and the pipeline it was patched through (None for a bare
        denoiser); held weakly, so a record never keeps a model alive.
    """

    method: str
    family: str
    options: dict[str, Any]
    state: StepState
    originals: dict[str, Any] = field(default_factory=dict)   # site name -> original processor
    resources: dict[str, Any] = field(default_factory=dict)
    tracker: StepTracker | None = None
    _denoiser: Any = field(default=None, repr=False)
    _pipeline: Any = field(default=None, repr=False)

    @property
    def sites(self) -> list[str]:
        return list(self.originals)

    @property
    def denoiser(self) -> torch.nn.Module | None:
        return self._denoiser() if self._denoiser is not None else None

    @property
    def pipeline(self):
        return self._pipeline() if self._pipeline is not None else None

    def processors(self) -> dict[str, Any]:
        """Site name -> the processor installed there now."""
        modules = dict(self.denoiser.named_modules())
        return {name: modules[name].processor for name in self.originals}


def patch(pipe_or_model, method: str, *, weights: str | None = None, **options) -> PatchRecord:
    """Replace the attention of a pipeline's denoiser (or a bare denoiser) with `method`.

    Options are the method's (see `diffusers_ext.methods()`); every method takes `steps`, the part
    of the denoising run where it acts (default: the method's recipe), as fractions `(0.0, 0.4)` or
    step indices `(0, 20)`. Raises an `OptionError` (a ValueError) for an unknown method or bad
    options, an `UnsupportedModelError` (a TypeError) for a model the method does not fit, and a
    `PatchError` (a ValueError) for a patch that would replace nothing; the model is then untouched.
    `weights`: a folder written by the fine-tune (`diffusers_ext.weights`); its saved options are the
    defaults, the caller's options override them.
    """
    config = None
    if weights is not None:
        from .weights import read_config, saved_options

        config = read_config(weights)
        if config["method"] != method:
            raise PatchError(f"weights in {weights} are for method {config['method']!r}, not {method!r}")
        options = {**get_method(method).saved_defaults, **saved_options(config), **options}
    spec = get_method(method)
    denoiser, pipeline = find_denoiser(pipe_or_model)
    family = family_of(denoiser)
    if family.name not in spec.families:
        raise UnsupportedModelError(
            f"method {method!r} does not support {type(denoiser).__name__} (family {family.name!r}); "
            f"it supports: {', '.join(spec.families)}"
        )
    resolved = spec.resolve_options(family.name, options, denoiser)
    schedules = {key: value for key, value in resolved.items() if key.endswith("steps")}
    if pipeline is None and any(s.by_index for s in schedules.values()):
        raise PatchError(
            "schedules given as step indices need the pipeline (its scheduler knows the steps); "
            "patch the pipeline, or give fractions of the run such as (0.0, 0.4)"
        )

    sites: list[AttentionSite] = spec.select_sites(family.find_sites(denoiser), resolved, family.name)
    if not sites:
        raise PatchError(
            f"method {method!r} with these options replaces no attention in this "
            f"{type(denoiser).__name__} ({family.description}; {describe_sites(family.find_sites(denoiser))}); "
            "a patch that changes nothing is refused"
        )

    # Build everything before touching the model; a second patch wraps the stock processors.
    previous: PatchRecord | None = getattr(denoiser, RECORD_ATTRIBUTE, None)
    originals = {
        site.name: previous.originals[site.name] if previous and site.name in previous.originals
        else site.module.processor
        for site in sites
    }
    check_denoiser(denoiser, method)
    for site in sites:  # a processor that is not a stock one is refused, never replaced silently
        check_original(originals[site.name], site.name, method)
    record = PatchRecord(
        method, family.name, resolved, StepState(schedules=schedules), originals=originals,
        _denoiser=weakref.ref(denoiser), _pipeline=weakref.ref(pipeline) if pipeline is not None else None,
    )
    spec.prepare(record)
    processors = {site.name: spec.make_processor(site, originals[site.name], record) for site in sites}

    unpatch(denoiser, missing_ok=True)
    param = next(denoiser.parameters(), None)
    for site in sites:
        processor = processors[site.name]
        if param is not None and isinstance(processor, torch.nn.Module):
            processor.to(device=param.device)
        site.module.set_processor(processor)
    record.state.guard = InstalledGuard(method, [(site.module, processors[site.name]) for site in sites])
    record.tracker = StepTracker(denoiser, record.state, pipeline)
    setattr(denoiser, RECORD_ATTRIBUTE, record)
    try:
        spec.attach(record)
        if config is not None:
            from .weights import load_weights

            load_weights(weights, denoiser, config)
    except Exception:
        unpatch(denoiser)
        raise
    return record


def unpatch(pipe_or_model, missing_ok: bool = False) -> None:
    """Restore the original processors and remove the step tracker: the model is as before `patch`.

    A site whose processor was replaced after the patch (`set_attn_processor`, `fuse_qkv_projections`:
    the forward refuses to run such a model) keeps its new processor: unpatch takes back only what the
    patch installed, never a later choice."""
    denoiser, _ = find_denoiser(pipe_or_model)
    record: PatchRecord | None = getattr(denoiser, RECORD_ATTRIBUTE, None)
    if record is None:
        if missing_ok:
            return
        raise PatchError(f"{type(denoiser).__name__} is not patched by diffusers_ext")
    from .weights import restore_inherited

    get_method(record.method).detach(record)
    restore_inherited(denoiser)  # pretrained tensors a weights folder overwrote (fine-tuned projections)
    modules = dict(denoiser.named_modules())
    installed = {id(module): processor for module, processor in record.state.guard.pairs}
    for name, original in record.originals.items():
        if modules[name].processor is installed.get(id(modules[name])):
            modules[name].set_processor(original)
    record.tracker.remove()
    delattr(denoiser, RECORD_ATTRIBUTE)


def patch_record(pipe_or_model) -> PatchRecord | None:
    """The active patch of a pipeline or denoiser, or None."""
    denoiser, _ = find_denoiser(pipe_or_model)
    return getattr(denoiser, RECORD_ATTRIBUTE, None)


@contextlib.contextmanager
def patched(pipe_or_model, method: str, **options):
    """Context manager: patched inside, restored exactly on exit (also on errors). A model that is
    already patched is refused (a `PatchError`): on exit it would lose the outer patch."""
    outer = patch_record(pipe_or_model)
    if outer is not None:
        raise PatchError(
            f"the model is already patched with {outer.method!r}; `patched` restores the stock model on exit, "
            "which would drop that patch: dx.unpatch it first, or call dx.patch to replace it")
    record = patch(pipe_or_model, method, **options)
    try:
        yield record
    finally:
        unpatch(pipe_or_model)


def methods() -> list[dict[str, Any]]:
    """Every registered method: name, families, training-free or not, description and options."""
    from .registry import all_methods

    return [spec.info() for spec in all_methods().values()]
