"""The baseline against the Free Transformer across free bits, on a real corpus.

``freetf compare`` (``freetf/configs/compare_code.yaml``): a Ray Tune sweep of the
baseline (``model.latent_dim = 0``) and the Free Transformer at kappa in {1/8, 1/4, 1/2,
1, 2, 4} bits, three seeds each, on Python's standard-library source (prepared here if
the folder is missing), every trial an MLflow child run of the sweep's parent run.  The
sweep is :func:`freetf.sweeps.sweep.run_sweep` (a boundary search whose probes are all
placed at the start: a fixed grid plus the baselines); this module adds:

- :func:`compare_rows`: per kappa, over the seeds, first whether the decoder uses Z at
  all (the shuffle gain ``eval/use_nats`` and how many seeds' use interval lies above
  ``use_tol_nats``), then the honest bits per byte (Z from the prior) with its mean,
  sample standard deviation and t-interval, the posterior bits per byte, the KL, and the
  paired difference to the baseline of the same seed (same data order, same validation
  batches) with its t-interval.  A claim about a kappa where no seed uses Z is
  ``untested``: a decoder that ignores Z is a baseline, whatever its numbers;
- the comparison with the independent replication's trend (honest NLL per kappa, as a
  relative increase over its baseline, since units differ) and with the paper's claim
  (the Free Transformer no worse than the baseline at kappa <= 1 bit);
- :func:`write_compare`: ``compare.md`` / ``.csv`` / ``.json`` and ``compare.png`` in the
  sweep's report folder (``reports/<sweep name>/``, or ``--out``; never ``docs/`` unless
  asked), logged to the parent run under ``report/``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

BPB_PRIOR, BPB_POSTERIOR, KL_BITS = "eval/bpb_prior", "eval/bpb_posterior", "eval/kl_bits"
USE, USE_LOW = "eval/use_nats", "eval/use_low_nats"  # the decoder's use of Z
USE_TOL_NATS = 0.002  # diagnostics.use_tol_nats: a seed uses Z when its interval is above
# The independent replication's honest NLL (Z from the prior) per kappa in bits; None is
# the baseline.  Compared as a relative increase over its baseline (its units differ).
REPLICATION_NLL = {None: 1.510, 0.125: 1.559, 0.5: 1.664, 1.0: 1.819, 2.0: 2.242, 4.0: 3.379}
CLAIM_MAX_KAPPA_BITS = 1.0  # the paper: no worse than the baseline at kappa <= 1 bit
# The corpus prepared when the config's data folder is missing (freetf prepare stdlib).
STDLIB_RECIPE = {"inputs": ("stdlib",), "tokenizer": "bpe", "vocab_size": 4096}


# ----------------------------------------------------------------------------- statistics


def interval(values: list[float], confidence: float = 0.95) -> dict[str, float]:
    """n, mean, sample sd (ddof 1) and the Student-t interval of the mean."""
    from scipy import stats

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    mean = sum(xs) / n if n else math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def claim_verdict(delta: dict[str, float]) -> str:
    """The paired difference FT - baseline (bits/byte): ``better`` if its interval lies
    below 0, ``worse`` if above, ``no difference`` if it holds 0 (or is unknown)."""
    if delta["high"] < 0:
        return "better"
    if delta["low"] > 0:
        return "worse"
    return "no difference"


def compare_rows(trials: pd.DataFrame, confidence: float = 0.95,
                 use_tol_nats: float = USE_TOL_NATS) -> list[dict[str, Any]]:
    """One row for the baseline, then one per kappa (ascending), from the sweep's runs.

    ``trials``: :func:`freetf.results.report.collect_runs`'s table (``model_kind``,
    ``free_bits_bits``, ``seed``, ``status`` and the eval metrics).  Only finished trials
    count; a Free Transformer trial's difference needs its seed's baseline.
    """
    done = trials[(trials["status"] == "FINISHED") & trials[BPB_PRIOR].notna()]
    base = done[done["model_kind"] == "baseline"]
    base_by_seed = dict(zip(base["seed"], base[BPB_PRIOR], strict=True))
    base_mean = interval(list(base[BPB_PRIOR]), confidence)["mean"]
    rep_base = REPLICATION_NLL[None]
    rows = [_row(None, base, confidence, None)]
    ft = done[done["model_kind"] != "baseline"]
    for kappa, group in sorted(ft.groupby("free_bits_bits"), key=lambda kv: kv[0]):
        deltas = [v - base_by_seed[s] for s, v in zip(group["seed"], group[BPB_PRIOR],
                                                     strict=True) if s in base_by_seed]
        row = _row(float(kappa), group, confidence, interval(deltas, confidence),
                   use_tol_nats)
        row["relative_increase"] = row["bpb_prior"]["mean"] / base_mean - 1
        rep = _replication(float(kappa))
        row["replication_relative_increase"] = rep / rep_base - 1 if rep is not None \
            else math.nan
        rows.append(row)
    rows[0].update({"relative_increase": 0.0, "replication_relative_increase": 0.0})
    return rows


def _replication(kappa: float) -> float | None:
    return next((v for k, v in REPLICATION_NLL.items()
                 if k is not None and math.isclose(k, kappa, rel_tol=1e-6)), None)


def _row(kappa: float | None, group: pd.DataFrame, confidence: float,
         delta: dict[str, float] | None, use_tol_nats: float = USE_TOL_NATS
         ) -> dict[str, Any]:
    row: dict[str, Any] = {
        "kappa_bits": kappa, "seeds": sorted(int(s) for s in group["seed"]),
        "bpb_prior": interval(list(group[BPB_PRIOR]), confidence),
        "bpb_posterior": interval(list(group[BPB_POSTERIOR]), confidence),
        "kl_bits": interval(list(group[KL_BITS]), confidence) if kappa is not None
        else interval([], confidence),
        "per_seed": {int(s): float(v) for s, v in zip(group["seed"], group[BPB_PRIOR],
                                                      strict=True)},
    }
    if kappa is not None:
        use = group[USE] if USE in group else pd.Series(dtype=float)
        low = group[USE_LOW] if USE_LOW in group else pd.Series(dtype=float)
        row["use_nats"] = interval(list(use), confidence)
        row["used_seeds"] = int((low > use_tol_nats).sum())
    if delta is not None:
        row["delta_bpb"] = delta
        if kappa <= CLAIM_MAX_KAPPA_BITS + 1e-9:
            row["claim"] = (claim_verdict(delta) if row["used_seeds"]
                            else "untested: Z unused")
    return row


# ----------------------------------------------------------------------------- outputs


def _pm(stat: dict[str, float], digits: int = 3) -> str:
    if not math.isfinite(stat["mean"]):
        return "–"
    sd = f" ± {stat['sd']:.{digits}f}" if math.isfinite(stat["sd"]) else ""
    return f"{stat['mean']:.{digits}f}{sd}"


def _ci(stat: dict[str, float], digits: int = 3) -> str:
    if not math.isfinite(stat["low"]):
        return "–"
    return f"[{stat['low']:.{digits}f}, {stat['high']:.{digits}f}]"


def _pct(value: float) -> str:
    return f"{100 * value:+.1f}%" if math.isfinite(value) else "–"


def markdown_table(rows: list[dict[str, Any]], confidence: float = 0.95) -> str:
    header = ["κ (bits)", "seeds", "seeds using Z", "use of Z (nats/token)",
              "honest bits/byte (Z ~ prior)", f"{confidence:.0%} t-interval",
              "posterior bits/byte", "KL (bits/token)", "Δ vs baseline, paired",
              f"Δ {confidence:.0%} t-interval", "rel. increase", "replication", "κ ≤ 1 claim"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        delta = row.get("delta_bpb")
        cells = ["baseline" if row["kappa_bits"] is None else f"{row['kappa_bits']:g}",
                 ",".join(str(s) for s in row["seeds"]),
                 f"{row['used_seeds']}/{len(row['seeds'])}" if "used_seeds" in row else "–",
                 _pm(row["use_nats"], 4) if "use_nats" in row else "–",
                 _pm(row["bpb_prior"]),
                 _ci(row["bpb_prior"]), _pm(row["bpb_posterior"]), _pm(row["kl_bits"]),
                 _pm(delta, 4) if delta else "–", _ci(delta, 4) if delta else "–",
                 _pct(row["relative_increase"]), _pct(row["replication_relative_increase"]),
                 row.get("claim", "–")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    flat = []
    for row in rows:
        item: dict[str, Any] = {"kappa_bits": row["kappa_bits"], "seeds": " ".join(
            str(s) for s in row["seeds"])}
        for name in ("bpb_prior", "bpb_posterior", "kl_bits", "delta_bpb"):
            for stat, value in (row.get(name) or {}).items():
                item[f"{name}_{stat}"] = value
        for stat, value in (row.get("use_nats") or {}).items():
            item[f"use_nats_{stat}"] = value
        item["used_seeds"] = row.get("used_seeds", math.nan)
        item.update({k: row.get(k, "") for k in ("relative_increase",
                                                  "replication_relative_increase", "claim")})
        flat.append(item)
    return pd.DataFrame(flat)


def plot_compare(rows: list[dict[str, Any]], path: str | Path,
                 confidence: float = 0.95) -> Path:
    """Bits per byte against kappa (with the baseline's band), the KL, and the relative
    increase over the baseline beside the replication's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16.0, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_bpb, ax_kl, ax_rel = fig.subplots(1, 3)
    base, ft = rows[0], [r for r in rows[1:] if r["kappa_bits"] is not None]
    kappas = [r["kappa_bits"] for r in ft]
    for key, label, style in ((("bpb_prior"), "honest: Z from the prior", "o-"),
                              ("bpb_posterior", "Z from the posterior (encoder)", "s--")):
        means = [r[key]["mean"] for r in ft]
        errs = [r[key]["mean"] - r[key]["low"] if math.isfinite(r[key]["low"]) else 0
                for r in ft]
        ax_bpb.errorbar(kappas, means, yerr=errs, fmt=style, capsize=4, label=label)
    b = base["bpb_prior"]
    if math.isfinite(b["mean"]):
        ax_bpb.axhline(b["mean"], color="black", lw=1, label="baseline (no latent)")
        if math.isfinite(b["low"]):
            ax_bpb.axhspan(b["low"], b["high"], color="black", alpha=0.1,
                           label=f"baseline {confidence:.0%} t-interval")
    ax_bpb.set(ylabel="bits per byte (validation)",
               title=f"bits/byte: mean over seeds, {confidence:.0%} t-interval")
    ax_kl.errorbar(kappas, [r["kl_bits"]["mean"] for r in ft],
                   yerr=[r["kl_bits"]["sd"] if math.isfinite(r["kl_bits"]["sd"]) else 0
                         for r in ft], fmt="o-", capsize=4, label="KL(Q(Z|X) || uniform), ±sd")
    ax_kl.plot(kappas, kappas, ":", color="gray", label="KL = κ (free bits)")
    ax_kl.set(ylabel="KL (bits per token)", title="what the latent carries")
    ax_kl.set_yscale("log", base=2)
    ax_rel.plot(kappas, [100 * r["relative_increase"] for r in ft], "o-",
                label="this run (bits/byte)")
    rep = [(r["kappa_bits"], 100 * r["replication_relative_increase"]) for r in ft
           if math.isfinite(r["replication_relative_increase"])]
    if rep:
        ax_rel.plot(*zip(*rep, strict=True), "s--", label="replication (honest NLL)")
    ax_rel.axhline(0, color="black", lw=1)
    ax_rel.set(ylabel="increase over the baseline (%)",
               title="honest cost against kappa, relative")
    for ax in (ax_bpb, ax_kl, ax_rel):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("free bits κ (bits per token)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_compare(rows: list[dict[str, Any]], out_dir: str | Path, header: str = "",
                  extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """``compare.md`` (header + table + figure), ``.csv``, ``.json``, ``compare.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"compare_figure": plot_compare(rows, out / "compare.png"),
             "compare_table": out / "compare.md", "compare_csv": out / "compare.csv",
             "compare_json": out / "compare.json"}
    paths["compare_table"].write_text(f"{header}\n\n{markdown_table(rows)}\n\n"
                                      f"![bits per byte against kappa](compare.png)\n")
    csv_frame(rows).to_csv(paths["compare_csv"], index=False)
    paths["compare_json"].write_text(json.dumps({**(extra or {}), "rows": rows}, indent=2,
                                                default=str) + "\n")
    return paths


# ----------------------------------------------------------------------------- the command


def ensure_prepared(sweep, workers: int = 2, say=log.info) -> bool:
    """Prepare the standard library into the sweep's data folder if it is missing
    (:data:`STDLIB_RECIPE`), ``say``-ing so first (the command prints it; a library call
    logs it); True if it did (reload the sweep: the vocabulary follows)."""
    from freetf.data.prepare import PrepareSpec, prepare

    data = sweep.base().data
    folder = Path(data.path or "")
    if data.dataset_name != "tokens" or (folder / "meta.json").is_file():
        return False
    say(f"preparing the corpus: Python's standard library -> {folder} (BPE "
        f"{STDLIB_RECIPE['vocab_size']}, about a minute)")
    prepare(PrepareSpec(**STDLIB_RECIPE), folder, workers=workers, progress=True)
    return True
