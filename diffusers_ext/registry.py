"""The method registry: every method declares its name, families, options and processor.

    @register_method
    class Agent(Method):
        name = "agent"
        families = ("sd", "sdxl", "animatediff")
        training_free = True
        options = (Option("k_scale2", 0.3, "scale exponent of the read-back softmax", number(0, 4)), ...)

        def select_sites(self, sites, options, family): ...     # which sites to replace
        def make_processor(self, site, original, patch): ...     # the replacement (patch: PatchRecord)
        def prepare(self, patch) / attach(patch) / detach(patch)  # optional: per-patch lifecycle
        def trainable_parameters(self, patch): ...                # optional: what a fine-tune trains
        def step_dependent(self, options): ...                    # optional: changes with the step

An `Option` is typed by its check: `number(low, high, integer=...)`, `one_of(*choices)`, `boolean`,
`schedule(name)`, or any function (a Python literal checked by it). The kind, range and choices
drive everything derived from the registry: `Option.parse` (the one reading of `--option key=value`
for every command and the app), the app's widgets, `diffusers-ext methods` and the docs' option
tables (`options_markdown`). Unknown options are an error.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .errors import OptionError


# --- typed checks ------------------------------------------------------------------------------------

class Check:
    """Validates a value (returns it, possibly normalised; raises TypeError / ValueError) and reads it
    from text. `kind` names the type for widgets and docs: bool | int | float | choice | schedule | literal."""

    kind = "literal"

    def __call__(self, value):
        return value

    def parse(self, text: str) -> Any:
        """Text from a command line or a form -> a Python value (validated later by `__call__`)."""
        return _literal(text)

    def describe(self) -> str:
        return "a Python literal"


def _literal(text: str) -> Any:
    """`ast.literal_eval`, or the text itself for a bare word (`all`, `concat`)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class Number(Check):
    def __init__(self, low: float | None = None, high: float | None = None, integer: bool = False,
                 low_open: bool = False):
        self.low, self.high, self.integer, self.low_open = low, high, integer, low_open
        self.kind = "int" if integer else "float"

    def __call__(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.integer and not isinstance(value, int)):
            raise TypeError(f"expected {'an integer' if self.integer else 'a number'}, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        low, high = self.low, self.high
        if low is not None and (value <= low if self.low_open else value < low):
            raise ValueError(f"must be {'>' if self.low_open else '>='} {low}, got {value!r}")
        if high is not None and value > high:
            raise ValueError(f"must be <= {high}, got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        value = _literal(text)
        if self.kind == "float" and isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf"):
            return float(value)   # refused by the check with a clear message
        return value

    def describe(self) -> str:
        what = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{self.low}, {self.high}]"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low}"
        if self.high is not None:
            return f"{what} <= {self.high}"
        return what


class Choice(Check):
    kind = "choice"

    def __init__(self, *choices):
        self.choices = tuple(choices)

    def __call__(self, value):
        if isinstance(value, bool) or value not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(repr, self.choices))}; got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        text = text.strip()
        if text in self.choices:
            return text
        value = _literal(text)
        return value if value in self.choices else text

    def describe(self) -> str:
        return "one of " + ", ".join(f"`{c!r}`" for c in self.choices)


