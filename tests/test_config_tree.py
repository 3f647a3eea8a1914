"""The config tree's machinery: how values of each type are coerced (property tests over
booleans, huge integers, infinities, NaN and text), renamed keys, overrides, YAML reading
and the messages that name the key."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freetf import ConfigError, load_config
from freetf.config import (
    apply_overrides,
    build_section,
    flatten,
    from_dict,
    read_yaml_mapping,
    split_override,
    tree,
)

pytestmark = pytest.mark.timeout(60)


def _coerced(key: str, value):
    """The value ``key`` holds after ``from_dict``, or the ConfigError's message."""
    section, name = key.rsplit(".", 1)
    data: dict = {}
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[name] = value
    try:
        cfg = from_dict(data)
    except ConfigError as err:
        return str(err)
    return flatten(cfg.to_dict())[key]


ANY_VALUE = st.one_of(st.booleans(), st.integers(-10**400, 10**400),
                      st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=8), st.sampled_from(["1e-4", "-2.5E3", "nan", "inf",
                                                            "-Infinity", "1_0", " 7 "]),
                      st.none(), st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(value=ANY_VALUE)
def test_an_integer_key_takes_integers_and_whole_floats_only(value):
    """``training.seed`` (an int, any value valid): booleans are not integers, a whole
    float is its integer, huge integers stay exact."""
    got = _coerced("training.seed", value)
    if isinstance(value, int) and not isinstance(value, bool):
        assert got == value and type(got) is int
    elif isinstance(value, float) and value.is_integer():
        assert got == int(value) and type(got) is int
    else:
        assert got == f"training.seed={value!r} must be an integer"


@settings(max_examples=300, deadline=None)
@given(value=ANY_VALUE)
def test_a_number_key_takes_finite_numbers_and_their_text(value):
    """``model.rope_theta`` (a float, any value valid): integers and number strings (YAML
    1.1 reads "1e-4" as a string) become floats; booleans, other strings, infinities, NaN
    and integers beyond the float range are refused, naming the key and the value."""
    got = _coerced("model.rope_theta", value)
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            assert got == f"model.rope_theta={value!r} must be a number"
            return
    if isinstance(number, bool) or not isinstance(number, int | float):
        assert got == f"model.rope_theta={value!r} must be a number"
        return
    try:
        float(number)
    except OverflowError:
        assert got == f"model.rope_theta={number!r} is too large for a float"
        return
    if not math.isfinite(number):
        assert got == f"model.rope_theta={number!r} must be finite"
    else:
        assert got == float(number) and type(got) is float


@settings(max_examples=200, deadline=None)
@given(value=ANY_VALUE)
def test_a_boolean_key_takes_true_and_false_only(value):
    got = _coerced("training.compile", value)
    if isinstance(value, bool):
        assert got is value
    else:
        assert got == f"training.compile={value!r} must be true or false"


@settings(max_examples=200, deadline=None)
@given(value=ANY_VALUE)
def test_a_string_key_takes_strings_and_an_optional_one_none(value):
    got = _coerced("tracking.mlflow.experiment", value)
    if isinstance(value, str):
        assert got == value
    else:
        assert got == f"tracking.mlflow.experiment={value!r} must be a string"
    optional = _coerced("tracking.mlflow.run_name", value)
    if value is None or isinstance(value, str):
        assert optional == value
    else:
        assert optional == f"tracking.mlflow.run_name={value!r} must be a string"


# ----------------------------------------------------------------------------- the generic tree


@dataclass(frozen=True)
class _Inner:
    RENAMED: ClassVar[dict[str, str]] = {"old": "new"}
    new: int = 0


@dataclass(frozen=True)
class _Outer:
    inner: _Inner | None = None
    n: int = 0


@dataclass(frozen=True)
class _Top:
    outer: _Outer


@dataclass(frozen=True)
class _Two:
    RENAMED: ClassVar[dict[str, str]] = {"a_old": "a", "b_old": "b"}
    a: int = 0
    b: int = 0
    mode: Literal["on", "off", "auto"] = "auto"


def test_old_names_in_a_mapping_are_built_under_the_new_ones_and_said_once(caplog):
    tree._SAID.clear()
    with caplog.at_level(logging.WARNING, logger="freetf.config.tree"):
        assert build_section(_Two, {"b_old": 2}, "") == _Two(b=2)
        assert build_section(_Two, {"a_old": 1, "b_old": 2}, "sec") == _Two(a=1, b=2)
        cfg = from_dict({"training": {"free_bits_schedule": {"type": "linear",
                                                              "initial_nats": 0.5}}})
    assert cfg.training.free_bits_schedule.initial_free_bits == 0.5
    key = "training.free_bits_schedule"
    assert [r.getMessage() for r in caplog.records] == [
        "b_old is now called b (the old name still works)",
        "sec.a_old is now called sec.a (the old name still works)",
        "sec.b_old is now called sec.b (the old name still works)",
        f"{key}.initial_nats is now called {key}.initial_free_bits (the old name still works)"]


