"""What the quality-lab studies share: a resumable per-row cache and the FID scorer.

A study evaluates rows (stock, each method training-free, each method distilled) on one trained model.
A row costs minutes (sampling, a fine-tune, Inception features), so every finished piece is kept on disk
under `<cache>/<row key>/` and a stopped study picks up where it stopped:

    row.json            the row's metrics (written last, atomically: present = the row is complete)
    samples.pt          the row's samples (B, C, H, W) in [-1, 1]
    distill/            the fine-tune: `checkpoint-*` folders while it runs (resumed with
                        `resume="latest"`), then the trained weights, loadable with `dx.patch(weights=)`

The key is a hash of everything that determines the row (its name, method, options, mode, sample count,
sampling, fine-tune settings and the model's weights file), so a changed setting never reuses a stale row.
Timing is not cached: the speed column is always measured afresh in the run that writes the table, all
configurations round-robin in one run (benchmarks/harness.py), so a study interrupted under load can be
finished on a quiet machine and its ratios are from one run.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

import harness
from diffusers_ext import files
from diffusers_ext.eval.inception import InceptionNetwork, extract_features
from diffusers_ext.eval.metrics import compute_statistics, frechet_distance
from diffusers_ext.pipeline_io import tensor_to_uint8


def file_digest(path: str | Path) -> str:
    """sha256 of a file (the model weights a row was computed from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RowCache:
    """Rows of one study on disk (module doc). `root=None` disables caching (every row recomputed)."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None

    def folder(self, settings: dict[str, Any]) -> Path | None:
        """The row's folder: `<slug of its name and mode>-<hash of settings>`; None without a cache."""
        if self.root is None:
            return None
        text = json.dumps(settings, sort_keys=True, default=str)
        slug = re.sub(r"[^a-z0-9]+", "-", f"{settings.get('name', '')} {settings.get('mode', '')}".lower()).strip("-")
        return self.root / f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def load(self, settings: dict[str, Any]) -> tuple[dict, torch.Tensor] | None:
        """(row, samples) of a complete cached row, else None."""
        folder = self.folder(settings)
        if folder is None or not (folder / "row.json").is_file():
            return None
        return json.loads((folder / "row.json").read_text()), torch.load(folder / "samples.pt")

    def store(self, settings: dict[str, Any], row: dict, samples: torch.Tensor) -> None:
        """Write the samples, then the row (atomically; the row marks the entry complete)."""
        folder = self.folder(settings)
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        with files.atomic_path(folder / "samples.pt") as tmp:
            torch.save(samples.contiguous(), tmp)
        harness.write_json(folder / "row.json", dict(row, settings=settings))

    def distill_dir(self, settings: dict[str, Any], fallback: str | Path) -> Path:
        """Where the row's fine-tune writes its checkpoints and weights (`fallback` without a cache)."""
        folder = self.folder(settings)
        return folder / "distill" if folder is not None else Path(fallback)


class Scorer:
    """FID of sample sets against one reference set, Inception pool features of the FID tool."""

    def __init__(self, reference: torch.Tensor | None = None, batch: int = 8, cache: RowCache | None = None,
                 reference_statistics: tuple[np.ndarray, np.ndarray] | None = None):
        """The reference: images (B, C, H, W) in [-1, 1], or their (mu, sigma) (e.g. shipped statistics)."""
        if (reference is None) == (reference_statistics is None):
            raise ValueError("give the reference images or their statistics, not both")
        self.network = InceptionNetwork()
        self.batch = batch   # 8: fastest on a 2-core CPU
        self.reference = reference_statistics or self.statistics(reference, "reference", cache)

    def statistics(self, images: torch.Tensor, desc: str, cache: RowCache | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of the pool features of `images`, kept in `cache` (keyed by the images' bytes)."""
        path = None
        if cache is not None and cache.root is not None:
            digest = hashlib.sha256(tensor_to_uint8(images).tobytes()).hexdigest()[:16]
            path = cache.root / f"statistics-{digest}.npz"
            if path.is_file():
                with np.load(path) as saved:
                    return saved["mu"], saved["sigma"]
        mu, sigma = compute_statistics(self.pool(images, desc))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with files.atomic_path(path) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, mu=mu, sigma=sigma)
        return mu, sigma

    def pool(self, images: torch.Tensor, desc: str) -> np.ndarray:
        arr = tensor_to_uint8(images)
        chunks = (arr[i:i + self.batch] for i in range(0, len(arr), self.batch))
        return extract_features(self.network, chunks, total=len(arr), desc=f"features {desc}")["pool"]

    def fid(self, images: torch.Tensor, desc: str) -> float:
        mu, sigma = compute_statistics(self.pool(images, desc))
        return frechet_distance(mu, sigma, *self.reference)

    def noise_floor(self, images: torch.Tensor, labels: torch.Tensor, num: int, draws: int,
                    cache: RowCache | None = None) -> list[float]:
        """FID of `num` real images (`balanced_draw`, seeds 0 .. draws-1) against the reference, once per
        draw: what a perfect model scores at this sample count, and how much a row moves by chance."""
        fids = []
        for seed in range(draws):
            mu, sigma = self.statistics(images[balanced_draw(labels, num, seed)], f"real {seed + 1}/{draws}", cache)
            fids.append(frechet_distance(mu, sigma, *self.reference))
        return fids


def balanced_draw(labels: torch.Tensor, num: int, seed: int) -> torch.Tensor:
    """Indices of `num` items, every class of `labels` equally often (num // classes each), drawn at random
    without replacement within a class (torch.Generator seeded with `seed`), in class order."""
    classes = labels.unique()
    per_class = num // len(classes)
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        if len(members) < per_class:
            raise ValueError(f"class {int(c)} has {len(members)} items, fewer than the {per_class} a draw takes")
        picks.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return torch.cat(picks)
