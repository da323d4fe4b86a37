"""The FID sampler: one seed per sample index, batch invariance, resume after a kill, clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_ext.eval.sampling import SampleConfig, Sampler, run_sampling, sample_seed


def _dit_config(**kw):
    base = dict(model="tiny:dit", num_samples=10, steps=2, cfg_scale=1.5, shard_size=3)
    base.update(kw)
    return SampleConfig(**base)


def _load(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_sample_seeds():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    assert len({sample_seed(s, i) for s in range(3) for i in range(100)}) == 300  # no overlap across base seeds


def _first_model_inputs(model, run):
    """hidden_states of the model's first call during run() (the scaled initial latents, CFG-doubled)."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kw: seen.append((args[0] if args else kw["hidden_states"]).clone()),
                                             with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    return seen[0], out


def _assert_round_off_only(a, b):
    """Images equal up to float32 round-off in batched kernels: at most 1/255 on a few pixels."""
    diff = np.abs(a.astype(int) - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_dit_samples_do_not_depend_on_batch(pipeline_of):
    sampler = Sampler(_dit_config(), pipe=pipeline_of("dit"))
    model = sampler.pipe.transformer
    singles = [_first_model_inputs(model, lambda i=i: sampler.generate([i])) for i in range(4)]
    lat4, batched = _first_model_inputs(model, lambda: sampler.generate([0, 1, 2, 3]))
    for i, (lat1, _) in enumerate(singles):  # each sample's initial noise is bit-identical in any batch
        assert torch.equal(lat1[0], lat4[i]) and torch.equal(lat1[1], lat4[4 + i])
    one_by_one = np.concatenate([img for _, img in singles])
    assert one_by_one.dtype == np.uint8 and one_by_one.shape == (4, 32, 32, 3)
    _assert_round_off_only(one_by_one, batched)
    _assert_round_off_only(sampler.generate([3, 1]), one_by_one[[3, 1]])
    assert one_by_one.std() > 5  # real, varied images
    assert not np.array_equal(one_by_one[0], one_by_one[1])


def test_text_to_image_latents_per_sample(pipeline_of, tmp_path):
    """SD takes `latents=`, built here from each sample's own generator."""
    (tmp_path / "p.txt").write_text("a red cube\n\na blue sphere\n")
    sampler = Sampler(SampleConfig(model="tiny:sd", num_samples=4, steps=2, prompts_file=str(tmp_path / "p.txt")),
                      pipe=pipeline_of("sd"))
    assert sampler.latent_shape == (4, 32, 32) and sampler.prompts == ["a red cube", "a blue sphere"]
    unet = sampler.pipe.unet
    singles = [_first_model_inputs(unet, lambda i=i: sampler.generate([i])) for i in range(2)]
    lat3, batched = _first_model_inputs(unet, lambda: sampler.generate([0, 1]))
    for i, (lat1, _) in enumerate(singles):
        assert torch.equal(lat1[0], lat3[i])
    _assert_round_off_only(np.concatenate([img for _, img in singles]), batched)


def test_resume_after_kill_equals_uninterrupted(pipeline_of, tmp_path, monkeypatch):
    pipe = pipeline_of("dit")
    full = run_sampling(_dit_config(), tmp_path / "full", batch_size=2, pipe=pipe, progress=False)
    reference = _load(full["npz"])
    assert reference["arr_0"].shape == (10, 32, 32, 3) and reference["arr_1"].shape == (10,)

    # Killed in the middle of the third chunk: two shards on disk, nothing half-written.
    calls = {"n": 0}
    original = Sampler.generate

    def dying(self, indices):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, indices)

    monkeypatch.setattr(Sampler, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_sampling(_dit_config(), tmp_path / "run", batch_size=2, pipe=pipe, progress=False)
    monkeypatch.setattr(Sampler, "generate", original)
    assert sorted(p.name for p in (tmp_path / "run" / "shards").iterdir()) == ["chunk_000000.npz", "chunk_000001.npz"]
    assert not (tmp_path / "run" / "samples.npz").exists()

    # Restart with another batch size that still divides the chunks the same way, and PNG output too.
    resumed = run_sampling(_dit_config(), tmp_path / "run", batch_size=3, formats=("npz", "png"), pipe=pipe,
                           progress=False)
    assert resumed["generated"] == 10 - 6
    again = _load(resumed["npz"])
    np.testing.assert_array_equal(again["arr_0"], reference["arr_0"])
    np.testing.assert_array_equal(again["arr_1"], reference["arr_1"])
    from PIL import Image

    pngs = sorted((tmp_path / "run" / "png").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(10)]
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[7])), reference["arr_0"][7])
    # A finished run re-run does nothing but merge again.
    assert run_sampling(_dit_config(), tmp_path / "run", pipe=pipe, progress=False)["generated"] == 0


