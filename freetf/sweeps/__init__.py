"""Sweeps: the Ray Tune search over the KL settings, its trials, its console and its report.

The Python API (docs/sweeps.md, "From Python")::

    from freetf.sweeps import load_sweep, run_sweep

    sweep = load_sweep("search_kl_smoke", ["training.max_steps=50"])  # a YAML or a shipped name
    result = run_sweep(sweep)       # a SweepResult: runs, analysis, report, parent_run_id

``load_sweep`` parses a spec without loading Ray; ``run_sweep`` and ``SweepResult`` come
from :mod:`freetf.sweeps.sweep`, which loads Ray Tune, when first used.
"""

from __future__ import annotations

from typing import Any

from freetf.sweeps.spec import SweepConfig, SweepError, load_sweep

__all__ = ["SweepConfig", "SweepError", "SweepResult", "load_sweep", "run_sweep"]

_FROM_DRIVER = ("SweepResult", "run_sweep")  # in freetf.sweeps.sweep, which imports Ray


def __getattr__(name: str) -> Any:
    if name in _FROM_DRIVER:
        from freetf.sweeps import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
