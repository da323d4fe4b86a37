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
import contextlib
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_savez, atomic_write_text, check_writable, check_writable_folder
from ..pipeline_io import (  # noqa: F401
    call_parameters, check_conditions, latent_shape, num_classes, pipeline_kind, recipe, to_uint8,
)
from .data import write_images_npz

CONFIG_FILE = "config.json"
SHARD_DIR = "shards"
OUTPUTS_FILE = "outputs.json"   # the npz / PNG folders this run wrote, with their fingerprints
LOCK_FILE = ".lock"             # held (flock) by the main process of the run using the folder
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
    recipe: dict | None = None   # the model's recommended call arguments in use (set by `Sampler`)

    def validate(self) -> None:
        """Every check that needs no model (the model-dependent ones are the `Sampler`'s)."""
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.cfg_scale is not None and not math.isfinite(self.cfg_scale):
            raise ValueError(f"--cfg-scale must be a finite number, got {self.cfg_scale}")
        for key in ("height", "width"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"--{key} must be at least 1, got {getattr(self, key)}")
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
        return json.loads(json.dumps(d, sort_keys=True))   # as stored: tuples become lists

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
        self.kind = check_conditions(self.pipe, prompt="--prompts" if config.prompts_file is not None else None)
        self.params = call_parameters(self.pipe)
        for key in ("height", "width"):
            if getattr(config, key) is not None and key not in self.params:
                raise ValueError(f"{type(self.pipe).__name__} has no --{key} option")
        self.recipe = recipe(self.pipe)
        config.recipe = self.recipe or None
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
        kwargs = {**self.recipe, "output_type": "np", "generator": generators}
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


def _check_config(config: SampleConfig, output_dir: Path, know_recipe: bool) -> bool:
    """Whether `output_dir` holds this run (its config.json matches). A config.json of other
    settings is an error when the folder holds its work (shards, or outputs it wrote); without any
    it is left from a run refused or stopped before its first shard, and is replaced."""
    path = output_dir / CONFIG_FILE
    has_shards = any((output_dir / SHARD_DIR).glob("chunk_*.npz")) or bool(_owned_outputs(output_dir))
    if not path.is_file():
        if has_shards:
            raise ValueError(f"{output_dir} holds samples but {path} is missing, so their settings are unknown; "
                             "use another --output-dir")
        return False
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}); delete it or use another --output-dir") from None
    mine = config.identity()
    if not know_recipe:   # read from the model, which is not loaded yet
        stored.pop("recipe", None)
        mine.pop("recipe", None)
    diff = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
    if not diff:
        return True
    if has_shards:
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {mine.get(k)!r}" for k in diff)
        raise ValueError(f"{output_dir} holds a run with other settings ({details}); resume with the same "
                         "settings or use another --output-dir")
    return False   # a config.json without samples (a run refused or stopped before its first shard)


# --- which outputs belong to the run: OUTPUT_DIR/outputs.json records the npz and PNG folder it wrote

def _fingerprint(path: Path) -> list | None:
    """What an output looks like now: a file's size and mtime, a folder's file names and sizes."""
    if path.is_file():
        st = path.stat()
        return ["file", st.st_size, st.st_mtime_ns]
    if path.is_dir():
        entries = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
        return ["folder", len(entries), hashlib.sha256(json.dumps(entries).encode()).hexdigest()]
    return None


def _owned_outputs(output_dir: Path) -> dict:
    path = output_dir / OUTPUTS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _record_output(output_dir: Path, target: Path, fingerprint) -> None:
    owned = _owned_outputs(output_dir)
    owned[str(target.resolve())] = fingerprint
    atomic_write_text(output_dir / OUTPUTS_FILE, json.dumps(owned, indent=1, sort_keys=True))


