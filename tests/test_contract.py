"""The contract of every registered method, on every tiny pipeline of every family it declares.

For each cell (method x tiny pipeline): the patch goes through the pipeline with the method's
defaults, one denoiser forward runs and is finite, the patch acts, `unpatch` restores the stock
output bit-exactly with the original processor objects; a trainable method's new parameters
round-trip through a weights folder bit-exactly; the compiled denoiser does not recompile across
the steps of a run. A method registered with `register_method` is picked up here without edits.
"""

import copy

import pytest
import torch
from helpers import denoiser_inputs, run_denoiser

import diffusers_ext as dx
from diffusers_ext import registry
from diffusers_ext.families import families, find_denoiser
from diffusers_ext.testing import TINY_FAMILIES
from diffusers_ext.weights import save_weights

# Options replacing a method's defaults in every cell, for a default that selects or does nothing on
# the tiny models (32 x 32 latents at most). None is needed: every built-in method patches and
# changes the output at its defaults (agent's `min_tokens=4096` still patches the finest level).
OVERRIDES: dict[str, dict] = {}

# Methods whose patch is exactly the stock model at initialisation (all new branches zero-initialised):
# for them "acts" means that perturbing the new parameters changes the output. None of the built-in
# ones: the zero-initialised convs / embeddings of T^5, LINA, VCA and mediators sit beside an
# attention that already differs from softmax attention.
IDENTITY_AT_INIT: frozenset[str] = frozenset()

COMPILE_STEPS = 6   # steps of the scheduled run the compiled denoiser is called at
# Tracing a tiny UNet costs 10-30 s of CPU per cell (agent's graph breaks the most; measured on 2
# cores), a tiny transformer 2-10 s: the UNet families' compile cells run with `-m slow` only.
# (agent on SD has its own fast compile test in tests/test_agent.py.)
SLOW_COMPILE_FAMILIES = ("sd", "sdxl", "animatediff")


def _cells(compile_cells: bool = False) -> list:
    """(method, tiny pipeline) for every family a method declares: each tiny pipeline of the family,
    or for the compile cells its first one (slow for UNet families)."""
    cells = []
    for name, spec in registry.all_methods().items():
        for family in spec.families:
            tinies = [tiny for tiny, of in TINY_FAMILIES.items() if of == family]
            for tiny in tinies[:1] if compile_cells else tinies:
                marks = pytest.mark.slow if compile_cells and family in SLOW_COMPILE_FAMILIES else ()
                cells.append(pytest.param(name, tiny, id=f"{name}-{tiny}", marks=marks))
    return cells


def _inputs(pipe):
    """One sample: the contract does not depend on the batch, and it halves the forwards' cost."""
    return denoiser_inputs(pipe, batch=1)


def _processors(model) -> dict:
    return {name: module.processor for name, module in model.named_modules() if hasattr(module, "set_processor")}


def _perturb(parameters, seed: int = 0) -> None:
    """Add N(0, 0.05^2) noise to every parameter, from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device))


def check_patch_acts_and_unpatch(pipe, method: str, options: dict, kwargs_of=_inputs) -> None:
    """Patch `pipe` with `method`: a finite forward that differs from stock (or, for IDENTITY_AT_INIT,
    equals it and changes once the new parameters move); `unpatch` is bit-exact and restores the
    very processor objects. Shared with tests/test_docs.py."""
    model, kwargs = kwargs_of(pipe)
    processors = _processors(model)
    state_keys = list(model.state_dict())
    stock = run_denoiser(model, kwargs)

    record = dx.patch(pipe, method, **options)
    try:
        assert record.sites, "the patch replaced no site"
        installed = record.processors()
        assert all(installed[name] is not processors[name] for name in record.sites)
        out = run_denoiser(model, kwargs)
        assert out.shape == stock.shape and out.dtype == stock.dtype
        assert torch.isfinite(out).all(), "the patched forward is not finite"
        if method in IDENTITY_AT_INIT:
            assert torch.equal(out, stock), f"{method} is listed as an exact identity at init but is not"
            _perturb(registry.get_method(method).trainable_parameters(record)["new"])
            assert not torch.equal(run_denoiser(model, kwargs), stock), "perturbing the new parameters changed nothing"
        else:
            assert not torch.equal(out, stock), (
                f"patching with {method} did not change the output (a method that starts as an exact "
                "identity belongs in IDENTITY_AT_INIT; one that needs other options on tiny models, in OVERRIDES)"
            )
    finally:
        dx.unpatch(pipe)

    assert torch.equal(run_denoiser(model, kwargs), stock), "unpatch did not restore the stock output bit-exactly"
    after = _processors(model)
    assert after.keys() == processors.keys() and all(after[n] is processors[n] for n in processors), (
        "unpatch did not put back the original processor objects")
    assert list(model.state_dict()) == state_keys
    assert dx.patch_record(pipe) is None


def test_every_declared_family_has_a_tiny_pipeline():
    """Otherwise a method's family would go untested here."""
    known = set(families())
    for name, spec in registry.all_methods().items():
        assert spec.families, f"method {name!r} declares no family"
        unknown = set(spec.families) - known
        assert not unknown, f"method {name!r} declares unknown families {sorted(unknown)}; families: {sorted(known)}"
        untested = set(spec.families) - set(TINY_FAMILIES.values())
        assert not untested, f"method {name!r}: no tiny pipeline of families {sorted(untested)} (diffusers_ext.testing)"


