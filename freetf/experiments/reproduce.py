"""Reproduce the paper's synthetic experiment (§4.1, Figure 4) as a measured table.

Train the synthetic task at several free-bits thresholds kappa (a Ray Tune grid, every
run in MLflow; or in-process where Ray is not installed, e.g. on a bare GPU box), then
measure each trained model with the Figure 4 protocol of :mod:`freetf.evaluation.synthetic_eval`
and write a markdown table, a figure and the sample groups: by default to the sweep's report
folder (``reports/<sweep name>/``; in-process and ``--merge``: ``reports/``), to ``docs/``
only when asked (``--out docs``), so that a smoke run never replaces the committed result.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from freetf.config import Config, flatten
from freetf.data.datasets import build_data
from freetf.evaluation.synthetic_eval import (
    figure4_metrics,
    figure4_row,
    render_groups,
    reproduces,
)
from freetf.tracking import tags
from freetf.training.checkpoint import load_model

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("reports")  # in-process and --merge; a sweep writes to its report folder
COLUMNS = [  # (key, header, format)
    ("kappa_bits", "κ (bits)", "{:.4g}"),
    ("seed", "seed", "{:d}"),
    ("kl_bits", "KL (bits/token)", "{:.3f}"),
    ("ce_gap", "CE gap prior−post. (nats)", "{:.3f}"),
    ("ce_prior", "honest CE (nats)", "{:.3f}"),
    ("excess_iw_nats", "honest bound above floor (nats)", "{:.3f}"),
    ("independent/position_spread", "pos. spread, indep. Z", "{:.1f}"),
    ("shared/position_spread", "pos. spread, shared Z", "{:.1f}"),
    ("independent/noise_overlap", "noise overlap, indep.", "{:.2f}"),
    ("shared/noise_overlap", "noise overlap, shared", "{:.2f}"),
    ("independent/valid_rate", "valid, indep.", "{:.2f}"),
    ("shared/valid_rate", "valid, shared", "{:.2f}"),
    ("verdict", "verdict", "{}"),
    ("regime", "Z carries", "{}"),
    ("reproduces", "paper's row", "{}"),
]
# Mean ± sd of these over the seeds of each kappa (the summary table).
SUMMARY = [key for key, _, _ in COLUMNS if key not in ("kappa_bits", "seed", "verdict",
                                                         "regime", "reproduces")]
# A sweep's judgement of each trial (freetf.results.analysis), kept in its row: the
# verdict against its seed's baseline, the regime (what Z carries), convergence, and the
# use of Z per class of tokens; the row's own per-run verdict stays as verdict_fixed.
JUDGED = {"verdict": "verdict", "regime": "regime", "eval/converged": "converged",
          "cost_nats": "cost_nats", "eval/excess_nats": "excess_nats",
          "eval/excess_iw_nats": "excess_iw_nats", "eval/floor_nats": "floor_nats",
          "eval/use_nats": "use_nats",
          "eval/use_position_nats": "use_position_nats",
          "eval/use_noise_nats": "use_noise_nats"}


def measure(checkpoint: str | Path, groups: int, per_group: int, seed: int = 0,
            device: str | torch.device = "cpu") -> tuple[dict[str, Any], str]:
    """Figure 4 metrics, KL and CE gap of one trained checkpoint, and its sample groups."""
    from freetf.training.evaluate import evaluate

    model, cfg, state = load_model(checkpoint, device)
    torch.manual_seed(seed)
    diag = evaluate(model, build_data(cfg), cfg, torch.device(device),
                    cfg.training.free_bits_nats)
    latent = cfg.model.has_latent
    row: dict[str, Any] = {
        "kappa_bits": cfg.training.free_bits_nats / math.log(2) if latent else None,
        "seed": cfg.training.seed, "latent_dim": cfg.model.latent_dim,
        "steps": state.get("step"),
        "mapper": cfg.model.mapper if latent else None,
        "options": ", ".join(changed_knobs(cfg)) if latent else "",
        "kl_bits": diag.get("eval/kl_bits"), "ce_gap": diag.get("eval/ce_gap_nats"),
        "ce_prior": diag["eval/ce_prior_nats"], "verdict": diag.get("eval/verdict"),
        "mi_nats": diag.get("eval/mutual_info_nats"), "active_bits": diag.get("eval/active_bits"),
    }
    row.update(figure4_metrics(model, groups=groups, per_group=per_group, seed=seed))
    row["reproduces"] = reproduces(row["kappa_bits"], row)
    return row, render_groups(model, groups=1, per_group=8, seed=seed)


# The options the H = 16 study varies (docs/synthetic_h16.md): named in the header
# when they differ from their defaults.
KNOBS = ("model.mapper", "model.post_sampler_init", "model.post_sampler_init_std",
         "model.readout_init_std", "optimizer.post_sampler_lr_mult", "training.kl_annealing.type",
         "training.free_bits_schedule.type", "training.free_bits_per")


def changed_knobs(cfg: Config) -> list[str]:
    """``key=value`` for each of :data:`KNOBS` where ``cfg`` differs from the defaults."""
    ours, default = flatten(cfg.to_dict()), flatten(Config().to_dict())
    return [f"{key}={ours[key]}" for key in KNOBS if ours.get(key) != default.get(key)]


def row_name(row: dict[str, Any]) -> str:
    return ("baseline" if row["kappa_bits"] is None else f"{row['kappa_bits']:g} bits") + \
        f", seed {row['seed']}"


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The baselines first, then by options (the study's knobs), kappa and seed."""
    return sorted(rows, key=lambda r: (r["kappa_bits"] is not None, r.get("options", ""),
                                       r["kappa_bits"] or 0.0, r["seed"]))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (options, kappa), the baseline first: seeds, how many reproduce the
    paper's row, and the mean and sample sd of every measured column over the seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in sort_rows(rows):
        kappa = None if row["kappa_bits"] is None else round(math.log2(row["kappa_bits"]), 6)
        groups.setdefault((row.get("options", ""), kappa), []).append(row)
    out = []
    for (options, _), members in groups.items():
        kappa = members[0]["kappa_bits"]
        verdicts = [r.get("reproduces") for r in members]
        summary: dict[str, Any] = {
            "options": options, "kappa_bits": kappa, "paper_row": figure4_row(kappa),
            "seeds": len(members), "regimes": regime_counts(members),
            "reproduced": (sum(v is True for v in verdicts)
                           if figure4_row(kappa) is not None else None)}
        for key in SUMMARY:
            values = [float(r[key]) for r in members
                      if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
            summary[key] = (statistics.fmean(values) if values else math.nan,
                            statistics.stdev(values) if len(values) > 1 else math.nan)
        out.append(summary)
    return out


def regime_counts(rows: list[dict[str, Any]]) -> str:
    """What Z carries over the seeds' converged runs, most frequent first, then the runs
    that had not converged: "position 2, nothing 1, 1 unconverged"; "–" where no row has
    a regime (in-process runs, baselines)."""
    regimes = [r for r in rows if r.get("regime")]
    unconverged = sum(r.get("converged") == 0.0 for r in regimes)
    counts = Counter(r["regime"] for r in regimes if r.get("converged") != 0.0)
    parts = [f"{name} {n}" for name, n in sorted(counts.items(),
                                                  key=lambda item: (-item[1], item[0]))]
    return ", ".join(parts + ([f"{unconverged} unconverged"] if unconverged else [])) or "–"


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The summary (:func:`summarise`) as markdown: "mean ± sd" cells."""
    heads = {key: head for key, head, _ in COLUMNS}
    fmts = {key: fmt for key, _, fmt in COLUMNS}
    summaries = summarise(rows)
    with_options = len({r["options"] for r in summaries if r["kappa_bits"] is not None}) > 1
    first = ["options"] if with_options else []
    lines = ["| " + " | ".join(first + ["κ (bits)", "paper: Z carries", "seeds reproducing",
                                        "here: Z carries (seeds)"]
                               + [heads[k] for k in SUMMARY]) + " |",
             "|" + "---|" * (len(first) + 4 + len(SUMMARY))]
    for row in summaries:
        kappa = "baseline" if row["kappa_bits"] is None else f"{row['kappa_bits']:.4g}"
        done = ("–" if row["reproduced"] is None
                else f"{row['reproduced']}/{row['seeds']}")
        cells = ([row["options"] or "defaults"] if with_options else []) + [
            kappa, row["paper_row"] or "–", done, row["regimes"]]
        for key in SUMMARY:
            mean, sd = row[key]
            cells.append("–" if mean != mean else fmts[key].format(mean) + (
                "" if sd != sd else " ± " + fmts[key].format(sd)))
        lines.append("| " + " | ".join(cells) + " |")
    if not any(r["kappa_bits"] is None for r in rows):
        lines.append("\n(no baseline trained in this run)")
    return "\n".join(lines)


def reproduce_in_process(base: Config, kappas_bits: tuple[float, ...], seeds: tuple[int, ...],
                         groups: int, per_group: int, device: str,
                         baseline: bool = True) -> tuple[list, dict]:
    """Train and measure every (kappa, seed) one after another, without Ray or MLflow;
    with ``baseline``, first the model without latent (``latent_dim = 0``) at each seed."""
    from freetf.training.context import TrainContext
    from freetf.training.loop import train_loop

    runs = [(None, seed) for seed in seeds] if baseline else []
    runs += [(kappa, seed) for kappa in kappas_bits for seed in seeds]
    rows, samples = [], {}
    for kappa, seed in runs:
        name = "baseline" if kappa is None else f"k{kappa:g}"
        changes = {"training.seed": seed, "tracking.mlflow.enabled": False,
                   "checkpoint.dir": f"{base.checkpoint.dir}/{name}-s{seed}"}
        changes.update({"model.latent_dim": 0} if kappa is None
                       else {"training.free_bits_bits": kappa})
        cfg = base.replace(changes)
        start = time.perf_counter()
        result = train_loop(cfg, TrainContext(device=torch.device(device)))
        row, text = measure(result.checkpoint, groups, per_group, seed, device)
        row["train_s"] = time.perf_counter() - start
        rows.append(row)
        samples[row_name(row)] = text
        log.info("%s: %s", row_name(row), json.dumps(row, default=str))
    return rows, samples


def reproduce_with_tune(spec: str | Path, overrides: list[str], resume: bool, groups: int,
                        per_group: int) -> tuple[list, dict, Any]:
    """The Ray Tune grid over kappa (``freetf/configs/reproduce_synthetic.yaml``), then measure."""
    from freetf.sweeps.sweep import load_sweep, run_sweep
    from freetf.tracking import mlflow_client

    result = run_sweep(load_sweep(spec, overrides), resume=resume)
    client = mlflow_client(result.tracking_uri)
    rows, samples = [], {}
    judged = result.runs.set_index("run_id")
    for run_id in result.runs["run_id"]:
        checkpoint = client.get_run(run_id).data.tags.get(tags.CHECKPOINT)
        if not checkpoint or not Path(checkpoint).exists():
            log.warning("trial run %s has no checkpoint; skipped", run_id)
            continue
        row, text = measure(checkpoint, groups, per_group)
        row["run_id"] = run_id
        row.update(judgement(judged.loc[run_id], row))
        rows.append(row)
        samples[row_name(row)] = text
    return sort_rows(rows), samples, result


def judgement(trial, row: dict[str, Any]) -> dict[str, Any]:
    """The sweep's judgement of a trial (:data:`JUDGED`, from its row of the trials table
    of :class:`freetf.results.analysis.SweepAnalysis`), its own verdict kept as
    ``verdict_fixed``; NaN and "" become None (JSON null)."""
    out: dict[str, Any] = {"verdict_fixed": row.get("verdict")}
    for column, key in JUDGED.items():
        value = trial.get(column)
        if isinstance(value, float) and math.isnan(value) or value == "":
            value = None
        out[key] = float(value) if isinstance(value, (int, float)) and not isinstance(
            value, bool) else value
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            ok = value is not None and not (isinstance(value, float) and math.isnan(value))
            if key == "kappa_bits" and value is None:
                cells.append("baseline")
            elif key == "reproduces":
                cells.append({True: "yes", False: "no"}.get(value, "–"))
            else:
                cells.append(fmt.format(value) if ok else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], samples: dict[str, str], path: Path) -> Path:
    """Quantities per kappa (independent vs shared Z) and one shared-Z group per kappa."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 9 if samples else 4.5))  # no sample groups: no text panel
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.2]) if samples else fig.add_gridspec(1, 3)
    latent = [r for r in rows if r["kappa_bits"] is not None]
    kappas = [r["kappa_bits"] for r in latent]
    for i, (key, title) in enumerate([("position_spread", "target position spread in a group"),
                                      ("noise_overlap", "noise overlap in a group"),
                                      ("valid_rate", "valid sequences")]):
        ax = fig.add_subplot(grid[0, i])
        for mode, style in (("independent", "o"), ("shared", "s")):
            ax.plot(kappas, [r[f"{mode}/{key}"] for r in latent], style, label=f"{mode} Z",
                    alpha=0.7)
        for r in rows:  # the baseline's level, one line per seed
            level = r[f"independent/{key}"] if r["kappa_bits"] is None else math.nan
            if level == level:
                ax.axhline(level, color="grey", lw=0.8, ls=":")
        if kappas:  # baselines alone (a merge of their files): no kappa axis to log-scale
            ax.set_xlim(min(kappas) / 2, max(kappas) * 2)
            ax.set_xscale("log", base=2)
        ax.set_xlabel("free bits κ (bits per token)")
        ax.set_title(title)
        ax.legend()
    if samples:
        text_ax = fig.add_subplot(grid[1, :])
        text_ax.axis("off")
        blocks = []
        for name, text in samples.items():
            shared = [line for line in text.splitlines() if not line.startswith("--")][:4]
            blocks.append(f"{name}, one shared Z:\n" + "\n".join(shared))
        text_ax.text(0, 1, "\n\n".join(blocks), family="monospace", fontsize=7, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def located_section(analysis, report: dict[str, Path], out_dir: Path, name: str) -> str:
    """The sweep's located boundaries (its summary lines: kappa_c, kappa_l and the regime
    onsets with their intervals) as markdown, its phase diagram and boundaries over
    training copied beside the table as ``<name>_phase.png`` / ``<name>_over_training.png``.
    "" without boundaries (a grid sweep, in-process runs)."""
    if analysis is None or not analysis.boundaries:
        return ""
    text = ("## Where what Z carries changes along kappa\n\n"
            "The sweep's boundaries, fitted on its converged trials against their baselines "
            "(95% intervals; docs/phase_diagram.md):\n\n```\n"
            + "\n".join(analysis.summary_lines()) + "\n```\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, title in (("phase", "phase diagram"), ("over_training", "boundaries over training")):
        source = report.get(key)
        if source is not None and Path(source).is_file():
            shutil.copyfile(source, out_dir / f"{name}_{key}.png")
            text += f"\n![{title}]({name}_{key}.png)\n"
    return text


def write_outputs(rows: list[dict[str, Any]], samples: dict[str, str], out_dir: Path,
                  name: str, header: str, located: str = "") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = plot(rows, samples, out_dir / f"{name}.png")
    sample_text = "\n\n".join(f"### {k}\n\n```\n{v}\n```" for k, v in samples.items())
    table = out_dir / f"{name}.md"
    table.write_text(f"{header}\n\n## Per kappa, over seeds (mean ± sd)\n\n"
                     f"{summary_table(rows)}\n\n" + (f"{located}\n" if located else "")
                     + f"## Every run\n\n{markdown_table(rows)}\n\n"
                     f"![figure]({figure.name})\n\n## Sample groups\n\n{sample_text}\n")
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=2, default=str))
    return {"table": table, "figure": figure, "json": out_dir / f"{name}.json"}


