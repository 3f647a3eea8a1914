"""Tests for freetf.results.sweep_figures: what each panel of the sweep's figures draws,
from a runs table and a stand-in for MLflow's client.  No MLflow, no Ray (the figures
against a real store: tests/test_tracking_sweep_runs.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from freetf.results import sweep_figures
from freetf.results.columns import VERDICT_COLORS

pytestmark = pytest.mark.timeout(120)

GRAY = to_rgba("tab:gray")


def _runs(rows: list[dict]) -> pd.DataFrame:
    base = {"stopped_early": False, "eval/kl_bits": 1.0, "eval/ce_gap_nats": 0.1,
            "eval/ce_prior_nats": 1.5, "free_bits_bits": 1.0, "verdict": "", "outcome": ""}
    return pd.DataFrame([{**base, **row} for row in rows])


def _scatters(ax) -> list[tuple]:
    """(points, edge colour, face colour or None when hollow, size) of each scatter."""
    out = []
    for c in ax.collections:
        face = c.get_facecolor()
        out.append(([tuple(p) for p in c.get_offsets().tolist()],
                    tuple(c.get_edgecolor()[0]) if len(c.get_edgecolor()) else None,
                    tuple(face[0]) if len(face) else None, list(c.get_sizes())))
    return out


def _line(ax, label: str):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_kl_vs_kappa_draws_each_trial_by_its_verdict_hollow_when_stopped_early():
    runs = _runs([
        {"verdict": "used", "free_bits_bits": 2.0, "eval/kl_bits": 3.0,
         "eval/ce_gap_nats": 0.5},
        {"verdict": "collapsed", "free_bits_bits": 0.25, "eval/kl_bits": 0.01,
         "eval/ce_gap_nats": 0.02, "stopped_early": True},  # every collapsed one hollow
        {"verdict": "used", "free_bits_bits": 1.0, "eval/kl_bits": 1.5,
         "eval/ce_gap_nats": 0.3, "stopped_early": 1},
        {"verdict": "", "outcome": "failed", "free_bits_bits": 4.0, "eval/kl_bits": 2.5,
         "eval/ce_gap_nats": -0.1},  # no verdict: drawn as how it ended
        {"verdict": "odd", "free_bits_bits": 0.5, "eval/kl_bits": 0.2,
         "eval/ce_gap_nats": 0.0},  # a verdict without a colour: gray
        {"verdict": "baseline", "free_bits_bits": math.nan},  # no kappa: not drawn
        {"verdict": "used", "free_bits_bits": 0.0},  # kappa 0: no place on a log axis
    ])
    fig = sweep_figures.kl_vs_kappa_figure(runs)
    assert tuple(fig.get_size_inches()) == (11.0, 4.0)
    ax_kl, ax_gap = fig.axes[:2]
    blue, gray, green = (to_rgba(VERDICT_COLORS["collapsed"]), GRAY,
                         to_rgba(VERDICT_COLORS["used"]))
    # per verdict (sorted): the trials run to the end (filled), then those stopped early
    assert _scatters(ax_kl) == [
        ([], blue, blue, [60.0]), ([(0.25, 0.01)], blue, None, [60.0]),
        ([(4.0, 2.5)], gray, gray, [60.0]), ([], gray, None, [60.0]),
        ([(0.5, 0.2)], gray, gray, [60.0]), ([], gray, None, [60.0]),
        ([(2.0, 3.0)], green, green, [60.0]), ([(1.0, 1.5)], green, None, [60.0])]
    assert [s[0] for s in _scatters(ax_gap)] == [
        [], [(0.25, 0.02)], [(4.0, -0.1)], [], [(0.5, 0.0)], [], [(2.0, 0.5)], [(1.0, 0.3)]]
    # one legend entry per verdict (a verdict all stopped early: its hollow marker)
    for ax in (ax_kl, ax_gap):
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels[:5] == ["collapsed", "collapsed", "failed", "odd", "used"]
        assert {t.get_fontsize() for t in ax.get_legend().get_texts()} == {7.0}
    diagonal = _line(ax_kl, "KL = kappa")
    assert list(diagonal.get_xdata()) == list(diagonal.get_ydata()) == [0.25, 0.5, 1.0,
                                                                        2.0, 4.0]
    assert (diagonal.get_linestyle(), to_rgba(diagonal.get_color())) == (":", to_rgba("k"))
    assert ax_kl.get_ylim() == (0.0, 8.0)  # twice the larger of the largest KL and kappa
    for ax in (ax_kl, ax_gap):
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert ax_kl.get_yscale() == "symlog"
    assert ax_kl.yaxis.get_transform().linthresh == 0.01
    (zero,) = ax_gap.get_lines()
    assert list(zero.get_ydata()) == [0.0, 0.0]
    assert (to_rgba(zero.get_color()), zero.get_linewidth()) == (to_rgba("k"), 0.5)
    assert (ax_kl.get_xlabel(), ax_kl.get_ylabel(), ax_kl.get_title()) == (
        "free bits kappa (bits per token)", "final raw KL (bits per token)",
        "KL against its kappa (hollow: stopped early)")
    assert (ax_gap.get_xlabel(), ax_gap.get_ylabel(), ax_gap.get_title()) == (
        "free bits kappa (bits per token)", "CE prior - CE posterior (nats per token)",
        "CE gap")
    assert len(ax_kl.texts) == 0


def test_the_kl_axis_reaches_twice_the_largest_kappa_above_the_largest_kl():
    runs = _runs([{"verdict": "collapsed", "free_bits_bits": 4.0, "eval/kl_bits": 0.5}])
    ax_kl, _ = sweep_figures.kl_vs_kappa_figure(runs).axes[:2]
    assert ax_kl.get_ylim() == (0.0, 8.0)
    labels = [t.get_text() for t in ax_kl.get_legend().get_texts()]
    assert labels == ["collapsed", "KL = kappa"]  # drawn filled: the hollow one unlabelled


@pytest.mark.parametrize("runs", [
    pd.DataFrame(),
    _runs([{"verdict": "baseline", "free_bits_bits": math.nan},
           {"verdict": "used", "free_bits_bits": 0.0}]),
])
def test_kl_vs_kappa_without_a_kappa_says_so(runs):
    fig = sweep_figures.kl_vs_kappa_figure(runs)
    ax_kl, ax_gap = fig.axes[:2]
    (text,) = ax_kl.texts
    assert text.get_text() == "no trials with a free-bits kappa"
    assert (text.get_position(), text.get_horizontalalignment()) == ((0.5, 0.5), "center")
    assert text.get_transform() == ax_kl.transAxes
    assert len(ax_kl.collections) == len(ax_kl.get_lines()) == len(ax_gap.get_lines()) == 0
    assert ax_kl.get_xscale() == "linear"
    assert ax_kl.get_title() == "KL against its kappa (hollow: stopped early)"
    assert ax_gap.get_title() == "CE gap"


class _Client:
    """MLflow's get_metric_history over {run_id: {key: [(step, value)]}}, recorded."""

    def __init__(self, histories):
        self.histories, self.asked = histories, []

    def get_metric_history(self, run_id, key):
        self.asked.append((run_id, key))
        return [SimpleNamespace(step=s, value=v)
                for s, v in self.histories.get(run_id, {}).get(key, [])]


