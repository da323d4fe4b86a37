"""The composition matrix (diffusers_ext/compat.py): one test per (feature, method, tiny pipeline),
each on fresh tiny offline pipelines, and the processor protocol beneath it.

A "composes" cell checks against the feature-only pipeline (its own output, never numbers copied
from ours): the patch acts (finite, different), `unpatch` restores the feature-only output bit-exactly
and, where the feature can be removed, removing it leaves the patch's output. A "limitation" cell
checks the error names the processor / the patch and that the model is bit-exact as before.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
from helpers import denoiser_inputs, run_denoiser

import diffusers_ext as dx
from diffusers_ext import compat
from diffusers_ext.errors import PatchError
from diffusers_ext.families import family_of, find_denoiser
from diffusers_ext.testing import tiny_pipeline

SIZE = {"sd": 32, "sdxl": 32}   # pixels (latent 16 x 16): UNet cells stay fast


def gen(pipe, steps: int = 1, **call) -> torch.Tensor:
    """The pipeline's latents for one fixed seed (no guidance: half the work)."""
    family = family_of(pipe)
    torch.manual_seed(0)   # some pipelines draw from the global generator (SD3 ControlNet's VAE sample)
    args = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent")
    if family.conditioning == "class":
        args.update(class_labels=[1], guidance_scale=1.0, output_type="np")
    else:
        args.update(prompt="a", guidance_scale=1.0)
    if family.name in SIZE:
        args.update(height=SIZE[family.name], width=SIZE[family.name])
    args.update(call)
    with torch.no_grad():
        out = pipe(**args)
    images = out[0] if isinstance(out, tuple) else out.images
    return images if torch.is_tensor(images) else torch.from_numpy(images)   # DiT: numpy images


def composes(pipe, method: str, run=gen) -> torch.Tensor:
    """The patch acts on `pipe` (with whatever it has stacked) and unpatches to it exactly; returns
    the patched output."""
    alone = run(pipe)
    with dx.patched(pipe, method):
        both = run(pipe)
    assert torch.isfinite(both).all(), f"{method}: non-finite output"
    assert not torch.equal(both, alone), f"{method}: the patch does not act"
    assert torch.equal(run(pipe), alone), f"{method}: unpatch does not give back the model it patched"
    return both


def snapshot(model) -> tuple:
    """What a refused call must leave exactly as it was: processors (objects), tensors, hooks, forward."""
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = (dict(model._forward_pre_hooks), hasattr(model, "_diffusers_hook"))
    return processors, tensors, hooks, "forward" in model.__dict__


def assert_same(model, before: tuple) -> None:
    processors, tensors, had_hook, had_forward = snapshot(model)
    assert all(processors[n] is p for n, p in before[0].items()) and processors.keys() == before[0].keys()
    assert tensors.keys() == before[1].keys() and all(torch.equal(tensors[k], v) for k, v in before[1].items())
    assert (had_hook, had_forward) == before[2:] and dx.patch_record(model) is None


def perturb(module: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


# --- the processor protocol ----------------------------------------------------------------------------

class GainProcessor(AttnProcessor2_0):
    """A user's processor with an argument of its own: stock attention times `gain`; records the gains."""

    def __init__(self):
        self.gains = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
        self.gains.append(gain)
        return gain * super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class JointGainProcessor(JointAttnProcessor2_0):
    def __init__(self):
        self.gains = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, gain=1.0):
        self.gains.append(gain)
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)
        return tuple(gain * o for o in out) if isinstance(out, tuple) else gain * out


def _install(denoiser, make) -> dict:
    """`make()` at every site of the denoiser's family; returns them by site name."""
    installed = {site.name: make() for site in family_of(denoiser).find_sites(denoiser)}
    for name, module in denoiser.named_modules():
        if name in installed:
            module.set_processor(installed[name])
    return installed


def _gain_kwargs(pipe):
    denoiser, kwargs = denoiser_inputs(pipe, batch=1)
    key = "joint_attention_kwargs" if family_of(denoiser).name == "sd3" else "cross_attention_kwargs"
    return denoiser, kwargs, key


