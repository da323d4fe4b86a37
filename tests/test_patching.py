"""The patch machinery: restore is bit-exact on every family, schedules, errors, step tracking."""

import pytest
import torch
from helpers import denoiser_inputs, run_denoiser

import diffusers_ext as dx
from diffusers_ext import registry
from diffusers_ext.families import family_of
from diffusers_ext.processor import PatchProcessor
from diffusers_ext.steps import Schedule

ALL_FAMILIES = ("sd", "sdxl", "sd3", "sd35", "dit", "animatediff")


class _Halve(PatchProcessor):
    """Test processor: the stock attention output, halved (so a patch visibly acts). Records steps."""

    calls: list = []

    @torch.compiler.disable
    def record(self):
        _Halve.calls.append((self.state.step_index, self.state.progress))

    def patched(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        self.record()
        out = self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return tuple(o * 0.5 if o is not None else None for o in out) if isinstance(out, tuple) else out * 0.5


class _HalveMethod(registry.Method):
    name = "test_halve"
    families = ("sd", "sdxl", "sd3", "dit", "animatediff")
    options = (registry.Option("steps", None, "when", registry.schedule("steps")),)

    def select_sites(self, sites, options, family):
        return [s for s in sites if s.role in ("self", "joint")]

    def make_processor(self, site, original, patch):
        return _Halve(original, site, patch.state)


@pytest.fixture
def halve_method():
    registry.register_method(_HalveMethod)
    _Halve.calls.clear()
    yield "test_halve"
    registry._METHODS.pop("test_halve")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_unpatch_restores_bit_exactly(family, pipeline_of, halve_method):
    pipe = pipeline_of(family)
    model, kwargs = denoiser_inputs(pipe)
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}
    state_keys = list(model.state_dict())
    before = run_denoiser(model, kwargs)

    record = dx.patch(pipe, halve_method)
    assert record.sites and record.family == family_of(model).name
    patched = run_denoiser(model, kwargs)
    assert not torch.equal(patched, before), "the patch did not act"

    dx.unpatch(pipe)
    after = run_denoiser(model, kwargs)
    assert torch.equal(after, before)
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")} == processors
    assert list(model.state_dict()) == state_keys
    assert not hasattr(model, "_diffusers_hook") and "forward" not in model.__dict__
    assert not model._forward_pre_hooks and not model._forward_pre_hooks_with_kwargs
    assert dx.patch_record(pipe) is None


def test_agent_unpatch_bit_exact_and_repatch_replaces(pipeline_of):
    pipe = pipeline_of("sd")
    model, kwargs = denoiser_inputs(pipe)
    before = run_denoiser(model, kwargs)
    first = dx.patch(pipe, "agent", agent_steps=(0.0, 1.0))
    out_first = run_denoiser(model, kwargs)
    second = dx.patch(pipe, "agent", agent_steps=(0.0, 1.0), merge_ratio=0.0)
    # the second patch wraps the stock processors, not the first patch's
    assert second.originals == first.originals
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in second.originals.values())
    out_second = run_denoiser(model, kwargs)
    assert not torch.equal(out_first, out_second)
    dx.unpatch(pipe)
    assert torch.equal(run_denoiser(model, kwargs), before)


