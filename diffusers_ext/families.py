"""Model families: everything diffusers-ext knows per kind of denoiser, in one record each.

A `Family` says how to recognise its denoiser, where its attention sites are, what the denoiser takes
(the noisy-input argument, dummy inputs for one forward, the conditioning and how a pipeline encodes
it), how a fine-tune noises its inputs when no scheduler says, which method `compare` and the app
pick by default, and which pipelines it serves. Everything else asks the family; adding one (FLUX is
next) is one `register_family(Family(...))` here plus the support of its methods.

A *site* is one `Attention` module a method may replace, with what it attends over:

    role   "self"      image self-attention (UNet `attn1`, DiT `attn1`, SD3.5 dual-attention `attn2`)
           "cross"     image -> text cross-attention (UNet `attn2`)
           "joint"     SD3 joint attention over image + text tokens (`attn`)
           "temporal"  AnimateDiff motion-module attention over frames (never replaced by image methods)
    level  UNet resolution level: tokens are the latent downsampled by 2**level; None for transformers
    depth  index of the transformer block among the denoiser's blocks (0 = first)

Families (what `patch` accepts): the denoiser class decides, a pipeline is reduced to its denoiser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.models.attention_processor import Attention

from .errors import UnsupportedModelError

ROLES = ("self", "cross", "joint", "temporal")
CONDITIONINGS = ("text", "class")
NOISINGS = ("ddpm", "flow", "interpolant")


@dataclass(frozen=True)
class AttentionSite:
    name: str
    module: Attention
    role: str
    level: int | None
    depth: int

    def __repr__(self) -> str:  # the module's repr is long and says nothing here
        return f"AttentionSite({self.name!r}, role={self.role!r}, level={self.level}, depth={self.depth})"


@dataclass(frozen=True)
class Family:
    """One kind of denoiser and everything diffusers-ext needs to know about it.

    matches(denoiser) -> bool; find_sites(denoiser) -> [AttentionSite].
    input_key: the denoiser's noisy-input argument ("sample" for UNets, "hidden_states" for transformers).
    conditioning: "text" (prompts through the pipeline's `encode_prompt`) or "class" (class labels).
    encode_prompts(pipe, prompts, device) -> {name: (n, ...) tensor}, one row per prompt (text families).
    condition_kwargs(rows, resolution) -> the denoiser's conditioning keyword arguments from rows of
        `encode_prompts` (or {"class_labels": (B,)}) at image `resolution` (H, W) in pixels.
    dummy_inputs(denoiser, batch, generator, timestep, frames) -> keyword arguments of one forward.
    noising: a fine-tune's noising when there is no scheduler to ask ("ddpm" or "flow").
    default_method: what `compare` and the app use when none is named.
    pipelines: the diffusers pipeline classes (names) whose denoiser this family is.
    video: the sample is (B, C, frames, H, W).
    latent_side(pipe) -> the pipeline's default latent side, for drawing `latents=` (B, C, h, w) per
        sample (FID sampling); None: let the pipeline draw its own from the per-sample generators.
    """

    name: str
    description: str
    matches: Callable[[torch.nn.Module], bool]
    find_sites: Callable[[torch.nn.Module], list[AttentionSite]]
    input_key: str
    conditioning: str
    dummy_inputs: Callable[..., dict[str, Any]]
    noising: str
    default_method: str
    pipelines: tuple[str, ...] = ()
    encode_prompts: Callable[..., dict[str, torch.Tensor]] | None = None
    condition_kwargs: Callable[[dict[str, torch.Tensor], tuple[int, int] | None], dict[str, Any]] = (
        lambda rows, resolution: dict(rows))
    video: bool = False
    latent_side: Callable[[Any], int | None] | None = None

    def __post_init__(self):
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"family {self.name!r}: conditioning must be one of {CONDITIONINGS}")
        if self.noising not in NOISINGS:
            raise ValueError(f"family {self.name!r}: noising must be one of {NOISINGS}")
        if self.conditioning == "text" and self.encode_prompts is None:
            raise ValueError(f"family {self.name!r}: a text-conditioned family needs `encode_prompts`")

    def native_grid(self, denoiser) -> tuple[int, int]:
        """The token grid of the denoiser's finest attention at its trained size: sample_size / patch_size."""
        config = denoiser.config
        size, patch = config.sample_size, getattr(config, "patch_size", None) or 1
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return height // patch, width // patch


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    return dict(_FAMILIES)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise UnsupportedModelError(f"unknown model family {name!r}; families: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


# --- UNets (SD 1.x / 2.x, SDXL, AnimateDiff) --------------------------------------------------------

_UNET_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def _unet_level(name: str, num_levels: int) -> int:
    match = _UNET_BLOCK.match(name)
    if match is None:
        raise ValueError(f"attention {name!r} is outside the UNet's down / mid / up blocks")
    if match.group(1) is None:
        return num_levels - 1
    index = int(match.group(2))
    return index if match.group(1) == "down_blocks" else num_levels - 1 - index


def _unet_sites(unet: torch.nn.Module) -> list[AttentionSite]:
    num_levels = len(unet.config.block_out_channels)
    sites, depth, last_block = [], -1, None
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        block = name.rsplit(".", 1)[0]
        if block != last_block:
            depth, last_block = depth + 1, block
        if ".motion_modules." in name:
            role = "temporal"
        elif name.endswith("attn1"):
            role = "self"
        elif name.endswith("attn2"):
            role = "cross"
        else:
            continue
        sites.append(AttentionSite(name, module, role, _unet_level(name, num_levels), depth))
    return sites


def _is_unet2d(model) -> bool:
    from diffusers import UNet2DConditionModel

    return isinstance(model, UNet2DConditionModel)


def _is_sdxl(model) -> bool:
    return _is_unet2d(model) and model.config.get("addition_embed_type") == "text_time"


def _is_motion_unet(model) -> bool:
    from diffusers import UNetMotionModel

    return isinstance(model, UNetMotionModel)


def _unet_dummy_inputs(unet, batch: int, generator: torch.Generator, timestep: float, frames: int = 4) -> dict:
    """sample (B, C, h, w) (AnimateDiff: (B, C, F, h, w)), a scalar timestep, random text states
    (77 tokens; repeated per frame for AnimateDiff) and SDXL's added conditions."""
    size, video = unet.config.sample_size, _is_motion_unet(unet)
    shape = (batch, unet.config.in_channels, *((frames,) if video else ()), size, size)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    if video:  # AnimateDiff pipelines repeat the prompt per frame
        text = text.repeat_interleave(frames, dim=0)
    kwargs = dict(sample=torch.randn(shape, generator=generator), timestep=torch.tensor(timestep),
                  encoder_hidden_states=text)
    if _is_sdxl(unet):
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        pixels = float(size * 8)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]]).repeat(batch, 1),
        }
    return kwargs


