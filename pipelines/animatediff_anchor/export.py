"""Writing videos: frames (PIL images, or arrays / tensors in [0, 1]) to .gif or .mp4."""

from __future__ import annotations

from pathlib import Path

import torch


def to_pil(frames) -> list:
    """Frames -> RGB (or grey) PIL images; arrays / tensors (H, W, C) or (C, H, W) in [0, 1], or uint8."""
    import numpy as np
    from PIL import Image

    images = []
    for frame in frames:
        if isinstance(frame, Image.Image):
            images.append(frame.convert("RGB"))
            continue
        array = frame.detach().cpu().float().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        images.append(Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array))
    return images


def save_video(frames, path: str | Path, fps: int = 8) -> Path:
    """Write frames (PIL images, or arrays / tensors in [0, 1]) to a .gif (PIL) or .mp4 file.

    MP4 goes through diffusers' `export_to_video`, which needs `imageio` + `imageio-ffmpeg` (or, as its
    legacy fallback, `opencv-python`)."""
    path = Path(path)
    images = to_pil(frames)
    if not images:
        raise ValueError("no frames to write")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    elif suffix == ".mp4":
        import importlib.util

        if importlib.util.find_spec("imageio") is None and importlib.util.find_spec("cv2") is None:
            raise ImportError("writing MP4 needs `pip install imageio imageio-ffmpeg` (or opencv-python); "
                              "GIF needs nothing more")
        from diffusers.utils import export_to_video

        export_to_video(images, str(path), fps=fps)
    else:
        raise ValueError(f"unknown video format {path.suffix!r}; use .gif or .mp4")
    return path