def check_outputs(output_dir: Path, targets: dict[str, Path], overwrite: bool = False) -> None:
    """Refuse to replace an npz or PNG folder this run did not write (another run's images, which a
    later FID would score mixed with these): `targets` maps the flag (--npz, --png-dir) to its path."""
    owned = _owned_outputs(output_dir)
    for flag, path in targets.items():
        folder = flag == "--png-dir"
        if path.exists() and path.is_dir() != folder:
            raise OSError(f"{flag} {path} is a {'file' if folder else 'folder'}; give a "
                          f"{'folder' if folder else 'file'}")
        if not path.exists() or (folder and not any(path.iterdir())) or overwrite:
            continue
        recorded = owned.get(str(path.resolve()), False)
        if recorded is None or recorded == _fingerprint(path):   # None: this run was writing it
            continue
        raise FileExistsError(f"{flag} {path} already exists and holds images this run did not write; pass "
                              f"--overwrite to replace it, or choose another {flag}")


@contextlib.contextmanager
def _folder_lock(output_dir: Path, state):
    """One run per folder: the main process holds an exclusive flock on OUTPUT_DIR/.lock; a second
    run on the same folder stops at once with a clear message (every process of it). The holder
    removes the file before it lets go, so a finished run leaves no lock behind; a run that locked a
    file just removed (opened before the removal) sees it is no longer the folder's and tries again."""
    message, handle = None, None
    path = output_dir / LOCK_FILE
    if state.is_main_process:
        import fcntl
        import socket

        output_dir.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                handle = None
                message = (f"{output_dir} is in use by another `diffusers-ext sample` ({holder}); wait for it "
                           "to finish, then run this command again (it resumes, or only merges)")
                break
            if _same_file(handle, path):
                handle.seek(0)
                handle.truncate()
                handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
                handle.flush()
                break
            handle.close()   # the previous holder removed this file after we opened it: lock the new one
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [message]
        broadcast_object_list(box, from_process=0)
        message = box[0]
    if message is not None:
        raise BlockingIOError(message)
    try:
        yield
    finally:
        if handle is not None:
            path.unlink(missing_ok=True)   # while still held: no run can lock this file and keep working
            handle.close()                 # releases the lock


def _same_file(handle, path: Path) -> bool:
    """Is the open file `handle` still the one at `path`?"""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _remove_if_unused(output_dir: Path, existed: bool) -> None:
    """After a refused run: the folder it created holds only the lock file; leave nothing behind."""
    if existed or not output_dir.is_dir():
        return
    if {p.name for p in output_dir.iterdir()} <= {LOCK_FILE, SHARD_DIR} and not any((output_dir / SHARD_DIR).glob("*")):
        shutil.rmtree(output_dir, ignore_errors=True)


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
    overwrite: bool = False,
) -> dict:
    """Draw the missing samples of `config` into `output_dir` (across accelerate processes) and merge.

    Every input is checked before anything is written (the model-dependent ones by loading it);
    one run at a time per folder (`_folder_lock`); an existing npz / PNG folder another run wrote is
    refused unless `overwrite` (`check_outputs`); PNGs are written as a fresh set, swapped in whole.
    Returns {"npz": path or None, "png": folder or None, "generated": samples drawn by this process,
    "complete": True, "num_processes": K}. `pipe`: an already loaded pipeline to use instead of loading `config.model`.
    """
    from accelerate import PartialState

    from ..loading import resolve_device, resolve_dtype

    config.validate()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    bad = set(formats) - {"npz", "png"}
    if bad or not formats:
        raise ValueError(f"--format takes npz and/or png, got {','.join(formats) or 'nothing'}")
    resolve_dtype(config.dtype, resolve_device(device))   # a device or dtype this machine lacks: now
    output_dir = Path(output_dir)
    npz_path = Path(npz_path) if npz_path else output_dir / "samples.npz"
    png_dir = Path(png_dir) if png_dir else output_dir / "png"
    targets = {flag: path for flag, path, kind in (("--npz", npz_path, "npz"), ("--png-dir", png_dir, "png"))
               if kind in formats}
    if output_dir.exists() and not output_dir.is_dir():
        raise OSError(f"output folder {output_dir} is not writable: it is a file")
    check_writable_folder(output_dir, "output folder")
    if "npz" in formats:
        check_writable(npz_path, "--npz")
    if "png" in formats:
        check_writable_folder(png_dir.parent, f"the folder of --png-dir {png_dir}")

    state = PartialState(cpu=not torch.cuda.is_available())
    existed = output_dir.exists()
    try:
        with _folder_lock(output_dir, state):
            return _run_locked(config, output_dir, state, batch_size, formats, npz_path, png_dir, targets, device,
                               progress, delete_shards, pipe, overwrite)
    except BaseException:
        if state.is_main_process:
            _remove_if_unused(output_dir, existed)
        raise


