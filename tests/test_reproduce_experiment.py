"""freetf.experiments.reproduce's pieces against references written out here: the rows'
names and order, the per-run and summary tables whole, the regime counts, the judgement
of a trial, the located section, the files written and merged, the figure's data, and the
measurement and the in-process and Tune drivers with what they call stood in for."""

from __future__ import annotations

import json
import math
import struct
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from freetf.config import load_config
from freetf.experiments import reproduce
from freetf.tracking import tags

pytestmark = pytest.mark.timeout(60)

NAN = float("nan")
LN2 = math.log(2)


def test_a_rows_name_is_its_kappa_or_baseline_and_its_seed():
    assert reproduce.row_name({"kappa_bits": None, "seed": 3}) == "baseline, seed 3"
    assert reproduce.row_name({"kappa_bits": 0.015625, "seed": 0}) == "0.015625 bits, seed 0"
    assert reproduce.row_name({"kappa_bits": 8.0, "seed": 12}) == "8 bits, seed 12"


def test_rows_sort_baselines_first_then_by_options_kappa_and_seed():
    rows = [{"kappa_bits": 0.5, "seed": 1, "options": ""},
            {"kappa_bits": None, "seed": 1, "options": ""},
            {"kappa_bits": 0.125, "seed": 0, "options": "x=1"},
            {"kappa_bits": 2.0, "seed": 0, "options": ""},
            {"kappa_bits": None, "seed": 0},  # no options: the defaults ("")
            {"kappa_bits": 0.125, "seed": 2},
            {"kappa_bits": 0.5, "seed": 0, "options": ""}]
    got = [(r["kappa_bits"], r["seed"], r.get("options")) for r in reproduce.sort_rows(rows)]
    assert got == [(None, 0, None), (None, 1, ""), (0.125, 2, None), (0.5, 0, ""),
                   (0.5, 1, ""), (2.0, 0, ""), (0.125, 0, "x=1")]


def test_regime_counts_most_frequent_first_then_by_name_then_the_unconverged():
    rows = [{"regime": "position", "converged": 1.0},
            {"regime": "position"},  # no convergence measured: counted
            {"regime": "nothing", "converged": 1.0},
            {"regime": "broken", "converged": 1.0},
            {"regime": "position", "converged": 0.0},
            {"regime": "nothing", "converged": 0.0},
            {"regime": None, "converged": 0.0},  # no regime: not counted at all
            {"regime": "", "converged": 1.0},
            {"converged": 1.0}]
    assert reproduce.regime_counts(rows) == "position 2, broken 1, nothing 1, 2 unconverged"
    assert reproduce.regime_counts(rows[:4]) == "position 2, broken 1, nothing 1"
    assert reproduce.regime_counts(rows[4:6]) == "2 unconverged"
    assert reproduce.regime_counts(rows[6:]) == "–"
    assert reproduce.regime_counts([]) == "–"


HEADER = ("| κ (bits) | seed | KL (bits/token) | CE gap prior−post. (nats) | honest CE (nats) "
          "| honest bound above floor (nats) | pos. spread, indep. Z | pos. spread, shared Z "
          "| noise overlap, indep. | noise overlap, shared | valid, indep. | valid, shared "
          "| verdict | Z carries | paper's row |\n" + "|---" * 15 + "|")
RUNS = [{"kappa_bits": None, "seed": 0, "kl_bits": None, "ce_gap": NAN, "ce_prior": 0.5,
         "excess_iw_nats": 0.01234, "independent/position_spread": 3.14159,
         "shared/position_spread": 2.0, "independent/noise_overlap": 0.1,
         "shared/noise_overlap": 0.123, "independent/valid_rate": 1.0,
         "shared/valid_rate": 0.96, "verdict": "baseline", "regime": None, "reproduces": None},
        {"kappa_bits": 0.125, "seed": 1, "kl_bits": 0.25, "ce_gap": 0.0626, "ce_prior": 0.4,
         "excess_iw_nats": NAN, "independent/position_spread": NAN,
         "shared/position_spread": 1.0, "independent/noise_overlap": 0.2,
         "shared/noise_overlap": 0.35, "independent/valid_rate": 0.5,
         "shared/valid_rate": 0.25, "verdict": "used", "regime": "position",
         "reproduces": True},
        {"kappa_bits": 8.0, "seed": 2, "reproduces": False},
        {"kappa_bits": 1 / 3, "seed": 3, "verdict": "collapsed", "reproduces": "?"}]
