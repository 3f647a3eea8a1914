"""The command line's value types: each accepts its range, edges included, and refuses
the rest with a message that names the value and the range."""

from __future__ import annotations

import argparse
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freetf.cli_types import (
    non_empty,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    probability,
)

pytestmark = pytest.mark.timeout(60)


def refused(parse, text: str) -> str:
    with pytest.raises(argparse.ArgumentTypeError) as err:
        parse(text)
    return str(err.value)


@pytest.mark.parametrize("parse,text,value", [
    (positive_int, "1", 1),
    (positive_int, "12", 12),
    (non_negative_int, "0", 0),
    (non_negative_int, "7", 7),
    (positive_float, "5e-324", 5e-324),
    (positive_float, "2.5", 2.5),
    (non_negative_float, "0", 0.0),
    (non_negative_float, "-0.0", 0.0),
    (probability, "1", 1.0),
    (probability, "1e-9", 1e-9),
    (open_fraction, "0.5", 0.5),
    (open_fraction, "0.999", 0.999),
])
def test_edges_inside_the_range_are_accepted(parse, text, value):
    parsed = parse(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("parse,text,message", [
    (positive_int, "0", "0 must be >= 1"),
    (positive_int, "-3", "-3 must be >= 1"),
    (non_negative_int, "-1", "-1 must be >= 0"),
    (positive_float, "0", "0.0 must be > 0"),
    (positive_float, "-2", "-2.0 must be > 0"),
    (non_negative_float, "-1e-9", "-1e-09 must be >= 0"),
    (probability, "0", "0.0 must be in (0, 1]"),
    (probability, "1.0000001", "1.0000001 must be in (0, 1]"),
    (open_fraction, "0", "0.0 must be in (0, 1)"),
    (open_fraction, "1", "1.0 must be in (0, 1)"),
    (positive_int, "1.5", "'1.5' is not an integer"),
    (non_negative_int, "two", "'two' is not an integer"),
    (positive_float, "two", "'two' is not a number"),
    (probability, "", "'' is not a number"),
    (positive_float, "inf", "'inf' must be finite"),
    (non_negative_float, "-inf", "'-inf' must be finite"),
    (probability, "nan", "'nan' must be finite"),
    (open_fraction, "NaN", "'NaN' must be finite"),
])
def test_values_outside_the_range_are_refused_naming_value_and_range(parse, text, message):
    assert refused(parse, text) == message


def test_non_empty_keeps_the_text_and_refuses_blank_text():
    assert non_empty(" a prompt ") == " a prompt "
    for blank in ("", " ", "\t\n"):
        assert refused(non_empty, blank) == "must not be empty"


# ----------------------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-10**400, max_value=10**400))
def test_integers_of_any_size(n):
    """Huge integers stay exact (no float on the way); the bound decides alone."""
    text = str(n)
    if n >= 1:
        assert positive_int(text) == n
    else:
        assert refused(positive_int, text) == f"{n} must be >= 1"
    if n >= 0:
        assert non_negative_int(text) == n
    else:
        assert refused(non_negative_int, text) == f"{n} must be >= 0"


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_floats_of_any_size_and_the_non_finite_ones(x):
    """A float's repr ("3.0", "1e+300", "inf") is a number, never an integer."""
    text = repr(x)
    ranges = [(positive_float, x > 0, "> 0"), (non_negative_float, x >= 0, ">= 0"),
              (probability, 0 < x <= 1, "in (0, 1]"), (open_fraction, 0 < x < 1, "in (0, 1)")]
    for parse, inside, bound in ranges:
        if not math.isfinite(x):
            assert refused(parse, text) == f"{text!r} must be finite"
        elif inside:
            assert parse(text) == x
        else:
            assert refused(parse, text) == f"{x} must be {bound}"
    assert refused(positive_int, text) == f"{text!r} is not an integer"
