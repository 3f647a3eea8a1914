"""The boundaries over training: kappa_c(t) and kappa_l(t) from every evaluation, and on
the synthetic task the regime onsets kappa_pos(t), kappa_noise(t), kappa_broken(t).

The verdicts of :mod:`freetf.evaluation.verdicts` are taken from each trial's
measurements at evaluation step t against its baseline's at the same step, and the
boundaries are fitted at each t exactly as at the end (convergence is what this curve
shows, so it is not required here).  An estimate is called *converged* when its last
``last`` evaluations agree: their medians within ``tol_log2`` of each other.

pandas, numpy and matplotlib: no Ray, no MLflow (the histories come from
:func:`freetf.results.report.collect_histories`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from freetf.evaluation import verdicts
from freetf.evaluation.verdicts import Outcome, Tolerances
from freetf.results.columns import BOUNDARY_COLORS, BOUNDARY_LABELS

HISTORY_METRICS = ("eval/ce_prior_nats", "eval/use_low_nats", "eval/ce_iw_low_nats",
                   "eval/valid_rate", "eval/valid_low", "eval/valid_high",
                   "eval/excess_nats", "eval/use_position_low_nats",
                   "eval/use_noise_low_nats")
COLUMNS = ["step", "kind", "median_log2", "low_log2", "high_log2", "trials"]


def boundaries_over_training(histories: pd.DataFrame, trials: pd.DataFrame, x: pd.Series,
                             tol: Tolerances, confidence: float,
                             range_log2: tuple[float, float]) -> pd.DataFrame:
    """One row per (evaluation step, boundary kind) of one setting's trials.

    ``histories``: long format, columns ``run_id``, ``step`` and :data:`HISTORY_METRICS`;
    ``trials``: the setting's judged trials (``run_id``, ``seed``) with ``x`` their
    log2(kappa) (same index); the baselines of the same seeds are read from ``histories``
    through ``baselines`` = trials of ``model_kind == "baseline"`` in ``trials``.
    """
    is_base = trials["model_kind"] == "baseline"
    base_of_seed = dict(zip(trials.loc[is_base, "seed"], trials.loc[is_base, "run_id"],
                            strict=False))
    probes = trials[~is_base]
    rows = []
    by_run = {run: h.set_index("step") for run, h in histories.groupby("run_id")}
    steps = sorted(histories["step"].unique())
    for step in steps:
        xs, labels, seeds, regimes = [], [], [], []
        for i, trial in probes.iterrows():
            base_run = base_of_seed.get(trial["seed"])
            if base_run not in by_run or trial["run_id"] not in by_run:
                continue
            at, base_at = by_run[trial["run_id"]], by_run[base_run]
            if step not in at.index or step not in base_at.index:
                continue
            outcome = Outcome.from_metrics(at.loc[step].to_dict())
            baseline = Outcome.from_metrics(base_at.loc[step].to_dict())
            if not math.isfinite(outcome.ce_prior_nats):
                continue
            xs.append(float(x.loc[i]))
            labels.append(verdicts.classify(outcome, baseline, tol))
            seeds.append(trial["seed"])
            regimes.append(verdicts.regime(outcome, tol))
        if not xs:
            continue
        ys = {"collapse": [v == "collapsed" for v in labels],
              "leak": [v == "leaking" for v in labels]}
        if "" not in regimes:  # the synthetic task: every trial has what Z carries
            ys |= {kind: verdicts.reaches(kind, regimes) for kind in verdicts.REGIME_ONSETS}
        for kind, y in ys.items():
            fit = verdicts.fit_boundary(kind, xs, y, *range_log2, confidence, groups=seeds)
            rows.append([int(step), kind, fit.median_log2, fit.low_log2, fit.high_log2,
                         fit.trials])
    return pd.DataFrame(rows, columns=COLUMNS)


def estimate_converged(over: pd.DataFrame, last: int = 3, tol_log2: float = 0.5
                       ) -> dict[str, bool]:
    """Per boundary kind (kappa_c, kappa_l, and the regime onsets where fitted): do the
    medians of the last ``last`` evaluations agree?"""
    out = {}
    for kind in (*verdicts.KINDS, *(k for k in verdicts.REGIME_ONSETS
                                    if (over["kind"] == k).any())):
        medians = over[over["kind"] == kind].sort_values("step")["median_log2"].tail(last)
        out[kind] = len(medians) == last and float(medians.max() - medians.min()) <= tol_log2
    return out


def plot_over_training(over: pd.DataFrame, path: str | Path, label: str = "") -> Path:
    """kappa_c(t) and kappa_l(t) (and the regime onsets where fitted) with their intervals
    against the training step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for kind, name in BOUNDARY_LABELS.items():
        color = BOUNDARY_COLORS[kind]
        part = over[over["kind"] == kind].sort_values("step")
        if part.empty:
            continue
        ax.plot(part["step"], 2.0 ** part["median_log2"], color=color, marker="o", label=name)
        ax.fill_between(part["step"], 2.0 ** part["low_log2"], 2.0 ** part["high_log2"],
                        color=color, alpha=0.2)
    ax.set(yscale="log", xlabel="training step", ylabel="kappa (bits per token)",
           title=f"Boundaries over training {label}".strip())
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