RUNS_TABLE = HEADER + "\n" + "\n".join([
    "| baseline | 0 | – | – | 0.500 | 0.012 | 3.1 | 2.0 | 0.10 | 0.12 | 1.00 | 0.96 | baseline "
    "| – | – |",
    "| 0.125 | 1 | 0.250 | 0.063 | 0.400 | – | – | 1.0 | 0.20 | 0.35 | 0.50 | 0.25 | used "
    "| position | yes |",
    "| 8 | 2 | – | – | – | – | – | – | – | – | – | – | – | – | no |",
    "| 0.3333 | 3 | – | – | – | – | – | – | – | – | – | – | collapsed | – | – |"])


def test_the_table_of_every_run_whole():
    assert reproduce.markdown_table(RUNS) == RUNS_TABLE
    assert reproduce.markdown_table([]) == HEADER


SUMMARY_HEADER = ("| κ (bits) | paper: Z carries | seeds reproducing | here: Z carries (seeds) "
                  "| KL (bits/token) | CE gap prior−post. (nats) | honest CE (nats) "
                  "| honest bound above floor (nats) | pos. spread, indep. Z "
                  "| pos. spread, shared Z | noise overlap, indep. | noise overlap, shared "
                  "| valid, indep. | valid, shared |\n" + "|---" * 14 + "|")
SEEDS = [  # shuffled: summarise sorts them
    {"kappa_bits": 0.125, "seed": 1, "kl_bits": 0.3, "ce_prior": 0.7, "reproduces": True,
     "regime": "nothing", "converged": 1.0, "shared/position_spread": NAN},
    {"kappa_bits": 0.5, "seed": 0, "kl_bits": 1.5, "ce_prior": 1, "reproduces": None},
    {"kappa_bits": None, "seed": 1, "ce_prior": 0.6, "reproduces": None,
     "independent/valid_rate": 0.9},
    {"kappa_bits": 0.125, "seed": 0, "kl_bits": 0.1, "ce_prior": 0.5, "reproduces": True,
     "regime": "position", "converged": 1.0, "shared/position_spread": 2.0},
    {"kappa_bits": None, "seed": 0, "ce_prior": 0.4, "reproduces": None,
     "independent/valid_rate": 1.0, "verdict": "baseline"},
    {"kappa_bits": 0.125, "seed": 2, "kl_bits": 0.2, "ce_prior": None, "reproduces": False,
     "regime": "position", "converged": 0.0, "shared/position_spread": 4.0}]
SEEDS_TABLE = SUMMARY_HEADER + "\n" + "\n".join([
    "| baseline | – | – | – | – | – | 0.500 ± 0.141 | – | – | – | – | – | 0.95 ± 0.07 | – |",
    "| 0.125 | position | 2/3 | nothing 1, position 1, 1 unconverged | 0.200 ± 0.100 | – "
    "| 0.600 ± 0.141 | – | – | 3.0 ± 1.4 | – | – | – | – |",
    "| 0.5 | – | – | – | 1.500 | – | 1.000 | – | – | – | – | – | – | – |"])


def _plain(value):
    """Floats to 9 decimals and NaN to "nan", inside tuples, lists and dicts: comparable."""
    if isinstance(value, float):
        return "nan" if value != value else round(value, 9)
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def test_the_summary_of_each_kappa_over_its_seeds_whole():
    none = (NAN, NAN)
    empty = {key: none for key in reproduce.SUMMARY}
    sd2 = math.sqrt(0.02)  # two values 0.1 apart
    expect = [
        {"options": "", "kappa_bits": None, "paper_row": None, "seeds": 2, "regimes": "–",
         "reproduced": None, **empty, "ce_prior": (0.5, sd2),
         "independent/valid_rate": (0.95, sd2 / 2)},
        {"options": "", "kappa_bits": 0.125, "paper_row": "position", "seeds": 3,
         "regimes": "nothing 1, position 1, 1 unconverged", "reproduced": 2, **empty,
         "kl_bits": (0.2, 0.1), "ce_prior": (0.6, sd2),
         "shared/position_spread": (3.0, math.sqrt(2))},
        {"options": "", "kappa_bits": 0.5, "paper_row": None, "seeds": 1, "regimes": "–",
         "reproduced": None, **empty, "kl_bits": (1.5, NAN), "ce_prior": (1.0, NAN)}]
    got = reproduce.summarise(SEEDS)
    assert _plain(got) == _plain(expect)
    assert [list(g) for g in got] == [list(e) for e in expect]  # the keys' order too
    assert reproduce.summary_table(SEEDS) == SEEDS_TABLE


