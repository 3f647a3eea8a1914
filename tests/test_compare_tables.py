"""freetf.experiments.compare's rows, tables, files and figure, whole: each against a
reference written here for a small hand-built sweep (the statistics by the textbook
formula, the t quantiles from tables), the figure through a recording stand-in for
matplotlib, and the corpus preparation with ``prepare`` stood in for."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from freetf.experiments import compare
from freetf.experiments.compare import (
    claim_verdict,
    compare_rows,
    csv_frame,
    interval,
    markdown_table,
)

pytestmark = pytest.mark.timeout(60)

NAN = math.nan
# Student t quantiles from tables: (two-sided confidence, degrees of freedom) -> t
T = {(0.95, 1): 12.706204736174707, (0.9, 1): 6.313751514675041}


def S(xs, confidence=0.95):
    """The interval by hand: n, mean, sample sd and the t-interval of the mean."""
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": NAN, "sd": NAN, "low": NAN, "high": NAN}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": NAN, "low": NAN, "high": NAN}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = T[(confidence, n - 1)] * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half}


def same(actual, expected, where="row"):
    """Equal, recursively: the same keys, ints as ints, floats close, NaN as NaN."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        assert list(actual) == list(expected), where
        for key in expected:
            same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert isinstance(actual, float), (where, actual)
        assert (math.isnan(actual) and math.isnan(expected)) or math.isclose(
            actual, expected, rel_tol=1e-9, abs_tol=1e-12), (where, actual, expected)
    else:
        assert type(actual) is type(expected) and actual == expected, (where, actual, expected)


def trial(kind, kappa, seed, prior, posterior, kl, use, use_low, status="FINISHED"):
    return {"model_kind": kind, "free_bits_bits": kappa, "seed": float(seed),
            "status": status, "eval/bpb_prior": prior, "eval/bpb_posterior": posterior,
            "eval/kl_bits": kl, "eval/use_nats": use, "eval/use_low_nats": use_low}


def sweep_frame() -> pd.DataFrame:
    """Two baselines and four kappas, out of order, with trials that must not count."""
    ft = "free_transformer"
    return pd.DataFrame([
        trial(ft, 2.0, 1, 1.5, 1.4, 2.2, 0.05, 0.03),
        trial("baseline", 0.5, 1, 1.2, 1.3, 0.0, NAN, NAN),
        trial(ft, 0.5, 1, 1.31, 1.0, 0.7, 0.004, 0.002),  # at the tolerance: not using Z
        trial("baseline", 0.5, 0, 1.0, 1.0, 0.0, NAN, NAN),
        trial(ft, 0.5, 0, 1.1, 0.9, 0.5, 0.02, 0.01),
        trial("baseline", 0.5, 2, 0.5, 0.5, 0.0, NAN, NAN, status="FAILED"),
        trial("baseline", 0.5, 3, NAN, NAN, NAN, NAN, NAN),  # finished without a metric
        trial(ft, 1.0, 1, 1.09, 0.9, 1.1, 0.0015, 0.0),
        trial(ft, 1.0, 0, 0.9, 0.8, 1.0, 0.001, -0.001),
        trial(ft, 0.25, 5, 1.3, 1.2, 0.3, 0.01, 0.005),  # no baseline of seed 5
        trial(ft, 0.5, 2, 9.0, 9.0, 9.0, 1.0, 1.0, status="FAILED"),
    ])