def _curves_runs():
    return _runs([
        {"run_id": "b0", "run_name": "s/base 0", "sweep": "s", "verdict": "baseline",
         "eval/ce_prior_nats": 1.0},
        {"run_id": "t1", "run_name": "s/kappa=1/4 s1", "sweep": "s", "verdict": "leaking"},
        {"run_id": "b1", "run_name": "s/base 1", "sweep": "s", "verdict": "baseline",
         "eval/ce_prior_nats": 2.0},
        {"run_id": "t2", "run_name": "kappa=1 s0", "sweep": "s", "verdict": "",
         "outcome": "failed"},
        {"run_id": "t3", "run_name": "kappa=2 s0", "sweep": "s", "verdict": "used"},
    ])


def test_sweep_curves_draw_one_row_per_trial_with_the_baselines_ce():
    client = _Client({"t1": {"train/kl_bits": [(1, 0.5), (2, 1.0)],
                             "eval/ce_prior_nats": [(2, 1.9)]},
                      "t2": {"train/kl_bits": [(1, 0.25)]}})
    fig = sweep_figures.sweep_curves_figure(client, _curves_runs(), max_trials=2)
    assert tuple(fig.get_size_inches()) == pytest.approx((11.0, 1.2 + 2.3 * 2))
    assert [run for run, _ in client.asked] == ["t1"] * 8 + ["t2"] * 8  # the first two
    assert {key for _, key in client.asked} == set(sweep_figures.CURVE_METRICS)
    (kl1, ce1), (kl2, ce2) = (fig.axes[0], fig.axes[1]), (fig.axes[2], fig.axes[3])
    assert kl1.get_title(loc="left") == "kappa=1/4 s1: leaking"
    assert kl2.get_title(loc="left") == "kappa=1 s0: failed"
    assert to_rgba(kl1._left_title.get_color()) == to_rgba(VERDICT_COLORS["leaking"])
    assert to_rgba(kl2._left_title.get_color()) == GRAY
    assert kl1._left_title.get_fontsize() == 9
    assert list(_line(kl1, "raw KL").get_ydata()) == [0.5, 1.0]
    assert to_rgba(_line(kl1, "raw KL").get_color()) == to_rgba(VERDICT_COLORS["leaking"])
    assert to_rgba(_line(kl2, "raw KL").get_color()) == GRAY
    assert list(_line(ce1, "CE, Z from prior").get_ydata()) == [1.9]
    for ce in (ce1, ce2):  # the baselines' mean CE
        assert list(_line(ce, "baseline CE").get_ydata()) == [1.5, 1.5]
    for ax in fig.axes:
        assert ax.get_legend() is not None  # finished: grid and legend
        assert ax.xaxis._major_tick_kw.get("gridOn") is True
    assert fig._suptitle.get_text() == (
        "Per trial: raw KL vs kappa (bits/token) | CE prior vs posterior vs baseline "
        "(nats/token)")
    assert fig._suptitle.get_fontsize() == 10