def check_custom_declared(method, tiny):
    """A declared user's processor receives its own `cross_attention_kwargs` entry through the patch
    (before this fix diffusers dropped it: the wrapper's `__call__` named no parameters), and the call
    equals the unpatched model's with that entry."""
    pipe = tiny_pipeline(tiny)
    denoiser, kwargs, key = _gain_kwargs(pipe)
    cls = JointGainProcessor if tiny == "sd3" else GainProcessor
    dx.compose_with(cls)
    installed = _install(denoiser, cls)
    expected = run_denoiser(denoiser, {**kwargs, key: {"gain": 2.0}})
    plain = run_denoiser(denoiser, kwargs)
    assert not torch.equal(expected, plain)   # the gain acts at all
    record = dx.patch(pipe, method)
    try:
        processor = record.processors()[record.sites[0]]
        assert "gain" in inspect.signature(processor.__call__).parameters
        for p in installed.values():
            p.gains.clear()
        out = run_denoiser(denoiser, {**kwargs, key: {"gain": 2.0}})
        reached = [installed[name].gains for name in record.sites]
        assert all(g == [2.0] for g in reached), f"the entry did not reach the wrapped processors: {reached}"
        assert torch.equal(out, expected)
        assert not torch.equal(run_denoiser(denoiser, kwargs), plain)   # without the entry the method acts
    finally:
        dx.unpatch(pipe)
    assert torch.equal(run_denoiser(denoiser, kwargs), plain)


def check_custom_undeclared(method, tiny):
    pipe = tiny_pipeline(tiny)
    denoiser, kwargs = denoiser_inputs(pipe, batch=1)

    class OtherPluginProcessor(JointAttnProcessor2_0 if tiny == "sd3" else AttnProcessor2_0):
        pass

    _install(denoiser, OtherPluginProcessor)
    before, out = snapshot(denoiser), run_denoiser(denoiser, kwargs)
    with pytest.raises(PatchError, match=rf"^method {method!r} would replace the processor .*OtherPluginProcessor at "
                       r"\S+\.attn1?, which is not a stock.*compose_with"):
        dx.patch(pipe, method)
    assert_same(denoiser, before)
    assert torch.equal(run_denoiser(denoiser, kwargs), out)


def test_wrapper_advertises_the_original_signature(pipeline_of):
    pipe = pipeline_of("sd")
    with dx.patched(pipe, "todo") as record:
        processor = record.processors()[record.sites[0]]
        assert inspect.signature(processor.__call__) == inspect.signature(AttnProcessor2_0().__call__)
        assert type(processor).__call__ is torch.nn.Module.__call__   # what Python and torch.compile call


# --- the features -------------------------------------------------------------------------------------

