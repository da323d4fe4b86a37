"""Resumable, distributed sampling of N images for FID.

Determinism: sample i depends only on (config, i). Its noise comes from its own generator,
`torch.Generator().manual_seed(sample_seed(seed, i))`: its initial latents are drawn from that
generator alone (built here and passed as `latents=` where the pipeline accepts them, else drawn by
diffusers' `randn_tensor` from the per-sample generator list, which is the same thing), and any
stochastic scheduler step draws from it too. Its condition is a class label (uniform: from its own
PCG64 stream keyed by (seed, i); balanced: i mod K) or prompts[i mod len(prompts)]. So the images do
not depend on the batch size, the number of processes or the order of work.

Work is cut into rank-independent chunks of `shard_size` consecutive indices. Each finished chunk
is written atomically to `OUTPUT/shards/chunk_XXXXXX.npz`; on start, the chunks without a shard are
split across processes (`PartialState().split_between_processes`), so a killed run restarts where
it stopped, with any process count. When all chunks exist, the main process merges them into
`OUTPUT/samples.npz` (ADM format: `arr_0` uint8 (N, H, W, 3), plus `arr_1` labels for class-
conditional pipelines, like guided-diffusion) and/or `OUTPUT/png/000000.png ...`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..pipeline_io import call_parameters, latent_shape, num_classes, pipeline_kind, to_uint8  # noqa: F401
from ..files import atomic_savez, atomic_write_text
from .data import write_images_npz

CONFIG_FILE = "config.json"
SHARD_DIR = "shards"
_LABEL_STREAM = 0x1ABE1  # separates the label stream from the noise stream


def sample_seed(seed: int, index: int) -> int:
    """The 63-bit seed of sample `index` (distinct base seeds never share samples, unlike seed + i)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


