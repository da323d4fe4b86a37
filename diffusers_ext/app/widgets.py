"""One form field per method option, chosen from the option's type in the registry (never probed):

    kind bool                                  -> Checkbox
    kind int / float                           -> Number (whole numbers for int), its range
                                                  (`check.describe()`, from low / high) in the field's info
    kind choice                                -> Dropdown of exactly `option.choices`
    schedule, literal, or a per-family default -> Textbox, read by `Option.parse` (the registry's one
                                                  parser); empty: the method's default for the model

Only options changed from their default are passed on, so an untouched form runs the method's
defaults for the model; the values are validated where the patch is made (`dx.patch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from diffusers_ext.registry import Option, all_methods

WIDGETS = {"bool": "checkbox", "int": "number", "float": "number", "choice": "dropdown"}


@dataclass(frozen=True)
class OptionField:
    """One option of one method on the form: its widget and how the widget's value becomes the option's."""

    method: str
    option: Option

    @property
    def widget(self) -> str:
        """checkbox | number | dropdown | textbox (a per-family default is typed as text: empty = the model's)."""
        if isinstance(self.option.default, dict):
            return "textbox"
        return WIDGETS.get(self.option.kind, "textbox")

    @property
    def elem_id(self) -> str:
        return f"opt-{self.method}-{self.option.name}"

    @property
    def label(self) -> str:
        """The option's name; a schedule says so ("steps (schedule)": the part of the run where the patch
        acts), apart from the page's "sampling steps", the number of denoising steps."""
        return f"{self.option.name} (schedule)" if self.option.kind == "schedule" else self.option.name

    def component(self, visible: bool) -> gr.components.Component:
        option = self.option
        allowed = option.check.describe().replace("`", "")
        common = dict(label=self.label, visible=visible, elem_id=self.elem_id)
        if self.widget == "checkbox":
            return gr.Checkbox(value=option.default, info=option.doc, **common)
        if self.widget == "dropdown":
            return gr.Dropdown(choices=list(option.choices), value=option.default, info=option.doc, **common)
        info = f"{option.doc} ({allowed})"
        if self.widget == "number":   # the range is stated, not passed as minimum / maximum: gradio would
            # refuse a value outside them itself, without naming the option; the registry's check names it
            return gr.Number(value=option.default, precision=0 if option.kind == "int" else None, info=info, **common)
        return gr.Textbox(value="", placeholder=self.placeholder(), max_lines=1, info=info, **common)

    def placeholder(self) -> str:
        default = self.option.default
        if isinstance(default, dict):
            shown = ", ".join(f"{'others' if k == '*' else k}: {v!r}" for k, v in default.items())
            return f"default per model ({shown})"
        if self.option.kind == "schedule" and default is None:
            return "default: whole run"
        return f"default: {default!r}"

    def parse(self, value) -> tuple[bool, Any]:
        """The widget's value -> (given, option value); not given means the method's default for the model."""
        if self.widget == "checkbox":
            return bool(value) != self.option.default, bool(value)
        if self.widget in ("number", "dropdown"):
            return value is not None and value != self.option.default, value
        text = "" if value is None else str(value).strip()
        return (True, self.option.parse(text)) if text else (False, None)


def option_fields(methods: list[str]) -> list[OptionField]:
    """Every option of every method in `methods`, in registry order."""
    registry = all_methods()
    return [OptionField(name, option) for name in methods for option in registry[name].options]


def options_of(method: str, fields: list[OptionField], values: list) -> dict[str, Any]:
    """The options of `method` given on the form (`values` aligned with `fields`; other methods' ignored)."""
    options = {}
    for field, value in zip(fields, values):
        if field.method == method:
            given, parsed = field.parse(value)
            if given:
                options[field.option.name] = parsed
    return options