def test_kappas_equal_to_six_decimals_of_log2_are_one_group():
    near, apart = 2 ** (-3 + 4e-7), 2 ** (-3 + 6e-7)  # log2 rounds to -3.0 / -2.999999
    rows = [{"kappa_bits": k, "seed": s, "ce_prior": 0.5}
            for k, s in [(0.125, 0), (near, 1), (apart, 2)]]
    got = reproduce.summarise(rows)
    assert [(g["kappa_bits"], g["seeds"]) for g in got] == [(0.125, 2), (apart, 1)]


def test_the_summary_names_the_option_sets_and_says_when_no_baseline_was_trained():
    rows = [{"kappa_bits": None, "seed": 0, "options": "", "ce_prior": 0.5},
            {"kappa_bits": 1.0, "seed": 0, "options": "model.mapper=factored",
             "ce_prior": 0.25, "reproduces": True},
            {"kappa_bits": 1.0, "seed": 0, "options": "", "ce_prior": 0.75,
             "reproduces": False}]
    cells = " | – | – | – | – | – | – | – |"
    assert reproduce.summary_table(rows) == (
        "| options " + SUMMARY_HEADER.replace("|\n|", "|\n|---|", 1) + "\n"
        "| defaults | baseline | – | – | – | – | – | 0.500" + cells + "\n"
        "| defaults | 1 | position and noise | 0/1 | – | – | – | 0.750" + cells
        + "\n| model.mapper=factored | 1 | position and noise | 1/1 | – | – | – | 0.250"
        + cells)
    # one option set among the Free Transformer runs: no column, whatever the baselines'
    one_set = [rows[0], rows[1]]
    assert reproduce.summary_table(one_set).startswith("| κ (bits) |")
    assert reproduce.summary_table(rows[1:2]) == (
        SUMMARY_HEADER + "\n| 1 | position and noise | 1/1 | – | – | – | 0.250" + cells
        + "\n\n(no baseline trained in this run)")


def test_the_judgement_keeps_booleans_makes_numbers_floats_and_empty_values_null():
    trial = {"verdict": "used", "regime": "nothing", "eval/converged": True, "cost_nats": 2,
             "eval/excess_nats": "", "eval/excess_iw_nats": NAN, "eval/floor_nats": 0.5}
    got = reproduce.judgement(trial, {"verdict": "active"})
    assert got == {"verdict_fixed": "active", "verdict": "used", "regime": "nothing",
                   "converged": True, "cost_nats": 2.0, "excess_nats": None,
                   "excess_iw_nats": None, "floor_nats": 0.5, "use_nats": None,
                   "use_position_nats": None, "use_noise_nats": None}
    assert type(got["converged"]) is bool and type(got["cost_nats"]) is float
    assert reproduce.judgement({}, {})["verdict_fixed"] is None


def test_the_located_section_whole_with_both_figures(tmp_path):
    for name in ("phase.png", "over.png"):
        (tmp_path / name).write_bytes(name.encode())
    analysis = SimpleNamespace(boundaries=[object()], summary_lines=lambda: ["line A", "line B"])
    out = tmp_path / "new" / "out"
    report = {"phase": tmp_path / "phase.png", "over_training": str(tmp_path / "over.png")}
    text = reproduce.located_section(analysis, report, out, "r")
    assert text == ("## Where what Z carries changes along kappa\n\n"
                    "The sweep's boundaries, fitted on its converged trials against their "
                    "baselines (95% intervals; docs/phase_diagram.md):\n\n"
                    "```\nline A\nline B\n```\n"
                    "\n![phase diagram](r_phase.png)\n"
                    "\n![boundaries over training](r_over_training.png)\n")
    assert (out / "r_phase.png").read_bytes() == b"phase.png"
    assert (out / "r_over_training.png").read_bytes() == b"over.png"
    # again into the folder that now exists, the phase diagram a folder: left out
    text = reproduce.located_section(analysis, {"phase": tmp_path}, out, "s")
    assert text.endswith("```\nline A\nline B\n```\n") and not (out / "s_phase.png").exists()


def _stand_in_plot(monkeypatch):
    drawn = []

    def plot(rows, samples, path):
        drawn.append((rows, samples, path))
        path.write_bytes(b"png")
        return path

    monkeypatch.setattr(reproduce, "plot", plot)
    return drawn


