"""A sweep's summary on its parent run: the trials counted per verdict
(``sweep/trials_<verdict>``) and the sweep figures (:mod:`freetf.results.sweep_figures`)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# The verdicts counted on the parent, under these names, even when no trial has them.
COUNTED_VERDICTS = ("collapsed", "used", "leaking")


def verdict_counts(runs) -> dict[str, float]:
    """``sweep/trials`` and ``sweep/trials_<verdict>`` of a :func:`collect_runs` frame
    (``active`` counted as ``used``), and ``sweep/trials_stopped_early``."""
    verdicts = [{"active": "used"}.get(v, v) for v in runs["verdict"]] if len(runs) else []
    counts: dict[str, float] = {"sweep/trials": float(len(verdicts))}
    for verdict in dict.fromkeys([*COUNTED_VERDICTS, *verdicts]):
        counts[f"sweep/trials_{verdict}"] = float(verdicts.count(verdict))
    if len(runs):
        counts["sweep/trials_stopped_early"] = float(runs["stopped_early"].sum())
    return counts


def log_sweep_summary(tracker, client, runs, out_dir: str | Path | None = None) -> dict:
    """Log the parent run's summary: verdict counts as metrics, and the sweep figures
    (:func:`freetf.results.sweep_figures.plot_kl_vs_kappa`, :func:`plot_sweep_curves`) under
    ``report/``.  Writes the figures to ``out_dir`` (a temporary folder if None) and
    returns their paths."""
    from freetf.results.sweep_figures import plot_kl_vs_kappa, plot_sweep_curves

    tracker.log_metrics(verdict_counts(runs), step=0)
    paths: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp)
        try:
            paths["kl_vs_kappa"] = plot_kl_vs_kappa(runs, out / "kl_vs_kappa.png")
            paths["trial_curves"] = plot_sweep_curves(client, runs, out / "trial_curves.png")
        except Exception as err:  # a figure must never fail the sweep
            logger.warning("sweep figures failed: %s", err)
        for path in paths.values():
            tracker.log_artifact(path, "report")
    return paths if out_dir is not None else {}