def expected_rows():
    """compare_rows(sweep_frame()) by hand."""
    base_mean = (1.0 + 1.2) / 2
    return [
        {"kappa_bits": None, "seeds": [0, 1], "bpb_prior": S([1.2, 1.0]),
         "bpb_posterior": S([1.3, 1.0]), "kl_bits": S([]), "per_seed": {1: 1.2, 0: 1.0},
         "relative_increase": 0.0, "replication_relative_increase": 0.0},
        {"kappa_bits": 0.25, "seeds": [5], "bpb_prior": S([1.3]),
         "bpb_posterior": S([1.2]), "kl_bits": S([0.3]), "per_seed": {5: 1.3},
         "use_nats": S([0.01]), "used_seeds": 1, "delta_bpb": S([]),
         "claim": "no difference", "relative_increase": 1.3 / base_mean - 1,
         "replication_relative_increase": NAN},
        {"kappa_bits": 0.5, "seeds": [0, 1], "bpb_prior": S([1.31, 1.1]),
         "bpb_posterior": S([1.0, 0.9]), "kl_bits": S([0.7, 0.5]),
         "per_seed": {1: 1.31, 0: 1.1}, "use_nats": S([0.004, 0.02]), "used_seeds": 1,
         "delta_bpb": S([1.31 - 1.2, 1.1 - 1.0]), "claim": "worse",
         "relative_increase": (1.1 + 1.31) / 2 / base_mean - 1,
         "replication_relative_increase": 1.664 / 1.510 - 1},
        {"kappa_bits": 1.0, "seeds": [0, 1], "bpb_prior": S([1.09, 0.9]),
         "bpb_posterior": S([0.9, 0.8]), "kl_bits": S([1.1, 1.0]),
         "per_seed": {1: 1.09, 0: 0.9}, "use_nats": S([0.0015, 0.001]), "used_seeds": 0,
         "delta_bpb": S([1.09 - 1.2, 0.9 - 1.0]), "claim": "untested: Z unused",
         "relative_increase": (0.9 + 1.09) / 2 / base_mean - 1,
         "replication_relative_increase": 1.819 / 1.510 - 1},
        {"kappa_bits": 2.0, "seeds": [1], "bpb_prior": S([1.5]), "bpb_posterior": S([1.4]),
         "kl_bits": S([2.2]), "per_seed": {1: 1.5}, "use_nats": S([0.05]), "used_seeds": 1,
         "delta_bpb": S([1.5 - 1.2]), "relative_increase": 1.5 / base_mean - 1,
         "replication_relative_increase": 2.242 / 1.510 - 1},
    ]


def test_the_rows_of_a_sweep_whole():
    rows = compare_rows(sweep_frame())
    same(rows, expected_rows())
    # kappa 1 on its own: better than the baseline, were Z used
    assert claim_verdict(rows[3]["delta_bpb"]) == "better"


def test_the_rows_follow_the_confidence_and_the_tolerance():
    rows = compare_rows(sweep_frame(), confidence=0.9, use_tol_nats=0.0015)
    same(rows[0]["bpb_prior"], S([1.0, 1.2], 0.9))
    same(rows[2]["delta_bpb"], S([0.11, 0.1], 0.9))
    same(rows[2]["bpb_posterior"], S([1.0, 0.9], 0.9))
    same(rows[2]["kl_bits"], S([0.7, 0.5], 0.9))
    same(rows[2]["use_nats"], S([0.004, 0.02], 0.9))
    assert [r.get("used_seeds") for r in rows] == [None, 1, 2, 0, 1]
    assert [r.get("claim") for r in rows] == [None, "no difference", "worse",
                                              "untested: Z unused", None]


def test_a_kappa_read_back_a_hair_above_one_bit_is_still_judged():
    """The claim's range and the replication's kappas allow for a float read back from
    MLflow: 1 + 1e-9 bits is one bit, 1 + 1e-8 is past it."""
    frame = sweep_frame()
    frame["free_bits_bits"] = frame["free_bits_bits"].replace(1.0, 1.0 + 1e-9)
    row = compare_rows(frame)[3]
    assert row["kappa_bits"] == 1.0 + 1e-9 and row["claim"] == "untested: Z unused"
    assert row["replication_relative_increase"] == pytest.approx(1.819 / 1.510 - 1)
    frame["free_bits_bits"] = frame["free_bits_bits"].replace(1.0 + 1e-9, 1.0 + 1e-8)
    assert "claim" not in compare_rows(frame)[3]


def test_rows_without_the_use_of_z_count_no_seed_as_using_it():
    rows = compare_rows(sweep_frame().drop(columns=["eval/use_nats", "eval/use_low_nats"]))
    for row in rows[1:]:
        same(row["use_nats"], S([]))
        assert row["used_seeds"] == 0
    assert [r.get("claim") for r in rows] == [None] + ["untested: Z unused"] * 3 + [None]