def test_the_files_written_whole(tmp_path, monkeypatch):
    drawn = _stand_in_plot(monkeypatch)
    rows = [{"kappa_bits": None, "seed": 0, "ce_prior": 0.5, "where": Path("a/b")}]
    samples = {"baseline, seed 0": "-- shared Z, group 1\nK>ab", "1 bits, seed 0": "K>cd"}
    out = tmp_path / "new" / "out"
    paths = reproduce.write_outputs(rows, samples, out, "n", "# Head", "## Located\n\nL\n")
    assert paths == {"table": out / "n.md", "figure": out / "n.png", "json": out / "n.json"}
    assert drawn == [(rows, samples, out / "n.png")]
    summary = reproduce.summary_table(rows)  # whole in the tests above
    table = reproduce.markdown_table(rows)
    assert (out / "n.md").read_text() == (
        f"# Head\n\n## Per kappa, over seeds (mean ± sd)\n\n{summary}\n\n## Located\n\nL\n\n"
        f"## Every run\n\n{table}\n\n![figure](n.png)\n\n## Sample groups\n\n"
        "### baseline, seed 0\n\n```\n-- shared Z, group 1\nK>ab\n```\n\n"
        "### 1 bits, seed 0\n\n```\nK>cd\n```\n")
    assert (out / "n.json").read_text() == (
        '[\n  {\n    "kappa_bits": null,\n    "seed": 0,\n    "ce_prior": 0.5,\n'
        '    "where": "a/b"\n  }\n]')
    # into a folder that exists, no located section, no samples
    reproduce.write_outputs(rows, {}, out, "m", "# Head")
    assert (out / "m.md").read_text() == (
        f"# Head\n\n## Per kappa, over seeds (mean ± sd)\n\n{summary}\n\n"
        f"## Every run\n\n{table}\n\n![figure](m.png)\n\n## Sample groups\n\n\n")


def test_merge_sorts_the_rows_of_every_file_and_writes_them_with_their_fits(tmp_path,
                                                                            monkeypatch):
    drawn = _stand_in_plot(monkeypatch)
    fitted = []
    monkeypatch.setattr(reproduce, "row_fits", lambda rows: fitted.append(rows) or [
        "kappa_c at defaults: 1", "kappa_l at defaults: 2"])
    a = [{"kappa_bits": 0.5, "seed": 1, "ce_prior": 0.25},
         {"kappa_bits": None, "seed": 1, "ce_prior": 0.5}]
    b = [{"kappa_bits": None, "seed": 0, "ce_prior": 0.75}]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    rows, paths = reproduce.merge([tmp_path / "a.json", str(tmp_path / "b.json")],
                                  tmp_path / "out", "m", "A note.")
    assert rows == [b[0], a[1], a[0]] and fitted == [rows]
    assert drawn == [(rows, {}, tmp_path / "out" / "m.png")]
    assert paths["table"] == tmp_path / "out" / "m.md"
    assert json.loads((tmp_path / "out" / "m.json").read_text()) == rows
    assert (tmp_path / "out" / "m.md").read_text() == (
        "# Synthetic task (§4.1): what Z carries as free bits grow\n\n"
        "Merged from a.json, b.json (their sample groups are in their own tables).\n\n"
        "A note.\n\n## Per kappa, over seeds (mean ± sd)\n\n"
        f"{reproduce.summary_table(rows)}\n\n"
        "## Where what Z carries changes along kappa, all runs together\n\n"
        "Fitted on the converged runs of every file, each seed's offset integrated out "
        "(95% intervals; docs/phase_diagram.md):\n\n"
        "```\nkappa_c at defaults: 1\nkappa_l at defaults: 2\n```\n\n"
        f"## Every run\n\n{reproduce.markdown_table(rows)}\n\n![figure](m.png)\n\n"
        "## Sample groups\n\n\n")
    monkeypatch.setattr(reproduce, "row_fits", lambda rows: [])
    reproduce.merge([tmp_path / "b.json"], tmp_path / "out", "n")
    assert (tmp_path / "out" / "n.md").read_text() == (
        "# Synthetic task (§4.1): what Z carries as free bits grow\n\n"
        "Merged from b.json (their sample groups are in their own tables).\n\n"
        "## Per kappa, over seeds (mean ± sd)\n\n"
        f"{reproduce.summary_table(b)}\n\n"
        f"## Every run\n\n{reproduce.markdown_table(b)}\n\n![figure](n.png)\n\n"
        "## Sample groups\n\n\n")


def _png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk's width, height


def _drawn_figure(monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda self, *a, **k: figures.append(self) or save(self, *a, **k))
    return figures


