"""Figures that overlay what MLflow's built-in charts draw apart (one metric per chart).

- :func:`plot_training_curves`, per run: the loss, the raw KL against its free-bits
  kappa (both in bits per token), and the CE with Z from the prior against the CE with
  Z from the posterior (nats per token);
- :func:`plot_kl_vs_kappa`, per sweep: each trial's final raw KL against its kappa, and
  its CE gap, coloured by verdict;
- :func:`plot_sweep_curves`, per sweep: one row per trial of the per-run overlays, with
  the baseline's CE (trials with verdict ``baseline``) as a line when the sweep has one.
"""

from __future__ import annotations

import math
from pathlib import Path

CURVE_METRICS = ("train/loss", "train/ce_nats", "train/kl_nats", "train/free_bits_nats",
                 "train/kl_bits", "train/free_bits_bits", "eval/ce_prior_nats",
                 "eval/ce_posterior_nats")
VERDICT_COLORS = {"collapsed": "tab:blue", "used": "tab:green", "active": "tab:green",
                  "leaking": "tab:red", "baseline": "tab:purple"}
LN2 = math.log(2.0)


def metric_history(client, run_id: str, keys: tuple[str, ...]) -> list[dict[str, float]]:
    """One dict per logged step (with ``step``) of the metrics ``keys`` of a run."""
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        for metric in client.get_metric_history(run_id, key):
            rows.setdefault(metric.step, {"step": metric.step})[key] = metric.value
    return [rows[s] for s in sorted(rows)]


def _figure(width: float, height: float, nrows: int, ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path: str | Path, dpi: int = 80) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _series(history: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    points = [(row.get("step", i), row[key]) for i, row in enumerate(history)
              if key in row and row[key] is not None and math.isfinite(row[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _bits(history: list[dict[str, float]], bits_key: str, nats_key: str
          ) -> tuple[list[float], list[float]]:
    """``bits_key`` against step, or ``nats_key`` converted (older runs logged nats only)."""
    steps, bits = _series(history, bits_key)
    if steps:
        return steps, bits
    steps, nats = _series(history, nats_key)
    return steps, [v / LN2 for v in nats]


def _kl_bits(history: list[dict[str, float]]) -> tuple[list[float], list[float]]:
    """Raw train KL in bits."""
    return _bits(history, "train/kl_bits", "train/kl_nats")


def _kappa_bits(history: list[dict[str, float]]) -> tuple[list[float], list[float]]:
    return _bits(history, "train/free_bits_bits", "train/free_bits_nats")


def _draw_kl(ax, history: list[dict[str, float]], color: str = "tab:blue") -> None:
    """Raw KL and kappa, bits per token: the KL sits at kappa while the hinge holds it."""
    steps, values = _kl_bits(history)
    if steps:
        ax.plot(steps, values, color=color, label="raw KL")
    steps, values = _kappa_bits(history)
    if steps:
        ax.plot(steps, values, "--", color="black", label="free bits kappa")
    ax.set(xlabel="step", ylabel="bits per token")


def _draw_ce(ax, history: list[dict[str, float]], baseline_ce: float | None = None) -> None:
    """CE with Z from the prior (honest) and from the posterior (sees the answer)."""
    for key, style, label in (("eval/ce_prior_nats", "o-", "CE, Z from prior"),
                              ("eval/ce_posterior_nats", "s--", "CE, Z from posterior")):
        steps, values = _series(history, key)
        if steps:
            ax.plot(steps, values, style, markersize=3, label=label)
    if baseline_ce is not None and math.isfinite(baseline_ce):
        ax.axhline(baseline_ce, color="tab:purple", linestyle=":", label="baseline CE")
    ax.set(xlabel="step", ylabel="nats per token")


def _finish_axes(axes) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)


def plot_training_curves(history: list[dict[str, float]], path: str | Path) -> Path:
    """Save :func:`training_curves_figure` of ``history`` as a PNG."""
    return _save(training_curves_figure(history), path)


def training_curves_figure(history: list[dict[str, float]]):
    """A run's curves: loss and reconstruction (nats per token), raw KL against the
    free-bits kappa (bits per token), CE prior against CE posterior (nats per token).

    ``history`` holds one dict of metrics per logged step, with a ``step`` key (the
    list index otherwise); missing keys are skipped.
    """
    fig, axes = _figure(13, 3.6, 1, 3)
    ax_loss, ax_kl, ax_ce = axes[0]
    for key, label in (("train/loss", "total loss"), ("train/ce_nats", "reconstruction")):
        steps, values = _series(history, key)
        if steps:
            ax_loss.plot(steps, values, label=label)
    ax_loss.set(xlabel="step", ylabel="nats per token", title="Loss")
    _draw_kl(ax_kl, history)
    ax_kl.set_title("KL(Q(Z|S) || P(Z)) against kappa")
    _draw_ce(ax_ce, history)
    ax_ce.set_title("Eval CE: Z from prior vs posterior")
    _finish_axes(axes[0])
    return fig


def plot_kl_vs_kappa(runs, path: str | Path) -> Path:
    """Save :func:`kl_vs_kappa_figure` of ``runs`` as a PNG."""
    return _save(kl_vs_kappa_figure(runs), path)


def kl_vs_kappa_figure(runs):
    """Each trial's final raw eval KL against its kappa (bits per token, log axes, the
    line KL = kappa), and its CE gap (posterior below prior, nats), coloured by verdict.

    ``runs``: a :func:`freetf.results.report.collect_runs` frame.
    """
    fig, axes = _figure(11, 4.0, 1, 2)
    ax_kl, ax_gap = axes[0]
    points = runs.dropna(subset=["free_bits_bits"]) if len(runs) else runs
    points = points[points["free_bits_bits"] > 0] if len(points) else points
    for verdict, group in (points.groupby("verdict") if len(points) else []):
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
    _finish_axes(axes[0])
    return fig


def plot_sweep_curves(client, runs, path: str | Path, max_trials: int = 16) -> Path:
    """Save :func:`sweep_curves_figure` as a PNG."""
    return _save(sweep_curves_figure(client, runs, max_trials), path)


def sweep_curves_figure(client, runs, max_trials: int = 16):
    """One row per trial (the first ``max_trials``): raw KL against kappa, and CE prior
    against CE posterior against the baseline's CE, from the runs' MLflow histories."""
    baseline = runs[runs["verdict"] == "baseline"] if len(runs) else runs
    baseline_ce = float(baseline["eval/ce_prior_nats"].mean()) if len(baseline) else None
    trials = runs[runs["verdict"] != "baseline"].head(max_trials) if len(runs) else runs
    rows = max(1, len(trials))
    fig, axes = _figure(11, 1.2 + 2.3 * rows, rows, 2)
    if not len(trials):
        axes[0][0].text(0.5, 0.5, "no trial runs", ha="center", transform=axes[0][0].transAxes)
    for (ax_kl, ax_ce), row in zip(axes, trials.to_dict("records"), strict=False):
        history = metric_history(client, row["run_id"], CURVE_METRICS)
        color = VERDICT_COLORS.get(row["verdict"], "tab:gray")
        _draw_kl(ax_kl, history, color=color)
        _draw_ce(ax_ce, history, baseline_ce)
        name = str(row["run_name"]).split("/", 1)[-1]
        ax_kl.set_title(f"{name}: {row['verdict']}", color=color, fontsize=9, loc="left")
        _finish_axes((ax_kl, ax_ce))
    fig.suptitle("Per trial: raw KL vs kappa (bits/token) | CE prior vs posterior"
                 + (" vs baseline" if baseline_ce is not None else "") + " (nats/token)",
                 fontsize=10)
    return fig
