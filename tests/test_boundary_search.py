"""Tests for freetf.sweeps.boundary's bookkeeping: when the search waits for its
baselines, when it is finished, what its fits and regimes read, and the search a sweep
spec builds (tests/test_boundary.py drives whole searches)."""

from __future__ import annotations

import numpy as np
import pytest
from ray.tune.search import Searcher

from freetf.evaluation import verdicts
from freetf.sweeps.boundary import LATENT_KEY, SEED_KEY, BoundarySearch

pytestmark = pytest.mark.timeout(120)

KEY = "training.free_bits_bits"
BASE = {"eval/ce_prior_nats": 0.3, "eval/valid_rate": 0.95, "eval/valid_low": 0.92,
        "eval/valid_high": 0.97, "eval/converged": 1.0, "eval/excess_nats": 0.003}
LEAK = {**BASE, "eval/use_low_nats": 0.05, "eval/valid_rate": 0.1, "eval/valid_low": 0.07,
        "eval/valid_high": 0.14}
USED = {**BASE, "eval/use_low_nats": 0.05}


def _search(probes: int, initial: int, seeds=(0, 1)) -> BoundarySearch:
    return BoundarySearch(KEY, -6.0, 2.0, [{"training.kl_weight": 1.0}],
                          {KEY: 1.0, "training.kl_weight": 1.0}, 8, list(seeds), probes,
                          initial)


def _start_all(search: BoundarySearch) -> dict[str, dict]:
    configs = {}
    while (config := search.suggest(f"t{len(configs)}")) not in (None, Searcher.FINISHED):
        configs[f"t{len(configs)}"] = config
    return configs


def test_no_probe_is_placed_until_a_baseline_has_finished_and_none_is_running():
    search = _search(probes=3, initial=2)
    configs = _start_all(search)
    baselines = [t for t, c in configs.items() if c[LATENT_KEY] == 0]
    for t, c in configs.items():
        if c[LATENT_KEY]:
            search.on_trial_complete(t, USED)
    for t in baselines:
        search.on_trial_complete(t, error=True)  # failed: no reference
    assert search.suggest("n0") is None and len(search.placed[0]) == 2

    search = _search(probes=3, initial=2)
    configs = _start_all(search)
    baselines = [t for t, c in configs.items() if c[LATENT_KEY] == 0]
    search.on_trial_complete(baselines[0], BASE)
    for t, c in configs.items():
        if c[LATENT_KEY]:
            search.on_trial_complete(t, USED)
    assert search.suggest("n0") is None  # seed 1's baseline still running
    search.on_trial_complete(baselines[1], BASE)
    assert search.suggest("n0")[LATENT_KEY] == 8


def test_a_search_with_every_probe_placed_and_finished_is_finished():
    search = _search(probes=2, initial=2)
    configs = _start_all(search)
    assert len(configs) == search.budget == 2 + 2 * 2
    assert search.suggest("late") is None  # trials still running
    for t in configs:
        search.on_trial_complete(t, BASE)
    assert search.suggest("late") == Searcher.FINISHED


def test_fits_and_regimes_read_every_seeds_verdicts_with_their_seeds():
    """Seed 0 leaks at every probe, seeds 1 and 2 at none: the fit is the seed-aware one."""
    search = _search(probes=3, initial=3, seeds=(0, 1, 2))
    configs = _start_all(search)
    for t, c in configs.items():
        if c[LATENT_KEY] == 0:
            search.on_trial_complete(t, BASE)
        elif c[SEED_KEY] == 0:
            search.on_trial_complete(t, {**LEAK, "eval/use_position_low_nats": 0.5,
                                         "eval/use_noise_low_nats": 0.0})
        else:
            search.on_trial_complete(t, USED)  # no per-class use: no regime
    xs, labels, seeds = search.observations(0)
    ys = [v == "leaking" for v in labels]
    fits = search.fits(0)
    for kind, y in (("leak", ys), ("collapse", [v == "collapsed" for v in labels])):
        assert fits[kind] == verdicts.fit_boundary(kind, xs, y, -6.0, 2.0, 0.9, seeds)
    assert fits["leak"] != verdicts.fit_boundary("leak", xs, ys, -6.0, 2.0, 0.9)
    assert search.fits(0, confidence=0.5)["leak"] == verdicts.fit_boundary(
        "leak", xs, ys, -6.0, 2.0, 0.5, seeds)
    assert search.regimes(0) == ([-6.0, -2.0, 2.0], ["broken"] * 3, [0, 0, 0])


