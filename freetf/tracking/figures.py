"""Figures that overlay what MLflow's built-in charts draw apart (one metric per chart).

- :func:`plot_training_curves`, per run: the loss, the raw KL against its free-bits
  kappa (both in bits per token), and the CE with Z from the prior against the CE with
  Z from the posterior (nats per token),
and the pieces a sweep's figures draw them with (:mod:`freetf.results.sweep_figures`).
"""

from __future__ import annotations

import math
from pathlib import Path

CURVE_METRICS = ("train/loss", "train/ce_nats", "train/kl_nats", "train/free_bits_nats",
                 "train/kl_bits", "train/free_bits_bits", "eval/ce_prior_nats",
                 "eval/ce_posterior_nats")
LN2 = math.log(2.0)


def metric_history(client, run_id: str, keys: tuple[str, ...]) -> list[dict[str, float]]:
    """One dict per logged step (with ``step``) of the metrics ``keys`` of a run."""
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        for metric in client.get_metric_history(run_id, key):
            rows.setdefault(metric.step, {"step": metric.step})[key] = metric.value
    return [rows[s] for s in sorted(rows)]


def new_figure(width: float, height: float, nrows: int, ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save_figure(fig, path: str | Path, dpi: int = 80) -> Path:
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


def draw_kl(ax, history: list[dict[str, float]], color: str = "tab:blue") -> None:
    """Raw KL and kappa, bits per token: the KL sits at kappa while the hinge holds it."""
    steps, values = _kl_bits(history)
    if steps:
        ax.plot(steps, values, color=color, label="raw KL")
    steps, values = _kappa_bits(history)
    if steps:
        ax.plot(steps, values, "--", color="black", label="free bits kappa")
    ax.set(xlabel="step", ylabel="bits per token")


def draw_ce(ax, history: list[dict[str, float]], baseline_ce: float | None = None) -> None:
    """CE with Z from the prior (honest) and from the posterior (sees the answer)."""
    for key, style, label in (("eval/ce_prior_nats", "o-", "CE, Z from prior"),
                              ("eval/ce_posterior_nats", "s--", "CE, Z from posterior")):
        steps, values = _series(history, key)
        if steps:
            ax.plot(steps, values, style, markersize=3, label=label)
    if baseline_ce is not None and math.isfinite(baseline_ce):
        ax.axhline(baseline_ce, color="tab:purple", linestyle=":", label="baseline CE")
    ax.set(xlabel="step", ylabel="nats per token")


def finish_axes(axes) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)


def plot_training_curves(history: list[dict[str, float]], path: str | Path) -> Path:
    """Save :func:`training_curves_figure` of ``history`` as a PNG."""
    return save_figure(training_curves_figure(history), path)


def training_curves_figure(history: list[dict[str, float]]):
    """A run's curves: loss and reconstruction (nats per token), raw KL against the
    free-bits kappa (bits per token), CE prior against CE posterior (nats per token).

    ``history`` holds one dict of metrics per logged step, with a ``step`` key (the
    list index otherwise); missing keys are skipped.
    """
    fig, axes = new_figure(13, 3.6, 1, 3)
    ax_loss, ax_kl, ax_ce = axes[0]
    for key, label in (("train/loss", "total loss"), ("train/ce_nats", "reconstruction")):
        steps, values = _series(history, key)
        if steps:
            ax_loss.plot(steps, values, label=label)
    ax_loss.set(xlabel="step", ylabel="nats per token", title="Loss")
    draw_kl(ax_kl, history)
    ax_kl.set_title("KL(Q(Z|S) || P(Z)) against kappa")
    draw_ce(ax_ce, history)
    ax_ce.set_title("Eval CE: Z from prior vs posterior")
    finish_axes(axes[0])
    return fig
