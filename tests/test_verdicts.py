"""Tests for freetf.evaluation.verdicts: noise from the seeds, verdicts, boundary fits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from freetf.evaluation import verdicts
from freetf.evaluation.verdicts import Noise, Outcome

pytestmark = pytest.mark.timeout(60)


def test_pooled_sd_is_the_within_group_spread():
    sd, dof = verdicts.pooled_sd([[1.0, 2.0, 3.0], [10.0, 12.0], [5.0]])
    # squares: 2 (around 2) + 2 (around 11) over 2 + 1 dof
    assert dof == 3 and sd == pytest.approx(math.sqrt(4.0 / 3.0))
    assert math.isnan(verdicts.pooled_sd([[1.0], [2.0]])[0])


def test_noise_comes_from_the_baseline_seeds():
    groups = [[Outcome(1.00, valid_rate=1.0), Outcome(1.02, valid_rate=1.0),
               Outcome(1.04, valid_rate=1.0)]]
    noise = verdicts.estimate_noise(groups, z=2.0, generations=64)
    assert noise.ce_nats == pytest.approx(0.02) and noise.dof == 2
    # every baseline generation valid: the binomial error of 64 reads, Laplace-smoothed
    p = 65 / 66
    assert noise.valid == pytest.approx(math.sqrt(p * (1 - p) / 64))
    # a t quantile: a spread from 3 seeds is itself uncertain (wider than z = 2)
    assert noise.k == pytest.approx(4.5265, abs=1e-3)
    assert noise.cost_margin_nats == pytest.approx(noise.k * math.sqrt(2) * 0.02)
    assert not verdicts.estimate_noise([[Outcome(1.0)]], z=2.0).known


NOISE = Noise(ce_nats=0.01, valid=0.02, z=2.0, dof=1000)  # k ~ 2.0
BASE = Outcome(1.0, valid_rate=0.9)


@pytest.mark.parametrize("trial, expected", [
    # Z spends KL but buys nothing: collapsed whatever the KL (gap, MI within noise)
    (Outcome(1.0, ce_gap_nats=0.015, mutual_info_nats=0.0, valid_rate=0.9), "collapsed"),
    (Outcome(1.5, ce_gap_nats=0.0, mutual_info_nats=0.015, valid_rate=0.2), "collapsed"),
    # used: a clear gap at no clear cost
    (Outcome(1.02, ce_gap_nats=0.1, mutual_info_nats=0.3, valid_rate=0.9), "used"),
    (Outcome(1.0, ce_gap_nats=0.0, mutual_info_nats=0.3, valid_rate=0.9), "used"),
    # leaking: honest CE clearly above the baseline's, or validity clearly below
    (Outcome(1.03, ce_gap_nats=0.1, mutual_info_nats=0.3, valid_rate=0.9), "leaking"),
    (Outcome(1.0, ce_gap_nats=0.1, mutual_info_nats=0.3, valid_rate=0.8), "leaking"),
    (Outcome(1.0, ce_gap_nats=0.1, mutual_info_nats=0.3), "used"),  # validity not read
])
def test_classify(trial, expected):
    assert verdicts.classify(trial, BASE, NOISE) == expected


def test_classify_needs_a_noise_estimate():
    with pytest.raises(ValueError, match=">= 2 baseline seeds"):
        verdicts.classify(BASE, BASE, Noise(math.nan, math.nan, 2.0, 0))


def test_changes_baseline():
    assert not verdicts.changes_baseline("training.kl_weight")
    assert not verdicts.changes_baseline("training.kl_annealing.type")
    assert not verdicts.changes_baseline("training.free_bits_bits")
    assert verdicts.changes_baseline("training.learning_rate")
    assert verdicts.changes_baseline("model.hidden_dim")


def test_fit_finds_a_sharp_boundary_between_the_probes():
    x = [-6, -6, -4, -4, -2, -2, 0, 0]
    collapsed = [True, True, True, True, False, False, False, False]
    fit = verdicts.fit_boundary("collapse", x, collapsed, -6, 0, confidence=0.9)
    assert -4 < fit.median_log2 < -2
    assert -4.6 < fit.low_log2 < fit.median_log2 < fit.high_log2 < -1.4
    assert fit.trials == 8 and not fit.below_range and not fit.above_range
    # the same verdicts read as leaks put the leak onset on the other side
    leak = verdicts.fit_boundary("leak", x, [not c for c in collapsed], -6, 0, 0.9)
    assert leak.median_log2 == pytest.approx(fit.median_log2, abs=0.1)


def test_no_leak_seen_puts_the_leak_onset_above_the_range():
    fit = verdicts.fit_boundary("leak", [-6, -2, 2] * 3, [False] * 9, -6, 2, 0.95)
    assert fit.above_range and fit.median_log2 > 1.0
    assert fit.text().endswith("> 4] (95%, 9 trials)")


def test_probe_information_peaks_between_disagreeing_verdicts():
    x = [-6, -6, 2, 2]
    y = [True, True, False, False]
    candidates = np.arange(-6, 2.01, 0.5)
    gain = verdicts.probe_information("collapse", candidates, x, y, -6, 2)
    best = candidates[int(np.argmax(gain))]
    assert -4 <= best <= 0  # inside the bracket, not at a probed end
    assert gain[0] < gain.max() / 2 and gain[-1] < gain.max() / 2
