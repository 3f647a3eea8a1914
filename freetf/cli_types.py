"""argparse value types for the ``freetf`` command line.

Each type parses one flag's text and raises ``argparse.ArgumentTypeError`` with the
allowed range, so a bad value ends as ``freetf <command>: error: argument --flag: ...``
(exit status 2) before anything is loaded.  Checks that need the checkpoint (``--z``
against the model's latent bits, the prompt against the context length) live in
``freetf.cli`` and end with the same ``argument --flag:`` wording.
"""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be finite")
    return value


def _checked(text: str, kind: type, ok, bound: str) -> int | float:
    value = _number(text, kind)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{value} must be {bound}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _checked(text, int, lambda v: v >= 1, ">= 1")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _checked(text, int, lambda v: v >= 0, ">= 0")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _checked(text, float, lambda v: v > 0, "> 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _checked(text, float, lambda v: v >= 0, ">= 0")


def probability(text: str) -> float:
    """A number in (0, 1] (nucleus sampling's top-p)."""
    return _checked(text, float, lambda v: 0.0 < v <= 1.0, "in (0, 1]")


def open_fraction(text: str) -> float:
    """A number in (0, 1) (a held-out share)."""
    return _checked(text, float, lambda v: 0.0 < v < 1.0, "in (0, 1)")


def non_empty(text: str) -> str:
    """A string with something in it."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text
