"""Tests for freetf.results.phase: what each panel of the phase diagram draws, from a
judged runs table and stand-ins for the fitted boundaries.  No MLflow, no Ray."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib import rc_context
from matplotlib.colors import to_rgba
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.markers import MarkerStyle

from freetf.results import phase
from freetf.results.columns import BOUNDARY_COLORS

pytestmark = pytest.mark.timeout(120)

KEY = "training.free_bits_bits"


def _row(verdict, kappa, kl_weight, seed, cost=math.nan, valid=math.nan, **extra):
    return {"run_id": f"r{seed}-{kappa}-{kl_weight}", "verdict": verdict,
            "cost_nats": cost, "free_bits_bits": kappa, "kl_weight": kl_weight,
            "eval/valid_rate": valid, f"sampled.{KEY}": kappa,
            "sampled.training.kl_weight": kl_weight, "sampled.training.seed": seed,
            "sampled.model.latent_dim": 0 if verdict == "baseline" else 8, **extra}


def _trials() -> pd.DataFrame:
    return pd.DataFrame([
        _row("baseline", 1.0, 1.0, 0, valid=0.9),
        _row("baseline", 1.0, 1.0, 1, valid=0.8),
        _row("baseline", 1.0, 1.0, 2),  # no validity measured
        _row("leaking", 1.0, 0.5, 0, cost=0.5, valid=0.2),
        _row("collapsed", 0.25, 1.0, 0, cost=0.1, valid=0.9),
        _row("used", 0.25, 1.0, 1, cost=0.3, valid=0.7),
        _row("used", 1.0, 1.0, 0, cost=0.0),
        _row("unconverged", 4.0, 0.5, 0),  # not judged
    ])


def _fit(est, low, high, confidence=0.95):
    return SimpleNamespace(bits=(est, low, high), confidence=confidence)


def _analysis(trials, boundaries=()):
    return SimpleNamespace(trials=trials, key=KEY, boundaries=list(boundaries))


def _boundary(setting, fits):
    return SimpleNamespace(setting=setting, fits=lambda: fits)


@pytest.fixture
def drawn(monkeypatch):
    """The figures phase saves, then saved."""
    figures = []
    save = phase.save_figure

    def record(fig, path):
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(phase, "save_figure", record)
    return figures


def _errorbars(ax):
    """(label, x, y, x or y error segments, colour, marker) of each errorbar."""
    out = []
    for container in ax.containers:
        line, _, bars = container.lines
        out.append((container.get_label(), list(line.get_xdata()), list(line.get_ydata()),
                    [s.tolist() for s in bars[0].get_segments()],
                    to_rgba(line.get_color()), line.get_marker()))
    return out


def test_the_map_shows_p_used_per_probe_and_each_boundary_at_its_kl_weight(drawn, tmp_path):
    boundaries = [_boundary({"training.kl_weight": 1.0},
                            {"collapse": _fit(0.5, 0.25, 2.0), "leak": _fit(2.0, 1.0, 4.0, 0.9)}),
                  _boundary({}, {"position": _fit(1.0, 0.5, 1.5), "noise": _fit(1.0, 0.5, 3.0),
                                 "broken": _fit(4.0, 2.0, 8.0)})]
    path = phase.plot_phase_diagram(_analysis(_trials(), boundaries), tmp_path / "p" / "f.png")
    assert path == tmp_path / "p" / "f.png" and path.read_bytes()[:4] == b"\x89PNG"
    (fig,) = drawn
    assert tuple(fig.get_size_inches()) == pytest.approx((17.0, 4.8))
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
    ax_map, ax_cost, ax_valid, bar = fig.axes
    assert [ax.get_subplotspec().get_geometry() for ax in (ax_map, ax_cost, ax_valid)] == [
        (1, 3, 0, 0), (1, 3, 1, 1), (1, 3, 2, 2)]  # side by side
    points = ax_map.collections[0]  # then the boundaries' error bars
    square = MarkerStyle("s")
    np.testing.assert_array_equal(points.get_paths()[0].vertices, square.get_path().transformed(
        square.get_transform()).vertices)
    order = np.lexsort((points.get_offsets()[:, 1], points.get_offsets()[:, 0]))
    assert points.get_offsets()[order].tolist() == [[0.25, 1.0], [1.0, 0.5], [1.0, 1.0]]
    assert points.get_array()[order].tolist() == [0.5, 0.0, 1.0]  # the seeds' P(used)
    assert (points.get_cmap().name, points.get_clim()) == ("viridis", (0.0, 1.0))
    assert list(points.get_sizes()) == [260.0]
    assert bar.get_ylabel() == "P(used) over seeds"
    # each boundary at its median with its interval, shifted off its kl_weight's row
    assert _errorbars(ax_map) == [
        ("kappa_c (95%)", [0.5], [1.15], [[[0.25, 1.15], [2.0, 1.15]]],
         to_rgba(BOUNDARY_COLORS["collapse"]), "D"),
        ("kappa_l (90%)", [2.0], [1 / 1.15], [[[1.0, 1 / 1.15], [4.0, 1 / 1.15]]],
         to_rgba(BOUNDARY_COLORS["leak"]), "D"),
        # no kl_weight in the setting: the row of the first judged trial (0.5)
        ("kappa_pos (95%)", [1.0], [0.5 * 1.35], [[[0.5, 0.5 * 1.35], [1.5, 0.5 * 1.35]]],
         to_rgba(BOUNDARY_COLORS["position"]), "D"),
        ("kappa_noise (95%)", [1.0], [0.5 / 1.35], [[[0.5, 0.5 / 1.35], [3.0, 0.5 / 1.35]]],
         to_rgba(BOUNDARY_COLORS["noise"]), "D"),
        ("kappa_broken (95%)", [4.0], [0.5 * 1.6], [[[2.0, 0.8], [8.0, 0.8]]],
         to_rgba(BOUNDARY_COLORS["broken"]), "D")]
    for container in ax_map.containers:
        line, caps, _ = container.lines
        assert line.get_markersize() == 8 and caps[0].get_markersize() == 2 * 5
    assert ax_map.get_yscale() == "log" and ax_map.get_ylim() == pytest.approx((0.2, 2.5))
    for ax in (ax_map, ax_cost, ax_valid):
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
        assert ax.get_xlabel() == "free bits kappa (bits per token)"
        for axis in (ax.xaxis, ax.yaxis):
            for kw in (axis._major_tick_kw, axis._minor_tick_kw):
                assert kw.get("gridOn") and kw.get("grid_alpha") == 0.3
    assert (ax_map.get_ylabel(), ax_map.get_title()) == ("kl_weight (beta)",
                                                         "P(used) and the boundaries")
    legend = ax_map.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "kappa_c (95%)", "kappa_l (90%)", "kappa_pos (95%)", "kappa_noise (95%)",
        "kappa_broken (95%)"]
    assert [to_rgba(h.get_color()[0]) for h in legend.legend_handles] == [
        to_rgba(BOUNDARY_COLORS[kind])
        for kind in ("collapse", "leak", "position", "noise", "broken")]
    assert legend.get_texts()[0].get_fontsize() == 8 and legend._loc == 2  # upper left
    assert fig._suptitle.get_text() == "Phase diagram (4 trials against their baselines)"
    assert fig._suptitle.get_fontsize() == 10


def test_the_cost_and_validity_panels_show_each_settings_mean_and_seed_sd(drawn, tmp_path):
    trials = _trials().assign(**{"eval/bits_per_byte": math.nan})  # a metric left empty
    phase.plot_phase_diagram(_analysis(trials), tmp_path / "f.png")
    (fig,) = drawn
    ax_map, ax_cost, ax_valid, _ = fig.axes
    assert len(ax_map.containers) == 0 and ax_map.get_legend() is None
    sd = float(np.std([0.1, 0.3], ddof=1))

    def bars(ax):
        return [(label, x, pytest.approx(y), pytest.approx(np.ravel(err).tolist()), marker)
                for label, x, y, err, _, marker in _errorbars(ax)]

    assert bars(ax_cost) == [  # settings by label; one seed: no sd
        ("kl_weight=0.5", [1.0], [0.5], [1.0, 0.5, 1.0, 0.5], "o"),
        ("kl_weight=1", [0.25, 1.0], [0.2, 0.0],
         [0.25, 0.2 - sd, 0.25, 0.2 + sd, 1.0, 0.0, 1.0, 0.0], "s")]
    for container in ax_cost.containers:
        assert container.lines[1][0].get_markersize() == 2 * 4
    (zero,) = ax_cost.get_lines()[-1:]
    assert list(zero.get_ydata()) == [0.0, 0.0]
    assert (to_rgba(zero.get_color()), zero.get_linewidth()) == (to_rgba("k"), 0.8)
    assert (ax_cost.get_ylabel(), ax_cost.get_title()) == (
        "honest CE (one draw) - baseline", "cost of Z: mean and seed sd per probe")
    assert ax_cost.get_legend().get_texts()[0].get_fontsize() == 8
    assert bars(ax_valid) == [  # only the trials with a validity
        ("kl_weight=0.5", [1.0], [0.2], [1.0, 0.2, 1.0, 0.2], "o"),
        ("kl_weight=1", [0.25], [0.8], [0.25, 0.8 - sd, 0.25, 0.8 + sd], "o")]
    for container in ax_valid.containers:
        assert container.lines[1][0].get_markersize() == 2 * 4
    base = _line(ax_valid, "baseline (2 seeds)")
    assert list(base.get_ydata()) == pytest.approx([0.85, 0.85])
    assert (to_rgba(base.get_color()), base.get_linestyle()) == (to_rgba("tab:purple"), "--")
    legend = ax_valid.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["baseline (2 seeds)",
                                                          "kl_weight=0.5", "kl_weight=1"]
    assert legend.get_texts()[0].get_fontsize() == 8
    assert (ax_valid.get_ylabel(), ax_valid.get_title()) == (
        "valid free generations", "validity with Z from the prior")
    assert ax_valid.get_ylim() == pytest.approx((-0.05, 1.05))
    assert len(ax_valid.texts) == 0


def _line(ax, label):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_settings_are_the_other_sampled_keys_and_all_without_one(drawn, tmp_path):
    trials = _trials()
    trials["sampled.training.kl_annealing.type"] = "linear"
    trials["kl_annealing"] = "linear"
    phase.plot_phase_diagram(_analysis(trials), tmp_path / "f.png")
    labels = [c.get_label() for c in drawn[-1].axes[1].containers]
    assert labels == ["kl_weight=0.5,type=linear", "kl_weight=1,type=linear"]
    three = pd.concat([_trials(), pd.DataFrame([_row("used", 2.0, 2.0, 0, cost=0.2)])])
    phase.plot_phase_diagram(_analysis(three), tmp_path / "h.png")
    containers = drawn[-1].axes[1].containers
    assert [(c.get_label(), c.lines[0].get_marker()) for c in containers] == [
        ("kl_weight=0.5", "o"), ("kl_weight=1", "s"), ("kl_weight=2", "D")]
    trials = _trials().drop(columns=["sampled.training.kl_weight"])
    trials = trials[trials["kl_weight"] == 1.0]
    phase.plot_phase_diagram(_analysis(trials), tmp_path / "g.png")
    ax_map, ax_cost, ax_valid, _ = drawn[-1].axes
    assert [c.get_label() for c in ax_cost.containers] == ["all"]
    points = ax_map.collections[0]
    assert sorted(points.get_array().tolist()) == [0.5, 1.0]
    assert points.get_clim() == (0.0, 1.0)  # P(used) on its whole scale, not the data's
    assert ax_map.get_ylim() == pytest.approx((0.4, 2.5))  # one weight: still a band
    assert drawn[-1]._suptitle.get_text() == "Phase diagram (3 trials against their baselines)"


def test_p_used_keeps_its_scale_colormap_and_title_size_whatever_the_data_and_style(
        drawn, tmp_path):
    trials = _trials()
    trials = trials[~((trials["verdict"] == "used") & (trials["free_bits_bits"] == 1.0))]
    with rc_context({"image.cmap": "magma", "font.size": 7.0}):
        phase.plot_phase_diagram(_analysis(trials), tmp_path / "f.png")
    (fig,) = drawn
    points = fig.axes[0].collections[0]
    assert sorted(points.get_array().tolist()) == [0.0, 0.5]
    assert points.get_clim() == (0.0, 1.0)
    assert points.get_cmap().name == "viridis"
    assert fig._suptitle.get_fontsize() == 10


def test_without_validity_the_panel_says_so(drawn, tmp_path):
    trials = _trials()
    trials["eval/valid_rate"] = math.nan
    phase.plot_phase_diagram(_analysis(trials), tmp_path / "f.png")
    _, _, ax_valid, _ = drawn[-1].axes
    (text,) = ax_valid.texts
    assert text.get_text() == "no free-generation validity (synthetic task only)"
    assert (text.get_position(), text.get_horizontalalignment()) == ((0.5, 0.5), "center")
    assert text.get_transform() == ax_valid.transAxes
    assert len(ax_valid.containers) == 0 and ax_valid.get_legend() is None


@pytest.mark.parametrize("trials", [
    _trials().drop(columns=["cost_nats"]),  # never judged
    _trials().assign(cost_nats=math.nan),  # no baseline for any trial
])
def test_no_trial_judged_each_panel_says_so(drawn, tmp_path, trials):
    path = phase.plot_phase_diagram(_analysis(trials), tmp_path / "f.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    (fig,) = drawn
    assert len(fig.axes) == 3
    for ax in fig.axes:
        (text,) = ax.texts
        assert text.get_text() == "no trials judged against a baseline"
        assert (text.get_position(), text.get_horizontalalignment()) == ((0.5, 0.5),
                                                                         "center")
        assert text.get_transform() == ax.transAxes
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
        assert ax.get_xlabel() == "free bits kappa (bits per token)"
        assert len(ax.collections) == 0


def test_probe_stats_are_the_mean_sd_and_count_per_setting_and_kappa():
    df = pd.DataFrame({"_label": ["a", "a", "a", "b"], "_kappa": [1.0, 1.0, 2.0, 1.0],
                       "v": [1.0, 3.0, 5.0, 7.0]})
    stats = phase._probe_stats(df, "v")
    assert list(stats.columns) == ["_label", "_kappa", "mean", "std", "count"]
    assert stats[["_label", "_kappa", "mean", "count"]].values.tolist() == [
        ["a", 1.0, 2.0, 2], ["a", 2.0, 5.0, 1], ["b", 1.0, 7.0, 1]]
    assert stats["std"].iloc[0] == pytest.approx(math.sqrt(2.0))
    assert stats["std"].iloc[1:].isna().all()


def test_every_setting_has_its_cost_line_past_the_seventh_marker(drawn, tmp_path):
    trials = pd.DataFrame([_row("used", 1.0, float(w), 0, cost=0.1 * w) for w in range(1, 10)])
    phase.plot_phase_diagram(_analysis(trials), tmp_path / "f.png")
    containers = drawn[-1].axes[1].containers
    assert [(c.get_label(), c.lines[0].get_marker()) for c in containers] == [
        (f"kl_weight={w}", m) for w, m in zip(range(1, 10), "osD^v<>os", strict=True)]
