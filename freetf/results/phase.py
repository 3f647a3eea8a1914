"""The phase diagram of a sweep analysed against its baselines (:mod:`.analysis`).

Three panels, x = free bits kappa (bits, log2 axis):

1. P(used) over (kappa, kl_weight): one square per probe, coloured by the fraction of
   its seeds whose verdict is ``used``; the collapse onset kappa_c (blue) and the leak
   onset kappa_l (red) of each kl_weight drawn at their median with their interval, and
   on the synthetic task the regime onsets kappa_pos (green), kappa_noise (orange) and
   kappa_broken (black);
2. the single-draw cost (honest CE minus the seed's baseline, nats; a diagnostic, not
   the leak rule) against kappa: mean and seed standard deviation per probe, one line
   per setting;
3. the validity of free generations (Z from the prior) against kappa, same error bars,
   with the baselines' mean as a dashed line.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from freetf.results.columns import (
    BOUNDARY_COLORS,
    BOUNDARY_NAMES,
    KL_WEIGHT,
    save_figure,
    x_column,
)

# each boundary drawn a little above or below its kl_weight's row, so none hides another
_SHIFT = {"collapse": 1.15, "leak": 1 / 1.15, "position": 1.35, "noise": 1 / 1.35,
          "broken": 1.6}


def _probe_stats(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per (setting, kappa): mean, seed sd and count of ``column``."""
    grouped = df.groupby(["_label", "_kappa"])[column]
    return grouped.agg(["mean", "std", "count"]).reset_index()


def plot_phase_diagram(analysis, path: str | Path) -> Path:
    df = analysis.trials
    judged = df[df["cost_nats"].notna()].copy() if "cost_nats" in df else df.iloc[:0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17.0, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, 3))
    ax_map, ax_cost, ax_valid = axes
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3, which="both")
        ax.set_xlabel("free bits kappa (bits per token)")
    if judged.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "no trials judged against a baseline", ha="center",
                    transform=ax.transAxes)
        return save_figure(fig, path)
    judged["_kappa"] = 2.0 ** x_column(judged, analysis.key)
    settings = [c for c in judged.columns if c.startswith("sampled.") and c[8:] not in
                (analysis.key, "training.seed", "model.latent_dim")]
    judged["_label"] = judged[settings].apply(
        lambda r: ",".join(f"{c.rsplit('.', 1)[-1]}={r[c]:.4g}" if isinstance(r[c], float)
                           else f"{c.rsplit('.', 1)[-1]}={r[c]}" for c in settings),
        axis=1) if settings else "all"
    judged["_used"] = (judged["verdict"] == "used").astype(float)

    probes = judged.groupby(["_kappa", KL_WEIGHT])["_used"].mean().reset_index()
    points = ax_map.scatter(probes["_kappa"], probes[KL_WEIGHT], c=probes["_used"],
                            cmap="viridis", vmin=0, vmax=1, s=260, marker="s")
    fig.colorbar(points, ax=ax_map, label="P(used) over seeds")
    for b in analysis.boundaries:
        y = b.setting.get("training.kl_weight", float(judged[KL_WEIGHT].iloc[0]))
        for kind, fit in b.fits().items():
            est, low, high = fit.bits
            ax_map.errorbar([est], [y * _SHIFT[kind]], xerr=[[est - low], [high - est]],
                            fmt="D", color=BOUNDARY_COLORS[kind], capsize=5, ms=8,
                            label=f"{BOUNDARY_NAMES[kind]} ({fit.confidence:.0%})")
    ax_map.set_yscale("log")
    weights = judged[KL_WEIGHT].astype(float)
    ax_map.set_ylim(weights.min() / 2.5, weights.max() * 2.5)  # one weight: still a band
    ax_map.set(ylabel="kl_weight (beta)", title="P(used) and the boundaries")
    handles, labels = ax_map.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        ax_map.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left")

    for (label, group), marker in zip(_probe_stats(judged, "cost_nats").groupby("_label"),
                                      itertools.cycle("osD^v<>")):  # markers repeat past 7
        ax_cost.errorbar(group["_kappa"], group["mean"], yerr=group["std"].fillna(0),
                         marker=marker, capsize=4, label=label)
    ax_cost.axhline(0.0, color="black", lw=0.8)
    ax_cost.set(ylabel="honest CE (one draw) - baseline",
                title="cost of Z: mean and seed sd per probe")
    ax_cost.legend(fontsize=8)

    valid = judged.dropna(subset=["eval/valid_rate"])
    if valid.empty:
        ax_valid.text(0.5, 0.5, "no free-generation validity (synthetic task only)",
                      ha="center", transform=ax_valid.transAxes)
    for label, group in _probe_stats(valid, "eval/valid_rate").groupby("_label"):
        ax_valid.errorbar(group["_kappa"], group["mean"], yerr=group["std"].fillna(0),
                          marker="o", capsize=4, label=label)
    base = df[(df["verdict"] == "baseline")]["eval/valid_rate"].dropna()
    if not base.empty:
        ax_valid.axhline(float(np.mean(base)), color="tab:purple", ls="--",
                         label=f"baseline ({len(base)} seeds)")
        ax_valid.legend(fontsize=8)
    ax_valid.set(ylabel="valid free generations", ylim=(-0.05, 1.05),
                 title="validity with Z from the prior")
    fig.suptitle(f"Phase diagram ({len(judged)} trials against their baselines)", fontsize=10)
    return save_figure(fig, path)
