"""Bad input and faults (issue 14), grouped by class: nothing lost or mixed, no wrong result without
a word, one clear line instead of a traceback, defaults that follow the model's recipe. Each case
states what the old code did."""

import fcntl
import functools
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusers_ext as dx
from diffusers_ext.cli import main
from diffusers_ext.errors import DiffusersExtError, OptionError, PatchError, TrainingError
from diffusers_ext.eval.sampling import LOCK_FILE, SampleConfig, Sampler, run_sampling

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _dit(**kw):
    return SampleConfig(**{"model": "tiny:dit", "num_samples": 4, "steps": 1, "cfg_scale": 1.5, "shard_size": 2, **kw})


def _load(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffusers-ext")]
    assert len(lines) == 1, lines
    return lines[0]


def _sample_argv(out, *extra):
    return ["sample", "--model", "tiny:dit", "--num-samples", "4", "--steps", "1", "--shard-size", "2",
            "--output-dir", str(out), "--no-progress", *extra]


# =============================================================================================
# Losing or mixing data


def test_sample_refuses_an_npz_another_run_wrote(pipeline_of, tmp_path):
    """Old: run B's --npz silently replaced run A's file."""
    pipe, shared = pipeline_of("dit"), tmp_path / "shared.npz"
    run_sampling(_dit(), tmp_path / "a", npz_path=shared, pipe=pipe, progress=False)
    before = shared.read_bytes()
    with pytest.raises(FileExistsError, match=rf"--npz {shared}.*--overwrite"):
        run_sampling(_dit(seed=1), tmp_path / "b", npz_path=shared, pipe=pipe, progress=False)
    assert shared.read_bytes() == before
    assert not (tmp_path / "b" / "config.json").exists()           # refused before any work
    run_sampling(_dit(), tmp_path / "a", npz_path=shared, pipe=pipe, progress=False)   # its own run: fine
    run_sampling(_dit(seed=1), tmp_path / "b", npz_path=shared, pipe=pipe, progress=False, overwrite=True)
    own = run_sampling(_dit(seed=1), tmp_path / "c", pipe=pipe, progress=False)
    np.testing.assert_array_equal(_load(shared)["arr_0"], _load(own["npz"])["arr_0"])


def test_sample_never_mixes_two_runs_in_a_png_folder(pipeline_of, tmp_path):
    """Old: PNGs were written into the existing folder one by one: another run's extra images stayed
    beside the new ones, and a later FID scored both."""
    from PIL import Image

    pipe, folder = pipeline_of("dit"), tmp_path / "png"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "000099.png")   # another run's image
    with pytest.raises(FileExistsError, match=rf"--png-dir {folder}.*--overwrite"):
        run_sampling(_dit(), tmp_path / "a", formats=("png",), png_dir=folder, pipe=pipe, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["000099.png"]
    run_sampling(_dit(), tmp_path / "a", formats=("png",), png_dir=folder, pipe=pipe, progress=False, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(4)]   # a fresh set only
    assert not any(p.name.startswith(".png") for p in tmp_path.iterdir())                  # no partial set left
    # the run's own folder is rewritten without --overwrite
    run_sampling(_dit(), tmp_path / "a", formats=("png",), png_dir=folder, pipe=pipe, progress=False)


def test_a_second_sample_on_a_folder_in_use_stops_with_a_clear_message(pipeline_of, tmp_path):
    """Old: both processes redid the whole run."""
    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_FILE, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)      # another process works in the folder
        held.write("pid 4242 on host")
        held.flush()
        with pytest.raises(BlockingIOError, match=r"in use by another .*pid 4242.*run this command again"):
            run_sampling(_dit(), out, pipe=pipeline_of("dit"), progress=False)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]    # it wrote nothing
    run_sampling(_dit(), out, pipe=pipeline_of("dit"), progress=False)   # once free, the run goes on
    assert not (out / LOCK_FILE).exists()                          # a finished run leaves no lock behind


