"""The composition matrix: what diffusers-ext composes with, each cell a test, and its table.

Each `Feature` is one thing a diffusers user stacks on a pipeline (a LoRA, ControlNet, a step cache,
...) on some tiny pipelines (`diffusers_ext.testing`), with the outcome its cells assert:

    "composes"    the patch acts with it (output differs from the feature alone, finite),
                  `unpatch` gives back exactly the feature-only model, and where the feature can be
                  removed, removing it leaves the patch intact;
    "limitation"  the combination is refused with the error `error` (a `DiffusersExtError`), naming
                  both sides and what to do, and the model is bit-exact as before the refused call.

`cells()` expands the features into (feature, method, tiny pipeline) for every registered method
that fits the tiny pipeline's family; tests/test_compat.py runs one test per cell (a feature
without a check there fails the suite), so every line of the table below is a passing test:

    python -m diffusers_ext.compat            # (re)write docs/compatibility.md from this registry
    python -m diffusers_ext.compat --check    # exit 1 if the committed page is stale
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

OUTCOMES = ("composes", "limitation")
PAGE = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"


@dataclass(frozen=True)
class Feature:
    """key: the test's check; title: the table's row; tinies: the tiny pipelines it runs on;
    how: what the cells check or, for a limitation, what to do instead; error: the error class a
    limitation raises; slow: tinies whose cells run with `-m slow` only (over ~10 s on 2 cores)."""

    key: str
    title: str
    tinies: tuple[str, ...]
    how: str
    outcome: str = "composes"
    error: str = ""
    slow: tuple[str, ...] = ()

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise ValueError(f"feature {self.key!r}: outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        if (self.outcome == "limitation") != bool(self.error):
            raise ValueError(f"feature {self.key!r}: a limitation names its error class, nothing else does")


FEATURES: tuple[Feature, ...] = (
    Feature("custom_declared", "a user's processor declared with `dx.compose_with`", ("sd3", "sd"),
            "its own `cross_attention_kwargs` / `joint_attention_kwargs` entries reach it through the patch; "
            "calls carrying them go to it"),
    Feature("custom_undeclared", "a user's or another plugin's processor, undeclared", ("dit", "sd3", "sd"),
            "refused at `dx.patch`, naming the processor class; declare it with `dx.compose_with` if it is "
            "plain attention plus arguments of its own", "limitation", "PatchError"),
    Feature("lora", "PEFT LoRA: `load_lora_weights` before / after the patch, `set_adapters`, "
            "`fuse_lora` / `unfuse_lora`, `unload_lora_weights`", ("sd3", "sd", "sdxl"),
            "both orders give the same output; adapter weights and fusing act through the patch; unloading "
            "leaves the patch intact"),
    Feature("controlnet", "ControlNet pipelines", ("sd3", "sd", "sdxl"),
            "the denoiser is patched (the ControlNet's own attention is not)"),
    Feature("ip_adapter", "IP-Adapter loaded before the patch (random image projection)", ("sdxl", "sd"),
            "the image prompt and `set_ip_adapter_scale` act through the patch (it replaces self-attention "
            "only; the IP-Adapter's cross-attention processors stay)"),
    Feature("ip_adapter_after", "IP-Adapter loaded after the patch", ("sd", "sdxl"),
            "`load_ip_adapter` copies every processor by class and fails on the patch's; load it before "
            "`dx.patch`", "limitation", "PatchError"),
    Feature("t2i_adapter", "T2I-Adapter", ("sd",), "the adapter's residuals reach the patched UNet", slow=("sd",)),
    Feature("img2img", "img2img pipelines", ("sd3", "sd", "sdxl"), "patched through the img2img pipeline"),
    Feature("inpaint", "inpainting pipelines", ("sdxl", "sd"), "patched through the inpainting pipeline"),
    Feature("fuse_qkv", "`fuse_qkv_projections` before the patch", ("sd3", "sd", "sdxl"),
            "the patch wraps the fused processors and reads the kept `to_q` / `to_k` / `to_v`"),
    Feature("fuse_qkv_after", "`fuse_qkv_projections` after the patch", ("sd3", "sd"),
            "it replaces every processor: the next call raises; `unfuse_qkv_projections` gives the patch back",
            "limitation", "PatchError"),
    Feature("attention_slicing", "attention slicing before the patch", ("sdxl", "sd"),
            "the patch wraps `SlicedAttnProcessor` (its own attention is not sliced)"),
    Feature("attention_slicing_after", "attention slicing after the patch", ("sd",),
            "`enable_attention_slicing` replaces every processor: the next call raises; slice before "
            "`dx.patch`. `dx.unpatch` then keeps the slicing (it takes back only what the patch installed)",
            "limitation", "PatchError"),
    Feature("vae_tiling", "VAE tiling", ("sd",), "decoding is untouched", slow=("sd",)),
    Feature("compile", "`torch.compile` of the denoiser", ("sd3", "dit", "sd"),
            "once each phase of the method's schedule is compiled, new steps compile nothing; the only graph break is the step tracker's hook, except agent's (its "
            "token matching has a data-dependent shape, its seeded generator is not traced) and mediator's (its "
            "per-step token count, at phase changes)", slow=("sd",)),
    Feature("bf16", "bf16 weights on CPU, large activations", ("dit", "sd3", "sdxl", "sd"),
            "finite output with 30x the usual latent scale"),
    Feature("torchao", "torchao int8 weight-only quantisation (`quantize_`) before the patch", ("dit", "sd3", "sd"),
            "the patch runs on the quantised projections; within 5 % of the patch on fp32 weights"),
    Feature("autocast", "CPU bf16 autocast over fp32 weights, after an fp32 call", ("dit", "sd3", "sd"),
            "bf16 out, finite, within 5 % of the fp32 patch: what a processor caches follows the compute dtype"),
    Feature("deepcache", "DeepCache (`DeepCacheSDHelper`)", ("sdxl", "sd"),
            "enabled before or after the patch, both act; `helper.disable()` and `dx.unpatch` in either order "
            "leave exactly the other", slow=("sdxl", "sd")),
    Feature("tomesd", "tomesd applied before the patch", ("sd",),
            "refused at `dx.patch`: tomesd merges the tokens before attention, which then sees no latent grid; "
            "`tomesd.remove_patch(pipe)` first (agent and todo merge tokens themselves)", "limitation", "PatchError"),
    Feature("tomesd_after", "tomesd applied after the patch", ("sd",),
            "the next call raises, naming tomesd; `tomesd.remove_patch(pipe)` gives the patch back",
            "limitation", "ValueError", slow=("sd",)),
    Feature("first_block_cache", "diffusers' First-Block cache (`apply_first_block_cache`)", ("dit",),
            "applied before the patch, it still skips blocks; removing its hooks leaves the patch intact (SD3: "
            "diffusers' hook fails on the last joint block, which returns no text states, with or without the "
            "patch; these diffusers pipelines set no cache context, the test sets one per run)"),
    Feature("taylorseer", "diffusers' TaylorSeer cache (`apply_taylorseer_cache`)", ("sd3",),
            "applied before the patch, it still predicts; removing its hooks leaves the patch intact (the test "
            "sets the cache context these diffusers pipelines do not; on DiT its default identifiers match no "
            "layer, so it does nothing there, with or without the patch)"),
)


# What the matrix does not cover yet, and why (listed on the page under the table).
NOT_COVERED = (
    "SD3's IP-Adapter: its joint processor is not a stock one, so a patch refuses it like any undeclared "
    "processor (no cell builds it)",
    "SDXL with its refiner, model CPU offload, fp16: GPU-suite items (offload and fp16 need CUDA)",
    "cache-dit: on pip, not installed in the test environment (diffusers' own First-Block and TaylorSeer "
    "caches are)",
    "diffusers' FasterCache: needs the pipeline's timestep callback, which these pipelines do not provide",
    "AnimateDiff and `anchor_frame`: only the method contract (tests/test_contract.py)",
)


def features() -> dict[str, Feature]:
    return {f.key: f for f in FEATURES}


def cells() -> list[tuple[Feature, str, str]]:
    """(feature, method, tiny pipeline) for every registered method that fits the tiny's family."""
    from .registry import all_methods
    from .testing import TINY_FAMILIES

    methods = all_methods()
    return [(feature, name, tiny) for feature in FEATURES for tiny in feature.tinies
            for name, spec in sorted(methods.items()) if TINY_FAMILIES[tiny] in spec.families]


