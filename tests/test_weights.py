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
