"""The errors diffusers-ext raises for bad input: each names the problem and what is allowed.

All derive from `DiffusersExtError`, so a caller (the CLI, the app) can tell bad input from a bug.
They also derive from the built-in class a Python user expects (`ValueError` for a bad value,
`TypeError` for a model of the wrong kind), so `except ValueError` keeps working.
"""


class DiffusersExtError(Exception):
    """Base of every input error of diffusers-ext."""


class OptionError(DiffusersExtError, ValueError):
    """An unknown option, a value of the wrong type or outside its range, options that contradict."""


class UnsupportedModelError(DiffusersExtError, TypeError, ValueError):
    """A model (or pipeline) that is not a supported denoiser, or that the method does not fit."""


class PatchError(DiffusersExtError, ValueError):
    """A patch that cannot be made as asked (it would replace nothing; weights that do not fit)."""


class DeviceError(DiffusersExtError, ValueError):
    """A device that does not exist here (`cuda` without CUDA, `cuda:3` on a one-GPU machine)."""


class TrainingError(DiffusersExtError, ArithmeticError):
    """A fine-tune that cannot go on (a non-finite loss); nothing of it is saved."""
