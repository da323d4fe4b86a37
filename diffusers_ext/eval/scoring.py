"""`fid SAMPLES REFERENCE`: features (cached), statistics and the report.

    report = evaluate("samples.npz", "VIRTUAL_imagenet256_labeled.npz")
    report["fid"], report["sfid"], report["precision"], report["recall"]
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

from .data import EvalInput, FeatureCache, ImageSizeWarning, describe_sizes
from .metrics import (
    INCEPTION_SCORE_UNAVAILABLE, FewSamplesWarning, FIDStatistics, frechet_distance, precision_recall,
    spatial_frechet_distance,
)

METRICS = ("fid", "sfid", "pr", "is")
REPORTED_WARNINGS = (FewSamplesWarning, ImageSizeWarning)   # kept in the report and printed by the CLI


class Extractor:
    """Loads the network on first use; returns cached features when the cache has them."""

    def __init__(self, inception: str | None = None, device: str | None = None, batch_size: int = 50,
                 cache_dir: str | None = None, use_cache: bool = True, workers: int = 4, progress: bool = True):
        from ..loading import resolve_device

        resolve_device(device)   # a device this machine lacks fails here, before any input is read
        self.inception, self.device, self.batch_size = inception, device, batch_size
        self.cache = FeatureCache(cache_dir) if use_cache else None
        self.workers, self.progress = workers, progress
        self._network = None

    @property
    def network(self):
        if self._network is None:
            from .inception import InceptionNetwork

            self._network = InceptionNetwork(self.inception, device=self.device)
        return self._network

    def features(self, source: EvalInput) -> dict[str, np.ndarray]:
        from .inception import extract_features

        images = source.images
        key = self.cache.key(images, self.network.id) if self.cache is not None else None
        if key is not None and (hit := self.cache.load(key)) is not None:
            return hit
        feats = extract_features(self.network, images.batches(self.batch_size, self.workers), total=len(images),
                                 progress=self.progress, desc=f"features {source.path.name}")
        if key is not None:
            self.cache.save(key, feats)
        return feats

    def statistics(self, source: EvalInput, need_pool: bool = False) -> FIDStatistics:
        """Statistics of one input: the stored ones if the file carries them, else from its images.

        With `need_pool`, pool features are attached (from the file, or extracted from its images)."""
        stats = source.stats
        if stats is None or (need_pool and stats.pool is None and source.images is not None):
            feats = self.features(source)
            if stats is None:
                stats = FIDStatistics.from_features(feats, network=self.network.id, keep_pool=need_pool)
            else:
                stats.pool = feats["pool"]
        return stats


def warn_about_sizes(a: EvalInput, b: EvalInput) -> None:
    """An `ImageSizeWarning` naming the sizes when an input mixes image sizes, or the samples and
    the reference images differ in size (FID would then also measure the resizing)."""
    sizes = {}
    for name, source in (("samples", a), ("reference", b)):
        if source.images is not None:
            sizes[name] = source.images.sizes()
            if len(sizes[name]) > 1:
                warnings.warn(f"{name} {source.path} mix image sizes: {describe_sizes(sizes[name])}; each is "
                              "resized to 299 x 299 on its own, so the score compares unlike images",
                              ImageSizeWarning, stacklevel=3)
    if len(sizes) == 2 and len(sizes["samples"]) == len(sizes["reference"]) == 1 and \
            sizes["samples"].keys() != sizes["reference"].keys():
        (hs, ws), = sizes["samples"]
        (hr, wr), = sizes["reference"]
        warnings.warn(f"the samples are {hs} x {ws} images but the reference images are {hr} x {wr}; the score "
                      "then also measures the resizing: compare images of one resolution", ImageSizeWarning,
                      stacklevel=3)


def _describe(source: EvalInput, stats: FIDStatistics) -> dict:
    return {
        "path": str(source.path),
        "kind": "statistics" if source.stats is not None else ("folder" if source.path.is_dir() else "npz images"),
        "num_images": stats.num_samples if stats.num_samples is not None else (len(source.images) if source.images else None),
        "network": stats.network,
    }


def evaluate(samples: str | Path, reference: str | Path, metrics=("fid", "sfid", "pr", "is"),
             extractor: Extractor | None = None, save_stats: str | Path | None = None) -> dict:
    """Score SAMPLES against REFERENCE; returns the report (JSON-serialisable dict)."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(sorted(unknown))}; choose from {', '.join(METRICS)}")
    extractor = extractor or Extractor()
    start = time.perf_counter()
    a, b = EvalInput(samples), EvalInput(reference)
    want_pr = "pr" in metrics
    pr_possible = all(s.images is not None or (s.stats is not None and s.stats.pool is not None) for s in (a, b))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_about_sizes(a, b)
        sa = extractor.statistics(a, need_pool=want_pr and pr_possible)
        sb = extractor.statistics(b, need_pool=want_pr and pr_possible)
        if save_stats is not None:
            sa.save(save_stats)
        report: dict = {"fid": None, "sfid": None, "precision": None, "recall": None, "inception_score": None}
        unavailable: dict[str, str] = {}
        if "fid" in metrics:
            report["fid"] = frechet_distance(sa, sb)
        if "sfid" in metrics:
            report["sfid"] = spatial_frechet_distance(sa, sb)
            if report["sfid"] is None:
                unavailable["sfid"] = ("not available: an input's statistics lack mu_s/sigma_s, or the network "
                                       "file has no mixed_6/conv layer")
        if want_pr:
            if pr_possible:
                from ..loading import resolve_device

                report["precision"], report["recall"] = precision_recall(
                    sb.pool, sa.pool, device=resolve_device(extractor.device))
            else:
                unavailable["precision"] = unavailable["recall"] = (
                    "not available: needs the Inception features (or images) of both sides, and an input "
                    "holds only mu/sigma")
        if "is" in metrics:
            unavailable["inception_score"] = INCEPTION_SCORE_UNAVAILABLE
    report.update(
        unavailable=unavailable,
        samples=_describe(a, sa), reference=_describe(b, sb),
        network={"path": str(extractor._network.path) if extractor._network else None,
                 "sha1": extractor._network.sha1 if extractor._network else None},
        protocol="ADM evaluator: TF 2015 Inception pool_3 / mixed_6/conv[:7], TF1 bilinear resize to 299, "
                 "(x-128)/128; Frechet distance via eigh in float64; PR k=3",
        warnings=[str(w.message) for w in caught if issubclass(w.category, REPORTED_WARNINGS)],
        seconds=round(time.perf_counter() - start, 3),
    )
    for w in caught:
        if issubclass(w.category, REPORTED_WARNINGS):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return report


def summary_line(report: dict) -> str:
    parts = []
    for key, label, fmt in (("fid", "FID", "{:.4f}"), ("sfid", "sFID", "{:.4f}"), ("precision", "precision", "{:.4f}"),
                            ("recall", "recall", "{:.4f}"), ("inception_score", "IS", "{:.3f}")):
        if report.get(key) is not None:
            parts.append(f"{label} {fmt.format(report[key])}")
        elif key in report.get("unavailable", {}):
            parts.append(f"{label} n/a")
    n_a, n_b = report["samples"]["num_images"], report["reference"]["num_images"]
    return f"{'  '.join(parts)}  ({n_a if n_a is not None else '?'} samples vs {n_b if n_b is not None else '?'} reference)"
