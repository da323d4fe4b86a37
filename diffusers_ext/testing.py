"""Tiny random-weight pipelines for every supported family, built offline.

Nothing here touches the model hub: the tokenizer is a byte-level CLIP tokenizer written to a
temporary folder, and every model is built from a small config. The test suite and the offline
default of the command line use these. They are real diffusers pipelines, so anything that works
on them goes through exactly the code paths the full-size models take.

    pipe = tiny_pipeline("sd")          # StableDiffusionPipeline, 32 x 32 latents
    pipe = tiny_pipeline("sdxl")        # StableDiffusionXLPipeline
    pipe = tiny_pipeline("sd3")         # StableDiffusion3Pipeline (SD3.5 flavour with `sd35`)
    pipe = tiny_pipeline("dit")         # DiTPipeline
    pipe = tiny_pipeline("sit")         # SiTPipeline (diffusers_ext.pipelines)
    pipe = tiny_pipeline("animatediff") # AnimateDiffPipeline
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch

# tiny model name -> the model family (diffusers_ext.families) of its denoiser
TINY_FAMILIES = {"sd": "sd", "sdxl": "sdxl", "sd3": "sd3", "sd35": "sd3", "dit": "dit", "sit": "dit",
                 "animatediff": "animatediff"}


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table of byte-level BPE (GPT-2 / CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=None)
def _tokenizer_files() -> tuple[str, str]:
    """Write a byte-level CLIP vocabulary (no merges) once per process; returns (vocab, merges)."""
    folder = Path(tempfile.mkdtemp(prefix="diffusers_ext_tok_"))
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513  # highest id: CLIP pools the text embedding at argmax(ids)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _tokenizer_files()
    return CLIPTokenizer(vocab, merges, model_max_length=77)


def _text_config(projection_dim: int | None = None, hidden_size: int = 32):
    from transformers import CLIPTextConfig

    kwargs = dict(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=hidden_size, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=5, vocab_size=1000,
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def tiny_vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels, norm_num_groups=8, sample_size=64, **extra,
    )


def tiny_sd_unet(cross_attention_dim: int = 32, sample_size: int = 32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=sample_size,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=32,
    )


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )


def tiny_sd3_transformer(sd35: bool = False):
    from diffusers import SD3Transformer2DModel

    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if sd35 else {}
    return SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4, **extra,
    )


def tiny_dit_transformer(sample_size: int = 16, patch_size: int = 2):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        sample_size=sample_size, num_layers=2, patch_size=patch_size, attention_head_dim=8,
        num_attention_heads=2, in_channels=4, out_channels=8, num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero", norm_elementwise_affine=False,
    )


def tiny_pipeline(family: str = "sd", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random-weight pipeline of `family` (one of TINY_FAMILIES), deterministic in `seed`."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    torch.manual_seed(seed)
    builder = {
        "sd": _tiny_sd, "sdxl": _tiny_sdxl, "sd3": functools.partial(_tiny_sd3, sd35=False),
        "sd35": functools.partial(_tiny_sd3, sd35=True), "dit": _tiny_dit, "sit": _tiny_sit,
        "animatediff": _tiny_animatediff,
    }[family]
    pipe = builder()
    for component in pipe.components.values():  # as from_pretrained leaves them: no dropout, no label drop
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _tiny_sd():
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    return StableDiffusionPipeline(
        unet=tiny_sd_unet(), vae=tiny_vae(), text_encoder=CLIPTextModel(_text_config()),
        tokenizer=tiny_tokenizer(), scheduler=DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1,
        ),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _tiny_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return StableDiffusionXLPipeline(
        unet=tiny_sdxl_unet(), vae=tiny_vae(), text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=32)),
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
    )


def _tiny_sd3(sd35: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(sd35), vae=tiny_vae(shift_factor=0.0),
        text_encoder=CLIPTextModelWithProjection(_text_config(projection_dim=32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=32)),
        text_encoder_3=None, tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def _tiny_dit():
    from diffusers import DDIMScheduler, DiTPipeline

    labels = {i: f"class {i}" for i in range(1000)}
    return DiTPipeline(transformer=tiny_dit_transformer(), vae=tiny_vae(), scheduler=DDIMScheduler(), id2label=labels)


def tiny_sit_pipeline(seed: int = 0, sample_size: int = 16):
    """A tiny random-weight SiT pipeline (diffusers_ext.pipelines.sit), deterministic in `seed`."""
    from diffusers_ext.pipelines.sit import SiTPipeline, SiTScheduler

    torch.manual_seed(seed)
    labels = {i: f"class {i}" for i in range(1000)}
    pipe = SiTPipeline(transformer=tiny_dit_transformer(sample_size=sample_size), vae=tiny_vae(),
                       scheduler=SiTScheduler(), id2label=labels)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_sit():
    return tiny_sit_pipeline()


def _tiny_animatediff():
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 8), layers_per_block=1, sample_size=16, norm_num_groups=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
    )
    adapter = MotionAdapter(
        block_out_channels=(8, 8), motion_layers_per_block=1, motion_norm_num_groups=2,
        motion_num_attention_heads=4,
    )
    return AnimateDiffPipeline(
        unet=unet, motion_adapter=adapter, vae=tiny_vae(), text_encoder=CLIPTextModel(_text_config()),
        tokenizer=tiny_tokenizer(),
        scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False, steps_offset=1),
    )
