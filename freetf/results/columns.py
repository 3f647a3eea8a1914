"""What the results modules share: the runs table's axis columns, log2 of the boundary key,
what a trial is drawn as, and how a figure is written."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

# The axes and panels of the map: (column, config param it is read from).
KL_WEIGHT, FREE_BITS, ANNEALING = "kl_weight", "free_bits_bits", "kl_annealing"

VERDICT_COLORS = {"collapsed": "tab:blue", "active": "tab:green", "used": "tab:green",
                  "leaking": "tab:red", "unconverged": "tab:orange", "baseline": "tab:purple",
                  "stopped": "black", "failed": "tab:gray", "interrupted": "tab:olive",
                  "unknown": "tab:gray"}
# The verdicts (freetf.evaluation.verdicts), then how a trial without one ended
# (freetf.tracking.OUTCOMES): what a trial is drawn and counted as (:func:`shown`).
VERDICT_ORDER = ("collapsed", "active", "used", "leaking", "unconverged", "baseline",
                 "stopped", "failed", "interrupted", "unknown")


# The boundaries of a sweep, by kind (freetf.evaluation.verdicts: KINDS, REGIME_ONSETS):
# their names (metrics, JSON), the label of the summary and the figures, their colour.
BOUNDARY_NAMES = {"collapse": "kappa_c", "leak": "kappa_l", "position": "kappa_pos",
                  "noise": "kappa_noise", "broken": "kappa_broken"}
BOUNDARY_LABELS = {"collapse": "kappa_c (collapse onset)", "leak": "kappa_l (leak onset)",
                   "position": "kappa_pos (Z: position)", "noise": "kappa_noise (Z: noise)",
                   "broken": "kappa_broken (invalid)"}
BOUNDARY_COLORS = {"collapse": "tab:blue", "leak": "tab:red", "position": "tab:green",
                   "noise": "tab:orange", "broken": "black"}


def shown(row) -> str:
    """What a trial (a row of the runs table) is drawn and counted as: its verdict, else
    how it ended."""
    for key in ("verdict", "outcome"):
        value = row.get(key)
        if isinstance(value, str) and value:
            return value
    return "unknown"


def shown_column(df: pd.DataFrame) -> pd.Series:
    """:func:`shown` of every row."""
    return df.apply(shown, axis=1) if len(df) else pd.Series(dtype=object)


def x_column(df: pd.DataFrame, key: str) -> pd.Series:
    """log2 of the boundary key (free bits: in bits whether searched in bits or nats)."""
    column = FREE_BITS if key in ("training.free_bits_bits", "training.free_bits") \
        else f"sampled.{key}"
    return df[column].astype(float).map(lambda v: math.log2(v) if v > 0 else math.nan)


def trial_label(row: dict) -> str:
    """A trial's name in tables and figures: its run name, without the sweep's name that
    runs named before the current names carried in front (``search_kl/free_bits_bits=...``;
    now ``kappa=1/4 s1``, :func:`freetf.sweeps.trainable.trial_run_name`)."""
    name, sweep = str(row["run_name"]), str(row.get("sweep") or "")
    return name[len(sweep) + 1:] if sweep and name.startswith(f"{sweep}/") else name


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def log2_range(values: tuple) -> tuple[float, float]:
    """The searched range of log2(kappa) from a space entry's values."""
    low, high = min(float(v) for v in values), max(float(v) for v in values)
    if low <= 0:
        raise ValueError(f"kappa must be > 0 bits, got {low}")
    return math.log2(low), math.log2(high)