class Boolean(Check):
    kind = "bool"
    WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False, "on": True, "off": False}

    def __call__(self, value):
        if not isinstance(value, bool):
            raise TypeError(f"expected True or False, got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        return self.WORDS.get(text.strip().lower(), text)

    def describe(self) -> str:
        return "True or False"


class ScheduleCheck(Check):
    kind = "schedule"

    def __init__(self, name: str):
        self.name = name

    def __call__(self, value):
        from .steps import Schedule

        return Schedule.parse(value, self.name)

    def describe(self) -> str:
        return "`None` (whole run), fractions `(0.0, 0.4)` or step indices `(0, 20)`"


class Literal(Check):
    """A custom check: any function of the value; read from text as a Python literal."""

    def __init__(self, function: Callable[[Any], Any], description: str | None = None):
        self.function = function
        self.description = description or (function.__doc__ or "").strip().split("\n")[0].rstrip(".")

    def __call__(self, value):
        return self.function(value)

    def describe(self) -> str:
        return self.description or "a Python literal"


def number(low: float | None = None, high: float | None = None, integer: bool = False, low_open: bool = False) -> Number:
    """A finite number in [low, high] (or (low, high] with `low_open`)."""
    return Number(low, high, integer, low_open)


def one_of(*choices) -> Choice:
    return Choice(*choices)


boolean = Boolean()


def schedule(name: str) -> ScheduleCheck:
    return ScheduleCheck(name)


@dataclass(frozen=True)
class Option:
    """One user-facing option: `default` is a value or a dict {family: value} (key "*" for the rest);
    `check` a `Check` (or a plain function, then a `Literal`)."""

    name: str
    default: Any
    doc: str
    check: Check | Callable[[Any], Any] | None = None

    def __post_init__(self):
        check = self.check
        if check is None:
            check = Check()
        elif not isinstance(check, Check):
            check = Literal(check)
        object.__setattr__(self, "check", check)

    @property
    def kind(self) -> str:
        return self.check.kind

    @property
    def choices(self) -> tuple:
        return getattr(self.check, "choices", ())

    @property
    def low(self):
        return getattr(self.check, "low", None)

    @property
    def high(self):
        return getattr(self.check, "high", None)

    def default_for(self, family: str) -> Any:
        if isinstance(self.default, dict):
            return self.default.get(family, self.default.get("*"))
        return self.default

    def validate(self, value: Any) -> Any:
        try:
            return self.check(value)
        except (TypeError, ValueError) as err:
            raise OptionError(f"option `{self.name}`: {err}") from None

    def parse(self, text: str) -> Any:
        """The option's value from text (`--option name=TEXT`, a form field); validate separately."""
        return self.check.parse(text)

    def info(self) -> dict[str, Any]:
        info = {"default": self.default, "doc": self.doc, "kind": self.kind, "allowed": self.check.describe()}
        if self.choices:
            info["choices"] = list(self.choices)
        if self.kind in ("int", "float"):
            info.update(low=self.low, high=self.high)
        return info


# the option every method has: where in the denoising run the patch acts
STEPS = Option("steps", None, "part of the run where the patch acts (fractions or step indices)", schedule("steps"))


def split_option_pairs(pairs: list[str] | None) -> dict[str, str]:
    """["k=v", ...] -> {k: "v"}: the syntax of every command's repeatable `--option KEY=VALUE`."""
    texts: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--option expects key=value, got {pair!r}")
        if key.strip() in texts:
            raise OptionError(f"--option {key.strip()} is given twice")
        texts[key.strip()] = value.strip()
    return texts


def parse_options(pairs: list[str] | dict[str, str] | None, method: str) -> dict[str, Any]:
    """`--option` texts -> typed values for `method` (each read by its option's kind; unknown names
    are an error). The one option parser of the CLI, the app and the notebooks."""
    texts = pairs if isinstance(pairs, dict) else split_option_pairs(pairs)
    spec = get_method(method)
    known = {o.name: o for o in spec.options}
    spec.check_names(texts)
    return {name: known[name].parse(text) for name, text in texts.items()}


# --- methods -----------------------------------------------------------------------------------------

class Method:
    """Base class of a registered method: set the class attributes, write `select_sites` and
    `make_processor`; the lifecycle hooks are optional.

    The lifecycle of one patch (`diffusers_ext.patch`), each hook given the patch's `PatchRecord`
    (its options, step state, denoiser, pipeline, and `resources`, the patch's own shared state):
        prepare(patch)        before any processor is built: per-patch shared objects into
                              `patch.resources` (never a module-level registry)
        make_processor(site, original, patch)   one replacement per selected site
        attach(patch)         once the processors are installed: hooks on the denoiser / pipeline
        detach(patch)         on `unpatch`, before the original processors are restored
    """

    name: str = ""
    families: tuple[str, ...] = ()
    training_free: bool = True
    inherits_projections: bool = False     # a fine-tune may adapt the patched sites' projections
    description: str = ""
    options: tuple[Option, ...] = ()
    # values for options a weights folder does not record because it was saved before they existed
    # (their defaults then changed), e.g. {"layout": "gated"}: old folders keep meaning what they meant
    saved_defaults: dict[str, Any] = {}

    # --- options (resolved here, and only here) -------------------------------------------------------

    def check_names(self, given) -> None:
        known = [o.name for o in self.options]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise OptionError(
                f"method {self.name!r} has no option(s) {', '.join(unknown)}; its options are: "
                f"{', '.join(known) or 'none'}"
            )

    def resolve_options(self, family: str, given: dict[str, Any], denoiser=None) -> dict[str, Any]:
        """Defaults for `family`, overridden by `given`, each validated; then the cross-option checks
        and, with a denoiser, the values that depend on the model (`resolve_for_model`)."""
        self.check_names(given)
        resolved = {}
        for option in self.options:
            value = given[option.name] if option.name in given else option.default_for(family)
            resolved[option.name] = option.validate(value)
        try:
            self.check_options(resolved, family)
        except OptionError:
            raise
        except (TypeError, ValueError) as err:
            raise OptionError(str(err)) from None
        if denoiser is not None:
            self.resolve_for_model(resolved, denoiser)
        return resolved

    def check_options(self, options: dict[str, Any], family: str) -> None:
        """Cross-option checks (raise ValueError); may fill in derived defaults."""

    def resolve_for_model(self, options: dict[str, Any], denoiser) -> None:
        """Fill in options whose default depends on the model (e.g. its native token grid)."""

    # --- the patch --------------------------------------------------------------------------------------

    def select_sites(self, sites, options: dict[str, Any], family: str):
        raise NotImplementedError

    def make_processor(self, site, original, patch):
        raise NotImplementedError

    def prepare(self, patch) -> None:
        """Before the processors are built: per-patch shared objects into `patch.resources`."""

    def attach(self, patch) -> None:
        """Once the processors are installed: per-patch hooks (on `patch.denoiser`, `patch.pipeline`).
        Undo them in `detach`."""

    def detach(self, patch) -> None:
        """Called by `unpatch` before the original processors are restored."""

    def trainable_parameters(self, patch) -> dict[str, list]:
        """What a fine-tune (`diffusers_ext.distill`) may train on a denoiser patched by this method:
        {"new": parameters the method added, "inherited": pretrained parameters it may adapt}.

        Default: every parameter of the installed processors is new; inherited, when the method
        `inherits_projections`, the attention projections of every patched site (q, k, v, output
        and, on joint attention, the text stream's): the papers fine-tune them with the new parts."""
        modules = dict(patch.denoiser.named_modules())
        new, inherited = [], []
        for name, processor in patch.processors().items():
            if hasattr(processor, "parameters"):
                new.extend(processor.parameters())
            if self.inherits_projections:
                inherited.extend(attention_projections(modules[name]))
        return {"new": new, "inherited": inherited}

    def step_dependent(self, options: dict[str, Any]) -> bool:
        """Whether the patched model computes a different function at different steps of a run (a
        partial schedule). The step state is set once per denoiser call, from its first sample's
        timestep, so a fine-tune of such a patch gives every sample of a batch the same timestep.
        Default: any option holding a `Schedule` that does not cover the whole run."""
        from .steps import Schedule

        return any(isinstance(v, Schedule) and not v.always for v in options.values())

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name, "families": list(self.families), "training_free": self.training_free,
            "description": self.description,
            "options": {o.name: o.info() for o in self.options},
        }


_METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a `Method` subclass under its `name` (a later one replaces it)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    _METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    _load_builtin_methods()
    if name not in _METHODS:
        raise OptionError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS)) or 'none'}")
    return _METHODS[name]


def all_methods() -> dict[str, Method]:
    _load_builtin_methods()
    return dict(sorted(_METHODS.items()))


def _load_builtin_methods() -> None:
    from . import processors  # noqa: F401  (importing the package registers every method in it)


# --- documentation derived from the registry --------------------------------------------------------

def _default_text(option: Option) -> str:
    default = option.default
    if isinstance(default, dict):
        return "; ".join(f"{'others' if k == '*' else k}: `{v!r}`" for k, v in default.items())
    if option.kind == "schedule" and default is None:
        return "whole run"
    return f"`{default!r}`"


def options_markdown(method: str) -> str:
    """The option table of `method` (markdown): name, default, what is allowed, meaning."""
    rows = ["| option | default | allowed | meaning |", "|---|---|---|---|"]
    for option in get_method(method).options:
        doc = option.doc.replace("|", "\\|")
        rows.append(f"| `{option.name}` | {_default_text(option)} | {option.check.describe()} | {doc} |")
    return "\n".join(rows)


PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def attention_projections(attn: nn.Module) -> list[nn.Parameter]:
    """The pretrained projections of a diffusers `Attention`: q / k / v, the output's linear layer
    and, on joint attention, the text stream's q / k / v and output."""
    layers = [getattr(attn, name, None) for name in PROJECTIONS] + [attn.to_out[0]]
    return [p for layer in layers if isinstance(layer, nn.Linear) for p in layer.parameters()]