@pytest.mark.parametrize("method, tiny", _cells())
def test_patch_forward_acts_and_unpatch_bit_exact(method, tiny, pipeline_of):
    check_patch_acts_and_unpatch(pipeline_of(tiny), method, OVERRIDES.get(method, {}))


@pytest.mark.parametrize("method, tiny", _cells())
def test_trained_weights_round_trip(method, tiny, pipeline_of, tmp_path):
    """Perturbed new parameters -> save_weights -> a fresh copy patched with `weights=` is bit-identical."""
    spec = registry.get_method(method)
    pipe = pipeline_of(tiny)
    model, kwargs = _inputs(pipe)
    record = dx.patch(pipe, method, **OVERRIDES.get(method, {}))
    try:
        new = spec.trainable_parameters(record)["new"]
        if spec.training_free and not new:
            pytest.skip(f"{method} is training-free and adds no parameters")
        assert new, f"{method} is not training-free but adds no parameters to train"
        initial = run_denoiser(model, kwargs)
        _perturb(new)
        tuned = run_denoiser(model, kwargs)
        assert not torch.equal(tuned, initial), "perturbing the new parameters changed nothing"
        names = {id(p): name for name, p in model.named_parameters()}
        assert all(id(p) in names for p in new), "a new parameter is not in the denoiser's state dict"
        save_weights(tmp_path, model, record, {names[id(p)]: p for p in new})
    finally:
        dx.unpatch(pipe)

    fresh = copy.deepcopy(pipe)        # stock again (bit-exact unpatch), with other processor objects
    fresh_model, _ = find_denoiser(fresh)
    dx.patch(fresh, method, weights=str(tmp_path))
    assert torch.equal(run_denoiser(fresh_model, kwargs), tuned), "the reloaded patch differs from the saved one"


@pytest.mark.parametrize("method, tiny", _cells())
def test_inherited_group_is_every_linear_layer_of_the_patched_sites(method, tiny, pipeline_of):
    """A method that `inherits_projections` offers a fine-tune exactly the linear layers of each patched
    attention module (not its processor's); the others offer nothing inherited. Never a new parameter."""
    spec = registry.get_method(method)
    pipe = pipeline_of(tiny)
    record = dx.patch(pipe, method, **OVERRIDES.get(method, {}))
    try:
        groups = spec.trainable_parameters(record)
        modules = dict(record.denoiser.named_modules())
        linear = {id(p) for site in record.sites for name, module in modules[site].named_modules()
                  if isinstance(module, torch.nn.Linear) and not name.startswith("processor")
                  for p in module.parameters()}
        inherited = [id(p) for p in groups["inherited"]]
        assert len(inherited) == len(set(inherited)), "a parameter is offered twice"
        assert set(inherited) == (linear if spec.inherits_projections else set())
        assert not set(inherited) & {id(p) for p in groups["new"]}
    finally:
        dx.unpatch(pipe)


@pytest.mark.parametrize("method, tiny", _cells(compile_cells=True))
def test_compiled_denoiser_does_not_recompile_across_steps(method, tiny, pipeline_of):
    """The compiled patched denoiser at every step of a run located through `pipe.scheduler`: once a
    phase of the schedules (which of them are active) has been seen for two steps, its later steps
    add no graphs (processors read per-step bools, never the raw step)."""
    from torch._dynamo.utils import counters

    pipe = pipeline_of(tiny)
    model, kwargs = _inputs(pipe)
    original = pipe.scheduler
    scheduler = type(original).from_config(original.config)
    scheduler.set_timesteps(COMPILE_STEPS)
    torch._dynamo.reset()
    counters.clear()
    pipe.scheduler = scheduler          # the cached pipeline's own scheduler keeps its state
    try:
        record = dx.patch(pipe, method, **OVERRIDES.get(method, {}))
        compiled = torch.compile(model, backend="eager")
        seen: dict[tuple, int] = {}     # phase -> steps run in it
        with torch.no_grad():
            for index, t in enumerate(scheduler.timesteps):
                graphs = counters["stats"]["unique_graphs"]
                out = compiled(**{**kwargs, "timestep": torch.full_like(kwargs["timestep"], float(t))},
                               return_dict=False)[0]
                assert record.state.step_index == index, "the step was not located in pipe.scheduler"
                assert torch.isfinite(out).all()
                phase = tuple(sorted(record.state.active.items()))
                seen[phase] = seen.get(phase, 0) + 1
                if seen[phase] > 2:
                    assert counters["stats"]["unique_graphs"] == graphs, (
                        f"step {index} of phase {phase} compiled new graphs: the processors depend on the step")
        assert max(seen.values()) > 2, "no phase lasted long enough to test"
    finally:
        dx.unpatch(pipe, missing_ok=True)
        pipe.scheduler = original
        torch._dynamo.reset()