PLOT_ROWS = [
    {"kappa_bits": None, "seed": 0, "independent/position_spread": 5.0,
     "independent/noise_overlap": 0.2, "independent/valid_rate": 0.9},
    {"kappa_bits": None, "seed": 1, "independent/position_spread": NAN,
     "independent/noise_overlap": 0.3, "independent/valid_rate": 1.0},
    {"kappa_bits": 0.125, "seed": 0, "independent/position_spread": 4.0,
     "shared/position_spread": 2.0, "independent/noise_overlap": 0.1,
     "shared/noise_overlap": 0.4, "independent/valid_rate": 0.8, "shared/valid_rate": 0.7},
    {"kappa_bits": 2.0, "seed": 0, "independent/position_spread": 3.0,
     "shared/position_spread": 1.0, "independent/noise_overlap": 0.2,
     "shared/noise_overlap": 0.5, "independent/valid_rate": 0.6, "shared/valid_rate": 0.5}]


def _panel(ax):
    """An axis' title, labels, scale, limits, points, the baselines' levels and legend."""
    points = [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()),
               line.get_marker(), line.get_linestyle(), line.get_alpha())
              for line in ax.lines if not line.get_label().startswith("_")]
    levels = [(list(line.get_ydata()), line.get_color(), line.get_linewidth(),
               line.get_linestyle()) for line in ax.lines if line.get_label().startswith("_")]
    legend = ax.get_legend()
    return {"title": ax.get_title(), "xlabel": ax.get_xlabel(), "xscale": ax.get_xscale(),
            "base": ax.xaxis.get_transform().base, "points": points, "levels": levels,
            "legend": legend and [t.get_text() for t in legend.get_texts()]}


@pytest.mark.timeout(120)
def test_the_figure_draws_each_quantity_per_kappa_the_baselines_and_the_samples(
        tmp_path, monkeypatch):
    figures = _drawn_figure(monkeypatch)
    samples = {"0.125 bits, seed 0": "-- shared Z, group 1\nK>a1\nK>a2\nK>a3\nK>a4\nK>a5\n"
                                     "-- independent Z, group 1\nK>b1",
               "2 bits, seed 0": "-- shared Z, group 1\nK>c1"}
    path = tmp_path / "f.png"
    assert reproduce.plot(PLOT_ROWS, samples, path) == path
    assert _png_size(path) == (1650, 990)  # 15 x 9 inches at 110 dpi
    (fig,) = figures
    assert list(fig.get_size_inches()) == [15, 9]
    *panels, text_ax = fig.axes
    grid = panels[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols, grid.get_height_ratios()) == (2, 3, [1, 1.2])
    assert [(ax.get_subplotspec().rowspan, ax.get_subplotspec().colspan)
            for ax in fig.axes] == [(range(0, 1), range(i, i + 1)) for i in range(3)] + [
        (range(1, 2), range(0, 3))]  # the panels above, the samples below
    grey = ("grey", 0.8, ":")
    for ax, (key, title), levels in zip(
            panels, [("position_spread", "target position spread in a group"),
                     ("noise_overlap", "noise overlap in a group"),
                     ("valid_rate", "valid sequences")],
            [[5.0], [0.2, 0.3], [0.9, 1.0]], strict=True):
        assert _panel(ax) == {
            "title": title, "xlabel": "free bits κ (bits per token)", "xscale": "log",
            "base": 2, "legend": ["independent Z", "shared Z"],
            "points": [(f"{mode} Z", [0.125, 2.0],
                        [r[f"{mode}/{key}"] for r in PLOT_ROWS[2:]], marker, "None", 0.7)
                       for mode, marker in (("independent", "o"), ("shared", "s"))],
            "levels": [([level, level], *grey) for level in levels]}
        assert ax.get_xlim() == pytest.approx((0.0625, 4.0))
    assert not text_ax.axison and len(text_ax.texts) == 1
    text = text_ax.texts[0]
    assert text.get_text() == ("0.125 bits, seed 0, one shared Z:\nK>a1\nK>a2\nK>a3\nK>a4"
                               "\n\n2 bits, seed 0, one shared Z:\nK>c1")
    assert (text.get_position(), text.get_fontfamily(), text.get_fontsize(),
            text.get_verticalalignment()) == ((0, 1), ["monospace"], 7, "top")


@pytest.mark.timeout(120)
def test_the_figure_of_baselines_alone_is_one_row_of_their_levels(tmp_path, monkeypatch):
    figures = _drawn_figure(monkeypatch)
    reproduce.plot(PLOT_ROWS[:2], {}, tmp_path / "b.png")
    assert _png_size(tmp_path / "b.png") == (1650, 495)
    (fig,) = figures
    assert list(fig.get_size_inches()) == [15, 4.5] and len(fig.axes) == 3
    grid = fig.axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (1, 3)
    assert [[line.get_ydata()[0] for line in ax.lines if line.get_label().startswith("_")]
            for ax in fig.axes] == [[5.0], [0.2, 0.3], [0.9, 1.0]]
    assert [[line.get_label() for line in ax.lines if not line.get_label().startswith("_")]
            for ax in fig.axes] == [["independent Z", "shared Z"]] * 3
    assert [ax.get_xscale() for ax in fig.axes] == ["linear"] * 3  # no kappa to log-scale