def test_from_sweep_builds_the_search_of_the_spec_on_its_base_config():
    from freetf.sweeps import boundary
    from freetf.sweeps.spec import load_sweep

    sweep = load_sweep("search_kl_smoke", [
        "search.seed=3", "boundary.seeds=3", "boundary.probes=5", "boundary.initial=4",
        "boundary.targets=[leak]", "space.training.kl_weight={grid: [0.5, 1.0]}",
        "diagnostics.use_tol_nats=0.25", "model.latent_dim=6"])
    base = sweep.base()
    search = boundary.from_sweep(sweep, base)
    assert (search.key, search.low, search.high) == (KEY, -6.0, 2.0)
    assert search.settings == [{"training.kl_weight": 0.5}, {"training.kl_weight": 1.0}]
    assert search.base_values == {KEY: base.training.free_bits_bits,
                                  "training.kl_weight": base.training.kl_weight}
    assert search.latent_dim == 6 and search.seeds == [9, 10, 11]  # from 3 * 3 on
    assert search.probes == 5 and [len(p) for p in search.placed] == [4, 4]
    assert search.tolerances.use_nats == 0.25 and search.targets == ("leak",)
    assert (search.metric, search.mode) == ("eval/ce_prior_nats", "min")


def test_the_search_checks_its_arguments_and_keeps_tunes_metric():
    args = dict(key=KEY, low_log2=-6.0, high_log2=2.0, settings=[], base_values={},
                latent_dim=8, seeds=[0, 1], probes=2, initial=2)
    search = BoundarySearch(**args, metric="eval/ce_prior_nats", mode="min")
    assert (search.metric, search.mode) == ("eval/ce_prior_nats", "min")
    for bad, message in [({"high_log2": -6.0}, r"empty kappa range \[2\^-6.0, 2\^-6.0\]"),
                         ({"initial": 1}, r"need 2 <= initial=1 <= probes=2"),
                         ({"initial": 3}, r"need 2 <= initial=3 <= probes=2"),
                         ({"seeds": [0]}, r"1 seed\(s\): a boundary needs >= 2 seeds"),
                         ({"settings": [{KEY: 1.0}]}, f"the boundary key {KEY} is not")]:
        with pytest.raises(ValueError, match=message):
            BoundarySearch(**{**args, **bad})
    # each setting that changes the model without latent has its own baselines
    two = BoundarySearch(**{**args, "settings": [{"training.learning_rate": 1e-3},
                                                 {"training.learning_rate": 2e-3}]})
    assert [(s["setting"], s["seed"]) for s in two.queue if s["role"] == "baseline"] == [
        ({"training.learning_rate": 1e-3}, 0), ({"training.learning_rate": 1e-3}, 1),
        ({"training.learning_rate": 2e-3}, 0), ({"training.learning_rate": 2e-3}, 1)]


def test_an_unknown_or_failed_trial_is_no_outcome():
    search = _search(probes=2, initial=2)
    configs = _start_all(search)
    search.on_trial_complete("not-a-trial", BASE)  # not this search's: ignored
    first = next(iter(configs))
    search.on_trial_complete(first, BASE, error=True)
    assert len(search.done) == 1 and search.done[0][1] is None


def test_the_next_probe_is_the_free_grid_point_of_most_information(monkeypatch):
    search = _search(probes=4, initial=3, seeds=(0, 1, 2))
    configs = _start_all(search)
    for t, c in configs.items():
        search.on_trial_complete(t, LEAK if c[LATENT_KEY] and c[SEED_KEY] == 0 else BASE)
    # placed: -6, -2, 2; free: 1/8 steps at least 1/4 from them, the range's ends included
    grid = [-6 + k / 8 for k in range(65)]
    free = [x for x in grid if min(abs(x - p) for p in (-6.0, -2.0, 2.0)) >= 0.25]
    assert -5.75 in free and -2.25 in free and -5.875 not in free
    xs, labels, seeds = search.observations(0)
    gain = sum(verdicts.probe_information(kind, free, xs, [v == want for v in labels],
                                          -6.0, 2.0, groups=seeds)
               for kind, want in (("collapse", "collapsed"), ("leak", "leaking")))
    assert search.next_probe(0) == free[int(np.argmax(gain))]
    # what each target's information is asked at, and of which seeds
    asked = []

    def spy(kind, candidates, x, y, low, high, groups=None):
        asked.append((kind, list(candidates), groups))
        return np.asarray([float(c == -5.75) for c in candidates])
    monkeypatch.setattr(verdicts, "probe_information", spy)
    assert search.next_probe(0) == -5.75
    assert asked == [("collapse", free, seeds), ("leak", free, seeds)]
    search.placed[0] = grid  # no point free: the whole grid
    search.next_probe(0)
    assert asked[-1][1] == grid


