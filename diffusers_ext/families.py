"""Model families and the attention sites inside each denoiser.

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
from typing import Callable

import torch
from diffusers.models.attention_processor import Attention

ROLES = ("self", "cross", "joint", "temporal")


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
    name: str
    description: str
    matches: Callable[[torch.nn.Module], bool]
    find_sites: Callable[[torch.nn.Module], list[AttentionSite]]


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    return dict(_FAMILIES)


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


register_family(Family("sd", "Stable Diffusion 1.x / 2.x UNet (UNet2DConditionModel)",
                       lambda m: _is_unet2d(m) and not _is_sdxl(m), _unet_sites))
register_family(Family("sdxl", "Stable Diffusion XL UNet (UNet2DConditionModel, text_time)", _is_sdxl, _unet_sites))
register_family(Family("animatediff", "AnimateDiff (UNetMotionModel)", _is_motion_unet, _unet_sites))


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


register_family(Family(
    "sd3", "Stable Diffusion 3 / 3.5 MMDiT (SD3Transformer2DModel)", _is_sd3,
    lambda m: _transformer_sites(m, {"attn": "joint", "attn2": "self"}),
))
register_family(Family(
    "dit", "DiT / SiT (DiTTransformer2DModel)", _is_dit, lambda m: _transformer_sites(m, {"attn1": "self"}),
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
    raise TypeError(
        f"{type(pipe_or_model).__name__} is neither a denoiser (torch.nn.Module) nor a pipeline with a "
        f"`unet` or `transformer`"
    )


def family_of(denoiser: torch.nn.Module) -> Family:
    for family in _FAMILIES.values():
        if family.matches(denoiser):
            return family
    supported = "; ".join(f.description for f in _FAMILIES.values())
    raise TypeError(f"{type(denoiser).__name__} is not a supported denoiser. Supported: {supported}")


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
