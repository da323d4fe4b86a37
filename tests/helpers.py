"""Helpers shared by the tests: deterministic inputs for one denoiser forward, and running it."""

from __future__ import annotations

import torch

from diffusers_ext.families import family_of, find_denoiser


def denoiser_inputs(pipe, batch: int = 2, seed: int = 0, timestep: float = 999.0, frames: int = 4):
    """(denoiser, kwargs): the family's dummy inputs (`Family.dummy_inputs`) for one forward."""
    denoiser, _ = find_denoiser(pipe)
    generator = torch.Generator().manual_seed(seed)
    return denoiser, family_of(denoiser).dummy_inputs(denoiser, batch, generator, timestep, frames)


def run_denoiser(model, kwargs):
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]
