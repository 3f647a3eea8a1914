"""``python tune/reproduce_synthetic.py``: the paper's synthetic experiment (§4.1, Figure 4)
as a measured table; the training and measurements are :mod:`freetf.experiments.reproduce`'s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from freetf.config import load_config
from freetf.experiments.reproduce import (
    DEFAULT_OUT,
    KAPPAS_BITS,
    changed_knobs,
    merge,
    reproduce_in_process,
    reproduce_with_tune,
    summary_table,
    write_outputs,
)


def main(argv: list[str] | None = None, default_spec: str | Path | None = None,
         smoke_spec: str | Path | None = None) -> int:
    from freetf.logs import setup_logging

    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, help="sweep spec (Tune) or train config (in-process)")
    p.add_argument("--smoke", action="store_true", help="a minute-sized pipeline check")
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
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="no training: one table from the rows of earlier runs' JSON files "
                        "(e.g. one process per seed on a GPU box)")
    args = p.parse_args(argv)
    if args.merge:
        missing = [str(f) for f in args.merge if not f.is_file()]
        if missing:
            p.error(f"--merge: no such file: {', '.join(missing)}")
        return merge(args.merge, args.out or DEFAULT_OUT, args.name, args.note)
    start = time.perf_counter()
    if args.in_process:
        base = load_config(args.config, args.set)
        rows, samples = reproduce_in_process(base, tuple(args.kappas), tuple(args.seeds),
                                             args.groups, args.per_group, args.device,
                                             baseline=not args.no_baseline)
        size = base
        tracker = None
        out = args.out or DEFAULT_OUT
    else:
        spec = args.config or (smoke_spec if args.smoke else default_spec)
        rows, samples, result = reproduce_with_tune(spec, args.set, args.resume, args.groups,
                                                    args.per_group)
        size = result.sweep.base()
        from freetf.tracking import make_tracker

        tracker = make_tracker(size, run_id=result.parent_run_id)
        out = args.out or result.sweep.report_path
    wall = time.perf_counter() - start
    m, t = size.model, size.training
    header = (f"# Synthetic task (§4.1): what Z carries as free bits grow\n\n"
              f"Model: d={m.hidden_dim}, {m.num_layers} layers, {m.num_heads} heads, "
              f"H={m.latent_dim} latent bits ({m.mapper} mapper); {t.max_steps} steps of "
              f"batch {t.batch_size} x 66 tokens, kl_weight {t.kl_weight}; "
              f"Figure 4 protocol with {args.groups} groups of {args.per_group} sequences "
              f"(prompt \"K>\"). Wall time {wall / 60:.1f} min on "
              f"{'CPU' if args.device == 'cpu' else args.device}."
              + (f" Non-default options: {', '.join(options)}." if (options := changed_knobs(size))
                 else "")) + (f"\n\n{args.note}" if args.note else "")
    paths = write_outputs(rows, samples, out, args.name, header)
    if tracker is not None:
        for path in paths.values():
            tracker.log_artifact(path, "reproduction")
        tracker.finish("FINISHED")
    print(summary_table(rows))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} in {wall / 60:.1f} min")
    return 0