def _lora_folder(pipe, tmp_path):
    """A LoRA with random weights on the denoiser's attention projections, saved the diffusers way."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    denoiser, _ = find_denoiser(pipe)
    attr = "unet" if hasattr(pipe, "unet") else "transformer"
    donor = copy.deepcopy(denoiser)
    torch.manual_seed(3)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    type(pipe).save_lora_weights(str(tmp_path), **{f"{attr}_lora_layers": get_peft_model_state_dict(donor)})
    return str(tmp_path)


def check_lora(method, tiny, tmp_path):
    pipe = tiny_pipeline(tiny)
    folder = _lora_folder(pipe, tmp_path)
    stock = gen(pipe)
    dx.patch(pipe, method)
    patched = gen(pipe)
    pipe.load_lora_weights(folder, adapter_name="a")           # after the patch
    after = gen(pipe)
    assert not torch.equal(after, patched), "the LoRA does not act through the patch"
    pipe.unload_lora_weights()
    assert torch.equal(gen(pipe), patched), "unloading the LoRA does not leave the patch intact"
    dx.unpatch(pipe)
    assert torch.equal(gen(pipe), stock)

    pipe.load_lora_weights(folder, adapter_name="a")           # before the patch
    both = composes(pipe, method)
    assert torch.equal(both, after), "LoRA then patch differs from patch then LoRA"
    with dx.patched(pipe, method):
        pipe.set_adapters(["a"], [0.5])
        half = gen(pipe)
        assert not torch.equal(half, both) and torch.isfinite(half).all()
        pipe.set_adapters(["a"], [1.0])
        pipe.fuse_lora()
        torch.testing.assert_close(gen(pipe), both, rtol=1e-4, atol=1e-4)   # fused = same weights, reordered sums
        pipe.unfuse_lora()
        torch.testing.assert_close(gen(pipe), both, rtol=1e-4, atol=1e-4)


def _controlnet_pipe(tiny):
    import diffusers

    pipe = tiny_pipeline(tiny)
    if tiny == "sd3":
        net = diffusers.SD3ControlNetModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                           attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                           caption_projection_dim=32, pooled_projection_dim=64, out_channels=4)
        cls, side = diffusers.StableDiffusion3ControlNetPipeline, 64
    else:
        net = diffusers.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
        cls = {"sd": diffusers.StableDiffusionControlNetPipeline,
               "sdxl": diffusers.StableDiffusionXLControlNetPipeline}[tiny]
        side = SIZE[tiny]
    perturb(net)   # its zero-initialised outputs would add nothing
    components = {k: v for k, v in pipe.components.items() if k in inspect.signature(cls).parameters}
    control = cls(**components, controlnet=net.eval())
    control.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(2))
    return control, dict(image=image) if tiny != "sd3" else dict(control_image=image)


def check_controlnet(method, tiny):
    pipe, call = _controlnet_pipe(tiny)
    assert not torch.equal(gen(pipe, **call), gen(tiny_pipeline(tiny)))   # the ControlNet acts
    composes(pipe, method, lambda p: gen(p, **call))


def _ip_adapter(pipe, embed_dim: int = 16) -> dict:
    """An IP-Adapter state dict with random weights (image projection + one k/v pair per cross-attention)."""
    unet, cross = pipe.unet, pipe.unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(4)
    rand = lambda *shape: 0.1 * torch.randn(*shape, generator=generator)  # noqa: E731
    proj = {"proj.weight": rand(4 * cross, embed_dim), "proj.bias": rand(4 * cross),
            "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    layers, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            width = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
            layers[f"{key}.to_k_ip.weight"], layers[f"{key}.to_v_ip.weight"] = rand(width, cross), rand(width, cross)
            key += 2
    return {"image_proj": proj, "ip_adapter": layers}


def _ip_call():
    return dict(ip_adapter_image_embeds=[torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(5))])


def check_ip_adapter(method, tiny):
    pipe = tiny_pipeline(tiny)
    pipe.load_ip_adapter(_ip_adapter(pipe), subfolder="", weight_name="random.bin", image_encoder_folder=None)
    call = _ip_call()
    assert not torch.equal(gen(pipe, **call), gen(pipe, ip_adapter_image_embeds=[torch.zeros(1, 1, 16)]))
    both = composes(pipe, method, lambda p: gen(p, **call))
    with dx.patched(pipe, method):
        pipe.set_ip_adapter_scale(0.3)
        assert not torch.equal(gen(pipe, **call), both), "the IP-Adapter scale does not act through the patch"


def check_ip_adapter_after(method, tiny):
    pipe = tiny_pipeline(tiny)
    dx.patch(pipe, method)
    before = snapshot(pipe.unet)
    patched = gen(pipe)
    with pytest.raises(PatchError, match="load_ip_adapter"):
        pipe.load_ip_adapter(_ip_adapter(pipe), subfolder="", weight_name="random.bin", image_encoder_folder=None)
    processors, tensors, *_ = before
    now = snapshot(pipe.unet)
    assert all(now[0][n] is p for n, p in processors.items()) and now[1].keys() == tensors.keys()
    assert torch.equal(gen(pipe), patched)
    dx.unpatch(pipe)


def check_t2i_adapter(method, tiny):
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    base = tiny_pipeline(tiny)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=2,
                         adapter_type="full_adapter")
    perturb(adapter)
    components = {k: v for k, v in base.components.items()
                  if k in inspect.signature(StableDiffusionAdapterPipeline).parameters}
    pipe = StableDiffusionAdapterPipeline(**components, adapter=adapter.eval(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    composes(pipe, method, lambda p: gen(p, image=image))


def _variant(tiny, kind):
    import diffusers

    names = {("sd", "img2img"): "StableDiffusionImg2ImgPipeline", ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
             ("sd3", "img2img"): "StableDiffusion3Img2ImgPipeline", ("sd", "inpaint"): "StableDiffusionInpaintPipeline",
             ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline"}
    cls = getattr(diffusers, names[tiny, kind])
    base = tiny_pipeline(tiny)
    pipe = cls(**{k: v for k, v in base.components.items() if k in inspect.signature(cls).parameters})
    pipe.set_progress_bar_config(disable=True)
    side = SIZE.get(tiny, 64)
    call = dict(image=torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(2)), strength=0.9,
                steps=2)
    if kind == "inpaint":
        mask = torch.zeros(1, 1, side, side)
        mask[..., side // 4: 3 * side // 4, :] = 1.0
        call["mask_image"] = mask
    return pipe, call


def check_img2img(method, tiny):
    pipe, call = _variant(tiny, "img2img")
    composes(pipe, method, lambda p: gen(p, **call))


def check_inpaint(method, tiny):
    pipe, call = _variant(tiny, "inpaint")
    composes(pipe, method, lambda p: gen(p, **call))


def check_fuse_qkv(method, tiny):
    pipe = tiny_pipeline(tiny)
    denoiser, _ = find_denoiser(pipe)
    with dx.patched(pipe, method):
        unfused = gen(pipe)
    denoiser.fuse_qkv_projections()
    assert "Fused" in type(next(iter(denoiser.attn_processors.values()))).__name__
    fused = composes(pipe, method)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)   # the patch reads to_q/k/v, as before


def check_fuse_qkv_after(method, tiny):
    pipe = tiny_pipeline(tiny)
    denoiser, _ = find_denoiser(pipe)
    stock = gen(pipe)
    dx.patch(pipe, method)
    patched = gen(pipe)
    denoiser.fuse_qkv_projections()
    with pytest.raises(PatchError, match=f"'{method}' processors.*replaced by Fused"):
        gen(pipe)
    denoiser.unfuse_qkv_projections()
    assert torch.equal(gen(pipe), patched)
    dx.unpatch(pipe)
    assert torch.equal(gen(pipe), stock)


def check_attention_slicing(method, tiny):
    pipe = tiny_pipeline(tiny)
    pipe.enable_attention_slicing(1)
    assert "Sliced" in type(next(iter(pipe.unet.attn_processors.values()))).__name__
    composes(pipe, method)


def check_attention_slicing_after(method, tiny):
    pipe = tiny_pipeline(tiny)
    stock = gen(pipe)
    dx.patch(pipe, method)
    pipe.enable_attention_slicing(1)
    with pytest.raises(PatchError, match=f"'{method}' processors.*replaced by Sliced"):
        gen(pipe)
    dx.unpatch(pipe)      # takes back only what the patch installed: the slicing chosen after it stays
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"SlicedAttnProcessor"}
    torch.testing.assert_close(gen(pipe), stock, rtol=1e-4, atol=1e-4)


def check_vae_tiling(method, tiny):
    pipe = tiny_pipeline(tiny)
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 16, 8   # tile the 32 px image
    composes(pipe, method, lambda p: gen(p, output_type="pt"))


# Graph breaks a method has on purpose, besides the step tracker's hook (docs/compatibility.md):
# agent's ToMe matching has a data-dependent shape (`nonzero`) and its seeded generator is not traced;
# mediator's per-step count (a `bisect` over its schedule, data-pointer checks) breaks when the phase changes.
KNOWN_BREAKS = {"agent": ("aten.nonzero", "AgentAttnProcessor._generator", "as_proxy"),
                "mediator": ("_bisect.bisect_right", "Data pointer comparison")}


def check_compile(method, tiny):
    from torch._dynamo.utils import counters

    pipe = tiny_pipeline(tiny)
    denoiser, kwargs = denoiser_inputs(pipe, batch=1)
    with dx.patched(pipe, method):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(denoiser, backend="eager")
        eager = run_denoiser(denoiser, kwargs)
        torch.testing.assert_close(run_denoiser(compiled, kwargs), eager, rtol=1e-4, atol=1e-4)
        at = lambda t: run_denoiser(compiled, {**kwargs, "timestep": torch.full_like(kwargs["timestep"], t)})  # noqa: E731
        for t in (700.0, 300.0):   # the other phases of a step-dependent method compile once each
            at(t)
        graphs = counters["stats"]["unique_graphs"]
        for t in (990.0, 690.0, 290.0):
            at(t)
        assert counters["stats"]["unique_graphs"] == graphs, "new timesteps in the same phases compiled new graphs"
        allowed = ("StepTracker.pre_forward", *KNOWN_BREAKS.get(method, ()))
        breaks = [reason for reason in counters["graph_break"] if not any(a in reason for a in allowed)]
        assert not breaks, f"graph breaks besides the step tracker: {breaks}"
    torch._dynamo.reset()


def check_bf16(method, tiny):
    pipe = tiny_pipeline(tiny, dtype=torch.bfloat16)
    denoiser, kwargs = denoiser_inputs(pipe, batch=1)
    key = family_of(denoiser).input_key
    kwargs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    kwargs[key] = 30 * kwargs[key]
    if "encoder_hidden_states" in kwargs:
        kwargs["encoder_hidden_states"] = 30 * kwargs["encoder_hidden_states"]
    composes(pipe, method, lambda p: run_denoiser(denoiser, kwargs))
    with dx.patched(pipe, method):
        assert run_denoiser(denoiser, kwargs).dtype == torch.bfloat16


def check_torchao(method, tiny):
    """torchao int8 weight-only quantisation of the denoiser (its CPU path) before the patch: the patch
    reads the quantised projections (every Linear's weight an `Int8Tensor`), acts, unpatches to the
    quantised model, and stays near the patch on the fp32 weights."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    pipe = tiny_pipeline(tiny)
    denoiser, _ = find_denoiser(pipe)
    with dx.patched(pipe, method):
        full = gen(pipe)
    quantize_(denoiser, Int8WeightOnlyConfig())
    linears = [m for m in denoiser.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all("Int8" in type(m.weight).__name__ for m in linears)
    quantised = composes(pipe, method)
    assert float((quantised - full).norm() / full.norm()) < 0.05, "int8 weights moved the patched output"


def check_autocast(method, tiny):
    """CPU bf16 autocast over fp32 weights, after an fp32 call (what a processor caches from that call,
    e.g. frozen constants, must follow the compute dtype): finite, bf16 out, within 5 % of the fp32
    patched output, and the patch acts under autocast."""
    pipe = tiny_pipeline(tiny)
    denoiser, kwargs = denoiser_inputs(pipe, batch=1)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run_denoiser(denoiser, kwargs)

    stock = run()
    with dx.patched(pipe, method):
        full = run_denoiser(denoiser, kwargs)
        half = run()
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert not torch.equal(half, stock), f"{method}: the patch does not act under autocast"
    assert float((half.float() - full).norm() / full.norm()) < 0.05, f"{method}: autocast moved the output"


def check_deepcache(method, tiny):
    """DeepCache enabled before or after the patch, disabled before or after `dx.unpatch`: both act
    together, and removing either leaves exactly the other (its `disable()` puts back the `forward` it
    saved; the patch's step tracker is a forward pre-hook, which that cannot drop)."""
    from DeepCache import DeepCacheSDHelper

    pipe = tiny_pipeline(tiny)
    steps = lambda p: gen(p, steps=3)  # noqa: E731
    stock = steps(pipe)
    with dx.patched(pipe, method):
        patched = steps(pipe)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=0)
    helper.enable()
    cached = steps(pipe)
    assert not torch.equal(cached, stock), "DeepCache does not act"
    both = composes(pipe, method, steps)
    assert not torch.equal(both, patched), "DeepCache does not act on the patched model"
    dx.patch(pipe, method)                      # DeepCache first, taken off first
    helper.disable()
    assert torch.equal(steps(pipe), patched), "DeepCache's disable() dropped the patch"
    helper.enable()                             # the patch first, DeepCache on top
    assert torch.equal(steps(pipe), both)
    dx.unpatch(pipe)
    assert torch.equal(steps(pipe), cached)
    helper.disable()
    assert torch.equal(steps(pipe), stock)


def check_tomesd(method, tiny):
    import tomesd

    pipe = tiny_pipeline(tiny)
    tomesd.apply_patch(pipe, ratio=0.5, max_downsample=8)
    before, out = snapshot(pipe.unet), gen(pipe)
    with pytest.raises(PatchError, match=f"tomesd.*this UNet2DConditionModel's blocks.*{method!r}.*remove_patch"):
        dx.patch(pipe, method)
    assert_same(pipe.unet, before)
    assert torch.equal(gen(pipe), out)


def check_tomesd_after(method, tiny):
    import tomesd

    pipe = tiny_pipeline(tiny)
    with dx.patched(pipe, method):
        patched = gen(pipe)
        tomesd.apply_patch(pipe, ratio=0.5, max_downsample=8)
        with pytest.raises(ValueError, match="do not form a grid.*tomesd"):
            gen(pipe)
        tomesd.remove_patch(pipe)
        assert torch.equal(gen(pipe), patched)


def _hook_cache(kind):
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig, apply_first_block_cache, apply_taylorseer_cache

    if kind == "first_block_cache":
        return lambda m: apply_first_block_cache(m, FirstBlockCacheConfig(threshold=10.0))
    return lambda m: apply_taylorseer_cache(m, TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                                      taylor_factors_dtype=torch.float32))


