"""``python tune/compare_code.py``: the baseline against the Free Transformer across kappa
on real code; the statistics and files are :mod:`freetf.experiments.compare`'s."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from freetf.experiments.compare import (
    compare_rows,
    ensure_prepared,
    markdown_table,
    write_compare,
)


def main(argv: list[str] | None = None, default_spec: str | Path | None = None,
         smoke_spec: str | Path | None = None) -> int:
    from freetf.config import ConfigError
    from freetf.sweeps.console import setup_console
    from freetf.sweeps.sweep import load_sweep, run_sweep
    from freetf.tracking import TrackingError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, help=f"sweep YAML (default: {default_spec})")
    p.add_argument("--smoke", action="store_true", help=f"the pipeline, small ({smoke_spec})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="sweep or base-config override, e.g. training.max_steps=3000")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--report-only", action="store_true",
                   help="no training: the table and figure of a finished sweep, from MLflow")
    p.add_argument("--out", type=Path,
                   help="folder of compare.{md,csv,json,png} (default: the sweep's report "
                   "folder, reports/<sweep name>)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_console(args.verbose)
    path = args.config or (smoke_spec if args.smoke else default_spec)
    start = time.perf_counter()
    try:
        sweep = load_sweep(path, args.set)
        if not args.report_only:
            if ensure_prepared(sweep):  # model.vocab_size follows the prepared data
                sweep = load_sweep(path, args.set)
            result = run_sweep(sweep, resume=args.resume, verbose=args.verbose)
            trials, parent = result.runs, result.parent_run_id
        else:
            trials, parent = _finished_sweep(sweep)
    except (ConfigError, TrackingError) as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    wall_s = time.perf_counter() - start
    rows = compare_rows(trials)
    command = " ".join(["python", *(sys.argv if argv is None else ["tune/compare_code.py",
                                                                   *argv])])
    header = _header(sweep, rows, wall_s if not args.report_only else None, command)
    paths = write_compare(rows, args.out or sweep.report_path, header,
                          {"command": command, "wall_s": None if args.report_only else wall_s,
                           "sweep": sweep.name, "parent_run_id": parent})
    _log_to_parent(sweep, parent, paths)
    print(markdown_table(rows))
    print(f"\nwrote {', '.join(str(v) for v in paths.values())}"
          + ("" if args.report_only else f" in {wall_s / 60:.1f} min"))
    return 0


def _header(sweep, rows, wall_s: float | None, command: str) -> str:
    base = sweep.base()
    m, t = base.model, base.training
    seeds = sorted({s for r in rows for s in r["seeds"]})
    wall = f"; wall time {wall_s / 60:.1f} min" if wall_s is not None else ""
    return (f"# {sweep.name}: the baseline against the Free Transformer across free bits\n\n"
            f"`{command}`{wall}. Data {_shown(base.data.path)}; model d={m.hidden_dim}, "
            f"{m.num_layers} layers, {m.num_heads} heads, H={m.latent_dim} latent bits; "
            f"{t.max_steps} steps of {t.batch_size} x {base.data.max_seq_len} tokens, "
            f"kl_weight {t.kl_weight}; seeds {seeds}; {t.eval_batches} validation batches, "
            f"the same for every trial. Bits per byte = CE (bits/token) / UTF-8 bytes per "
            f"token of the validation split. Δ: bits/byte minus the same seed's baseline.")


def _shown(path: str | None) -> str:
    """A path relative to the working directory when it lies under it."""
    if not path:
        return str(path)
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _finished_sweep(sweep) -> tuple[pd.DataFrame, str | None]:
    from freetf.results.report import collect_runs
    from freetf.tracking import find_parent, mlflow_client

    base = sweep.base()
    tracking = base.tracking.mlflow
    client = mlflow_client(tracking.tracking_uri)
    parent = find_parent(client, tracking.experiment, sweep.name)
    trials = collect_runs(client, tracking.experiment, sweep=sweep.name)
    return trials, parent.info.run_id if parent is not None else None


def _log_to_parent(sweep, parent_run_id: str | None, paths: dict[str, Path]) -> None:
    """The table, CSV, JSON and figure as artifacts of the sweep's parent run (ended by
    the sweep; its status is left as it is)."""
    if parent_run_id is None:
        return
    from freetf.tracking import log_files_to_run, mlflow_client

    client = mlflow_client(sweep.base().tracking.mlflow.tracking_uri)
    log_files_to_run(client, parent_run_id, paths.values(), "report")
