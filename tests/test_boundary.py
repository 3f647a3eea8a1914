"""Tests for freetf.sweeps.boundary (the boundary search, against a fake noisy trainable
whose boundaries are known) and freetf.results.analysis / phase (verdicts from a runs
table, the boundary report and the phase diagram).  No Ray cluster, no training."""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import pytest

from freetf.results import analysis
from freetf.sweeps.boundary import LATENT_KEY, SEED_KEY, BoundarySearch

pytestmark = pytest.mark.timeout(120)

KEY = "training.free_bits_bits"


def _sigmoid(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a))


def fake_trainable(config: dict, rng: np.random.Generator, x_c: float, x_l: float,
                   slope: float = 2.0) -> dict[str, float]:
    """Final metrics of a trial: collapsed (no use) with P = sigmoid(-slope (x - x_c)),
    else leaking (free generations invalid) with P = sigmoid(slope (x - x_l)), else used
    (x = log2 kappa).  The coverage test's simulator (boundary_sim) is the realistic one."""
    base = {"eval/ce_prior_nats": 0.3, "eval/valid_rate": 0.95, "eval/valid_low": 0.92,
            "eval/valid_high": 0.97, "eval/converged": 1.0, "eval/excess_nats": 0.003}
    if config[LATENT_KEY] == 0:
        return base
    x = math.log2(config[KEY])
    if rng.random() < float(_sigmoid(-slope * (x - x_c))):
        return {**base, "eval/use_low_nats": -0.001, "eval/use_nats": 0.0}
    if rng.random() < float(_sigmoid(slope * (x - x_l))):
        return {**base, "eval/use_low_nats": 0.05, "eval/valid_rate": 0.1,
                "eval/valid_low": 0.07, "eval/valid_high": 0.14}
    return {**base, "eval/use_low_nats": 0.05, "eval/use_nats": 0.06}


def _search(probes: int = 8, settings=None) -> BoundarySearch:
    return BoundarySearch(KEY, -6.0, 3.0, settings or [{"training.kl_weight": 1.0}],
                          {KEY: 1.0, "training.kl_weight": 1.0}, 8, [0, 1, 2], probes, 3)


def test_the_search_narrows_known_sharp_boundaries():
    """Sharp boundaries and noiseless verdicts: the intervals hold the truth and are
    narrow (the calibrated coverage test is tests/test_boundary_coverage.py)."""
    from test_boundary_coverage import drive

    for rep in range(5):
        rng = np.random.default_rng(rep)
        x_c, x_l = rng.uniform(-5.5, -3.0), rng.uniform(0.0, 2.0)
        search = _search()
        run = functools.partial(fake_trainable, rng=rng, x_c=x_c, x_l=x_l, slope=50.0)
        assert drive(search, run, rng) == search.budget == 3 + 8 * 3
        fits = search.fits(0, confidence=0.95)
        assert fits["collapse"].contains(x_c) and fits["leak"].contains(x_l)
        assert max(f.high_log2 - f.low_log2 for f in fits.values()) < 2.5  # of 9 units


def test_unconverged_probes_are_not_verdicts():
    search = _search(probes=3)
    configs = [search.suggest(f"t{i}") for i in range(12)]
    rng = np.random.default_rng(0)
    for i, c in enumerate(configs):
        m = fake_trainable(c, rng, -3.0, 1.0)
        if c[LATENT_KEY] and i % 2:
            m["eval/converged"] = 0.0
        search.on_trial_complete(f"t{i}", m)
    xs, labels, seeds = search.observations(0)
    probes = [c for c in configs if c[LATENT_KEY]]
    assert len(xs) == len([i for i, c in enumerate(configs) if c[LATENT_KEY] and not i % 2])
    assert len(probes) == 9 and "unconverged" not in labels


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


