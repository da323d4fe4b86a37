"""Quality lab II (diffusers_ext/lab): the glyph data, the models' token counts, resumable training."""

import math
from pathlib import Path

import pytest
import torch

import diffusers_ext as dx
from diffusers_ext.lab import data, models
from diffusers_ext.lab import train as lab_train

FONTS = data.font_files()
NOTO_ARABIC = "/usr/share/fonts/truetype/noto/NotoSansArabic-Regular.ttf"   # digits, no Latin letters
DEJAVU = [p for p in FONTS if "/dejavu/DejaVuSans" in p][:3]
needs_fonts = pytest.mark.skipif(len(FONTS) < 300 or not Path(NOTO_ARABIC).is_file(),
                                 reason="the lab fonts are not installed (bash setup.sh)")
TINY = {  # one-block / few-channel versions of the three models
    "dit": dict(num_layers=1, num_attention_heads=1, attention_head_dim=16),
    "unet": dict(block_out_channels=(32, 32, 32), attention_head_dim=1, cross_attention_dim=32),
    "classifier": dict(width=8),
}


@pytest.fixture(scope="module")
def glyphs():
    return data.load_glyphs()


@pytest.fixture(scope="module")
def small():
    if len(DEJAVU) < 3:
        pytest.skip("needs Debian's fonts-dejavu-core (bash setup.sh)")
    return data.load_glyphs(DEJAVU)


@needs_fonts
def test_data_classes_fonts_and_split(glyphs):
    stats = glyphs.stats()
    assert data.CLASSES == tuple("0123456789") + tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
    # the set-up's packages give 115 usable fonts (docs/lab.md), 36 images each, 4 held-out designs
    assert (stats["fonts"], stats["images"]) == (115, 115 * 36)
    assert glyphs.images.shape == (115 * 36, 1, 32, 32) and glyphs.images.dtype == torch.float32
    assert glyphs.images.min() >= -1 and glyphs.images.max() <= 1
    for f in range(len(glyphs.fonts)):                       # every font has every class exactly once
        assert sorted(glyphs.labels[glyphs.font == f].tolist()) == list(range(36))
    held = {glyphs.fonts[i].group for i in glyphs.font[glyphs.held_out].tolist()}
    train = {glyphs.fonts[i].group for i in glyphs.font[~glyphs.held_out].tolist()}
    assert held == set(data.HELD_OUT) and not held & train
    assert {f.family for f in glyphs.fonts if f.group == "Nimbus Sans"} >= {"FreeSans", "Nimbus Sans"}
    assert stats["held_out_images"] == 900 and stats["train_images"] == 3240
    assert [f.path for f in glyphs.fonts] == sorted(f.path for f in glyphs.fonts)


def test_data_is_deterministic(small):
    again = data.load_glyphs(list(reversed(DEJAVU)))         # order of the paths does not matter
    assert again.fingerprint() == small.fingerprint()
    assert torch.equal(again.images, small.images)


def test_glyphs_are_centred_and_fill_the_glyph_box(small):
    ink = (small.images[:, 0] > 0)                            # (N, 32, 32)
    rows = ink.any(2)                                         # (N, 32): rows with ink
    heights = rows.sum(1).view(-1, 36).max(1).values          # tallest glyph of each font
    assert ((heights >= data.GLYPH_BOX[0] - 2) & (heights <= data.GLYPH_BOX[0] + 1)).all()
    ys = torch.arange(32.0)
    centre = (rows * ys).sum(1) / rows.sum(1)                 # centre of the ink rows, one per image
    assert ((centre - 15.5).abs() <= 1.0).all()


@needs_fonts
def test_a_font_missing_glyphs_is_skipped():
    assert data.missing_glyph(NOTO_ARABIC) == "A"             # has 0-9, not the Latin capitals
    assert data.missing_glyph(DEJAVU[0]) is None
    kept = data.load_glyphs([NOTO_ARABIC, *DEJAVU[:1]])
    assert [f.path for f in kept.fonts] == DEJAVU[:1]
    assert kept.skipped == [(NOTO_ARABIC, "lacks 'A'")]
    symbol = [p for p in FONTS if p.endswith("StandardSymbolsPS.otf")]
    assert data.load_glyphs(symbol + DEJAVU[:1]).skipped == [(symbol[0], "symbol font")]


