"""``freetf compare`` (alias ``python tune/compare_code.py``): the baseline against the Free
Transformer across kappa on real code (Python's standard library, prepared first if its
folder is missing); the statistics and files are :mod:`freetf.experiments.compare`'s."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from freetf.commands import add_sweep_arguments, command_line, sweep_spec

if TYPE_CHECKING:
    import pandas as pd

DEFAULT, SMOKE = "compare_code", "compare_code_smoke"  # shipped sweeps (freetf/configs)
HELP = "the baseline against the Free Transformer across kappa, on Python's standard library"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_sweep_arguments(p, DEFAULT, SMOKE)
    p.add_argument("--report-only", action="store_true",
                   help="no training: the table and figure of a finished sweep, from MLflow")
    p.add_argument("--out", type=Path,
                   help="folder of compare.{md,csv,json,png} (default: the sweep's report "
                   "folder, reports/<sweep name>)")


def run(args: argparse.Namespace) -> int:
    from freetf.experiments.compare import (
        compare_rows,
        ensure_prepared,
        markdown_table,
        write_compare,
    )
    from freetf.sweeps.console import setup_console
    from freetf.sweeps.sweep import load_sweep, run_sweep

    setup_console(args.verbose)
    path = sweep_spec(args, DEFAULT, SMOKE)
    start = time.perf_counter()
    sweep = load_sweep(path, args.set)
    if not args.report_only:
        if ensure_prepared(sweep, say=lambda text: print(text, flush=True)):
            sweep = load_sweep(path, args.set)  # model.vocab_size follows the prepared data
        result = run_sweep(sweep, resume=args.resume, verbose=args.verbose)
        trials, parent = result.runs, result.parent_run_id
    else:
        trials, parent = _finished_sweep(sweep)
    wall_s = time.perf_counter() - start
    rows = compare_rows(trials)
    command = command_line(args)
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
