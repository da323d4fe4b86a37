"""The README's three commands are what CI runs, and the documented API exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no Quick start bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_commands():
    commands = readme_commands()
    assert len(commands) == 3
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    for command in commands:
        assert command in ci, f"{command!r} is in the README but not in .ci/run"
    assert "torch==2.13.0" in commands[0]


def test_readme_methods_are_registered():
    import diffusers_ext as dx

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## Methods", 1)[1].split("\n\n", 2)[1]   # the table after the heading
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert len(documented) >= 2
    registered = {m["name"] for m in dx.methods()}
    assert documented <= registered, f"documented but not registered: {documented - registered}"
