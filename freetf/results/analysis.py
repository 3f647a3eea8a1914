"""A sweep's trials against their baselines: verdicts of converged trials and the boundaries.

From the runs of a sweep (:func:`freetf.results.report.collect_runs`, one row per trial),
with its baseline trials (``model.latent_dim = 0``, one per seed and baseline setting):

- each Free Transformer trial gets its *cost* (``cost_nats``: single-draw honest CE minus
  its seed's baseline, a diagnostic) and its verdict (``verdict``: unconverged /
  collapsed / used / leaking, from its own intervals against fixed tolerances,
  :mod:`freetf.evaluation.verdicts`); the per-trial fixed-threshold verdict stays in
  ``verdict_fixed``;
- per setting of the other searched keys, the collapse onset kappa_c and the leak onset
  kappa_l with their credible intervals (:func:`freetf.evaluation.verdicts.fit_boundary`),
  and on the synthetic task the regime onsets of Figure 4 (kappa_pos, kappa_noise,
  kappa_broken: :func:`regime_fits`) by the same fit;
- :func:`write_analysis` writes ``boundaries.md``, ``boundaries.json``, ``verdicts.csv``
  and the phase diagram (:mod:`freetf.results.phase`) into the sweep's report folder.

Baselines are the reference: one that has not converged (still moving, or on the
synthetic task above the exact floor or generating invalid sequences) marks the sweep's
boundaries ``unconverged`` in every table, line and MLflow tag.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from freetf.evaluation import verdicts
from freetf.evaluation.verdicts import BoundaryFit, Outcome, Tolerances
from freetf.results import over_training
from freetf.results.columns import BOUNDARY_LABELS, BOUNDARY_NAMES, log2_range, x_column
from freetf.tracking.runs import VERDICT_METRIC, VERDICT_TAG, verdict_code
from freetf.tracking.tags import BOUNDARY_CONVERGED, KAPPA_C, KAPPA_L, REGIME, VERDICT_FIXED

log = logging.getLogger(__name__)

NOT_SETTING = ("training.seed", "model.latent_dim")


@dataclass
class SettingBoundaries:
    setting: dict[str, Any]  # the other searched keys' values
    collapse: BoundaryFit  # kappa_c: P(collapsed) falls through 1/2
    leak: BoundaryFit  # kappa_l: P(leaking) rises through 1/2
    # kappa_pos, kappa_noise, kappa_broken (synthetic task: trials with a regime)
    regimes: dict[str, BoundaryFit] = field(default_factory=dict)

    def fits(self) -> dict[str, BoundaryFit]:
        """Every boundary fitted, by kind: collapse, leak, then the regime onsets."""
        return {"collapse": self.collapse, "leak": self.leak, **self.regimes}

    @property
    def label(self) -> str:
        return ",".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}"
                        for k, v in sorted(self.setting.items())) or "all"


@dataclass
class SweepAnalysis:
    trials: pd.DataFrame  # the runs with cost_nats, verdict, verdict_fixed
    tolerances: Tolerances
    key: str
    boundaries: list[SettingBoundaries] = field(default_factory=list)
    baselines: int = 0  # finished baseline trials
    unconverged_baselines: list[str] = field(default_factory=list)  # their run names
    # kappa_c(t), kappa_l(t): freetf.results.over_training's rows with the setting's label
    over_training: pd.DataFrame | None = None

    @property
    def converged(self) -> bool:
        return self.baselines > 0 and not self.unconverged_baselines

    def summary_lines(self) -> list[str]:
        """The boundaries first, then what they were judged with."""
        mark = "" if self.converged else " [UNCONVERGED baselines]"
        lines = []
        for b in self.boundaries:
            for kind, fit in b.fits().items():
                lines.append(f"{BOUNDARY_LABELS[kind]:24s} at {b.label}: {fit.text()}{mark}")
        if self.over_training is not None and not self.over_training.empty:
            for label, part in self.over_training.groupby("label"):
                done = over_training.estimate_converged(part)
                lines.append(f"over training at {label}: " + ", ".join(
                    f"{BOUNDARY_NAMES[kind]} {'settled' if ok else 'still moving'}"
                    for kind, ok in done.items()) + " (last 3 evaluations within 0.5 log2)")
        if self.unconverged_baselines:
            lines.append(f"baselines not converged: {', '.join(self.unconverged_baselines)}"
                         " (train longer: training.max_steps)")
        t = self.tolerances
        lines.append(f"rule: used = use interval above {t.use_nats:g} nats/token; leaking = "
                     f"valid < {t.broken_valid:g} or {t.leak_valid:g} below the baseline's")
        return lines


def regime_fits(group: pd.DataFrame, x: pd.Series, low: float, high: float,
                confidence: float) -> dict[str, BoundaryFit]:
    """kappa_pos, kappa_noise, kappa_broken from the trials of ``group``
    (:data:`freetf.evaluation.verdicts.REGIME_ONSETS`); {} unless every trial has a
    regime (the synthetic task's per-class measures)."""
    regimes = list(group["regime"].fillna("").astype(str))
    if not regimes or "" in regimes:
        return {}
    seeds = list(group["seed"])
    return {name: verdicts.fit_boundary(name, list(x), verdicts.reaches(name, regimes),
                                        low, high, confidence, groups=seeds)
            for name in verdicts.REGIME_ONSETS}


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def analyse(df: pd.DataFrame, key: str = "training.free_bits_bits",
            tolerances: Tolerances | None = None, confidence: float = 0.95,
            range_log2: tuple[float, float] | None = None,
            histories: pd.DataFrame | None = None) -> SweepAnalysis:
    """Verdicts against the baselines and the boundaries (module docstring); with the
    trials' ``histories`` (:func:`freetf.results.report.collect_histories`), the
    boundaries at every evaluation step too (``over_training``)."""
    tol = tolerances or Tolerances()
    df = df.copy()
    df["verdict_fixed"] = df.get("verdict", pd.Series(dtype=object))
    df["cost_nats"] = math.nan
    df["regime"] = ""
    sampled = [c for c in df.columns if c.startswith("sampled.")]
    settings = [c for c in sampled if c[len("sampled."):] not in (key, *NOT_SETTING)]
    own = [c for c in settings if verdicts.changes_baseline(c[len("sampled."):])]
    ended = df["eval/ce_prior_nats"].notna() & ((df["status"] == "FINISHED")
                                                | df["stopped_early"].astype(bool))
    is_base = (df["model_kind"] == "baseline") & ended
    outcomes = {i: Outcome.from_metrics(row) for i, row in df.iterrows()}
    groups: dict[tuple, dict[float, Outcome]] = {}
    for i in df.index[is_base]:
        groups.setdefault(tuple(df.loc[i, own]), {})[df.loc[i, "seed"]] = outcomes[i]
    df.loc[is_base, "verdict"] = "baseline"
    result = SweepAnalysis(df, tol, key, baselines=int(is_base.sum()))
    result.unconverged_baselines = [str(df.loc[i, "run_name"]) for i in df.index[is_base]
                                    if not verdicts.baseline_converged(outcomes[i], tol)]
    for i in df.index[ended & ~is_base & (df["model_kind"] != "baseline")]:
        baseline = groups.get(tuple(df.loc[i, own]), {}).get(df.loc[i, "seed"])
        if baseline is not None:
            df.loc[i, "cost_nats"] = verdicts.cost_nats(outcomes[i], baseline)
            df.loc[i, "verdict"] = verdicts.classify(outcomes[i], baseline, tol)
            df.loc[i, "regime"] = verdicts.regime(outcomes[i], tol)
    judged = df[df["cost_nats"].notna() & (df["verdict"] != verdicts.UNCONVERGED)]
    if judged.empty:
        return result
    x = x_column(judged, key)
    low, high = range_log2 or (float(x.min()), float(x.max()))
    if not low < high:
        return result
    for values, group in judged.groupby(settings, dropna=False) if settings else [((), judged)]:
        values = values if isinstance(values, tuple) else (values,)
        gx = list(x_column(group, key))
        fits = {kind: verdicts.fit_boundary(kind, gx, list(group["verdict"] == name),
                                            low, high, confidence, groups=list(group["seed"]))
                for kind, name in (("collapse", "collapsed"), ("leak", "leaking"))}
        setting = {c[len("sampled."):]: v for c, v in zip(settings, values, strict=True)}
        result.boundaries.append(SettingBoundaries(
            setting, fits["collapse"], fits["leak"],
            regime_fits(group, x_column(group, key), low, high, confidence)))
        if histories is not None and not histories.empty:
            own_values = tuple(v for c, v in zip(settings, values, strict=True) if c in own)
            # (.eq(own_values) would read the tuple as one value per row)
            bases = df[is_base & df[own].apply(tuple, axis=1).map(own_values.__eq__)] \
                if own else df[is_base]
            probes = df[df["cost_nats"].notna() & df.index.isin(group.index)]
            members = pd.concat([bases, probes])
            over = over_training.boundaries_over_training(
                histories, members, x_column(members, key), tol, confidence, (low, high))
            over["label"] = result.boundaries[-1].label
            parts = [result.over_training] if result.over_training is not None else []
            result.over_training = pd.concat([*parts, over], ignore_index=True)
    return result


def boundaries_table(analysis: SweepAnalysis) -> str:
    header = ["setting", "kappa_c (bits)", "kappa_c interval", "kappa_l (bits)",
              "kappa_l interval", "trials"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in analysis.boundaries:
        c, lk = b.collapse.texts(), b.leak.texts()
        lines.append(f"| {b.label} | {c[0]} | [{c[1]}, {c[2]}] | {lk[0]} | [{lk[1]}, {lk[2]}] "
                     f"| {b.collapse.trials} |")
    return "\n".join(lines)


def boundaries_json(analysis: SweepAnalysis) -> list[dict[str, Any]]:
    rows = []
    for b in analysis.boundaries:
        row: dict[str, Any] = {"setting": b.setting, "label": b.label}
        for kind, fit in b.fits().items():
            est, low, high = fit.bits
            row[BOUNDARY_NAMES[kind]] = {"bits": est, "low_bits": low, "high_bits": high,
                         "confidence": fit.confidence, "trials": fit.trials,
                         "below_range": fit.below_range, "above_range": fit.above_range}
        row["converged"] = analysis.converged
        rows.append(row)
    return rows


def write_analysis(analysis: SweepAnalysis, out_dir: str | Path) -> dict[str, Path]:
    """``boundaries.md`` / ``.json``, ``verdicts.csv`` and ``phase_diagram.png``."""
    from freetf.results.phase import plot_phase_diagram

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"boundaries": out / "boundaries.md", "boundaries_json": out / "boundaries.json",
             "verdicts": out / "verdicts.csv"}
    text = "\n".join([boundaries_table(analysis), "", *analysis.summary_lines()])
    paths["boundaries"].write_text(text + "\n")
    paths["boundaries_json"].write_text(json.dumps(
        {"tolerances": asdict(analysis.tolerances), "converged": analysis.converged,
         "unconverged_baselines": analysis.unconverged_baselines,
         "boundaries": boundaries_json(analysis)}, indent=2, default=str) + "\n")
    analysis.trials.to_csv(paths["verdicts"], index=False)
    if analysis.over_training is not None and not analysis.over_training.empty:
        paths["over_training_csv"] = out / "boundaries_over_training.csv"
        analysis.over_training.to_csv(paths["over_training_csv"], index=False)
        paths["over_training"] = over_training.plot_over_training(
            analysis.over_training[analysis.over_training["label"]
                                   == analysis.over_training["label"].iloc[0]],
            out / "boundaries_over_training.png", analysis.over_training["label"].iloc[0])
    paths["phase"] = plot_phase_diagram(analysis, out / "phase_diagram.png")
    return paths


def analyse_sweep(runs: pd.DataFrame, sweep, base,
                  histories: pd.DataFrame | None = None) -> SweepAnalysis:
    """:func:`analyse` with the sweep's key, tolerances and range."""
    key = sweep.boundary.key
    dims = {d.key: d for d in sweep.space}
    range_log2 = None
    if sweep.search.method == "boundary":
        range_log2 = log2_range(dims[key].values)
    elif key not in dims and "training.free_bits" in dims:
        key = "training.free_bits"
    return analyse(runs, key, Tolerances.from_config(base.diagnostics),
                   sweep.boundary.confidence, range_log2, histories)


TAGGED = {"collapse": KAPPA_C, "leak": KAPPA_L}  # the boundaries also a parent run's tag


def mlflow_records(analysis: SweepAnalysis) -> tuple[dict, dict]:
    """(parent, children) for :func:`freetf.tracking.log_sweep_analysis`."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    single = len(analysis.boundaries) == 1
    for b in analysis.boundaries:
        prefix = "boundary/" if single else f"boundary/{_metric_safe(b.label)}/"
        for kind, fit in b.fits().items():
            name, (est, low, high) = BOUNDARY_NAMES[kind], fit.bits
            metrics.update({f"{prefix}{name}_bits": est, f"{prefix}{name}_low_bits": low,
                            f"{prefix}{name}_high_bits": high})
            if kind in TAGGED:
                tags[TAGGED[kind] + ("" if single else f".{b.label}")] = (
                    fit.text() + ("" if analysis.converged else " [unconverged baselines]"))
    metrics["boundary/converged"] = 1.0 if analysis.converged else 0.0
    steps = []  # kappa(t): the parent's boundary_t/* metrics, one point per evaluation
    if single and analysis.over_training is not None:
        for row in analysis.over_training.itertuples():
            name = BOUNDARY_NAMES[row.kind]
            steps += [(f"boundary_t/{name}_bits", 2.0 ** row.median_log2, row.step),
                      (f"boundary_t/{name}_low_bits", 2.0 ** row.low_log2, row.step),
                      (f"boundary_t/{name}_high_bits", 2.0 ** row.high_log2, row.step)]
    tags[BOUNDARY_CONVERGED] = str(analysis.converged).lower()
    children = {}  # the verdict as a tag and as eval/verdict_code (freetf.tracking)
    for row in analysis.trials.to_dict("records"):
        if isinstance(row.get("cost_nats"), float) and math.isfinite(row["cost_nats"]):
            children[row["run_id"]] = {
                "metrics": {"eval/cost_nats": row["cost_nats"],
                            VERDICT_METRIC: verdict_code(row["verdict"])},
                "tags": {VERDICT_TAG: row["verdict"],
                         VERDICT_FIXED: row["verdict_fixed"],
                         **({REGIME: row["regime"]} if row.get("regime") else {})}}
        elif row.get("verdict") == "baseline":
            children[row["run_id"]] = {"metrics": {VERDICT_METRIC: verdict_code("baseline")},
                                       "tags": {VERDICT_TAG: "baseline"}}
    return {"metrics": metrics, "tags": tags, "steps": steps}, children


def _metric_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in text)