def test_batches_are_a_function_of_seed_and_step(small):
    images, labels = small.split(held_out=False)
    a = data.batch_at(images, labels, 8, step=5, seed=1)
    b = data.batch_at(images, labels, 8, step=5, seed=1)
    c = data.batch_at(images, labels, 8, step=6, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    per_epoch = len(images) // 8                              # one epoch visits distinct images
    seen = torch.cat([data.batch_at(images, torch.arange(len(images)), 8, s, 1)[1] for s in range(per_epoch)])
    assert len(set(seen.tolist())) == per_epoch * 8


@pytest.mark.parametrize("kind", lab_train.KINDS)
def test_training_resumes_bit_exactly(kind, small, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_twice(kind, small, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _train_twice(kind, small, tmp_path):
    """3 steps in one go and 1 + 2 with a resume between: identical models, EMA, optimizer, export."""
    config = lab_train.with_config(kind, steps=3, batch_size=4, warmup=1)
    whole, split = tmp_path / "whole", tmp_path / "split"
    lab_train.train(kind, whole, config=config, model_overrides=TINY[kind], glyphs=small, log=lambda _: None)
    lab_train.train(kind, split, config=config, model_overrides=TINY[kind], glyphs=small, stop_at_step=1,
                    log=lambda _: None)
    first = torch.load(split / "checkpoint.pt", weights_only=False)
    assert first["record"]["step"] == 1
    with pytest.raises(FileExistsError, match="--resume"):
        lab_train.train(kind, split, config=config, glyphs=small, log=lambda _: None)
    lab_train.train(kind, split, resume=True, glyphs=small, log=lambda _: None)
    a = torch.load(whole / "checkpoint.pt", weights_only=False)
    b = torch.load(split / "checkpoint.pt", weights_only=False)
    assert a["record"]["step"] == b["record"]["step"] == 3
    for part in ("model", "ema"):
        if a[part] is None:
            continue
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
        assert not all(torch.equal(a[part][k], first[part][k]) for k in a[part])   # steps 2, 3 changed it
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(state_a[i]["exp_avg_sq"], state_b[i]["exp_avg_sq"]) for i in state_a)
    exported = lab_train.load_weights(kind, split)
    expected = b["ema"] if b["ema"] is not None else b["model"]
    assert all(torch.equal(v, expected[k]) for k, v in exported.state_dict().items())


def test_the_schedule_restarts_warm_where_a_run_was_extended():
    factor = lab_train._schedule(lab_train.TrainConfig(steps=10, batch_size=1, lr=1.0, warmup=2, restarts=(6,)))
    assert [factor(s) for s in (6, 7, 8, 9)] == pytest.approx([0.5, 1.0, 1.0, 0.5])   # warm-up 2, cosine over 4
    plain = lab_train._schedule(lab_train.TrainConfig(steps=6, batch_size=1, lr=1.0, warmup=2))
    assert [plain(s) for s in (0, 1, 5)] == pytest.approx([0.5, 1.0, 0.5 * (1 + math.cos(math.pi * 3 / 4))])


def test_a_finished_run_is_extended_bit_exactly_across_a_resume(small, tmp_path):
    """2 steps, then extended to 4 in one call, or to 3 and resumed: the same run; refusals first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = lab_train.with_config("classifier", steps=2, batch_size=4, warmup=1)
    quiet = dict(glyphs=small, log=lambda _: None)
    try:
        with pytest.raises(FileNotFoundError, match="no run to extend"):
            lab_train.train("classifier", tmp_path / "none", extend_to=4, resume=True, **quiet)
        for name in ("whole", "split"):
            lab_train.train("classifier", tmp_path / name, config=config, model_overrides=TINY["classifier"], **quiet)
        finished = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
        with pytest.raises(ValueError, match=r"extend_to \(2\) must be beyond the step the run reached \(2\)"):
            lab_train.train("classifier", tmp_path / "whole", resume=True, extend_to=2, **quiet)
        lab_train.train("classifier", tmp_path / "whole", resume=True, extend_to=4, **quiet)
        lab_train.train("classifier", tmp_path / "split", resume=True, extend_to=4, stop_at_step=3, **quiet)
        lab_train.train("classifier", tmp_path / "split", resume=True, **quiet)
    finally:
        torch.set_num_threads(threads)
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=False) for n in ("whole", "split"))
    assert a["record"]["step"] == b["record"]["step"] == 4
    assert a["config"]["steps"] == 4 and tuple(a["config"]["restarts"]) == (2,) == tuple(b["config"]["restarts"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not all(torch.equal(a["model"][k], finished["model"][k]) for k in a["model"])


def test_lab_train_cli_says_what_is_wrong_with_an_extension(tmp_path, capsys):
    from diffusers_ext.lab.__main__ import main as lab_main

    with pytest.raises(SystemExit) as exit:
        lab_main(["train", "dit", "--out", str(tmp_path / "run"), "--extend-to", "10"])
    assert exit.value.code == 2 and "no run to extend" in capsys.readouterr().err


def _tokens_at(model, names, call):
    """{attention module name: tokens of its input} for one call."""
    seen, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        def hook(module, args, kwargs, name=name):
            seen[name] = (args[0] if args else kwargs["hidden_states"]).shape[1]

        handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_dit_attends_over_1024_tokens():
    model = models.glyph_transformer().eval()
    assert model.config.num_layers == 6 and model.config.num_attention_heads * model.config.attention_head_dim == 96
    names = [f"transformer_blocks.{i}.attn1" for i in range(model.config.num_layers)]
    tokens = _tokens_at(model, names, lambda: model(torch.zeros(1, 1, 32, 32), timestep=torch.tensor([0.5]),
                                                   class_labels=torch.tensor([3])))
    assert set(tokens.values()) == {1024}
    record = dx.patch(model, "mediator", mediators=16)
    assert sorted(record.sites) == sorted(names)
    dx.unpatch(model)


def test_unet_finest_self_attention_has_1024_tokens_and_sd_methods_act_on_it():
    unet = models.glyph_unet().eval()
    finest = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    level0 = {n for n, _ in unet.named_modules()
              if n.endswith("attn1") and n.startswith(("down_blocks.0.", "up_blocks.2."))}
    assert len(level0) == 3                                   # 1 down + 2 up blocks at 32 x 32, as SD's finest level
    prompt = models.ClassTokens(unet.config.cross_attention_dim)(torch.tensor([0, 36]))
    assert prompt.shape == (2, models.CLASS_TOKENS, unet.config.cross_attention_dim)
    call = lambda: unet(torch.zeros(2, 1, 32, 32), torch.tensor(500), encoder_hidden_states=prompt)  # noqa: E731
    tokens = _tokens_at(unet, [*level0, finest.replace("attn1", "attn2")], call)
    assert set(tokens.values()) == {1024} and len(tokens) == 4
    stock = call().sample
    for method in ("agent", "todo"):
        record = dx.patch(unet, method)
        assert record.family == "sd"
        if method == "todo":                                  # ToDo: the finest level only (max_downsample 1)
            assert set(record.sites) == level0
        else:                                                 # agent: the finest level always acts
            processors = record.processors()
            assert level0 <= set(processors) and all(processors[s].finest for s in level0)
        out = call().sample
        assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()
        assert not torch.allclose(out, stock)                 # it acts on this model
        dx.unpatch(unet)
        assert torch.equal(call().sample, stock)


def test_export_and_pipelines_of_tiny_runs(small, tmp_path):
    """Tiny finished runs export to a shipped-style folder; both pipelines load it and sample 32 x 32 glyphs;
    the UNet pipeline's guidance is eps_null + g (eps_cond - eps_null), checked against a hand-written DDIM step."""
    from diffusers_ext.lab import pipelines

    runs, to = tmp_path / "runs", tmp_path / "glyphs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind in lab_train.KINDS:
            config = lab_train.with_config(kind, steps=2, batch_size=4, warmup=1)
            stop = 1 if kind == "classifier" else None
            lab_train.train(kind, runs / kind, config=config, model_overrides=TINY[kind], glyphs=small,
                            stop_at_step=stop, log=lambda _: None)
        with pytest.raises(ValueError, match="stopped at step 1 of 2"):    # an unfinished run is refused
            pipelines.export(runs, to, glyphs=small, statistics=False, log=lambda _: None)
        assert not to.exists()
        lab_train.train("classifier", runs / "classifier", resume=True, glyphs=small, log=lambda _: None)
        pipelines.export(runs, to, glyphs=small, statistics=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert {p.name for p in to.iterdir()} == {"transformer", "unet", "class_tokens.safetensors",
                                             "classifier.safetensors", "training.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no staging folder left behind

    sit = pipelines.glyph_sit_pipeline(to)
    dit = lab_train.load_weights("dit", runs / "dit")
    assert all(torch.equal(v, dit.state_dict()[k]) for k, v in sit.transformer.state_dict().items())
    images = sit(class_labels=[0, 35], num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()

    pipe = pipelines.glyph_unet_pipeline(to)
    pipe.set_progress_bar_config(disable=True)
    wrapped = lab_train.load_weights("unet", runs / "unet")
    assert torch.equal(pipe.class_tokens.embedding.weight, wrapped.tokens.embedding.weight)
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 20])
    seen, step = [], pipe.scheduler.step
    pipe.scheduler.step = lambda eps, t, x, **kw: seen.append(eps) or step(eps, t, x, **kw)
    out = pipe(class_labels=labels, num_inference_steps=1, guidance_scale=3.0, latents=noise, output_type="pt").images
    assert pipe.scheduler.config.prediction_type == "v_prediction"   # the run's target (the default)
    with torch.no_grad():                                     # one DDIM step from t = 999 to x0, by hand
        t = 999
        v_cond = wrapped(noise, torch.tensor(t), labels)
        v_null = wrapped(noise, torch.tensor(t), torch.full_like(labels, 36))
        v = v_null + 3.0 * (v_cond - v_null)
        alpha = pipe.scheduler.alphas_cumprod[t].double()
        x0 = (alpha.sqrt() * noise.double() - (1 - alpha).sqrt() * v.double()).clamp(-1, 1)   # v = sqrt(a) eps - sqrt(1-a) x0
    assert torch.allclose(seen[0], v, atol=1e-5)               # batched (guidance) vs separate calls: float32 rounding
    assert torch.allclose(out.double(), (x0 + 1) / 2, atol=1e-4)
    with pytest.raises(ValueError, match=r"class ids in \[0, 35\]"):
        pipe(class_labels=[36], num_inference_steps=1)
    record = dx.patch(pipe, "todo")                           # the SD methods patch the pipeline
    assert record.family == "sd"
    dx.unpatch(pipe)


def test_data_statistics_are_kept_per_data_and_reused(small, tmp_path, monkeypatch):
    """`data_statistics` stores mean / covariance of the features of every glyph (uint8 RGB, as the FID
    tool sees them) with the data's fingerprint; the same data reuses the file, other data recomputes it.
    The Inception network is replaced by the flattened pixels, so the expected values are plain numpy."""
    import numpy as np

    from diffusers_ext.eval import inception
    from diffusers_ext.lab import pipelines

    calls = []

    def pixel_features(network, chunks, total, desc):
        batches = list(chunks)
        calls.append(sum(len(b) for b in batches))
        return {"pool": np.concatenate([b.reshape(len(b), -1)[:, :64].astype(np.float64) for b in batches])}

    monkeypatch.setattr(inception, "extract_features", pixel_features)
    monkeypatch.setattr(inception, "InceptionNetwork", lambda: None)
    path = tmp_path / "stats" / "fid_reference.npz"
    one = data.load_glyphs(DEJAVU[:1])
    assert pipelines.data_statistics(path, one, log=lambda _: None) == path and calls == [36]
    grey = np.rint((one.images.numpy()[:, 0] + 1) / 2 * 255).reshape(36, -1)   # R = G = B: pixel p is column 3p
    features = np.repeat(grey, 3, axis=1)[:, :64]
    with np.load(path) as saved:
        assert saved["mu"].dtype == np.float32 and int(saved["count"]) == 36
        assert str(saved["fingerprint"]) == one.fingerprint()
        np.testing.assert_allclose(saved["mu"], features.mean(0), rtol=1e-6)
        np.testing.assert_allclose(saved["sigma"], np.cov(features, rowvar=False), rtol=1e-5, atol=1e-3)
    before = path.read_bytes()
    pipelines.data_statistics(path, one, log=lambda _: None)                 # the same data: kept
    assert calls == [36] and path.read_bytes() == before
    messages = []
    pipelines.data_statistics(path, data.load_glyphs(DEJAVU[1:2]), log=messages.append)   # other data: recomputed
    assert calls == [36, 36] and path.read_bytes() != before and "other glyph data" in messages[0]
    assert [p.name for p in path.parent.iterdir()] == ["fid_reference.npz"]  # no temporary file left


def test_unet_loss_targets_velocity_or_epsilon(small):
    """v = sqrt(a) eps - sqrt(1 - a) x0 (written here, not diffusers' get_velocity); epsilon for old runs."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    model = lab_train.build_model("unet", TINY["unet"])
    images, labels = small.images[:4], small.labels[:4]
    scheduler = DDPMScheduler()
    for prediction in ("v_prediction", "epsilon"):
        config = lab_train.with_config("unet", bf16=False, uncond_prob=0.0, prediction=prediction)
        loss = lab_train.step_loss("unet", model, images, labels, torch.Generator().manual_seed(3), config, scheduler)
        g = torch.Generator().manual_seed(3)
        torch.rand(4, generator=g)                                          # the label-dropout draw
        noise = torch.randn(images.shape, generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * images + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * images if prediction == "v_prediction" else noise
        with torch.no_grad():
            expected = torch.nn.functional.mse_loss(model(xt, t, labels), target)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)


def test_the_training_target_is_the_unets_alone_and_a_known_one():
    with pytest.raises(ValueError, match="prediction must be one of epsilon, v_prediction, got 'sample'"):
        lab_train.with_config("unet", prediction="sample")
    for kind in ("dit", "classifier"):
        with pytest.raises(ValueError, match=f"prediction is the UNet's training target; a {kind} run has none"):
            lab_train.with_config(kind, prediction="v_prediction")
