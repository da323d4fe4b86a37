"""The lab II models as pipelines: from the shipped weights (`assets/glyphs/`) or a training run folder.

    from diffusers_ext.lab.pipelines import glyph_sit_pipeline, glyph_unet_pipeline
    sit = glyph_sit_pipeline()                      # pixel-space SiTPipeline, 1024 tokens an image
    images = sit(class_labels=[10, 11], **SIT_SAMPLING).images          # "A", "B"
    unet = glyph_unet_pipeline()                    # GlyphUNetPipeline: SD-layout UNet, DDIM, guidance
    images = unet(class_labels=[10, 11], **UNET_SAMPLING).images

Both take class ids 0..35 ("0".."9", "A".."Z"; `data.CLASSES`); 36 is the null class of guidance.
`export(runs, to)` writes the shipped folder from finished training runs (`python -m diffusers_ext.lab
export`): the SiT as a diffusers model folder, the UNet with its class prompt, the classifier, the FID
reference statistics of the training glyphs and `training.json` (the runs' records).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput

from ..files import _umask, save_pretrained, save_safetensors
from .data import CLASSES, NUM_CLASSES, RESOLUTION
from .models import ClassTokens, GlyphClassifier

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "glyphs"
STATISTICS_FILE = "fid_reference.npz"
# Recipes from a sweep over guidance (72 samples, docs/lab.md): the SiT at guidance 4 (FID 177, 68 % of samples
# classified as asked, against 172 / 64 % at 3 and 177 / 69 % at 5); the v-prediction UNet without guidance (105 / 25 %;
# guidance 1.5 gives 125 / 21 %, guidance 2 drifts towards one heavy class)
SIT_SAMPLING = dict(num_inference_steps=12, guidance_scale=4.0, sampler="ode-heun")
UNET_SAMPLING = dict(num_inference_steps=25, guidance_scale=1.0)
SHOWCASE = [CLASSES.index(c) for c in "DIFFUSERS"]   # the classes `compare` and the app draw by default


class GlyphUNetPipeline(DiffusionPipeline):
    """Class-conditional sampling of the glyph UNet: DDIM with classifier-free guidance in pixel space.

    The class reaches the UNet as SD's text does, through `encoder_hidden_states`: `class_tokens` maps
    a class id to its learned prompt (CLASS_TOKENS x cross_attention_dim); the null class (36) is the
    unconditional prompt. Images (B, 1, 32, 32) in [0, 1] (`output_type="pt"`) or PIL.
    """

    model_cpu_offload_seq = "class_tokens->unet"

    def __init__(self, unet, scheduler, class_tokens: ClassTokens):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, class_tokens=class_tokens)
        self.id2label = dict(enumerate(CLASSES))
        self.recipe = dict(UNET_SAMPLING)
        self.default_class_labels = list(SHOWCASE)

    @torch.no_grad()
    def __call__(self, class_labels: Sequence[int] | torch.Tensor, num_inference_steps: int = UNET_SAMPLING["num_inference_steps"],
                 guidance_scale: float = UNET_SAMPLING["guidance_scale"],
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", eta: float = 0.0,
                 return_dict: bool = True):
        device, dtype = self.unet.device, self.unet.dtype
        labels = torch.as_tensor(class_labels, device=device).reshape(-1)
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES:
            raise ValueError(f"class_labels must be class ids in [0, {NUM_CLASSES - 1}], got {labels.tolist()}")
        shape = (len(labels), self.unet.config.in_channels, RESOLUTION, RESOLUTION)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma
        guided = guidance_scale > 1.0
        prompts = self.class_tokens(labels).to(dtype)
        if guided:
            null = self.class_tokens(torch.full_like(labels, NUM_CLASSES)).to(dtype)
            prompts = torch.cat([null, prompts])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            inputs = torch.cat([latents, latents]) if guided else latents
            inputs = self.scheduler.scale_model_input(inputs, t)
            eps = self.unet(inputs, t, encoder_hidden_states=prompts).sample
            if guided:
                eps_null, eps_cond = eps.chunk(2)
                eps = eps_null + guidance_scale * (eps_cond - eps_null)
            latents = self.scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
        images = ((latents.float().clamp(-1, 1) + 1) / 2)
        if output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
        elif output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type != "pt":
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _folder(folder: str | Path | None, part: str) -> Path:
    path = Path(folder or ASSETS) / part
    if not path.exists():
        raise FileNotFoundError(f"no lab II {part} at {path}; train it (`python -m diffusers_ext.lab train ...`) and "
                                "export it (`python -m diffusers_ext.lab export`), docs/lab.md")
    return path


def glyph_sit_pipeline(folder: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The glyph SiT (`<folder>/transformer`, default the shipped one) as a pixel-space `SiTPipeline`."""
    from diffusers import DiTTransformer2DModel

    from ..pipelines.sit import SiTPipeline, SiTScheduler

    transformer = DiTTransformer2DModel.from_pretrained(str(_folder(folder, "transformer")), torch_dtype=dtype,
                                                        use_safetensors=True).eval()
    pipe = SiTPipeline(transformer=transformer, vae=None, scheduler=SiTScheduler(), id2label=dict(enumerate(CLASSES)))
    pipe.default_guidance_scale = SIT_SAMPLING["guidance_scale"]
    pipe.recipe = dict(SIT_SAMPLING)
    pipe.default_class_labels = list(SHOWCASE)
    return pipe


