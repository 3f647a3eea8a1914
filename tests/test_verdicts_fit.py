"""Tests for freetf.evaluation.verdicts' boundary fits: the credible interval read off
the posterior, its text, and where the next probe goes (against references written
here); the posterior itself is checked in tests/test_verdicts.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from freetf.evaluation import verdicts
from freetf.evaluation.verdicts import BoundaryFit

pytestmark = pytest.mark.timeout(60)

# one seed leaks at every probe, two at none (tests/test_verdicts.py): the seeds matter
X = [-1.0, 0.0, 1.0] * 3
Y = [True, True, True] + [False] * 6
SEEDS = [0, 0, 0, 1, 1, 1, 2, 2, 2]


def _reference_quantile(x0s: np.ndarray, post: np.ndarray, q: float) -> float:
    """The first x0 of the grid whose posterior mass up to it reaches q."""
    mass = 0.0
    for i, x0 in enumerate(x0s):
        mass += float(post[i].sum())
        if mass >= q - 1e-12:
            return float(x0)
    raise AssertionError("the posterior does not sum to 1")


@pytest.mark.parametrize("confidence", [None, 0.5, 0.95])
def test_the_fit_is_the_posteriors_median_and_equal_tailed_interval(confidence):
    x0s, post = verdicts.boundary_posterior("leak", X, Y, -6, 2, SEEDS)
    kw = {} if confidence is None else {"confidence": confidence}
    fit = verdicts.fit_boundary("leak", X, Y, -6, 2, groups=SEEDS, **kw)
    level = 0.9 if confidence is None else confidence
    assert fit == BoundaryFit("leak", _reference_quantile(x0s, post, 0.5),
                              _reference_quantile(x0s, post, (1 - level) / 2),
                              _reference_quantile(x0s, post, 1 - (1 - level) / 2),
                              (-6, 2), level, 9)
    # the seeds change the interval (a fit that dropped them would pass the above)
    alone = verdicts.fit_boundary("leak", X, Y, -6, 2, level)
    assert (alone.low_log2, alone.high_log2) != (fit.low_log2, fit.high_log2)


def _fit(median, low, high):
    return BoundaryFit("collapse", median, low, high, (-2.0, 1.0), 0.9, 12)


@pytest.mark.parametrize("fit, texts", [
    (_fit(-0.5, -1.0, 0.5), ("0.707", "0.5", "1.41")),
    (_fit(-3.0, -4.0, 0.0), ("< 0.25", "< 0.25", "1")),  # below the range: open ends
    (_fit(2.0, -1.0, 3.0), ("> 2", "0.5", "> 2")),  # above it
    (_fit(1.0, -2.0, 1.0), ("2", "0.25", "2")),  # on the range's ends: still inside
    (_fit(-2.0, -2.0, 1.0), ("0.25", "0.25", "2")),
])
def test_texts_read_past_the_searched_range_as_open(fit, texts):
    assert fit.texts() == texts
    assert fit.text() == f"{texts[0]} bits [{texts[1]}, {texts[2]}] (90%, 12 trials)"


def test_the_interval_contains_its_ends():
    fit = _fit(-0.5, -1.0, 0.5)
    assert fit.contains(-1.0) and fit.contains(0.5) and fit.contains(0.0)
    assert not fit.contains(-1.0001) and not fit.contains(0.5001)


def _reference_gain(kind, candidates, x0s, post):
    """BALD, H(E[p]) - E[H(p)], for the population's curve of each (x0, slope, tau): a
    logistic of slope s / sqrt(1 + pi s^2 tau^2 / 8) (the probit approximation)."""
    sign = -1.0 if kind == "collapse" else 1.0
    gains = []
    for c in candidates:
        mean = 0.0
        mean_entropy = 0.0
        for t, tau in enumerate(verdicts.SEED_SDS):
            for s, slope in enumerate(verdicts.SLOPES):
                flat = slope / math.sqrt(1.0 + math.pi * slope**2 * tau**2 / 8.0)
                p = verdicts.LAPSE + (1 - 2 * verdicts.LAPSE) * special.expit(
                    sign * flat * (c - x0s))  # (G,)
                mean += float((post[:, s, t] * p).sum())
                mean_entropy += float((post[:, s, t] * stats.bernoulli(p).entropy()).sum())
        gains.append(float(stats.bernoulli(mean).entropy()) - mean_entropy)
    return np.asarray(gains)


@pytest.mark.parametrize("kind, groups", [("leak", SEEDS), ("collapse", None)])
def test_probe_information_is_the_expected_information_gain(kind, groups):
    y = Y if kind == "leak" else [not v for v in Y]
    candidates = [-5.0, -2.0, -0.5, 0.25, 1.5]
    x0s, post = verdicts.boundary_posterior(kind, X, y, -6, 2, groups)
    got = verdicts.probe_information(kind, candidates, X, y, -6, 2, groups=groups)
    np.testing.assert_allclose(got, _reference_gain(kind, candidates, x0s, post),
                               rtol=1e-9, atol=1e-12)


def test_the_probit_curve_is_close_to_the_seeds_averaged_logistic():
    """What the gain rests on: a logistic averaged over N(0, tau^2) offsets, integrated
    here, is within 0.02 of the probit approximation's logistic."""
    from scipy import integrate

    for slope in (0.5, 2.0, 16.0):
        for tau in (0.25, 1.0):
            flat = slope / math.sqrt(1.0 + math.pi * slope**2 * tau**2 / 8.0)
            for x in (-1.0, -0.25, 0.5):
                exact, _ = integrate.quad(
                    lambda e, x=x, slope=slope, tau=tau: special.expit(slope * (x - e))
                    * stats.norm.pdf(e, 0, tau), -8 * tau, 8 * tau)
                assert special.expit(flat * x) == pytest.approx(exact, abs=0.02)


