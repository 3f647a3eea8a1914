"""The commands that run a study: ``freetf sweep`` (the KL sweep), ``freetf reproduce``
(the synthetic reproduction) and ``freetf compare`` (the code-corpus comparison).

Each module holds ``add_arguments(parser)`` and ``run(args) -> int``; :mod:`freetf.cli`
builds the parsers and dispatches, and ``tune/*.py`` are aliases of the same commands.
Nothing heavy is imported before ``run``: building the parser loads neither Ray nor MLflow.
Their logic lives in :mod:`freetf.sweeps` and :mod:`freetf.experiments`.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_sweep_arguments(p: argparse.ArgumentParser, default: str, smoke: str) -> None:
    """``--config``, ``--smoke``, ``--set``, ``--resume`` and ``-v``: a sweep's options;
    ``default`` and ``smoke`` are shipped sweep names."""
    p.add_argument("--config", type=Path,
                   help=f"a sweep YAML, or the name of a shipped one (default: {default})")
    p.add_argument("--smoke", action="store_true",
                   help=f"the pipeline at tiny size, not the result ({smoke})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override: space.<key>={grid: [...]}, search.num_samples=4, "
                        "mlflow.sweep_name=NAME, or a base-config key such as "
                        "training.max_steps=50 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep of the same name")
    # SUPPRESS: `freetf -v sweep` and `freetf sweep -v` are the same flag
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="Ray's and Tune's own output too (status tables, trial logs)")


def sweep_spec(args: argparse.Namespace, default: str, smoke: str) -> str | Path:
    """The sweep YAML (or shipped name) the options ask for: --config, else --smoke's."""
    return args.config or (smoke if args.smoke else default)


def command_line(args: argparse.Namespace, drop: tuple[str, ...] = ()) -> str:
    """The ``freetf`` command that was run (``args.argv``: set by :func:`freetf.cli.main`),
    without the arguments in ``drop``."""
    return shlex.join(["freetf", *(a for a in args.argv if a not in drop)])
