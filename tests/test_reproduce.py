"""The reproduction pipeline in-process at tiny size: table, figure and JSON written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from freetf.cli import main
from freetf.experiments.reproduce import markdown_table

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent


def test_in_process_pipeline_writes_table_and_figure(tmp_path):
    code = main(["reproduce", "--in-process", "--config", "freetf/configs/tiny.yaml",
                 "--kappas", "0.015625", "8",
                 "--seeds", "0", "--groups", "1", "--per-group", "3", "--out", str(tmp_path),
                 "--name", "r",
                 "--set", "training.max_steps=3", "--set", f"checkpoint.dir={tmp_path}/ck",
                 "--set", "model.post_sampler_init=bits", "--note", "See the study."])
    assert code == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert rows[0]["kappa_bits"] is None and rows[0]["latent_dim"] == 0  # the baseline first
    assert [r["kappa_bits"] for r in rows[1:]] == pytest.approx([0.015625, 8.0])
    for row in rows:
        assert {"kl_bits", "ce_prior", "shared/valid_rate", "independent/noise_overlap",
                "seed", "reproduces", "mi_nats", "active_bits"} <= set(row)
    assert [(r["latent_dim"], r["seed"]) for r in rows] == [(0, 0), (4, 0), (4, 0)]
    text = (tmp_path / "r.md").read_text()
    assert "| κ (bits) |" in text and "![figure](r.png)" in text and "shared Z" in text
    assert "| baseline | – | – |" in text and "seeds reproducing" in text
    assert "Non-default options: model.post_sampler_init=bits.\n\nSee the study.\n" in text
    assert [r["options"] for r in rows] == ["", "model.post_sampler_init=bits",
                                            "model.post_sampler_init=bits"]
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_merge_rewrites_one_table_from_several_runs(tmp_path, capsys):
    nan = float("nan")

    def row(kappa, seed, ce):
        return {"kappa_bits": kappa, "seed": seed, "ce_prior": ce, "reproduces": None,
                "independent/position_spread": nan, "shared/position_spread": nan,
                "independent/noise_overlap": 0.1, "shared/noise_overlap": 0.1,
                "independent/valid_rate": 1.0, "shared/valid_rate": 1.0}

    (tmp_path / "a.json").write_text(json.dumps([row(None, 1, 0.3), row(0.5, 1, 0.4)]))
    (tmp_path / "b.json").write_text(json.dumps([row(0.5, 0, 0.6), row(None, 0, 0.5)]))
    (tmp_path / "note.md").write_text("## Reading\n\nThe ladder.\n")
    assert main(["reproduce", "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--out", str(tmp_path), "--name", "m", "--note", "GPU, 3 processes.",
                 "--note-file", str(tmp_path / "note.md")]) == 0
    rows = json.loads((tmp_path / "m.json").read_text())
    assert [(r["kappa_bits"], r["seed"]) for r in rows] == [(None, 0), (None, 1), (0.5, 0),
                                                            (0.5, 1)]
    text = (tmp_path / "m.md").read_text()
    assert "Merged from a.json, b.json" in text
    assert "\n\nGPU, 3 processes.\n\n## Reading\n\nThe ladder.\n\n## Per kappa" in text
    assert "| 0.5 | – | – | – | – | – | 0.500 ± 0.141 |" in capsys.readouterr().out


def test_merge_names_a_missing_file(tmp_path, capsys):
    assert main(["reproduce", "--merge", str(tmp_path / "absent.json"), "--out",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"freetf reproduce: error: --merge: no such file: {tmp_path / 'absent.json'}" in err
    assert "Traceback" not in err
    assert main(["reproduce", "--merge", str(tmp_path / "absent.json"), "--note-file",
                 str(tmp_path / "none.md")]) == 2
    assert f"error: --note-file: no such file: {tmp_path / 'none.md'}" in capsys.readouterr().err


def _fake_rows():
    nan = float("nan")
    return [{"kappa_bits": kappa, "seed": 0, "ce_prior": 0.5, "reproduces": None,
             "independent/position_spread": nan, "shared/position_spread": nan,
             "independent/noise_overlap": 0.1, "shared/noise_overlap": 0.1,
             "independent/valid_rate": 1.0, "shared/valid_rate": 1.0}
            for kappa in (None, 0.015625)]


@pytest.mark.parametrize("mode", ["smoke", "in_process"])
def test_results_go_to_reports_by_default_and_docs_stay_untouched(tmp_path, monkeypatch, mode,
                                                                   capsys):
    """``--smoke`` (as the README suggests) writes the sweep's report folder, an in-process
    run ``reports/``; the committed docs/synthetic_reproduction.* are left as they were."""
    from types import SimpleNamespace

    import freetf.tracking
    from freetf.experiments import reproduce
    from freetf.sweeps.spec import load_sweep

    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    for suffix in ("md", "png", "json"):
        (docs / f"synthetic_reproduction.{suffix}").write_text("the committed result")
    sweep = load_sweep(ROOT / "freetf" / "configs" / "reproduce_synthetic_smoke.yaml")
    logged = []
    tracker = SimpleNamespace(log_artifact=lambda path, folder: logged.append(Path(path)),
                              finish=lambda status: None)
    monkeypatch.setattr(freetf.tracking, "make_tracker", lambda cfg, run_id: tracker)
    monkeypatch.setattr(reproduce, "reproduce_with_tune", lambda *a: (
        _fake_rows(), {}, SimpleNamespace(sweep=sweep, parent_run_id="p", report={},
                                          analysis=SimpleNamespace(
                                              boundaries=[object()],
                                              summary_lines=lambda: ["kappa_pos: 0.1 bits"]))))
    monkeypatch.setattr(reproduce, "reproduce_in_process", lambda *a, **k: (_fake_rows(), {}))
    argv = ["--smoke"] if mode == "smoke" else ["--in-process", "--config", "tiny"]
    assert main(["reproduce", *argv]) == 0
    out = tmp_path / "reports" / ("reproduce_synthetic_smoke" if mode == "smoke" else "")
    written = sorted(p.name for p in out.glob("synthetic_reproduction.*"))
    assert written == ["synthetic_reproduction.json", "synthetic_reproduction.md",
                       "synthetic_reproduction.png"]
    assert all(p.read_text() == "the committed result" for p in docs.iterdir())
    assert [p.parent for p in logged] == ([out] * 3 if mode == "smoke" else [])
    printed = capsys.readouterr().out
    assert ("\nkappa_pos: 0.1 bits\nwrote " in printed) is (mode == "smoke")
    located = "## Where what Z carries changes along kappa" in (
        out / "synthetic_reproduction.md").read_text()
    assert located is (mode == "smoke")


def test_markdown_table_marks_missing_values():
    table = markdown_table([{"kappa_bits": 1.0, "seed": 0, "kl_bits": float("nan")}])
    assert table.splitlines()[2].startswith("| 1 | 0 | – |")


def test_summary_counts_reproducing_seeds_and_gives_mean_and_sd():
    from freetf.experiments.reproduce import summarise, summary_table

    def row(kappa, seed, ce, ok, spread=10.0):
        return {"kappa_bits": kappa, "seed": seed, "ce_prior": ce, "reproduces": ok,
                "kl_bits": None if kappa is None else kappa, "shared/position_spread": spread}

    rows = [row(1.0, 1, 0.6, True, 4.0), row(None, 0, 0.3, None), row(1.0, 0, 0.4, False, 6.0),
            row(1.0, 2, 0.5, True, float("nan")), row(0.5, 0, 0.45, None),
            row(None, 1, 0.5, None)]
    nan = float("nan")
    regimes = ["position", None, "position+noise", "position", "", None]
    for r, regime in zip(rows, regimes, strict=True):
        r["regime"] = regime
    rows.append({**row(1.0, 3, 0.5, None, nan), "regime": "nothing", "converged": 0.0})
    rows.append({**row(1.0, 4, 0.5, None, nan), "regime": "position", "converged": 1.0})
    base, half, one = summarise(rows)
    assert base["kappa_bits"] is None and base["seeds"] == 2 and base["reproduced"] is None
    assert base["ce_prior"] == pytest.approx((0.4, 0.1414213562))  # mean, sample sd
    assert half["paper_row"] is None and half["reproduced"] is None
    assert half["ce_prior"][0] == 0.45 and half["ce_prior"][1] != half["ce_prior"][1]
    assert one["paper_row"] == "position and noise" and (one["seeds"], one["reproduced"]) == (5, 2)
    assert one["ce_prior"] == pytest.approx((0.5, 0.0707106781))
    assert one["shared/position_spread"] == pytest.approx((5.0, 1.4142135624))  # NaN skipped
    table = summary_table(rows).splitlines()
    assert table[2].startswith("| baseline | – | – |") and "| 0.400 ± 0.141 |" in table[2]
    assert table[4].startswith("| 1 | position and noise | 2/5 | position 3, position+noise 1, "
                               "1 unconverged |")
    assert table[3].startswith("| 0.5 | – | – | – |")  # a row without a regime
    assert "no baseline" in summary_table(rows[2:4])
    assert summary_table([rows[-2]]).splitlines()[2].startswith("| 1 | position and noise | "
                                                                "0/1 | 1 unconverged |")


def test_summary_separates_the_studys_options():
    from freetf.experiments.reproduce import summarise, summary_table

    rows = [{"kappa_bits": 1.0, "seed": s, "options": opt, "ce_prior": ce, "reproduces": ok}
            for s, opt, ce, ok in [(0, "", 0.5, False), (1, "", 0.7, False),
                                   (0, "model.mapper=factored", 0.4, True),
                                   (1, "model.mapper=factored", 0.6, True)]]
    plain, factored = summarise(rows)
    assert (plain["options"], plain["reproduced"], plain["ce_prior"][0]) == ("", 0, 0.6)
    assert (factored["options"], factored["reproduced"]) == ("model.mapper=factored", 2)
    table = summary_table(rows).splitlines()
    assert table[0].startswith("| options | κ (bits) |")
    assert table[2].startswith("| defaults | 1 |") and table[3].startswith(
        "| model.mapper=factored | 1 | position and noise | 2/2 | – |")
    assert not summary_table(rows[:2]).startswith("| options")


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_the_tune_path_end_to_end(tmp_path, monkeypatch):
    """The smoke spec through Ray Tune: 2 baselines and 2 kappas x 2 seeds in MLflow, each
    measured, the files logged to the sweep's parent run."""
    from freetf.tracking import mlflow_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--smoke", "--set", f"mlflow.tracking_uri={uri}", "--name", "r"]) \
        == 0
    rows = json.loads((tmp_path / "reports" / "reproduce_synthetic_smoke" / "r.json").read_text())
    assert [(r["kappa_bits"], r["seed"]) for r in rows] == [
        (None, 0), (None, 1), (0.015625, 0), (0.015625, 1), (1.0, 0), (1.0, 1)]
    assert [r["verdict"] for r in rows[:2]] == ["baseline", "baseline"]
    assert all(r["steps"] == 10 and "regime" in r and "verdict_fixed" in r for r in rows)
    client = mlflow_client(uri)
    runs = client.search_runs([client.get_experiment_by_name(
        "freetf-reproduce-smoke").experiment_id])
    parents = [r for r in runs if r.data.tags.get("freetf.role") == "sweep"]
    assert len(parents) == 1 and len(runs) == 7
    assert {r["run_id"] for r in rows} == {r.info.run_id for r in runs} - {
        parents[0].info.run_id}
    names = {a.path for a in client.list_artifacts(parents[0].info.run_id, "reproduction")}
    assert {"reproduction/r.md", "reproduction/r.json", "reproduction/r.png"} <= names


