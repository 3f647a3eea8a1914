"""The search algorithm of each ``search.method`` (freetf/sweeps/search.py): what Tune is
given, checked on the objects themselves; no Ray instance is started."""

from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np
import pytest
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

from freetf.sweeps.boundary import BoundarySearch
from freetf.sweeps.search import search_algorithm
from freetf.sweeps.spec import load_sweep

KAPPAS = [0.015625, 1.0, 4.0]


@pytest.mark.timeout(60)
def test_a_grid_is_tunes_seeded_variant_generator_over_grid_searches():
    sweep = load_sweep("search_kl_smoke", [
        "search.method=grid", "search.seed=7", f"space.training.free_bits_bits={KAPPAS}",
        "space.training.kl_weight={grid: [0.5, 1.0]}"])
    searcher, space, num_samples = search_algorithm(sweep, sweep.base(), 3)
    assert type(searcher) is BasicVariantGenerator and searcher.max_concurrent == 3
    assert space == {"training.free_bits_bits": {"grid_search": KAPPAS},
                     "training.kl_weight": {"grid_search": [0.5, 1.0]}}
    assert num_samples == 1
    # seeded with search.seed: its draws are those of a generator of seed 7
    assert searcher._random_state.rng.random() == np.random.default_rng(7).random()


@pytest.mark.timeout(60)
def test_a_random_search_draws_num_samples_from_the_distributions():
    sweep = load_sweep("search_kl_smoke", [
        "search.method=random", "search.seed=5", "search.num_samples=4",
        "space.training.free_bits_bits={loguniform: [0.015625, 4.0]}",
        "space.training.kl_weight={choice: [0.5, 1.0]}"])
    searcher, space, num_samples = search_algorithm(sweep, sweep.base(), 2)
    assert type(searcher) is BasicVariantGenerator and searcher.max_concurrent == 2
    kappa, weight = space["training.free_bits_bits"], space["training.kl_weight"]
    assert (type(kappa).__name__, kappa.lower, kappa.upper) == ("Float", 0.015625, 4.0)
    assert type(kappa.sampler).__name__ == "_LogUniform"
    assert weight.categories == [0.5, 1.0]
    assert num_samples == 4
    assert searcher._random_state.rng.random() == np.random.default_rng(5).random()


class _OptunaSearch(Searcher):
    """Records what ``OptunaSearch`` is built with (Optuna is an extra)."""

    def __init__(self, **kwargs):
        super().__init__(metric=kwargs["metric"], mode=kwargs["mode"])
        self.kwargs = kwargs


@pytest.mark.timeout(60)
def test_optuna_is_tpe_under_the_concurrency_limit_with_grids_as_choices(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.tune.search.optuna",
                        types.SimpleNamespace(OptunaSearch=_OptunaSearch))
    grid = load_sweep("search_kl_smoke", [
        "search.method=grid", "search.metric=eval/kl_bits", "search.mode=max",
        f"space.training.free_bits_bits={KAPPAS}"])
    # load_sweep refuses optuna where Optuna is not installed; the search reads only these
    sweep = dataclasses.replace(grid, search=dataclasses.replace(
        grid.search, method="optuna", seed=11, num_samples=6))
    limiter, space, num_samples = search_algorithm(sweep, sweep.base(), 5)
    assert type(limiter) is ConcurrencyLimiter and limiter.max_concurrent == 5
    assert type(limiter.searcher) is _OptunaSearch
    assert limiter.searcher.kwargs == {"metric": "eval/kl_bits", "mode": "max", "seed": 11}
    assert space["training.free_bits_bits"].categories == KAPPAS
    assert space["training.kl_weight"].categories == [1.0]
    assert num_samples == 6


@pytest.mark.timeout(60)
def test_the_boundary_search_makes_every_config_and_runs_the_expected_trials():
    sweep = load_sweep("search_kl_smoke", ["boundary.probes=3"])
    limiter, space, num_samples = search_algorithm(sweep, sweep.base(), 4)
    assert type(limiter) is ConcurrencyLimiter and limiter.max_concurrent == 4
    search = limiter.searcher
    assert type(search) is BoundarySearch and search.probes == 3
    assert space == {}
    assert num_samples == sweep.expected_trials == 2 * (1 + 3)