def test_boundary_at_places_the_initial_probes_on_the_ladder_given():
    """The spec's values, in the key's units, every one with every seed; the adaptive
    probes follow up to ``boundary.probes``."""
    from freetf.sweeps import boundary
    from freetf.sweeps.spec import load_sweep

    sweep = load_sweep("search_kl_smoke", ["boundary.at=[0.125, 0.1875, 0.375, 8.0]",
                                           "boundary.probes=5", "boundary.initial=2",
                                           "space.training.free_bits_bits={loguniform: "
                                           "[0.015625, 8.0]}"])
    search = boundary.from_sweep(sweep, sweep.base())
    assert search.placed == [[-3.0, pytest.approx(np.log2(0.1875)),
                              pytest.approx(np.log2(0.375)), 3.0]]
    kappas = [search.config(s)[KEY] for s in search.queue if s["role"] == "probe"]
    assert kappas == [0.125, 0.125, 0.1875, 0.1875, 0.375, 0.375, 8.0, 8.0]
    assert not search._all_placed() and sweep.expected_trials == search.budget == 2 + 5 * 2


@pytest.mark.parametrize("at, message", [
    ("[0.125]", r"boundary.at=\[0.125\]: 2 to boundary.probes=5 distinct values"),
    ("[0.125, 0.125]", r"2 to boundary.probes=5 distinct"),
    ("[1, 2, 3, 4, 5, 6]", r"2 to boundary.probes=5 distinct"),
    ("[0.125, 16.0, 0.001]", r"boundary.at: 16, 0.001 outside the range \[0.015625, 4\] of "
                             r"space.training.free_bits_bits")])
def test_boundary_at_outside_the_range_or_too_many_is_refused(at, message):
    from freetf.sweeps.spec import SweepError, load_sweep

    with pytest.raises(SweepError, match=message):
        load_sweep("search_kl_smoke", [f"boundary.at={at}", "boundary.probes=5"]).base()


def test_the_next_probe_goes_to_the_setting_with_the_fewest():
    """Two settings: the first adaptive probe goes to the first (a tie), the next to the
    second, which is then behind."""
    search = BoundarySearch(KEY, -6.0, 2.0, [{"training.kl_weight": 0.5},
                                             {"training.kl_weight": 1.0}],
                            {KEY: 1.0, "training.kl_weight": 1.0}, 8, [0, 1], 4, 2)
    configs = _start_all(search)
    assert len(configs) == 2 + 2 * 2 * 2 and [len(p) for p in search.placed] == [2, 2]
    for t in configs:
        search.on_trial_complete(t, BASE if configs[t][LATENT_KEY] == 0 else USED)
    first = search.suggest("a0")
    assert first["training.kl_weight"] == 0.5 and [len(p) for p in search.placed] == [3, 2]
    search.suggest("a1")  # the same probe's second seed, from the queue
    second = search.suggest("a2")
    assert second["training.kl_weight"] == 1.0 and [len(p) for p in search.placed] == [3, 3]


def test_a_seed_without_a_finished_baseline_gives_no_verdicts():
    """Seed 1's baseline failed: its probes have no reference and are left out; a probe's
    own outcome never stands in for a baseline."""
    search = _search(probes=2, initial=2)
    configs = _start_all(search)
    for t, c in configs.items():
        if c[LATENT_KEY] == 0 and c[SEED_KEY] == 1:
            search.on_trial_complete(t, error=True)
        else:
            search.on_trial_complete(t, BASE if c[LATENT_KEY] == 0 else LEAK)
    xs, labels, seeds = search.observations(0)
    assert (xs, labels, seeds) == ([-6.0, 2.0], ["leaking", "leaking"], [0, 0])
