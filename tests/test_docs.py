"""The docs cannot rot: docs/add_a_method.md's example runs and keeps the method contract, and every
option table in README.md and docs/ is the registry's (`diffusers_ext.docs_tables`)."""

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import denoiser_inputs, run_denoiser
from test_contract import check_patch_acts_and_unpatch

import diffusers_ext as dx
from diffusers_ext import docs_tables, registry
from diffusers_ext.errors import OptionError, UnsupportedModelError
from diffusers_ext.testing import TINY_FAMILIES

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "add_a_method.md"
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEST_NAME = "test_docs_example"   # the page's method is registered under this name while a test runs


@pytest.fixture
def example(monkeypatch):
    """Executes the page's ```python blocks in order, `register_method` registering under TEST_NAME;
    yields the registered method, and removes it from the registry afterwards."""
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(encoding="utf-8"), re.M | re.S)
    assert blocks, f"{PAGE} has no python block"
    before = set(registry.all_methods())
    assert TEST_NAME not in before

    def register_for_test(cls):
        cls.name = TEST_NAME
        return registry.register_method(cls)

    monkeypatch.setattr(dx, "register_method", register_for_test)
    namespace = {"__name__": "add_a_method_example"}
    try:
        for block in blocks:
            exec(compile(block, str(PAGE), "exec"), namespace)
        assert set(registry.all_methods()) - before == {TEST_NAME}, "the page must register exactly one method"
        yield registry.get_method(TEST_NAME)
    finally:
        registry._METHODS.pop(TEST_NAME, None)


def test_example_keeps_the_contract(example, pipeline_of):
    """Patch, finite forward, acts, bit-exact unpatch on every tiny pipeline of its families. At the
    trained size its defaults are stock attention, hence the temperature (as the page says)."""
    assert example.training_free and set(example.families) <= set(TINY_FAMILIES.values())
    for tiny, family in TINY_FAMILIES.items():
        if family in example.families:
            check_patch_acts_and_unpatch(pipeline_of(tiny), TEST_NAME, {"temperature": 1.5})


def _explicit_attention(attn, x, factor):
    """softmax(factor * d^-1/2 * q k^T) v through to_out, written out with einsum (no SDPA)."""
    heads = attn.heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) * factor / math.sqrt(q.shape[-1])
    out = torch.einsum("bhnm,bhmd->bhnd", logits.softmax(dim=-1), v)
    return attn.to_out[0](out.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1))


@pytest.mark.parametrize("temperature, entropy_scaling", [(1.0, True), (1.5, True), (1.5, False)])
def test_example_computes_the_papers_scale(example, pipeline_of, temperature, entropy_scaling):
    """On a float64 copy of a level-0 self-attention of the tiny SD UNet (N0 = 32 x 32 tokens), with
    N = 300 tokens: the scale is temperature * sqrt(log N / log N0) * d^-1/2; float64 stays float64."""
    pipe = pipeline_of("sd")
    with dx.patched(pipe, TEST_NAME, temperature=temperature, entropy_scaling=entropy_scaling) as record:
        name = next(s.name for s in dx.family_of(pipe).find_sites(pipe.unet) if s.name in record.sites and s.level == 0)
        processor = record.processors()[name]
        attn = copy.deepcopy(dict(pipe.unet.named_modules())[name]).double()
        x = torch.randn(2, 300, attn.to_q.in_features, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        with torch.no_grad():
            out = processor(attn, x)
            factor = temperature * (math.sqrt(math.log(300) / math.log(32 * 32)) if entropy_scaling else 1.0)
            expected = _explicit_attention(attn, x, factor)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_example_is_stock_at_the_trained_size_and_acts_off_it(example, pipeline_of):
    pipe = pipeline_of("sd")
    model, kwargs = denoiser_inputs(pipe)
    bigger = {**kwargs, "sample": torch.randn(2, 4, 48, 48, generator=torch.Generator().manual_seed(1))}
    stock, stock_big = run_denoiser(model, kwargs), run_denoiser(model, bigger)
    with dx.patched(pipe, TEST_NAME):
        torch.testing.assert_close(run_denoiser(model, kwargs), stock, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(run_denoiser(model, bigger), stock_big, rtol=1e-4, atol=1e-5)


def test_example_options_sites_and_families(example, pipeline_of):
    sd = pipeline_of("sd")
    every = dx.patch(sd, TEST_NAME).sites
    finest = dx.patch(sd, TEST_NAME, levels="finest").sites   # a second patch replaces the first
    dx.unpatch(sd)
    levels = {s.name: s.level for s in dx.family_of(sd.unet).find_sites(sd.unet)}
    assert {levels[n] for n in every} == {0, 1} and {levels[n] for n in finest} == {0}
    for bad, message in [({"temperature": 0.0}, "temperature.*> 0.0"), ({"entropy_scaling": "yes"}, "True or False"),
                         ({"levels": "coarsest"}, "one of 'all', 'finest'")]:
        with pytest.raises(OptionError, match=message):
            dx.patch(sd, TEST_NAME, **bad)
    with pytest.raises(UnsupportedModelError, match="supports: sd, sdxl, dit"):
        dx.patch(pipeline_of("sd3"), TEST_NAME)
    assert dx.patch_record(sd) is None


# --- option tables derived from the registry -------------------------------------------------------------

def test_docs_tables_rewrites_stale_tables_and_check_names_them(tmp_path, capsys):
    page = tmp_path / "page.md"
    text = ("# Page\n\nQuoted `<!-- options: todo -->` in a sentence is no marker.\n\n"
            "<!-- options: todo -->\n| option | old |\n<!-- /options -->\n\nAfter.\n")
    page.write_text(text, encoding="utf-8")
    assert docs_tables.main(["--check", str(page)]) == 1
    assert f"{page}: the option table of 'todo' is stale" in capsys.readouterr().out
    assert page.read_text(encoding="utf-8") == text   # --check writes nothing

    assert docs_tables.main([str(page)]) == 0
    expected = text.replace("| option | old |\n", registry.options_markdown("todo") + "\n")
    assert page.read_text(encoding="utf-8") == expected
    assert docs_tables.main(["--check", str(page)]) == 0


@pytest.mark.parametrize("region, message", [
    ("<!-- options: nope -->\n<!-- /options -->\n", "unknown method 'nope'"),
    ("<!-- options: todo -->\n| option |\n", "'todo' has no `<!-- /options -->`"),
])
def test_docs_tables_bad_markers_are_errors(tmp_path, capsys, region, message):
    page = tmp_path / "page.md"
    page.write_text(region, encoding="utf-8")
    assert docs_tables.main(["--check", str(page)]) == 2
    assert message in capsys.readouterr().err


def test_docs_option_tables_are_current():
    stale = [f"{path.relative_to(ROOT)}: {name}" for path in DOC_FILES
             for name in docs_tables.stale(path.read_text(encoding="utf-8"))]
    assert not stale, ("stale option tables (run python -m diffusers_ext.docs_tables README.md docs/*.md): "
                       + "; ".join(stale))


def test_every_method_has_exactly_one_option_table():
    where: dict[str, list[str]] = {name: [] for name in registry.all_methods()}
    for path in DOC_FILES:
        for name, _ in docs_tables.regions(path.read_text(encoding="utf-8")):
            where.setdefault(name, []).append(str(path.relative_to(ROOT)))
    missing = sorted(name for name, paths in where.items() if not paths)
    repeated = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not missing and not repeated, (
        f"methods without an option table (`<!-- options: NAME -->` ... `<!-- /options -->`) in README.md or "
        f"docs/: {', '.join(missing) or 'none'}; tables repeated: {repeated or 'none'}")
