"""Original DiT / SiT checkpoints (`.pt`, e.g. SiT-XL-2-256.pt, DiT-XL-2-256x256.pt) -> diffusers'
`DiTTransformer2DModel`.

    from diffusers_ext.pipelines.convert import convert_dit_checkpoint
    transformer = convert_dit_checkpoint("SiT-XL-2-256.pt")          # a DiTTransformer2DModel

SiT is the DiT architecture trained with a different objective, so both checkpoints share one layout
(a plain state dict, or a dict with "ema" / "model"; "ema" is preferred as the released samplers do):

    original                                    diffusers (DiTTransformer2DModel)
    x_embedder.proj.{weight,bias}               pos_embed.proj.{weight,bias}
    pos_embed (1, T, D) buffer                  recomputed by PatchEmbed (checked equal, not copied)
    t_embedder.mlp.{0,2}                        transformer_blocks.i.norm1.emb.timestep_embedder.linear_{1,2}  (every i)
    y_embedder.embedding_table (K+1, D)         transformer_blocks.i.norm1.emb.class_embedder.embedding_table (every i)
    blocks.i.attn.qkv (3D, D)                   transformer_blocks.i.attn1.to_{q,k,v}  (rows [q; k; v])
    blocks.i.attn.proj                          transformer_blocks.i.attn1.to_out.0
    blocks.i.mlp.fc1 / fc2                      transformer_blocks.i.ff.net.0.proj / ff.net.2
    blocks.i.adaLN_modulation.1 (6D, D)         transformer_blocks.i.norm1.linear (same chunk order)
    final_layer.adaLN_modulation.1 (2D, D)      proj_out_1 (shift, scale: same order)
    final_layer.linear                          proj_out_2

diffusers keeps one copy of the timestep / label embedder per block (the original shares one); we
copy the shared weights into every block, and the final layer reads block 0's, as diffusers does.

Timestep embedding. The original embeds t with frequencies exp(-ln(10^4) j / 128), j < 128;
diffusers' DiT block uses `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)`, i.e.
exp(-ln(10^4) j / 127). `use_original_time_embedding` sets `downscale_freq_shift = 0` on those
modules so the converted model computes exactly the original function. That attribute is not
part of the model's config: `SiTPipeline` re-applies it when built (also after `from_pretrained`).

Time convention. DiT was trained on integer DDPM steps t in {0..999} (t = 999 noise), and its
checkpoint goes to diffusers' `DiTPipeline` unchanged. SiT (willisma/SiT, `transport/path.py`, the
linear `ICPlan`) interpolates x_t = t x_data + (1 - t) x_noise with t in [0, 1], t = 0 pure noise,
t = 1 data, and its network receives that float t directly (no x1000 scaling); the model predicts
the velocity dx_t/dt = x_data - x_noise. DiTTransformer2DModel's `timestep` argument is only fed to
the sinusoidal embedding, which accepts floats, so a converted SiT model is called with
`timestep = t` in [0, 1] (`SiTPipeline` does this).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

# hidden size -> heads of the released DiT / SiT sizes (S, B, L, XL); head counts are not in the weights
KNOWN_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def load_original_state_dict(path_or_state: str | Path | dict) -> dict[str, torch.Tensor]:
    """The model state dict of an original checkpoint (file or loaded dict), "ema" weights preferred."""
    state = path_or_state
    if not isinstance(state, dict):
        state = torch.load(str(path_or_state), map_location="cpu", weights_only=True)
    for key in ("ema", "model", "state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "x_embedder.proj.weight" not in state or "final_layer.linear.weight" not in state:
        raise ValueError(
            "not an original DiT / SiT checkpoint: expected keys such as 'x_embedder.proj.weight', "
            f"'blocks.0.attn.qkv.weight', 'final_layer.linear.weight'; found e.g. {sorted(state)[:5]}"
        )
    return state


def infer_config(state: dict[str, torch.Tensor], num_attention_heads: int | None = None) -> dict:
    """DiTTransformer2DModel config of an original state dict."""
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    num_layers = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
    if num_attention_heads is None:
        if hidden not in KNOWN_HEADS:
            raise ValueError(f"hidden size {hidden} is not a released DiT / SiT size ({sorted(KNOWN_HEADS)}); "
                             "pass num_attention_heads")
        num_attention_heads = KNOWN_HEADS[hidden]
    if hidden % num_attention_heads:
        raise ValueError(f"hidden size {hidden} is not divisible by {num_attention_heads} heads")
    if "pos_embed" in state:
        tokens = state["pos_embed"].shape[1]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"pos_embed holds {tokens} tokens, not a square grid")
        sample_size = side * patch
    else:
        sample_size = 32
    return dict(
        num_attention_heads=num_attention_heads, attention_head_dim=hidden // num_attention_heads,
        in_channels=in_channels, out_channels=out_channels, num_layers=num_layers, patch_size=patch,
        sample_size=sample_size, num_embeds_ada_norm=num_classes, norm_type="ada_norm_zero",
        norm_elementwise_affine=False, activation_fn="gelu-approximate", attention_bias=True,
    )


def convert_state_dict(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Rename / split an original state dict into DiTTransformer2DModel keys (see the module table)."""
    out: dict[str, torch.Tensor] = {
        "pos_embed.proj.weight": state["x_embedder.proj.weight"],
        "pos_embed.proj.bias": state["x_embedder.proj.bias"],
        "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": state["final_layer.linear.weight"],
        "proj_out_2.bias": state["final_layer.linear.bias"],
    }
    for i in range(num_layers):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = dst + "norm1.emb."
        for kind in ("weight", "bias"):
            out[emb + f"timestep_embedder.linear_1.{kind}"] = state[f"t_embedder.mlp.0.{kind}"]
            out[emb + f"timestep_embedder.linear_2.{kind}"] = state[f"t_embedder.mlp.2.{kind}"]
            q, k, v = state[src + f"attn.qkv.{kind}"].chunk(3, dim=0)
            out[dst + f"attn1.to_q.{kind}"], out[dst + f"attn1.to_k.{kind}"], out[dst + f"attn1.to_v.{kind}"] = q, k, v
            out[dst + f"attn1.to_out.0.{kind}"] = state[src + f"attn.proj.{kind}"]
            out[dst + f"ff.net.0.proj.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"ff.net.2.{kind}"] = state[src + f"mlp.fc2.{kind}"]
            out[dst + f"norm1.linear.{kind}"] = state[src + f"adaLN_modulation.1.{kind}"]
        out[emb + "class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
    return {k: v.clone() for k, v in out.items()}


def use_original_time_embedding(transformer) -> None:
    """Make every block's timestep embedding use the original DiT / SiT frequencies (see above)."""
    for module in transformer.modules():
        if type(module).__name__ == "CombinedTimestepLabelEmbeddings":
            module.time_proj.downscale_freq_shift = 0


def convert_dit_checkpoint(path_or_state, num_attention_heads: int | None = None,
                           dtype: torch.dtype = torch.float32, original_time_embedding: bool = True):
    """Build a `DiTTransformer2DModel` holding the weights of an original DiT / SiT checkpoint.

    `path_or_state`: a `.pt` file or an already loaded dict. Unknown, missing or misshaped keys raise.
    `original_time_embedding`: apply `use_original_time_embedding` (exactly the original network).
    """
    from diffusers import DiTTransformer2DModel

    state = load_original_state_dict(path_or_state)
    config = infer_config(state, num_attention_heads)
    transformer = DiTTransformer2DModel(**config)
    converted = convert_state_dict(state, config["num_layers"])

    used = {"pos_embed"} | {k for k in state if k.startswith(("x_embedder.", "t_embedder.", "y_embedder.",
                                                               "final_layer.", "blocks."))}
    unknown = sorted(set(state) - used)
    if unknown:
        raise ValueError(f"checkpoint has keys this converter does not know: {unknown[:5]}")
    own = transformer.state_dict()
    if "pos_embed" in state:
        expected = getattr(transformer.pos_embed, "pos_embed", None)
        if expected is not None and not torch.allclose(state["pos_embed"].float(), expected.float(), atol=1e-5):
            raise ValueError("the checkpoint's pos_embed is not the standard 2-D sin-cos table that diffusers "
                             "recomputes; this checkpoint cannot be converted faithfully")
    for key, value in converted.items():
        if key not in own or own[key].shape != value.shape:
            raise ValueError(f"converted weight {key} {tuple(value.shape)} does not fit the model "
                             f"({tuple(own[key].shape) if key in own else 'no such parameter'})")
    missing = sorted(k for k in own if k not in converted and k != "pos_embed.pos_embed")
    if missing:
        raise ValueError(f"the checkpoint does not provide {missing[:5]}")
    transformer.load_state_dict({**own, **converted}, strict=True)
    if original_time_embedding:
        use_original_time_embedding(transformer)
    return transformer.to(dtype).eval()
