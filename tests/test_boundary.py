"""Tests for freetf.sweeps.boundary (the boundary search, against a fake noisy trainable
whose boundaries are known) and freetf.sweeps.analysis / phase (verdicts from a runs
table, the boundary report and the phase diagram).  No Ray cluster, no training."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from ray.tune.search import Searcher

from freetf.sweeps import analysis
from freetf.sweeps.boundary import LATENT_KEY, SEED_KEY, BoundarySearch

pytestmark = pytest.mark.timeout(120)

KEY = "training.free_bits_bits"
CE_NOISE = 0.01  # seed-to-seed spread of the honest CE (nats)


def _sigmoid(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a))


def fake_trainable(config: dict, rng: np.random.Generator, x_c: float, x_l: float,
                   slope: float = 2.0) -> dict[str, float]:
    """Final metrics of a trial: collapsed with P = sigmoid(-slope (x - x_c)), else
    leaking with P = sigmoid(slope (x - x_l)) (x = log2 kappa); noisy CE everywhere."""
    ce = 1.0 + rng.normal(0.0, CE_NOISE)
    if config[LATENT_KEY] == 0:
        return {"eval/ce_prior_nats": ce, "eval/valid_rate": 0.95}
    x = math.log2(config[KEY])
    if rng.random() < _sigmoid(-slope * (x - x_c)):
        return {"eval/ce_prior_nats": ce, "eval/ce_gap_nats": abs(rng.normal(0, 0.002)),
                "eval/mutual_info_nats": 0.001, "eval/valid_rate": 0.95}
    leak = rng.random() < _sigmoid(slope * (x - x_l))
    return {"eval/ce_prior_nats": ce + (0.3 if leak else 0.0), "eval/ce_gap_nats": 0.15,
            "eval/mutual_info_nats": 0.3, "eval/valid_rate": 0.95}


def _search(probes: int = 8, settings=None) -> BoundarySearch:
    return BoundarySearch(KEY, -6.0, 3.0, settings or [{"training.kl_weight": 1.0}],
                          {KEY: 1.0, "training.kl_weight": 1.0}, 8, [0, 1, 2], probes, 3,
                          z=2.0)


def drive(search: BoundarySearch, rng: np.random.Generator, x_c: float, x_l: float,
          concurrency: int = 2) -> list[dict]:
    """Tune's loop in miniature: keep ``concurrency`` trials running, finish them in a
    random order; returns the configs in the order they were suggested."""
    running: dict[str, dict] = {}
    suggested = []
    while True:
        while len(running) < concurrency:
            trial_id = f"t{len(suggested)}"
            config = search.suggest(trial_id)
            if config is None or config == Searcher.FINISHED:
                break
            running[trial_id] = config
            suggested.append(config)
        if not running:
            return suggested
        trial_id = sorted(running)[rng.integers(len(running))]
        search.on_trial_complete(trial_id, fake_trainable(running.pop(trial_id), rng,
                                                          x_c, x_l))


def test_the_search_finds_known_boundaries_within_its_intervals():
    """Over 40 fake sweeps with random boundaries, each truth lies in the reported 95%
    interval at least 90% of the time, and the intervals are narrower than the range."""
    hits = {"collapse": 0, "leak": 0}
    widths = []
    reps = 40
    for rep in range(reps):
        rng = np.random.default_rng(rep)
        x_c, x_l = rng.uniform(-5.5, -3.0), rng.uniform(0.0, 2.0)
        search = _search()
        suggested = drive(search, rng, x_c, x_l)
        assert len(suggested) == search.budget == 3 + 8 * 3
        fits = search.fits(0, confidence=0.95)
        hits["collapse"] += fits["collapse"].contains(x_c)
        hits["leak"] += fits["leak"].contains(x_l)
        widths += [f.high_log2 - f.low_log2 for f in fits.values()]
    assert hits["collapse"] >= 0.9 * reps and hits["leak"] >= 0.9 * reps, hits
    assert np.median(widths) < 3.0  # of a 9-unit range: the search did narrow it


def test_baselines_first_then_every_seed_of_each_probe():
    search = _search(probes=4)
    configs = [search.suggest(f"t{i}") for i in range(3 + 3 * 3)]
    assert [c[LATENT_KEY] for c in configs[:3]] == [0, 0, 0]
    assert [c[SEED_KEY] for c in configs[:3]] == [0, 1, 2]
    assert all(c[LATENT_KEY] == 8 for c in configs[3:])
    kappas = sorted({c[KEY] for c in configs[3:]})
    assert kappas == pytest.approx([2 ** -6, 2 ** -1.5, 8.0], rel=1e-5)
    assert all(set(c) == {KEY, "training.kl_weight", SEED_KEY, LATENT_KEY} for c in configs)
    # no adaptive probe before the baselines are in (their seeds give the noise)
    assert search.suggest("t12") is None
    rng = np.random.default_rng(0)
    for i in range(12):
        search.on_trial_complete(f"t{i}", fake_trainable(configs[i], rng, -3.0, 1.0))
    probe = search.suggest("t12")
    assert probe[LATENT_KEY] == 8 and -6 < math.log2(probe[KEY]) < 3
    assert [search.suggest(f"t{13 + i}")[KEY] for i in range(2)] == [probe[KEY]] * 2
    search.on_trial_complete("t12", error=True)  # a failed trial is not a verdict
    assert search.done[-1][1] is None


def test_save_and_restore_continue_the_same_search(tmp_path):
    rng = np.random.default_rng(3)
    first = _search(probes=5)
    configs = [first.suggest(f"t{i}") for i in range(5)]
    for i in range(3):
        first.on_trial_complete(f"t{i}", fake_trainable(configs[i], rng, -3.0, 1.0))
    first.save(str(tmp_path / "searcher.pkl"))
    second = _search(probes=5)
    second.restore(str(tmp_path / "searcher.pkl"))
    assert second.live.keys() == {"t3", "t4"} and len(second.done) == 3
    assert second.suggest("t5") == first.suggest("t5")


def test_one_baseline_per_seed_is_shared_by_the_kl_weights():
    search = _search(probes=3, settings=[{"training.kl_weight": 0.1},
                                         {"training.kl_weight": 1.0}])
    assert search.budget == 3 + 2 * 3 * 3
    configs = [search.suggest(f"t{i}") for i in range(search.budget)]
    baselines = [c for c in configs if c[LATENT_KEY] == 0]
    assert len(baselines) == 3 and {c["training.kl_weight"] for c in baselines} == {1.0}


# ----------------------------------------------------------------------------- analysis


def _frame(x_c: float = -3.0, seeds: int = 3) -> pd.DataFrame:
    """A runs table (freetf.sweeps.report.collect_runs' columns) of a fake sweep."""
    rng = np.random.default_rng(0)
    rows = []
    probes = [-6.0, -4.0, -2.0, 0.0, 2.0]
    for seed in range(seeds):
        for x in [None, *probes]:
            config = {KEY: 1.0 if x is None else 2.0 ** x, LATENT_KEY: 0 if x is None else 8,
                      "training.kl_weight": 1.0, SEED_KEY: seed}
            metrics = fake_trainable(config, rng, x_c, 1.0, slope=50.0)
            rows.append({"run_id": f"r{len(rows)}", "run_name": f"s/{len(rows)}",
                         "status": "FINISHED", "stopped_early": False, "verdict": "active",
                         "model_kind": "baseline" if x is None else "free_transformer",
                         "seed": float(seed), "free_bits_bits": config[KEY],
                         "kl_weight": 1.0, **{f"sampled.{k}": v for k, v in config.items()},
                         "eval/mutual_info_nats": math.nan, "eval/ce_gap_nats": math.nan,
                         **metrics})
    return pd.DataFrame(rows)


def test_analyse_labels_trials_against_their_seed_baselines_and_fits_boundaries(tmp_path):
    df = _frame()
    found = analysis.analyse(df, KEY, z=2.0, confidence=0.9, range_log2=(-6.0, 2.0))
    trials = found.trials.set_index("run_id")
    assert set(trials[trials["model_kind"] == "baseline"]["verdict"]) == {"baseline"}
    ft = trials[trials["model_kind"] == "free_transformer"]
    base = trials[trials["model_kind"] == "baseline"].set_index("seed")["eval/ce_prior_nats"]
    assert np.allclose(ft["cost_nats"], ft["eval/ce_prior_nats"] - ft["seed"].map(base),
                       rtol=0, atol=1e-12)  # float64 differences
    x = np.log2(ft["free_bits_bits"])
    assert set(ft[x < -3]["verdict"]) == {"collapsed"}
    assert set(ft[x > 1]["verdict"]) == {"leaking"}
    assert set(ft[(x > -3) & (x < 1)]["verdict"]) == {"used"}
    assert set(ft["verdict_fixed"]) == {"active"}
    (b,) = found.boundaries
    assert b.setting == {"training.kl_weight": 1.0}
    assert -4 <= b.collapse.low_log2 and b.collapse.high_log2 <= -2
    assert 0 <= b.leak.low_log2 and b.leak.high_log2 <= 2
    parent, children = analysis.mlflow_records(found)
    assert parent["metrics"]["boundary/kappa_c_bits"] == pytest.approx(b.collapse.bits[0])
    assert "freetf.kappa_l" in parent["tags"]
    assert len(children) == len(df)
    codes = {r["verdict"]: children[r["run_id"]]["metrics"]["eval/verdict_code"]
             for r in found.trials.to_dict("records")}
    assert codes == {"collapsed": 0, "used": 1, "leaking": 2, "baseline": -1}
    paths = analysis.write_analysis(found, tmp_path)
    assert paths["phase"].read_bytes().startswith(b"\x89PNG")
    assert "kappa_c" in paths["boundaries"].read_text()


def test_without_two_baseline_seeds_there_is_no_noise_and_no_boundary(tmp_path):
    found = analysis.analyse(_frame(seeds=1), KEY)
    assert not found.noise.known and not found.boundaries
    assert set(found.trials["verdict"]) == {"active", "baseline"}
    assert analysis.write_analysis(found, tmp_path)["phase"].is_file()