def test_a_sweep_without_baselines_has_no_relative_increase():
    frame = sweep_frame()
    rows = compare_rows(frame[frame["model_kind"] != "baseline"])
    same(rows[0]["bpb_prior"], S([]))
    assert rows[0]["seeds"] == [] and rows[0]["relative_increase"] == 0.0
    assert all(math.isnan(r["relative_increase"]) for r in rows[1:])
    assert all(r["delta_bpb"]["n"] == 0 for r in rows[1:])


def test_the_replication_is_matched_to_a_kappa_read_back_as_a_float():
    assert compare._replication(0.5 * (1 + 1e-9)) == 1.664
    assert compare._replication(0.125) == 1.559 and compare._replication(4.0) == 3.379
    assert compare._replication(0.25) is None and compare._replication(0.5 * 1.01) is None


def test_the_interval_of_values_some_missing():
    same(interval([1.0, None, NAN, math.inf, 3.0, -math.inf]), S([1.0, 3.0]))
    same(interval([2.0, 4.0], confidence=0.9), S([2.0, 4.0], 0.9))
    same(interval([7.0]), S([7.0]))
    same(interval([]), S([]))
    same(interval([1, 2]), S([1.0, 2.0]))  # ints read as floats


def test_a_verdict_at_zero_is_no_difference():
    assert claim_verdict({"low": -0.1, "high": 0.0}) == "no difference"
    assert claim_verdict({"low": 0.0, "high": 0.1}) == "no difference"
    assert claim_verdict({"low": -0.1, "high": -1e-12}) == "better"
    assert claim_verdict({"low": 1e-12, "high": 0.1}) == "worse"


# ----------------------------------------------------------------------------- the table

TABLE = """\
| κ (bits) | seeds | seeds using Z | use of Z (nats/token) | honest bits/byte (Z ~ prior) \
| 95% t-interval | posterior bits/byte | KL (bits/token) | Δ vs baseline, paired \
| Δ 95% t-interval | rel. increase | replication | κ ≤ 1 claim |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| baseline | 0,1 | – | – | 1.100 ± 0.141 | [-0.171, 2.371] | 1.150 ± 0.212 | – | – | – \
| +0.0% | +0.0% | – |
| 0.25 | 5 | 1/1 | 0.0100 | 1.300 | – | 1.200 | 0.300 | – | – | +18.2% | – | no difference |
| 0.5 | 0,1 | 1/2 | 0.0120 ± 0.0113 | 1.205 ± 0.148 | [-0.129, 2.539] | 0.950 ± 0.071 \
| 0.600 ± 0.141 | 0.1050 ± 0.0071 | [0.0415, 0.1685] | +9.5% | +10.2% | worse |
| 1 | 0,1 | 0/2 | 0.0013 ± 0.0004 | 0.995 ± 0.134 | [-0.212, 2.202] | 0.850 ± 0.071 \
| 1.050 ± 0.071 | -0.1050 ± 0.0071 | [-0.1685, -0.0415] | -9.5% | +20.5% | untested: Z unused |
| 2 | 1 | 1/1 | 0.0500 | 1.500 | – | 1.400 | 2.200 | 0.3000 | – | +36.4% | +48.5% | – |"""


def test_the_markdown_table_whole():
    assert markdown_table(expected_rows()) == TABLE


def test_the_tables_intervals_are_named_by_their_confidence():
    head = markdown_table(expected_rows()[:1], confidence=0.9).splitlines()[0]
    assert head == TABLE.splitlines()[0].replace("95%", "90%")


def flat(name, stat):
    return {f"{name}_{key}": value for key, value in stat.items()}


