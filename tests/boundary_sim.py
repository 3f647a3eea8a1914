"""A simulated sweep for the boundary tests: what a trial of the default sweep reports,
with the couplings of the real measurements and no training.

- Each seed's baseline draws its free-generation validity once (256 reads): every trial
  of that seed is judged against the same baseline (shared, not independent).
- Each seed learns a little differently: its use and leak curves are shifted along
  x = log2(kappa) by a seed effect (verdicts of one seed are correlated), and each
  training run's leak onset by its own draw besides.  The leak's spreads and slope are
  those fitted to the default job's 30-trial run (``python tools/leak_spread.py``): about
  1 log2 unit between runs, of which the data cannot tell how much stays with a seed.
- Use: a trial's true shuffle gain rises through ``x_c``; the reported interval comes
  from row noise of a measured size (``USE_SE``), as latent_use reports it.
- Leak: the true validity falls through ``x_l``; the reported rate and Wilson interval
  come from 256 binomial reads.
- Some trials near the collapse onset have not converged by the end (their use appears
  late) and report ``eval/converged = 0``: they get no verdict.

:func:`true_boundaries` finds, by simulation, the x where P(collapsed) and P(leaking) cross
1/2 for the whole population of seeds: the quantity the sweep's intervals estimate.
"""

from __future__ import annotations

import math

import numpy as np

from freetf.evaluation.latent_use import wilson_interval
from freetf.evaluation.verdicts import Outcome, Tolerances, classify

LATENT_KEY, KEY = "model.latent_dim", "training.free_bits_bits"
DRAWS = 256
USE_MAX, USE_SLOPE, USE_SE = 0.03, 2.0, 0.002  # nats/token, per log2 unit, row noise
VALID_BASE, VALID_BROKEN, VALID_SLOPE = 0.93, 0.02, 1.75
SEED_SD = 0.4  # log2 units: how far one seed's use curve sits from the population's
LEAK_SEED_SD, LEAK_TRIAL_SD = 0.5, 1.0  # the leak curve's: per seed, and per trial
UNCONVERGED_P = 0.15  # near x_c, the share of trials still moving at the end


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def seed_effects(rng: np.random.Generator, seeds) -> dict[int, tuple[float, float]]:
    return {s: (rng.normal(0, SEED_SD), rng.normal(0, LEAK_SEED_SD)) for s in seeds}


def baseline_metrics(rng: np.random.Generator) -> dict[str, float]:
    valid = rng.binomial(DRAWS, VALID_BASE)
    low, high = wilson_interval(valid, DRAWS)
    return {"eval/ce_prior_nats": 0.30 + rng.normal(0, 0.0005), "eval/valid_rate": valid / DRAWS,
            "eval/valid_low": low, "eval/valid_high": high, "eval/converged": 1.0,
            "eval/excess_nats": 0.003}


def trial_metrics(rng: np.random.Generator, x: float, x_c: float, x_l: float,
                  effect: tuple[float, float]) -> dict[str, float]:
    use = USE_MAX * float(_sigmoid(USE_SLOPE * (x - x_c - effect[0])))
    use_hat = use + rng.normal(0, USE_SE)
    own = rng.normal(0, LEAK_TRIAL_SD)  # this training run's own leak onset
    p_valid = VALID_BASE - (VALID_BASE - VALID_BROKEN) * float(
        _sigmoid(VALID_SLOPE * (x - x_l - effect[1] - own)))
    valid = rng.binomial(DRAWS, p_valid)
    low, high = wilson_interval(valid, DRAWS)
    converged = 0.0 if abs(x - x_c) < 1.0 and rng.random() < UNCONVERGED_P else 1.0
    return {"eval/ce_prior_nats": 0.32, "eval/use_nats": use_hat,
            "eval/use_low_nats": use_hat - 1.96 * USE_SE,
            "eval/use_high_nats": use_hat + 1.96 * USE_SE, "eval/valid_rate": valid / DRAWS,
            "eval/valid_low": low, "eval/valid_high": high, "eval/converged": converged,
            "eval/mutual_info_nats": min(use_hat, 2.0 ** x * math.log(2))}  # MI <= kappa


def sweep_trainable(rng: np.random.Generator, x_c: float, x_l: float):
    """A function config -> final metrics for one simulated sweep."""
    effects: dict[int, tuple[float, float]] = {}

    def run(config: dict) -> dict[str, float]:
        seed = config["training.seed"]
        if seed not in effects:
            effects[seed] = seed_effects(rng, [seed])[seed]
        if config[LATENT_KEY] == 0:
            return baseline_metrics(rng)
        return trial_metrics(rng, math.log2(config[KEY]), x_c, x_l, effects[seed])
    return run


def true_boundaries(x_c: float, x_l: float, tol: Tolerances | None = None
                    ) -> tuple[float, float]:
    """The x where P(collapsed) falls and P(leaking) rises through 1/2 over the population
    (seed effects, baselines, row noise and binomial reads; converged trials), computed
    exactly: seed effects by Gauss-Hermite quadrature, the binomial reads summed over every
    count, the leak verdict of each (trial count, baseline count) pair from ``classify``."""
    from scipy import stats

    tol = tol or Tolerances()
    nodes, weights = np.polynomial.hermite_e.hermegauss(24)  # N(0, 1) quadrature
    weights = weights / weights.sum()
    effects, leak_effects = nodes * SEED_SD, nodes * math.hypot(LEAK_SEED_SD, LEAK_TRIAL_SD)
    counts = np.arange(DRAWS + 1)
    wilson = [wilson_interval(int(k), DRAWS) for k in counts]
    used = Outcome(0.32, use_low_nats=1.0, converged=1.0)
    leaks = np.array([[classify(Outcome(0.32, valid_rate=k / DRAWS, use_low_nats=1.0,
                                        valid_low=wilson[k][0], valid_high=wilson[k][1],
                                        converged=1.0),
                                Outcome(0.30, valid_rate=b / DRAWS, valid_low=wilson[b][0],
                                        valid_high=wilson[b][1]), tol) == "leaking"
                       for b in counts] for k in counts], float)  # (trial k, baseline b)
    assert classify(used, Outcome(0.3), tol) == "used"
    p_base = stats.binom.pmf(counts, DRAWS, VALID_BASE)  # (b,)

    def p_collapsed(x: float) -> float:  # the use arm: use_low = use_hat - 1.96 se <= tol
        use = USE_MAX * _sigmoid(USE_SLOPE * (x - x_c - effects))
        return float((weights * stats.norm.cdf((tol.use_nats + 1.96 * USE_SE - use)
                                               / USE_SE)).sum())

    def p_leaking(x: float) -> float:
        p_valid = VALID_BASE - (VALID_BASE - VALID_BROKEN) * _sigmoid(
            VALID_SLOPE * (x - x_l - leak_effects))  # (E,)
        p_trial = stats.binom.pmf(counts[None, :], DRAWS, p_valid[:, None])  # (E, k)
        return float(weights @ (p_trial @ leaks @ p_base))

    def root(f, low: float, high: float) -> float:  # f(low) > 1/2 > f(high)
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if f(mid) > 0.5 else (low, mid)
        return (low + high) / 2
    return (root(p_collapsed, x_c - 6, x_c + 6),
            root(lambda x: 1.0 - p_leaking(x), x_l - 6, x_l + 6))
