"""Every command the docs show runs as written: each `diffusers-ext ...` line of README.md and
docs/*.md (code blocks, with their line continuations, and inline commands with options; also
`accelerate launch` / `torchrun ... -m diffusers_ext.cli` and `python app.py`) is read by the real
argument parser, and its method options are resolved by the registry as `patch` would resolve
them. The quick ones run (`methods`); the rest load hub models or train for minutes, so their
parse and option check stand for the run."""

import re
import shlex
from pathlib import Path

import pytest

from diffusers_ext.cli import build_parser
from diffusers_ext.families import families
from diffusers_ext.loading import embedded_family
from diffusers_ext import registry
from diffusers_ext.registry import get_method, parse_options, split_option_pairs

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HUB_FAMILIES = {   # the family of each hub model the docs name (checked: a new one must be added here)
    "runwayml/stable-diffusion-v1-5": "sd",
    "stabilityai/stable-diffusion-2-1-base": "sd",
    "stabilityai/stable-diffusion-3.5-medium": "sd3",
    "facebook/DiT-XL-2-256": "dit",
}
RUN = {("methods",)}   # commands fast enough to run here, as written
COMMAND_STARTS = ("diffusers-ext ", "accelerate launch ", "torchrun ", "python app.py")


def _argv(tokens: list[str]) -> list[str] | None:
    """The `diffusers-ext` arguments of a shell command, or None when it is not one."""
    if tokens[:1] == ["diffusers-ext"]:
        return tokens[1:]
    if "diffusers_ext.cli" in tokens and "-m" in tokens:
        return tokens[tokens.index("diffusers_ext.cli") + 1:]
    if tokens[:2] == ["python", "app.py"]:
        return ["app", *tokens[2:]]
    return None


def _shell_blocks(text: str) -> list[str]:
    """The bodies of the fenced code blocks whose language is bash / sh / shell / none."""
    blocks, body, language = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if body is None:
                body, language = [], line[3:].strip()
            else:
                if language in ("", "bash", "sh", "shell"):
                    blocks.append("\n".join(body))
                body = None
        elif body is not None:
            body.append(line)
    return blocks


def doc_commands() -> list[tuple[str, str]]:
    """(where, command text) of every command shown in the docs."""
    found = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for block in _shell_blocks(text):
            for line in block.replace("\\\n", " ").splitlines():
                if (line.strip() + " ").startswith(COMMAND_STARTS):
                    found.append((path.name, line.strip()))
        for span in re.findall(r"`(diffusers-ext [^`]*--[^`]*)`", text):   # inline, with options
            found.append((path.name, span))
    return found


COMMANDS = [(where, text, argv) for where, text in doc_commands()
            if (argv := _argv(shlex.split(re.sub(r"<[^>]*>", "PLACEHOLDER", text).replace("[", "").replace("]", ""),
                                          comments=True))) is not None and "..." not in argv]


def test_the_docs_show_commands_of_every_kind():
    kinds = {argv[0] for _, _, argv in COMMANDS}
    assert {"compare", "sample", "fid", "fid-stats", "distill", "animate", "app", "methods"} <= kinds, kinds


def _family(model: str | None, default: str) -> str:
    if model is None:
        return default
    family = embedded_family(model) or HUB_FAMILIES.get(model)
    assert family is not None, f"add the family of {model!r} to HUB_FAMILIES"
    return family


@pytest.fixture
def page_methods():
    """The method docs/add_a_method.md builds (its python blocks run), registered while a test runs."""
    page = ROOT / "docs" / "add_a_method.md"
    before = registry.all_methods()   # the built-in ones loaded first
    namespace = {"__name__": "add_a_method_page"}
    for block in re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S):
        exec(compile(block, str(page), "exec"), namespace)
    yield
    registry._METHODS.clear()
    registry._METHODS.update(before)


@pytest.mark.usefixtures("page_methods")
@pytest.mark.parametrize("where, text, argv", COMMANDS, ids=[f"{w}:{' '.join(a[:2])}" for w, _, a in COMMANDS])
def test_documented_command_parses_and_its_options_resolve(where, text, argv, capsys, tmp_path, monkeypatch):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:
        if exit.code == 0 and "--help" in argv:
            return
        pytest.fail(f"{where}: `{text}` is refused by the parser: {capsys.readouterr().err.strip()}")
    method = family = None
    if args.command == "compare":
        family = _family(args.model, "dit")
        method = args.method or families()[family].default_method
        texts = split_option_pairs(args.option)
    elif args.command in ("sample", "distill"):
        method, texts = args.method, split_option_pairs(args.option)
        if method:
            family = _family(args.model, get_method(method).families[0])
    elif args.command == "animate":
        method, family = "anchor_frame", "animatediff"
        texts = split_option_pairs(args.option)
        texts.update({k: v for k, v in (("anchor", args.anchor), ("mode", args.mode),
                                        ("anchor_weight", args.anchor_weight)) if v is not None})
    if method is not None:
        spec = get_method(method)
        assert family in spec.families, f"{where}: `{text}`: {method} does not fit the family {family}"
        spec.resolve_options(family, parse_options(texts, method))   # raises what `patch` would raise
    if tuple(argv) in RUN:
        monkeypatch.chdir(tmp_path)
        assert args.func(args) == 0, f"{where}: `{text}` failed"