def _remove_hooks(model, prefixes):
    from diffusers.hooks import HookRegistry

    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry):
            for name in list(registry.hooks):
                if name.startswith(prefixes):
                    registry.remove_hook(name, recurse=False)


def _check_hook_cache(method, tiny, kind):
    """The SD3 / DiT pipelines of this diffusers set no cache context (their transformers are not
    `CacheMixin`s), so the run sets one itself, as a `CacheMixin` pipeline would, fresh per run."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    pipe = tiny_pipeline(tiny)
    denoiser, _ = find_denoiser(pipe)
    cache = []

    def steps(p):
        if not cache:
            return gen(p, steps=4)
        HookRegistry.check_if_exists_or_initialize(denoiser).reset_stateful_hooks(recurse=True)
        _set_cache_context(denoiser, CacheContext("cond"))
        try:
            return gen(p, steps=4)
        finally:
            _set_cache_context(denoiser, None)

    stock = steps(pipe)
    with dx.patched(pipe, method):
        patched = steps(pipe)
    _hook_cache(kind)(denoiser)
    cache.append(kind)
    cached = steps(pipe)
    assert not torch.equal(cached, stock), f"{kind} does not act"
    both = composes(pipe, method, steps)
    assert not torch.equal(both, patched), f"{kind} does not act on the patched model"
    dx.patch(pipe, method)
    _remove_hooks(denoiser, ("fbc", "taylorseer"))
    cache.clear()
    assert torch.equal(steps(pipe), patched), f"removing {kind} does not leave the patch intact"
    dx.unpatch(pipe)


def check_first_block_cache(method, tiny):
    _check_hook_cache(method, tiny, "first_block_cache")


def check_taylorseer(method, tiny):
    _check_hook_cache(method, tiny, "taylorseer")


CHECKS = {name[len("check_"):]: fn for name, fn in dict(globals()).items() if name.startswith("check_")}


def _params():
    """One pytest param per cell; the fast suite runs each feature's first cell, `-m slow` the rest."""
    out, seen = [], set()
    for feature, method, tiny in compat.cells():
        first = feature.key not in seen and tiny not in feature.slow
        seen.add(feature.key)
        marks = [] if first else [pytest.mark.slow]
        out.append(pytest.param(feature.key, method, tiny, id=f"{feature.key}-{method}-{tiny}", marks=marks))
    return out


@pytest.mark.parametrize("feature, method, tiny", _params())
def test_cell(feature, method, tiny, tmp_path):
    check = CHECKS[feature]
    kwargs = {"tmp_path": tmp_path} if "tmp_path" in inspect.signature(check).parameters else {}
    check(method, tiny, **kwargs)


def test_every_feature_has_a_check():
    assert set(compat.features()) <= set(CHECKS), f"features without a check: {set(compat.features()) - set(CHECKS)}"


def test_committed_page_matches_the_registry():
    assert compat.PAGE.read_text(encoding="utf-8") == compat.markdown(), "run `python -m diffusers_ext.compat`"


def test_compose_with_takes_a_class():
    with pytest.raises(TypeError, match="processor class"):
        dx.compose_with(GainProcessor())
