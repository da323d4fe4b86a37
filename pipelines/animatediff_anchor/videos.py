"""Training clips from a user's videos: read, cut into clips, resize + centre-crop, encode with the VAE.

A video is a `.gif` (PIL), an `.mp4` / `.webm` (OpenCV: `pip install opencv-python`), or a folder of
frames (images, `files.IMAGE_SUFFIXES`, in name order). `VIDEOS` is one video or a folder of them.
Each video is cut into non-overlapping clips of `frames` frames taken every `stride`-th frame (a clip
spans (frames - 1) * stride + 1 source frames; a remainder too short for a clip is dropped); every
frame is resized to cover `height` x `width` and centre-cropped. Captions: a sidecar `<name>.txt`
beside the video, else `prompt`. The clips' VAE latents are cached on disk, one safetensors file per
video, keyed by the file, the clip settings and the VAE's weights.

Bad input is a one-line ValueError naming the file: unreadable, too short for one clip, frames of
different sizes within one video, an unsupported file, no caption.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusers_ext.files import IMAGE_SUFFIXES, image_files, save_safetensors

VIDEO_SUFFIXES = (".gif", ".mp4", ".webm")
CAPTION_SUFFIX = ".txt"
ALLOWED = f"videos (.gif, .mp4, .webm), folders of frames ({', '.join(IMAGE_SUFFIXES)}) and .txt captions"


@dataclass
class VideoClips:
    """Clips as VAE latents (N, C, frames, h, w) (scaled as the UNet expects, on the CPU), the caption of
    each clip and where it came from ((video, first source frame))."""

    latents: torch.Tensor
    captions: list[str]
    sources: list[tuple[str, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.latents.shape[0]


def list_videos(root: str | os.PathLike) -> list[Path]:
    """The videos under `root` (itself, if it is one video file), sorted by name."""
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"{root} is not a video: give {ALLOWED}")
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"no video or folder of videos at {root}")
    if image_files(root):
        return [root]  # the folder itself is one video's frames
    videos = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES:
            videos.append(path)
        elif path.suffix.lower() != CAPTION_SUFFIX:
            raise ValueError(f"unsupported file {path}: the folder may hold {ALLOWED}")
    if not videos:
        raise ValueError(f"no videos in {root}: it may hold {ALLOWED}")
    return videos


def clip_span(frames: int, stride: int) -> int:
    """Source frames one clip spans."""
    return (frames - 1) * stride + 1


def _iter_frames(path: Path):
    """The video's frames as RGB PIL images, in order (streamed: a long video is never held whole)."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    if path.is_dir():
        files = image_files(path)
        if not files:
            raise ValueError(f"folder {path} has no frames ({', '.join(IMAGE_SUFFIXES)})")
        for file in files:
            try:
                with Image.open(file) as image:
                    yield image.convert("RGB")
            except (UnidentifiedImageError, OSError) as err:
                raise ValueError(f"cannot read frame {file}: {err}") from None
        return
    suffix = path.suffix.lower()
    if suffix == ".gif":
        try:
            with Image.open(path) as image:
                for frame in ImageSequence.Iterator(image):
                    yield frame.convert("RGB")
        except (UnidentifiedImageError, OSError, EOFError) as err:
            raise ValueError(f"cannot read video {path}: {err}") from None
        return
    try:
        import cv2
    except ImportError:
        raise ValueError(f"reading {suffix} videos ({path}) needs OpenCV: pip install opencv-python "
                         "(GIFs and folders of frames need nothing more)") from None
    capture = cv2.VideoCapture(str(path))
    try:
        ok, array = capture.read() if capture.isOpened() else (False, None)
        if not ok:
            raise ValueError(f"cannot read video {path}: OpenCV could not decode it")
        while ok:
            yield Image.fromarray(cv2.cvtColor(array, cv2.COLOR_BGR2RGB))
            ok, array = capture.read()
    finally:
        capture.release()