@dataclass(frozen=True)
class _Unsupported:
    table: dict


def test_a_field_type_the_tree_cannot_build_is_named_with_its_key():
    with pytest.raises(TypeError) as err:
        build_section(_Unsupported, {"table": {}}, "sec")
    assert str(err.value) == "unsupported config type <class 'dict'> at sec.table"


def test_yaml_on_and_off_are_the_strings_where_a_choice_has_them():
    assert build_section(_Two, {"mode": True}, "").mode == "on"
    assert build_section(_Two, {"mode": False}, "").mode == "off"


def test_build_section_names_the_top_of_the_tree_config():
    for data, message in (([1], "config must be a mapping, got [1]"),
                          ({"model": 3}, "model must be a mapping, got 3")):
        with pytest.raises(ConfigError) as err:
            from_dict(data)
        assert str(err.value) == message
    with pytest.raises(ConfigError) as err:
        from_dict({"zz": 1, "aa": 2})
    assert str(err.value) == ("unknown config key aa (value 2); known keys here: checkpoint, "
                              "data, diagnostics, model, optimizer, scaling, scheduler, "
                              "tracking, training")


def test_an_override_under_the_new_name_replaces_the_old_ones_value():
    old = {"inner": {"old": 1, "n": 2}}
    assert apply_overrides(old, ["inner.new=3"], _Outer) == {"inner": {"new": 3, "n": 2}}
    assert apply_overrides(old, ["inner.old=3"], _Outer) == {"inner": {"new": 3, "n": 2}}
    deeper = {"outer": {"inner": {"old": 1}}}
    assert apply_overrides(deeper, {"outer.inner.new": 3}, _Top) == {
        "outer": {"inner": {"new": 3}}}
    assert apply_overrides(old, ["inner.new=3"]) == {"inner": {"old": 1, "n": 2, "new": 3}}


def test_split_override_splits_at_the_first_equals_sign():
    assert split_override("a.b=1") == ("a.b", 1)
    assert split_override(" a.b =x=y") == ("a.b", "x=y")
    assert split_override("a=") == ("a", None) and split_override("a=  ") == ("a", None)
    assert split_override("a=[unclosed") == ("a", "[unclosed")  # not YAML: kept as text
    with pytest.raises(ConfigError) as err:
        split_override(" =1")
    assert str(err.value) == "override ' =1' has an empty key"


def test_read_yaml_mapping_names_the_file_and_what_it_holds(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as err:
        read_yaml_mapping(missing)
    assert str(err.value) == f"config file not found: {missing}"

    class SpecError(ConfigError):
        pass

    with pytest.raises(SpecError) as err:
        read_yaml_mapping(missing, "sweep", SpecError)
    assert str(err.value) == f"sweep file not found: {missing}"
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError) as err:
        read_yaml_mapping(listy)
    assert str(err.value) == f"{listy} must hold a mapping at top level, got list"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml_mapping(empty) == {}


def test_overrides_under_a_schema_follow_renames_and_name_the_key_from_its_path(caplog):
    """An old name sets the new one, said once with the key's full path; keys past the
    schema's sections are kept as given."""
    tree._SAID.clear()
    data = {"inner": {"new": 1}, "n": 2}
    with caplog.at_level(logging.WARNING, logger="freetf.config.tree"):
        got = apply_overrides(data, {"inner.old": 3, "free.a.b": 4, "n": 5}, _Outer, "sec")
    assert got == {"inner": {"new": 3}, "n": 5, "free": {"a": {"b": 4}}}
    assert data == {"inner": {"new": 1}, "n": 2}  # the input is left alone
    assert [r.getMessage() for r in caplog.records] == [
        "sec.inner.old is now called sec.inner.new (the old name still works)"]
    assert apply_overrides({}, ["inner.old=6"], _Outer) == {"inner": {"new": 6}}
    with pytest.raises(ConfigError) as err:
        apply_overrides({"n": 1}, {"n.x": 2})
    assert str(err.value) == "override n.x: n is not a section"
    with pytest.raises(ConfigError) as err:
        apply_overrides({"a": {"n": 1}}, {"a.n.x": 2})
    assert str(err.value) == "override a.n.x: a.n is not a section"


def test_replace_names_a_bad_key_from_the_top_of_the_tree():
    cfg = load_config()
    with pytest.raises(ConfigError) as err:
        cfg.replace({"training.batch_size": "x"})
    assert str(err.value) == "training.batch_size='x' must be an integer"
    with pytest.raises(ConfigError, match=r"^unknown config key model\.nope \(value 1\)"):
        cfg.replace(["model.nope=1"])
