"""``freetf reproduce`` (alias ``python tune/reproduce_synthetic.py``): the paper's synthetic
experiment (§4.1, Figure 4) as a measured table; the training and measurements are
:mod:`freetf.experiments.reproduce`'s.

The table, figure and JSON go to the sweep's report folder (``reports/<sweep name>/``;
in-process and ``--merge``: ``reports/``), to ``docs/`` only with ``--out docs``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT, SMOKE = "reproduce_synthetic", "reproduce_synthetic_smoke"  # shipped sweeps
HELP = "the paper's synthetic experiment (Figure 4) as a measured table"
KAPPAS_BITS = (1 / 64, 1 / 8, 1.0, 8.0)  # in-process: the paper's four kappas


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path,
                   help=f"a sweep YAML or shipped sweep name (Tune; default: {DEFAULT}), or "
                   "with --in-process a train config or its name (e.g. synthetic)")
    p.add_argument("--smoke", action="store_true", help=f"a minute-sized pipeline check ({SMOKE})")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--in-process", action="store_true",
                   help="no Ray/MLflow: train one run after another (e.g. on a GPU box)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kappas", type=float, nargs="+", default=list(KAPPAS_BITS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-baseline", action="store_true",
                   help="in-process: skip the baselines (latent_dim = 0) trained per seed")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--per-group", type=int, default=16)
    p.add_argument("--out", type=Path,
                   help="folder of the table, figure and JSON (default: the sweep's report "
                   "folder, reports/<sweep name>; in-process and --merge: reports); "
                   "--out docs rewrites the committed docs/synthetic_reproduction.*")
    p.add_argument("--name", default="synthetic_reproduction")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--note", default="", help="a paragraph written under the table's header")
    p.add_argument("--note-file", type=Path, metavar="MD",
                   help="a markdown file written under the table's header (after --note)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="no training: one table from the rows of earlier runs' JSON files "
                        "(e.g. one process per seed on a GPU box)")


def run(args: argparse.Namespace) -> int:
    from freetf.config import load_config
    from freetf.experiments import reproduce as experiment

    if args.note_file is not None:
        if not args.note_file.is_file():
            raise FileNotFoundError(f"--note-file: no such file: {args.note_file}")
        args.note = "\n\n".join(part for part in (args.note, args.note_file.read_text().strip())
                                if part)
    if args.merge:
        missing = [str(f) for f in args.merge if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"--merge: no such file: {', '.join(missing)}")
        rows, paths = experiment.merge(args.merge, args.out or experiment.DEFAULT_OUT,
                                       args.name, args.note)
        print(experiment.summary_table(rows))
        print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
        return 0
    start = time.perf_counter()
    if args.in_process:
        base = load_config(args.config, args.set)
        rows, samples = experiment.reproduce_in_process(
            base, tuple(args.kappas), tuple(args.seeds), args.groups, args.per_group,
            args.device, baseline=not args.no_baseline)
        size = base
        tracker = None
        out = args.out or experiment.DEFAULT_OUT
        located, lines = "", []
    else:
        spec = args.config or (SMOKE if args.smoke else DEFAULT)
        rows, samples, result = experiment.reproduce_with_tune(spec, args.set, args.resume,
                                                               args.groups, args.per_group)
        size = result.sweep.base()
        from freetf.tracking import make_tracker

        tracker = make_tracker(size, run_id=result.parent_run_id)
        out = args.out or result.sweep.report_path
        located = experiment.located_section(result.analysis, result.report, out, args.name)
        lines = result.analysis.summary_lines() if located else []
    wall = time.perf_counter() - start
    paths = experiment.write_outputs(rows, samples, out, args.name,
                                     _header(size, args, wall, experiment.changed_knobs(size)),
                                     located)
    if tracker is not None:
        for path in paths.values():
            tracker.log_artifact(path, "reproduction")
        tracker.finish("FINISHED")
    print(experiment.summary_table(rows))
    print("".join(f"\n{line}" for line in lines))
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {wall / 60:.1f} min")
    return 0


def _header(size, args: argparse.Namespace, wall: float, options: list[str]) -> str:
    m, t = size.model, size.training
    return (f"# Synthetic task (§4.1): what Z carries as free bits grow\n\n"
            f"Model: d={m.hidden_dim}, {m.num_layers} layers, {m.num_heads} heads, "
            f"H={m.latent_dim} latent bits ({m.mapper} mapper); {t.max_steps} steps of "
            f"batch {t.batch_size} x 66 tokens, kl_weight {t.kl_weight}; "
            f"Figure 4 protocol with {args.groups} groups of {args.per_group} sequences "
            f"(prompt \"K>\"). Wall time {wall / 60:.1f} min on "
            f"{'CPU' if args.device == 'cpu' else args.device}."
            + (f" Non-default options: {', '.join(options)}." if options else "")
            + (f"\n\n{args.note}" if args.note else ""))