def _cfg(*overrides):
    return load_config("tiny", list(overrides))


def _measure_stand_ins(monkeypatch, cfg, diag):
    import freetf.training.evaluate

    calls = {}
    model = object()

    def evaluate(*args):
        calls["evaluate"] = args
        calls["seed"] = torch.initial_seed()
        return diag

    monkeypatch.setattr(reproduce, "load_model",
                        lambda path, device: calls.setdefault("load", (path, device)) and (
                            model, cfg, {"step": 42}))
    monkeypatch.setattr(reproduce, "build_data", lambda c: ("data of", c))
    monkeypatch.setattr(freetf.training.evaluate, "evaluate", evaluate)
    monkeypatch.setattr(reproduce, "figure4_metrics", lambda m, **k: calls.setdefault(
        "figure4", (m, k)) and {"independent/position_spread": 8.0,
                                "shared/position_spread": 2.0,
                                "independent/noise_overlap": 0.2,
                                "shared/noise_overlap": 0.2,
                                "independent/valid_rate": 1.0, "shared/valid_rate": 0.75})
    monkeypatch.setattr(reproduce, "render_groups", lambda m, **k: calls.setdefault(
        "render", (m, k)) and "the groups")
    return calls, model


FIGURE4 = {"independent/position_spread": 8.0, "shared/position_spread": 2.0,
           "independent/noise_overlap": 0.2, "shared/noise_overlap": 0.2,
           "independent/valid_rate": 1.0, "shared/valid_rate": 0.75}


def test_measure_gives_the_evaluation_figure4_and_the_paper_row_of_a_checkpoint(monkeypatch):
    cfg = _cfg("training.free_bits_bits=0.125", "training.seed=5", "model.mapper=factored",
               "model.post_sampler_init=bits")
    diag = {"eval/kl_bits": 0.25, "eval/ce_gap_nats": 0.5, "eval/ce_prior_nats": 1.25,
            "eval/verdict": "active", "eval/mutual_info_nats": 0.125, "eval/active_bits": 3,
            "eval/other": 9.0}
    calls, model = _measure_stand_ins(monkeypatch, cfg, diag)
    row, text = reproduce.measure("ck.pt", groups=3, per_group=4, seed=7, device="meta")
    assert row == pytest.approx({
        "kappa_bits": 0.125, "seed": 5, "latent_dim": cfg.model.latent_dim, "steps": 42,
        "mapper": "factored", "options": "model.mapper=factored, model.post_sampler_init=bits",
        "kl_bits": 0.25, "ce_gap": 0.5, "ce_prior": 1.25, "verdict": "active",
        "mi_nats": 0.125, "active_bits": 3, **FIGURE4, "reproduces": True})
    assert list(row)[:12] == ["kappa_bits", "seed", "latent_dim", "steps", "mapper", "options",
                              "kl_bits", "ce_gap", "ce_prior", "verdict", "mi_nats",
                              "active_bits"]
    assert text == "the groups" and calls["load"] == ("ck.pt", "meta")
    assert calls["evaluate"] == (model, ("data of", cfg), cfg, torch.device("meta"),
                                 pytest.approx(0.125 * LN2))
    assert calls["seed"] == 7
    assert calls["figure4"] == (model, {"groups": 3, "per_group": 4, "seed": 7})
    assert calls["render"] == (model, {"groups": 1, "per_group": 8, "seed": 7})


def test_measure_of_a_baseline_has_no_kappa_mapper_or_options(monkeypatch):
    cfg = _cfg("model.latent_dim=0", "training.seed=1", "model.mapper=factored",
               "training.free_bits_bits=1")
    calls, model = _measure_stand_ins(monkeypatch, cfg, {"eval/ce_prior_nats": 0.5})
    row, _ = reproduce.measure("b.pt", 2, 2)
    assert row == {"kappa_bits": None, "seed": 1, "latent_dim": 0, "steps": 42, "mapper": None,
                   "options": "", "kl_bits": None, "ce_gap": None, "ce_prior": 0.5,
                   "verdict": None, "mi_nats": None, "active_bits": None, **FIGURE4,
                   "reproduces": None}
    assert calls["load"] == ("b.pt", "cpu") and calls["seed"] == 0
    assert calls["evaluate"][3] == torch.device("cpu")
    assert calls["figure4"][1]["seed"] == 0 and calls["render"][1]["seed"] == 0


