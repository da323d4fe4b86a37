"""Helpers shared by the tests: deterministic inputs for one denoiser forward, and running it."""

from __future__ import annotations

import importlib
import os

import pytest
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


def pool_loop(x: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling of tokens (..., H*W, C) on their row-major grid -> (..., h*w, C),
    written with explicit loops (cell i spans rows floor(i H / h) to ceil((i + 1) H / h)): an
    independent reference for `ops.pool_on_grid`."""
    (height, width), (oh, ow) = grid, out_grid
    image = x.reshape(*x.shape[:-2], height, width, x.shape[-1])
    cells = []
    for i in range(oh):
        r0, r1 = (i * height) // oh, -(-((i + 1) * height) // oh)
        for j in range(ow):
            c0, c1 = (j * width) // ow, -(-((j + 1) * width) // ow)
            cells.append(sum(image[..., r, c, :] for r in range(r0, r1) for c in range(c0, c1)) / ((r1 - r0) * (c1 - c0)))
    return torch.stack(cells, dim=-2)


def heads_of(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, h*d) -> (B, h, N, d), written here (not `processor.split_heads`) for references."""
    return x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads).permute(0, 2, 1, 3)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers (8 significant bits) at |x|, as float64."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-120))) - 7)


def assert_rounded_from_exact(out: torch.Tensor, exact: torch.Tensor):
    """bf16 `out` is `exact` (float64) computed in fp32 and rounded once: within half a bf16 ulp
    (plus fp32's error, 1e-6 of the largest value). Computing in bf16 rounds its intermediates
    too and lands a ulp or more away."""
    err = (out.double() - exact).abs()
    allowed = 0.5 * bf16_ulp(exact) * (1 + 1e-3) + 1e-6 * exact.abs().max()
    worst = (err / allowed).max().item()
    assert worst <= 1.0, f"{worst:.2f} x the error of one bf16 rounding of the exact result"


def in_ci() -> bool:
    """True where the environment says it is CI (`CI=true`, as CI services and `.ci/run` set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str):
    """Something `setup.sh` or the `dev` extra installs is absent: skip here, fail in CI (a test CI
    cannot run is a hole in the suite, not a pass). Works at module level and inside a test."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: CI must have it, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, why: str = "the dev extra: pip install -e '.[dev]'"):
    """The imported module `name`, or `missing(...)`: skipped here, a failure in CI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"needs {name} ({why})")
