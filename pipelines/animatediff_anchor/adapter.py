"""Motion adapters in and out of a UNetMotionModel: save its motion modules as a `MotionAdapter` folder,
and run a pipeline with another adapter's motion modules for a while.

    save_motion_adapter(pipe, "my-adapter")                  # MotionAdapter.from_pretrained("my-adapter") loads it
    with motion_adapter_loaded(pipe, "my-adapter"):          # or a MotionAdapter; restored on exit
        frames = pipe("a portrait", num_frames=16).frames
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from diffusers_ext.files import save_pretrained

MOTION_KEY = ".motion_modules."


def _adapter_config(pipe_or_unet) -> dict:
    """The MotionAdapter config of a pipeline (its `motion_adapter`, as loaded) or of a bare UNetMotionModel."""
    adapter = getattr(pipe_or_unet, "motion_adapter", None)
    if adapter is not None:
        return {k: v for k, v in adapter.config.items() if not k.startswith("_")}
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    config = unet.config
    return dict(block_out_channels=config["block_out_channels"], motion_layers_per_block=config["layers_per_block"],
                motion_norm_num_groups=config["norm_num_groups"],
                motion_num_attention_heads=config["motion_num_attention_heads"],
                motion_max_seq_length=config["motion_max_seq_length"],
                use_motion_mid_block=config["use_motion_mid_block"])


def _tensor(module: torch.nn.Module, key: str) -> torch.Tensor:
    """`module`'s tensor at state-dict `key`, read through attributes: a parametrized weight (a LoRA
    during training) gives its current, merged value."""
    path, name = key.rsplit(".", 1)
    return getattr(module.get_submodule(path), name)


def motion_adapter_of(pipe_or_unet):
    """A `MotionAdapter` holding the current motion modules of `pipe_or_unet` (a pipeline or a
    UNetMotionModel), configured like the adapter it was built from."""
    from diffusers import MotionAdapter

    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    adapter = MotionAdapter.from_config(_adapter_config(pipe_or_unet))
    try:
        state = {key: _tensor(unet, key).detach() for key in adapter.state_dict()}
    except AttributeError as err:
        raise ValueError(f"the UNet's motion modules do not match its motion-adapter config: {err}") from None
    adapter.load_state_dict(state, strict=True)
    return adapter


def save_motion_adapter(pipe_or_unet, folder: str | os.PathLike) -> Path:
    """Write the motion modules of `pipe_or_unet` as a MotionAdapter folder (config.json + safetensors).

    Written to a temporary folder beside `folder` first and moved in file by file, so each file is
    either the old one or complete; other files in `folder` (checkpoints, caches) are left alone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapter = motion_adapter_of(pipe_or_unet)
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder))
    try:
        save_pretrained(adapter, staging)
        for path in sorted(staging.iterdir()):
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _load_adapter(adapter):
    from diffusers import MotionAdapter

    if isinstance(adapter, MotionAdapter):
        return adapter
    folder = Path(adapter)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"motion adapter {folder} has no config.json: give a folder written by "
                                "MotionAdapter.save_pretrained or `diffusers-ext animate-train`")
    return MotionAdapter.from_pretrained(folder)


@contextlib.contextmanager
def motion_adapter_loaded(pipe, adapter):
    """Inside, `pipe.unet`'s motion modules are those of `adapter` (a MotionAdapter or its folder); the
    previous ones come back on exit, bit for bit. A shape mismatch is a ValueError."""
    unet = pipe.unet
    saved = {k: v.detach().clone() for k, v in unet.state_dict().items() if MOTION_KEY in f".{k}"}
    adapter = _load_adapter(adapter)
    try:
        try:
            unet.load_motion_modules(adapter)
        except (RuntimeError, IndexError, AttributeError) as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"the motion adapter does not fit this pipeline's UNet ({first})") from None
        yield pipe
    finally:
        unet.load_state_dict(saved, strict=False)