def test_the_probes_go_where_the_targets_boundaries_are_uncertain():
    """Z takes the position from x = -1.5 on, the noise only at 3: placed for kappa_c the
    next probe lies below -1.5, for kappa_noise above it (the regimes' onset)."""
    def run(config: dict) -> dict:
        metrics = fake_trainable(config, np.random.default_rng(0), -3.0, 10.0, slope=50.0)
        if config[LATENT_KEY]:
            x = math.log2(config[KEY])
            metrics |= {"eval/use_low_nats": 0.05 if x > -3 else -0.001,
                        "eval/use_position_low_nats": 0.5 if x > -3 else 0.0,
                        "eval/use_noise_low_nats": 0.5 if x > 2 else 0.0}
        return metrics

    placed = {}
    for targets in (("collapse",), ("noise",), ("collapse", "position", "noise")):
        search = BoundarySearch(KEY, -6.0, 3.0, [{"training.kl_weight": 1.0}],
                                {KEY: 1.0, "training.kl_weight": 1.0}, 8, [0, 1, 2], 4, 3,
                                targets=targets)
        configs = [search.suggest(f"t{i}") for i in range(12)]
        for i, config in enumerate(configs):
            search.on_trial_complete(f"t{i}", run(config))
        xs, regimes, _ = search.regimes(0)
        assert sorted(set(zip(xs, regimes, strict=True))) == [
            (-6.0, "nothing"), (-1.5, "position"), (3.0, "position+noise")]
        placed[targets] = search.next_probe(0)
    assert -6.0 < placed[("collapse",)] < -1.5
    assert -1.5 < placed[("noise",)] < 3.0
    assert placed[("collapse", "position", "noise")] < -1.5  # two onsets there, one above


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
    """A runs table (freetf.results.report.collect_runs' columns) of a fake sweep."""
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
    found = analysis.analyse(df, KEY, confidence=0.9, range_log2=(-6.0, 2.0))
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


def test_regime_onsets_locate_where_z_takes_the_position_then_the_noise_then_breaks(
        tmp_path):
    """Figure 4 located: Z carries the position from x = -2 on, the noise from 0 on, free
    generation breaks at 2 (valid 0.1): each onset's interval lies between its probes."""
    df = _frame()
    x = np.log2(df["free_bits_bits"])
    ft = df["model_kind"] == "free_transformer"
    df["eval/use_position_low_nats"] = np.where(ft, np.where(x >= -2, 0.5, 0.0), np.nan)
    df["eval/use_noise_low_nats"] = np.where(ft, np.where(x >= 0, 0.5, 0.0), np.nan)
    found = analysis.analyse(df, KEY, confidence=0.9, range_log2=(-6.0, 2.0))
    judged = found.trials[found.trials["model_kind"] == "free_transformer"]
    assert list(judged.sort_values("free_bits_bits").groupby("free_bits_bits")["regime"]
                .first()) == ["nothing", "nothing", "position", "position+noise", "broken"]
    (b,) = found.boundaries
    brackets = {"position": (-4, -2), "noise": (-2, 0), "broken": (0, 2)}
    assert set(b.regimes) == set(brackets)
    for name, (lo, hi) in brackets.items():
        fit = b.regimes[name]
        assert lo <= fit.low_log2 < fit.median_log2 < fit.high_log2 <= hi, (name, fit)
        assert fit.trials == 15
    parent, _ = analysis.mlflow_records(found)
    assert parent["metrics"]["boundary/kappa_noise_bits"] == pytest.approx(
        b.regimes["noise"].bits[0])
    assert any(line.startswith("kappa_pos (Z: position)") for line in found.summary_lines())
    paths = analysis.write_analysis(found, tmp_path)
    assert '"kappa_broken"' in paths["boundaries_json"].read_text()
    # without the per-class measures (not the synthetic task) there is no regime onset
    plain = analysis.analyse(_frame(), KEY, confidence=0.9, range_log2=(-6.0, 2.0))
    assert plain.boundaries[0].regimes == {}
    assert not any("kappa_pos" in k for k in analysis.mlflow_records(plain)[0]["metrics"])


def test_unconverged_baselines_mark_the_boundaries_and_unconverged_trials_are_left_out(
        tmp_path):
    df = _frame()
    ft = df["model_kind"] == "free_transformer"
    df.loc[ft & (df["free_bits_bits"] == 1.0), "eval/converged"] = 0.0
    found = analysis.analyse(df, KEY, confidence=0.9, range_log2=(-6.0, 2.0))
    assert found.converged
    judged = found.trials[found.trials["model_kind"] == "free_transformer"]
    assert set(judged[judged["free_bits_bits"] == 1.0]["verdict"]) == {"unconverged"}
    assert found.boundaries[0].collapse.trials == 12  # 15 probes less the 3 unconverged
    off_floor = df["model_kind"] == "baseline"
    df.loc[off_floor & (df["seed"] == 1), "eval/excess_nats"] = 0.05
    found = analysis.analyse(df, KEY, confidence=0.9, range_log2=(-6.0, 2.0))
    assert not found.converged and len(found.unconverged_baselines) == 1
    assert all("UNCONVERGED" in line for line in found.summary_lines()[:2])
    parent, _ = analysis.mlflow_records(found)
    assert parent["metrics"]["boundary/converged"] == 0.0
    assert parent["tags"]["freetf.kappa_c"].endswith("[unconverged baselines]")
    paths = analysis.write_analysis(found, tmp_path)
    assert '"converged": false' in paths["boundaries_json"].read_text()