def test_a_row_keeps_the_sweeps_judgement_of_its_trial():
    """The analysis' verdict and regime replace the row's per-run verdict (kept as
    verdict_fixed); NaN and "" become null, numbers floats."""
    import pandas as pd

    from freetf.experiments.reproduce import judgement

    trial = pd.Series({"verdict": "used", "regime": "position", "eval/converged": 1,
                       "cost_nats": 0.0125, "eval/excess_nats": 0.004,
                       "eval/excess_iw_nats": float("nan"), "eval/floor_nats": 0.29,
                       "eval/use_nats": 0.04, "eval/use_position_nats": 1.1,
                       "eval/use_noise_nats": -0.002, "eval/kl_bits": 9.0})
    got = judgement(trial, {"verdict": "active", "kl_bits": 0.12})
    assert got == {"verdict_fixed": "active", "verdict": "used", "regime": "position",
                   "converged": 1.0, "cost_nats": 0.0125, "excess_nats": 0.004,
                   "excess_iw_nats": None, "floor_nats": 0.29, "use_nats": 0.04,
                   "use_position_nats": 1.1, "use_noise_nats": -0.002}
    assert isinstance(got["converged"], float)
    baseline = judgement(pd.Series({"verdict": "baseline", "regime": ""}), {"verdict": None})
    assert baseline["regime"] is None and baseline["verdict"] == "baseline"
    assert baseline["use_position_nats"] is None