def _run_locked(config, output_dir, state, batch_size, formats, npz_path, png_dir, targets, device, progress,
                delete_shards, pipe, overwrite) -> dict:
    from tqdm.auto import tqdm

    ours = _check_config(config, output_dir, know_recipe=False)
    check_outputs(output_dir, targets, overwrite)
    todo = pending_chunks(config, output_dir) if ours else list(range(config.num_chunks))
    sampler = None
    if todo or not ours:   # load the model: its checks (prompts, classes, sizes, the patch) come first
        sampler = Sampler(config, device=device if device not in (None, "auto") else state.device, pipe=pipe)
        _check_config(config, output_dir, know_recipe=True)   # the recipe is known now
        if state.is_main_process:
            (output_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            atomic_write_text(output_dir / CONFIG_FILE, json.dumps(config.identity(), indent=2, sort_keys=True))
    state.wait_for_everyone()  # config.json written and the work listed before anyone adds a shard
    generated = 0
    with state.split_between_processes(todo) as mine:
        total = sum(len(config.chunk_indices(c)) for c in mine)
        bar = tqdm(total=total, unit="img", dynamic_ncols=True, disable=not (progress and state.is_main_process),
                   desc=f"sampling (process 0 of {state.num_processes})" if state.num_processes > 1 else "sampling")
        try:
            for chunk in mine:
                indices = list(config.chunk_indices(chunk))
                parts = []
                for i in range(0, len(indices), batch_size):
                    parts.append(sampler.generate(indices[i:i + batch_size]))
                    bar.update(len(parts[-1]))
                images = np.concatenate(parts)
                labels = sampler.labels(indices)
                extra = {} if labels is None else {"labels": np.asarray(labels, dtype=np.int64)}
                atomic_savez(_shard_path(output_dir, chunk), images=images, indices=np.asarray(indices, dtype=np.int64),
                             **extra)
                generated += len(indices)
        except KeyboardInterrupt:
            bar.close()
            done = config.num_chunks - len(pending_chunks(config, output_dir))
            kept = sum(len(config.chunk_indices(c)) for c in range(config.num_chunks)
                       if _shard_path(output_dir, c).exists())
            raise KeyboardInterrupt(f"{kept} of {config.num_samples} samples are kept in {output_dir / SHARD_DIR} "
                                    f"({done} of {config.num_chunks} shards); run the same command again to "
                                    "resume") from None
        bar.close()
    state.wait_for_everyone()
    result = {"npz": None, "png": None, "generated": generated, "complete": True,
              "num_processes": state.num_processes}
    if state.is_main_process:
        try:
            result.update(merge_shards(config, output_dir, formats, npz_path, png_dir, progress))
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"all {config.num_samples} samples are kept in {output_dir / SHARD_DIR}; "
                                    "run the same command again to write the outputs") from None
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
        _record_output(output_dir, npz_path, None)   # claimed before writing: a kill leaves it ours
        write_images_npz(npz_path, chunks(), shape, extra=extra)
        _record_output(output_dir, npz_path, _fingerprint(npz_path))
        out["npz"] = str(npz_path)
    if "png" in formats:
        # a fresh set in a hidden sibling folder, swapped in whole: never old and new images mixed
        partial = png_dir.parent / f".{png_dir.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)   # a merge killed earlier (the folder lock is ours)
        partial.mkdir(parents=True)
        for c in tqdm(range(config.num_chunks), desc="writing PNGs", disable=not progress, dynamic_ncols=True):
            shard = _read_shard(config, output_dir, c)
            for i, image in zip(shard["indices"], shard["images"]):
                Image.fromarray(image).save(partial / f"{int(i):06d}.png", format="PNG")
        _record_output(output_dir, png_dir, None)
        if png_dir.exists():
            old = png_dir.parent / f".{png_dir.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(png_dir, old)
            os.replace(partial, png_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, png_dir)
        _record_output(output_dir, png_dir, _fingerprint(png_dir))
        out["png"] = str(png_dir)
    return out