def test_the_options_are_named_for_every_knob_the_study_varies():
    changed = ["model.mapper=factored", "model.post_sampler_init=zero",
               "model.post_sampler_init_std=0.5", "model.readout_init_std=0.25",
               "optimizer.post_sampler_lr_mult=4.0", "training.kl_annealing.type=linear",
               "training.free_bits_schedule.type=cosine", "training.free_bits_per=sequence"]
    assert reproduce.changed_knobs(_cfg(*reversed(changed), "training.seed=3")) == changed


class _Clock:
    def __init__(self, *times):
        self.times = iter(times)

    def perf_counter(self):
        return next(self.times)


def test_in_process_trains_the_baselines_then_each_kappa_and_measures_each(monkeypatch,
                                                                           tmp_path):
    import freetf.training.loop
    from freetf.training.context import TrainContext

    base = _cfg(f"checkpoint.dir={tmp_path}/ck", "tracking.mlflow.enabled=true",
                "training.free_bits_bits=0.25")
    trained, measured = [], []

    def train_loop(cfg, ctx):
        trained.append((cfg, ctx))
        return SimpleNamespace(checkpoint=f"{cfg.checkpoint.dir}/last.pt")

    def measure(checkpoint, groups, per_group, seed, device):
        measured.append((checkpoint, groups, per_group, seed, device))
        cfg = trained[-1][0]
        kappa = cfg.training.free_bits_bits if cfg.model.has_latent else None
        return {"kappa_bits": kappa, "seed": seed}, f"groups of {checkpoint}"

    monkeypatch.setattr(freetf.training.loop, "train_loop", train_loop)
    monkeypatch.setattr(reproduce, "measure", measure)
    monkeypatch.setattr(reproduce, "time", _Clock(1.0, 3.5, 10.0, 11.0, 20.0, 24.0, 30.0,
                                                  30.5, 40.0, 40.25, 50.0, 52.0))
    rows, samples = reproduce.reproduce_in_process(base, (0.5, 2.0), (0, 1), 3, 4, "cpu")
    names = ["baseline-s0", "baseline-s1", "k0.5-s0", "k0.5-s1", "k2-s0", "k2-s1"]
    assert [(c.checkpoint.dir, c.training.seed, c.model.latent_dim, c.training.free_bits_bits,
             c.tracking.mlflow.enabled) for c, _ in trained] == [
        (f"{tmp_path}/ck/{name}", seed, dim, kappa, False)
        for name, seed, dim, kappa in zip(
            names, [0, 1] * 3, [0, 0] + [base.model.latent_dim] * 4,
            [0.25, 0.25, 0.5, 0.5, 2.0, 2.0], strict=True)]
    assert all(c.replace({"checkpoint.dir": base.checkpoint.dir, "training.seed": 0,
                          "model.latent_dim": base.model.latent_dim,
                          "training.free_bits_bits": 0.25,
                          "tracking.mlflow.enabled": True}) == base for c, _ in trained)
    assert all(type(ctx) is TrainContext and ctx.device == torch.device("cpu")
               for _, ctx in trained)
    assert measured == [(f"{tmp_path}/ck/{name}/last.pt", 3, 4, seed, "cpu")
                        for name, seed in zip(names, [0, 1] * 3, strict=True)]
    kappas = [None, None, 0.5, 0.5, 2.0, 2.0]
    assert rows == [{"kappa_bits": k, "seed": s, "train_s": t} for k, s, t in zip(
        kappas, [0, 1] * 3, [2.5, 1.0, 4.0, 0.5, 0.25, 2.0], strict=True)]
    assert samples == {
        f"{'baseline' if k is None else f'{k:g} bits'}, seed {s}":
            f"groups of {tmp_path}/ck/{name}/last.pt"
        for k, s, name in zip(kappas, [0, 1] * 3, names, strict=True)}
    trained.clear()
    monkeypatch.setattr(reproduce, "time", _Clock(0.0, 1.0))
    rows, _ = reproduce.reproduce_in_process(base, (0.125,), (3,), 1, 1, "cpu", baseline=False)
    assert [c.checkpoint.dir for c, _ in trained] == [f"{tmp_path}/ck/k0.125-s3"]
    assert rows == [{"kappa_bits": 0.125, "seed": 3, "train_s": 1.0}]


