"""Weights folders: a folder must cover every patched site; old folders keep their meaning."""

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel

import diffusers_ext as dx
from diffusers_ext.testing import tiny_dit_transformer
from diffusers_ext.weights import CONFIG_NAME, save_weights


def _save_processor_tensors(model, record, folder):
    tensors = {f"{name}.processor.{key}": value for name, proc in record.processors().items()
               for key, value in proc.state_dict().items()}
    save_weights(folder, model, record, tensors)


def test_a_folder_that_does_not_cover_every_site_is_refused(tmp_path):
    """Weights of a 2-block fine-tune onto a 4-block model would leave 2 layers untrained."""
    torch.manual_seed(0)
    small = tiny_dit_transformer()                              # 2 blocks
    large = DiTTransformer2DModel.from_config({**small.config, "num_layers": 4})
    record = dx.patch(small, "t5")
    _save_processor_tensors(small, record, tmp_path)
    dx.unpatch(small)
    with pytest.raises(ValueError, match=r"do not cover this patch: .* 2 patched site\(s\).*transformer_blocks\.2"):
        dx.patch(large, "t5", weights=str(tmp_path))
    assert dx.patch_record(large) is None                      # refused: the model is left stock
    dx.patch(small, "t5", weights=str(tmp_path))                # the model it was made for loads
    dx.unpatch(small)


def test_t5_folders_saved_before_the_local_branch_load_ttt_only(tmp_path):
    torch.manual_seed(0)
    model = tiny_dit_transformer()
    record = dx.patch(model, "t5", local="none")
    _save_processor_tensors(model, record, tmp_path)
    dx.unpatch(model)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["options"]["local"]                              # as written before the option existed
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    record = dx.patch(model, "t5", weights=str(tmp_path))
    assert record.options["local"] == "none"
    dx.unpatch(model)


def test_a_save_stopped_midway_leaves_no_mismatched_folder(tmp_path, monkeypatch):
    """The config goes last and the old one is removed first: a save that fails while writing the
    tensors leaves the old tensors without a config, which loading refuses, never new tensors beside
    old options; no temporary file is left behind."""
    from diffusers_ext import files
    from diffusers_ext.weights import WEIGHTS_NAME

    torch.manual_seed(0)
    model = tiny_dit_transformer()
    record = dx.patch(model, "mediator", mediators=4)
    _save_processor_tensors(model, record, tmp_path)
    old_weights = (tmp_path / WEIGHTS_NAME).read_bytes()
    dx.unpatch(model)
    record = dx.patch(model, "mediator", mediators=16)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _save_processor_tensors(model, record, tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME]
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == old_weights
    dx.unpatch(model)
    with pytest.raises(FileNotFoundError, match="not a diffusers_ext weights folder"):
        dx.patch(model, "mediator", weights=str(tmp_path))
    assert dx.patch_record(model) is None
    record = dx.patch(model, "mediator", mediators=16)
    _save_processor_tensors(model, record, tmp_path)                       # a complete save loads
    dx.unpatch(model)
    assert dx.patch(model, "mediator", weights=str(tmp_path)).options["mediators"] == (16,)
    dx.unpatch(model)


def _t5_folder(tmp_path, inherited_scale=None):
    """A t5 weights folder of the tiny DiT (its processors' tensors; with `inherited_scale`, also block
    0's to_q weight scaled by it, as a fine-tune of inherited weights saves it); the model comes back stock."""
    torch.manual_seed(0)
    model = tiny_dit_transformer()
    record = dx.patch(model, "t5")
    tensors = {f"{n}.processor.{k}": v for n, p in record.processors().items() for k, v in p.state_dict().items()}
    if inherited_scale is not None:
        name = "transformer_blocks.0.attn1.to_q.weight"
        tensors[name] = model.state_dict()[name] * inherited_scale
    save_weights(tmp_path, model, record, tensors)
    dx.unpatch(model)
    return model


def _edit_config(folder, edit):
    path = folder / CONFIG_NAME
    config = json.loads(path.read_text())
    path.write_text(json.dumps(edit(config)))


@pytest.mark.parametrize("edit,error,message", [
    (lambda c: [c], "PatchError", r"lacks the method, options or denoiser entries"),
    (lambda c: {k: v for k, v in c.items() if k != "denoiser"}, "PatchError", r"lacks the method, options or denoiser"),
    (lambda c: {**c, "format": 2}, "ValueError", r"unsupported format 2 \(this version reads 1\)"),
    (lambda c: {**c, "denoiser": "UNet2DConditionModel"}, "ValueError",
     r"made for a UNet2DConditionModel, not a DiTTransformer2DModel"),
])
def test_a_folder_for_something_else_is_refused_by_name(tmp_path, edit, error, message):
    from diffusers_ext.errors import PatchError

    model = _t5_folder(tmp_path)
    _edit_config(tmp_path, edit)
    with pytest.raises(PatchError if error == "PatchError" else ValueError, match=message):
        dx.patch(model, "t5", weights=str(tmp_path))
    assert dx.patch_record(model) is None


def test_tensors_that_do_not_fit_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from diffusers_ext.weights import WEIGHTS_NAME

    model = _t5_folder(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    tensors = load_file(str(path))
    w1 = "transformer_blocks.1.attn1.processor.w1"
    save_file({**tensors, w1: torch.zeros(3, 8, 8)}, str(path))
    with pytest.raises(ValueError, match=rf"{w1} is \(3, 8, 8\) there, \(2, 8, 8\) here \(1 such tensors\)"):
        dx.patch(model, "t5", weights=str(tmp_path))
    extra = {f"no.such.tensor{i}": torch.zeros(1) for i in range(5)}
    save_file({**tensors, **extra}, str(path))
    with pytest.raises(ValueError, match=r"5 tensors have no place, e.g. \['no.such.tensor0', 'no.such.tensor1', "
                                         r"'no.such.tensor2'\]$"):
        dx.patch(model, "t5", weights=str(tmp_path))
    assert dx.patch_record(model) is None


def test_a_folder_is_created_with_its_parents_and_states_what_it_holds(tmp_path):
    folder = tmp_path / "runs" / "t5" / "final"
    model = _t5_folder(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert set(config) == {"format", "method", "family", "denoiser", "sites", "options"}
    assert (config["method"], config["family"], config["denoiser"]) == ("t5", "dit", "DiTTransformer2DModel")
    assert config["sites"] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert dx.patch(model, "t5", weights=str(folder)).sites == config["sites"]


def test_inherited_weights_load_and_unpatch_restores_the_pretrained_values(tmp_path):
    """A folder with a fine-tuned inherited tensor overwrites it; loading twice keeps the first original;
    unpatch puts every pretrained value back bit for bit (the new parameters are not stashed)."""
    model = _t5_folder(tmp_path, inherited_scale=1.5)
    stock = {k: v.clone() for k, v in model.state_dict().items()}
    name = "transformer_blocks.0.attn1.to_q.weight"
    dx.patch(model, "t5", weights=str(tmp_path))
    torch.testing.assert_close(model.state_dict()[name], 1.5 * stock[name], rtol=0, atol=0)
    dx.patch(model, "t5", weights=str(tmp_path))          # again, on the fine-tuned values
    dx.unpatch(model)
    restored = model.state_dict()
    assert restored.keys() == stock.keys()
    assert all(torch.equal(restored[k], stock[k]) for k in stock)
    assert not hasattr(model, "_diffusers_ext_inherited_originals") or not model._diffusers_ext_inherited_originals
