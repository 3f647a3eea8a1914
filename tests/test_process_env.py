"""Tests for freetf.process_env: variables set for a block, restored after it."""

from __future__ import annotations

import os

import pytest

from freetf.process_env import environment

pytestmark = pytest.mark.timeout(10)


def test_environment_sets_then_restores_or_removes(monkeypatch):
    monkeypatch.setenv("FREETF_T_KEPT", "before")
    monkeypatch.delenv("FREETF_T_NEW", raising=False)
    with environment({"FREETF_T_KEPT": "inside", "FREETF_T_NEW": "1"}):
        assert os.environ["FREETF_T_KEPT"] == "inside" and os.environ["FREETF_T_NEW"] == "1"
    assert os.environ["FREETF_T_KEPT"] == "before"
    assert "FREETF_T_NEW" not in os.environ


def test_environment_is_restored_after_an_error_and_a_variable_removed_inside(monkeypatch):
    monkeypatch.setenv("FREETF_T_KEPT", "before")
    monkeypatch.delenv("FREETF_T_NEW", raising=False)
    with pytest.raises(RuntimeError), environment({"FREETF_T_KEPT": "x", "FREETF_T_NEW": "y"}):
        del os.environ["FREETF_T_NEW"]
        raise RuntimeError
    assert os.environ["FREETF_T_KEPT"] == "before" and "FREETF_T_NEW" not in os.environ
