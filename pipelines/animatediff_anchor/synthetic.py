"""A synthetic video set made in code: one shape per clip (its identity: kind, colour, background) that
moves, turns and changes size over the frames. The offline data of the anchor-frame trainer's tests
and benchmark.

    write_synthetic_videos("videos/", count=12, frames=16, size=64, seed=0)   # frame folders + .txt captions
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

SHAPES = ("square", "triangle", "diamond", "star", "cross", "hexagon")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 70, 230), "yellow": (235, 210, 40),
           "purple": (150, 60, 200), "white": (240, 240, 240)}


def _outline(shape: str) -> list[tuple[float, float]]:
    """The shape's polygon around the origin, radius about 1."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "cross":
        a, b = 0.3, 1.0
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    corners = {"triangle": 3, "diamond": 4, "hexagon": 6, "star": 10}[shape]
    radius = [1.0, 0.45] if shape == "star" else [1.0]
    return [(radius[i % len(radius)] * math.cos(2 * math.pi * i / corners - math.pi / 2),
             radius[i % len(radius)] * math.sin(2 * math.pi * i / corners - math.pi / 2)) for i in range(corners)]


def synthetic_video(index: int, frames: int = 16, size: int = 64, seed: int = 0) -> tuple[np.ndarray, str]:
    """Clip `index`: frames (frames, size, size, 3) uint8 and its caption. The identity (shape, colour,
    background) is fixed per clip; position, angle and scale change smoothly over the frames."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    shape = SHAPES[index % len(SHAPES)]
    colour_name = list(COLOURS)[(index // len(SHAPES) + index) % len(COLOURS)]
    background = tuple(int(c) for c in rng.integers(0, 90, 3))
    start, velocity = rng.uniform(0.35, 0.65, 2), rng.uniform(-0.25, 0.25, 2)
    angle, spin = rng.uniform(0, 2 * math.pi), rng.uniform(-math.pi / 2, math.pi / 2)
    scale, growth = rng.uniform(0.16, 0.22), rng.uniform(-0.3, 0.3)
    outline = _outline(shape)
    video = []
    for f in range(frames):
        s = f / max(frames - 1, 1)
        cx, cy = (start + velocity * s) * size
        theta, radius = angle + spin * s, scale * (1 + growth * s) * size
        points = [(cx + radius * (x * math.cos(theta) - y * math.sin(theta)),
                   cy + radius * (x * math.sin(theta) + y * math.cos(theta))) for x, y in outline]
        image = Image.new("RGB", (size, size), background)
        ImageDraw.Draw(image).polygon(points, fill=COLOURS[colour_name])
        video.append(np.asarray(image))
    return np.stack(video), f"a {colour_name} {shape}"


def write_synthetic_videos(folder: str | os.PathLike, count: int = 12, frames: int = 16, size: int = 64,
                           seed: int = 0) -> list[Path]:
    """`count` synthetic clips as folders of PNG frames (`clip-000/0000.png`, ...) with `clip-000.txt`
    captions beside them (frame folders, not GIFs: a GIF writer merges identical consecutive frames)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        video, caption = synthetic_video(i, frames, size, seed)
        path = folder / f"clip-{i:03d}"
        path.mkdir(exist_ok=True)
        for f, frame in enumerate(video):
            Image.fromarray(frame).save(path / f"{f:04d}.png")
        path.with_name(path.name + ".txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths
