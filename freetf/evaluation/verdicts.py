"""Sweep verdicts of converged trials, with tolerances fixed in advance; the boundaries.

A Free Transformer trial of a sweep is judged on its own measurements, each with an
interval from its own noise (rows resampled, Z redrawn: :mod:`freetf.evaluation.latent_use`),
against tolerances that are config keys (``diagnostics.*``), not margins estimated from
the spread of a few baseline seeds:

- ``unconverged``: its last evaluations still move (``eval/converged`` = 0, the plateau of
  :func:`plateau`): no verdict is taken from it;
- ``leaking``: free generation breaks: its validity (Z from the prior) is below
  ``broken_valid``, or its interval lies ``leak_valid_tol`` below the baseline's (same
  seed); without a validity (real data), the honest importance-weighted bound's
  interval lies ``leak_cost_tol_nats`` above the baseline's CE;
- ``used``: the decoder uses Z: the shuffle gain's interval (``eval/use_low_nats``) lies
  above ``use_tol_nats``;
- ``collapsed`` otherwise: no use of Z the measurement can tell from zero.

The mutual information and the single-draw honest CE stay diagnostics: MI <= KL <= kappa
made an MI arm a KL threshold in disguise, MI counts information the decoder never reads,
and one prior draw's CE pays Jensen's gap, not a leak (docs/sweeps.md).

The boundaries of a sweep are fitted to these verdicts along x = log2(kappa):
P(collapsed | x) falls and P(leaking | x) rises through a logistic curve
``lapse + (1 - 2 lapse) sigmoid(+-slope (x - x0 - e_seed))``.  The seed's own offset
``e_seed ~ N(0, tau^2)`` is shared by every trial of that seed (the probes of a sweep
reuse its seeds, so their verdicts are not independent: one seed that leaks early leaks
early at every kappa); it is integrated out by Gauss-Hermite quadrature, and x0 is where
the curve of the whole population of seeds crosses 1/2.  A grid posterior over
(x0, slope, tau), flat in x0 over the searched range widened by :data:`X0_PAD_LOG2` on
each side, log-uniform in the slope and uniform over :data:`SEED_SDS`, gives x0's median
and an equal-tailed credible interval (:func:`fit_boundary`), and how much a new probe
at x would tell about x0 (:func:`probe_information`, the expected information gain of
a new seed's verdict).  Without seeds (``groups=None``) every verdict is its own seed.

numpy and scipy: no Ray, MLflow or torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

VERDICTS = ("collapsed", "used", "leaking")
UNCONVERGED = "unconverged"
# Keys that do not change a model without latent: a baseline is shared across them.
LATENT_ONLY_KEYS = ("training.kl_weight", "training.free_bits", "training.free_bits_bits",
                    "training.free_bits_per", "training.kl_annealing.",
                    "training.free_bits_schedule.", "model.latent_dim", "model.mapper",
                    "model.mapper_impl", "model.mapper_chunk_size",
                    "model.mapper_score_precision", "model.post_sampler_init",
                    "model.post_sampler_init_std", "model.readout_init_std",
                    "model.injection_layer", "optimizer.post_sampler_lr_mult", "diagnostics.")
X0_PAD_LOG2 = 1.0  # the boundary may lie this far (log2 units) outside the probed range
X0_STEP_LOG2 = 0.05  # resolution of the posterior grid over x0
SLOPES = tuple(np.geomspace(0.5, 16.0, 8))  # per log2 unit of kappa
LAPSE = 0.02  # a verdict flips against the curve with this probability (outliers)
SEED_SDS = (0.0, 0.25, 0.5, 1.0)  # tau, log2 units: how far one seed's onset sits from
# the population's (measured on the default sweep's trials: about 1 for the leak)
SEED_NODES = 8  # Gauss-Hermite nodes over a seed's offset
KINDS = ("collapse", "leak")


def changes_baseline(key: str) -> bool:
    """Does searched config ``key`` change a model without latent (its baseline)?"""
    return not any(key == k or (k.endswith(".") and key.startswith(k))
                   for k in LATENT_ONLY_KEYS)


# ----------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Outcome:
    """A trial's final evaluation (NaN where not measured; a baseline has no use)."""

    ce_prior_nats: float
    ce_gap_nats: float = math.nan
    mutual_info_nats: float = math.nan
    valid_rate: float = math.nan
    use_low_nats: float = math.nan  # the shuffle gain's interval, low end
    ce_iw_low_nats: float = math.nan  # the honest bound's interval, low end
    valid_low: float = math.nan
    valid_high: float = math.nan
    excess_nats: float = math.nan  # CE above the task's exact floor (synthetic)
    converged: float = math.nan  # 1: plateaued, 0: still moving, NaN: not measured
    use_position_low_nats: float = math.nan  # use on the position tokens (synthetic)
    use_noise_low_nats: float = math.nan  # use on the "!" tokens (synthetic)

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> Outcome:
        def get(key: str) -> float:
            value = metrics.get(key)
            return math.nan if value is None else float(value)
        return cls(get("eval/ce_prior_nats"), get("eval/ce_gap_nats"),
                   get("eval/mutual_info_nats"), get("eval/valid_rate"),
                   get("eval/use_low_nats"), get("eval/ce_iw_low_nats"),
                   get("eval/valid_low"), get("eval/valid_high"), get("eval/excess_nats"),
                   get("eval/converged"), get("eval/use_position_low_nats"),
                   get("eval/use_noise_low_nats"))


@dataclass(frozen=True)
class Tolerances:
    """The verdict's tolerances, fixed in advance (``diagnostics.*``, documented)."""

    use_nats: float = 0.002
    leak_valid: float = 0.1
    broken_valid: float = 0.2
    leak_cost_nats: float = 0.02
    floor_nats: float = 0.01  # a synthetic baseline's CE within this of the floor
    baseline_valid: float = 0.8  # a synthetic baseline's validity at least this
    regime_nats: float = 0.05  # use on one class of tokens (nats per such token)

    @classmethod
    def from_config(cls, diagnostics) -> Tolerances:
        d = diagnostics
        return cls(d.use_tol_nats, d.leak_valid_tol, d.broken_valid, d.leak_cost_tol_nats,
                   d.floor_tol_nats, regime_nats=d.regime_tol_nats)


def cost_nats(trial: Outcome, baseline: Outcome) -> float:
    """Single-draw honest CE above the baseline of the same seed (a diagnostic)."""
    return trial.ce_prior_nats - baseline.ce_prior_nats


def classify(trial: Outcome, baseline: Outcome, tol: Tolerances) -> str:
    """``unconverged`` / ``leaking`` / ``used`` / ``collapsed`` (module docstring)."""
    if trial.converged == 0.0:
        return UNCONVERGED
    if math.isfinite(trial.valid_rate):
        if trial.valid_rate < tol.broken_valid:
            return "leaking"
        if (math.isfinite(trial.valid_high) and math.isfinite(baseline.valid_low)
                and trial.valid_high < baseline.valid_low - tol.leak_valid):
            return "leaking"
    elif trial.ce_iw_low_nats - baseline.ce_prior_nats > tol.leak_cost_nats:  # NaN: False
        return "leaking"
    if trial.use_low_nats > tol.use_nats:
        return "used"
    return "collapsed"


REGIMES = ("nothing", "position", "noise", "position+noise", "broken")
# The regime boundaries along kappa (Figure 4 located): where the probability that a
# trial's Z carries the position (kappa_pos), the noise (kappa_noise), or that its free
# generation breaks (kappa_broken) rises through 1/2; a broken trial counts as carrying
# both (the paper's 8-bit row: Z encodes everything).
REGIME_ONSETS = {"position": ("position", "position+noise", "broken"),
                 "noise": ("noise", "position+noise", "broken"),
                 "broken": ("broken",)}


def reaches(onset: str, regimes: Sequence[str]) -> list[bool]:
    """For each regime: is it past the ``onset`` (a key of :data:`REGIME_ONSETS`)?"""
    return [r in REGIME_ONSETS[onset] for r in regimes]


def regime(trial: Outcome, tol: Tolerances) -> str:
    """What Z encodes on the synthetic task, the paper's Figure 4 rows: ``broken`` free
    generation (valid < ``broken_valid``), else which token classes the decoder reads from
    Z: the target's position (its first visible letter and the "_" before it), the "!"
    noise, both, or ``nothing`` (use intervals above ``regime_nats`` per class token).
    "" without the per-class measurements (not the synthetic task)."""
    if math.isfinite(trial.valid_rate) and trial.valid_rate < tol.broken_valid:
        return "broken"
    if not (math.isfinite(trial.use_position_low_nats) or math.isfinite(trial.use_noise_low_nats)):
        return ""
    position = trial.use_position_low_nats > tol.regime_nats
    noise = trial.use_noise_low_nats > tol.regime_nats
    return {(False, False): "nothing", (True, False): "position", (False, True): "noise",
            (True, True): "position+noise"}[(position, noise)]


def baseline_converged(baseline: Outcome, tol: Tolerances) -> bool:
    """A baseline is a reference once plateaued and, where the task has an exact floor
    and a validity, within ``floor_nats`` of the floor and valid >= ``baseline_valid``."""
    if baseline.converged == 0.0:
        return False
    if math.isfinite(baseline.excess_nats) and baseline.excess_nats > tol.floor_nats:
        return False
    return not (math.isfinite(baseline.valid_rate)
                and baseline.valid_rate < tol.baseline_valid)


def run_plateau(history: Sequence[Mapping[str, float]], diagnostics,
                kappa_bits: float) -> dict[str, float]:
    """:func:`plateau` with a run's ``diagnostics`` tolerances: the KL's is the larger of
    ``converge_kl_bits`` and ``converge_kl_frac`` of kappa (under its cap the KL wanders)."""
    d = diagnostics
    return plateau(history, d.converge_evals, d.converge_ce_nats,
                   max(d.converge_kl_bits, d.converge_kl_frac * kappa_bits))


def plateau(history: Sequence[Mapping[str, float]], evals: int, ce_nats: float,
            kl_bits: float) -> dict[str, float]:
    """Has a run converged?  Over its last ``evals`` evaluations (``history``: one dict
    per logged step, evaluations carrying ``eval/ce_prior_nats``), the spread (max - min)
    of the CE (posterior Z where measured, else the plain CE) and of the KL in bits.

    Returns ``eval/plateau_ce_nats``, ``eval/plateau_kl_bits`` and ``eval/converged``
    (1.0 when both spreads are within their tolerances over ``evals`` evaluations, 0.0
    otherwise, also with fewer evaluations).
    """
    evaluated = [h for h in history if "eval/ce_prior_nats" in h][-evals:]
    ce = [h.get("eval/ce_posterior_nats", h["eval/ce_prior_nats"]) for h in evaluated]
    kl = [h.get("eval/kl_bits", 0.0) for h in evaluated]
    spread_ce = max(ce) - min(ce) if ce else math.nan
    spread_kl = max(kl) - min(kl) if kl else math.nan
    ok = len(evaluated) >= evals and spread_ce <= ce_nats and spread_kl <= kl_bits
    return {"eval/plateau_ce_nats": spread_ce, "eval/plateau_kl_bits": spread_kl,
            "eval/converged": 1.0 if ok else 0.0}


# ----------------------------------------------------------------------------- boundaries


@dataclass(frozen=True)
class BoundaryFit:
    """Where P(collapsed) falls (or P(leaking), P(regime) rises) through 1/2, along
    log2(kappa)."""

    kind: str  # "collapse" | "leak" | a key of REGIME_ONSETS
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


def _seed_offsets() -> tuple[np.ndarray, np.ndarray]:
    """Offsets (T, Q) of a seed's curve (tau x node) and their quadrature weights (Q,)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(SEED_NODES)  # N(0, 1)
    return np.outer(SEED_SDS, nodes), weights / weights.sum()


def _p_one(kind: str, x: np.ndarray, x0: np.ndarray, slope: np.ndarray,
           offsets: np.ndarray) -> np.ndarray:
    """P(verdict | x) on the grid, (len(x), G, S, T, Q), for a seed whose curve sits
    ``offsets`` (T, Q) from the population's."""
    sign = -1.0 if kind == "collapse" else 1.0
    shift = x[:, None, None] - x0[None, :, None]  # (N, G, 1)
    shift = shift[..., None, None] - offsets[None, None, None]  # (N, G, 1, T, Q)
    arg = sign * slope[None, None, :, None, None] * shift
    return LAPSE + (1.0 - 2.0 * LAPSE) / (1.0 + np.exp(-arg))


