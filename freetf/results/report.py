"""The collapse map of a sweep, from MLflow alone.

A sweep over ``kl_weight``, the free bits kappa and the annealing schedules
(:mod:`freetf.sweeps.sweep`) leaves one MLflow child run per trial, tagged with the latent
verdict of :func:`freetf.evaluation.diagnostics.verdict` (collapsed / used / leaking, §3.3 of
arXiv:2510.17558).  This module reads those runs back (``MlflowClient.search_runs``
into pandas) and draws where Z collapses, is used, or leaks:

- :func:`collect_runs`: one row per trial: its sampled values, final metrics, verdict;
- :func:`collapse_table`: that table as markdown;
- :func:`plot_collapse_map`: verdicts over (free bits, kl_weight), one panel per
  KL-annealing schedule;
- :func:`plot_kl_traces`: the raw KL per token against step of one run per verdict;
- :func:`write_report`: all of it on disk; :mod:`freetf.sweeps.reporting` puts
  it together for ``freetf report``.

MLflow is reached only through :func:`freetf.tracking.mlflow_client`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from freetf.results.columns import (
    ANNEALING,
    FREE_BITS,
    KL_WEIGHT,
    VERDICT_COLORS,
    VERDICT_ORDER,
    save_figure,
    shown,
    shown_column,
    trial_label,
)
from freetf.tracking import tags

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
# Final metrics kept per trial (MLflow's latest value of each).
METRICS = ("train/steps_done", "eval/kl_nats", "eval/kl_bits", "eval/ce_prior_nats",
           "eval/ce_posterior_nats", "eval/ce_gap_nats", "eval/active_bits",
           "eval/mutual_info_nats", "eval/valid_rate", "train/kl_nats", "train/loss",
           "eval/bpb_prior", "eval/bpb_posterior",
           # use of Z, the honest bound, the exact floor, validity, convergence
           "eval/use_nats", "eval/use_low_nats", "eval/use_high_nats", "eval/ce_iw_nats",
           "eval/ce_iw_low_nats", "eval/ce_iw_high_nats", "eval/valid_low", "eval/valid_high",
           "eval/floor_nats", "eval/excess_nats", "eval/excess_iw_nats", "eval/converged",
           "eval/plateau_ce_nats", "eval/plateau_kl_bits", "eval/use_position_nats",
           "eval/use_noise_nats", "eval/use_letter_nats", "eval/use_other_nats",
           "eval/use_position_low_nats", "eval/use_noise_low_nats")
class ReportError(LookupError):
    """Nothing to report: unknown experiment, or no sweep runs in it."""


# ----------------------------------------------------------------------------- runs


def collect_runs(client, experiment: str, sweep: str | None = None) -> pd.DataFrame:
    """One row per trial run of ``experiment`` (of sweep ``sweep``, or of every sweep).

    Columns: ``run_id``, ``run_name``, ``sweep``, ``trial_key``, ``status``, ``verdict``
    (the latent verdict, "" if none), ``outcome`` (how it ended), ``stopped_early``,
    ``stop_reason``, ``stopped_at_step``, ``kl_weight``, ``free_bits_bits`` (kappa in
    bits, from ``training.free_bits_bits`` or ``training.free_bits`` / log 2),
    ``kl_annealing`` and ``free_bits_schedule`` (types),
    one ``sampled.<key>`` column per searched key, and the final value of each of
    :data:`METRICS` (NaN when never logged).
    """
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"no MLflow experiment named {experiment!r}")
    query = "tags.`freetf.role` = 'trial'"
    if sweep is not None:
        query += f" and tags.`freetf.sweep` = '{sweep}'"
    runs = client.search_runs([found.experiment_id], filter_string=query, max_results=10_000)
    return runs_frame(runs)


def collect_histories(client, run_ids: list[str], keys: tuple[str, ...]) -> pd.DataFrame:
    """Every logged value of ``keys`` of the runs, long format: ``run_id``, ``step`` and
    one column per key (NaN where a step did not log it)."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for run_id in run_ids:
        for key in keys:
            for metric in client.get_metric_history(run_id, key):
                rows.setdefault((run_id, metric.step), {"run_id": run_id,
                                                        "step": metric.step})[key] = metric.value
    return pd.DataFrame(list(rows.values()), columns=["run_id", "step", *keys])