def test_the_located_section_shows_the_boundaries_and_copies_the_figures(tmp_path):
    from types import SimpleNamespace

    from freetf.experiments.reproduce import located_section

    assert located_section(None, {}, tmp_path, "r") == ""
    assert located_section(SimpleNamespace(boundaries=[]), {}, tmp_path, "r") == ""
    phase = tmp_path / "sweep" / "phase_diagram.png"
    phase.parent.mkdir()
    phase.write_bytes(b"png")
    analysis = SimpleNamespace(boundaries=[object()], summary_lines=lambda: [
        "kappa_pos (Z: position)  at kl_weight=1: 0.0854 bits [0.0254, 0.287] (95%, 20 trials)"])
    text = located_section(analysis, {"phase": phase, "over_training": tmp_path / "absent.png"},
                           tmp_path / "out", "r")
    assert "```\nkappa_pos (Z: position)  at kl_weight=1: 0.0854 bits [0.0254, 0.287]" in text
    assert "![phase diagram](r_phase.png)" in text and "over_training" not in text
    assert (tmp_path / "out" / "r_phase.png").read_bytes() == b"png"


def test_the_options_name_the_knobs_a_study_varies_and_only_those():
    from freetf.config import load_config
    from freetf.experiments.reproduce import changed_knobs

    cfg = load_config("tiny", ["training.free_bits_per=sequence", "model.mapper=factored",
                               "training.learning_rate=0.01"])
    assert changed_knobs(cfg) == ["model.mapper=factored", "training.free_bits_per=sequence"]
    assert changed_knobs(load_config("tiny")) == []