def resize_crop(image, height: int, width: int):
    """A PIL image resized (bicubic) to cover height x width, then centre-cropped to it."""
    from PIL import Image

    scale = max(width / image.width, height / image.height)
    size = (max(width, math.ceil(image.width * scale)), max(height, math.ceil(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def read_clips(path: str | os.PathLike, frames: int, stride: int, height: int, width: int) -> torch.Tensor:
    """Pixels of every clip of one video, (clips, frames, 3, height, width) in [-1, 1]."""
    path = Path(path)
    span = clip_span(frames, stride)
    clips, current, size, count = [], [], None, 0
    for index, image in enumerate(_iter_frames(path)):
        count = index + 1
        if size is None:
            size = image.size
        elif image.size != size:
            raise ValueError(f"frames of {path} have different sizes ({size[0]}x{size[1]} and "
                             f"{image.size[0]}x{image.size[1]} at frame {index}): one video needs one size")
        offset = index % span
        if offset % stride:
            continue
        pixels = torch.frombuffer(bytearray(resize_crop(image, height, width).tobytes()), dtype=torch.uint8)
        current.append(pixels.view(height, width, 3).permute(2, 0, 1))
        if len(current) == frames:
            clips.append(torch.stack(current))
            current = []
    if not clips:
        raise ValueError(f"{path} has {count} frames; a clip of {frames} frames at stride {stride} needs {span}")
    return torch.stack(clips).float() / 127.5 - 1


def caption_of(path: Path, prompt: str | None) -> str:
    """The sidecar `<name>.txt` beside the video, else `prompt`."""
    sidecar = path.with_name(path.stem + CAPTION_SUFFIX) if path.is_file() else path.with_name(path.name + CAPTION_SUFFIX)
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8").strip()
    if prompt is None:
        raise ValueError(f"no caption for {path}: write {sidecar.name} beside it or give one prompt for all (--prompt)")
    return prompt


def check_videos(videos: str | os.PathLike, prompt: str | None = None) -> dict[Path, str]:
    """{video: caption} for every video under `videos`, before anything is read: a missing caption or
    an unsupported file fails here."""
    return {path: caption_of(path, prompt) for path in list_videos(videos)}


def vae_fingerprint(vae) -> str:
    """A hash of the VAE's config and encoder weights: cached latents are reused only for the same encoder."""
    digest = hashlib.sha1(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if not name.startswith("decoder."):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _video_stamp(path: Path) -> str:
    files = image_files(path) if path.is_dir() else [path]
    return ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


@torch.no_grad()
def encode_clips(vae, pixels: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """(clips, frames, 3, H, W) in [-1, 1] -> latents (clips, C, frames, h, w), scaled for the UNet."""
    clips, frames = pixels.shape[:2]
    flat = pixels.flatten(0, 1)
    latents = []
    for start in range(0, flat.shape[0], chunk):
        batch = flat[start:start + chunk].to(vae.device, vae.dtype)
        latents.append(vae.encode(batch).latent_dist.mode().float().cpu())
    z = torch.cat(latents) * vae.config.scaling_factor
    return z.view(clips, frames, *z.shape[1:]).transpose(1, 2).contiguous()


def load_clips(vae, videos: str | os.PathLike, *, frames: int, stride: int = 1, height: int, width: int,
               prompt: str | None = None, cache_dir: str | os.PathLike | None = None,
               main_process: bool = True) -> VideoClips:
    """Every clip of every video under `videos`, encoded with `vae` (from the cache when it is there).

    Every video's caption is checked before any video is read. With several processes
    only the main one writes the cache (the others encode for themselves; call them after it)."""
    from safetensors.torch import load_file

    if frames < 2 or stride < 1:
        raise ValueError(f"clips need frames >= 2 and stride >= 1, got {frames} and {stride}")
    captions = check_videos(videos, prompt)
    paths = list(captions)
    cache = Path(cache_dir) if cache_dir is not None else None
    fingerprint = vae_fingerprint(vae) if cache is not None else ""
    latents, clip_captions, sources = [], [], []
    for path in paths:
        file = None
        if cache is not None:
            key = hashlib.sha1(f"{_video_stamp(path)}|{frames}|{stride}|{height}x{width}|{fingerprint}".encode())
            file = cache / f"{path.stem}-{key.hexdigest()[:16]}.safetensors"
        if file is not None and file.is_file():
            z = load_file(file)["latents"]
        else:
            z = encode_clips(vae, read_clips(path, frames, stride, height, width))
            if file is not None and main_process:
                cache.mkdir(parents=True, exist_ok=True)
                save_safetensors({"latents": z}, file)
        latents.append(z)
        clip_captions += [captions[path]] * z.shape[0]
        span = clip_span(frames, stride)
        sources += [(str(path), i * span) for i in range(z.shape[0])]
    return VideoClips(torch.cat(latents), clip_captions, sources)
