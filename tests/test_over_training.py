"""Tests for freetf.results.over_training: which trials, verdicts and seeds each step's fit
gets (a recording stand-in for the fit), when an estimate has settled, and the figure.
No MLflow, no Ray."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import record_fit_boundary
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from freetf.evaluation.verdicts import BoundaryFit, Tolerances
from freetf.results import over_training
from freetf.results.columns import BOUNDARY_COLORS, BOUNDARY_LABELS

pytestmark = pytest.mark.timeout(120)

BASE = {"eval/ce_prior_nats": 0.3, "eval/valid_rate": 0.95, "eval/valid_low": 0.92,
        "eval/valid_high": 0.97}
COLLAPSED = {**BASE, "eval/use_low_nats": -0.001}
USED = {**BASE, "eval/use_low_nats": 0.05}
# leaking by the interval below the baseline's, still valid enough not to be "broken"
LEAKING = {**BASE, "eval/use_low_nats": 0.05, "eval/valid_rate": 0.5,
           "eval/valid_low": 0.4, "eval/valid_high": 0.6}


def _classes(position: float, noise: float) -> dict[str, float]:
    return {"eval/use_position_low_nats": position, "eval/use_noise_low_nats": noise}


@pytest.fixture
def fits(monkeypatch):
    """verdicts.fit_boundary recorded; each call returns distinct numbers."""
    return record_fit_boundary(monkeypatch, lambda kind, n, x, low, high, confidence:
                               BoundaryFit(kind, 0.5 + n, -1.0 - n, 10.0 + n, (low, high),
                                           confidence, 100 + n))


def _trials() -> tuple[pd.DataFrame, pd.Series]:
    rows = [("b0", "baseline", 0.0), ("p0", "free_transformer", 0.0),
            ("b1", "baseline", 1.0), ("p1", "free_transformer", 1.0),
            ("p2", "free_transformer", 2.0),  # seed 2 has no baseline
            ("p3", "free_transformer", 0.0)]
    trials = pd.DataFrame(rows, columns=["run_id", "model_kind", "seed"],
                          index=[10, 11, 12, 13, 14, 15])
    x = pd.Series([0.0, -2.0, 0.0, 1.0, 0.5, -0.5], index=trials.index)
    return trials, x


def _histories() -> pd.DataFrame:
    at = {  # step: {run: metrics}; listed out of step order
        200.0: {"b0": BASE, "b1": BASE, "p0": {**USED, **_classes(0.5, 0.5)},
                "p1": {**USED, **_classes(0.0, 0.0)}, "p2": USED,
                "p3": {**COLLAPSED, **_classes(0.0, 0.5)}},
        100.0: {"b0": BASE, "b1": BASE, "p0": {**COLLAPSED, **_classes(0.5, 0.0)},
                "p1": LEAKING, "p2": USED,
                "p3": {**USED, "eval/ce_prior_nats": float("nan")}},  # not evaluated
        300.0: {"b0": BASE, "p0": USED, "p1": LEAKING},  # b1 not at 300: p1 left out
        50.0: {"b0": BASE, "b1": BASE},  # no probe: no fit
    }
    rows = [{"run_id": run, "step": step, **metrics}
            for step, runs in at.items() for run, metrics in runs.items()]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)


def test_each_step_fits_the_probes_with_their_seeds_baseline_at_that_step(fits):
    trials, x = _trials()
    over = over_training.boundaries_over_training(_histories(), trials, x, Tolerances(), 0.8,
                                                  (-3.0, 2.0))
    assert fits == [
        ("collapse", [-2.0, 1.0], [True, False], -3.0, 2.0, 0.8, [0.0, 1.0]),
        ("leak", [-2.0, 1.0], [False, True], -3.0, 2.0, 0.8, [0.0, 1.0]),
        # every probe has the per-class measures at step 200: the regime onsets too
        ("collapse", [-2.0, 1.0, -0.5], [False, False, True], -3.0, 2.0, 0.8,
         [0.0, 1.0, 0.0]),
        ("leak", [-2.0, 1.0, -0.5], [False, False, False], -3.0, 2.0, 0.8, [0.0, 1.0, 0.0]),
        ("position", [-2.0, 1.0, -0.5], [True, False, False], -3.0, 2.0, 0.8,
         [0.0, 1.0, 0.0]),
        ("noise", [-2.0, 1.0, -0.5], [True, False, True], -3.0, 2.0, 0.8, [0.0, 1.0, 0.0]),
        ("broken", [-2.0, 1.0, -0.5], [False, False, False], -3.0, 2.0, 0.8,
         [0.0, 1.0, 0.0]),
        ("collapse", [-2.0], [False], -3.0, 2.0, 0.8, [0.0]),
        ("leak", [-2.0], [False], -3.0, 2.0, 0.8, [0.0]),
    ]
    assert list(over.columns) == over_training.COLUMNS
    assert over.to_dict("list") == {
        "step": [100, 100, 200, 200, 200, 200, 200, 300, 300],
        "kind": ["collapse", "leak", "collapse", "leak", "position", "noise", "broken",
                 "collapse", "leak"],
        "median_log2": [0.5 + n for n in range(1, 10)],
        "low_log2": [-1.0 - n for n in range(1, 10)],
        "high_log2": [10.0 + n for n in range(1, 10)],
        "trials": [100 + n for n in range(1, 10)]}
    assert over["step"].dtype == "int64"


def test_a_broken_probe_counts_in_every_onset_and_as_leaking(fits):
    trials, x = _trials()
    broken = {**USED, "eval/valid_rate": 0.1, "eval/valid_low": 0.05,
              "eval/valid_high": 0.15}
    histories = pd.DataFrame([{"run_id": r, "step": 7, **m} for r, m in
                              (("b0", BASE), ("b1", BASE), ("p0", broken),
                               ("p1", {**USED, **_classes(0.0, 0.0)}))])
    over = over_training.boundaries_over_training(histories, trials, x, Tolerances(), 0.9,
                                                  (-3.0, 2.0))
    assert [(c[0], c[2]) for c in fits] == [
        ("collapse", [False, False]), ("leak", [True, False]), ("position", [True, False]),
        ("noise", [True, False]), ("broken", [True, False])]
    assert list(over["step"]) == [7] * 5


def test_a_probe_left_out_at_a_step_leaves_the_probes_after_it_in(fits):
    """p0 (the first probe) not evaluated at step 1 and absent at step 2: p1 still fitted."""
    trials, x = _trials()
    histories = pd.DataFrame([{"run_id": r, "step": s, **m} for r, s, m in (
        ("b0", 1, BASE), ("b1", 1, BASE), ("p0", 1, {**USED, "eval/ce_prior_nats": float("nan")}),
        ("p1", 1, USED), ("b0", 2, BASE), ("b1", 2, BASE), ("p1", 2, LEAKING))])
    over = over_training.boundaries_over_training(histories, trials, x, Tolerances(), 0.9,
                                                  (-3.0, 2.0))
    assert [(c[0], c[1], c[2]) for c in fits] == [
        ("collapse", [1.0], [False]), ("leak", [1.0], [False]),
        ("collapse", [1.0], [False]), ("leak", [1.0], [True])]
    assert list(over["step"]) == [1, 1, 2, 2]


def test_no_histories_of_the_trials_no_rows(fits):
    trials, x = _trials()
    histories = pd.DataFrame([{"run_id": "other", "step": 1, **USED},
                              {"run_id": "p0", "step": 1, **USED}])
    over = over_training.boundaries_over_training(histories, trials, x, Tolerances(), 0.9,
                                                  (-3.0, 2.0))
    assert over.empty and list(over.columns) == over_training.COLUMNS and fits == []


def _over(kinds: dict[str, list[tuple[int, float]]]) -> pd.DataFrame:
    rows = [{"step": step, "kind": kind, "median_log2": m, "low_log2": m - 1,
             "high_log2": m + 1, "trials": 3}
            for kind, points in kinds.items() for step, m in points]
    return pd.DataFrame(rows)


def test_an_estimate_settles_when_its_last_medians_lie_within_the_tolerance():
    over = _over({"collapse": [(4, 0.0), (1, 5.0), (3, 0.5), (2, 0.0)],  # out of step order
                  "leak": [(1, 1.0), (2, 1.0)],  # two evaluations: not three
                  "position": [(1, 0.0), (2, 0.0), (3, 0.6)]})
    assert over_training.estimate_converged(over) == {"collapse": True, "leak": False,
                                                      "position": False}
    assert list(over_training.estimate_converged(over)) == ["collapse", "leak", "position"]
    assert over_training.estimate_converged(over, tol_log2=0.49)["collapse"] is False
    assert over_training.estimate_converged(over, tol_log2=0.6) == {
        "collapse": True, "leak": False, "position": True}
    assert over_training.estimate_converged(over, last=2) == {
        "collapse": True, "leak": True, "position": False}
    assert over_training.estimate_converged(over, last=4)["collapse"] is False


def test_no_evaluation_has_not_settled():
    over = _over({"noise": [(1, 0.0), (2, 0.0), (3, 0.0)]})
    assert over_training.estimate_converged(over) == {"collapse": False, "leak": False,
                                                      "noise": True}


@pytest.fixture
def saved(monkeypatch):
    """Figure.savefig recorded (the figure and its keywords), then done."""
    calls = []
    original = Figure.savefig

    def savefig(fig, path, **kwargs):
        calls.append((fig, kwargs))
        return original(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return calls


@pytest.mark.parametrize("label, title", [("kl_weight=1", "Boundaries over training "
                                           "kl_weight=1"), ("", "Boundaries over training")])
def test_the_figure_draws_each_estimate_and_its_interval_against_the_step(
        saved, tmp_path, label, title):
    over = _over({"leak": [(20, 1.0), (10, 2.0)], "collapse": [(10, -2.0), (20, -1.0)],
                  "broken": [(10, 0.0)]})
    path = over_training.plot_over_training(over, str(tmp_path / "a" / "b" / "o.png"), label)
    assert path == tmp_path / "a" / "b" / "o.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert over_training.plot_over_training(over, path.parent / "p.png").exists()  # again
    assert saved[1][0].axes[0].get_title() == "Boundaries over training"  # no label given
    fig, kwargs = saved[0]
    assert kwargs == {"dpi": 110, "bbox_inches": "tight"}
    assert tuple(fig.get_size_inches()) == (7.0, 4.0)
    (ax,) = fig.axes
    assert ax.get_subplotspec().get_geometry() == (1, 1, 0, 0)
    kinds = ["collapse", "leak", "broken"]  # the labels' order, the kinds present only
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == [BOUNDARY_LABELS[k] for k in kinds]
    points = {"collapse": ([10, 20], [0.25, 0.5]), "leak": ([10, 20], [4.0, 2.0]),
              "broken": ([10], [1.0])}
    for line, kind in zip(lines, kinds, strict=True):
        assert to_rgba(line.get_color()) == to_rgba(BOUNDARY_COLORS[kind])
        assert line.get_marker() == "o"
        assert (list(line.get_xdata()), list(line.get_ydata())) == points[kind]
    bands = ax.collections
    assert len(bands) == 3
    for band, kind in zip(bands, kinds, strict=True):
        assert tuple(band.get_facecolor()[0]) == pytest.approx(
            to_rgba(BOUNDARY_COLORS[kind], 0.2))
        xs, ys = points[kind]
        corners = {tuple(v) for v in band.get_paths()[0].vertices.tolist()}
        for step, y in zip(xs, ys, strict=True):  # from half to twice the estimate
            assert {(step, y / 2), (step, y * 2)} <= corners
    assert ax.get_yscale() == "log"
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "training step", "kappa (bits per token)", title)
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [BOUNDARY_LABELS[k] for k in kinds]
    assert {t.get_fontsize() for t in legend.get_texts()} == {8.0}