def test_the_csv_frame_whole():
    base, lone, half, one, two = expected_rows()
    empty = {"n": NAN, "mean": NAN, "sd": NAN, "low": NAN, "high": NAN}
    expected = []
    for row in (base, lone, half, one, two):
        item = {"kappa_bits": NAN if row["kappa_bits"] is None else row["kappa_bits"],
                "seeds": " ".join(str(s) for s in row["seeds"])}
        for name in ("bpb_prior", "bpb_posterior", "kl_bits"):
            item.update(flat(name, row[name]))
        item.update({"used_seeds": row.get("used_seeds", NAN),
                     "relative_increase": row["relative_increase"],
                     "replication_relative_increase": row["replication_relative_increase"],
                     "claim": row.get("claim", "")})
        item.update(flat("delta_bpb", row.get("delta_bpb", empty)))
        item.update(flat("use_nats", row.get("use_nats", empty)))
        expected.append(item)
    frame = csv_frame([base, lone, half, one, two])
    assert list(frame.columns) == list(expected[0])
    assert frame["seeds"].tolist() == ["0 1", "5", "0 1", "0 1", "1"]
    assert frame["claim"].tolist() == ["", "no difference", "worse", "untested: Z unused", ""]
    baseline_only = csv_frame([base])  # no kappa: the seeds using Z unknown, not None
    assert math.isnan(baseline_only["used_seeds"][0]) and baseline_only["claim"][0] == ""
    for got, want in zip(frame.to_dict("records"), expected, strict=True):
        assert list(got) == list(want)
        for key, value in want.items():
            if isinstance(value, str):
                assert got[key] == value, key
            else:
                assert (math.isnan(got[key]) and math.isnan(value)) or math.isclose(
                    got[key], value, rel_tol=1e-9, abs_tol=1e-12), (key, got[key], value)


# ----------------------------------------------------------------------------- the files


def test_the_report_files_whole(tmp_path, monkeypatch):
    """compare.md (header, table, figure link), .csv, .json; the figure drawn by
    plot_compare (stood in for) into the same folder, made with its parents."""
    drawn = []
    monkeypatch.setattr(compare, "plot_compare",
                        lambda rows, path: drawn.append((rows, path)) or path)
    out = tmp_path / "a" / "b"
    rows = expected_rows()
    paths = compare.write_compare(rows, out, "# the header",
                                  {"wall_s": 12.5, "data": Path("data/x")})
    assert list(paths.items()) == [
        ("compare_figure", out / "compare.png"), ("compare_table", out / "compare.md"),
        ("compare_csv", out / "compare.csv"), ("compare_json", out / "compare.json")]
    assert len(drawn) == 1 and drawn[0][0] is rows and drawn[0][1] == out / "compare.png"
    assert (out / "compare.md").read_text() == (
        f"# the header\n\n{TABLE}\n\n![bits per byte against kappa](compare.png)\n")
    csv = (out / "compare.csv").read_text().splitlines()
    assert csv[0].startswith("kappa_bits,seeds,bpb_prior_n,bpb_prior_mean,")
    assert csv[1].startswith(",0 1,2,1.1,") and len(csv) == 6
    text = (out / "compare.json").read_text()
    assert text.startswith('{\n  "wall_s": 12.5,\n  "data": "data/x",\n  "rows": [\n    {\n'
                           '      "kappa_bits": null,\n      "seeds": [\n        0,\n')
    assert text.endswith("\n    }\n  ]\n}\n")
    saved = json.loads(text)
    assert list(saved) == ["wall_s", "data", "rows"]
    want = expected_rows()
    for row in want:
        row["per_seed"] = {str(k): v for k, v in row["per_seed"].items()}
    same(saved["rows"], want)
    # again into the same folder, without a header or extra facts
    compare.write_compare(rows, out)
    assert (out / "compare.md").read_text().startswith(f"\n\n{TABLE}\n\n")
    assert (out / "compare.json").read_text().startswith('{\n  "rows": [\n')


# ----------------------------------------------------------------------------- the figure


class Recorder:
    """Stands in for matplotlib's figure and axes: records each call, returns the axes."""

    def __init__(self, calls, name):
        self._calls, self._name = calls, name

    def __getattr__(self, attr):
        def call(*args, **kwargs):
            self._calls.append((self._name, attr, plain(args), plain(kwargs)))
            if attr == "subplots":
                return tuple(Recorder(self._calls, n) for n in ("bpb", "kl", "rel"))
            return None
        return call


def plain(x):
    if isinstance(x, Recorder):
        return f"<{x._name}>"
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if isinstance(x, float):
        return round(x, 9)
    return x