def _encode_sd(pipe, prompts: list[str], device) -> dict[str, torch.Tensor]:
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return {"encoder_hidden_states": embeds}


def _encode_sdxl(pipe, prompts: list[str], device) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled}


def _sdxl_condition_kwargs(rows: dict[str, torch.Tensor], resolution: tuple[int, int] | None) -> dict[str, Any]:
    """SDXL's added conditions: pooled text and the size / crop ids of an uncropped image at `resolution`."""
    height, width = resolution
    batch = rows["encoder_hidden_states"].shape[0]
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(batch, -1)
    return {"encoder_hidden_states": rows["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": rows["text_embeds"], "time_ids": time_ids}}


def _unet_latent_side(pipe) -> int:
    return pipe.unet.config.sample_size


_SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                 "StableDiffusionControlNetPipeline", "StableDiffusionAdapterPipeline")
_SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
                   "StableDiffusionXLControlNetPipeline", "StableDiffusionXLAdapterPipeline")

register_family(Family(
    "sd", "Stable Diffusion 1.x / 2.x UNet (UNet2DConditionModel)", lambda m: _is_unet2d(m) and not _is_sdxl(m),
    _unet_sites, input_key="sample", conditioning="text", dummy_inputs=_unet_dummy_inputs, noising="ddpm",
    default_method="agent", pipelines=_SD_PIPELINES, encode_prompts=_encode_sd, latent_side=_unet_latent_side,
))
register_family(Family(
    "sdxl", "Stable Diffusion XL UNet (UNet2DConditionModel, text_time)", _is_sdxl, _unet_sites,
    input_key="sample", conditioning="text", dummy_inputs=_unet_dummy_inputs, noising="ddpm",
    default_method="agent", pipelines=_SDXL_PIPELINES, encode_prompts=_encode_sdxl,
    condition_kwargs=_sdxl_condition_kwargs, latent_side=_unet_latent_side,
))
register_family(Family(
    "animatediff", "AnimateDiff (UNetMotionModel)", _is_motion_unet, _unet_sites, input_key="sample",
    conditioning="text", dummy_inputs=_unet_dummy_inputs, noising="ddpm", default_method="anchor_frame",
    pipelines=("AnimateDiffPipeline", "AnimateDiffControlNetPipeline", "AnimateDiffSparseControlNetPipeline",
               "AnimateDiffVideoToVideoPipeline"),
    encode_prompts=_encode_sd, video=True,
))


# --- Transformers (SD3 / SD3.5, DiT / SiT) -----------------------------------------------------------

_BLOCK_INDEX = re.compile(r"^transformer_blocks\.(\d+)\.(attn\d?)$")


def _transformer_sites(model: torch.nn.Module, roles: dict[str, str]) -> list[AttentionSite]:
    sites = []
    for name, module in model.named_modules():
        match = _BLOCK_INDEX.match(name)
        if match and isinstance(module, Attention) and match.group(2) in roles:
            sites.append(AttentionSite(name, module, roles[match.group(2)], None, int(match.group(1))))
    return sites


