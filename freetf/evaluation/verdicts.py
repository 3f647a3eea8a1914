"""Sweep verdicts against a baseline, with noise margins estimated from the seeds.

A Free Transformer trial of a sweep is compared with the same model without a latent
(``model.latent_dim = 0``), trained identically with the same seed:

- *cost*: its honest cross-entropy (Z from the prior, ``eval/ce_prior_nats``) minus the
  baseline's of its seed: what conditioning on Z costs free generation;
- *benefit*: the prior-posterior CE gap (``eval/ce_gap_nats``) and the mutual information
  I(X; Z) (``eval/mutual_info_nats``): whether the decoder uses Z at all.

How large a difference must be to count is not a constant: the *noise* is the spread of
the baseline's honest CE across seeds (pooled over baseline groups, ``s_ce``), and of its
free-generation validity (at least the binomial standard error of the number of
generations read).  A difference is clear when it exceeds k noise units, with k the
Student-t quantile, at the degrees of freedom of ``s_ce``, of the normal quantile
``z = diagnostics.noise_z`` (2 by default: 4.5 with three seeds, 2.4 with eight):

- ``collapsed``: gap <= k s_ce and MI <= k s_ce: the decoder gains no more from Z than
  seeds move the CE anyway, whatever the KL (bits spent on input-independent biases are
  not information);
- ``leaking``: not collapsed, and the cost > k sqrt(2) s_ce (the difference of two
  seeds' CEs has sqrt(2) times their noise), or the validity of free generations is
  below the baseline's by more than k sqrt(2) s_valid;
- ``used`` otherwise: Z carries information the decoder uses, at no clear cost.

The boundaries of a sweep are fitted to these verdicts along x = log2(kappa):
P(collapsed | x) falls and P(leaking | x) rises through a logistic curve
``lapse + (1 - 2 lapse) sigmoid(+-slope (x - x0))``; a grid posterior over (x0, slope),
flat in x0 over the searched range widened by :data:`X0_PAD_LOG2` on each side and
log-uniform in the slope, gives x0's median and an equal-tailed credible interval
(:func:`fit_boundary`), and how much a new probe at x would tell about x0
(:func:`probe_information`, the expected information gain of its verdict).

numpy and scipy: no Ray, MLflow or torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

VERDICTS = ("collapsed", "used", "leaking")
# Keys that do not change a model without latent: a baseline is shared across them.
LATENT_ONLY_KEYS = ("training.kl_weight", "training.free_bits", "training.free_bits_bits",
                    "training.kl_annealing.", "training.free_bits_schedule.",
                    "model.latent_dim", "model.mapper", "model.injection_layer",
                    "diagnostics.")
X0_PAD_LOG2 = 1.0  # the boundary may lie this far (log2 units) outside the probed range
X0_STEP_LOG2 = 0.05  # resolution of the posterior grid over x0
SLOPES = tuple(np.geomspace(0.5, 16.0, 8))  # per log2 unit of kappa
LAPSE = 0.02  # a verdict flips against the curve with this probability (outliers)
KINDS = ("collapse", "leak")


def changes_baseline(key: str) -> bool:
    """Does searched config ``key`` change a model without latent (its baseline)?"""
    return not any(key == k or (k.endswith(".") and key.startswith(k))
                   for k in LATENT_ONLY_KEYS)


# ----------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Outcome:
    """A trial's final evaluation (NaN where not measured; a baseline has no gap / MI)."""

    ce_prior_nats: float
    ce_gap_nats: float = math.nan
    mutual_info_nats: float = math.nan
    valid_rate: float = math.nan

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> Outcome:
        def get(key: str) -> float:
            value = metrics.get(key)
            return math.nan if value is None else float(value)
        return cls(get("eval/ce_prior_nats"), get("eval/ce_gap_nats"),
                   get("eval/mutual_info_nats"), get("eval/valid_rate"))