def test_the_collapse_posterior_is_the_models_with_the_falling_curve():
    """As tests/test_verdicts.py's leak posterior, for the collapse boundary."""
    from test_verdicts import _reference_log_lik

    x = [-3.0, -2.0, -1.0, -3.0, -2.0, -1.0, -2.5]
    y = [True, True, False, True, False, False, True]
    groups = ["a", "a", "a", "b", "b", "b", "c"]
    x0s, post = verdicts.boundary_posterior("collapse", x, y, -4, 0, groups)
    slopes = np.asarray(verdicts.SLOPES)
    points = [(int(np.argmin(abs(x0s - a))), s, t) for a, s, t in
              [(-2.0, 2, 3), (-1.5, 4, 2), (-2.5, 1, 1), (-1.0, 6, 0), (-2.0, 3, 3)]]
    ref = [_reference_log_lik("collapse", x, y, groups, x0s[g], slopes[s],
                              verdicts.SEED_SDS[t]) for g, s, t in points]
    got = [math.log(post[g, s, t]) for g, s, t in points]
    for r, q in zip(ref[1:], got[1:], strict=True):
        assert q - got[0] == pytest.approx(r - ref[0], abs=0.02)


def test_the_grid_spans_the_range_widened_on_each_side():
    x0s, post = verdicts.boundary_posterior("leak", [], [], -6, 2)
    step, pad = verdicts.X0_STEP_LOG2, verdicts.X0_PAD_LOG2
    np.testing.assert_allclose(x0s, -6 - pad + step * np.arange(round((8 + 2 * pad) / step)
                                                                + 1), atol=1e-9)
    assert post.shape == (len(x0s), len(verdicts.SLOPES), len(verdicts.SEED_SDS))
    np.testing.assert_allclose(post, 1.0 / post.size)  # no verdicts: the flat prior
    with pytest.raises(ValueError, match=r"kind='drift' must be one of \('collapse', "
                                         r"'leak', 'position', 'noise', 'broken'\)"):
        verdicts.boundary_posterior("drift", [], [], -6, 2)


def test_many_verdicts_leave_the_posterior_finite():
    """1,200 verdicts of one seed, half each way at one kappa: the log posterior lies far
    below 0 (about -830), which must not underflow to 0 / 0."""
    x0s, post = verdicts.boundary_posterior("leak", [0.0] * 1200, [True, False] * 600, -2, 2,
                                            [0] * 1200)
    assert np.isfinite(post).all() and post.sum() == pytest.approx(1.0)
    assert abs(float(x0s[np.argmax(post.sum((1, 2)))])) <= 1.0  # the onset near 0
