import functools
import logging

import pytest
import torch

from diffusers_ext.testing import tiny_pipeline

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
logging.getLogger("diffusers").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=None)
def _cached_pipeline(family: str):
    return tiny_pipeline(family)


@pytest.fixture
def pipeline_of():
    """A tiny pipeline per family, built once per session; each test must leave it unpatched."""

    def get(family: str):
        pipe = _cached_pipeline(family)
        from diffusers_ext import patch_record, unpatch

        if patch_record(pipe) is not None:  # a failed test left it patched: never leak into the next
            unpatch(pipe)
        return pipe

    return get


def denoiser_inputs(pipe, batch: int = 2, seed: int = 0, timestep: float = 999.0, frames: int = 4):
    """Deterministic inputs for one forward of a tiny pipeline's denoiser: (denoiser, kwargs)."""
    g = torch.Generator().manual_seed(seed)
    name = type(pipe).__name__
    if hasattr(pipe, "unet"):
        unet = pipe.unet
        size = unet.config.sample_size
        shape = (batch, unet.config.in_channels, frames, size, size) if "AnimateDiff" in name else (
            batch, unet.config.in_channels, size, size)
        text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
        if len(shape) == 5:  # AnimateDiff pipelines repeat the prompt per frame
            text = text.repeat_interleave(frames, dim=0)
        kwargs = dict(sample=torch.randn(shape, generator=g), timestep=torch.tensor(timestep),
                      encoder_hidden_states=text)
        if unet.config.get("addition_embed_type") == "text_time":
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, 32, generator=g),
                "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1),
            }
        return unet, kwargs
    model = pipe.transformer
    size = model.config.sample_size
    x = torch.randn(batch, model.config.in_channels, size, size, generator=g)
    if "StableDiffusion3" in name:
        return model, dict(hidden_states=x, timestep=torch.full((batch,), timestep),
                           encoder_hidden_states=torch.randn(batch, 77, model.config.joint_attention_dim, generator=g),
                           pooled_projections=torch.randn(batch, model.config.pooled_projection_dim, generator=g))
    return model, dict(hidden_states=x, timestep=torch.full((batch,), timestep),
                       class_labels=torch.arange(batch) % 1000)


def run_denoiser(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)[0]
    return out