def test_a_lock_file_removed_by_its_holder_is_not_trusted(tmp_path, monkeypatch):
    """The race that removing the lock opens: a run opens .lock, the holder removes it and lets go,
    the run locks the removed file. It must see that and lock the folder's current file instead."""
    from types import SimpleNamespace

    from diffusers_ext.eval import sampling

    out = tmp_path / "run"
    out.mkdir()
    state = SimpleNamespace(is_main_process=True, num_processes=1)
    real_open, opened = open, []

    def open_then_holder_removes(path, *args, **kwargs):
        handle = real_open(path, *args, **kwargs)
        if str(path).endswith(LOCK_FILE) and not opened:
            Path(path).unlink()                                     # the previous holder finished meanwhile
        opened.append(path)
        return handle

    monkeypatch.setattr("builtins.open", open_then_holder_removes)
    with sampling._folder_lock(out, state):
        assert (out / LOCK_FILE).read_text().startswith("pid ")   # the folder's own file is the one held
        assert len(opened) == 2
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("bad", [dict(cfg_scale=float("nan")), dict(method="agent"), dict(height=24)])
def test_a_refused_sample_run_leaves_nothing_behind(bad, pipeline_of, tmp_path):
    """Old: config.json was written before the model-dependent checks (a method the model does not
    fit, a size the pipeline does not take) and before cfg was checked (NaN passed), and the
    corrected command was then refused as "a run with other settings"."""
    out = tmp_path / "run"
    with pytest.raises(ValueError):
        run_sampling(_dit(**bad), out, pipe=pipeline_of("dit"), progress=False)
    assert not out.exists()
    run_sampling(_dit(), out, pipe=pipeline_of("dit"), progress=False)    # the corrected command runs


