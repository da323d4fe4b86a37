"""argparse types shared by every sub-command: a bad number is refused while the command line is
read, with one line naming the flag and what is allowed (`argument --cfg-scale: must be a finite
number, got 'nan'`), before anything is loaded or written."""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """A finite float (`nan` / `inf` are refused: guidance `nan` would silently turn guidance off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _bounded_float(text: str, low: float, inclusive: bool) -> float:
    value = finite_float(text)
    if value < low or (value == low and not inclusive):
        raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'above'} {low:g}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite float >= 0 (a budget in minutes where 0 means "none")."""
    return _bounded_float(text, 0.0, inclusive=True)


def positive_float(text: str) -> float:
    """A finite float > 0 (a learning rate, a time limit)."""
    return _bounded_float(text, 0.0, inclusive=False)
