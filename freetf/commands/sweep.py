"""``python tune/search_kl.py``: the default boundary search, or any sweep YAML.

The sweep itself is :func:`freetf.sweeps.sweep.run_sweep`; this is its command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from freetf.config import ConfigError
from freetf.sweeps.console import setup_console
from freetf.sweeps.sweep import load_sweep, run_sweep


def main(argv: list[str] | None = None, default_config: str | Path | None = None,
         smoke_config: str | Path | None = None) -> int:
    """``search_kl.py [--config YAML | --smoke] [--set KEY=VALUE ...] [--resume]``."""
    from freetf.results import report
    from freetf.tracking import TrackingError, mlflow_client

    parser = argparse.ArgumentParser(description="Ray Tune sweep over KL weight, free bits "
                                     "and their schedules, with a collapse map in MLflow")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"sweep YAML (default: {default_config})")
    parser.add_argument("--smoke", action="store_true",
                        help=f"the one-minute smoke sweep ({smoke_config})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override: space.<key>={grid: [...]}, search.num_samples=4, "
                             "or a base-config key such as training.max_steps=50")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep of the same name")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Ray's and Tune's own output too (status tables, trial logs)")
    args = parser.parse_args(argv)
    setup_console(args.verbose)
    path = args.config or (smoke_config if args.smoke else default_config)
    try:
        result = run_sweep(load_sweep(path, args.set), resume=args.resume,
                           verbose=args.verbose)
    except (ConfigError, TrackingError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    experiment = mlflow_client(result.tracking_uri).get_experiment_by_name(result.experiment)
    print("\n".join([*result.analysis.summary_lines(), ""]) if result.analysis else "", end="")
    print(report.summary_text(result.runs, result.report, result.tracking_uri,
                              result.experiment, experiment.experiment_id))
    if result.interrupted:
        again = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
        print(f"\nThe sweep was interrupted; continue it with: "
              f"{' '.join([parser.prog, *again, '--resume'])}")
        return 130
    return 0
