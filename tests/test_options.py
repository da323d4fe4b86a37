"""Typed options: one parser for every command and the app, kinds / ranges / choices from the checks."""

import pytest

import diffusers_ext as dx
from diffusers_ext.errors import OptionError
from diffusers_ext.registry import all_methods, get_method, options_markdown, parse_options, split_option_pairs
from diffusers_ext.steps import Schedule


def test_parse_reads_each_option_by_its_kind():
    parsed = parse_options(["agent_steps=(0.0, 0.4)", "random_dst=true", "agent_source=pool", "merge_ratio=0.5",
                            "min_tokens=64", "steps=all"], "agent")
    assert parsed == {"agent_steps": (0.0, 0.4), "random_dst": True, "agent_source": "pool", "merge_ratio": 0.5,
                      "min_tokens": 64, "steps": "all"}
    assert type(parsed["min_tokens"]) is int and type(parsed["merge_ratio"]) is float
    assert parse_options(["random_dst=False"], "agent") == {"random_dst": False}
    assert parse_options(["random_dst=0"], "agent") == {"random_dst": False}
    # what the parser returns is what `patch` accepts
    resolved = get_method("agent").resolve_options("sd", parsed)
    assert resolved["agent_steps"] == Schedule(0.0, 0.4) and resolved["steps"] == Schedule()


def test_every_command_reads_options_the_same_way():
    """compare, sample and distill all call `registry.parse_options`: none has a parser of its own."""
    import diffusers_ext.compare as compare
    import diffusers_ext.distill.cli as distill_cli
    import diffusers_ext.eval.cli as eval_cli

    for module in (compare, distill_cli, eval_cli):
        source = open(module.__file__, encoding="utf-8").read()
        assert "literal_eval" not in source and "json.loads(value" not in source, module.__name__


@pytest.mark.parametrize("pairs, message", [
    (["oops"], "key=value"),
    (["=1"], "key=value"),
    (["seed=1", "seed=2"], "twice"),
])
def test_option_syntax_errors(pairs, message):
    with pytest.raises(OptionError, match=message):
        split_option_pairs(pairs)


def test_unknown_option_names_the_known_ones():
    with pytest.raises(OptionError, match="no option.*ratio.*merge_ratio"):
        parse_options(["ratio=0.5"], "agent")


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(text):
    value = parse_options([f"merge_ratio={text}"], "agent")["merge_ratio"]
    with pytest.raises(OptionError, match="finite"):
        get_method("agent").resolve_options("sd", {"merge_ratio": value})


def test_bad_words_stay_words_and_fail_in_the_check():
    value = parse_options(["random_dst=maybe"], "agent")["random_dst"]
    assert value == "maybe"
    with pytest.raises(OptionError, match="True or False"):
        get_method("agent").resolve_options("sd", {"random_dst": value})
    with pytest.raises(OptionError, match="one of 'merge', 'pool'"):
        get_method("agent").resolve_options("sd", parse_options(["agent_source=tome"], "agent"))


def test_kinds_ranges_and_choices_come_from_the_checks():
    agent = {o.name: o for o in get_method("agent").options}
    assert agent["random_dst"].kind == "bool"
    assert agent["merge_ratio"].kind == "float" and (agent["merge_ratio"].low, agent["merge_ratio"].high) == (0.0, 0.75)
    assert agent["min_tokens"].kind == "int"
    assert agent["agent_source"].kind == "choice" and agent["agent_source"].choices == ("merge", "pool")
    assert agent["agent_steps"].kind == "schedule"
    info = {m["name"]: m for m in dx.methods()}["agent"]["options"]["merge_ratio"]
    assert info["kind"] == "float" and info["low"] == 0.0 and info["high"] == 0.75 and "[0.0, 0.75]" in info["allowed"]


@pytest.mark.parametrize("method", sorted(all_methods()))
def test_every_default_is_accepted_and_every_option_documented(method):
    spec = get_method(method)
    for family in spec.families:
        spec.resolve_options(family, {})
    table = options_markdown(method)
    for option in spec.options:
        assert f"| `{option.name}` |" in table
        assert option.kind in ("bool", "int", "float", "choice", "schedule", "literal")