def test_balanced_classes_and_config_guard(pipeline_of, tmp_path):
    pipe = pipeline_of("dit")
    cfg = _dit_config(num_samples=6, classes="balanced", num_classes=3, shard_size=6)
    out = run_sampling(cfg, tmp_path, batch_size=6, pipe=pipe, progress=False)
    assert _load(out["npz"])["arr_1"].tolist() == [0, 1, 2, 0, 1, 2]
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["classes"] == "balanced" and stored["num_samples"] == 6
    with pytest.raises(ValueError, match="other settings.*seed"):
        run_sampling(_dit_config(num_samples=6, classes="balanced", num_classes=3, shard_size=6, seed=1), tmp_path,
                     pipe=pipe, progress=False)


def test_bad_options_are_clear(pipeline_of, tmp_path):
    pipe = pipeline_of("dit")
    with pytest.raises(ValueError, match="at least 1"):
        run_sampling(_dit_config(num_samples=0), tmp_path / "a", pipe=pipe)
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        run_sampling(_dit_config(prompts_file=str(tmp_path / "missing.txt")), tmp_path / "a", pipe=pipe)
    with pytest.raises(ValueError, match="takes no prompts"):
        (tmp_path / "p.txt").write_text("x\n")
        Sampler(_dit_config(prompts_file=str(tmp_path / "p.txt")), pipe=pipe)
    with pytest.raises(ValueError, match="--format"):
        run_sampling(_dit_config(), tmp_path / "a", formats=("jpg",), pipe=pipe)
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="not writable"):
        run_sampling(_dit_config(), tmp_path / "file" / "out", pipe=pipe)
    transformer = pipe.transformer
    try:  # a class-conditional model whose class count cannot be read
        transformer.register_to_config(num_embeds_ada_norm=None)
        labels, pipe.labels = getattr(pipe, "labels", None), None
        with pytest.raises(ValueError, match="--num-classes"):
            Sampler(_dit_config(), pipe=pipe)
    finally:
        transformer.register_to_config(num_embeds_ada_norm=1000)
        pipe.labels = labels
    sd = pipeline_of("sd")
    with pytest.raises(ValueError, match="--prompts FILE"):
        Sampler(SampleConfig(model="tiny:sd"), pipe=sd)


def test_patched_pipeline_is_sampled_per_index(pipeline_of):
    import diffusers_ext as dx

    if not hasattr(dx, "patch"):
        pytest.skip("diffusers_ext.patch is not available")
    pipe = pipeline_of("dit")
    stock = Sampler(_dit_config(), pipe=pipe).generate([0, 1])
    try:
        sampler = Sampler(_dit_config(method="mediator", options={"mediators": 16}), pipe=pipe)
        assert dx.patch_record(pipe) is not None
        patched = sampler.generate([0, 1])
        np.testing.assert_array_equal(np.concatenate([sampler.generate([0]), sampler.generate([1])]), patched)
        assert not np.array_equal(patched, stock)
    finally:
        dx.unpatch(pipe, missing_ok=True)


def test_cli_sample_then_fid_against_itself(tmp_path):
    from diffusers_ext.cli import main

    run = tmp_path / "run"
    assert main(["sample", "--model", "tiny:dit", "--num-samples", "6", "--steps", "2", "--shard-size", "4",
                 "--output-dir", str(run), "--format", "npz,png", "--no-progress"]) == 0
    assert main(["fid", str(run / "samples.npz"), str(run / "png"), "--json", str(tmp_path / "r.json"),
                 "--cache-dir", str(tmp_path / "cache"), "--save-stats", str(tmp_path / "s.npz"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fid"] == pytest.approx(0.0, abs=1e-6) and report["sfid"] == pytest.approx(0.0, abs=1e-6)
    assert report["precision"] == 1.0 and report["recall"] == 1.0
    assert report["inception_score"] is None and "softmax" in report["unavailable"]["inception_score"]
    assert any("6 samples" in w for w in report["warnings"])
    # Saved statistics reused as the reference give the same number.
    assert main(["fid", str(run / "samples.npz"), str(tmp_path / "s.npz"), "--json", str(tmp_path / "r2.json"),
                 "--metrics", "fid", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "r2.json").read_text())["fid"] == pytest.approx(0.0, abs=1e-6)
    # Errors come back as exit code 2 with a message, not a traceback.
    assert main(["fid", str(tmp_path / "nope.npz"), str(run / "png")]) == 2
    assert main(["sample", "--model", "tiny:dit", "--num-samples", "0", "--output-dir", str(run / "x")]) == 2


def test_two_processes_give_the_same_samples_as_one(tmp_path):
    """torchrun with 2 CPU processes (accelerate launch --cpu starts only one) vs a single process
    (this one, on one thread like each of the two). In the default suite: docs/fid.md calls it tested."""
    from diffusers_ext.cli import main

    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["sample", "--model", "tiny:dit", "--num-samples", "8", "--steps", "2", "--shard-size", "2",
            "--batch-size", "2", "--no-progress"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                          "diffusers_ext.cli", *args, "--output-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert "4 drawn now by process 0 of 2" in two.stdout
    np.testing.assert_array_equal(_load(tmp_path / "one" / "samples.npz")["arr_0"],
                                  _load(tmp_path / "two" / "samples.npz")["arr_0"])
