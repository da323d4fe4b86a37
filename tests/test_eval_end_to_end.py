"""`diffusers-ext fid` end to end against an independent float64 reference written here.

Float images at 256^2 (samples, an .npz) and 512^2 (reference, a PNG folder) are quantised as the
`sample` command writes them and scored by the CLI. The test records what the Inception network is
given and what it returns (the network is the common input of both sides) and recomputes everything
else itself: the rounding to uint8, TF1's legacy bilinear resize to 299 (float64 coordinates) and the
(x - 128) / 128 scaling, the statistics, the Frechet distance (through the nuclear norm of the centred
feature cross-product, not an eigen-decomposition of the covariances) and k = 3 precision / recall by
brute force. The sets differ, so precision != recall and FID > 0: a swapped precision / recall, another
resize, truncation instead of rounding or an error in the statistics turns the test red."""

import json

import numpy as np
import pytest
from PIL import Image

import diffusers_ext.eval.inception as inception
from diffusers_ext.cli import main
from diffusers_ext.eval.data import write_images_npz
from diffusers_ext.pipeline_io import to_uint8


def _waves(rng, n, size):
    """n smooth colour images (n, size, size, 3) in [0, 1]: a sinusoid per channel along a random direction."""
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        freq, phase, angle = rng.uniform(1, 4, 3), rng.uniform(0, 2 * np.pi, 3), rng.uniform(0, np.pi)
        u = np.cos(angle) * xx + np.sin(angle) * yy
        images.append(np.stack([0.5 + 0.45 * np.sin(2 * np.pi * freq[c] * u + phase[c]) for c in range(3)], -1))
    return np.stack(images)


def _checks(rng, n, size):
    """n checkerboards with a random cell count and per-channel contrast, in [0, 1]."""
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        cells = rng.integers(4, 12)
        board = (np.floor(xx * cells) + np.floor(yy * cells)) % 2
        images.append(np.stack([board * rng.uniform(0.5, 1) + rng.uniform(0, 0.3) for _ in range(3)], -1))
    return np.clip(np.stack(images), 0, 1)


def _round(x):
    """[0, 1] -> uint8 levels, rounding half up: the nearest of the 256 levels."""
    return np.clip(np.floor(x * 255 + 0.5), 0, 255).astype(np.uint8)


def _tf1_resize(image, out=299):
    """TF1 `resize_bilinear` (align_corners=False, half_pixel_centers=False) of (H, W, C) in float64:
    output pixel i samples input coordinate i * in / out, the far neighbour clamped to the edge."""
    def axis(size):
        x = np.arange(out) * (size / out)
        lo = np.floor(x).astype(int)
        return lo, np.minimum(lo + 1, size - 1), x - lo

    (y0, y1, fy), (x0, x1, fx) = axis(image.shape[0]), axis(image.shape[1])
    image = image.astype(np.float64)
    rows = image[y0] * (1 - fy)[:, None, None] + image[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def _gaussian(features):
    x = np.asarray(features, dtype=np.float64)
    centred = x - x.sum(0) / len(x)
    return x.sum(0) / len(x), centred


def _frechet(a, b):
    """|mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr (S_a S_b)^1/2 with S = X^T X / (n - 1) for centred X:
    the eigenvalues of S_a S_b are those of (X_a X_b^T)(X_a X_b^T)^T / ((n_a - 1)(n_b - 1)), so the
    last trace is the nuclear norm of X_a X_b^T over sqrt((n_a - 1)(n_b - 1))."""
    (mu_a, xa), (mu_b, xb) = _gaussian(a), _gaussian(b)
    na, nb = len(xa) - 1, len(xb) - 1
    cross = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    return float(((mu_a - mu_b) ** 2).sum() + (xa**2).sum() / na + (xb**2).sum() / nb - 2 * cross)


def _precision_recall(ref, sam, k=3):
    """Kynkaanniemi et al.: a point is in a set's manifold when it lies within the distance from some
    member to that member's k-th nearest other member. precision: samples in the reference manifold."""
    ref, sam = np.asarray(ref, dtype=np.float64), np.asarray(sam, dtype=np.float64)

    def radius(points, i):
        return sorted(float(np.linalg.norm(points[i] - points[j])) for j in range(len(points)) if j != i)[k - 1]

    def inside(point, members):
        return any(np.linalg.norm(point - members[i]) <= radius(members, i) for i in range(len(members)))

    return (float(np.mean([inside(s, ref) for s in sam])), float(np.mean([inside(r, sam) for r in ref])))


def test_fid_command_matches_an_independent_reference(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    floats = {"samples": np.concatenate([_waves(rng, 2, 256), _checks(rng, 2, 256)]),   # differs from...
              "reference": _waves(rng, 4, 512)}                                       # ...the reference
    # values strictly between two levels somewhere, so rounding and truncation disagree
    assert all((np.floor(x * 255 + 0.5) != np.floor(x * 255)).any() for x in floats.values())
    levels = {name: to_uint8(x) for name, x in floats.items()}   # what `diffusers-ext sample` writes
    write_images_npz(tmp_path / "samples.npz", [levels["samples"]], levels["samples"].shape)
    (tmp_path / "reference").mkdir()
    for i, image in enumerate(levels["reference"]):
        Image.fromarray(image).save(tmp_path / "reference" / f"{i}.png")

    # The network is the common input: record its uint8 input, the scaled 299^2 tensor it is fed, and its features.
    seen = []
    call, preprocess = inception.InceptionNetwork.__call__, inception.preprocess
    monkeypatch.setattr(inception, "preprocess", lambda x: seen[-1].setdefault("net_input", preprocess(x)))

    def recording_call(self, images):
        record = {"images": np.array(images)}
        seen.append(record)
        out = call(self, images)
        record["features"] = {key: value.numpy().copy() for key, value in out.items()}
        return out

    monkeypatch.setattr(inception.InceptionNetwork, "__call__", recording_call)
    assert main(["fid", str(tmp_path / "samples.npz"), str(tmp_path / "reference"), "--json", str(tmp_path / "r.json"),
                 "--no-cache", "--batch-size", "8", "--workers", "1", "--no-progress", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())

    by_size = {rec["images"].shape[1]: rec for rec in seen}
    assert len(seen) == 2 and sorted(by_size) == [256, 512]
    features = {}
    for name, size in (("samples", 256), ("reference", 512)):
        rec = by_size[size]
        np.testing.assert_array_equal(rec["images"], _round(floats[name]))          # rounded, not truncated
        expected = np.stack([(_tf1_resize(image) - 128) / 128 for image in _round(floats[name])])
        np.testing.assert_allclose(rec["net_input"].permute(0, 2, 3, 1).numpy(), expected, rtol=0, atol=1e-4)
        features[name] = rec["features"]

    fid = _frechet(features["samples"]["pool"], features["reference"]["pool"])
    sfid = _frechet(features["samples"]["spatial"], features["reference"]["spatial"])
    precision, recall = _precision_recall(features["reference"]["pool"], features["samples"]["pool"])
    assert fid > 1.0 and sfid > 1.0 and precision != recall                          # the sets do differ
    assert report["fid"] == pytest.approx(fid, rel=1e-6)
    assert report["sfid"] == pytest.approx(sfid, rel=1e-6)
    assert (report["precision"], report["recall"]) == (precision, recall)
    assert any("256 x 256" in w and "512 x 512" in w for w in report["warnings"])