@pytest.fixture
def figure_calls(monkeypatch):
    import matplotlib.backends.backend_agg
    import matplotlib.figure

    calls = []

    def figure(*args, **kwargs):
        calls.append(("Figure", "new", plain(args), plain(kwargs)))
        return Recorder(calls, "fig")

    monkeypatch.setattr(matplotlib.figure, "Figure", figure)
    monkeypatch.setattr(matplotlib.backends.backend_agg, "FigureCanvasAgg",
                        lambda *args: calls.append(("FigureCanvasAgg", "new", plain(args), {})))
    return calls


def stat(mean, sd=NAN, low=NAN, high=NAN):
    return {"n": 2, "mean": mean, "sd": sd, "low": low, "high": high}


def figure_rows():
    return [
        {"kappa_bits": None, "bpb_prior": stat(1.1, 0.1, 1.0, 1.2), "bpb_posterior": stat(9.0),
         "kl_bits": stat(NAN), "relative_increase": 0.0, "replication_relative_increase": 0.0},
        {"kappa_bits": 0.5, "bpb_prior": stat(1.2, 0.3, 1.15, 1.25),
         "bpb_posterior": stat(1.0, 0.2, 0.9, 1.1), "kl_bits": stat(0.6, 0.1),
         "relative_increase": 0.05, "replication_relative_increase": 0.1},
        {"kappa_bits": 2.0, "bpb_prior": stat(1.4, 0.3), "bpb_posterior": stat(1.3),
         "kl_bits": stat(2.5), "relative_increase": 0.2, "replication_relative_increase": NAN},
    ]


def test_the_figure_whole(tmp_path, figure_calls):
    path = tmp_path / "new" / "deeper" / "compare.png"
    assert compare.plot_compare(figure_rows(), str(path)) == path
    assert path.parent.is_dir()
    axes = [(ax, name, [], kwargs) for ax in ("bpb", "kl", "rel") for name, kwargs in (
        ("set_xscale", None), ("set_xlabel", None), ("grid", {"alpha": 0.3, "which": "both"}),
        ("legend", {"fontsize": 8}))]
    axes = [(ax, name, {"set_xscale": ["log"], "set_xlabel": ["free bits κ (bits per token)"]}
             .get(name, []), {"set_xscale": {"base": 2}}.get(name, kwargs or {}))
            for ax, name, _, kwargs in axes]
    assert figure_calls == [
        ("Figure", "new", [], {"figsize": [16.0, 4.8], "layout": "constrained"}),
        ("FigureCanvasAgg", "new", ["<fig>"], {}),
        ("fig", "subplots", [1, 3], {}),
        ("bpb", "errorbar", [[0.5, 2.0], [1.2, 1.4]],
         {"yerr": [0.05, 0], "fmt": "o-", "capsize": 4, "label": "honest: Z from the prior"}),
        ("bpb", "errorbar", [[0.5, 2.0], [1.0, 1.3]],
         {"yerr": [0.1, 0], "fmt": "s--", "capsize": 4,
          "label": "Z from the posterior (encoder)"}),
        ("bpb", "axhline", [1.1], {"color": "black", "lw": 1, "label": "baseline (no latent)"}),
        ("bpb", "axhspan", [1.0, 1.2],
         {"color": "black", "alpha": 0.1, "label": "baseline 95% t-interval"}),
        ("bpb", "set", [], {"ylabel": "bits per byte (validation)",
                            "title": "bits/byte: mean over seeds, 95% t-interval"}),
        ("kl", "errorbar", [[0.5, 2.0], [0.6, 2.5]],
         {"yerr": [0.1, 0], "fmt": "o-", "capsize": 4,
          "label": "KL(Q(Z|X) || uniform), ±sd"}),
        ("kl", "plot", [[0.5, 2.0], [0.5, 2.0], ":"],
         {"color": "gray", "label": "KL = κ (free bits)"}),
        ("kl", "set", [], {"ylabel": "KL (bits per token)", "title": "what the latent carries"}),
        ("kl", "set_yscale", ["log"], {"base": 2}),
        ("rel", "plot", [[0.5, 2.0], [5.0, 20.0], "o-"], {"label": "this run (bits/byte)"}),
        ("rel", "plot", [[0.5], [10.0], "s--"], {"label": "replication (honest NLL)"}),
        ("rel", "axhline", [0], {"color": "black", "lw": 1}),
        ("rel", "set", [], {"ylabel": "increase over the baseline (%)",
                            "title": "honest cost against kappa, relative"}),
        *axes,
        ("fig", "savefig", [path], {"dpi": 110}),
    ]
    figure_calls.clear()  # again into the folder now there
    assert compare.plot_compare(figure_rows(), path) == path
    assert figure_calls[-1] == ("fig", "savefig", [path], {"dpi": 110})