def glyph_unet_pipeline(folder: str | Path | None = None, dtype: torch.dtype = torch.float32) -> GlyphUNetPipeline:
    """The glyph UNet and its class prompt (`<folder>/unet`, `class_tokens.safetensors`) with DDIM."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(str(_folder(folder, "unet")), torch_dtype=dtype,
                                                use_safetensors=True).eval()
    tokens = ClassTokens(unet.config.cross_attention_dim)
    tokens.load_state_dict(load_file(str(_folder(folder, "class_tokens.safetensors"))))
    record = json.loads(_folder(folder, "training.json").read_text())["runs"]["unet"]
    prediction = record["config"].get("prediction", "epsilon")      # runs before v-prediction: epsilon
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              prediction_type=prediction,
                              clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")
    return GlyphUNetPipeline(unet=unet, scheduler=scheduler, class_tokens=tokens.to(dtype).eval())


def load_classifier(folder: str | Path | None = None) -> GlyphClassifier:
    """The shipped glyph classifier, in eval mode."""
    from safetensors.torch import load_file

    record = json.loads(_folder(folder, "training.json").read_text())["runs"]["classifier"]
    model = GlyphClassifier(**record["model_overrides"])
    model.load_state_dict(load_file(str(_folder(folder, "classifier.safetensors"))))
    return model.eval()


def reference_statistics(folder: str | Path | None = None):
    """(mu, sigma) float64 of the FID tool's Inception pool features of every glyph image (the data set),
    stored as float32."""
    import numpy as np

    with np.load(_folder(folder, STATISTICS_FILE)) as saved:
        return saved["mu"].astype(np.float64), saved["sigma"].astype(np.float64)


def data_statistics(path: str | Path, glyphs=None, log=print) -> Path:
    """`path` holding the FID reference statistics of every glyph image (training and held-out fonts):
    the FID tool's Inception pool features, mean and covariance, float32 on disk (16 MB, not 33), with
    the data's fingerprint. Computed once (about 6 minutes on 2 cores) and kept: an existing file for
    the same data is reused, one for other data is recomputed. Written atomically."""
    import numpy as np

    from ..eval.inception import InceptionNetwork, extract_features
    from ..eval.metrics import compute_statistics
    from ..pipeline_io import tensor_to_uint8
    from ..files import atomic_savez
    from .data import load_glyphs

    path = Path(path)
    glyphs = glyphs if glyphs is not None else load_glyphs()
    if path.is_file():
        with np.load(path) as saved:
            if "fingerprint" in saved and str(saved["fingerprint"]) == glyphs.fingerprint():
                return path
        log(f"{path} holds the statistics of other glyph data: recomputing them")
    pixels = tensor_to_uint8(glyphs.images)   # as the study's samples (grey repeated into RGB)
    chunks = (pixels[i:i + 8] for i in range(0, len(pixels), 8))
    mu, sigma = compute_statistics(extract_features(InceptionNetwork(), chunks, total=len(pixels),
                                                    desc="FID reference")["pool"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savez(path, compress=True, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32), count=len(pixels),
                 fingerprint=glyphs.fingerprint())
    return path


def export(runs: str | Path, to: str | Path = ASSETS, *, glyphs=None, statistics: bool = True, log=print) -> Path:
    """Write the shipped folder `to` from the finished runs `runs/{dit,unet,classifier}` (train.py's folders).

    Refuses an unfinished run (its step short of its schedule). The folder is assembled beside `to` and
    renamed into place, so `to` holds the old set or the whole new one. Also computes the FID reference
    statistics of all glyph images (`data_statistics`, kept as `runs/fid_reference.npz`;
    `statistics=False` skips them: tests); `glyphs`: the data set (default `load_glyphs()`).
    """
    from . import train as training
    from .data import load_glyphs

    runs, to = Path(runs), Path(to)
    records = {}
    for kind in training.KINDS:
        path = runs / kind / "record.json"
        if not path.is_file():
            raise FileNotFoundError(f"no finished {kind} run at {path.parent}: train it first")
        record = json.loads(path.read_text())
        if record["step"] < record["config"]["steps"]:
            raise ValueError(f"the {kind} run at {path.parent} stopped at step {record['step']} of "
                             f"{record['config']['steps']}: resume it to the end first (--resume)")
        records[kind] = record
    to.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{to.name}.", dir=to.parent))
    os.chmod(staging, 0o777 & ~_umask())    # mkdtemp makes it private; the shipped folder is not
    try:
        sit = training.load_weights("dit", runs / "dit")
        save_pretrained(sit, staging / "transformer")
        wrapped = training.load_weights("unet", runs / "unet")
        save_pretrained(wrapped.unet, staging / "unet")
        save_safetensors(wrapped.tokens.state_dict(), staging / "class_tokens.safetensors")
        shutil.copyfile(runs / "classifier" / "weights.safetensors", staging / "classifier.safetensors")
        glyphs = glyphs if glyphs is not None else load_glyphs()
        if glyphs.fingerprint() != records["dit"]["data_fingerprint"]:
            raise ValueError("the glyph data differs from the data the runs trained on (other fonts installed?)")
        if statistics:
            shutil.copyfile(data_statistics(runs / STATISTICS_FILE, glyphs, log), staging / STATISTICS_FILE)
        (staging / "training.json").write_text(json.dumps(dict(runs=records, data=glyphs.stats(),
                                                               data_fingerprint=glyphs.fingerprint()), indent=1) + "\n")
        if to.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{to.name}.old.", dir=to.parent))
            to.rename(old / to.name)
            staging.rename(to)
            shutil.rmtree(old)
        else:
            staging.rename(to)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log(f"exported the lab II models to {to}")
    return to
