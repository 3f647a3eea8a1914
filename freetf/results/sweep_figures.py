"""A sweep's figures that overlay what MLflow's built-in charts draw apart:

- :func:`plot_kl_vs_kappa`: each trial's final raw KL against its kappa, and its CE gap,
  coloured by verdict;
- :func:`plot_sweep_curves`: one row per trial of the per-run overlays
  (:mod:`freetf.tracking.figures`), with the baseline's CE (trials with verdict
  ``baseline``) as a line when the sweep has one.
"""

from __future__ import annotations

from pathlib import Path

from freetf.results.columns import VERDICT_COLORS, shown, shown_column, trial_label
from freetf.tracking.figures import (
    CURVE_METRICS,
    draw_ce,
    draw_kl,
    finish_axes,
    metric_history,
    new_figure,
    save_figure,
)


def plot_kl_vs_kappa(runs, path: str | Path) -> Path:
    """Save :func:`kl_vs_kappa_figure` of ``runs`` as a PNG."""
    return save_figure(kl_vs_kappa_figure(runs), path)


def kl_vs_kappa_figure(runs):
    """Each trial's final raw eval KL against its kappa (bits per token, log axes, the
    line KL = kappa), and its CE gap (posterior below prior, nats), coloured by verdict.

    ``runs``: a :func:`freetf.results.report.collect_runs` frame.
    """
    fig, axes = new_figure(11, 4.0, 1, 2)
    ax_kl, ax_gap = axes[0]
    points = runs.dropna(subset=["free_bits_bits"]) if len(runs) else runs
    points = points[points["free_bits_bits"] > 0] if len(points) else points
    for verdict, group in (points.groupby(shown_column(points)) if len(points) else []):
        color = VERDICT_COLORS.get(verdict, "tab:gray")
        hollow = group["stopped_early"].astype(bool)
        for ax, key in ((ax_kl, "eval/kl_bits"), (ax_gap, "eval/ce_gap_nats")):
            for mask, face in ((~hollow, color), (hollow, "none")):
                ax.scatter(group["free_bits_bits"][mask], group[key][mask], s=60,
                           edgecolors=color, facecolors=face,
                           label=verdict if face == color or not (~hollow).any() else None)
    if len(points):
        kappas = sorted(points["free_bits_bits"].unique())
        ax_kl.plot(kappas, kappas, ":", color="black", label="KL = kappa")
        for ax in (ax_kl, ax_gap):
            ax.set_xscale("log", base=2)
        ax_kl.set_yscale("symlog", linthresh=1e-2)
        ax_kl.set_ylim(0.0, 2.0 * max(points["eval/kl_bits"].max(), max(kappas)))
        ax_gap.axhline(0.0, color="black", linewidth=0.5)
    else:
        ax_kl.text(0.5, 0.5, "no trials with a free-bits kappa", ha="center",
                   transform=ax_kl.transAxes)
    ax_kl.set(xlabel="free bits kappa (bits per token)", ylabel="final raw KL (bits per token)",
              title="KL against its kappa (hollow: stopped early)")
    ax_gap.set(xlabel="free bits kappa (bits per token)",
               ylabel="CE prior - CE posterior (nats per token)", title="CE gap")
    finish_axes(axes[0])
    return fig


def plot_sweep_curves(client, runs, path: str | Path, max_trials: int = 16) -> Path:
    """Save :func:`sweep_curves_figure` as a PNG."""
    return save_figure(sweep_curves_figure(client, runs, max_trials), path)


def sweep_curves_figure(client, runs, max_trials: int = 16):
    """One row per trial (the first ``max_trials``): raw KL against kappa, and CE prior
    against CE posterior against the baseline's CE, from the runs' MLflow histories."""
    baseline = runs[runs["verdict"] == "baseline"] if len(runs) else runs
    baseline_ce = float(baseline["eval/ce_prior_nats"].mean()) if len(baseline) else None
    trials = runs[runs["verdict"] != "baseline"].head(max_trials) if len(runs) else runs
    rows = max(1, len(trials))
    fig, axes = new_figure(11, 1.2 + 2.3 * rows, rows, 2)
    if not len(trials):
        axes[0][0].text(0.5, 0.5, "no trial runs", ha="center", transform=axes[0][0].transAxes)
    for (ax_kl, ax_ce), row in zip(axes, trials.to_dict("records"), strict=False):
        history = metric_history(client, row["run_id"], CURVE_METRICS)
        color = VERDICT_COLORS.get(shown(row), "tab:gray")
        draw_kl(ax_kl, history, color=color)
        draw_ce(ax_ce, history, baseline_ce)
        name = trial_label(row)
        ax_kl.set_title(f"{name}: {shown(row)}", color=color, fontsize=9, loc="left")
        finish_axes((ax_kl, ax_ce))
    fig.suptitle("Per trial: raw KL vs kappa (bits/token) | CE prior vs posterior"
                 + (" vs baseline" if baseline_ce is not None else "") + " (nats/token)",
                 fontsize=10)
    return fig
