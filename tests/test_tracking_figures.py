"""Tests for freetf.tracking.figures: what each panel of a run's curves draws, from which
metrics, in which units."""

from __future__ import annotations

import math
import types

import pytest

from freetf.tracking.figures import (
    draw_ce,
    metric_history,
    new_figure,
    plot_training_curves,
    save_figure,
    training_curves_figure,
)

pytestmark = pytest.mark.timeout(60)
LN2 = math.log(2.0)


def _lines(ax) -> list[tuple]:
    return [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()),
             line.get_linestyle(), line.get_marker()) for line in ax.get_lines()]


def test_metric_history_is_one_row_per_step_in_step_order():
    points = {("r1", "a"): [(5, 0.5), (2, 0.2)], ("r1", "b"): [(2, 2.0), (9, 9.0)],
              ("r2", "a"): [(1, 1.0)]}
    client = types.SimpleNamespace(get_metric_history=lambda run_id, key: [
        types.SimpleNamespace(step=s, value=v) for s, v in points.get((run_id, key), [])])
    assert metric_history(client, "r1", ("a", "b")) == [
        {"step": 2, "a": 0.2, "b": 2.0}, {"step": 5, "a": 0.5}, {"step": 9, "b": 9.0}]
    assert metric_history(client, "r1", ()) == []


def test_the_three_panels_draw_loss_kl_against_kappa_and_ce_prior_against_posterior():
    history = [{"step": 10, "train/loss": 3.0, "train/ce_nats": 2.5, "train/kl_bits": 0.5,
                "train/kl_nats": 99.0, "train/free_bits_nats": LN2,
                "eval/ce_prior_nats": 2.75, "eval/ce_posterior_nats": 2.25},
               {"step": 20, "train/loss": 2.0, "train/ce_nats": float("nan"),
                "train/kl_bits": 0.25, "train/free_bits_nats": 2 * LN2,
                "eval/ce_prior_nats": None},
               {"train/loss": 1.0}]  # no step: its index
    fig = training_curves_figure(history)
    loss, kl, ce = fig.axes
    assert _lines(loss) == [("total loss", [10, 20, 2], [3.0, 2.0, 1.0], "-", "None"),
                            ("reconstruction", [10], [2.5], "-", "None")]
    assert (loss.get_title(), loss.get_xlabel(), loss.get_ylabel()) == (
        "Loss", "step", "nats per token")
    assert _lines(kl) == [("raw KL", [10, 20], [0.5, 0.25], "-", "None"),
                          ("free bits kappa", [10, 20], [1.0, 2.0], "--", "None")]
    assert kl.get_lines()[0].get_color() == "tab:blue"
    assert kl.get_lines()[1].get_color() == "black"
    assert (kl.get_title(), kl.get_xlabel(), kl.get_ylabel()) == (
        "KL(Q(Z|S) || P(Z)) against kappa", "step", "bits per token")
    assert _lines(ce) == [("CE, Z from prior", [10], [2.75], "-", "o"),
                          ("CE, Z from posterior", [10], [2.25], "--", "s")]
    assert [line.get_markersize() for line in ce.get_lines()] == [3, 3]
    assert (ce.get_title(), ce.get_xlabel(), ce.get_ylabel()) == (
        "Eval CE: Z from prior vs posterior", "step", "nats per token")
    for ax in (loss, kl, ce):
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            line.get_label() for line in ax.get_lines()]
        assert ax.get_legend().get_texts()[0].get_fontsize() == 7
        assert ax.xaxis.get_gridlines()[0].get_visible()
        assert ax.xaxis.get_gridlines()[0].get_alpha() == 0.3
    assert list(fig.get_size_inches()) == [13, 3.6]


def test_kl_in_nats_only_is_drawn_in_bits_and_empty_panels_have_no_legend():
    history = [{"step": 1, "train/kl_nats": LN2, "train/free_bits_bits": 0.5}]
    loss, kl, ce = training_curves_figure(history).axes
    assert _lines(kl) == [("raw KL", [1], [1.0], "-", "None"),
                          ("free bits kappa", [1], [0.5], "--", "None")]
    assert loss.get_lines() == [] and ce.get_lines() == []
    assert loss.get_legend() is None and ce.get_legend() is None
    empty = training_curves_figure([]).axes[1]
    assert empty.get_lines() == [] and empty.get_legend() is None


def test_the_baseline_ce_is_a_line_when_finite():
    fig, axes = new_figure(4, 3, 1, 2)
    assert axes.shape == (1, 2) and list(fig.get_size_inches()) == [4, 3]
    assert fig.get_layout_engine() is not None
    draw_ce(axes[0][0], [], baseline_ce=2.5)
    draw_ce(axes[0][1], [], baseline_ce=float("nan"))
    (line,) = axes[0][0].get_lines()
    assert (line.get_label(), list(line.get_ydata()), line.get_linestyle(),
            line.get_color()) == ("baseline CE", [2.5, 2.5], ":", "tab:purple")
    assert axes[0][1].get_lines() == []


def test_a_figure_is_saved_as_png_in_a_new_folder(tmp_path):
    path = plot_training_curves([{"step": 1, "train/loss": 1.0}], tmp_path / "a" / "b" / "c.png")
    assert path == tmp_path / "a" / "b" / "c.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, _ = new_figure(2, 1, 1, 1)
    small = save_figure(fig, str(tmp_path / "s.png"), dpi=50)
    large = save_figure(fig, tmp_path / "l.png")
    from PIL import Image

    assert Image.open(small).size == (100, 50) and Image.open(large).size == (160, 80)