def test_the_tune_path_measures_each_checkpointed_trial_with_its_judgement(monkeypatch,
                                                                           tmp_path):
    import pandas as pd

    import freetf.tracking

    calls = {}
    for name in ("r1", "r4"):
        (tmp_path / f"{name}.pt").write_bytes(b"")
    checkpoints = {"r1": str(tmp_path / "r1.pt"), "r2": None,
                   "r3": str(tmp_path / "absent.pt"), "r4": str(tmp_path / "r4.pt"), "r5": ""}
    runs = pd.DataFrame({"run_id": ["r1", "r2", "r3", "r4", "r5"],
                         "verdict": ["used", "used", "used", "baseline", "used"],
                         "regime": ["position", "nothing", "", "", "broken"],
                         "eval/converged": [1.0, 1.0, 1.0, NAN, 1.0],
                         "cost_nats": [0.25, 0.0, 0.0, NAN, 0.0]})
    result = SimpleNamespace(tracking_uri="sqlite:///x.db", runs=runs)
    sweep = types.ModuleType("freetf.sweeps.sweep")
    sweep.load_sweep = lambda spec, overrides: calls.setdefault("load", (spec, overrides)) \
        and "the sweep"
    sweep.run_sweep = lambda s, resume: calls.setdefault("run", (s, resume)) and result
    monkeypatch.setitem(sys.modules, "freetf.sweeps.sweep", sweep)

    def client(uri):
        calls["uri"] = uri
        return SimpleNamespace(get_run=lambda run_id: SimpleNamespace(data=SimpleNamespace(
            tags={"other": "x"} if checkpoints[run_id] is None
            else {tags.CHECKPOINT: checkpoints[run_id]})))

    monkeypatch.setattr(freetf.tracking, "mlflow_client", client)
    measured = []
    rows_of = {"r1": {"kappa_bits": 0.5, "seed": 1, "verdict": "active"},
               "r4": {"kappa_bits": None, "seed": 0, "verdict": None}}

    def measure(*args):
        measured.append(args)
        return dict(rows_of[Path(args[0]).stem]), f"text of {Path(args[0]).name}"

    monkeypatch.setattr(reproduce, "measure", measure)
    rows, samples, got = reproduce.reproduce_with_tune("spec.yaml", ["a=1"], True, 3, 4)
    assert got is result
    assert calls == {"load": ("spec.yaml", ["a=1"]), "run": ("the sweep", True),
                     "uri": "sqlite:///x.db"}
    assert measured == [(checkpoints["r1"], 3, 4), (checkpoints["r4"], 3, 4)]
    judged = dict.fromkeys(["excess_nats", "excess_iw_nats", "floor_nats", "use_nats",
                            "use_position_nats", "use_noise_nats"])
    assert rows == [
        {"kappa_bits": None, "seed": 0, "verdict": "baseline", "run_id": "r4",
         "verdict_fixed": None, "regime": None, "converged": None, "cost_nats": None,
         **judged},
        {"kappa_bits": 0.5, "seed": 1, "verdict": "used", "run_id": "r1",
         "verdict_fixed": "active", "regime": "position", "converged": 1.0, "cost_nats": 0.25,
         **judged}]
    assert samples == {"0.5 bits, seed 1": "text of r1.pt", "baseline, seed 0": "text of r4.pt"}
    assert list(samples) == ["0.5 bits, seed 1", "baseline, seed 0"]  # in the sweep's order


def test_the_fits_go_through_every_option_set_with_two_kappas_or_more():
    """A set with one kappa is passed over, not the end; rows without options are the
    defaults' (the fits themselves: test_reproduce.py, test_verdicts)."""
    def row(kappa, seed, regime, verdict="used", **options):
        return {"kappa_bits": kappa, "seed": seed, "regime": regime, "verdict": verdict,
                "converged": 1.0, **options}

    defaults = [row(0.125, 0, "nothing", "collapsed"), row(0.125, 1, "position"),
                row(1.0, 0, "position"), row(1.0, 1, "broken", "leaking")]  # no "options"
    one_kappa = [row(0.5, 0, "position", options="a=1"), row(0.5, 1, "nothing", options="a=1")]
    other = [row(0.125, 0, "position", options="b=2"), row(1.0, 0, "nothing", options="b=2")]
    lines = reproduce.row_fits(defaults + one_kappa + other)
    assert lines == reproduce.row_fits(defaults) + reproduce.row_fits(other)
    assert len(lines) == 10
    assert all(" at defaults: " in line for line in lines[:5])
    assert all(" at b=2: " in line for line in lines[5:])