def test_the_figure_leaves_out_what_is_unknown(tmp_path, figure_calls):
    """A baseline without an interval: its line, no band; without a mean: neither; no
    replication value: no replication line; the confidence names the intervals."""
    rows = figure_rows()
    rows[0]["bpb_prior"] = stat(1.1)
    rows[1]["replication_relative_increase"] = NAN
    compare.plot_compare(rows, tmp_path / "f.png", confidence=0.9)
    bpb = [(c[1], c[3].get("label")) for c in figure_calls if c[0] == "bpb"]
    assert bpb == [("errorbar", "honest: Z from the prior"),
                   ("errorbar", "Z from the posterior (encoder)"),
                   ("axhline", "baseline (no latent)"), ("set", None)] + [
                      ("set_xscale", None), ("set_xlabel", None), ("grid", None),
                      ("legend", None)]
    assert [c[3]["title"] for c in figure_calls if c[:2] == ("bpb", "set")] == [
        "bits/byte: mean over seeds, 90% t-interval"]
    assert [c[1] for c in figure_calls if c[0] == "rel"][:3] == ["plot", "axhline", "set"]
    figure_calls.clear()
    rows[0]["bpb_prior"] = stat(NAN)
    compare.plot_compare(rows, tmp_path / "f.png")
    assert [c[1] for c in figure_calls if c[0] == "bpb"][:3] == ["errorbar", "errorbar", "set"]


def test_the_figure_of_rows_without_a_kappa_past_the_baseline(tmp_path, figure_calls):
    rows = figure_rows()
    rows.insert(1, {**rows[1], "kappa_bits": None})  # not a kappa: not drawn
    compare.plot_compare(rows, tmp_path / "f.png")
    assert [c[2][0] for c in figure_calls if c[:2] == ("bpb", "errorbar")] == [
        [0.5, 2.0], [0.5, 2.0]]


# ----------------------------------------------------------------------------- the corpus


def sweep_reading(path, dataset="tokens"):
    """A sweep whose base config reads ``dataset`` from ``path``."""
    data = SimpleNamespace(path=str(path), dataset_name=dataset)
    return SimpleNamespace(base=lambda: SimpleNamespace(data=data))


@pytest.fixture
def preparing(monkeypatch):
    import freetf.data.prepare

    done = []
    def prepare(spec, out_dir, workers=1, progress=True):  # the real one's defaults
        done.append((spec, out_dir, workers, progress))

    monkeypatch.setattr(freetf.data.prepare, "prepare", prepare)
    return done


def test_a_missing_token_folder_is_prepared_from_the_standard_library(tmp_path, preparing):
    from freetf.data.prepare import PrepareSpec

    folder = tmp_path / "data" / "stdlib"
    said = []
    assert compare.ensure_prepared(sweep_reading(folder), say=said.append) is True
    assert said == [f"preparing the corpus: Python's standard library -> {folder} "
                    "(BPE 4096, about a minute)"]
    assert preparing == [(PrepareSpec(inputs=("stdlib",), tokenizer="bpe", vocab_size=4096),
                          folder, 2, True)]
    assert compare.ensure_prepared(sweep_reading(folder), workers=5, say=said.append)
    assert preparing[-1][2] == 5 and len(said) == 2


def test_a_prepared_folder_or_another_dataset_is_left_alone(tmp_path, preparing):
    folder = tmp_path / "stdlib"
    folder.mkdir()
    (folder / "meta.json").write_text("{}")
    said = []
    assert compare.ensure_prepared(sweep_reading(folder), say=said.append) is False
    missing = tmp_path / "missing"
    for dataset in ("synthetic", "text"):
        assert compare.ensure_prepared(sweep_reading(missing, dataset),
                                       say=said.append) is False
    assert said == [] and preparing == []
