"""Inputs and outputs of the evaluator: image sets, statistics files, the images npz writer, the feature cache.

An input path is one of
    - an `.npz` of images: `arr_0`, uint8 (N, H, W, 3) (the ADM sample format), read memory-mapped
      when stored uncompressed, so 50,000 images never sit in memory at once;
    - an `.npz` of statistics: `mu`, `sigma` (+ `mu_s`, `sigma_s`), e.g. the ADM reference batches
      (which also carry `arr_0`, used only when features are needed, e.g. precision/recall);
    - a folder of images (png/jpg/jpeg/bmp/webp/tif, searched recursively, sorted by path).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..files import IMAGE_SUFFIXES, atomic_path, atomic_savez, atomic_write_text, image_files
from .metrics import FIDStatistics

class ImageSizeWarning(UserWarning):
    """Images of different sizes compared by FID (within one input, or samples against the reference)."""


def describe_sizes(sizes: dict[tuple[int, int], int]) -> str:
    """{(H, W): n} -> "28 x 28 (10 images), 32 x 32 (3 images)"."""
    return ", ".join(f"{h} x {w} ({n} image{'s' if n != 1 else ''})" for (h, w), n in sorted(sizes.items()))


def write_images_npz(path: str | os.PathLike, chunks, shape: tuple[int, int, int, int], extra=None) -> None:
    """Stream uint8 chunks (n_i, H, W, 3) into an ADM `.npz` (`arr_0`, uint8 `shape`), atomically.

    Same layout as `np.savez(path, arr_0=np.concatenate(chunks), **extra)` (stored, not compressed),
    without holding all images in memory. `extra`: {name: callable returning an array}, called after
    the chunks are consumed (e.g. the labels gathered along the way).
    """
    written = 0
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": tuple(int(s) for s in shape)}
                np.lib.format.write_array_header_1_0(f, header)
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
                    if chunk.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"chunk of shape {chunk.shape} does not fit images of shape {shape[1:]}")
                    f.write(chunk.tobytes())
                    written += len(chunk)
            if written != shape[0]:
                raise ValueError(f"expected {shape[0]} images, got {written}")
            for name, make in (extra or {}).items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(make()), allow_pickle=False)


# ----------------------------------------------------------------------------------------------
# Reading npz members without loading them


def npz_keys(path: str | os.PathLike) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def npz_array(path: str | os.PathLike, key: str) -> np.ndarray:
    """`np.load(path)[key]`, memory-mapped (read-only) when the member is stored uncompressed."""
    name = key + ".npy"
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
        stored = info.compress_type == zipfile.ZIP_STORED
    if stored:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise OSError(f"{path}: corrupt zip entry {name}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is not None:
                shape, fortran, dtype = read_header(f)
                if not dtype.hasobject:
                    return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                     order="F" if fortran else "C")
    with np.load(path, allow_pickle=False) as data:
        return data[key]


# ----------------------------------------------------------------------------------------------
# Image sets


def _load_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


class ImageSet:
    """N images from an `.npz` (`arr_0`) or a folder; `batches(b)` yields uint8 (b, H, W, 3) arrays.

    Folder images of different sizes are each resized to 299 x 299 (TF1 bilinear, the same operation
    the network input gets) and yielded as float32 0..255 arrays.
    """

    def __init__(self, path: str | os.PathLike, key: str = "arr_0"):
        self.path = Path(path)
        self.files: list[Path] | None = None
        self.array: np.ndarray | None = None
        self._sizes: dict[tuple[int, int], int] | None = None
        if self.path.is_dir():
            self.files = image_files(self.path, recursive=True)
            if not self.files:
                raise ValueError(f"{self.path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        else:
            self.array = npz_array(self.path, key)
            if self.array.ndim != 4 or self.array.shape[-1] != 3 or self.array.dtype != np.uint8:
                raise ValueError(f"{self.path}: '{key}' must be uint8 (N, H, W, 3) images, "
                                 f"got {self.array.dtype} {self.array.shape}")
            if len(self.array) == 0:
                raise ValueError(f"{self.path}: '{key}' holds no images")

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.array)

    def sizes(self) -> dict[tuple[int, int], int]:
        """(height, width) -> number of images (a folder's read from the file headers, once)."""
        if self._sizes is None:
            if self.array is not None:
                self._sizes = {tuple(int(x) for x in self.array.shape[1:3]): len(self.array)}
            else:
                from collections import Counter

                from PIL import Image

                counts: Counter = Counter()
                for path in self.files:
                    with Image.open(path) as image:
                        counts[(image.height, image.width)] += 1
                self._sizes = dict(counts)
        return self._sizes

    def batches(self, batch_size: int, workers: int = 4):
        if self.array is not None:
            for i in range(0, len(self.array), batch_size):
                yield np.array(self.array[i:i + batch_size])  # a writable copy
            return
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for i in range(0, len(self.files), batch_size):
                images = list(pool.map(_load_image, [str(p) for p in self.files[i:i + batch_size]]))
                if len({im.shape for im in images}) == 1:
                    yield np.stack(images)
                else:
                    yield _resize_each(images)

    def content_key(self, index_dir: Path | None = None) -> str:
        """SHA-256 of the content (image bytes, and names for folders); memoised on size/mtime in `index_dir`."""
        if self.files is not None:
            stamps = [(str(p.relative_to(self.path)), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]
        else:
            st = self.path.stat()
            stamps = [("", st.st_size, st.st_mtime_ns)]
        stamp = hashlib.sha256(json.dumps([str(self.path.resolve()), stamps]).encode()).hexdigest()
        memo = index_dir / f"content-{stamp[:40]}.txt" if index_dir is not None else None
        if memo is not None and memo.is_file():
            return memo.read_text().strip()
        digest = hashlib.sha256()
        for name, path in ([(n, self.path / n) for n, _, _ in stamps] if self.files is not None else [("", self.path)]):
            digest.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
        key = digest.hexdigest()
        if memo is not None:
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo, key)
        return key


def _resize_each(images: list[np.ndarray]) -> np.ndarray:
    import torch

    from .inception import tf1_resize_bilinear

    out = [tf1_resize_bilinear(torch.from_numpy(im).permute(2, 0, 1)[None].float())[0].permute(1, 2, 0) for im in images]
    return torch.stack(out).numpy()


class EvalInput:
    """One side of a comparison: `stats` (FIDStatistics) when the file carries them, `images` when it has images."""

    def __init__(self, path: str | os.PathLike):

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file or folder")
        self.stats = None
        self.images = None
        if self.path.is_dir():
            self.images = ImageSet(self.path)
            return
        try:
            keys = npz_keys(self.path)
        except zipfile.BadZipFile as err:
            raise ValueError(f"{self.path}: not an .npz file (nor a folder of images)") from err
        if "mu" in keys and "sigma" in keys:
            with np.load(self.path, allow_pickle=False) as data:
                self.stats = FIDStatistics.from_npz({k: data[k] for k in data.files if k != "arr_0"})
        if "arr_0" in keys:
            self.images = ImageSet(self.path)
        if self.stats is None and self.images is None:
            raise ValueError(f"{self.path}: an .npz needs 'arr_0' (uint8 images) or 'mu' and 'sigma' "
                             f"(statistics); it has {', '.join(keys) or 'nothing'}")


# ----------------------------------------------------------------------------------------------
# Feature cache


def default_cache_dir() -> Path:
    root = os.environ.get("DIFFUSERS_EXT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffusers_ext")
    return Path(root) / "fid"


class FeatureCache:
    """Inception features on disk, keyed by (input content, network and preprocessing)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.dir = Path(directory) if directory is not None else default_cache_dir()

    def key(self, images: ImageSet, network_id: str) -> str:
        content = images.content_key(self.dir / "index")
        return hashlib.sha256(f"{content}|{network_id}|n={len(images)}".encode()).hexdigest()

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.dir / f"features-{key[:40]}.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def save(self, key: str, features: dict[str, np.ndarray]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_savez(self.dir / f"features-{key[:40]}.npz", **features)