def boundary_posterior(kind: str, x: Sequence[float], y: Sequence[bool], low: float,
                       high: float, groups: Sequence | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Posterior over (x0, slope, tau) of the ``kind`` boundary: (x0 grid, weights
    (G, S, T)); ``groups`` names each verdict's seed (None: each its own)."""
    if kind not in (*KINDS, *REGIME_ONSETS):
        raise ValueError(f"kind={kind!r} must be one of {(*KINDS, *REGIME_ONSETS)}")
    x0, slopes = _grid(low, high)
    offsets, weights = _seed_offsets()
    log_post = np.zeros((len(x0), len(slopes), len(SEED_SDS)))
    if len(x):
        if groups is not None and len(groups) != len(x):
            raise ValueError(f"{len(groups)} groups for {len(x)} verdicts")
        labels = list(range(len(x))) if groups is None else list(groups)
        probed, at = np.unique(np.asarray(x, float), return_inverse=True)
        p = _p_one(kind, probed, x0, slopes, offsets)  # (probes, G, S, T, Q)
        log_p = (np.log1p(-p), np.log(p))  # [verdict]
        for label in dict.fromkeys(labels):  # one seed: its verdicts share its offset
            rows = [i for i, g in enumerate(labels) if g == label]
            seed_log_p = sum(log_p[bool(y[i])][at[i]] for i in rows)  # (G, S, T, Q)
            top = seed_log_p.max(-1, keepdims=True)
            log_post += (top[..., 0]
                         + np.log((np.exp(seed_log_p - top) * weights).sum(-1)))
    post = np.exp(log_post - log_post.max())
    return x0, post / post.sum()


def fit_boundary(kind: str, x: Sequence[float], y: Sequence[bool], low: float, high: float,
                 confidence: float = 0.9, groups: Sequence | None = None) -> BoundaryFit:
    """The ``kind`` boundary from verdicts ``y`` (True: collapsed / leaking) at ``x``, of
    the seeds ``groups`` (one label per verdict; None: every verdict its own seed)."""
    x0, post = boundary_posterior(kind, x, y, low, high, groups)
    cdf = np.cumsum(post.sum((1, 2)))
    tail = (1.0 - confidence) / 2.0

    def quantile(q: float) -> float:
        return float(x0[min(np.searchsorted(cdf, q), len(x0) - 1)])
    return BoundaryFit(kind, quantile(0.5), quantile(tail), quantile(1.0 - tail),
                       (low, high), confidence, len(x))


def probe_information(kind: str, candidates: Sequence[float], x: Sequence[float],
                      y: Sequence[bool], low: float, high: float,
                      groups: Sequence | None = None) -> np.ndarray:
    """Expected information (nats) about the boundary from one more verdict, of a seed
    not seen yet, at each candidate: H(E[p]) - E[H(p)] under the posterior (BALD);
    largest where it is most uncertain."""
    x0, post = boundary_posterior(kind, x, y, low, high, groups)
    # The population's curve: a logistic averaged over N(0, tau^2) offsets is close to a
    # logistic of slope s / sqrt(1 + pi s^2 tau^2 / 8) (the probit approximation); only
    # where to probe next rests on it, not the intervals.
    slopes, taus = np.asarray(SLOPES)[:, None], np.asarray(SEED_SDS)[None, :]
    flat = slopes / np.sqrt(1.0 + math.pi * (slopes * taus) ** 2 / 8.0)  # (S, T)
    sign = -1.0 if kind == "collapse" else 1.0
    shift = np.asarray(candidates, float)[:, None] - x0[None, :]  # (C, G)
    p = LAPSE + (1.0 - 2.0 * LAPSE) / (1.0 + np.exp(-sign * shift[:, :, None, None]
                                                    * flat[None, None]))  # (C, G, S, T)
    mean = (p * post[None]).sum((1, 2, 3))
    return _entropy(mean) - (_entropy(p) * post[None]).sum((1, 2, 3))


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))
