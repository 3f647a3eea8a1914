"""Tests for freetf.results.columns: what a trial is shown as, log2 of the boundary key,
trial names, the searched range and how a figure is written.  No MLflow, no Ray."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from freetf.results.columns import (
    log2_range,
    save_figure,
    shown,
    shown_column,
    trial_label,
    x_column,
)

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("row, expected", [
    ({"verdict": "used", "outcome": "finished"}, "used"),
    ({"verdict": "", "outcome": "failed"}, "failed"),  # no verdict: how it ended
    ({"verdict": math.nan, "outcome": "stopped"}, "stopped"),  # a missing tag read as NaN
    ({"outcome": "interrupted"}, "interrupted"),
    ({"verdict": "", "outcome": ""}, "unknown"),
    ({"verdict": math.nan, "outcome": None}, "unknown"),
    ({}, "unknown"),
])
def test_a_trial_is_shown_as_its_verdict_else_how_it_ended(row, expected):
    assert shown(row) == expected
    assert shown(pd.Series(row, dtype=object)) == expected


def test_the_shown_column_is_shown_of_every_row():
    df = pd.DataFrame({"verdict": ["leaking", "", None], "outcome": ["x", "failed", None]})
    assert list(shown_column(df)) == ["leaking", "failed", "unknown"]
    empty = shown_column(df.iloc[:0])
    assert len(empty) == 0 and empty.dtype == object


def test_x_is_log2_of_kappa_in_bits_or_of_the_sampled_key():
    df = pd.DataFrame({"free_bits_bits": [0.25, 4.0, 0.0, -1.0],
                       "sampled.training.kl_weight": ["0.5", "2", "1", "8"]})
    for key in ("training.free_bits_bits", "training.free_bits"):  # both read bits
        x = x_column(df, key)
        assert list(x[:2]) == [-2.0, 2.0] and x[2:].isna().all()  # kappa <= 0: no log
    assert list(x_column(df, "training.kl_weight")) == [-1.0, 1.0, 0.0, 3.0]
    assert list(x_column(df, "training.kl_weight").index) == list(df.index)
    with pytest.raises(KeyError):  # any other key is a sampled column, never free bits
        x_column(df, "training.free_bits_nats")


@pytest.mark.parametrize("row, expected", [
    ({"run_name": "search_kl/free_bits_bits=0.25", "sweep": "search_kl"},
     "free_bits_bits=0.25"),
    ({"run_name": "kappa=1/4 s1", "sweep": "search_kl"}, "kappa=1/4 s1"),
    ({"run_name": "search_klx/a", "sweep": "search_kl"}, "search_klx/a"),
    ({"run_name": "search_kl", "sweep": "search_kl"}, "search_kl"),
    ({"run_name": "s/a/b", "sweep": "s"}, "a/b"),
    ({"run_name": "s/a", "sweep": None}, "s/a"),
    ({"run_name": "s/a", "sweep": ""}, "s/a"),
    ({"run_name": "s/a"}, "s/a"),
    ({"run_name": "XXXX/y"}, "XXXX/y"),  # without a sweep any name stays whole
    ({"run_name": 7, "sweep": "s"}, "7"),
])
def test_a_trial_is_named_by_its_run_name_without_the_sweeps_prefix(row, expected):
    assert trial_label(row) == expected


def test_a_figure_is_saved_at_100_dpi_into_new_folders(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=(2.0, 1.5), dpi=50)  # saved at 100 dpi whatever the figure's own
    FigureCanvasAgg(fig)
    path = save_figure(fig, str(tmp_path / "a" / "b" / "f.png"))
    assert path == tmp_path / "a" / "b" / "f.png"
    with Image.open(path) as image:
        assert image.size == (200, 150)
    again = save_figure(fig, tmp_path / "a" / "b" / "g.png")  # the folder exists now
    assert again.exists()


def test_the_searched_range_is_log2_of_the_smallest_and_largest_value():
    assert log2_range((1.0, 0.25, 4)) == (-2.0, 2.0)
    assert log2_range(("0.5", "16", "2")) == (-1.0, 4.0)  # values as written in a spec
    assert log2_range((8,)) == (3.0, 3.0)
    for values, low in (((0.0, 1.0), "0.0"), ((-0.5, 2.0), "-0.5")):
        with pytest.raises(ValueError, match=f"^kappa must be > 0 bits, got {low}$"):
            log2_range(values)
    assert np.isfinite(log2_range((1e-3, 1e3))).all()