@dataclass(frozen=True)
class Noise:
    """Noise of a sweep's measurements, from its baseline seeds."""

    ce_nats: float  # seed standard deviation of the baseline's honest CE (pooled)
    valid: float  # of its free-generation validity (NaN: not measured)
    z: float
    dof: int  # degrees of freedom of ce_nats (baseline trials minus groups)

    @property
    def known(self) -> bool:
        return math.isfinite(self.ce_nats) and self.dof > 0

    @property
    def k(self) -> float:
        """The margin in noise units: the Student-t quantile, at ``dof``, of the normal's
        quantile ``z`` (a standard deviation from 2 seeds is itself uncertain)."""
        from scipy import stats

        return float(stats.t.ppf(stats.norm.cdf(self.z), self.dof))

    @property
    def benefit_margin_nats(self) -> float:
        return self.k * self.ce_nats

    @property
    def cost_margin_nats(self) -> float:
        return self.k * math.sqrt(2.0) * self.ce_nats

    @property
    def valid_margin(self) -> float:
        return self.k * math.sqrt(2.0) * self.valid


def pooled_sd(groups: Iterable[Sequence[float]]) -> tuple[float, int]:
    """Pooled within-group standard deviation (ddof 1) and its degrees of freedom."""
    squares, dof = 0.0, 0
    for values in groups:
        values = [v for v in values if math.isfinite(v)]
        if len(values) >= 2:
            mean = sum(values) / len(values)
            squares += sum((v - mean) ** 2 for v in values)
            dof += len(values) - 1
    return (math.sqrt(squares / dof) if dof else math.nan), dof


def estimate_noise(baseline_groups: Iterable[Sequence[Outcome]], z: float,
                   generations: int = 0) -> Noise:
    """Noise of the baseline outcomes, one group per baseline setting (its seeds).

    Unknown (NaN) with fewer than two seeds in every group.  The validity noise is the
    seed spread, at least the binomial standard error of ``generations`` reads at the
    baselines' mean rate (Laplace-smoothed, so a rate of 1 still has noise).
    """
    groups = [list(g) for g in baseline_groups]
    ce_sd, dof = pooled_sd([o.ce_prior_nats for o in g] for g in groups)
    rates = [o.valid_rate for g in groups for o in g if math.isfinite(o.valid_rate)]
    valid = math.nan
    if rates:
        seed_sd, _ = pooled_sd([o.valid_rate for o in g] for g in groups)
        binomial = 0.0
        if generations > 0:
            p = (sum(rates) / len(rates) * generations + 1) / (generations + 2)
            binomial = math.sqrt(p * (1 - p) / generations)
        valid = max(seed_sd if math.isfinite(seed_sd) else 0.0, binomial)
    return Noise(ce_sd, valid, z, dof)


def cost_nats(trial: Outcome, baseline: Outcome) -> float:
    """Honest CE above the baseline of the same seed (nats per token)."""
    return trial.ce_prior_nats - baseline.ce_prior_nats


def classify(trial: Outcome, baseline: Outcome, noise: Noise) -> str:
    """``collapsed`` / ``leaking`` / ``used`` (module docstring); needs a known noise."""
    if not noise.known:
        raise ValueError("the noise is unknown: the sweep needs >= 2 baseline seeds")
    margin = noise.benefit_margin_nats
    gap, mi = trial.ce_gap_nats, trial.mutual_info_nats
    if not (gap > margin) and not (mi > margin):  # NaN (not measured) counts as 0
        return "collapsed"
    if cost_nats(trial, baseline) > noise.cost_margin_nats:
        return "leaking"
    if (math.isfinite(trial.valid_rate) and math.isfinite(baseline.valid_rate)
            and math.isfinite(noise.valid)
            and baseline.valid_rate - trial.valid_rate > noise.valid_margin):
        return "leaking"
    return "used"


# ----------------------------------------------------------------------------- boundaries


