"""Atomic file writes: a result file is either absent, the old one, or complete; never half-written.

Each write goes to a temporary file beside the target and is renamed over it with `os.replace`.
The temporary file gets the mode an ordinary `open(path, "w")` would (0666 minus the umask), not
`mkstemp`'s private 0600, so results are as readable as any other file the user writes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_path(path: Path) -> Path:
    """A new empty file next to `path` (same folder, so `os.replace` is atomic), mode 0666 & ~umask."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def atomic_savez(path: str | os.PathLike, **arrays) -> None:
    """`np.savez(path, **arrays)` through a temporary file and `os.replace`: never a half-written file."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`Path(path).write_text(text)` through a temporary file and `os.replace`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
