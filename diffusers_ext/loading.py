"""Loading a pipeline from a hub id, a local folder, or one of the embedded tiny models.

    load_pipeline("digits")                        # offline: the shipped digits SiT (diffusers_ext.digits)
    load_pipeline("glyphs")                        # offline: the lab II glyph SiT, 1024 tokens (diffusers_ext.lab)
    load_pipeline("tiny:sd")                       # offline, random weights (diffusers_ext.testing)
    load_pipeline("runwayml/stable-diffusion-v1-5", dtype=torch.float16, device="cuda")
    load_pipeline("/path/to/saved/pipeline")
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

TINY_PREFIX = "tiny:"


@dataclass(frozen=True)
class ShippedModel:
    """A trained model shipped inside the package: its family, its loader and its recipe, as
    "module:attribute" paths (imported only when used), and the method `compare` and the app start
    from (None: the family's `default_method`)."""

    family: str
    loader: str        # (dtype=...) -> the pipeline
    recipe: str        # the call arguments the model recommends (steps, guidance, sampler)
    description: str
    method: str | None = None

    def attribute(self, path: str):
        module, name = path.split(":")
        return getattr(importlib.import_module(module), name)


SHIPPED_MODELS = {
    "digits": ShippedModel("dit", "diffusers_ext.digits:digits_pipeline", "diffusers_ext.digits:SAMPLING",
                            "a small SiT trained here on handwritten digits (16 x 16, 256 tokens)"),
    "glyphs": ShippedModel("dit", "diffusers_ext.lab.pipelines:glyph_sit_pipeline",
                            "diffusers_ext.lab.pipelines:SIT_SAMPLING",
                            "the lab II SiT trained here on font glyphs 0-9 A-Z (32 x 32, 1024 tokens)"),
    "glyphs-unet": ShippedModel("sd", "diffusers_ext.lab.pipelines:glyph_unet_pipeline",
                                 "diffusers_ext.lab.pipelines:UNET_SAMPLING",
                                 "the lab II UNet (SD 1.x layout) trained here on the same glyphs (1024 tokens at "
                                 "its finest self-attention)",
                                 # the lab study's one method at stock quality with a speed-up on it (docs/lab.md)
                                 method="todo"),
}
EMBEDDED = tuple(SHIPPED_MODELS)


def embedded_family(model: str) -> str | None:
    """The model family of an embedded model (`digits`, `tiny:<name>`) without building it; else None."""
    if model.startswith(TINY_PREFIX):
        from .testing import TINY_FAMILIES

        return TINY_FAMILIES.get(model[len(TINY_PREFIX):])
    return SHIPPED_MODELS[model].family if model in SHIPPED_MODELS else None


def embedded_method(model: str) -> str | None:
    """The method an embedded model is shown with, without building it: a shipped model's own
    (`ShippedModel.method`), else its family's `default_method`; None for other models."""
    from .families import get_family

    if model in SHIPPED_MODELS and SHIPPED_MODELS[model].method:
        return SHIPPED_MODELS[model].method
    family = embedded_family(model)
    return get_family(family).default_method if family else None


def embedded_recipe(model: str) -> dict:
    """The call arguments an embedded trained model recommends (its pipeline's `recipe`, e.g. the digits
    SiT's 12 Heun steps at guidance 2), without building it; {} for any other model."""
    if model in SHIPPED_MODELS:
        return dict(SHIPPED_MODELS[model].attribute(SHIPPED_MODELS[model].recipe))
    return {}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None` / "auto" -> CUDA when available, else CPU. A device this machine does not have (or a
    name torch does not know) is a `DeviceError` naming it and what is available."""
    from .errors import DeviceError

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {device!r}: CUDA is not available on this machine (torch "
                              f"{torch.__version__}); use --device cpu or auto")
        if resolved.index is not None and resolved.index >= count:
            raise DeviceError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto" -> float16 on CUDA, float32 elsewhere (diffusers' default of full precision on CPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)} or 'auto'")
    return names[dtype]


def load_pipeline(model: str, dtype: str | torch.dtype | None = "auto", device: str | None = "auto",
                  use_safetensors: bool | None = None):
    """Load a diffusers pipeline from `model` (hub id, local folder, a `SHIPPED_MODELS` name or `tiny:<family>`).

    use_safetensors: True loads only `.safetensors` weights (never pickled `.bin` / `.ckpt` files, which
        can run code when unpickled) and fails if a component has none; None is diffusers' default
        (safetensors when present, else pickles). Embedded tiny models are built in code either way.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if model.startswith(TINY_PREFIX):
        from .testing import tiny_pipeline

        return tiny_pipeline(model[len(TINY_PREFIX):], dtype=dtype).to(device)
    if model in SHIPPED_MODELS:
        return SHIPPED_MODELS[model].attribute(SHIPPED_MODELS[model].loader)(dtype=dtype).to(device)

    from diffusers import DiffusionPipeline

    try:
        extra = {} if use_safetensors is None else {"use_safetensors": use_safetensors}
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, **extra)
    except OSError as err:
        if use_safetensors and "safetensors" in str(err):
            hint = ("a component has no .safetensors weights, and only safetensors are loaded here (pickled "
                    ".bin / .ckpt files can run code when loaded); convert the weights to safetensors")
        elif not os.path.isdir(model):
            hint = "no local folder of that name exists and the model hub could not be reached"
        else:
            hint = "the folder is not a saved diffusers pipeline"
        raise OSError(f"could not load pipeline {model!r}: {hint}. Offline, use an embedded model such as "
                      f"'digits' or 'tiny:sd' ({err.__class__.__name__}: {err})") from err
    return pipe.to(device)