def test_merged_rows_give_the_boundaries_of_all_their_converged_runs():
    """The fit of the rows' converged runs with their seeds (the fit itself is
    test_verdicts'), per option set; baselines, unconverged and unjudged rows left out."""
    from freetf.evaluation import verdicts
    from freetf.experiments.reproduce import row_fits

    def row(kappa, seed, regime, verdict="used", converged=1.0, options=""):
        return {"kappa_bits": kappa, "seed": seed, "regime": regime, "verdict": verdict,
                "converged": converged, "options": options}

    rows = [row(None, 0, None, "baseline"), row(0.25, 2, "broken", converged=0.0),
            row(0.5, 3, None, None)]
    judged = [row(0.015625, 0, "nothing", "collapsed"), row(0.015625, 1, "nothing"),
              row(0.125, 0, "position"), row(0.125, 1, "nothing"),
              row(1.0, 0, "position+noise"), row(1.0, 1, "position"),
              row(8.0, 0, "broken", "leaking"), row(8.0, 1, "position", "leaking")]
    other = [row(0.125, 0, "position", options="training.free_bits_per=sequence"),
             row(1.0, 0, "broken", "leaking", options="training.free_bits_per=sequence")]
    lines = row_fits(rows + judged + other + [row(0.125, 1, "position", options="x=1")])
    xs, seeds = [-6.0, -6.0, -3.0, -3.0, 0.0, 0.0, 3.0, 3.0], [0, 1] * 4
    regimes = [r["regime"] for r in judged]
    expect = {"collapse": [True] + [False] * 7, "leak": [False] * 6 + [True, True],
              **{k: verdicts.reaches(k, regimes) for k in verdicts.REGIME_ONSETS}}
    assert len(lines) == 10  # "x=1" has one kappa: no fit
    for line, (kind, y) in zip(lines[:5], expect.items(), strict=True):
        fit = verdicts.fit_boundary(kind, xs, y, -6.0, 3.0, 0.95, groups=seeds)
        assert line.endswith(f"at defaults: {fit.text()}"), (line, fit.text())
    pooled = verdicts.fit_boundary("broken", [-3.0, 0.0], [False, True], -3.0, 0.0, 0.95,
                                   groups=[0, 0])
    assert lines[9] == (f"kappa_broken (invalid)   at training.free_bits_per=sequence: "
                        f"{pooled.text()}")
    assert row_fits(rows) == []


def test_merge_of_baselines_alone_draws_their_levels(tmp_path):
    """No Free Transformer row: no kappa axis to log-scale (it raised in tight_layout)."""
    row = {"kappa_bits": None, "seed": 0, "ce_prior": 0.5, "independent/position_spread": 5.0,
           "independent/noise_overlap": 0.2, "independent/valid_rate": 0.9}
    (tmp_path / "b.json").write_text(json.dumps([row]))
    assert main(["reproduce", "--merge", str(tmp_path / "b.json"), "--out", str(tmp_path),
                 "--name", "m"]) == 0
    assert json.loads((tmp_path / "m.json").read_text()) == [row]
    assert (tmp_path / "m.png").stat().st_size > 10_000
