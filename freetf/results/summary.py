"""A sweep's summary on its parent run: the trials counted per verdict
(``sweep/trials_<verdict>``) and the sweep figures (:mod:`freetf.results.sweep_figures`);
and the sweep's view of MLflow's runs table (its trials, the columns a reader compares)."""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

from freetf.results.columns import shown_column

logger = logging.getLogger(__name__)

# The verdicts counted on the parent, under these names, even when no trial has them.
COUNTED_VERDICTS = ("collapsed", "used", "leaking")
# The metrics a sweep's view shows beside the verdict and the keys that differ: the use of
# Z, its KL, the honest CE, the validity of free generations, the verdict code.  Few: the
# table draws only the columns that fit its width (the last ones are off screen).
VIEW_METRICS = ("eval/use_nats", "eval/kl_bits", "eval/ce_prior_nats", "eval/valid_rate",
                "eval/verdict_code")


def save_sweep_view(client, experiment_id: str, sweep: str, named_keys) -> str:
    """Save sweep ``sweep``'s trials as a view of MLflow's runs table, named
    ``<sweep>: trials``: the filter ``tags.`freetf.role` = 'trial'`` of that sweep, the
    trials grouped by verdict (each group open: no click on the parent run to see them),
    and the columns verdict, the keys whose values differ between the trials
    (``SweepConfig.named_keys``, by their param names: ``free_bits_bits``, ``seed``) and
    :data:`VIEW_METRICS`.  Returns the view's id, the same for the same sweep name, for
    :func:`freetf.tracking.runs_page_url` (``view=``)."""
    from freetf.tracking import runs_column, save_runs_view, tags
    from freetf.tracking.params import searched_names

    names = searched_names(list(named_keys))
    columns = [runs_column("tags", tags.VERDICT),
               *(runs_column("params", names[k]) for k in named_keys),
               *(runs_column("metrics", m) for m in VIEW_METRICS)]
    search = f"tags.`{tags.ROLE}` = 'trial' and tags.`{tags.SWEEP}` = '{sweep}'"
    view_id = "freetf-" + hashlib.sha1(sweep.encode()).hexdigest()[:12]
    return save_runs_view(client, experiment_id, view_id, f"{sweep}: trials", columns, search,
                          group_by_tag=tags.VERDICT)


def verdict_counts(runs) -> dict[str, float]:
    """``sweep/trials`` and ``sweep/trials_<verdict>`` of a :func:`collect_runs` frame
    (``active`` counted as ``used``; a trial without verdict by how it ended:
    ``sweep/trials_failed``), and ``sweep/trials_stopped_early``."""
    verdicts = [{"active": "used"}.get(v, v) for v in shown_column(runs)]
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