@dataclasses.dataclass
class SampleConfig:
    """Everything the images depend on (stored in OUTPUT/config.json; a resume must match it)."""

    model: str
    num_samples: int = 50_000
    seed: int = 0
    steps: int | None = None
    cfg_scale: float | None = None
    classes: str = "uniform"  # class-conditional: "uniform" or "balanced"
    num_classes: int | None = None
    prompts_file: str | None = None
    prompts_sha256: str | None = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    method: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    dtype: str = "auto"
    shard_size: int = 250

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.classes not in ("uniform", "balanced"):
            raise ValueError(f"--classes must be 'uniform' or 'balanced', got {self.classes!r}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"--num-classes must be at least 1, got {self.num_classes}")
        if self.prompts_file is not None:
            self.prompts()

    def prompts(self) -> list[str]:
        """Non-empty lines of the prompt file (trailing whitespace stripped)."""
        path = Path(self.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        prompts = [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {path} has no prompts (one per line)")
        digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
        if self.prompts_sha256 is None:
            self.prompts_sha256 = digest
        elif self.prompts_sha256 != digest:
            raise ValueError(f"prompt file {path} changed since this run started")
        return prompts

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("prompts_file")  # the content (sha256) matters, not where the file lives
        return d

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def chunk_indices(self, chunk: int) -> range:
        return range(chunk * self.shard_size, min((chunk + 1) * self.shard_size, self.num_samples))


# ----------------------------------------------------------------------------------------------
# Per-sample conditions and noise


def class_labels(indices, seed: int, num_classes: int, mode: str) -> list[int]:
    if mode == "balanced":
        return [i % num_classes for i in indices]
    return [int(np.random.Generator(np.random.PCG64([int(seed), int(i), _LABEL_STREAM])).integers(num_classes))
            for i in indices]


class Sampler:
    """A loaded (optionally patched) pipeline and the recipe to draw any sample index from it."""

    def __init__(self, config: SampleConfig, device: str | torch.device | None = None, pipe=None):
        from ..loading import load_pipeline

        self.config = config
        self.pipe = pipe if pipe is not None else load_pipeline(config.model, dtype=config.dtype, device=device)
        self.pipe.set_progress_bar_config(disable=True)
        for component in self.pipe.components.values():  # inference mode: no dropout / label dropout
            if isinstance(component, torch.nn.Module):
                component.eval()
        if config.method:
            from ..patching import patch

            patch(self.pipe, config.method, **config.options)
        elif config.options:
            raise ValueError("--option given without --method")
        self.kind = pipeline_kind(self.pipe)
        self.params = call_parameters(self.pipe)
        self.num_classes = None
        self.prompts = None
        if self.kind == "class":
            self.num_classes = config.num_classes or num_classes(self.pipe)
            if self.num_classes is None:
                raise ValueError(f"cannot tell how many classes {config.model} has; pass --num-classes")
        elif self.kind == "text":
            if config.prompts_file is None:
                raise ValueError(f"{config.model} is a text-to-image pipeline: pass --prompts FILE (one prompt per line)")
            self.prompts = config.prompts()
        if self.kind != "text" and config.prompts_file is not None:
            raise ValueError(f"{config.model} takes no prompts ({self.kind} pipeline); drop --prompts")
        self.latent_shape = latent_shape(self.pipe, config.height, config.width)

    def labels(self, indices) -> list[int] | None:
        if self.kind != "class":
            return None
        return class_labels(indices, self.config.seed, self.num_classes, self.config.classes)

    @torch.inference_mode()
    def generate(self, indices) -> np.ndarray:
        """uint8 images (len(indices), H, W, 3) for these sample indices."""
        cfg, pipe = self.config, self.pipe
        generators = [torch.Generator("cpu").manual_seed(sample_seed(cfg.seed, i)) for i in indices]
        kwargs = {"output_type": "np", "generator": generators}
        if cfg.steps is not None:
            kwargs["num_inference_steps"] = cfg.steps
        if cfg.cfg_scale is not None:
            kwargs["guidance_scale"] = cfg.cfg_scale
        if self.kind == "class":
            kwargs["class_labels"] = self.labels(indices)
        elif self.kind == "text":
            kwargs["prompt"] = [self.prompts[i % len(self.prompts)] for i in indices]
            if cfg.negative_prompt is not None:
                kwargs["negative_prompt"] = [cfg.negative_prompt] * len(indices)
        else:
            kwargs["batch_size"] = len(indices)
        for key in ("height", "width"):
            if getattr(cfg, key) is not None:
                if key not in self.params:
                    raise ValueError(f"{type(pipe).__name__} has no --{key} option")
                kwargs[key] = getattr(cfg, key)
        if self.latent_shape is not None:
            model = getattr(pipe, "unet", None) or pipe.transformer
            latents = torch.cat([torch.randn((1, *self.latent_shape), generator=g) for g in generators])
            kwargs["latents"] = latents.to(device=pipe.device, dtype=model.dtype)
        out = pipe(**kwargs)
        images = out.images if hasattr(out, "images") else out[0]
        return to_uint8(images)


# ----------------------------------------------------------------------------------------------
# The run


def _shard_path(output_dir: Path, chunk: int) -> Path:
    return output_dir / SHARD_DIR / f"chunk_{chunk:06d}.npz"


def _check_writable(folder: Path, rank: int) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{rank}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"output folder {folder} is not writable ({err.strerror or err})") from err


def _sync_config(config: SampleConfig, output_dir: Path, state) -> None:
    """Main writes config.json on a fresh run; every process then checks the stored one matches."""
    path = output_dir / CONFIG_FILE
    if state.is_main_process and not path.exists():
        atomic_write_text(path, json.dumps(config.identity(), indent=2, sort_keys=True))
    state.wait_for_everyone()
    stored = json.loads(path.read_text(encoding="utf-8"))
    mine = json.loads(json.dumps(config.identity(), sort_keys=True))
    diff = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
    if diff:
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {mine.get(k)!r}" for k in diff)
        raise ValueError(f"{output_dir} holds a run with other settings ({details}); resume with the same "
                         "settings or use another --output-dir")


def pending_chunks(config: SampleConfig, output_dir: Path) -> list[int]:
    return [c for c in range(config.num_chunks) if not _shard_path(output_dir, c).exists()]


def run_sampling(
    config: SampleConfig,
    output_dir: str | os.PathLike,
    batch_size: int = 16,
    formats: tuple[str, ...] = ("npz",),
    npz_path: str | os.PathLike | None = None,
    png_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    delete_shards: bool = False,
    pipe=None,
) -> dict:
    """Draw the missing samples of `config` into `output_dir` (across accelerate processes) and merge.

    Returns {"npz": path or None, "png": folder or None, "generated": samples drawn by this process,
    "complete": True, "num_processes": K}. `pipe`: an already loaded pipeline to use instead of loading `config.model`.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    config.validate()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    bad = set(formats) - {"npz", "png"}
    if bad or not formats:
        raise ValueError(f"--format takes npz and/or png, got {','.join(formats) or 'nothing'}")
    output_dir = Path(output_dir)
    npz_path = Path(npz_path) if npz_path else output_dir / "samples.npz"
    png_dir = Path(png_dir) if png_dir else output_dir / "png"

    state = PartialState(cpu=not torch.cuda.is_available())
    _check_writable(output_dir / SHARD_DIR, state.process_index)
    if "npz" in formats:
        _check_writable(npz_path.parent, state.process_index)
    if "png" in formats:
        _check_writable(png_dir, state.process_index)
    _sync_config(config, output_dir, state)

    todo = pending_chunks(config, output_dir)
    state.wait_for_everyone()  # everyone has listed the work before anyone adds a shard
    sampler = None
    generated = 0
    with state.split_between_processes(todo) as mine:
        if mine:
            sampler = Sampler(config, device=device if device not in (None, "auto") else state.device, pipe=pipe)
        total = sum(len(config.chunk_indices(c)) for c in mine)
        bar = tqdm(total=total, unit="img", dynamic_ncols=True, disable=not (progress and state.is_main_process),
                   desc=f"sampling (process 0 of {state.num_processes})" if state.num_processes > 1 else "sampling")
        for chunk in mine:
            indices = list(config.chunk_indices(chunk))
            parts = []
            for i in range(0, len(indices), batch_size):
                parts.append(sampler.generate(indices[i:i + batch_size]))
                bar.update(len(parts[-1]))
            images = np.concatenate(parts)
            labels = sampler.labels(indices)
            extra = {} if labels is None else {"labels": np.asarray(labels, dtype=np.int64)}
            atomic_savez(_shard_path(output_dir, chunk), images=images, indices=np.asarray(indices, dtype=np.int64), **extra)
            generated += len(indices)
        bar.close()
    state.wait_for_everyone()
    result = {"npz": None, "png": None, "generated": generated, "complete": True,
              "num_processes": state.num_processes}
    if state.is_main_process:
        result.update(merge_shards(config, output_dir, formats, npz_path, png_dir, progress))
        if delete_shards:
            for c in range(config.num_chunks):
                _shard_path(output_dir, c).unlink(missing_ok=True)
    else:
        result.update(npz=str(npz_path) if "npz" in formats else None, png=str(png_dir) if "png" in formats else None)
    state.wait_for_everyone()
    return result


def _read_shard(config: SampleConfig, output_dir: Path, chunk: int) -> dict[str, np.ndarray]:
    path = _shard_path(output_dir, chunk)
    if not path.exists():
        raise OSError(f"shard {path} is missing; run the same command again to draw it")
    with np.load(path, allow_pickle=False) as data:
        shard = {k: data[k] for k in data.files}
    expected = np.arange(config.chunk_indices(chunk).start, config.chunk_indices(chunk).stop)
    if not np.array_equal(shard["indices"], expected) or len(shard["images"]) != len(expected):
        raise OSError(f"shard {path} does not hold samples {expected[0]}..{expected[-1]}; delete it and run again")
    return shard


def merge_shards(config: SampleConfig, output_dir: Path, formats, npz_path: Path, png_dir: Path,
                 progress: bool = True) -> dict:
    """Write the final npz (atomically) and/or PNGs from the complete set of shards."""
    from PIL import Image
    from tqdm.auto import tqdm

    first = _read_shard(config, output_dir, 0)
    shape = (config.num_samples, *first["images"].shape[1:])
    out = {"npz": None, "png": None}
    if "npz" in formats:
        labels = []

        def chunks():
            for c in tqdm(range(config.num_chunks), desc="merging shards", disable=not progress, dynamic_ncols=True):
                shard = first if c == 0 else _read_shard(config, output_dir, c)
                if "labels" in shard:
                    labels.append(shard["labels"])
                yield shard["images"]

        extra = {}
        if "labels" in first:
            extra["arr_1"] = lambda: np.concatenate(labels)
        write_images_npz(npz_path, chunks(), shape, extra=extra)
        out["npz"] = str(npz_path)
    if "png" in formats:
        png_dir.mkdir(parents=True, exist_ok=True)
        for c in tqdm(range(config.num_chunks), desc="writing PNGs", disable=not progress, dynamic_ncols=True):
            shard = _read_shard(config, output_dir, c)
            for i, image in zip(shard["indices"], shard["images"]):
                target = png_dir / f"{int(i):06d}.png"
                tmp = png_dir / f".{int(i):06d}.png.tmp"
                Image.fromarray(image).save(tmp, format="PNG")
                os.replace(tmp, target)
        out["png"] = str(png_dir)
    return out