def test_boundaries_over_training_from_the_histories(tmp_path):
    """kappa(t): at step 100 no trial uses Z yet (every verdict collapsed), at step 300 the
    final verdicts; the collapse onset moves up the range and then settles."""
    df = _frame()
    metrics = ["eval/ce_prior_nats", "eval/use_low_nats", "eval/valid_rate",
               "eval/valid_low", "eval/valid_high", "eval/excess_nats"]
    early = df[["run_id", *metrics]].assign(step=100)
    early["eval/use_low_nats"] = -0.001  # no use anywhere
    early["eval/valid_rate"], early["eval/valid_low"], early["eval/valid_high"] = \
        0.95, 0.92, 0.97
    histories = pd.concat([early] + [df[["run_id", *metrics]].assign(step=s)
                                     for s in (200, 300, 400)], ignore_index=True)
    found = analysis.analyse(df, KEY, confidence=0.9, range_log2=(-6.0, 2.0),
                             histories=histories)
    over = found.over_training
    assert sorted(over["step"].unique()) == [100, 200, 300, 400]
    c = over[over["kind"] == "collapse"].set_index("step")
    assert c.loc[100, "median_log2"] > 2.0  # all collapsed: the onset above the range
    assert -4 <= c.loc[400, "median_log2"] <= -2 and c.loc[400, "trials"] == 15
    (b,) = found.boundaries
    assert c.loc[400, "median_log2"] == pytest.approx(b.collapse.median_log2)
    assert any("kappa_c settled" in line for line in found.summary_lines())
    parent, _ = analysis.mlflow_records(found)
    steps = {(k, s) for k, _, s in parent["steps"]}
    assert ("boundary_t/kappa_c_bits", 100) in steps and len(parent["steps"]) == 4 * 2 * 3
    paths = analysis.write_analysis(found, tmp_path)
    assert paths["over_training"].read_bytes().startswith(b"\x89PNG")
    assert len(pd.read_csv(paths["over_training_csv"])) == 8


def test_regime_onsets_over_training_are_named_as_themselves(tmp_path):
    """kappa_pos(t): Z carries the position from step 200 on (x >= -2); at step 100 only
    the broken trials (x = 2) count; the parent run's steps name each onset, none read
    as kappa_l."""
    df = _frame()
    x = np.log2(df["free_bits_bits"])
    ft = df["model_kind"] == "free_transformer"
    df["eval/use_position_low_nats"] = np.where(ft, np.where(x >= -2, 0.5, 0.0), np.nan)
    df["eval/use_noise_low_nats"] = np.where(ft, 0.0, np.nan)
    metrics = ["eval/ce_prior_nats", "eval/use_low_nats", "eval/valid_rate",
               "eval/valid_low", "eval/valid_high", "eval/excess_nats",
               "eval/use_position_low_nats", "eval/use_noise_low_nats"]
    early = df[["run_id", *metrics]].assign(step=100)
    early["eval/use_position_low_nats"] = np.where(ft, 0.0, np.nan)
    histories = pd.concat([early] + [df[["run_id", *metrics]].assign(step=s)
                                     for s in (200, 300, 400)], ignore_index=True)
    found = analysis.analyse(df, KEY, confidence=0.9, range_log2=(-6.0, 2.0),
                             histories=histories)
    over = found.over_training
    pos = over[over["kind"] == "position"].set_index("step")
    assert pos.loc[100, "low_log2"] >= 0.0  # only the broken trials at x = 2
    assert -4 <= pos.loc[400, "low_log2"] and pos.loc[400, "high_log2"] <= -2
    assert set(over["kind"]) == {"collapse", "leak", "position", "noise", "broken"}
    parent, _ = analysis.mlflow_records(found)
    names = {k for k, _, _ in parent["steps"]}
    assert {"boundary_t/kappa_pos_bits", "boundary_t/kappa_noise_high_bits"} <= names
    assert len(parent["steps"]) == 4 * 5 * 3
    assert any("kappa_pos settled" in line for line in found.summary_lines())

