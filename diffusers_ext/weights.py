"""Saving and loading the weights a method adds or changes, as safetensors plus a small JSON.

A weights folder holds
    diffusers_ext_config.json        {"method", "options", "family", "denoiser", "sites", "format"}
    diffusers_ext_weights.safetensors state-dict entries of the denoiser, keys as in `state_dict()`
                                      (new parameters live at `<site>.processor.<name>`)

`dx.patch(pipe, method, weights=folder)` patches with the saved options (the caller's override
them) and loads the tensors; every saved tensor must find its parameter with the same shape, and
every parameter of the patch's processors must be in the folder (nothing is left untrained).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import PatchError

CONFIG_NAME = "diffusers_ext_config.json"
WEIGHTS_NAME = "diffusers_ext_weights.safetensors"
FORMAT_VERSION = 1


def _jsonable(value: Any) -> Any:
    from .steps import Schedule

    if isinstance(value, Schedule):
        return [value.start, value.end]
    if isinstance(value, tuple):
        return list(value)
    return value


def save_weights(folder: str | Path, denoiser: torch.nn.Module, record, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `tensors` (state-dict names of `denoiser`) and the patch's method and options.

    Each file is written atomically, the config last and any old one removed first: a write stopped
    at any moment leaves the old folder, or one without a config (which `read_config` refuses),
    never new tensors beside an old method's options."""
    from .files import atomic_write_text, save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT_VERSION, "method": record.method, "family": record.family,
        "denoiser": type(denoiser).__name__, "sites": record.sites,
        "options": {k: _jsonable(v) for k, v in record.options.items()},
    }
    (folder / CONFIG_NAME).unlink(missing_ok=True)
    save_safetensors(tensors, folder / WEIGHTS_NAME)
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2))
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not folder.is_dir() or not path.is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers_ext weights folder (expected {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise PatchError(f"{path} is not valid JSON ({err}); the weights folder is damaged: save it again") from None
    if not isinstance(config, dict) or not {"method", "options", "denoiser"} <= set(config):
        raise PatchError(f"{path} lacks the method, options or denoiser entries of a diffusers_ext weights folder")
    if config.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format {config.get('format')!r} (this version reads {FORMAT_VERSION})")
    return config


def saved_options(config: dict[str, Any]) -> dict[str, Any]:
    """Options as saved, with JSON lists turned back into tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config["options"].items()}


def load_weights(folder: str | Path, denoiser: torch.nn.Module, config: dict[str, Any]) -> list[str]:
    """Load the saved tensors into the patched `denoiser`; returns the names loaded."""
    from safetensors.torch import load_file

    if config["denoiser"] != type(denoiser).__name__:
        raise ValueError(f"weights in {folder} were made for a {config['denoiser']}, not a {type(denoiser).__name__}")
    path = Path(folder) / WEIGHTS_NAME
    try:
        tensors = load_file(str(path))
    except Exception as err:   # safetensors raises its own SafetensorError (and OSError) for a bad file
        raise PatchError(f"{path} is not a readable safetensors file ({err}); it may be truncated: save it "
                         "again") from None
    own = denoiser.state_dict(keep_vars=True)
    missing = sorted(set(tensors) - set(own))
    if missing:
        raise ValueError(f"weights in {folder} do not fit this model: {len(missing)} tensors have no place, "
                         f"e.g. {missing[:3]}")
    untrained = sorted(k for k in own if PROCESSOR_MARK in k and k not in tensors)
    if untrained:
        sites = sorted({k.split(PROCESSOR_MARK)[0] for k in untrained})
        raise ValueError(f"weights in {folder} do not cover this patch: {len(untrained)} tensors of "
                         f"{len(sites)} patched site(s) are not in it (e.g. {', '.join(sites[:3])}); the folder "
                         f"was made for other sites ({', '.join(config.get('sites', [])[:3])}, ...) or options")
    mismatched = [k for k, v in tensors.items() if tuple(own[k].shape) != tuple(v.shape)]
    if mismatched:
        k = mismatched[0]
        raise ValueError(f"weights in {folder} do not fit this model: {k} is {tuple(tensors[k].shape)} there, "
                         f"{tuple(own[k].shape)} here ({len(mismatched)} such tensors)")
    keep_pretrained(denoiser, tensors)          # the inherited weights the fine-tune changed, as they are now
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value.to(own[name].dtype))
    return sorted(tensors)


# --- inherited weights: a weights folder may also hold fine-tuned pretrained tensors (e.g. attention
# projections, under the denoiser's own names). Loading them, or a fine-tune in place, overwrites the
# model's values; their originals are kept on the denoiser (`keep_pretrained`) so that `restore_inherited`
# can put them back after `unpatch`.

PROCESSOR_MARK = ".processor."
INHERITED_ORIGINALS = "_diffusers_ext_inherited_originals"


def keep_pretrained(denoiser: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    """The pretrained values of the denoiser's tensors `names` (state-dict names; a patch's own tensors, under
    `PROCESSOR_MARK`, are skipped): copied the first time anything is about to change them (a weights folder, a
    fine-tune in place) and kept until `restore_inherited`. A model already fine-tuned in memory or loaded from
    a folder thus still knows its stock weights: `unpatch` restores them, and a distiller's teacher is the stock
    model, never the student's inherited weights."""
    stash = denoiser.__dict__.setdefault(INHERITED_ORIGINALS, {})
    own = denoiser.state_dict(keep_vars=True)
    names = [name for name in names if PROCESSOR_MARK not in name]
    with torch.no_grad():
        for name in names:
            if name not in stash:
                stash[name] = own[name].detach().clone()
    return {name: stash[name] for name in names}


def restore_inherited(denoiser: torch.nn.Module) -> list[str]:
    """Put back the pretrained values of inherited tensors a weights folder or a fine-tune overwrote (the ones
    `keep_pretrained` kept); returns their names."""
    stash = denoiser.__dict__.pop(INHERITED_ORIGINALS, {})
    own = denoiser.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in stash.items():
            own[name].copy_(value)
    return sorted(stash)
