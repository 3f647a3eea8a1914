"""Tests for freetf.results.analysis: which trials are baselines and which are judged
against which baseline, what each setting's fits are given (a recording stand-in for the
fit), and the tables, JSON, summary lines and MLflow records written from the fits.  No
MLflow, no Ray (the real fits on a fake sweep: tests/test_boundary.py)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from freetf.evaluation import verdicts
from freetf.evaluation.verdicts import BoundaryFit, Tolerances
from freetf.results import analysis, over_training

pytestmark = pytest.mark.timeout(30)

KEY = "training.free_bits_bits"
BASE = {"eval/ce_prior_nats": 1.0, "eval/valid_rate": 0.95, "eval/valid_low": 0.92,
        "eval/valid_high": 0.97}
COLLAPSED = {"eval/use_low_nats": -0.001}
USED = {"eval/use_low_nats": 0.05}
BROKEN = {"eval/use_low_nats": 0.05, "eval/valid_rate": 0.1, "eval/valid_low": 0.05,
          "eval/valid_high": 0.15}


def _row(name, kind, seed, kappa, kl_weight, weight_decay, ce, status="FINISHED",
         stopped=False, **metrics):
    return {"run_id": name, "run_name": f"s/{name}", "status": status,
            "stopped_early": stopped, "verdict": "active", "model_kind": kind,
            "seed": float(seed), "free_bits_bits": kappa, "kl_weight": kl_weight,
            f"sampled.{KEY}": kappa, "sampled.training.kl_weight": kl_weight,
            "sampled.training.weight_decay": weight_decay, "sampled.training.seed": seed,
            "sampled.model.latent_dim": 0 if kind == "baseline" else 8,
            **BASE, "eval/ce_prior_nats": ce, **metrics}


def _frame() -> pd.DataFrame:
    """kl_weight shares a baseline, weight_decay does not (freetf.evaluation.verdicts)."""
    b, ft = "baseline", "free_transformer"
    rows = [
        _row("B00", b, 0, 1.0, 1.0, 0.1, 1.0),
        _row("B01", b, 1, 1.0, 1.0, 0.1, 1.1),
        _row("B10", b, 0, 1.0, 1.0, 0.2, 1.2, status="KILLED", stopped=True),  # ended
        _row("B11", b, 1, 1.0, 1.0, 0.2, 1.3, status="KILLED"),  # cut off: no baseline
        _row("B12", b, 2, 1.0, 1.0, 0.2, math.nan),  # never evaluated
        _row("P1", ft, 0, 0.25, 1.0, 0.1, 1.05, **COLLAPSED),
        _row("P2", ft, 1, 1.0, 1.0, 0.1, 1.3, **USED),
        _row("P3", ft, 0, 4.0, 0.5, 0.1, 1.5, **BROKEN),
        _row("P4", ft, 0, 0.5, 1.0, 0.2, 1.25, status="KILLED", stopped=True, **USED),
        _row("P5", ft, 1, 2.0, 1.0, 0.2, 1.4, **USED),  # its seed's baseline cut off
        _row("P6", ft, 0, 2.0, 1.0, 0.1, 1.0, **{**USED, "eval/converged": 0.0}),
        _row("P7", ft, 0, 2.0, 1.0, 0.1, 1.0, status="RUNNING", **USED),
    ]
    return pd.DataFrame(rows, index=range(100, 100 + len(rows)))


@pytest.fixture
def fits(monkeypatch):
    """verdicts.fit_boundary recorded; each call returns distinct numbers."""
    calls = []

    def fit(kind, x, y, low, high, confidence, groups):
        calls.append((kind, list(x), list(y), low, high, confidence, list(groups)))
        n = len(calls)
        return BoundaryFit(kind, -0.5 - n / 8, -1.0 - n / 8, n / 8, (low, high), confidence,
                           len(x))

    monkeypatch.setattr(verdicts, "fit_boundary", fit)
    return calls


@pytest.fixture
def over_calls(monkeypatch):
    calls = []

    def boundaries_over_training(histories, trials, x, tol, confidence, range_log2):
        calls.append((histories, list(trials["run_id"]), list(x), tol, confidence,
                      range_log2))
        return pd.DataFrame([[len(calls), "collapse", 0.0, -1.0, 1.0, 2]],
                            columns=over_training.COLUMNS)

    monkeypatch.setattr(over_training, "boundaries_over_training", boundaries_over_training)
    return calls


def test_over_training_fits_each_setting_with_its_own_baselines(fits, over_calls):
    histories = pd.DataFrame({"run_id": ["P1"], "step": [1]})
    found = analysis.analyse(_frame(), KEY, confidence=0.8, histories=histories)
    assert [c[1:] for c in over_calls] == [
        (["B00", "B01", "P3"], [0.0, 0.0, 2.0], Tolerances(), 0.8, (-2.0, 2.0)),
        (["B00", "B01", "P1", "P2"], [0.0, 0.0, -2.0, 0.0], Tolerances(), 0.8, (-2.0, 2.0)),
        (["B10", "P4"], [0.0, -1.0], Tolerances(), 0.8, (-2.0, 2.0))]
    assert all(c[0] is histories for c in over_calls)
    assert found.over_training.to_dict("list") == {
        "step": [1, 2, 3], "kind": ["collapse"] * 3, "median_log2": [0.0] * 3,
        "low_log2": [-1.0] * 3, "high_log2": [1.0] * 3, "trials": [2] * 3,
        "label": ["kl_weight=0.5,weight_decay=0.1", "kl_weight=1,weight_decay=0.1",
                  "kl_weight=1,weight_decay=0.2"]}
    assert list(found.over_training.index) == [0, 1, 2]
