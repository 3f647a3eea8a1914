"""The search algorithm of a sweep: what Tune's ``search_alg``, ``param_space`` and
``num_samples`` are for each ``search.method``.

- ``grid`` / ``random``: Tune's variant generator (seeded) over the space;
- ``optuna``: TPE (grids become choices);
- ``boundary``: :class:`freetf.sweeps.boundary.BoundarySearch`, which makes every
  config itself (baselines and probes; empty ``param_space``) and runs exactly
  ``sweep.expected_trials`` trials.

All hold the concurrency limit (Tune ignores ``max_concurrent_trials`` when given a
``search_alg``).
"""

from __future__ import annotations

from typing import Any

from ray import tune


def search_algorithm(sweep, base, concurrency: int) -> tuple[Any, dict[str, Any], int]:
    """``(search_alg, param_space, num_samples)`` of ``sweep`` on its base config."""
    from ray.tune.search import ConcurrencyLimiter

    search = sweep.search
    if search.method == "boundary":
        from freetf.sweeps import boundary

        return (ConcurrencyLimiter(boundary.from_sweep(sweep, base),
                                   max_concurrent=concurrency), {}, sweep.expected_trials)
    space = {d.key: d.domain(search.method) for d in sweep.space}
    if search.method == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(metric=search.metric, mode=search.mode, seed=search.seed)
        return ConcurrencyLimiter(searcher, max_concurrent=concurrency), space, \
            search.num_samples
    return (tune.search.BasicVariantGenerator(random_state=search.seed,
                                              max_concurrent=concurrency),
            space, search.num_samples)
