"""The lab II models: a pixel-space class-conditional SiT, an SD-style UNet and a glyph classifier.

- `glyph_transformer()`: `DiTTransformer2DModel` on 32 x 32 grey glyphs at patch 1 (1024 tokens an
  image), 6 blocks of width 96 (3 heads of 32), adaLN-zero, 36 classes + the null class, the original
  DiT / SiT time embedding; 1.25 M parameters. Sized (`TRANSFORMER_CONFIG`) so that attention is more
  than half of its forward time on a CPU: at 1024 tokens and width 96 the attention products cost
  N / (6 d) = 1.8x the FLOPs of the linear layers (width 128: 1.3x, and 44 % of the fp32 time).
- `glyph_unet()`: `UNet2DConditionModel` with SD 1.x's block layout at three levels (32, 16, 8):
  cross-attention blocks at the finest two, so the finest level's `attn1` is self-attention over
  32 x 32 = 1024 tokens, as at SD's 64 x 64 latent level (4096). It is conditioned like SD, through
  `encoder_hidden_states`: `ClassTokens` maps a class to a learned "prompt" of `CLASS_TOKENS` vectors
  (the null class, id 36, is the empty prompt for classifier-free guidance). This keeps every SD code
  path (attn1 self / attn2 cross in each `BasicTransformerBlock`) that agent attention, ToDo and tomesd
  patch; time-embedding class conditioning (`num_class_embeds`) would leave attn2 attending to nothing.
  Several tokens, not one: softmax over a single key is 1, and cross-attention would be a constant.
- `GlyphClassifier`: a small CNN, (B, 1, 32, 32) in [-1, 1] -> (B, 36) logits.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..digits import GreyImageClassifier
from .data import NUM_CLASSES, RESOLUTION

TRANSFORMER_CONFIG = dict(
    sample_size=RESOLUTION, patch_size=1, in_channels=1, out_channels=1, num_layers=6,
    num_attention_heads=3, attention_head_dim=32, num_embeds_ada_norm=NUM_CLASSES,
    norm_type="ada_norm_zero", norm_elementwise_affine=False,
)
CLASS_TOKENS = 4
UNET_CONFIG = dict(
    sample_size=RESOLUTION, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(32, 64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(1, 2, 4),    # diffusers' legacy name: heads per level (SD 1.x: 8), 32 channels a head
    cross_attention_dim=64, norm_num_groups=32,
)


def glyph_transformer(**overrides):
    """The untrained glyph SiT (`TRANSFORMER_CONFIG` updated by `overrides`), original time embedding."""
    from diffusers import DiTTransformer2DModel

    from ..pipelines.convert import use_original_time_embedding

    model = DiTTransformer2DModel(**{**TRANSFORMER_CONFIG, **overrides})
    use_original_time_embedding(model)
    return model


def glyph_unet(**overrides):
    """The untrained glyph UNet (`UNET_CONFIG` updated by `overrides`)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


class ClassTokens(nn.Module):
    """Class ids (B,) in [0, classes] (classes = the null class) -> a learned prompt (B, tokens, dim)."""

    def __init__(self, dim: int, tokens: int = CLASS_TOKENS, classes: int = NUM_CLASSES):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.embedding = nn.Embedding(classes + 1, tokens * dim)
        nn.init.normal_(self.embedding.weight, std=dim ** -0.5)

    @property
    def dtype(self) -> torch.dtype:   # read by `DiffusionPipeline.to` of every component, as ModelMixin's
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels).view(-1, self.tokens, self.dim)


class GlyphClassifier(GreyImageClassifier):
    """A small CNN: (B, 1, 32, 32) images in [-1, 1] -> (B, 36) logits."""

    resolution = RESOLUTION

    def __init__(self, width: int = 32):
        super().__init__()

        def stage(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *stage(1, width, 1), *stage(width, 2 * width, 2), *stage(2 * width, 2 * width, 1),
            *stage(2 * width, 4 * width, 2), *stage(4 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
        )
        self.head = nn.Linear(4 * width, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
