"""npz I/O (memory-mapped reads, streamed atomic writes), input detection and the feature cache."""

import zipfile

import numpy as np
import pytest

from diffusers_ext.eval.data import EvalInput, FeatureCache, ImageSet, default_cache_dir, npz_array, write_images_npz
from diffusers_ext.eval.scoring import Extractor


def _images(n, h=8, w=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_npz_member_is_memory_mapped_when_stored(tmp_path):
    x = _images(5)
    np.savez(tmp_path / "a.npz", arr_0=x, arr_1=np.arange(5))
    np.savez_compressed(tmp_path / "b.npz", arr_0=x)
    a, b = npz_array(tmp_path / "a.npz", "arr_0"), npz_array(tmp_path / "b.npz", "arr_0")
    assert isinstance(a, np.memmap) and not isinstance(b, np.memmap)
    np.testing.assert_array_equal(a, x)
    np.testing.assert_array_equal(b, x)
    np.testing.assert_array_equal(npz_array(tmp_path / "a.npz", "arr_1"), np.arange(5))


def test_streamed_npz_equals_np_savez(tmp_path):
    x, labels = _images(7), np.arange(7) * 3
    write_images_npz(tmp_path / "s.npz", [x[:3], x[3:5], x[5:]], x.shape, extra={"arr_1": lambda: labels})
    with np.load(tmp_path / "s.npz") as data:
        assert data.files == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(data["arr_0"], x)
        np.testing.assert_array_equal(data["arr_1"], labels)


def test_streamed_npz_never_leaves_a_half_written_file(tmp_path):
    x = _images(4)

    def chunks():
        yield x[:2]
        raise KeyboardInterrupt  # killed while merging

    with pytest.raises(KeyboardInterrupt):
        write_images_npz(tmp_path / "s.npz", chunks(), x.shape)
    with pytest.raises(ValueError, match="expected 4 images, got 2"):
        write_images_npz(tmp_path / "s.npz", [x[:2]], x.shape)
    assert list(tmp_path.iterdir()) == []


def test_inputs_are_detected_and_bad_ones_explained(tmp_path):
    x = _images(3)
    np.savez(tmp_path / "imgs.npz", arr_0=x)
    inp = EvalInput(tmp_path / "imgs.npz")
    assert inp.stats is None and len(inp.images) == 3
    with pytest.raises(FileNotFoundError, match="no such file"):
        EvalInput(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="needs 'arr_0'"):
        EvalInput(tmp_path / "other.npz")
    np.savez(tmp_path / "float.npz", arr_0=x.astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        EvalInput(tmp_path / "float.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        EvalInput(tmp_path / "empty")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not an .npz"):
        EvalInput(tmp_path / "text.npz")


def test_folder_images_read_in_path_order_and_mixed_sizes(tmp_path):
    from PIL import Image

    x = _images(3, 10, 12)
    for i in (2, 0, 1):
        Image.fromarray(x[i]).save(tmp_path / f"{i:03d}.png")
    batches = list(ImageSet(tmp_path).batches(2))
    np.testing.assert_array_equal(np.concatenate(batches), x)
    Image.fromarray(_images(1, 20, 20)[0]).save(tmp_path / "003.png")
    mixed = list(ImageSet(tmp_path).batches(4))
    assert mixed[0].shape == (4, 299, 299, 3) and mixed[0].dtype == np.float32


class _CountingNetwork:
    id = "fake-net/v1"
    sha1 = "0"
    path = "fake"
    calls = 0

    def __call__(self, batch):
        import torch

        type(self).calls += 1
        flat = torch.as_tensor(batch).float().reshape(len(batch), -1)
        return {"pool": flat[:, :4], "spatial": flat[:, 4:7]}


def test_feature_cache_is_keyed_by_content(tmp_path):
    ext = Extractor(cache_dir=tmp_path / "cache", progress=False)
    ext._network = _CountingNetwork()
    np.savez(tmp_path / "a.npz", arr_0=_images(6))
    first = ext.features(EvalInput(tmp_path / "a.npz"))
    calls = _CountingNetwork.calls
    again = ext.features(EvalInput(tmp_path / "a.npz"))
    assert _CountingNetwork.calls == calls  # served from the cache
    np.testing.assert_array_equal(first["pool"], again["pool"])
    np.savez(tmp_path / "a.npz", arr_0=_images(6, seed=1))  # same name, new content
    changed = ext.features(EvalInput(tmp_path / "a.npz"))
    assert _CountingNetwork.calls > calls and not np.array_equal(changed["pool"], first["pool"])
    assert FeatureCache(tmp_path / "cache").dir.is_dir()
    with zipfile.ZipFile(next((tmp_path / "cache").glob("features-*.npz"))) as zf:
        assert set(zf.namelist()) == {"pool.npy", "spatial.npy"}

    class OtherNetwork(_CountingNetwork):     # another network file: the same images are extracted anew
        id = "fake-net/v2"

        def __call__(self, batch):
            return {k: 2 * v for k, v in super().__call__(batch).items()}

    other = Extractor(cache_dir=tmp_path / "cache", progress=False)
    other._network = OtherNetwork()
    np.testing.assert_array_equal(other.features(EvalInput(tmp_path / "a.npz"))["pool"], 2 * changed["pool"])


def test_atomic_writes_honour_the_umask(tmp_path):
    """Result files get 0666 & ~umask like any file the user writes (mkstemp alone, and safetensors'
    own writer, give 0600); a model folder's files too, and files already there keep their mode."""
    import os
    import stat

    import torch
    from safetensors.torch import load_file

    from diffusers_ext.files import atomic_savez, atomic_write_text, save_pretrained, save_safetensors
    from diffusers_ext.testing import tiny_dit_transformer

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    os.chmod(tmp_path / "model" / "notes.txt", 0o600)
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        atomic_savez(tmp_path / "b.npz", x=np.zeros(2))
        save_safetensors({"w": torch.arange(6.0).view(2, 3).t()}, tmp_path / "c.safetensors", {"k": "v"})
        save_pretrained(tiny_dit_transformer(), tmp_path / "model")
    finally:
        os.umask(old)
    for name in ("a.json", "b.npz", "c.safetensors", "model/config.json", "model/diffusion_pytorch_model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
    assert stat.S_IMODE((tmp_path / "model" / "notes.txt").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.npz", "c.safetensors", "model"]  # no temporaries
    assert torch.equal(load_file(str(tmp_path / "c.safetensors"))["w"], torch.arange(6.0).view(2, 3).t())


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    """DIFFUSERS_EXT_CACHE wins, then $XDG_CACHE_HOME/diffusers_ext, then ~/.cache/diffusers_ext; always /fid."""
    monkeypatch.delenv("DIFFUSERS_EXT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "diffusers_ext" / "fid"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "diffusers_ext" / "fid"
    monkeypatch.setenv("DIFFUSERS_EXT_CACHE", str(tmp_path / "own"))
    assert default_cache_dir() == tmp_path / "own" / "fid"


def _extractor(tmp_path):
    extractor = Extractor(cache_dir=str(tmp_path / "cache" / "nested"), progress=False, workers=0)
    extractor._network = _CountingNetwork()
    return extractor


def test_statistics_come_from_the_file_unless_pool_features_are_needed(tmp_path):
    """An ADM-style npz with images (arr_0) and statistics: the stored statistics are used as they are;
    with need_pool the pool features are extracted from its images once (then cached), the stored mu /
    sigma kept; a file whose statistics carry pool features is not read again; images alone give
    statistics from their features, with the network's id and the sample count, pool kept on request."""
    from diffusers_ext.eval.metrics import FIDStatistics

    x = _images(12, 8, 8, seed=3)
    mu, sigma = np.arange(6.0), np.eye(6)
    np.savez(tmp_path / "ref.npz", arr_0=x, mu=mu, sigma=sigma)
    extractor = _extractor(tmp_path)
    calls = _CountingNetwork.calls   # one network call per batch of up to 50 images
    stats = extractor.statistics(EvalInput(tmp_path / "ref.npz"))
    assert _CountingNetwork.calls == calls and stats.pool is None and np.array_equal(stats.mu, mu)
    stats = extractor.statistics(EvalInput(tmp_path / "ref.npz"), need_pool=True)
    assert _CountingNetwork.calls == calls + 1 and stats.pool.shape == (12, 4) and np.array_equal(stats.mu, mu)
    extractor.statistics(EvalInput(tmp_path / "ref.npz"), need_pool=True)   # cached features: no new call
    assert _CountingNetwork.calls == calls + 1 and (tmp_path / "cache" / "nested").is_dir()

    FIDStatistics(mu, sigma, pool=stats.pool).save(tmp_path / "with_pool.npz")
    assert extractor.statistics(EvalInput(tmp_path / "with_pool.npz"), need_pool=True).pool.shape == (12, 4)
    assert _CountingNetwork.calls == calls + 1

    np.savez(tmp_path / "images.npz", arr_0=x)
    fresh = _extractor(tmp_path / "other")
    own = fresh.statistics(EvalInput(tmp_path / "images.npz"))
    assert (own.network, own.num_samples, own.pool) == ("fake-net/v1", 12, None)
    assert fresh.statistics(EvalInput(tmp_path / "images.npz"), need_pool=True).pool.shape == (12, 4)


def test_content_key_tells_folders_apart_and_its_memo_follows_the_content(tmp_path):
    """Two folders with the same file names, sizes and times but other pixels get different keys (their
    memo entries are per folder); a file rewritten in place gets a new key."""
    import os

    from PIL import Image

    index = tmp_path / "index"
    folders = [tmp_path / "a", tmp_path / "b"]
    for seed, folder in enumerate(folders):
        folder.mkdir()
        Image.fromarray(_images(1, 8, 8, seed=seed)[0]).save(folder / "0.png")
    size = {f: (f / "0.png").stat().st_size for f in folders}
    if size[folders[0]] != size[folders[1]]:
        pytest.skip("the two PNGs compress to different sizes")
    for folder in folders:
        os.utime(folder / "0.png", ns=(10**18, 10**18))
    keys = [ImageSet(f).content_key(index) for f in folders]
    assert keys[0] != keys[1] and keys == [ImageSet(f).content_key(index) for f in folders]
    Image.fromarray(_images(1, 8, 8, seed=9)[0]).save(folders[0] / "0.png")
    assert ImageSet(folders[0]).content_key(index) != keys[0]


def test_image_sizes_are_counted(tmp_path):
    from PIL import Image

    for i, (h, w) in enumerate([(8, 6), (8, 6), (5, 7), (8, 6)]):
        Image.fromarray(_images(1, h, w, seed=i)[0]).save(tmp_path / f"{i}.png")
    assert ImageSet(tmp_path).sizes() == {(8, 6): 3, (5, 7): 1}
    np.savez(tmp_path.parent / "arr.npz", arr_0=_images(4, 5, 3))
    assert ImageSet(tmp_path.parent / "arr.npz").sizes() == {(5, 3): 4}


def test_report_describes_each_input(tmp_path):
    """evaluate()'s report names each side's path and kind (statistics / folder / npz images), its image
    count (the statistics' sample count, else the images') and the network that made its statistics; an
    unknown metric is refused with the allowed ones."""
    from PIL import Image

    from diffusers_ext.eval.metrics import FIDStatistics, compute_statistics
    from diffusers_ext.eval.scoring import evaluate

    x = _images(10, 8, 8, seed=4)
    (tmp_path / "folder").mkdir()
    for i, image in enumerate(x[:6]):
        Image.fromarray(image).save(tmp_path / "folder" / f"{i}.png")
    np.savez(tmp_path / "images.npz", arr_0=x)
    feats = np.random.default_rng(0).standard_normal((7, 4))   # the stand-in network's 4 pool features
    FIDStatistics(*compute_statistics(feats), num_samples=7, network="made-by-x").save(tmp_path / "stats.npz")
    report = evaluate(tmp_path / "folder", tmp_path / "stats.npz", metrics=("fid",), extractor=_extractor(tmp_path))
    assert report["samples"] == {"path": str(tmp_path / "folder"), "kind": "folder", "num_images": 6,
                                 "network": "fake-net/v1"}
    assert report["reference"] == {"path": str(tmp_path / "stats.npz"), "kind": "statistics", "num_images": 7,
                                   "network": "made-by-x"}
    report = evaluate(tmp_path / "images.npz", tmp_path / "folder", metrics=("fid",), extractor=_extractor(tmp_path))
    assert (report["samples"]["kind"], report["samples"]["num_images"]) == ("npz images", 10)
    assert report["fid"] is not None and report["fid"] >= 0
    with pytest.raises(ValueError, match=r"unknown metric\(s\) ffid, kid; choose from fid, sfid, pr, is"):
        evaluate(tmp_path / "folder", tmp_path / "folder", metrics=("fid", "kid", "ffid"))


def test_report_fields_unavailable_metrics_and_saved_statistics(tmp_path):
    """evaluate()'s report, field by field: metrics not asked for stay None and are not called unavailable;
    sFID, precision and recall are unavailable, with their reasons, against statistics without mu_s / pool
    features; precision / recall are computed (reference first) against statistics that carry pool
    features; Inception Score is always unavailable; the network's path and SHA-1, the protocol and the
    wall time are reported; `save_stats` writes the samples' statistics, with pool features only when
    precision / recall needed them."""
    import time

    from PIL import Image

    from diffusers_ext.eval.metrics import (INCEPTION_SCORE_UNAVAILABLE, FIDStatistics, compute_statistics,
                                            precision_recall)
    from diffusers_ext.eval.scoring import evaluate

    x = _images(9, 8, 8, seed=5)
    (tmp_path / "folder").mkdir()
    for i, image in enumerate(x):
        Image.fromarray(image).save(tmp_path / "folder" / f"{i}.png")
    samples_pool = x.reshape(9, -1)[:, :4].astype(np.float64)           # what the stand-in network computes
    # a tight reference cluster inside spread samples: precision 0, recall 1 (swapped sides would give 1, 0)
    ref_pool = samples_pool.mean(0) + np.random.default_rng(1).uniform(-5, 5, (8, 4))
    FIDStatistics(*compute_statistics(ref_pool), num_samples=8).save(tmp_path / "plain.npz")
    FIDStatistics(*compute_statistics(ref_pool), num_samples=8, pool=ref_pool).save(tmp_path / "pooled.npz")

    start = time.perf_counter()
    report = evaluate(tmp_path / "folder", tmp_path / "plain.npz", extractor=_extractor(tmp_path),
                      save_stats=tmp_path / "saved_pr.npz")
    elapsed = time.perf_counter() - start
    assert set(report) == {"fid", "sfid", "precision", "recall", "inception_score", "unavailable", "samples",
                           "reference", "network", "protocol", "warnings", "seconds"}
    assert report["fid"] > 0 and report["sfid"] is report["precision"] is report["recall"] is None
    assert report["inception_score"] is None
    pr_reason = ("not available: needs the Inception features (or images) of both sides, and an input holds "
                 "only mu/sigma")
    assert report["unavailable"] == {
        "sfid": "not available: an input's statistics lack mu_s/sigma_s, or the network file has no mixed_6/conv "
                "layer",
        "precision": pr_reason, "recall": pr_reason, "inception_score": INCEPTION_SCORE_UNAVAILABLE}
    assert report["network"] == {"path": "fake", "sha1": "0"} and report["warnings"] == []
    assert report["protocol"].startswith("ADM evaluator: TF 2015 Inception pool_3 / mixed_6/conv[:7], TF1 bilinear")
    assert report["protocol"].endswith("(x-128)/128; Frechet distance via eigh in float64; PR k=3")
    assert 0 <= report["seconds"] <= elapsed + 5e-4 and report["seconds"] == round(report["seconds"], 3)  # ms
    assert isinstance(report["seconds"], float)
    with np.load(tmp_path / "saved_pr.npz") as saved:
        assert "pool" not in saved.files                                  # PR was not possible: no pool kept
        np.testing.assert_allclose(saved["mu"], samples_pool.mean(0), rtol=1e-6)
        assert int(saved["num_samples"]) == 9

    report = evaluate(tmp_path / "folder", tmp_path / "pooled.npz", metrics=("fid", "pr"),
                      extractor=_extractor(tmp_path), save_stats=tmp_path / "saved.npz")
    assert (report["precision"], report["recall"]) == pytest.approx(precision_recall(ref_pool, samples_pool))
    assert (report["precision"], report["recall"]) == (0.0, 1.0)
    assert report["sfid"] is None and report["unavailable"] == {}         # not asked for: not "unavailable"
    with np.load(tmp_path / "saved.npz") as saved:
        np.testing.assert_allclose(saved["pool"], samples_pool, rtol=1e-6)

    report = evaluate(tmp_path / "folder", tmp_path / "pooled.npz", metrics=("fid",), extractor=_extractor(tmp_path),
                      save_stats=tmp_path / "saved_fid.npz")
    assert report["precision"] is None and report["unavailable"] == {}
    with np.load(tmp_path / "saved_fid.npz") as saved:
        assert "pool" not in saved.files                                  # PR not asked for: no pool kept

    # statistics on both sides: no network is loaded, and the report says so
    report = evaluate(tmp_path / "plain.npz", tmp_path / "pooled.npz", metrics=("fid",),
                      extractor=Extractor(cache_dir=str(tmp_path / "cache"), progress=False, workers=0))
    assert report["fid"] == pytest.approx(0.0, abs=1e-6) and report["network"] == {"path": None, "sha1": None}
    # an ADM reference batch (images arr_0 beside mu / sigma, no sample count): its images are counted
    np.savez(tmp_path / "adm.npz", arr_0=x[:7], mu=ref_pool.mean(0), sigma=np.cov(ref_pool, rowvar=False))
    report = evaluate(tmp_path / "folder", tmp_path / "adm.npz", metrics=("fid",), extractor=_extractor(tmp_path))
    assert report["reference"]["kind"] == "statistics" and report["reference"]["num_images"] == 7
    np.savez(tmp_path / "musigma.npz", mu=ref_pool.mean(0), sigma=np.cov(ref_pool, rowvar=False))   # count unknown
    report = evaluate(tmp_path / "folder", tmp_path / "musigma.npz", metrics=("fid",), extractor=_extractor(tmp_path))
    assert report["reference"]["num_images"] is None and report["samples"]["num_images"] == 9


def test_report_keeps_and_reemits_the_size_warning(tmp_path):
    """A warning evaluate() catches (samples and reference of different sizes) is kept in the report and
    raised again to the caller, with its own category and text."""
    from PIL import Image

    from diffusers_ext.eval.data import ImageSizeWarning
    from diffusers_ext.eval.scoring import evaluate

    for name, size in (("samples", 8), ("reference", 6)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(_images(6, size, size, seed=len(name))):
            Image.fromarray(image).save(tmp_path / name / f"{i}.png")
    message = "the samples are 8 x 8 images but the reference images are 6 x 6"
    with pytest.warns(ImageSizeWarning, match=message) as caught:
        report = evaluate(tmp_path / "samples", tmp_path / "reference", metrics=("fid",),
                          extractor=_extractor(tmp_path))
    assert [str(w.message) for w in caught] == report["warnings"] == [
        f"{message}; the score then also measures the resizing: compare images of one resolution"]
    assert caught[0].filename == __file__                                # it points at the caller of evaluate()

    Image.fromarray(_images(1, 5, 7)[0]).save(tmp_path / "samples" / "odd.png")   # now the samples mix sizes
    with pytest.warns(ImageSizeWarning, match="mix image sizes") as caught:
        report = evaluate(tmp_path / "samples", tmp_path / "samples", metrics=("fid",),
                          extractor=_extractor(tmp_path))
    assert [str(w.message) for w in caught] == report["warnings"] and len(caught) == 2   # samples and reference
    assert all(str(w.message).endswith("; each is resized to 299 x 299 on its own, so the score compares unlike "
                                       "images") and w.filename == __file__ for w in caught)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_extractor_refuses_a_missing_device_before_reading_anything():
    from diffusers_ext.errors import DeviceError

    with pytest.raises(DeviceError, match="'cuda': CUDA is not available on this machine"):
        Extractor(device="cuda", progress=False)


def test_summary_line_is_the_documented_one():
    """The `fid` command's one line (docs/fid.md): each metric with its label and precision, 'n/a' for an
    unavailable one, nothing for one not asked for, '?' for an unknown image count."""
    from diffusers_ext.eval.scoring import summary_line

    report = {"fid": 2.27123, "sfid": 4.60119, "precision": 0.82714, "recall": 0.575, "inception_score": None,
              "unavailable": {"inception_score": "reason"},
              "samples": {"num_images": 50000}, "reference": {"num_images": 10000}}
    assert summary_line(report) == ("FID 2.2712  sFID 4.6012  precision 0.8271  recall 0.5750  IS n/a  "
                                    "(50000 samples vs 10000 reference)")
    report.update(sfid=None, precision=None, recall=None, inception_score=12.34567,
                  unavailable={"precision": "r", "recall": "r"}, reference={"num_images": None})
    assert summary_line(report) == "FID 2.2712  precision n/a  recall n/a  IS 12.346  (50000 samples vs ? reference)"
    report.update(fid=None, inception_score=None, unavailable={"sfid": "r"}, samples={"num_images": None})
    assert summary_line(report) == "sFID n/a  (? samples vs ? reference)"


def test_odd_inputs_read_and_written_as_uint8_rgb(tmp_path):
    """Chunks of another integer type are stored as uint8; a Fortran-ordered array in an npz reads back in
    its own order; a grey or palette PNG in a folder reads as RGB."""
    from PIL import Image

    x = _images(5)
    write_images_npz(tmp_path / "w.npz", [x[:2].astype(np.int64), x[2:]], x.shape)
    with np.load(tmp_path / "w.npz") as data:
        assert data["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(data["arr_0"], x)
    fortran = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    np.savez(tmp_path / "f.npz", arr_0=fortran)
    np.testing.assert_array_equal(npz_array(tmp_path / "f.npz", "arr_0"), fortran)
    (tmp_path / "grey").mkdir()
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(grey).save(tmp_path / "grey" / "0.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "grey" / "1.png")
    batch = next(ImageSet(tmp_path / "grey").batches(2, workers=0))
    assert batch.shape == (2, 6, 8, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], np.repeat(grey[..., None], 3, axis=2))


def test_every_image_folder_reader_lists_the_same_files(tmp_path):
    """FID folders (recursive), distillation folders and frame folders (one level) read the images PIL
    reads, any case, in path order, and skip hidden files (macOS `._x.png`) and everything else."""
    from PIL import Image

    from diffusers_ext.distill.data import image_paths
    from diffusers_ext.files import IMAGE_SUFFIXES, image_files
    from pipelines.animatediff_anchor.videos import list_videos, read_clips

    names = ["b.PNG", "a.jpg", "c.bmp", "d.webp", "e.TIFF", "f.jpeg", "g.tif"]
    for i, name in enumerate(names):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / name, format=Image.registered_extensions()[
            "." + name.rsplit(".", 1)[1].lower()])
    (tmp_path / "._a.png").write_bytes(b"\0\5\26\7")          # an AppleDouble file: not an image
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "dir.png").mkdir()                              # a folder with an image's name
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "sub" / "h.png")
    top = sorted(tmp_path / n for n in names)
    assert {p.suffix.lower() for p in top} == set(IMAGE_SUFFIXES)
    assert image_files(tmp_path) == top
    assert image_paths(tmp_path) == top
    assert image_files(tmp_path, recursive=True) == sorted(top + [tmp_path / "sub" / "h.png"])
    source = EvalInput(tmp_path)
    assert source.images.files == image_files(tmp_path, recursive=True)
    assert len(source.images) == len(names) + 1
    assert list_videos(tmp_path) == [tmp_path]                  # a folder of frames is one video
    clip = read_clips(tmp_path, frames=len(names), stride=1, height=4, width=4)
    assert clip.shape == (1, len(names), 3, 4, 4)
    with pytest.raises(ValueError, match="7 frames"):
        read_clips(tmp_path, frames=len(names) + 1, stride=1, height=4, width=4)