def row_fits(rows: list[dict[str, Any]], confidence: float = 0.95) -> list[str]:
    """The five boundaries (kappa_c, kappa_l and the regime onsets) fitted on the rows'
    converged Free Transformer runs, each seed's offset integrated out, over the range of
    the rows' kappas; one line per boundary and option set, "" options first.  Rows
    without a sweep's judgement (no regime) give none."""
    import pandas as pd

    from freetf.evaluation import verdicts
    from freetf.results.analysis import regime_fits
    from freetf.results.columns import BOUNDARY_LABELS

    judged = [r for r in rows if r["kappa_bits"] is not None and r.get("regime")
              and r.get("verdict") and r.get("converged") != 0.0]
    lines = []
    for options in sorted({r.get("options", "") for r in judged}):
        own = [r for r in judged if r.get("options", "") == options]
        xs = [math.log2(r["kappa_bits"]) for r in own]
        if len(set(xs)) < 2:
            continue
        seeds = [r["seed"] for r in own]
        fits = {kind: verdicts.fit_boundary(kind, xs, [r["verdict"] == name for r in own],
                                            min(xs), max(xs), confidence, groups=seeds)
                for kind, name in (("collapse", "collapsed"), ("leak", "leaking"))}
        fits |= regime_fits(pd.DataFrame(own), xs, min(xs), max(xs), confidence)
        lines += [f"{BOUNDARY_LABELS[kind]:24s} at {options or 'defaults'}: {fit.text()}"
                  for kind, fit in fits.items()]
    return lines


def merge(files: list[Path], out_dir: Path, name: str, note: str = ""
          ) -> tuple[list[dict], dict[str, Path]]:
    """Rewrite the table and figure from the rows of earlier runs (their JSON files), and
    the boundaries fitted on all their judged rows together (:func:`row_fits`).
    -> (the merged rows, the files written)."""
    rows = sort_rows([row for path in files for row in json.loads(Path(path).read_text())])
    header = ("# Synthetic task (§4.1): what Z carries as free bits grow\n\n"
              f"Merged from {', '.join(Path(f).name for f in files)} (their sample groups "
              "are in their own tables)." + (f"\n\n{note}" if note else ""))
    fits = row_fits(rows)
    located = ("## Where what Z carries changes along kappa, all runs together\n\n"
               "Fitted on the converged runs of every file, each seed's offset integrated "
               "out (95% intervals; docs/phase_diagram.md):\n\n```\n" + "\n".join(fits)
               + "\n```\n") if fits else ""
    return rows, write_outputs(rows, {}, out_dir, name, header, located)
