"""Atomic file writes: a result file is either absent, the old one, or complete; never half-written.

Each write goes to a temporary file beside the target and is renamed over it with `os.replace`.
The temporary file gets the mode an ordinary `open(path, "w")` would (0666 minus the umask), not
`mkstemp`'s private 0600, so results are as readable as any other file the user writes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")   # what PIL reads, lower case


def image_files(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The image files of `folder` (`IMAGE_SUFFIXES`, any case), sorted by path; hidden ones (a name
    starting with ".", e.g. macOS's `._x.png` resource forks) left out; `recursive`: subfolders too."""
    folder = Path(folder)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                  and p.is_file())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Raise an `OSError` naming `path` unless a file can be written there; creates nothing.

    The check a command makes before any work: `path` is not a folder, and its folder exists and is
    writable, or the nearest existing ancestor is a writable folder (the missing ones can be made).
    """
    path = Path(path)
    if path.is_dir():
        raise OSError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise OSError(f"{what} {path} is not writable")
    check_writable_folder(path.parent, what=f"{what} {path}: its folder")
    return path


def check_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Raise an `OSError` naming `folder` unless files can be written in it (it, or the nearest
    existing ancestor that would hold it, is a writable folder); creates nothing."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OSError(f"{what} {folder} is not writable: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(f"{what} {folder} is not writable: {existing} does not allow it")
    return folder


def temp_path(path: Path) -> Path:
    """A new empty file next to `path` (same folder, so `os.replace` is atomic), mode 0666 & ~umask,
    ending in `path`'s extension (writers that read the format from the name: PIL, matplotlib).
    An `OSError` names `path`, never the temporary name."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err}") from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` (`temp_path`) to write; renamed onto `path` (`os.replace`) when
    the block ends normally, removed when it raises: `path` holds the old file or the whole new one."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_savez(path: str | os.PathLike, compress: bool = False, **arrays) -> None:
    """`np.savez(path, **arrays)` (`np.savez_compressed` with `compress`), never half-written."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`Path(path).write_bytes(data)`, never half-written."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`Path(path).write_text(text)`, never half-written."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, never half-written and with an ordinary file's mode (0666 & ~umask;
    safetensors' own writer leaves 0600). `tensors`: name -> tensor, any layout or device."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def save_pretrained(model, folder: str | os.PathLike) -> Path:
    """`model.save_pretrained(folder, safe_serialization=True)` (diffusers / transformers), the files it
    writes given an ordinary file's mode (0666 & ~umask) instead of the 0600 safetensors leaves."""
    folder = Path(folder)

    def stamps() -> dict[Path, tuple[int, int]]:
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()} \
            if folder.is_dir() else {}

    before = stamps()
    model.save_pretrained(str(folder), safe_serialization=True)
    for path, stamp in stamps().items():
        if before.get(path) != stamp:
            os.chmod(path, 0o666 & ~_umask())
    return folder
