"""The command line turns every input error into one line on stderr and exit status 2."""

import pytest

from diffusers_ext.cli import main


@pytest.mark.parametrize("argv, message", [
    # patch raises UnsupportedModelError (a TypeError): once a traceback
    (["compare", "--model", "tiny:dit", "--method", "agent", "--steps", "1"], "does not support DiTTransformer2DModel"),
    (["compare", "--model", "tiny:sd", "--method", "agent", "--steps", "1", "--option", "ratio=0.5"], "no option"),
    (["compare", "--model", "tiny:sd", "--method", "agent", "--steps", "1", "--option", "oops"], "key=value"),
    (["compare", "--model", "tiny:sd", "--method", "agent", "--steps", "1", "--option", "merge_ratio=nan"], "finite"),
    (["compare", "--model", "tiny:nothing", "--steps", "1"], "unknown tiny family"),
])
def test_input_errors_are_one_line(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x.png")]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffusers-ext")]
    assert len(ours) == 1 and message in ours[0], ours
    assert not (tmp_path / "x.png").exists()


def test_methods_lists_kinds_and_markdown_tables(capsys):
    assert main(["methods"]) == 0
    plain = capsys.readouterr().out
    assert "merge_ratio = 0.4 (a number in [0.0, 0.75])" in plain
    assert main(["methods", "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert "### `agent`" in markdown and "| `merge_ratio` | `0.4` | a number in [0.0, 0.75] |" in markdown
