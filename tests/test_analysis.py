"""Tests for freetf.results.analysis: which trials are baselines and which are judged
against which baseline, what each setting's fits are given (a recording stand-in for the
fit), and the tables, JSON, summary lines and MLflow records written from the fits.  No
MLflow, no Ray (the real fits on a fake sweep: tests/test_boundary.py)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import record_fit_boundary

from freetf.evaluation import verdicts
from freetf.evaluation.verdicts import BoundaryFit, Tolerances
from freetf.results import analysis, over_training
from freetf.results.analysis import SettingBoundaries, SweepAnalysis

pytestmark = pytest.mark.timeout(120)

KEY = "training.free_bits_bits"
BASE = {"eval/ce_prior_nats": 1.0, "eval/valid_rate": 0.95, "eval/valid_low": 0.92,
        "eval/valid_high": 0.97}
COLLAPSED = {"eval/use_low_nats": -0.001}
USED = {"eval/use_low_nats": 0.05}
BROKEN = {"eval/use_low_nats": 0.05, "eval/valid_rate": 0.1, "eval/valid_low": 0.05,
          "eval/valid_high": 0.15}


def _row(name, kind, seed, kappa, kl_weight, weight_decay, ce, status="FINISHED",
         stopped=False, **metrics):
    return {"run_id": name, "run_name": f"s/{name}", "status": status,
            "stopped_early": stopped, "verdict": "active", "model_kind": kind,
            "seed": float(seed), "free_bits_bits": kappa, "kl_weight": kl_weight,
            f"sampled.{KEY}": kappa, "sampled.training.kl_weight": kl_weight,
            "sampled.training.weight_decay": weight_decay, "sampled.training.seed": seed,
            "sampled.model.latent_dim": 0 if kind == "baseline" else 8,
            **BASE, "eval/ce_prior_nats": ce, **metrics}


def _frame() -> pd.DataFrame:
    """kl_weight shares a baseline, weight_decay does not (freetf.evaluation.verdicts)."""
    b, ft = "baseline", "free_transformer"
    rows = [
        _row("B00", b, 0, 1.0, 1.0, 0.1, 1.0),
        _row("B01", b, 1, 1.0, 1.0, 0.1, 1.1),
        _row("B10", b, 0, 1.0, 1.0, 0.2, 1.2, status="KILLED", stopped=True),  # ended
        _row("B11", b, 1, 1.0, 1.0, 0.2, 1.3, status="KILLED"),  # cut off: no baseline
        _row("B12", b, 2, 1.0, 1.0, 0.2, math.nan),  # never evaluated
        _row("P1", ft, 0, 0.25, 1.0, 0.1, 1.05, **COLLAPSED),
        _row("P2", ft, 1, 1.0, 1.0, 0.1, 1.3, **USED),
        _row("P3", ft, 0, 4.0, 0.5, 0.1, 1.5, **BROKEN),
        _row("P4", ft, 0, 0.5, 1.0, 0.2, 1.25, status="KILLED", stopped=True, **USED),
        _row("P5", ft, 1, 2.0, 1.0, 0.2, 1.4, **USED),  # its seed's baseline cut off
        _row("P6", ft, 0, 2.0, 1.0, 0.1, 1.0, **{**USED, "eval/converged": 0.0}),
        _row("P7", ft, 0, 2.0, 1.0, 0.1, 1.0, status="RUNNING", **USED),
    ]
    return pd.DataFrame(rows, index=range(100, 100 + len(rows)))


@pytest.fixture
def fits(monkeypatch):
    """verdicts.fit_boundary recorded; each call returns distinct numbers."""
    return record_fit_boundary(monkeypatch, lambda kind, n, x, low, high, confidence:
                               BoundaryFit(kind, -0.5 - n / 8, -1.0 - n / 8, n / 8,
                                           (low, high), confidence, len(x)))


def test_trials_are_judged_against_their_own_settings_baseline_of_the_same_seed(fits):
    found = analysis.analyse(_frame(), KEY, confidence=0.8)
    t = found.trials.set_index("run_id")
    assert list(t["verdict_fixed"]) == ["active"] * 12  # the per-run verdicts, kept
    assert list(t["verdict"]) == ["baseline", "baseline", "baseline", "active", "active",
                                  "collapsed", "used", "leaking", "used", "active",
                                  "unconverged", "active"]
    assert found.baselines == 3 and found.unconverged_baselines == [] and found.converged
    cost = t["cost_nats"].to_dict()
    assert {k: v for k, v in cost.items() if not math.isnan(v)} == pytest.approx(
        {"P1": 0.05, "P2": 0.2, "P3": 0.5, "P4": 0.05, "P6": 0.0})
    assert t["regime"].to_dict() == {**{r: "" for r in t.index}, "P3": "broken"}
    assert list(found.trials.index) == list(_frame().index)
    assert found.key == KEY and found.tolerances == Tolerances()
    # the judged trials (not the unconverged) per setting, sorted by the settings' values
    assert fits == [
        ("collapse", [2.0], [False], -2.0, 2.0, 0.8, [0.0]),
        ("leak", [2.0], [True], -2.0, 2.0, 0.8, [0.0]),
        *((name, [2.0], [True], -2.0, 2.0, 0.8, [0.0]) for name in verdicts.REGIME_ONSETS),
        ("collapse", [-2.0, 0.0], [True, False], -2.0, 2.0, 0.8, [0.0, 1.0]),
        ("leak", [-2.0, 0.0], [False, False], -2.0, 2.0, 0.8, [0.0, 1.0]),
        ("collapse", [-1.0], [False], -2.0, 2.0, 0.8, [0.0]),
        ("leak", [-1.0], [False], -2.0, 2.0, 0.8, [0.0])]
    assert [b.setting for b in found.boundaries] == [
        {"training.kl_weight": 0.5, "training.weight_decay": 0.1},
        {"training.kl_weight": 1.0, "training.weight_decay": 0.1},
        {"training.kl_weight": 1.0, "training.weight_decay": 0.2}]
    first = found.boundaries[0]
    assert [(k, f.median_log2) for k, f in first.fits().items()] == [
        ("collapse", -0.625), ("leak", -0.75), ("position", -0.875), ("noise", -1.0),
        ("broken", -1.125)]
    assert [b.regimes for b in found.boundaries[1:]] == [{}, {}]
    assert [(b.collapse.median_log2, b.leak.median_log2) for b in found.boundaries[1:]] == [
        (-0.5 - 6 / 8, -0.5 - 7 / 8), (-0.5 - 8 / 8, -0.5 - 9 / 8)]
    assert found.over_training is None


def test_the_range_is_the_searched_one_when_given_and_the_tolerances_are_used(fits):
    tol = Tolerances(use_nats=0.1)  # P2's use interval (0.05) no longer counts
    found = analysis.analyse(_frame(), KEY, tolerances=tol, range_log2=(-6.0, 3.0))
    assert found.tolerances is tol
    assert found.trials.set_index("run_id").loc["P2", "verdict"] == "collapsed"
    assert {(c[3], c[4], c[5]) for c in fits} == {(-6.0, 3.0, 0.95)}


def test_free_bits_searched_in_nats_is_read_in_bits(fits):
    df = _frame().rename(columns={f"sampled.{KEY}": "sampled.training.free_bits"})
    found = analysis.analyse(df, "training.free_bits")
    assert [c[1] for c in fits][:2] == [[2.0], [2.0]]
    assert len(found.boundaries) == 3


def test_one_kappa_or_no_judged_trial_fits_nothing(fits):
    df = _frame()
    one = analysis.analyse(df[df["run_id"].isin(["B00", "B01", "P2", "P6"])], KEY)
    assert one.boundaries == [] and fits == []  # one kappa judged: no range
    assert one.trials.set_index("run_id").loc["P2", "verdict"] == "used"
    none = analysis.analyse(df[df["model_kind"] == "baseline"], KEY)
    assert none.boundaries == [] and none.baselines == 3
    assert analysis.analyse(df[df["model_kind"] == "baseline"], KEY,
                            range_log2=(-2.0, 2.0)).boundaries == []
    assert analysis.analyse(df, KEY, range_log2=(1.0, 1.0)).boundaries == [] and fits == []


def test_a_baseline_off_its_floor_is_named_and_marks_the_analysis_unconverged(fits):
    df = _frame()
    df.loc[df["run_id"] == "B01", "eval/excess_nats"] = 0.5
    df.loc[df["run_id"] == "B10", "eval/converged"] = 0.0
    found = analysis.analyse(df, KEY)
    assert found.unconverged_baselines == ["s/B01", "s/B10"] and not found.converged
    assert found.baselines == 3
    assert SweepAnalysis(df, Tolerances(), KEY).converged is False  # no baseline at all
    assert SweepAnalysis(df, Tolerances(), KEY, baselines=1).converged is True


def test_without_other_settings_one_boundary_for_all(fits):
    df = _frame().drop(columns=["sampled.training.kl_weight", "sampled.training.weight_decay"])
    df = df[df["run_id"].isin(["B00", "B01", "P1", "P2", "P3"])]
    found = analysis.analyse(df, KEY)
    (b,) = found.boundaries
    assert b.setting == {} and b.label == "all"
    assert fits[0] == ("collapse", [-2.0, 0.0, 2.0], [True, False, False], -2.0, 2.0, 0.95,
                       [0.0, 1.0, 0.0])


def test_the_boundary_key_is_free_bits_in_bits_unless_named(fits):
    found = analysis.analyse(_frame(), confidence=0.8)
    assert found.key == KEY
    named = list(fits)
    fits.clear()
    analysis.analyse(_frame(), KEY, confidence=0.8)
    assert named == fits and len(named) == 9


def test_a_trial_whose_setting_has_no_baseline_at_all_is_not_judged(fits):
    df = pd.concat([_frame(), pd.DataFrame([_row("P8", "free_transformer", 0, 1.0, 1.0, 0.3,
                                                 1.2, **USED)], index=[200])])
    t = analysis.analyse(df, KEY).trials.set_index("run_id")
    assert t.loc["P8", "verdict"] == "active" and math.isnan(t.loc["P8", "cost_nats"])
    assert t.loc["P2", "verdict"] == "used"  # the others judged as before


def test_trials_without_a_value_of_a_setting_are_a_setting_of_their_own(fits):
    df = _frame()
    df.loc[df["run_id"] == "P3", "sampled.training.kl_weight"] = math.nan
    found = analysis.analyse(df, KEY)
    assert [b.label for b in found.boundaries] == [
        "kl_weight=1,weight_decay=0.1", "kl_weight=1,weight_decay=0.2",
        "kl_weight=nan,weight_decay=0.1"]
    assert [b.collapse.trials for b in found.boundaries] == [2, 1, 1]


def test_without_per_run_verdicts_the_fixed_verdict_is_missing(fits):
    found = analysis.analyse(_frame().drop(columns=["verdict"]), KEY)
    fixed = list(found.trials["verdict_fixed"])
    assert len(fixed) == 12 and all(isinstance(v, float) and math.isnan(v) for v in fixed)
    assert found.trials.set_index("run_id").loc["P2", "verdict"] == "used"


@pytest.fixture
def over_calls(monkeypatch):
    calls = []

    def boundaries_over_training(histories, trials, x, tol, confidence, range_log2):
        calls.append((histories, list(trials["run_id"]), list(x), tol, confidence,
                      range_log2))
        return pd.DataFrame([[len(calls), "collapse", 0.0, -1.0, 1.0, 2]],
                            columns=over_training.COLUMNS)

    monkeypatch.setattr(over_training, "boundaries_over_training", boundaries_over_training)
    return calls


def test_over_training_fits_each_setting_with_its_own_baselines(fits, over_calls):
    histories = pd.DataFrame({"run_id": ["P1"], "step": [1]})
    found = analysis.analyse(_frame(), KEY, confidence=0.8, histories=histories)
    assert [c[1:] for c in over_calls] == [
        (["B00", "B01", "P3"], [0.0, 0.0, 2.0], Tolerances(), 0.8, (-2.0, 2.0)),
        (["B00", "B01", "P1", "P2"], [0.0, 0.0, -2.0, 0.0], Tolerances(), 0.8, (-2.0, 2.0)),
        (["B10", "P4"], [0.0, -1.0], Tolerances(), 0.8, (-2.0, 2.0))]
    assert all(c[0] is histories for c in over_calls)
    assert found.over_training.to_dict("list") == {
        "step": [1, 2, 3], "kind": ["collapse"] * 3, "median_log2": [0.0] * 3,
        "low_log2": [-1.0] * 3, "high_log2": [1.0] * 3, "trials": [2] * 3,
        "label": ["kl_weight=0.5,weight_decay=0.1", "kl_weight=1,weight_decay=0.1",
                  "kl_weight=1,weight_decay=0.2"]}
    assert list(found.over_training.index) == [0, 1, 2]


def test_over_training_without_a_setting_of_its_own_reads_every_baseline(fits, over_calls):
    df = _frame().drop(columns=["sampled.training.weight_decay"])
    df = df[df["run_id"].isin(["B00", "B01", "P1", "P2", "P3"])]
    analysis.analyse(df, KEY, histories=pd.DataFrame({"run_id": ["P1"], "step": [1]}))
    assert [c[1] for c in over_calls] == [["B00", "B01", "P3"], ["B00", "B01", "P1", "P2"]]
    analysis.analyse(df, KEY, histories=pd.DataFrame(columns=["run_id", "step"]))
    assert len(over_calls) == 2  # empty histories: no curve


# --------------------------------------------------------------- what is written from fits


def _fit(kind, median, low, high, trials=9, confidence=0.9):
    return BoundaryFit(kind, median, low, high, (-6.0, 2.0), confidence, trials)


def _analysis(converged=True, settings=({"training.kl_weight": 0.5,
                                          "training.free_bits_schedule.type": "linear"},),
              regimes=False, over=None):
    boundaries = [SettingBoundaries(
        dict(setting), _fit("collapse", -2.0, -3.0, -1.0), _fit("leak", 1.0, 0.0, 3.0),
        {"position": _fit("position", -1.0, -7.0, 0.0, trials=8)} if regimes else {})
        for setting in settings]
    trials = pd.DataFrame([
        {"run_id": "a", "verdict": "used", "verdict_fixed": "active", "cost_nats": 0.25,
         "regime": "position"},
        {"run_id": "b", "verdict": "collapsed", "verdict_fixed": "collapsed",
         "cost_nats": 0.0, "regime": ""},
        {"run_id": "c", "verdict": "baseline", "verdict_fixed": "", "cost_nats": math.nan,
         "regime": ""},
        {"run_id": "d", "verdict": "unconverged", "verdict_fixed": "active",
         "cost_nats": math.nan, "regime": ""},
    ])
    return SweepAnalysis(trials, Tolerances(), KEY, boundaries, baselines=2,
                         unconverged_baselines=[] if converged else ["s/b0", "s/b1"],
                         over_training=over)


def test_a_settings_label_names_its_keys_by_their_last_part_sorted():
    b = _analysis().boundaries[0]
    assert b.label == "type=linear,kl_weight=0.5"  # sorted by the full key
    assert SettingBoundaries({"a.x": 1 / 3, "b.y": 2}, b.collapse, b.leak).label == \
        "x=0.3333,y=2"
    assert SettingBoundaries({}, b.collapse, b.leak).label == "all"
    assert list(b.fits()) == ["collapse", "leak"]


def test_the_summary_lines_give_each_boundary_then_the_rule():
    tol = Tolerances()
    rule = (f"rule: used = use interval above {tol.use_nats:g} nats/token; leaking = valid "
            f"< {tol.broken_valid:g} or {tol.leak_valid:g} below the baseline's")
    assert rule == ("rule: used = use interval above 0.002 nats/token; leaking = valid < 0.2 "
                    "or 0.1 below the baseline's")
    assert _analysis(regimes=True).summary_lines() == [
        "kappa_c (collapse onset) at type=linear,kl_weight=0.5: 0.25 bits [0.125, 0.5] "
        "(90%, 9 trials)",
        "kappa_l (leak onset)     at type=linear,kl_weight=0.5: 2 bits [1, > 4] "
        "(90%, 9 trials)",
        "kappa_pos (Z: position)  at type=linear,kl_weight=0.5: 0.5 bits [< 0.0156, 1] "
        "(90%, 8 trials)",
        rule]
    assert _analysis(converged=False).summary_lines() == [
        "kappa_c (collapse onset) at type=linear,kl_weight=0.5: 0.25 bits [0.125, 0.5] "
        "(90%, 9 trials) [UNCONVERGED baselines]",
        "kappa_l (leak onset)     at type=linear,kl_weight=0.5: 2 bits [1, > 4] "
        "(90%, 9 trials) [UNCONVERGED baselines]",
        "baselines not converged: s/b0, s/b1 (train longer: training.max_steps)",
        rule]


def test_the_summary_says_which_estimates_settled_over_training():
    rows = [(s, kind, m, m - 1, m + 1, 9, label)
            for label, moving in (("b", 0.0), ("a", 1.0))
            for kind, medians in (("collapse", [3.0, 0.0, 0.1, 0.2]),
                                  ("leak", [0.0, moving, 0.0, moving]))
            for s, m in zip((1, 2, 3, 4), medians, strict=True)]
    over = pd.DataFrame(rows, columns=[*over_training.COLUMNS, "label"])
    lines = _analysis(over=over).summary_lines()
    assert lines[2:4] == [
        "over training at a: kappa_c settled, kappa_l still moving (last 3 evaluations "
        "within 0.5 log2)",
        "over training at b: kappa_c settled, kappa_l settled (last 3 evaluations within "
        "0.5 log2)"]
    assert len(_analysis(over=over.iloc[:0]).summary_lines()) == 3


def test_the_boundaries_table_has_a_row_per_setting():
    found = _analysis(settings=({"training.kl_weight": 0.5}, {"training.kl_weight": 1.0}))
    assert analysis.boundaries_table(found).split("\n") == [
        "| setting | kappa_c (bits) | kappa_c interval | kappa_l (bits) | kappa_l interval "
        "| trials |",
        "|---|---|---|---|---|---|",
        "| kl_weight=0.5 | 0.25 | [0.125, 0.5] | 2 | [1, > 4] | 9 |",
        "| kl_weight=1 | 0.25 | [0.125, 0.5] | 2 | [1, > 4] | 9 |"]


def test_the_boundaries_json_gives_each_fit_in_bits():
    (row,) = analysis.boundaries_json(_analysis(converged=False, regimes=True))
    assert row == {
        "setting": {"training.kl_weight": 0.5, "training.free_bits_schedule.type": "linear"},
        "label": "type=linear,kl_weight=0.5",
        "kappa_c": {"bits": 0.25, "low_bits": 0.125, "high_bits": 0.5, "confidence": 0.9,
                    "trials": 9, "below_range": False, "above_range": False},
        "kappa_l": {"bits": 2.0, "low_bits": 1.0, "high_bits": 8.0, "confidence": 0.9,
                    "trials": 9, "below_range": False, "above_range": True},
        "kappa_pos": {"bits": 0.5, "low_bits": 2 ** -7, "high_bits": 1.0, "confidence": 0.9,
                      "trials": 8, "below_range": True, "above_range": False},
        "converged": False}
    assert list(row) == ["setting", "label", "kappa_c", "kappa_l", "kappa_pos", "converged"]
    assert analysis.boundaries_json(_analysis())[0]["converged"] is True


def test_write_analysis_writes_the_table_json_verdicts_and_figures(tmp_path, monkeypatch):
    import freetf.results.phase as phase

    drawn = []
    monkeypatch.setattr(phase, "plot_phase_diagram",
                        lambda found, path: drawn.append(found) or path)
    over = pd.DataFrame([(1, "collapse", 0.0, -1.0, 1.0, 3, "x"),
                         (1, "collapse", 0.0, -1.0, 1.0, 3, "y")],
                        columns=[*over_training.COLUMNS, "label"])
    found = _analysis(converged=False, over=over)
    out = tmp_path / "new" / "report"
    paths = analysis.write_analysis(found, out)
    assert paths == {"boundaries": out / "boundaries.md",
                     "boundaries_json": out / "boundaries.json",
                     "verdicts": out / "verdicts.csv",
                     "over_training_csv": out / "boundaries_over_training.csv",
                     "over_training": out / "boundaries_over_training.png",
                     "phase": out / "phase_diagram.png"}
    assert drawn == [found]
    assert paths["boundaries"].read_text() == "\n".join(
        [analysis.boundaries_table(found), "", *found.summary_lines()]) + "\n"
    text = paths["boundaries_json"].read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "tolerances": {\n    "use_nats"')
    assert json.loads(text) == {
        "tolerances": {"use_nats": 0.002, "leak_valid": 0.1, "broken_valid": 0.2,
                       "leak_cost_nats": 0.02, "floor_nats": 0.01, "baseline_valid": 0.8,
                       "regime_nats": 0.05},
        "converged": False, "unconverged_baselines": ["s/b0", "s/b1"],
        "boundaries": json.loads(json.dumps(analysis.boundaries_json(found)))}
    written = pd.read_csv(paths["verdicts"])
    assert list(written["run_id"]) == ["a", "b", "c", "d"]
    assert list(written.columns) == list(found.trials.columns)  # no index column
    assert pd.read_csv(paths["over_training_csv"]).to_dict("list") == over.to_dict("list")
    assert paths["over_training"].read_bytes()[:4] == b"\x89PNG"
    again = analysis.write_analysis(_analysis(), out)  # the folder exists; no curves
    assert "over_training" not in again and "over_training_csv" not in again


def test_write_analysis_writes_a_value_json_does_not_know_as_its_text(tmp_path, monkeypatch):
    import numpy as np

    import freetf.results.phase as phase

    monkeypatch.setattr(phase, "plot_phase_diagram", lambda found, path: path)
    found = _analysis(settings=({"model.layers": np.int64(2)},))
    paths = analysis.write_analysis(found, tmp_path)
    written = json.loads(paths["boundaries_json"].read_text())
    assert written["boundaries"][0]["setting"] == {"model.layers": "2"}


def test_only_the_first_settings_curve_is_drawn(tmp_path, monkeypatch):
    import freetf.results.phase as phase

    monkeypatch.setattr(phase, "plot_phase_diagram", lambda found, path: path)
    drawn = []
    monkeypatch.setattr(over_training, "plot_over_training",
                        lambda over, path, label: drawn.append((list(over["label"]), path,
                                                                label)) or path)
    over = pd.DataFrame([(1, "collapse", 0.0, -1.0, 1.0, 3, "x"),
                         (1, "collapse", 0.0, -1.0, 1.0, 3, "y"),
                         (2, "collapse", 0.0, -1.0, 1.0, 3, "x")],
                        columns=[*over_training.COLUMNS, "label"])
    analysis.write_analysis(_analysis(over=over), tmp_path)
    assert drawn == [(["x", "x"], tmp_path / "boundaries_over_training.png", "x")]


def test_mlflow_records_of_one_setting():
    over = pd.DataFrame([(100, "collapse", -2.0, -3.0, -1.0, 9), (200, "noise", 1.0, 0.0, 2.0, 9)],
                        columns=over_training.COLUMNS)
    parent, children = analysis.mlflow_records(_analysis(regimes=True, over=over))
    assert parent == {
        "metrics": {"boundary/kappa_c_bits": 0.25, "boundary/kappa_c_low_bits": 0.125,
                    "boundary/kappa_c_high_bits": 0.5, "boundary/kappa_l_bits": 2.0,
                    "boundary/kappa_l_low_bits": 1.0, "boundary/kappa_l_high_bits": 8.0,
                    "boundary/kappa_pos_bits": 0.5, "boundary/kappa_pos_low_bits": 2 ** -7,
                    "boundary/kappa_pos_high_bits": 1.0, "boundary/converged": 1.0},
        "tags": {"freetf.kappa_c": "0.25 bits [0.125, 0.5] (90%, 9 trials)",
                 "freetf.kappa_l": "2 bits [1, > 4] (90%, 9 trials)",
                 "freetf.boundary_converged": "true"},
        "steps": [("boundary_t/kappa_c_bits", 0.25, 100),
                  ("boundary_t/kappa_c_low_bits", 0.125, 100),
                  ("boundary_t/kappa_c_high_bits", 0.5, 100),
                  ("boundary_t/kappa_noise_bits", 2.0, 200),
                  ("boundary_t/kappa_noise_low_bits", 1.0, 200),
                  ("boundary_t/kappa_noise_high_bits", 4.0, 200)]}
    assert children == {
        "a": {"metrics": {"eval/cost_nats": 0.25, "eval/verdict_code": 1},
              "tags": {"freetf.verdict": "used", "freetf.verdict_fixed": "active",
                       "freetf.regime": "position"}},
        "b": {"metrics": {"eval/cost_nats": 0.0, "eval/verdict_code": 0},
              "tags": {"freetf.verdict": "collapsed", "freetf.verdict_fixed": "collapsed"}},
        "c": {"metrics": {"eval/verdict_code": -1}, "tags": {"freetf.verdict": "baseline"}}}


def test_mlflow_records_of_several_settings_name_each_by_its_label():
    found = _analysis(converged=False, settings=({"training.kl_weight": 0.5,
                                                  "training.kl_annealing.type": "lin(ear)"},
                                                 {"training.kl_weight": 1.0}),
                      over=pd.DataFrame([(1, "collapse", 0.0, -1.0, 1.0, 3)],
                                        columns=over_training.COLUMNS))
    parent, _ = analysis.mlflow_records(found)
    assert list(parent["metrics"])[:3] == [
        "boundary/type_lin_ear__kl_weight_0.5/kappa_c_bits",
        "boundary/type_lin_ear__kl_weight_0.5/kappa_c_low_bits",
        "boundary/type_lin_ear__kl_weight_0.5/kappa_c_high_bits"]
    assert "boundary/kl_weight_1/kappa_l_high_bits" in parent["metrics"]
    assert parent["metrics"]["boundary/converged"] == 0.0
    assert parent["tags"] == {
        "freetf.kappa_c.type=lin(ear),kl_weight=0.5":
            "0.25 bits [0.125, 0.5] (90%, 9 trials) [unconverged baselines]",
        "freetf.kappa_l.type=lin(ear),kl_weight=0.5":
            "2 bits [1, > 4] (90%, 9 trials) [unconverged baselines]",
        "freetf.kappa_c.kl_weight=1": "0.25 bits [0.125, 0.5] (90%, 9 trials) "
                                      "[unconverged baselines]",
        "freetf.kappa_l.kl_weight=1": "2 bits [1, > 4] (90%, 9 trials) "
                                      "[unconverged baselines]",
        "freetf.boundary_converged": "false"}
    assert parent["steps"] == []  # kappa(t) only for a single setting


def test_metric_names_keep_letters_digits_and_mlflows_separators():
    assert analysis._metric_safe("a=1,b_c-d.e f/g:h(i)é") == "a_1_b_c-d.e f/g_h_i_é"


def test_analyse_sweep_takes_the_sweeps_key_tolerances_confidence_and_range(monkeypatch):
    calls = []
    monkeypatch.setattr(analysis, "analyse", lambda *args: calls.append(args) or "found")
    diagnostics = SimpleNamespace(use_tol_nats=0.01, leak_valid_tol=0.2, broken_valid=0.3,
                                  leak_cost_tol_nats=0.04, floor_tol_nats=0.02,
                                  regime_tol_nats=0.1)
    base = SimpleNamespace(diagnostics=diagnostics)
    tol = Tolerances.from_config(diagnostics)

    def sweep(method, key, space):
        return SimpleNamespace(boundary=SimpleNamespace(key=key, confidence=0.7),
                               search=SimpleNamespace(method=method),
                               space=[SimpleNamespace(key=k, values=v) for k, v in space])

    runs, histories = pd.DataFrame(), pd.DataFrame({"step": [1]})
    space = [("training.kl_weight", (1.0,)), (KEY, (0.25, 4.0, 1.0))]
    assert analysis.analyse_sweep(runs, sweep("boundary", KEY, space), base,
                                  histories) == "found"
    assert calls[-1] == (runs, KEY, tol, 0.7, (-2.0, 2.0), histories)
    analysis.analyse_sweep(runs, sweep("grid", KEY, space), base)
    assert calls[-1] == (runs, KEY, tol, 0.7, None, None)
    nats = [("training.free_bits", (0.1, 0.5))]  # the grid searched kappa in nats
    analysis.analyse_sweep(runs, sweep("grid", KEY, nats), base)
    assert calls[-1][1:] == ("training.free_bits", tol, 0.7, None, None)
    analysis.analyse_sweep(runs, sweep("grid", KEY, [("training.seed", (0, 1))]), base)
    assert calls[-1][1] == KEY  # neither searched: the key as it is


def test_regime_fits_need_every_trial_to_have_a_regime(fits):
    group = pd.DataFrame({"regime": ["nothing", "position", "broken"], "seed": [0, 1, 2]})
    x = pd.Series([-1.0, 0.0, 1.0])
    found = analysis.regime_fits(group, x, -2.0, 2.0, 0.9)
    assert list(found) == list(verdicts.REGIME_ONSETS)
    assert fits == [("position", [-1.0, 0.0, 1.0], [False, True, True], -2.0, 2.0, 0.9,
                     [0, 1, 2]),
                    ("noise", [-1.0, 0.0, 1.0], [False, False, True], -2.0, 2.0, 0.9,
                     [0, 1, 2]),
                    ("broken", [-1.0, 0.0, 1.0], [False, False, True], -2.0, 2.0, 0.9,
                     [0, 1, 2])]
    assert analysis.regime_fits(group.assign(regime=["nothing", None, "broken"]), x,
                                -2.0, 2.0, 0.9) == {}
    assert analysis.regime_fits(group.iloc[:0], x.iloc[:0], -2.0, 2.0, 0.9) == {}
    assert len(fits) == 3
