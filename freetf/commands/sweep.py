"""``freetf sweep`` (alias ``python tune/search_kl.py``): the default boundary search, or
any sweep YAML, then its verdicts, boundaries and collapse map.

The sweep itself is :func:`freetf.sweeps.sweep.run_sweep`; this is its command line.
"""

from __future__ import annotations

import argparse

from freetf.commands import add_sweep_arguments, command_line, sweep_spec

DEFAULT, SMOKE = "search_kl", "search_kl_smoke"  # shipped sweeps (freetf/configs)
HELP = "Ray Tune sweep over KL weight, free bits and schedules (default: the boundary search)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_sweep_arguments(p, DEFAULT, SMOKE)


def run(args: argparse.Namespace) -> int:
    from freetf.results import report
    from freetf.sweeps.console import setup_console
    from freetf.sweeps.sweep import load_sweep, run_sweep
    from freetf.tracking import mlflow_client

    setup_console(args.verbose)
    result = run_sweep(load_sweep(sweep_spec(args, DEFAULT, SMOKE), args.set),
                       resume=args.resume, verbose=args.verbose)
    experiment = mlflow_client(result.tracking_uri).get_experiment_by_name(result.experiment)
    print("\n".join([*result.analysis.summary_lines(), ""]) if result.analysis else "", end="")
    print(report.summary_text(result.runs, result.report, result.tracking_uri,
                              result.experiment, experiment.experiment_id, result.runs_view))
    if result.interrupted:
        print(f"\nThe sweep was interrupted; continue it with: "
              f"{command_line(args, drop=('--resume',))} --resume")
        return 143 if result.terminated else 130
    return 0