def markdown() -> str:
    """The page: one row per feature, one column per method, the tiny pipelines of each cell."""
    from .registry import all_methods

    names = sorted(all_methods())
    grid: dict[tuple[str, str], list[str]] = {}
    for feature, method, tiny in cells():
        grid.setdefault((feature.key, method), []).append(tiny)
    mark = {"composes": "yes", "limitation": "refused"}
    lines = [
        "# Compatibility: what diffusers-ext composes with",
        "",
        "<!-- generated by `python -m diffusers_ext.compat` from diffusers_ext/compat.py; do not edit -->",
        "",
        "Each entry is a test in `tests/test_compat.py` on the tiny offline pipelines (`diffusers_ext.testing`):",
        "**yes**: the patch acts with the feature (finite output that differs from the feature alone), and",
        "`dx.unpatch` gives back exactly the feature-only model; **refused**: the combination raises the error",
        "named below, which says what to do, and leaves the model bit-exact as before. `-`: the method does",
        "not fit the pipelines tested. The tiny pipelines of each entry are in brackets. The fast suite runs",
        "the first cell of each row (its first pipeline, first method); `pytest -m slow tests/test_compat.py` all.",
        "",
        "Speed when stacked: agent + DeepCache on a 20-step SD 1.5 run at 1024^2 is 3.54x stock and 1.59x",
        "DeepCache alone ([benchmarks/results/combined_speed.md](../benchmarks/results/combined_speed.md)); on a",
        "28-step SD3.5-medium run at 1024^2, diffusers' TaylorSeer cache at its defaults is 1.50x stock, with LINA",
        "1.77x (1.18x over TaylorSeer alone) and with T^5 1.60x (1.07x): TaylorSeer already skips every attention",
        "module on 20 of the 28 steps, so only its 8 full steps gain",
        "([benchmarks/results/combined_speed_sd35.md](../benchmarks/results/combined_speed_sd35.md)).",
        "",
        "| feature | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for feature in FEATURES:
        row = [f"{mark[feature.outcome]} ({', '.join(grid[feature.key, n])})" if (feature.key, n) in grid else "-"
               for n in names]
        lines.append(f"| {feature.title} | " + " | ".join(row) + " |")
    lines += ["", "## The processor protocol", "",
              "A patch wraps the processor it replaces: its `__call__` reports the wrapped processor's signature, "
              "so every",
              "`cross_attention_kwargs` / `joint_attention_kwargs` entry that processor names reaches it (diffusers "
              "passes a",
              "processor only the entries it names), and a call carrying such entries goes to it. It wraps only "
              "diffusers' stock",
              "processors (`diffusers_ext.processor.COMPOSABLE_PROCESSORS`) and classes declared with "
              "`dx.compose_with(cls)`;",
              "any other is refused at `dx.patch`, naming its class. Something that replaces the patch's processors "
              "later",
              "(`fuse_qkv_projections`, `enable_attention_slicing`, `set_attn_processor`) makes the next call raise;",
              "`dx.unpatch` restores the original processor only where the patch's own is still installed, so a "
              "processor set",
              "after the patch stays.",
              "", "## What each row checks", ""]
    for feature in FEATURES:
        error = f" Error: `{feature.error}`." if feature.error else ""
        slow = f" ({', '.join(feature.slow)}: `pytest -m slow`)" if feature.slow else ""
        lines.append(f"- **{feature.title}**: {feature.how}.{error}{slow}")
    lines += ["", "## Not covered yet", "", *(f"- {item}." for item in NOT_COVERED)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_ext.compat", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/compatibility.md is stale")
    args = parser.parse_args(argv)
    text = markdown()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else None
        if current != text:
            print(f"{PAGE} is stale: run `python -m diffusers_ext.compat`", file=sys.stderr)
            return 1
        return 0
    from .files import atomic_write_text

    atomic_write_text(PAGE, text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