def _is_sd3(model) -> bool:
    from diffusers import SD3Transformer2DModel

    return isinstance(model, SD3Transformer2DModel)


def _is_dit(model) -> bool:
    from diffusers import DiTTransformer2DModel

    return isinstance(model, DiTTransformer2DModel)


def _transformer_latent(model, batch: int, generator: torch.Generator) -> torch.Tensor:
    size = model.config.sample_size
    return torch.randn(batch, model.config.in_channels, size, size, generator=generator)


def _sd3_dummy_inputs(model, batch: int, generator: torch.Generator, timestep: float, frames: int = 1) -> dict:
    """hidden_states (B, C, h, w), per-sample timesteps, 77 random text states and pooled projections."""
    return dict(hidden_states=_transformer_latent(model, batch, generator), timestep=torch.full((batch,), timestep),
                encoder_hidden_states=torch.randn(batch, 77, model.config.joint_attention_dim, generator=generator),
                pooled_projections=torch.randn(batch, model.config.pooled_projection_dim, generator=generator))


def _dit_dummy_inputs(model, batch: int, generator: torch.Generator, timestep: float, frames: int = 1) -> dict:
    """hidden_states (B, C, h, w), per-sample timesteps and class labels 0, 1, ... (mod the class count)."""
    classes = model.config.num_embeds_ada_norm or 1000
    return dict(hidden_states=_transformer_latent(model, batch, generator), timestep=torch.full((batch,), timestep),
                class_labels=torch.arange(batch) % classes)


def _encode_sd3(pipe, prompts: list[str], device) -> dict[str, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                              num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


register_family(Family(
    "sd3", "Stable Diffusion 3 / 3.5 MMDiT (SD3Transformer2DModel)", _is_sd3,
    lambda m: _transformer_sites(m, {"attn": "joint", "attn2": "self"}),
    input_key="hidden_states", conditioning="text", dummy_inputs=_sd3_dummy_inputs, noising="flow",
    default_method="t5", encode_prompts=_encode_sd3, latent_side=lambda pipe: pipe.default_sample_size,
    pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline",
               "StableDiffusion3ControlNetPipeline"),
))
register_family(Family(
    "dit", "DiT / SiT (DiTTransformer2DModel)", _is_dit, lambda m: _transformer_sites(m, {"attn1": "self"}),
    input_key="hidden_states", conditioning="class", dummy_inputs=_dit_dummy_inputs, noising="ddpm",
    default_method="mediator", pipelines=("DiTPipeline", "SiTPipeline"),
))


# --- Resolving what the user passed ------------------------------------------------------------------

DENOISER_ATTRIBUTES = ("unet", "transformer")


def find_denoiser(pipe_or_model) -> tuple[torch.nn.Module, object | None]:
    """(denoiser, pipeline or None) for a pipeline or a bare denoiser."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return pipe_or_model, None
    for attribute in DENOISER_ATTRIBUTES:
        denoiser = getattr(pipe_or_model, attribute, None)
        if isinstance(denoiser, torch.nn.Module):
            return denoiser, pipe_or_model
    raise UnsupportedModelError(
        f"{type(pipe_or_model).__name__} is neither a denoiser (torch.nn.Module) nor a pipeline with a "
        f"`unet` or `transformer`"
    )


def family_of(denoiser: torch.nn.Module) -> Family:
    """The family of a denoiser (a pipeline is reduced to its denoiser)."""
    if not isinstance(denoiser, torch.nn.Module):
        denoiser = find_denoiser(denoiser)[0]
    for family in _FAMILIES.values():
        if family.matches(denoiser):
            return family
    supported = "; ".join(f.description for f in _FAMILIES.values())
    raise UnsupportedModelError(f"{type(denoiser).__name__} is not a supported denoiser. Supported: {supported}")


def family_of_pipeline_class(class_name: str) -> Family | None:
    """The family serving a pipeline class (by name, e.g. a saved pipeline's `_class_name`), or None."""
    return next((f for f in _FAMILIES.values() if class_name in f.pipelines), None)


def describe_sites(sites: list[AttentionSite]) -> str:
    """A one-line summary of a denoiser's attention, e.g. 'self-attention at downsampling 2, 4'."""
    parts = []
    for role in ROLES:
        chosen = [s for s in sites if s.role == role]
        if not chosen:
            continue
        levels = sorted({s.level for s in chosen if s.level is not None})
        where = f" at downsampling {', '.join(str(2**lv) for lv in levels)}" if levels else ""
        parts.append(f"{len(chosen)} {role}-attention layers{where}")
    return "its attention: " + ("; ".join(parts) if parts else "none")


def unet_self_attention(sites: list[AttentionSite], max_downsample: int) -> list[AttentionSite]:
    """UNet image self-attention sites at downsampling <= `max_downsample` (ToMe's convention)."""
    return [s for s in sites if s.role == "self" and s.level is not None and 2**s.level <= max_downsample]
