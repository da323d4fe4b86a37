"""SiT pipeline, samplers and the original-checkpoint converter."""

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_ext.pipelines.convert import convert_dit_checkpoint
from diffusers_ext.pipelines.sit import SiTPipeline, SiTScheduler
from diffusers_ext.testing import tiny_sit_pipeline

# --- a reference of the original DiT / SiT network, written from the papers' description ------------

HIDDEN, HEADS, DEPTH, PATCH, IN_CH, GRID, CLASSES = 32, 4, 2, 2, 4, 4, 1000


def sincos_1d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim, size):
    gw, gh = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))
    return np.concatenate([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], axis=1)


def original_checkpoint(seed=0, learn_sigma=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    out_ch = IN_CH * (2 if learn_sigma else 1)
    sd = {
        "x_embedder.proj.weight": r(HIDDEN, IN_CH, PATCH, PATCH), "x_embedder.proj.bias": r(HIDDEN),
        "pos_embed": torch.from_numpy(sincos_2d(HIDDEN, GRID)).float()[None],
        "t_embedder.mlp.0.weight": r(HIDDEN, 256), "t_embedder.mlp.0.bias": r(HIDDEN),
        "t_embedder.mlp.2.weight": r(HIDDEN, HIDDEN), "t_embedder.mlp.2.bias": r(HIDDEN),
        "y_embedder.embedding_table.weight": r(CLASSES + 1, HIDDEN),
        "final_layer.adaLN_modulation.1.weight": r(2 * HIDDEN, HIDDEN), "final_layer.adaLN_modulation.1.bias": r(2 * HIDDEN),
        "final_layer.linear.weight": r(PATCH * PATCH * out_ch, HIDDEN), "final_layer.linear.bias": r(PATCH * PATCH * out_ch),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({
            b + "attn.qkv.weight": r(3 * HIDDEN, HIDDEN), b + "attn.qkv.bias": r(3 * HIDDEN),
            b + "attn.proj.weight": r(HIDDEN, HIDDEN), b + "attn.proj.bias": r(HIDDEN),
            b + "mlp.fc1.weight": r(4 * HIDDEN, HIDDEN), b + "mlp.fc1.bias": r(4 * HIDDEN),
            b + "mlp.fc2.weight": r(HIDDEN, 4 * HIDDEN), b + "mlp.fc2.bias": r(HIDDEN),
            b + "adaLN_modulation.1.weight": r(6 * HIDDEN, HIDDEN), b + "adaLN_modulation.1.bias": r(6 * HIDDEN),
        })
    return sd


def original_forward(sd, x, t, y):
    """DiT forward (Peebles & Xie): patchify + pos, adaLN-Zero blocks, final adaLN layer, unpatchify."""
    lin = lambda z, name: F.linear(z, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = lin(F.silu(lin(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    n, tokens, _ = h.shape
    norm = lambda z: F.layer_norm(z, (HIDDEN,), eps=1e-6)  # noqa: E731
    for i in range(DEPTH):
        b = f"blocks.{i}."
        mods = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        z = norm(h) * (1 + mods[1][:, None]) + mods[0][:, None]
        qkv = lin(z, b + "attn.qkv").reshape(n, tokens, 3, HEADS, HIDDEN // HEADS).permute(2, 0, 3, 1, 4)
        a = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) * (HIDDEN // HEADS) ** -0.5, -1) @ qkv[2]
        h = h + mods[2][:, None] * lin(a.transpose(1, 2).reshape(n, tokens, HIDDEN), b + "attn.proj")
        z = norm(h) * (1 + mods[4][:, None]) + mods[3][:, None]
        h = h + mods[5][:, None] * lin(F.gelu(lin(z, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(norm(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    out_ch = h.shape[-1] // PATCH**2
    h = h.reshape(n, GRID, GRID, PATCH, PATCH, out_ch)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(n, out_ch, GRID * PATCH, GRID * PATCH)


@pytest.mark.parametrize("wrapped", [False, True])
def test_converter_matches_original_network(tmp_path, wrapped):
    sd = original_checkpoint()
    path = tmp_path / "SiT-tiny.pt"
    torch.save({"model": sd, "ema": sd, "opt": {}} if wrapped else sd, path)
    model = convert_dit_checkpoint(path, num_attention_heads=HEADS)
    assert model.config.num_layers == DEPTH and model.config.sample_size == GRID * PATCH
    assert model.config.out_channels == 2 * IN_CH
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, IN_CH, GRID * PATCH, GRID * PATCH, generator=g)
    y = torch.tensor([0, 7, 1000])
    for t in (torch.tensor([0.0, 0.37, 1.0]), torch.tensor([999.0, 500.0, 3.0])):   # SiT and DiT time
        expected = original_forward(sd, x, t, y)
        with torch.no_grad():
            got = model(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_converter_without_time_fix_differs_and_errors():
    sd = original_checkpoint()
    model = convert_dit_checkpoint(sd, num_attention_heads=HEADS, original_time_embedding=False)
    x = torch.randn(1, IN_CH, 8, 8)
    t, y = torch.tensor([700.0]), torch.tensor([3])
    with torch.no_grad():
        diff = (model(x, timestep=t, class_labels=y).sample - original_forward(sd, x, t, y)).abs().max()
    assert diff > 1e-3        # diffusers' default embedding is not the original one
    with pytest.raises(ValueError, match="num_attention_heads"):
        convert_dit_checkpoint(sd)      # hidden 32 is no released size
    bad = dict(sd, extra=torch.zeros(1))
    with pytest.raises(ValueError, match="does not know"):
        convert_dit_checkpoint(bad, num_attention_heads=HEADS)
    with pytest.raises(ValueError, match="not an original"):
        convert_dit_checkpoint({"foo": torch.zeros(1)})
    shifted = dict(sd, pos_embed=sd["pos_embed"] + 1)
    with pytest.raises(ValueError, match="sin-cos"):
        convert_dit_checkpoint(shifted, num_attention_heads=HEADS)


# --- samplers on Gaussian data, where the exact velocity is known ----------------------------------

MU, S = 1.5, 0.5


class GaussianVelocity(torch.nn.Module):
    """Exact velocity of x_t = t x1 + (1-t) x0, x1 ~ N(MU, S^2), x0 ~ N(0, 1), as a 'transformer'
    with learned-sigma output channels (garbage in the second half)."""

    def __init__(self, channels=4, size=8):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.config = types.SimpleNamespace(in_channels=channels, out_channels=2 * channels, sample_size=size,
                                            num_embeds_ada_norm=1000)
        self.calls = []

    def forward(self, hidden_states, timestep, class_labels):
        t = timestep.reshape(-1, 1, 1, 1).to(hidden_states.dtype)
        self.calls.append(float(timestep[0]))
        var = t**2 * S**2 + (1 - t) ** 2
        v = MU + (t * S**2 - (1 - t)) / var * (hidden_states - t * MU)
        return types.SimpleNamespace(sample=torch.cat([v, torch.full_like(v, 1e6)], dim=1))


@pytest.mark.parametrize("sampler,steps,tol", [("ode-heun", 20, 0.01), ("ode-euler", 200, 0.02), ("sde", 250, 0.04)])
def test_samplers_reach_gaussian_data(sampler, steps, tol):
    pipe = SiTPipeline(transformer=GaussianVelocity(), vae=None, scheduler=SiTScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    x = pipe(class_labels=list(range(64)), num_inference_steps=steps, guidance_scale=1.0, sampler=sampler,
             generator=g, output_type="latent").images
    calls = pipe.transformer.calls
    assert len(calls) == {"ode-heun": 2 * steps, "ode-euler": steps, "sde": steps}[sampler]
    assert calls[0] == 0.0 and max(calls) <= 1.0
    assert abs(x.mean().item() - MU) < tol
    assert abs(x.std().item() - S) < tol


def test_sde_grid_follows_sit_protocol():
    s = SiTScheduler()
    s.set_timesteps(250, "sde")
    assert len(s.timesteps) == 250 and s.timesteps[0] == 0 and abs(float(s.timesteps[-1]) - 0.96) < 1e-12
    s.set_timesteps(10, "ode-euler")
    assert len(s.timesteps) == 10 and float(s.grid[-1]) == 1.0


class LinearVelocity(GaussianVelocity):
    def forward(self, hidden_states, timestep, class_labels):
        v = hidden_states + class_labels.reshape(-1, 1, 1, 1).float()   # null class 1000 -> big offset
        return types.SimpleNamespace(sample=torch.cat([v, v], dim=1))


@pytest.mark.parametrize("guide_channels", [3, None])
def test_guidance_convention(guide_channels):
    pipe = SiTPipeline(transformer=LinearVelocity(), vae=None, scheduler=SiTScheduler())
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([3, 5])
    v = pipe.velocity(x, 0.5, labels, 4.0, guide_channels)
    cond = x + labels.reshape(-1, 1, 1, 1)
    uncond = x + 1000
    guided = uncond + 4.0 * (cond - uncond)
    g = 4 if guide_channels is None else guide_channels
    torch.testing.assert_close(v[:, :g], guided[:, :g])
    torch.testing.assert_close(v[:, g:], cond[:, g:])


def test_tiny_pipeline_runs_and_validates():
    pipe = tiny_sit_pipeline()
    g = torch.Generator().manual_seed(0)
    images = pipe([1, 2], num_inference_steps=2, generator=g, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    assert pipe.get_label_ids("class 3") == [3]
    with pytest.raises(ValueError, match="sampler"):
        pipe([1], sampler="dopri5")
    with pytest.raises(ValueError, match="class_labels"):
        pipe([1001])
    with pytest.raises(ValueError, match="guide_channels"):
        pipe([1], guide_channels=5)


def test_tiny_pipeline_patch_tracks_sit_steps():
    import diffusers_ext as dx

    pipe = tiny_sit_pipeline()
    seen = []
    record = dx.patch(pipe, "mediator", mediators=4)
    original = record.state.update

    def spy(*args):
        original(*args)
        seen.append((record.state.step_index, record.state.num_steps))

    record.state.update = spy
    pipe([1], num_inference_steps=3, sampler="ode-euler", output_type="latent")
    dx.unpatch(pipe)
    assert seen == [(0, 3), (1, 3), (2, 3)]


def test_step_tracker_places_off_grid_sit_times_by_the_schedulers_convention():
    """In distillation the SiT model sees times off the sampling grid: t itself is the progress."""
    import diffusers_ext as dx

    pipe = tiny_sit_pipeline()
    record = dx.patch(pipe, "mediator", mediators=(4, 16), switch_at=(0.5,))
    try:
        x = torch.randn(2, 4, 16, 16)
        with torch.no_grad():
            for t, expected in ((0.2, 0.2), (0.9, 0.9)):
                pipe.transformer(x, timestep=torch.full((2,), t), class_labels=torch.tensor([1, 2]))
                assert record.state.progress == pytest.approx(expected)
    finally:
        dx.unpatch(pipe)