def test_sweep_curves_show_sixteen_trials_by_default():
    runs = _runs([{"run_id": f"t{i}", "run_name": f"t{i}", "verdict": "used"}
                  for i in range(18)])
    client = _Client({})
    fig = sweep_figures.sweep_curves_figure(client, runs)
    assert len(fig.axes) == 2 * 16
    assert sorted({run for run, _ in client.asked}) == sorted(f"t{i}" for i in range(16))
    assert not any(ax.get_lines() and ax.get_lines()[-1].get_label() == "baseline CE"
                   for ax in fig.axes)
    assert fig._suptitle.get_text() == (
        "Per trial: raw KL vs kappa (bits/token) | CE prior vs posterior (nats/token)")
    assert [ax.get_title(loc="left") for ax in fig.axes[::2]][:2] == ["t0: used", "t1: used"]


@pytest.mark.parametrize("runs", [pd.DataFrame(), _curves_runs().iloc[[0, 2]]])
def test_sweep_curves_without_trials_say_so(runs):
    client = _Client({})
    fig = sweep_figures.sweep_curves_figure(client, runs)
    assert tuple(fig.get_size_inches()) == pytest.approx((11.0, 3.5))
    ax_kl, ax_ce = fig.axes
    (text,) = ax_kl.texts
    assert text.get_text() == "no trial runs"
    assert (text.get_position(), text.get_horizontalalignment()) == ((0.5, 0.5), "center")
    assert text.get_transform() == ax_kl.transAxes
    assert client.asked == [] and len(ax_ce.texts) == 0
    assert fig._suptitle.get_text().endswith(
        "CE prior vs posterior" + (" vs baseline" if len(runs) else "") + " (nats/token)")