def runs_frame(runs: list) -> pd.DataFrame:
    """The :func:`collect_runs` table of MLflow ``Run`` objects."""
    from freetf.tracking import run_config, run_outcome, run_verdict

    rows = []
    for run in runs:
        params, run_tags, metrics = run_config(run), run.data.tags, run.data.metrics
        row: dict[str, Any] = {
            "run_id": run.info.run_id, "run_name": run.info.run_name,
            "sweep": run_tags.get(tags.SWEEP, ""), "trial_key": run_tags.get(tags.TRIAL_KEY, ""),
            "status": run.info.status, "verdict": run_verdict(run_tags),
            "regime": run_tags.get(tags.REGIME, ""),
            "outcome": run_outcome(run_tags, run.info.status),
            "stopped_early": run_tags.get(tags.STOPPED_EARLY) == "true",
            "stop_reason": run_tags.get(tags.STOP_REASON, "")
            if run_tags.get(tags.STOPPED_EARLY) == "true" else "",
            "stopped_at_step": _number(run_tags.get(tags.STOPPED_AT_STEP)),
            KL_WEIGHT: _number(params.get("training.kl_weight")),
            FREE_BITS: _free_bits_bits(params),
            ANNEALING: params.get("training.kl_annealing.type", "constant"),
            "free_bits_schedule": params.get("training.free_bits_schedule.type", "constant"),
            "model_kind": run_tags.get(tags.MODEL_KIND, ""),
            "seed": _number(params.get("training.seed")),
        }
        for key, value in json.loads(run_tags.get(tags.SAMPLED, "{}")).items():
            row[f"sampled.{key}"] = value
        for key in METRICS:
            row[key] = metrics.get(key, math.nan)
        rows.append(row)
    columns = ["run_id", "run_name", "sweep", "trial_key", "status", "verdict", "regime",
               "outcome",
               "stopped_early",
               "stop_reason", "stopped_at_step", KL_WEIGHT, FREE_BITS, ANNEALING,
               "free_bits_schedule", "model_kind", "seed", *METRICS]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=columns)
    sampled = sorted(c for c in frame.columns if c.startswith("sampled."))
    frame = frame[[*columns, *sampled]]
    return frame.sort_values([ANNEALING, FREE_BITS, KL_WEIGHT, "run_name"],
                             ignore_index=True)


