"""The glyphs data set: digits and capital letters rendered from the fonts Debian packages.

Classes: "0".."9" then "A".."Z" (36). Digits and capitals because every text font has all of them,
their shapes differ between designs (serif, sans, mono, geometric, script, light to bold), and they
have no ascenders / descenders to align; lower case would add 26 classes that mostly repeat the
capitals' shapes at another size. Some pairs are genuinely close in some fonts (O / 0, I / 1): that
bounds the classifier, not the generator.

Fonts: the .ttf / .otf files of `FONT_DIRS` (the packages `setup.sh` installs), sorted by path. A font
is used only if it has every class's glyph: a glyph is missing when its rendering is empty or equals
the font's rendering of a code point no font has (U+10FFFD, so the .notdef box). The URW symbol
fonts, whose Unicode tables map the letters to symbols, are excluded by name (`SYMBOL_FAMILIES`), and
a font whose 36 images equal an already kept font's exactly (the same outlines packaged twice) is
dropped. One image per font file and class, so stroke weight and width vary through the fonts'
variants (ExtraLight .. Bold, Condensed, Narrow).

Rendering: one scale per font (its tallest glyph 24 px, its widest 28 px at the 32 x 32 output), each
glyph rendered 8x larger, centred by its ink box on a 256 x 256 canvas and area-averaged (8 x 8 boxes)
to 32 x 32: never upscaled. Grey levels in [-1, 1], ink = +1, background = -1.

Split: by design group (`DESIGN_GROUPS` joins families that share outlines, e.g. FreeSans is derived
from Nimbus Sans), the groups of `HELD_OUT` are the test set, so held-out accuracy measures
generalisation to unseen type designs. Augmentation (random affine maps, `digits.augment`) is
applied at training time with a seeded generator.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..digits import augment

CLASSES = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
NUM_CLASSES = len(CLASSES)
RESOLUTION = 32
OVERSAMPLE = 8                 # rendered at 8x, area-averaged down
GLYPH_BOX = (24, 28)           # (height, width) in output pixels the font's largest glyph fits
AUGMENT_STRENGTH = 0.75        # digits.augment at 3/4: rotation <= 9 degrees, scale 0.925-1.075, shift <= 3 px
FONT_DIRS = (                  # Debian: fonts-dejavu-core/-extra, fonts-liberation(2), fonts-freefont-ttf,
    "/usr/share/fonts/truetype/dejavu",          # fonts-noto-core, fonts-urw-base35
    "/usr/share/fonts/truetype/liberation",
    "/usr/share/fonts/truetype/liberation2",
    "/usr/share/fonts/truetype/freefont",
    "/usr/share/fonts/truetype/noto",
    "/usr/share/fonts/opentype/urw-base35",
)
MISSING_PROBE = "\U0010FFFD"   # a private-use code point no font maps: renders the .notdef glyph
SYMBOL_FAMILIES = ("D050000L", "Standard Symbols PS")   # Dingbats / Symbol: letters mapped to symbols
DESIGN_GROUPS = {              # family -> the design it shares outlines with (same side of the split)
    "FreeSans": "Nimbus Sans", "Nimbus Sans Narrow": "Nimbus Sans",
    "FreeSerif": "Nimbus Roman", "FreeMono": "Nimbus Mono PS",
    "Liberation Sans Narrow": "Liberation Sans",
    "Noto Sans Display": "Noto Sans", "Noto Sans Math": "Noto Sans", "Noto Sans Symbols": "Noto Sans",
    "Noto Traditional Nushu": "Noto Sans", "Noto Serif Display": "Noto Serif",
    "DejaVu Math TeX Gyre": "DejaVu Serif",
}
# the test designs: a mono, an old-style serif, a geometric sans, a slab-ish serif
HELD_OUT = ("Liberation Mono", "P052", "URW Gothic", "DejaVu Serif")


@dataclass(frozen=True)
class Font:
    path: str
    family: str
    style: str

    @property
    def group(self) -> str:
        return DESIGN_GROUPS.get(self.family, self.family)


@dataclass
class Glyphs:
    """images (N, 1, 32, 32) float32 in [-1, 1]; labels (N,) int64 class ids; font (N,) index into `fonts`;
    held_out (N,) bool (the test fonts); skipped: [(path, reason)] of the fonts not used."""

    images: torch.Tensor
    labels: torch.Tensor
    font: torch.Tensor
    held_out: torch.Tensor
    fonts: list[Font]
    skipped: list[tuple[str, str]]

    def split(self, held_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the training (False) or held-out (True) fonts."""
        keep = self.held_out == held_out
        return self.images[keep], self.labels[keep]

    def fingerprint(self) -> str:
        """sha256 of the images' bytes and labels: equal data sets have equal fingerprints."""
        digest = hashlib.sha256(self.images.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()

    def stats(self) -> dict:
        train = ~self.held_out
        return dict(classes=NUM_CLASSES, fonts=len(self.fonts), images=len(self.labels),
                    train_fonts=len({int(f) for f in self.font[train]}), train_images=int(train.sum()),
                    held_out_fonts=len({int(f) for f in self.font[self.held_out]}),
                    held_out_images=int(self.held_out.sum()),
                    groups=len({f.group for f in self.fonts}), held_out_groups=list(HELD_OUT),
                    skipped=len(self.skipped))


def font_files(dirs=FONT_DIRS) -> list[str]:
    """The .ttf / .otf files directly in `dirs` (those that exist), sorted by path."""
    files = [p for d in map(Path, dirs) if d.is_dir() for p in d.iterdir() if p.suffix.lower() in (".ttf", ".otf")]
    return sorted(str(p) for p in files)


def _ink(font, text: str) -> np.ndarray:
    """The glyph's ink as uint8 (h, w), cropped to its bounding box ((0, 0) when it has none)."""
    mask = font.getmask(text, mode="L")
    ink = np.asarray(mask, dtype=np.uint8).reshape(mask.size[1], mask.size[0])
    rows, cols = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    if len(rows) == 0:
        return np.zeros((0, 0), np.uint8)
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def missing_glyph(path: str, classes=CLASSES, size: int = 64) -> str | None:
    """The first class whose glyph `path` lacks (empty, or rendered as the font's .notdef), or None."""
    from PIL import ImageFont

    font = ImageFont.truetype(path, size)
    notdef = _ink(font, MISSING_PROBE)
    for c in classes:
        ink = _ink(font, c)
        if ink.size == 0 or (ink.shape == notdef.shape and np.array_equal(ink, notdef)):
            return c
    return None


def render_font(path: str, classes=CLASSES, resolution: int = RESOLUTION) -> np.ndarray:
    """uint8 (len(classes), R, R) grey images of one font (ink 255), one scale for all its glyphs."""
    from PIL import Image, ImageFont

    probe_size = 256
    probe = ImageFont.truetype(path, probe_size)
    boxes = [_ink(probe, c).shape for c in classes]
    scale = resolution / 32 * min(GLYPH_BOX[0] / max(h for h, _ in boxes), GLYPH_BOX[1] / max(w for _, w in boxes))
    font = ImageFont.truetype(path, max(1, round(probe_size * scale * OVERSAMPLE)))
    side = resolution * OVERSAMPLE
    out = np.zeros((len(classes), resolution, resolution), np.uint8)
    for i, c in enumerate(classes):
        ink = _ink(font, c)[:side, :side]
        canvas = np.zeros((side, side), np.uint8)
        top, left = (side - ink.shape[0]) // 2, (side - ink.shape[1]) // 2
        canvas[top:top + ink.shape[0], left:left + ink.shape[1]] = ink
        out[i] = np.asarray(Image.fromarray(canvas).reduce(OVERSAMPLE))   # box filter: area average
    return out


def _identity(path: str) -> Font:
    from PIL import ImageFont

    family, style = ImageFont.truetype(path, 16).getname()
    return Font(path, family or Path(path).stem, style or "")


def load_glyphs(paths: list[str] | None = None, resolution: int = RESOLUTION) -> Glyphs:
    """Render every usable font of `paths` (default: `font_files()`) x class; see the module doc."""
    paths = font_files() if paths is None else sorted(paths)
    fonts, skipped, rendered, seen = [], [], [], set()
    for path in paths:
        font = _identity(path)
        if font.family in SYMBOL_FAMILIES:
            skipped.append((path, "symbol font"))
            continue
        missing = missing_glyph(path)
        if missing is not None:
            skipped.append((path, f"lacks {missing!r}"))
            continue
        images = render_font(path, resolution=resolution)
        key = images.tobytes()
        if key in seen:
            skipped.append((path, "duplicate of an earlier font"))
            continue
        seen.add(key)
        fonts.append(font)
        rendered.append(images)
    if not fonts:
        raise FileNotFoundError(f"no usable fonts in {list(FONT_DIRS) if paths is None else 'the given paths'}; "
                                "run `bash setup.sh` (installs Debian's font packages)")
    grey = torch.from_numpy(np.stack(rendered)).float().div(255.0)          # (F, K, R, R)
    n_fonts = len(fonts)
    font_index = torch.arange(n_fonts).repeat_interleave(NUM_CLASSES)
    return Glyphs(images=(grey.reshape(-1, 1, resolution, resolution) * 2 - 1),
                  labels=torch.arange(NUM_CLASSES).repeat(n_fonts), font=font_index,
                  held_out=torch.tensor([fonts[i].group in HELD_OUT for i in font_index.tolist()]),
                  fonts=fonts, skipped=skipped)


def batch_at(images: torch.Tensor, labels: torch.Tensor, batch_size: int, step: int, seed: int,
             strength: float = AUGMENT_STRENGTH) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """The augmented batch of optimizer step `step`, a function of (seed, step) only (so training resumes
    exactly): epoch e = step // (N // batch) visits a permutation seeded by (seed, e). Returns
    (images (B, 1, R, R), labels (B,), the step's generator, for the step's other random draws)."""
    per_epoch = len(images) // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch size {batch_size} exceeds the {len(images)} training images")
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    index = order[position * batch_size:(position + 1) * batch_size]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * step + 1)
    return augment(images[index], generator, strength), labels[index], generator
