"""Speed of the FID pieces on this machine: Inception feature extraction (images/s) and the Frechet
distance on 2048-d statistics (ours vs the classic scipy.linalg.sqrtm form).

    .venv/bin/python benchmarks/fid_speed.py --out benchmarks/results/fid_speed.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_ext.eval.inception import InceptionNetwork  # noqa: E402
from diffusers_ext.eval.metrics import FIDStatistics, compute_statistics, frechet_distance  # noqa: E402


def sqrtm_fid(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid / ADM form: scipy.linalg.sqrtm of sigma1 . sigma2, real part."""
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t)
    return min(times), value


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="8,32")
    p.add_argument("--images", type=int, default=64, help="images per throughput measurement")
    p.add_argument("--size", type=int, default=256, help="input side (resized to 299 like ADM)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    lines = ["# FID speed", "",
             f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads), numpy {np.__version__}, scipy {scipy.__version__}. "
             f"Load average at start: {os.getloadavg()[0]:.1f} (a shared machine: other jobs ran at the same time, "
             "so the numbers are pessimistic).", ""]

    net = InceptionNetwork(device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    lines += [f"## Inception features ({args.size} x {args.size} uint8 input, TF1 resize to 299, pool + spatial)", "",
              "| batch | images/s |", "|---|---|"]
    net(torch.from_numpy(images[:2]))  # warm-up
    for b in (int(x) for x in args.batches.split(",")):
        def run():
            for i in range(0, len(images), b):
                net(torch.from_numpy(images[i:i + b]))
        seconds, _ = best_of(run, 1)
        lines.append(f"| {b} | {len(images) / seconds:.1f} |")
        print(lines[-1], flush=True)

    rng = np.random.default_rng(1)
    mix = rng.standard_normal((2048, 2048)) / np.sqrt(2048)
    feats = [np.abs(rng.standard_normal((4096, 2048)) @ mix + shift) for shift in (0.0, 0.2)]
    (mu1, s1), (mu2, s2) = (compute_statistics(f) for f in feats)
    a, b = FIDStatistics(mu1, s1, num_samples=4096), FIDStatistics(mu2, s2, num_samples=4096)
    t_ours, v_ours = best_of(lambda: frechet_distance(a, b), args.repeats)
    t_ref, v_ref = best_of(lambda: sqrtm_fid(mu1, s1, mu2, s2), 1)
    small = [FIDStatistics(*compute_statistics(f[:1000]), num_samples=1000) for f in feats]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_small, v_small = best_of(lambda: frechet_distance(*small), args.repeats)
    t_small_ref, v_small_ref = best_of(lambda: sqrtm_fid(small[0].mu, small[0].sigma, small[1].mu, small[1].sigma), 1)
    lines += ["", "## Frechet distance on 2048-d statistics", "",
              "| statistics | diffusers-ext | scipy.linalg.sqrtm form | speed-up | relative difference |",
              "|---|---|---|---|---|",
              f"| 4096 samples (full rank) | {t_ours:.2f} s | {t_ref:.2f} s | {t_ref / t_ours:.1f}x | "
              f"{abs(v_ours - v_ref) / v_ref:.1e} |",
              f"| 1000 samples (singular) | {t_small:.2f} s | {t_small_ref:.2f} s | {t_small_ref / t_small:.1f}x | "
              f"{abs(v_small - v_small_ref) / v_small_ref:.1e} |",
              "", "diffusers-ext: Cholesky (pivoted Cholesky when singular) + one `eigvalsh`, float64; "
              "FID values here are ~" f"{v_ours:.1f} and ~{v_small:.1f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
