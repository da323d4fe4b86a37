"""The method registry: every method declares its name, families, options and processor.

    @register_method
    class Agent(Method):
        name = "agent"
        families = ("sd", "sdxl", "animatediff")
        training_free = True
        options = (Option("k_scale2", 0.3, "scale exponent of the broadcast softmax", check=in_range(0, 2)), ...)

        def select_sites(self, sites, options, family): ...       # which sites to replace
        def make_processor(self, site, original, options, state): ...  # the replacement
        def trainable_parameters(self, denoiser, record, options): ...  # optional: what a fine-tune trains
        def attach(self, denoiser, record) / detach(...): ...           # optional: per-patch resources
        def step_dependent(self, options): ...                          # optional: changes with the step

`Option` validates a user's value and may have a per-family default. Unknown options are an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

_REQUIRED = object()


@dataclass(frozen=True)
class Option:
    """One user-facing option: `default` is a value or a dict {family: value} (key "*" for the rest)."""

    name: str
    default: Any
    doc: str
    check: Callable[[Any], Any] | None = None

    def default_for(self, family: str) -> Any:
        if isinstance(self.default, dict):
            return self.default.get(family, self.default.get("*"))
        return self.default

    def validate(self, value: Any) -> Any:
        if self.check is None:
            return value
        try:
            return self.check(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"option `{self.name}`: {err}") from None


# --- reusable checks ---------------------------------------------------------------------------------

def number(low: float | None = None, high: float | None = None, integer: bool = False, low_open: bool = False):
    """A check for a number in [low, high] (or (low, high] with `low_open`)."""

    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise TypeError(f"expected {'an integer' if integer else 'a number'}, got {value!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise ValueError(f"must be {'>' if low_open else '>='} {low}, got {value!r}")
        if high is not None and value > high:
            raise ValueError(f"must be <= {high}, got {value!r}")
        return value

    return check


def one_of(*choices):
    def check(value):
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value

    return check


def boolean(value):
    if not isinstance(value, bool):
        raise TypeError(f"expected True or False, got {value!r}")
    return value


def schedule(name: str):
    from .steps import Schedule

    return lambda value: Schedule.parse(value, name)


# the option every method has: where in the denoising run the patch acts
STEPS = Option("steps", None, "part of the run where the patch acts (fractions or step indices)", schedule("steps"))


# --- methods -----------------------------------------------------------------------------------------

class Method:
    """Base class of a registered method; subclasses set the class attributes and two hooks."""

    name: str = ""
    families: tuple[str, ...] = ()
    training_free: bool = True
    description: str = ""
    options: tuple[Option, ...] = ()

    def resolve_options(self, family: str, given: dict[str, Any]) -> dict[str, Any]:
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no option(s) {', '.join(unknown)}; its options are: "
                f"{', '.join(known) or 'none'}"
            )
        resolved = {}
        for option in self.options:
            value = given[option.name] if option.name in given else option.default_for(family)
            resolved[option.name] = option.validate(value)
        self.check_options(resolved, family)
        return resolved

    def check_options(self, options: dict[str, Any], family: str) -> None:
        """Cross-option checks; raise ValueError."""

    def select_sites(self, sites, options: dict[str, Any], family: str):
        raise NotImplementedError

    def make_processor(self, site, original, options: dict[str, Any], state):
        raise NotImplementedError

    def attach(self, denoiser, record) -> None:
        """Called once the processors are installed: per-patch resources that need the denoiser
        (e.g. a hook reading its input). Undo them in `detach`."""

    def detach(self, denoiser, record) -> None:
        """Called by `unpatch` before the original processors are restored."""

    def trainable_parameters(self, denoiser, record, options: dict[str, Any]) -> dict[str, list]:
        """What a fine-tune (`diffusers_ext.distill`) may train on a denoiser patched by this method:
        {"new": parameters the method added, "inherited": pretrained parameters it may adapt}.

        Default: every parameter of the installed processors is new, nothing inherited. A method
        overrides this to offer e.g. the attention projections of the sites it converted."""
        modules = dict(denoiser.named_modules())
        new = []
        for name in record.sites:
            processor = modules[name].processor
            if hasattr(processor, "parameters"):
                new.extend(processor.parameters())
        return {"new": new, "inherited": []}

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
            "options": {o.name: {"default": o.default, "doc": o.doc} for o in self.options},
        }


_METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    _METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    _load_builtin_methods()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS)) or 'none'}")
    return _METHODS[name]


def all_methods() -> dict[str, Method]:
    _load_builtin_methods()
    return dict(sorted(_METHODS.items()))


def _load_builtin_methods() -> None:
    from . import processors  # noqa: F401  (importing the package registers every method in it)