def test_unpatch_keeps_a_processor_set_after_the_patch(pipeline_of):
    """unpatch takes back only what the patch installed: a site given another processor after the
    patch keeps it, every other site gets its original object back."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = pipeline_of("sd")
    record = dx.patch(pipe, "todo")
    modules = dict(pipe.unet.named_modules())
    chosen, *others = record.sites
    later = AttnProcessor()
    modules[chosen].set_processor(later)
    originals = dict(record.originals)
    dx.unpatch(pipe)
    assert modules[chosen].processor is later
    assert all(modules[name].processor is originals[name] for name in others) and others


def test_patched_context_restores_on_error(pipeline_of):
    pipe = pipeline_of("sd")
    model, kwargs = denoiser_inputs(pipe)
    before = run_denoiser(model, kwargs)
    with pytest.raises(RuntimeError, match="boom"):
        with dx.patched(pipe, "agent"):
            raise RuntimeError("boom")
    assert dx.patch_record(pipe) is None
    assert torch.equal(run_denoiser(model, kwargs), before)


def test_errors_are_clear_and_leave_model_untouched(pipeline_of):
    sd, sdxl, dit = pipeline_of("sd"), pipeline_of("sdxl"), pipeline_of("dit")
    with pytest.raises(ValueError, match="unknown method 'nope'.*agent"):
        dx.patch(sd, "nope")
    with pytest.raises(TypeError, match="DiTTransformer2DModel.*supports: sd, sdxl"):
        dx.patch(dit, "agent")
    with pytest.raises(ValueError, match="no option.*ratio_typo"):
        dx.patch(sd, "agent", ratio_typo=0.5)
    with pytest.raises(ValueError, match="k_scale2"):
        dx.patch(sd, "agent", k_scale2=-0.1)
    with pytest.raises(ValueError, match="agent_source"):
        dx.patch(sd, "agent", agent_source="random")
    with pytest.raises(ValueError, match="steps"):
        dx.patch(sd, "agent", steps=(0.5, 0.2))
    with pytest.raises(ValueError, match=r"method 'agent' with these options replaces no attention in this "
                       r"UNet2DConditionModel \(.*downsampling 2.*; a patch that changes nothing is refused$"):
        dx.patch(sdxl, "agent", max_downsample=1)   # SDXL has no attention at its first level
    with pytest.raises(ValueError, match="step indices need the pipeline"):
        dx.patch(sd.unet, "agent", steps=(0, 10))
    with pytest.raises(TypeError, match="not a supported denoiser"):
        dx.patch(torch.nn.Linear(2, 2), "agent")
    with pytest.raises(ValueError, match="^UNet2DConditionModel is not patched by diffusers_ext$"):
        dx.unpatch(sd)
    for pipe in (sd, sdxl, dit):
        assert dx.patch_record(pipe) is None
        assert all(type(m.processor).__name__ != "AgentAttnProcessor"
                   for m in pipe.components["unet" if hasattr(pipe, "unet") else "transformer"].modules()
                   if hasattr(m, "processor"))


def test_methods_lists_registry():
    infos = {m["name"]: m for m in dx.methods()}
    agent = infos["agent"]
    assert agent["training_free"] and "sdxl" in agent["families"]
    assert {"steps", "agent_steps", "k_scale2", "k_shortcut", "merge_ratio", "agent_source"} <= set(agent["options"])


# --- schedules and the step tracker ----------------------------------------------------------------

def test_schedule_parse_and_contains():
    assert Schedule.parse(None).always and Schedule.parse("all").always
    s = Schedule.parse((0.0, 0.4))
    assert s.contains(None, 0.0) and s.contains(None, 0.39) and not s.contains(None, 0.4)
    assert Schedule.parse((0.5, 1.0)).contains(None, 1.0)
    i = Schedule.parse((2, 4))
    assert i.by_index and i.contains(2, 0.0) and not i.contains(4, 0.0)
    for bad in [(0.4, 0.4), (-0.1, 0.5), (0.2, 1.5), (3, 1), "early", (0.1,), (True, 1)]:
        with pytest.raises(ValueError):
            Schedule.parse(bad)


@pytest.mark.parametrize("steps, expected", [((0.0, 0.5), [0, 1]), ((1, 3), [1, 2]), ((0.5, 1.0), [2, 3])])
def test_schedule_acts_on_the_right_steps(steps, expected, pipeline_of, halve_method):
    pipe = pipeline_of("sd")
    with dx.patched(pipe, halve_method, steps=steps) as record:
        pipe("x", num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
             output_type="latent")
    acted = sorted({index for index, _ in _Halve.calls})
    assert acted == expected
    # CFG: one batched call per step, all of this patch's sites act in it
    assert len(_Halve.calls) == len(expected) * len(record.sites)


def test_schedule_with_another_scheduler_and_swapped_scheduler(pipeline_of, halve_method):
    from diffusers import EulerDiscreteScheduler

    pipe = pipeline_of("sd")
    original = pipe.scheduler
    with dx.patched(pipe, halve_method, steps=(0.0, 0.5)):
        pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)  # swapped after patching
        try:
            pipe("x", num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="latent")
        finally:
            pipe.scheduler = original
    assert sorted({i for i, _ in _Halve.calls}) == [0, 1, 2]


def test_bare_denoiser_places_timestep_in_training_range(pipeline_of, halve_method):
    pipe = pipeline_of("dit")
    model, kwargs = denoiser_inputs(pipe, timestep=999.0)
    with dx.patched(model, halve_method, steps=(0.0, 0.5)):
        run_denoiser(model, kwargs)                          # t = 999: start of a run -> acts
        assert _Halve.calls and _Halve.calls[-1] == (None, 0.0)
        n = len(_Halve.calls)
        run_denoiser(model, {**kwargs, "timestep": torch.full((2,), 100.0)})   # late -> stock
        assert len(_Halve.calls) == n
        assert dx.patch_record(model).state.progress == pytest.approx(0.899)


def test_sd3_flow_matching_steps(pipeline_of, halve_method):
    pipe = pipeline_of("sd3")
    with dx.patched(pipe, halve_method, steps=(0.0, 0.34)):
        pipe("x", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent",
             height=32, width=32)
    assert sorted({i for i, _ in _Halve.calls}) == [0, 1]


def test_grid_inference_from_latent():
    from diffusers_ext.steps import StepState

    state = StepState()
    state.latent_hw = (12, 7)          # odd latent: UNet levels round up
    assert state.grid(84) == (12, 7)
    assert state.grid(24) == (6, 4)
    assert state.grid(6) == (3, 2)
    assert state.grid(50) is None


def test_torch_compile_does_not_recompile_every_step(pipeline_of, halve_method):
    """Steps change only the schedule's bool: after both values were seen, new steps add no graphs."""
    from torch._dynamo.utils import counters

    pipe = pipeline_of("dit")
    model, kwargs = denoiser_inputs(pipe)
    timesteps = torch.linspace(999, 0, 16)
    torch._dynamo.reset()
    counters.clear()
    try:
        with dx.patched(pipe, halve_method, steps=(0.0, 0.5)):
            compiled = torch.compile(model, backend="eager")
            with torch.no_grad():
                for t in timesteps[0::2]:       # a run of 8 steps, acting in its first half
                    compiled(**{**kwargs, "timestep": torch.full((2,), float(t))})
                graphs = counters["stats"]["unique_graphs"]
                for t in timesteps[1::2]:       # 8 new timesteps
                    compiled(**{**kwargs, "timestep": torch.full((2,), float(t))})
        assert counters["stats"]["unique_graphs"] == graphs, "new steps compiled new graphs"
    finally:
        torch._dynamo.reset()
    assert len({i for i in _Halve.calls}) == 8   # it acted in the first half of each run