def test_plotting_writes_the_figures_pngs(tmp_path):
    runs = _runs([{"run_id": "t1", "run_name": "t1", "verdict": "used"}])
    client = _Client({"t1": {"train/kl_bits": [(1, 0.5)]}})
    for path in (sweep_figures.plot_kl_vs_kappa(runs, tmp_path / "a" / "kl.png"),
                 sweep_figures.plot_sweep_curves(client, runs, str(tmp_path / "b" / "c.png"),
                                                 max_trials=1)):
        assert path.read_bytes()[:4] == b"\x89PNG"
    assert client.asked[0] == ("t1", sweep_figures.CURVE_METRICS[0])


def test_kl_vs_kappa_is_one_row_of_two_panels_and_labels_the_filled_markers():
    """Two axes, no more; a verdict's legend entry is its filled marker when it has trials
    run to the end, its hollow one only when all of them stopped early."""
    runs = _runs([
        {"verdict": "used", "free_bits_bits": 2.0},
        {"verdict": "used", "free_bits_bits": 1.0, "stopped_early": True},
        {"verdict": "collapsed", "free_bits_bits": 0.5, "stopped_early": True},
    ])
    fig = sweep_figures.kl_vs_kappa_figure(runs)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        labelled = [(c.get_label(), c.get_facecolor()[0][3] if len(c.get_facecolor()) else 0)
                    for c in ax.collections if not c.get_label().startswith("_")]
        # (label, face alpha): collapsed twice (its empty filled one and its hollow one),
        # used once, by its filled marker
        assert labelled == [("collapsed", 1.0), ("collapsed", 0), ("used", 1.0)]


def test_a_trial_with_a_kappa_is_drawn_whatever_else_it_lacks():
    """Only a missing kappa keeps a trial off the figure: a NaN CE gap does not."""
    runs = _runs([{"verdict": "used", "free_bits_bits": 1.0, "eval/kl_bits": 1.5,
                   "eval/ce_gap_nats": math.nan}])
    ax_kl, _ = sweep_figures.kl_vs_kappa_figure(runs).axes
    assert [s[0] for s in _scatters(ax_kl)] == [[(1.0, 1.5)], []]
    assert len(ax_kl.texts) == 0


def test_sweep_curves_draw_a_verdict_without_a_colour_in_gray_and_keep_their_title_size():
    """A verdict outside VERDICT_COLORS is gray; the suptitle is 10 points whatever the
    style's font size."""
    import matplotlib

    runs = _runs([{"run_id": "t1", "run_name": "t1", "verdict": "odd"}])
    client = _Client({"t1": {"train/kl_bits": [(1, 0.5)]}})
    with matplotlib.rc_context({"font.size": 7}):
        fig = sweep_figures.sweep_curves_figure(client, runs)
    ax_kl = fig.axes[0]
    assert ax_kl.get_title(loc="left") == "t1: odd"
    assert to_rgba(ax_kl._left_title.get_color()) == GRAY
    assert to_rgba(_line(ax_kl, "raw KL").get_color()) == GRAY
    assert fig._suptitle.get_fontsize() == 10


def test_plotting_the_curves_shows_sixteen_trials_unless_told(tmp_path, monkeypatch):
    asked = []

    def figure(client, runs, max_trials):
        asked.append(max_trials)
        return "fig"

    monkeypatch.setattr(sweep_figures, "sweep_curves_figure", figure)
    monkeypatch.setattr(sweep_figures, "save_figure", lambda fig, path: (fig, path))
    assert sweep_figures.plot_sweep_curves(None, None, tmp_path / "c.png") == (
        "fig", tmp_path / "c.png")
    sweep_figures.plot_sweep_curves(None, None, tmp_path / "c.png", max_trials=3)
    assert asked == [16, 3]