def test_a_config_without_shards_does_not_block_a_corrected_command(pipeline_of, tmp_path):
    """A config.json left by an older version (or a run stopped before its first shard) holds no
    samples: it is replaced. With shards, other settings are still refused."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**_dit(seed=7).identity(), "num_samples": 99}))
    run_sampling(_dit(), out, pipe=pipeline_of("dit"), progress=False)
    assert json.loads((out / "config.json").read_text())["seed"] == 0
    with pytest.raises(ValueError, match="other settings"):
        run_sampling(_dit(seed=3), out, pipe=pipeline_of("dit"), progress=False)
    # a finished run whose shards were deleted still owns its samples.npz
    run_sampling(_dit(), tmp_path / "done", pipe=pipeline_of("dit"), progress=False, delete_shards=True)
    with pytest.raises(ValueError, match="other settings"):
        run_sampling(_dit(seed=3), tmp_path / "done", pipe=pipeline_of("dit"), progress=False)


def test_result_files_honour_the_umask_in_sample(pipeline_of, tmp_path):
    """Already fixed on main (files.temp_path): shards, config.json, outputs.json and samples.npz are
    0666 & ~umask."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        run_sampling(_dit(), tmp_path / "run", pipe=pipeline_of("dit"), progress=False)
    finally:
        os.umask(old)
    for path in [*(tmp_path / "run").glob("*.json"), tmp_path / "run" / "samples.npz",
                 *(tmp_path / "run" / "shards").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


@pytest.fixture
def no_work(monkeypatch):
    """Every command must refuse before loading a model or computing features."""
    import diffusers_ext.eval.scoring as scoring
    import diffusers_ext.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    monkeypatch.setattr(scoring.Extractor, "features", refuse)


@pytest.mark.parametrize("argv, flag", [
    (["compare", "--model", "tiny:dit", "--out", "{blocker}/x.png"], "--out"),
    (["compare", "--model", "tiny:dit", "--out", "{tmp}/ok.png", "--json", "{blocker}/s.json"], "--json"),
    (["animate", "--out", "{blocker}/a.gif"], "--out"),
    (["distill", "tiny:dit", "t5", "--output-dir", "{blocker}/out"], "--output-dir"),
    (["sample", "--model", "tiny:dit", "--output-dir", "{blocker}/run"], "output folder"),
    (["sample", "--model", "tiny:dit", "--output-dir", "{tmp}/run", "--npz", "{blocker}/s.npz"], "--npz"),
    (["fid", "{images}", "{images}", "--json", "{blocker}/r.json"], "--json"),
    (["fid", "{images}", "{images}", "--save-stats", "{blocker}/s.npz"], "--save-stats"),
    (["fid-stats", "{images}", "{blocker}/stats.npz"], "OUTPUT"),
])
def test_output_paths_are_checked_before_any_work_and_named(argv, flag, no_work, tmp_path, capsys):
    """Old: checked after the work, and the error named a temporary file (.r.json.abc123.tmp)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    images = tmp_path / "images.npz"
    np.savez(images, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    argv = [a.format(blocker=blocker, tmp=tmp_path, images=images) for a in argv]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert flag in line and str(blocker) in line and ".tmp" not in line, line
    assert not (tmp_path / "run").exists()


def test_atomic_writes_name_the_real_path_on_failure(tmp_path):
    from diffusers_ext.files import atomic_write_text

    with pytest.raises(OSError, match=rf"cannot write {tmp_path}/missing/r\.json") as err:
        atomic_write_text(tmp_path / "missing" / "r.json", "{}")
    assert ".tmp" not in str(err.value)


# =============================================================================================
# Wrong results without a word


def test_distill_refuses_non_finite_numbers_before_loading(no_work, tmp_path, capsys):
    """Old: `distill --lr nan` trained to NaN, saved the weights, wrote NaN into JSON and exited 0."""
    with pytest.raises(SystemExit) as exit:
        main(["distill", "tiny:dit", "t5", "--output-dir", str(tmp_path / "out"), "--lr", "nan"])
    assert exit.value.code == 2 and "--lr: must be a finite number" in capsys.readouterr().err
    from diffusers_ext.distill import DistillConfig

    for field in ("lr", "inherited_lr", "weight_decay", "uncond_prob", "max_grad_norm"):
        with pytest.raises(ValueError, match=f"{field} must be a finite number"):
            DistillConfig(output_dir=str(tmp_path), **{field: float("inf")})
    assert not (tmp_path / "out").exists()


class _Config:
    output_dir: str
    max_steps = 4
    weight_decay = 0.0
    warmup_steps = 0
    max_grad_norm = None
    ema_decay = 0.0
    gradient_accumulation_steps = 1
    mixed_precision = "no"
    cpu = True
    checkpoint_every = 1
    keep_checkpoints = 0
    resume = None
    progress = False


def _loop(tmp_path):
    from dataclasses import make_dataclass

    from diffusers_ext.distill.loop import TrainingLoop, make_accelerator

    fields = [(k, type(v), v) for k, v in vars(_Config).items() if not k.startswith("_") and k != "output_dir"]
    config = make_dataclass("C", [("output_dir", str, str(tmp_path)), *fields])()
    model = torch.nn.Linear(2, 1)
    saved = []
    loop = TrainingLoop(make_accelerator(config), config, model, [{"params": list(model.parameters()), "lr": 0.1}],
                        save_weights=lambda folder: (folder.mkdir(parents=True), saved.append(folder.name)),
                        load_weights=lambda folder: None)
    return loop, model, saved


def test_a_non_finite_loss_stops_training_and_saves_nothing_more(tmp_path):
    loop, model, saved = _loop(tmp_path)
    x = torch.ones(3, 2)
    with pytest.raises(TrainingError, match=r"loss is nan at optimizer step 3.*saved nothing"):
        loop.run(lambda i: model(x).pow(2).mean() * (float("nan") if i == 2 else 1.0))
    assert saved == ["checkpoint-1", "checkpoint-2"]         # the finite ones before it, nothing after
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_weights_are_never_saved(tmp_path):
    """The loss was finite but the step made the weights inf (a learning rate far too high)."""
    loop, model, saved = _loop(tmp_path)
    x = torch.ones(3, 2)

    def loss(i):
        if i == 1:
            with torch.no_grad():
                model.weight.fill_(float("inf"))
        return model(x).pow(2).mean().clamp(max=1.0)

    with pytest.raises(TrainingError, match="hold nan or inf after step 2"):
        loop.run(loss)
    assert saved == ["checkpoint-1"]


def test_guidance_must_be_finite_everywhere(pipeline_of, tmp_path, capsys):
    """Old: `--guidance-scale nan` turned guidance off without a word."""
    from diffusers_ext.pipeline_io import PipelineCallError, call_kwargs

    for argv in (["compare", "--guidance-scale", "nan"], ["animate", "--guidance-scale", "inf"],
                 ["sample", "--model", "tiny:dit", "--output-dir", str(tmp_path / "r"), "--cfg-scale", "nan"]):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2 and "must be a finite number" in capsys.readouterr().err
    with pytest.raises(PipelineCallError, match="finite"):
        call_kwargs(pipeline_of("dit"), "", 0, 1, float("nan"), None, None, 0)
    with pytest.raises(ValueError, match="--cfg-scale must be a finite number"):
        _dit(cfg_scale=float("inf")).validate()
    assert not (tmp_path / "r").exists()


def test_a_step_schedule_outside_the_run_is_an_error(pipeline_of):
    """Old: agent_steps=(30, 40) in a 2-step run was a silent no-op."""
    from diffusers_ext.steps import partial_run

    pipe = pipeline_of("sd")
    kwargs = dict(prompt="x", num_inference_steps=2, output_type="np", height=64, width=64)
    with dx.patched(pipe, "agent", agent_steps=(30, 40)):
        with pytest.raises(OptionError, match=r"`agent_steps`=\(30, 40\) never acts in this run of 2 steps"):
            pipe(**kwargs)
        with partial_run():           # a warm-up run stands for part of a longer one
            pipe(**{**kwargs, "num_inference_steps": 1})
    with dx.patched(pipe, "agent", agent_steps=(1, 40)):   # reaches into the run: acts on step 1
        pipe(**kwargs)
    # fractions: the 2 steps start at 0 and 0.5, so (0.6, 1.0) holds none, (0.5, 1.0) holds the second
    with dx.patched(pipe, "agent", agent_steps=(0.6, 1.0)):
        with pytest.raises(OptionError, match=r"`agent_steps`=\(0.6, 1.0\) never acts in this run of 2 steps "
                                              r"\(its steps start at fractions 0, 0.5\)"):
            pipe(**kwargs)
        pipe(**{**kwargs, "num_inference_steps": 3})          # 0, 1/3, 2/3: the last step acts
    with dx.patched(pipe, "agent", agent_steps=(0.5, 1.0)):
        pipe(**kwargs)


def test_a_decreasing_mediator_schedule_is_refused(pipeline_of):
    """Old: (64, 16) was accepted though the method (and its docs) use the counts fewer first."""
    with pytest.raises(OptionError, match=r"fewer first.*\(64, 16\).*\(16, 64\)"):
        dx.patch(pipeline_of("dit"), "mediator", mediators=(64, 16))
    assert dx.patch_record(pipeline_of("dit")) is None


@pytest.mark.parametrize("argv, message", [
    (["compare", "--model", "tiny:dit", "--prompt", "a cat"], "DiTPipeline takes no prompts (a class-conditional"),
    (["compare", "--model", "tiny:sd", "--class-label", "3"], "takes no class labels (a text-to-image"),
])
def test_compare_refuses_a_condition_the_model_does_not_take(argv, message, tmp_path, capsys):
    """Old: compare ignored them (sample refused the same)."""
    assert main([*argv, "--steps", "1", "--out", str(tmp_path / "x.png")]) == 2
    line = _one_error_line(capsys)
    assert message in line and ("--prompt" in line or "--class-label" in line), line
    assert not (tmp_path / "x.png").exists()


def test_fid_says_when_image_sizes_differ(tmp_path):
    """Old: a folder mixing sizes, or samples against a reference of another size, were scored silently."""
    from PIL import Image

    from diffusers_ext.eval.data import EvalInput, ImageSizeWarning
    from diffusers_ext.eval.scoring import warn_about_sizes

    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, side in enumerate((8, 8, 16)):
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(folder / f"{i}.png")
    np.savez(tmp_path / "a.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "b.npz", arr_0=np.zeros((2, 16, 12, 3), np.uint8))
    with pytest.warns(ImageSizeWarning, match=r"mix image sizes: 8 x 8 \(2 images\), 16 x 16 \(1 image\)"):
        warn_about_sizes(EvalInput(folder), EvalInput(tmp_path / "a.npz"))
    with pytest.warns(ImageSizeWarning, match=r"samples are 8 x 8 .* reference images are 16 x 12"):
        warn_about_sizes(EvalInput(tmp_path / "a.npz"), EvalInput(tmp_path / "b.npz"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_about_sizes(EvalInput(tmp_path / "a.npz"), EvalInput(tmp_path / "a.npz"))   # one size: quiet


def test_patched_on_a_patched_model_is_refused_and_keeps_the_outer_patch(pipeline_of):
    """Old: the inner `patched` unpatched everything on exit, silently dropping the outer patch."""
    pipe = pipeline_of("sd")
    outer = dx.patch(pipe, "agent")
    try:
        with pytest.raises(PatchError, match="already patched with 'agent'.*dx.unpatch"):
            with dx.patched(pipe, "todo"):
                pass
        assert dx.patch_record(pipe) is outer and outer.processors()
    finally:
        dx.unpatch(pipe)


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"diffusers_ext_weights\.safetensors is not a readable safetensors file"),
    ("json", r"diffusers_ext_config\.json is not valid JSON"),
])
def test_a_damaged_weights_folder_names_the_file(damage, message, tmp_path):
    """Old: a bare safetensors / JSON error without the file's name."""
    from diffusers_ext.testing import tiny_dit_transformer
    from diffusers_ext.weights import CONFIG_NAME, WEIGHTS_NAME, save_weights

    model = tiny_dit_transformer()
    record = dx.patch(model, "t5")
    tensors = {f"{n}.processor.{k}": v for n, p in record.processors().items() for k, v in p.state_dict().items()}
    save_weights(tmp_path, model, record, tensors)
    dx.unpatch(model)
    if damage == "truncate":
        data = (tmp_path / WEIGHTS_NAME).read_bytes()
        (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    else:
        (tmp_path / CONFIG_NAME).write_text('{"method": "t5", ')
    with pytest.raises(PatchError, match=message):
        dx.patch(model, "t5", weights=str(tmp_path))
    assert dx.patch_record(model) is None


# =============================================================================================
# Clear errors, not tracebacks


@pytest.mark.parametrize("argv, message", [
    (["sample", "--model", "tiny:dit", "--method", "agent", "--output-dir", "{tmp}/run"], "does not support"),
    (["distill", "tiny:dit", "agent", "--output-dir", "{tmp}/out", "--max-steps", "1"], "does not support"),
    (["animate", "--model", "tiny:dit", "--out", "{tmp}/a.gif"], "is not an AnimateDiff pipeline"),
])
def test_a_method_on_the_wrong_family_is_one_line(argv, message, tmp_path, capsys):
    """compare was fixed on main (tests/test_cli.py); animate raised a bare TypeError."""
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "run").exists() and not (tmp_path / "a.gif").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv", [
    ["compare", "--model", "tiny:dit", "--device", "cuda", "--out", "{tmp}/x.png"],
    ["sample", "--model", "tiny:dit", "--device", "cuda", "--output-dir", "{tmp}/run"],
    ["animate", "--device", "cuda", "--out", "{tmp}/a.gif"],
    ["fid", "{tmp}/a.npz", "{tmp}/a.npz", "--device", "cuda"],
    ["compare", "--model", "tiny:dit", "--device", "gpu", "--out", "{tmp}/x.png"],
])
def test_a_device_this_machine_lacks_is_one_line(argv, tmp_path, capsys):
    """Old: an AssertionError traceback from torch; `fid --device cuda` blamed the Inception file."""
    np.savez(tmp_path / "a.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    line = _one_error_line(capsys)
    assert "device" in line and ("CUDA is not available" in line or "unknown device 'gpu'" in line), line
    assert "Inception" not in line and not (tmp_path / "run").exists()


def test_ctrl_c_during_sample_is_one_line_and_keeps_the_shards(tmp_path, capsys, monkeypatch):
    """Old: a 23-frame traceback."""
    calls = {"n": 0}
    original = Sampler.generate

    def interrupted(self, indices):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, indices)

    monkeypatch.setattr(Sampler, "generate", interrupted)
    assert main(_sample_argv(tmp_path / "run", "--batch-size", "2")) == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"diffusers-ext sample: interrupted: 2 of 4 samples are kept in {tmp_path / 'run' / 'shards'} "
                     "(1 of 2 shards); run the same command again to resume"]
    monkeypatch.setattr(Sampler, "generate", original)
    assert main(_sample_argv(tmp_path / "run", "--batch-size", "2")) == 0
    assert "2 drawn now" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["compare", "--width", "0"], ["compare", "--steps", "-1"], ["sample", "--model", "x",
                                  "--output-dir", "y", "--height", "0"], ["animate", "--frames", "0"]])