@dataclass(frozen=True)
class BoundaryFit:
    """Where P(collapsed) falls (or P(leaking) rises) through 1/2, along log2(kappa)."""

    kind: str  # "collapse" | "leak"
    median_log2: float
    low_log2: float
    high_log2: float
    range_log2: tuple[float, float]  # the searched range
    confidence: float
    trials: int

    @property
    def bits(self) -> tuple[float, float, float]:
        """(estimate, low, high) in bits per token."""
        return 2.0 ** self.median_log2, 2.0 ** self.low_log2, 2.0 ** self.high_log2

    @property
    def below_range(self) -> bool:
        """The interval reaches below the searched range (its low end is open)."""
        return self.low_log2 < self.range_log2[0]

    @property
    def above_range(self) -> bool:
        return self.high_log2 > self.range_log2[1]

    def contains(self, log2_kappa: float) -> bool:
        return self.low_log2 <= log2_kappa <= self.high_log2

    def texts(self) -> tuple[str, str, str]:
        """(estimate, low, high) in bits as text; past the range they read ``< lo`` /
        ``> hi`` (the searched range's ends)."""
        est, low, high = self.bits
        lo, hi = (2.0 ** r for r in self.range_log2)
        lo_txt = f"< {_bits(lo)}" if self.below_range else _bits(low)
        hi_txt = f"> {_bits(hi)}" if self.above_range else _bits(high)
        est_txt = f"> {_bits(hi)}" if est > hi else f"< {_bits(lo)}" if est < lo else _bits(est)
        return est_txt, lo_txt, hi_txt

    def text(self) -> str:
        """``0.277 bits [0.0604, 0.758] (95%, 15 trials)``."""
        est, low, high = self.texts()
        return f"{est} bits [{low}, {high}] ({self.confidence:.0%}, {self.trials} trials)"


def _bits(value: float) -> str:
    return f"{value:.3g}"


def _grid(low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    x0 = np.arange(low - X0_PAD_LOG2, high + X0_PAD_LOG2 + 1e-9, X0_STEP_LOG2)  # (G,)
    return x0, np.asarray(SLOPES)  # (S,)


def _p_one(kind: str, x: np.ndarray, x0: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """P(verdict | x) on the grid: (len(x), G, S)."""
    sign = -1.0 if kind == "collapse" else 1.0
    arg = sign * slope[None, None, :] * (x[:, None, None] - x0[None, :, None])
    return LAPSE + (1.0 - 2.0 * LAPSE) / (1.0 + np.exp(-arg))


def boundary_posterior(kind: str, x: Sequence[float], y: Sequence[bool], low: float,
                       high: float) -> tuple[np.ndarray, np.ndarray]:
    """Posterior over (x0, slope) of the ``kind`` boundary: (x0 grid, weights (G, S))."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} must be one of {KINDS}")
    x0, slopes = _grid(low, high)
    log_post = np.zeros((len(x0), len(slopes)))
    if len(x):
        p = _p_one(kind, np.asarray(x, float), x0, slopes)  # (N, G, S)
        yy = np.asarray(y, bool)[:, None, None]
        log_post = np.where(yy, np.log(p), np.log1p(-p)).sum(0)
    post = np.exp(log_post - log_post.max())
    return x0, post / post.sum()


def fit_boundary(kind: str, x: Sequence[float], y: Sequence[bool], low: float, high: float,
                 confidence: float = 0.9) -> BoundaryFit:
    """The ``kind`` boundary from verdicts ``y`` (True: collapsed / leaking) at ``x``."""
    x0, post = boundary_posterior(kind, x, y, low, high)
    cdf = np.cumsum(post.sum(1))
    tail = (1.0 - confidence) / 2.0

    def quantile(q: float) -> float:
        return float(x0[min(np.searchsorted(cdf, q), len(x0) - 1)])
    return BoundaryFit(kind, quantile(0.5), quantile(tail), quantile(1.0 - tail),
                       (low, high), confidence, len(x))


def probe_information(kind: str, candidates: Sequence[float], x: Sequence[float],
                      y: Sequence[bool], low: float, high: float) -> np.ndarray:
    """Expected information (nats) about the boundary from one verdict at each candidate:
    H(E[p]) - E[H(p)] under the posterior (BALD); largest where it is most uncertain."""
    x0, post = boundary_posterior(kind, x, y, low, high)
    p = _p_one(kind, np.asarray(candidates, float), x0, np.asarray(SLOPES))  # (C, G, S)
    mean = (p * post[None]).sum((1, 2))
    return _entropy(mean) - (_entropy(p) * post[None]).sum((1, 2))


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))
