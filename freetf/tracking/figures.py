"""Figures of a run's metrics, read back from MLflow."""

from __future__ import annotations

from pathlib import Path

CURVE_METRICS = ("train/loss", "train/ce_nats", "train/kl_nats", "train/free_bits_nats")


def metric_history(client, run_id: str, keys: tuple[str, ...]) -> list[dict[str, float]]:
    """One dict per logged step (with ``step``) of the metrics ``keys`` of a run."""
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        for metric in client.get_metric_history(run_id, key):
            rows.setdefault(metric.step, {"step": metric.step})[key] = metric.value
    return [rows[s] for s in sorted(rows)]


def plot_training_curves(history: list[dict[str, float]], path: str | Path) -> Path:
    """Save loss / reconstruction and raw KL (nats per token) against step as a PNG.

    ``history`` holds one dict of metrics per logged step, with a ``step`` key (the
    list index otherwise); missing keys are skipped.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(row.get("step", i), row[key]) for i, row in enumerate(history) if key in row]
        return [p[0] for p in points], [p[1] for p in points]

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_kl = fig.subplots(1, 2)
    for key, label in (("train/loss", "total loss"), ("train/ce_nats", "reconstruction")):
        steps, values = series(key)
        if steps:
            ax_loss.plot(steps, values, label=label)
    ax_loss.set(xlabel="step", ylabel="nats per token", title="Loss")
    steps, values = series("train/kl_nats")
    if steps:
        ax_kl.plot(steps, values, label="raw KL")
    steps, values = series("train/free_bits_nats")
    if steps:
        ax_kl.plot(steps, values, "--", label="free-bits threshold")
    ax_kl.set(xlabel="step", ylabel="nats per token", title="KL(Q(Z|S) || P(Z))")
    for ax in (ax_loss, ax_kl):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path