def test_sizes_and_counts_must_be_positive(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--distill-minutes", "-1"], "argument --distill-minutes: must be at least 0, got '-1'"),
    (["--lr", "0"], "argument --lr: must be above 0, got '0'"),
    (["--inherited-lr", "nan"], "argument --inherited-lr: must be a finite number, got 'nan'"),
    (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--floor-draws", "0"], "argument --floor-draws: must be at least 1, got 0"),
    (["--cached-only", "--no-cache"], "--cached-only reads the cache that --no-cache turns off"),
    (["--uncond-prob", "2"], "the fine-tune's settings: uncond_prob must be in [0, 1], got 2.0"),
    (["--ema-decay", "1"], "the fine-tune's settings: ema_decay must be in [0, 1) (0: no averaging), got 1.0"),
    (["--inherited", "all", "--inherited-lr", "0"],
     "the fine-tune's settings: inherited='all' trains pretrained weights: give inherited_lr > 0"),
    (["--guided-loss", "1"], "the fine-tune's settings: guided_loss must be None (the per-call loss only) or a "
                             "guidance scale > 1, got 1.0"),
    (["--guided-loss", "4", "--distill-batch", "15"], "batch_size must be even, got 15"),
    (["--guided-loss", "4", "--uncond-prob", "0.5"], "--guided-loss draws half of each batch on the null class"),
])
def test_the_glyph_study_refuses_bad_numbers_before_loading(argv, message, capsys, monkeypatch):
    """Old: `glyph_lab.py --distill-minutes -1` ran the study with a negative fine-tune budget."""
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    monkeypatch.syspath_prepend(benchmarks)
    glyph_lab = importlib.import_module("glyph_lab")
    monkeypatch.setattr(glyph_lab, "load_glyphs", lambda: pytest.fail("loaded the data before checking arguments"))
    with pytest.raises(SystemExit) as exit:
        glyph_lab.main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_compiled_lab_scale_timing_refuses_too_few_warmup_rounds(capsys, monkeypatch):
    """The compiled variants compile in the first two warm-up rounds: fewer would time compiling."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    lab_scale = importlib.import_module("lab_scale")
    with pytest.raises(SystemExit) as exit:
        lab_scale.main(["--compile", "--warmup", "1"])
    assert exit.value.code == 2
    assert "--compile compiles in the first two warm-up rounds: give --warmup 2 or more, got 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["nomethod"], "unknown method 'nomethod'"),
    (["mediator", "--option", "foo=1"], "method 'mediator' has no option(s) foo"),
    (["mediator", "--weights", "nowhere"], "nowhere is not a diffusers_ext weights folder"),
    (["vca", "--weights", "MEDIATOR"], "holds a fine-tune of 'mediator', not of 'vca'"),
    (["mediator", "--guidance", "0"], "argument --guidance: must be above 0"),
])
def test_the_class_direction_probe_refuses_bad_input_before_loading(argv, message, tmp_path, capsys, monkeypatch):
    from diffusers_ext.testing import tiny_pipeline
    from diffusers_ext.weights import save_weights

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    probe = importlib.import_module("class_direction")
    if "MEDIATOR" in argv:                     # a real fine-tune folder of another method
        pipe = tiny_pipeline("dit")
        record = dx.patch(pipe, "mediator", mediators=4)
        save_weights(tmp_path, pipe.transformer, record, {})
        argv = [str(tmp_path) if a == "MEDIATOR" else a for a in argv]
    monkeypatch.setattr(dx, "patch", lambda *a, **k: pytest.fail("patched a model before checking arguments"))
    with pytest.raises(SystemExit) as exit:
        probe.main(argv + ["--output", str(tmp_path / "table")])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.glob("table*"))


@pytest.mark.parametrize("argv, message", [(["--minutes", "0"], "must be above 0"), (["--steps", "-5"], "must be at least 1")])
def test_lab_training_refuses_empty_budgets(argv, message, tmp_path, capsys):
    from diffusers_ext.lab.__main__ import main as lab_main

    with pytest.raises(SystemExit) as exit:
        lab_main(["train", "dit", "--out", str(tmp_path / "run"), *argv])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


LOOP_FIELDS_BAD = [("batch_size", 0, "batch_size must be >= 1"), ("max_steps", 0, "max_steps must be >= 1"),
                   ("gradient_accumulation_steps", 0, "gradient_accumulation_steps must be >= 1"),
                   ("lr", 0.0, "lr must be > 0"), ("lr", float("nan"), "lr must be a finite number"),
                   ("weight_decay", -0.1, "weight_decay must be >= 0"), ("max_grad_norm", float("inf"), "finite"),
                   ("warmup_steps", -1, "warmup_steps must be >= 0"),
                   ("checkpoint_every", -1, "checkpoint_every must be >= 0"),
                   ("keep_checkpoints", -2, "keep_checkpoints must be >= 0"),
                   ("mixed_precision", "fp8", "mixed_precision must be one of no, fp16, bf16")]


@pytest.mark.parametrize("config", ["distill", "motion"])
@pytest.mark.parametrize("field, value, message", LOOP_FIELDS_BAD, ids=[f"{f}={v}" for f, v, _ in LOOP_FIELDS_BAD])
def test_every_fine_tune_config_refuses_the_same_bad_loop_fields(config, field, value, message, tmp_path):
    """The fields `TrainingLoop` reads are checked in one place (`loop.check_loop_config`) for every
    fine-tune; before, the motion-module trainer accepted a negative checkpoint count or an infinite lr."""
    if config == "distill":
        from diffusers_ext.distill import DistillConfig as Config
    else:
        from diffusers_ext.pipelines.animatediff_anchor import MotionTrainConfig as Config
    Config(output_dir=str(tmp_path))   # the defaults are fine
    with pytest.raises(ValueError, match=message):
        Config(output_dir=str(tmp_path), **{field: value})


def test_compare_shows_progress_from_the_warm_up_on(pipeline_of, capsys):
    """Old: the warm-up ran without a progress bar (with --width 100000: minutes of silence)."""
    from diffusers_ext.compare import compare_pipeline
    from diffusers_ext.pipeline_io import call_kwargs

    pipe = pipeline_of("dit")
    compare_pipeline(pipe, "mediator", {"mediators": 4}, call_kwargs(pipe, "", 1, 1, None, None, None, 0))
    err = capsys.readouterr().err
    assert "warm-up" in err and err.index("warm-up") < err.index("stock")


# =============================================================================================
# Defaults that surprise


def test_sample_and_compare_use_the_models_recipe(monkeypatch):
    """Old: `sample --model digits` ran the SiT pipeline's 250 steps (20x the model's recipe);
    compare ran 20. Now both use digits.SAMPLING (12 Heun steps, guidance 2) unless told otherwise."""
    from diffusers_ext import compare as compare_module
    from diffusers_ext import digits
    from diffusers_ext.loading import load_pipeline

    pipe = load_pipeline("digits", device="cpu")
    seen = []

    @functools.wraps(type(pipe).__call__)   # the same signature: what the pipeline takes is read from it
    def fake_call(self, **kwargs):
        seen.append(kwargs)
        return type("Out", (), {"images": np.zeros((len(kwargs["class_labels"]), 8, 8, 1), np.float32)})()

    monkeypatch.setattr(type(pipe), "__call__", fake_call)
    sampler = Sampler(SampleConfig(model="digits", num_samples=2), pipe=pipe)
    sampler.generate([0, 1])
    for key, value in digits.SAMPLING.items():
        assert seen[-1][key] == value, key
    assert sampler.config.recipe == digits.SAMPLING          # recorded in config.json with the run
    Sampler(SampleConfig(model="digits", num_samples=2, steps=3, cfg_scale=1.0), pipe=pipe).generate([0])
    assert seen[-1]["num_inference_steps"] == 3 and seen[-1]["guidance_scale"] == 1.0   # given: used

    captured = {}

    class Stop(Exception):
        pass

    def stop(p, method, options, kwargs, **_):
        captured.update(kwargs)
        raise Stop

    import diffusers_ext.loading as loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pipe)
    monkeypatch.setattr(compare_module, "compare_pipeline", stop)
    with pytest.raises(Stop):
        compare_module.compare(out=None)
    assert {k: captured[k] for k in digits.SAMPLING} == digits.SAMPLING


def test_compare_help_keeps_its_line_continuations(capsys):
    """Old: the example's trailing backslash was read by Python and the two lines were joined."""
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert '--steps 50 \\\n        --prompt "a photo of an astronaut' in capsys.readouterr().out


def test_typed_errors_are_diffusers_ext_errors():
    """Already on main: input errors share DiffusersExtError (the CLI tells them from bugs)."""
    from diffusers_ext.errors import DeviceError, UnsupportedModelError

    for cls in (OptionError, PatchError, UnsupportedModelError, DeviceError, TrainingError):
        assert issubclass(cls, DiffusersExtError)