def _number(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _free_bits_bits(params: dict[str, str]) -> float:
    bits = _number(params.get("training.free_bits_bits"))
    return bits if not math.isnan(bits) else _number(params.get("training.free_bits")) / LN2


# ----------------------------------------------------------------------------- table


def collapse_table(df: pd.DataFrame) -> str:
    """The trials as a markdown table: schedule, kappa, weight, verdict and regime, KL,
    the use of Z, the validity of free generations, the single-draw honest CE."""
    if df.empty:
        return "(no trial runs)"
    extra = [c for c in df.columns if c.startswith("sampled.")
             and c[len("sampled."):] not in ("training.kl_weight", "training.free_bits_bits",
                                            "training.free_bits", "training.kl_annealing.type")]
    header = ["trial", "annealing", "free bits (bits)", "kl_weight",
              *[c[len("sampled."):].rsplit(".", 1)[-1] for c in extra], "verdict", "regime",
              "KL (bits/token)", "use of Z (nats/token)", "valid", "CE prior (nats)", "ended"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for values in df.to_dict("records"):
        cells = [trial_label(values), values[ANNEALING],
                 _fmt(values[FREE_BITS]), _fmt(values[KL_WEIGHT]),
                 *[_fmt(values[c]) for c in extra], values["verdict"] or "-",
                 values.get("regime") or "-", _fmt(values["eval/kl_bits"]),
                 _fmt(values.get("eval/use_nats", math.nan)),
                 _fmt(values.get("eval/valid_rate", math.nan), ".3g"),
                 _fmt(values["eval/ce_prior_nats"]), _ended(values)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any, spec: str = ".4g") -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _ended(values: dict[str, Any]) -> str:
    if values["stopped_early"]:
        step = values["stopped_at_step"]
        if isinstance(step, float) and math.isnan(step):
            step = values["train/steps_done"]
        return f"stopped at step {_fmt(step, '.0f')} ({values['stop_reason']})"
    if values["status"] == "RUNNING":
        return "running"
    return values.get("outcome") or values["status"].lower()


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False, sharey=True)[0]
    return fig, list(axes)


def plot_collapse_map(df: pd.DataFrame, path: str | Path) -> Path:
    """Verdicts over (free bits in bits, kl_weight), log axes, one panel per annealing.

    Filled squares are trials that ran to the end, hollow ones were stopped early; the
    label under each is the final raw KL in bits per token.  Several trials at one point
    (other searched keys, seeds) are spread side by side.
    """
    points = df.dropna(subset=[FREE_BITS, KL_WEIGHT]) if not df.empty else df
    panels = sorted(points[ANNEALING].unique()) if not points.empty else ["-"]
    fig, axes = _figure(1.8 + 4.2 * len(panels), 4.8, len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        ax.set(xlabel="free bits kappa (bits per token)", title=f"KL annealing: {panel}")
        ax.grid(alpha=0.3, which="both")
        if points.empty:
            ax.text(0.5, 0.5, "no trial runs with kl_weight and free bits", ha="center",
                    transform=ax.transAxes)
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        for (x, y), group in points[points[ANNEALING] == panel].groupby([FREE_BITS, KL_WEIGHT]):
            for i, row in enumerate(group.to_dict("records")):
                shift = 2 ** (0.18 * (i - (len(group) - 1) / 2))
                color = VERDICT_COLORS.get(shown(row), "tab:gray")
                ax.scatter([x * shift], [y], s=260, marker="s", edgecolors=color, linewidths=2,
                           facecolors="none" if row["stopped_early"] else color)
                ax.annotate(_fmt(row["eval/kl_bits"], ".2g"), (x * shift, y),
                            textcoords="offset points", xytext=(0, -17), ha="center",
                            fontsize=7)
        ax.margins(0.25)
    axes[0].set_ylabel("kl_weight (beta)")
    present = [v for v in VERDICT_ORDER if v in set(shown_column(points))]
    handles = [axes[0].scatter([], [], s=80, marker="s", color=VERDICT_COLORS[v], label=v)
               for v in present]
    if handles:
        fig.legend(handles=handles, loc="outside right center", title="verdict")
    fig.suptitle("Collapse map\nfilled: ran to the end, hollow: stopped early; "
                 "label: final raw KL (bits/token)", fontsize=10)
    return save_figure(fig, path)


def representative_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One run per verdict: the one whose final raw KL is the verdict's median."""
    picks = []
    labels = shown_column(df)
    for verdict in [v for v in VERDICT_ORDER if v in set(labels)]:
        group = df[labels == verdict]
        kl = group["eval/kl_nats"].fillna(group["train/kl_nats"])
        picks.append(group.loc[(kl - kl.median()).abs().fillna(math.inf).idxmin()])
    return pd.DataFrame(picks)


def plot_kl_traces(client, df: pd.DataFrame, path: str | Path) -> Path:
    """Raw train KL (nats per token) against step of one run per verdict, with kappa."""
    fig, (ax,) = _figure(8.0, 4.4)
    ax.set(xlabel="step", ylabel="raw KL (nats per token)",
           title="KL(Q(Z|S) || P(Z)) of one run per verdict (dashed: free-bits kappa)")
    ax.grid(alpha=0.3)
    for row in representative_runs(df).to_dict("records") if not df.empty else []:
        color = VERDICT_COLORS.get(shown(row), "tab:gray")
        label = f"{shown(row)}: {trial_label(row)}"
        for key, style, name in (("train/kl_nats", "-", label),
                                 ("train/free_bits_nats", "--", None)):
            history = sorted(client.get_metric_history(row["run_id"], key),
                             key=lambda m: m.step)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], style,
                        color=color, label=name)
    if ax.get_legend_handles_labels()[0]:
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no KL history", ha="center", transform=ax.transAxes)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- report


def write_report(client, df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write the table (markdown, CSV), the collapse map and the KL traces to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "collapse_table.md", "csv": out / "trials.csv"}
    paths["table"].write_text(collapse_table(df) + "\n")
    df.to_csv(paths["csv"], index=False)
    paths["map"] = plot_collapse_map(df, out / "collapse_map.png")
    paths["kl_traces"] = plot_kl_traces(client, df, out / "kl_traces.png")
    log.info("collapse map of %d trials in %s", len(df), out)
    return paths


def summary_text(df: pd.DataFrame, paths: dict[str, Path], tracking_uri: str,
                 experiment: str, experiment_id: str | None = None,
                 view: str | None = None) -> str:
    """The console summary: table, verdict counts, file paths, the ``mlflow ui`` line
    and (given ``experiment_id``) the link to the runs table in the model-training view,
    opening saved view ``view`` (:func:`freetf.results.summary.save_sweep_view`) if given."""
    from freetf.tracking import runs_page_url

    counts = shown_column(df).value_counts()
    lines = [collapse_table(df), "",
             f"{len(df)} trials: " + (", ".join(f"{n} {v}" for v, n in counts.items())
                                      or "none"),
             f"collapse map:  {paths['map']}", f"KL traces:     {paths['kl_traces']}",
             f"table:         {paths['table']} (and {paths['csv'].name})",
             f"compare runs:  mlflow ui --backend-store-uri {tracking_uri}",
             f"               then open experiment '{experiment}' at http://127.0.0.1:5000"
             if experiment_id is None else
             f"               then open {runs_page_url(experiment_id, view=view)}"]
    return "\n".join(lines)
