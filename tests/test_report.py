"""Tests for freetf.report: the collapse table and plots from fake runs, and
``freetf report`` against a real (sqlite) MLflow store.  No Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from freetf.cli import main as cli_main
from freetf.results import report
from freetf.sweeps import reporting

pytestmark = pytest.mark.timeout(120)

PNG = b"\x89PNG\r\n\x1a\n"


def _run(run_id: str, *, kl_weight: float, verdict: str, free_bits_bits: float | None = None,
         free_bits_nats: float = 0.3, annealing: str = "constant", kl_nats: float = 0.1,
         stopped: str | None = None, status: str = "FINISHED", sampled: dict | None = None):
    params = {"training.kl_weight": str(kl_weight), "training.free_bits": str(free_bits_nats),
              "training.free_bits_bits": str(free_bits_bits),
              "training.kl_annealing.type": annealing}
    tags = {"freetf.role": "trial", "freetf.sweep": "s", "freetf.trial_key": run_id,
            "freetf.verdict": verdict, "freetf.sampled": json.dumps(sampled or {}),
            "freetf.stopped_early": "true" if stopped else "false"}
    if stopped:
        tags.update({"freetf.stop_reason": stopped, "freetf.stopped_at_step": "10"})
    metrics = {"step": 12.0 if stopped else 40.0, "eval/kl_nats": kl_nats,
               "eval/kl_bits": kl_nats / math.log(2), "eval/ce_gap_nats": 0.01,
               "eval/ce_prior_nats": 1.5, "eval/active_bits": 3.0, "train/kl_nats": kl_nats}
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=f"s/{run_id}",
                                                status=status),
                           data=SimpleNamespace(params=params, tags=tags, metrics=metrics))


@pytest.fixture
def runs():
    position = _run("a", kl_weight=1.0, free_bits_bits=0.015625, verdict="collapsed",
                    kl_nats=0.001, sampled={"training.kl_weight": 1.0, "training.seed": 0})
    position.data.tags["freetf.regime"] = "position"
    return [
        position,
        _run("b", kl_weight=0.1, free_bits_bits=4.0, verdict="leaking", kl_nats=5.0,
             sampled={"training.kl_weight": 0.1, "training.seed": 1}),
        _run("c", kl_weight=1.0, free_bits_bits=None, free_bits_nats=math.log(2),
             verdict="active", kl_nats=0.6, annealing="linear", stopped="asha",
             status="KILLED"),
        _run("d", kl_weight=1.0, free_bits_bits=4.0, verdict="active", kl_nats=2.0),
        _run("e", kl_weight=1.0, free_bits_bits=4.0, verdict="active", kl_nats=0.9),
    ]


def test_runs_frame_reads_params_tags_and_metrics(runs):
    df = report.runs_frame(runs)
    assert len(df) == 5
    row = df.set_index("run_id").loc["c"]
    assert row["free_bits_bits"] == pytest.approx(1.0)  # from nats: log 2 nats = 1 bit
    assert row["kl_annealing"] == "linear"
    assert row["stopped_early"] and row["stop_reason"] == "asha"
    assert df.set_index("run_id").loc["a", "stop_reason"] == ""
    assert df.set_index("run_id").loc["b", "sampled.training.seed"] == 1
    assert list(df.set_index("run_id")["regime"].sort_index()) == ["position", "", "", "", ""]
    assert "| position |" in report.collapse_table(df)  # the tag, shown in the table
    assert list(df["kl_annealing"]) == ["constant"] * 4 + ["linear"]  # sorted by panel
    assert {"eval/kl_nats", "eval/ce_gap_nats", "eval/ce_prior_nats", "eval/active_bits",
            "verdict", "status"} <= set(df.columns)


def test_runs_frame_of_no_runs_has_the_columns():
    df = report.runs_frame([])
    assert df.empty and "verdict" in df.columns and "eval/kl_nats" in df.columns


def test_collapse_table_has_a_row_per_trial(runs):
    table = report.collapse_table(report.runs_frame(runs))
    lines = table.splitlines()
    assert lines[0].startswith("| trial | annealing | free bits (bits) | kl_weight | seed |")
    assert "| verdict | regime | KL (bits/token) | use of Z (nats/token) | valid |" in lines[0]
    assert len(lines) == 2 + 5
    assert "stopped at step 10 (asha)" in table
    assert "| collapsed |" in table and "| leaking |" in table
    assert report.collapse_table(report.runs_frame([])) == "(no trial runs)"


def test_the_table_names_a_trial_by_its_whole_run_name(runs):
    """``kappa=1/4 s1`` whole (its "/" is kappa's); a run named before those names loses its
    sweep's prefix (``s/b`` -> ``b``)."""
    runs[0].info.run_name = "kappa=1/64 s0"
    rows = report.collapse_table(report.runs_frame(runs)).splitlines()[2:]
    assert {row.split(" | ")[0] for row in rows} == {"| kappa=1/64 s0", "| b", "| c", "| d",
                                                     "| e"}


def test_representative_run_is_the_median_kl_of_its_verdict(runs):
    picks = report.representative_runs(report.runs_frame(runs))
    assert list(picks["verdict"]) == ["collapsed", "active", "leaking"]
    assert picks.set_index("verdict").loc["active", "run_id"] == "e"  # KL 0.6 / 0.9 / 2.0


class FakeClient:
    def __init__(self):
        self.asked: list[tuple[str, str]] = []

    def get_metric_history(self, run_id, key):
        self.asked.append((run_id, key))
        return [SimpleNamespace(step=s, value=0.1 * s) for s in (5, 10, 15)]


def _png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data.startswith(PNG)
    return int.from_bytes(data[16:20], "big")


def test_collapse_map_has_one_panel_per_schedule(runs, tmp_path):
    df = report.runs_frame(runs)
    two = report.plot_collapse_map(df, tmp_path / "two.png")
    one = report.plot_collapse_map(df[df["kl_annealing"] == "constant"], tmp_path / "one.png")
    assert _png_width(two) > _png_width(one) + 300
    empty = report.plot_collapse_map(report.runs_frame([]), tmp_path / "empty.png")
    assert empty.read_bytes().startswith(PNG)


def test_kl_traces_read_one_run_per_verdict(runs, tmp_path):
    client = FakeClient()
    path = report.plot_kl_traces(client, report.runs_frame(runs), tmp_path / "kl.png")
    assert path.read_bytes().startswith(PNG)
    assert sorted({run_id for run_id, _ in client.asked}) == ["a", "b", "e"]
    assert {key for _, key in client.asked} == {"train/kl_nats", "train/free_bits_nats"}


def test_write_report_writes_every_file(runs, tmp_path):
    paths = report.write_report(FakeClient(), report.runs_frame(runs), tmp_path / "out")
    assert set(paths) == {"table", "csv", "map", "kl_traces"}
    assert all(p.is_file() for p in paths.values())
    assert len(pd.read_csv(paths["csv"])) == 5
    text = report.summary_text(report.runs_frame(runs), paths, "sqlite:///x.db", "exp")
    assert "mlflow ui --backend-store-uri sqlite:///x.db" in text
    assert str(paths["map"]) in text and "3 active" in text
    linked = report.summary_text(report.runs_frame(runs), paths, "sqlite:///x.db", "exp", "4",
                                 view="freetf-v")  # the sweep's saved view
    assert linked.endswith("then open http://127.0.0.1:5000/#/experiments/4/runs?"
                           "workflowType=machine_learning&viewStateShareKey=freetf-v")


def _store(tmp_path: Path) -> str:
    """A sqlite MLflow store with a sweep parent, two trial runs and an unrelated run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sweeps", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="s").info.run_id
    client.set_tag(parent, "freetf.role", "sweep")
    for name, weight, verdict in (("s/kl_weight=0.1", 0.1, "leaking"),
                                  ("s/kl_weight=1", 1.0, "collapsed")):
        run_id = client.create_run(exp, run_name=name).info.run_id
        tags = {"freetf.role": "trial", "freetf.sweep": "s", "freetf.verdict": verdict,
                "mlflow.parentRunId": parent, "freetf.trial_key": name}
        client.log_batch(run_id, params=[Param("training.kl_weight", str(weight)),
                                         Param("training.free_bits_bits", "1.0")],
                         tags=[RunTag(k, v) for k, v in tags.items()],
                         metrics=[Metric("train/kl_nats", 0.5 * s, 0, s) for s in (5, 10)]
                         + [Metric("eval/kl_nats", 0.4, 0, 10)])
        client.set_terminated(run_id, "FINISHED")
    client.create_run(exp, run_name="plain training run")
    return uri


def test_report_command_reads_mlflow_alone(tmp_path, capsys):
    uri = _store(tmp_path)
    out = reporting.report("sweeps", uri, tmp_path / "reports")
    assert "kl_weight=0.1" in out and "| leaking |" in out and "| collapsed |" in out
    assert "2 trials" in out
    assert f"mlflow ui --backend-store-uri {uri}" in out
    for name in ("collapse_map.png", "kl_traces.png", "collapse_table.md", "trials.csv"):
        assert (tmp_path / "reports" / "sweeps" / name).is_file()


def test_report_cli_errors_name_the_problem(tmp_path, capsys):
    uri = _store(tmp_path)
    assert cli_main(["report", "--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    assert cli_main(["report", "--experiment", "sweeps", "--tracking-uri", missing]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()


def _baseline_sweep(tmp_path: Path, with_spec: bool = True) -> str:
    """A boundary sweep in MLflow: two baseline seeds and a Free Transformer per kappa
    in {1/64, 1/4, 4} bits and seed, whose measurements are collapsed (no use), used and
    leaking (broken generation) against the baselines; their own per-trial verdict tags
    all say ``active``."""
    from freetf.sweeps.spec import load_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sweeps", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="b").info.run_id
    client.set_tag(parent, "freetf.role", "sweep")
    client.set_tag(parent, "freetf.sweep", "b")
    if with_spec:
        spec = load_sweep(Path(__file__).parent.parent / "freetf" / "configs" / "search_kl.yaml")
        client.log_text(parent, spec.to_yaml(), "search_space.yaml")
    baseline_ce = {0: 1.00, 1: 1.02}
    # (kappa, seed, honest CE, use interval's low end, valid rate, its interval)
    trials = [(None, seed, baseline_ce[seed], None, 0.95, 0.92, 0.97) for seed in (0, 1)]
    for seed in (0, 1):
        trials += [(1 / 64, seed, baseline_ce[seed] + 0.001, 0.0, 0.95, 0.92, 0.97),  # no use
                   (0.25, seed, baseline_ce[seed] + 0.01, 0.05, 0.9, 0.86, 0.93),  # used
                   (4.0, seed, baseline_ce[seed] + 3.0, 0.5, 0.05, 0.03, 0.08)]  # broken
    for kappa, seed, ce, use_low, valid, valid_low, valid_high in trials:
        sampled = {"training.seed": seed, "model.latent_dim": 0 if kappa is None else 8,
                   "training.free_bits_bits": 1.0 if kappa is None else kappa}
        run_id = client.create_run(exp, run_name=f"b/{kappa},{seed}").info.run_id
        tags = {"freetf.role": "trial", "freetf.sweep": "b", "freetf.verdict": "active",
                "mlflow.parentRunId": parent, "freetf.trial_key": f"{kappa},{seed}",
                "freetf.model_kind": "baseline" if kappa is None else "free_transformer",
                "freetf.sampled": json.dumps(sampled)}
        params = {**sampled, "training.kl_weight": 1.0}
        values = {"eval/ce_prior_nats": ce, "eval/valid_rate": valid,
                  "eval/valid_low": valid_low, "eval/valid_high": valid_high,
                  "eval/converged": 1.0, **({} if use_low is None else
                                            {"eval/use_low_nats": use_low})}
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()],
                         metrics=[Metric(k, v, 0, 300) for k, v in values.items()])
        client.set_terminated(run_id, "FINISHED")
    return uri


@pytest.mark.parametrize("with_spec", [True, False])
def test_report_judges_a_sweep_against_its_own_baselines(tmp_path, capsys, caplog, with_spec):
    caplog.set_level("INFO", logger="freetf.sweeps.reporting")
    uri = _baseline_sweep(tmp_path, with_spec)
    out = reporting.report("sweeps", uri, tmp_path / "reports", sweep="b")
    assert "sweep b: verdicts against its baselines" in out and "kappa_c" in out
    assert ("analysed with the defaults" in caplog.text) is not with_spec  # spec read back
    folder = tmp_path / "reports" / "b" / "b"
    judged = pd.read_csv(folder / "verdicts.csv")
    verdicts = {(row.free_bits_bits, row.seed): row.verdict for row in judged.itertuples()}
    for seed in (0, 1):
        assert verdicts[(1 / 64, seed)] == "collapsed"
        assert verdicts[(0.25, seed)] == "used"
        assert verdicts[(4.0, seed)] == "leaking"
    assert (judged["model_kind"] == "baseline").sum() == 2
    assert (folder / "boundaries.md").is_file() and (folder / "phase_diagram.png").is_file()


def test_collect_histories_reads_every_logged_step(tmp_path):
    uri = _baseline_sweep(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    runs = report.collect_runs(client, "sweeps", sweep="b")
    run_id = runs["run_id"].iloc[0]
    client.log_metric(run_id, "eval/valid_rate", 0.5, step=100)
    found = report.collect_histories(client, list(runs["run_id"]),
                                     ("eval/valid_rate", "eval/use_low_nats"))
    assert len(found) == len(runs) + 1 and set(found["step"]) == {100, 300}
    first = found[found["run_id"] == run_id].set_index("step")
    assert first.loc[100, "eval/valid_rate"] == 0.5
    assert np.isnan(first.loc[100, "eval/use_low_nats"])
    baselines = set(runs[runs["model_kind"] == "baseline"]["run_id"])
    assert found[found["run_id"].isin(baselines)]["eval/use_low_nats"].isna().all()


# ------------------------------------------------- the runs table, cell by cell (no MLflow)


def _mlflow_run(run_id, name, status="FINISHED", params=None, tags=None, metrics=None):
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=name, status=status),
                           data=SimpleNamespace(params=params or {}, tags=tags or {},
                                                metrics=metrics or {}))


COLUMNS = ["run_id", "run_name", "sweep", "trial_key", "status", "verdict", "regime",
           "outcome", "stopped_early", "stop_reason", "stopped_at_step", "kl_weight",
           "free_bits_bits", "kl_annealing", "free_bits_schedule", "model_kind", "seed",
           *report.METRICS]


def _same(found: dict, expected: dict) -> bool:
    """Equal, NaN equal to NaN."""
    def key(v):
        return "nan" if isinstance(v, float) and math.isnan(v) else v
    return {k: key(v) for k, v in found.items()} == {k: key(v) for k, v in expected.items()}


def test_runs_frame_gives_every_column_of_a_trial():
    stopped = _mlflow_run(
        "r1", "sw/one", status="KILLED",
        params={"training.kl_weight": "0.5", "training.free_bits_bits": "2.0",
                "training.free_bits": "9.0", "training.kl_annealing.type": "linear",
                "training.free_bits_schedule.type": "cosine", "training.seed": "3"},
        tags={"freetf.sweep": "sw", "freetf.trial_key": "k1", "freetf.verdict": "used",
              "freetf.regime": "noise", "freetf.outcome": "stopped",
              "freetf.stopped_early": "true", "freetf.stop_reason": "asha",
              "freetf.stopped_at_step": "120", "freetf.model_kind": "free_transformer",
              "freetf.sampled": json.dumps({"training.seed": 3, "model.latent_dim": 8})},
        metrics={"eval/kl_nats": 0.7, "train/steps_done": 130.0, "eval/use_noise_low_nats": 0.2,
                 "other/metric": 5.0})
    bare = _mlflow_run("r2", "plain", status="RUNNING",
                       params={"training.free_bits": str(2 * math.log(2))},
                       tags={"freetf.stop_reason": "ignored without stopped_early",
                             "freetf.stopped_at_step": "not a number"})
    df = report.runs_frame([stopped, bare])
    assert list(df.columns) == [*COLUMNS, "sampled.model.latent_dim", "sampled.training.seed"]
    one, two = df.to_dict("records")  # sorted by annealing: constant before linear
    nan = math.nan
    metrics = dict.fromkeys(report.METRICS, nan)
    assert _same(two, {
        "run_id": "r1", "run_name": "sw/one", "sweep": "sw", "trial_key": "k1",
        "status": "KILLED", "verdict": "used", "regime": "noise", "outcome": "stopped",
        "stopped_early": True, "stop_reason": "asha", "stopped_at_step": 120.0,
        "kl_weight": 0.5, "free_bits_bits": 2.0, "kl_annealing": "linear",
        "free_bits_schedule": "cosine", "model_kind": "free_transformer", "seed": 3.0,
        **metrics, "eval/kl_nats": 0.7, "train/steps_done": 130.0,
        "eval/use_noise_low_nats": 0.2,
        "sampled.model.latent_dim": 8.0, "sampled.training.seed": 3.0})
    assert _same(one, {
        "run_id": "r2", "run_name": "plain", "sweep": "", "trial_key": "", "status": "RUNNING",
        "verdict": "", "regime": "", "outcome": "unknown", "stopped_early": False,
        "stop_reason": "", "stopped_at_step": nan, "kl_weight": nan,
        "free_bits_bits": pytest.approx(2.0), "kl_annealing": "constant",
        "free_bits_schedule": "constant", "model_kind": "", "seed": nan, **metrics,
        "sampled.model.latent_dim": nan, "sampled.training.seed": nan})
    assert list(report.runs_frame([]).columns) == COLUMNS


def test_runs_frame_sorts_by_schedule_kappa_weight_then_name():
    def run(name, annealing, bits, weight):
        return _mlflow_run(name, name, params={
            "training.kl_annealing.type": annealing, "training.free_bits_bits": str(bits),
            "training.kl_weight": str(weight)})

    runs = [run("z", "b", 1.0, 1.0), run("y", "a", 2.0, 1.0), run("x", "a", 1.0, 2.0),
            run("w", "a", 1.0, 1.0), run("v", "a", 1.0, 1.0)]
    assert list(report.runs_frame(runs)["run_name"]) == ["v", "w", "x", "y", "z"]
    assert list(report.runs_frame(runs).index) == [0, 1, 2, 3, 4]


def test_free_bits_are_read_in_bits_else_from_nats():
    assert report._free_bits_bits({"training.free_bits_bits": "0.25",
                                   "training.free_bits": "5"}) == 0.25
    assert report._free_bits_bits({"training.free_bits_bits": "None",
                                   "training.free_bits": str(math.log(2) / 4)}) == \
        pytest.approx(0.25)
    assert math.isnan(report._free_bits_bits({}))
    assert report._number("3.5") == 3.5
    assert math.isnan(report._number(None)) and math.isnan(report._number("x"))


class HistoryClient:
    """MLflow's client for the histories: each (run, key)'s metrics, out of step order."""

    def __init__(self, histories):
        self.histories = histories

    def get_metric_history(self, run_id, key):
        return [SimpleNamespace(step=s, value=v)
                for s, v in self.histories.get((run_id, key), [])]


def test_collect_histories_has_a_row_per_run_and_step():
    client = HistoryClient({("a", "k1"): [(10, 1.0), (5, 0.5)], ("a", "k2"): [(10, 2.0)],
                            ("b", "k2"): [(7, 3.0)]})
    found = report.collect_histories(client, ["a", "b", "c"], ("k1", "k2"))
    assert list(found.columns) == ["run_id", "step", "k1", "k2"]
    assert found.fillna(-1).to_dict("records") == [
        {"run_id": "a", "step": 10, "k1": 1.0, "k2": 2.0},
        {"run_id": "a", "step": 5, "k1": 0.5, "k2": -1},
        {"run_id": "b", "step": 7, "k1": -1, "k2": 3.0}]
    none = report.collect_histories(client, ["c"], ("k1",))
    assert none.empty and list(none.columns) == ["run_id", "step", "k1"]


def test_collect_runs_asks_mlflow_for_the_trials_of_the_experiment_or_one_sweep():
    calls = []
    trial = _mlflow_run("r", "s/r", params={"training.kl_weight": "1"})

    class Client:
        def get_experiment_by_name(self, name):
            return SimpleNamespace(experiment_id="7") if name == "exp" else None

        def search_runs(self, ids, filter_string, max_results):
            calls.append((ids, filter_string, max_results))
            return [trial]

    found = report.collect_runs(Client(), "exp")
    pd.testing.assert_frame_equal(found, report.runs_frame([trial]))
    report.collect_runs(Client(), "exp", sweep="s1")
    assert calls == [(["7"], "tags.`freetf.role` = 'trial'", 10_000),
                     (["7"], "tags.`freetf.role` = 'trial' and tags.`freetf.sweep` = 's1'",
                      10_000)]
    with pytest.raises(report.ReportError, match="^no MLflow experiment named 'nope'$"):
        report.collect_runs(Client(), "nope")
    assert issubclass(report.ReportError, LookupError)


# ------------------------------------------------------------------- the table, line by line


def _table_row(**values):
    base = {"run_id": "r", "run_name": "s/t", "sweep": "s", "status": "FINISHED",
            "verdict": "used", "regime": "", "outcome": "finished", "stopped_early": False,
            "stop_reason": "", "stopped_at_step": math.nan, "kl_weight": 0.5,
            "free_bits_bits": 0.125, "kl_annealing": "constant", "eval/kl_bits": 1.23456,
            "eval/use_nats": 0.0123456, "eval/valid_rate": 0.98765,
            "eval/ce_prior_nats": 2.345678, "train/steps_done": 77.0, "eval/kl_nats": 0.5,
            "train/kl_nats": 0.5}
    return {**base, **values}


def test_collapse_table_gives_each_cell_of_a_trial():
    df = pd.DataFrame([
        _table_row(**{"sampled.training.kl_weight": 0.5, "sampled.training.free_bits_bits": 1,
                      "sampled.training.free_bits": 1, "sampled.training.kl_annealing.type": 1,
                      "sampled.model.latent_dim": 8, "sampled.training.seed": 2}),
        _table_row(run_name="s/u", verdict="", regime="noise", stopped_early=True,
                   stop_reason="plateau", stopped_at_step=40.0, **{
                       "sampled.training.kl_weight": 0.5, "sampled.training.free_bits_bits": 1,
                       "sampled.training.free_bits": 1,
                       "sampled.training.kl_annealing.type": 1,
                       "sampled.model.latent_dim": math.nan, "sampled.training.seed": 3,
                       "eval/use_nats": math.nan, "eval/valid_rate": math.nan}),
    ])
    assert report.collapse_table(df).split("\n") == [
        "| trial | annealing | free bits (bits) | kl_weight | latent_dim | seed | verdict "
        "| regime | KL (bits/token) | use of Z (nats/token) | valid | CE prior (nats) "
        "| ended |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| t | constant | 0.125 | 0.5 | 8 | 2 | used | - | 1.235 | 0.01235 | 0.988 | 2.346 "
        "| finished |",
        "| u | constant | 0.125 | 0.5 | - | 3 | - | noise | 1.235 | - | - | 2.346 "
        "| stopped at step 40 (plateau) |"]


def test_collapse_table_without_the_optional_columns():
    row = _table_row()
    for key in ("regime", "eval/use_nats", "eval/valid_rate", "outcome"):
        del row[key]
    lines = report.collapse_table(pd.DataFrame([row])).split("\n")
    assert lines[2] == "| t | constant | 0.125 | 0.5 | used | - | 1.235 | - | - | 2.346 " \
                       "| finished |"


def test_how_a_trial_ended():
    assert report._ended(_table_row(stopped_early=True, stop_reason="asha",
                                    stopped_at_step=12345678.0)) == \
        "stopped at step 12345678 (asha)"  # every digit, not 1.23457e+07
    assert report._ended(_table_row(stopped_early=True, stop_reason="asha")) == \
        "stopped at step 77 (asha)"  # no step tagged: the steps it did
    assert report._ended(_table_row(status="RUNNING", outcome="unknown")) == "running"
    assert report._ended(_table_row(status="KILLED", outcome="interrupted")) == "interrupted"
    assert report._ended(_table_row(status="FAILED", outcome="")) == "failed"
    no_outcome = _table_row(status="FINISHED")
    del no_outcome["outcome"]
    assert report._ended(no_outcome) == "finished"


def test_cells_are_four_significant_digits_and_nan_a_dash():
    assert report._fmt(math.nan) == "-"
    assert report._fmt(math.nan, "g") == "-"
    assert report._fmt(1 / 3) == "0.3333"
    assert report._fmt(12345) == "1.234e+04"
    assert report._fmt(1 / 3, ".2g") == "0.33"
    assert report._fmt("text") == "text"
    assert report._fmt(None) == "None"


# ------------------------------------------------------------ the figures, panel by panel


@pytest.fixture
def saved(monkeypatch):
    """report.save_figure recorded: (figure, path) of each call."""
    figures = []
    monkeypatch.setattr(report, "save_figure",
                        lambda fig, path: figures.append((fig, path)) or Path(path))
    return figures


def _scatters(ax):
    """(points, edge colour, face colour or None when hollow, sizes, line widths)."""
    out = []
    for c in ax.collections:
        face, edge = c.get_facecolor(), c.get_edgecolor()
        out.append(([tuple(round(v, 9) for v in p) for p in c.get_offsets().tolist()],
                    tuple(edge[0]) if len(edge) else None,
                    tuple(face[0]) if len(face) else None, list(c.get_sizes()),
                    list(c.get_linewidths())))
    return out


def test_the_figure_helper_makes_a_row_of_panels_sharing_y():
    fig, axes = report._figure(5.0, 3.0, 3)
    assert tuple(fig.get_size_inches()) == (5.0, 3.0) and len(axes) == 3
    assert fig.get_layout_engine().__class__.__name__ == "ConstrainedLayoutEngine"
    assert all(ax.get_shared_y_axes().joined(axes[0], ax) for ax in axes)
    assert not axes[0].get_shared_x_axes().joined(axes[0], axes[1])
    assert fig.canvas.__class__.__name__ == "FigureCanvasAgg"
    (one,) = report._figure(2.0, 1.0)[1]  # one panel by default
    assert one.get_subplotspec().get_geometry()[:2] == (1, 1)


def test_collapse_map_draws_each_trial_at_its_kappa_and_weight(saved, tmp_path):
    from matplotlib.colors import to_rgba

    df = pd.DataFrame([
        _table_row(run_name="s/a", verdict="collapsed", free_bits_bits=0.5, kl_weight=1.0,
                   **{"eval/kl_bits": 0.0123}),
        _table_row(run_name="s/b", verdict="", outcome="failed", free_bits_bits=0.5,
                   kl_weight=1.0, stopped_early=True, **{"eval/kl_bits": 2.0}),
        _table_row(run_name="s/c", verdict="odd", free_bits_bits=4.0, kl_weight=0.1,
                   **{"eval/kl_bits": math.nan}),
        _table_row(run_name="s/d", verdict="leaking", free_bits_bits=2.0, kl_weight=0.5,
                   kl_annealing="linear", **{"eval/kl_bits": 3.0}),
        _table_row(run_name="s/e", verdict="used", free_bits_bits=math.nan),  # not drawn
    ])
    path = report.plot_collapse_map(df, tmp_path / "map.png")
    assert path == tmp_path / "map.png"
    ((fig, where),) = saved
    assert where == tmp_path / "map.png"
    assert tuple(fig.get_size_inches()) == pytest.approx((1.8 + 4.2 * 2, 4.8))
    constant, linear = fig.axes[:2]
    assert [ax.get_title() for ax in (constant, linear)] == ["KL annealing: constant",
                                                             "KL annealing: linear"]
    for ax in (constant, linear):
        assert ax.get_xlabel() == "free bits kappa (bits per token)"
        assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
        assert ax.xaxis.get_transform().base == 2 and ax.yaxis.get_transform().base == 10
        assert ax.margins() == (0.25, 0.25)
        assert ax.xaxis.get_gridlines()[0].get_visible()
        assert ax.xaxis.get_gridlines()[0].get_alpha() == 0.3
    assert constant.get_ylabel() == "kl_weight (beta)" and linear.get_ylabel() == ""
    blue, gray, red = to_rgba("tab:blue"), to_rgba("tab:gray"), to_rgba("tab:red")
    shift = 2 ** 0.09  # two trials at one point: spread by 2^(+-0.09)
    drawn = _scatters(constant)
    # the point (0.5, 1) first (groupby sorts), its two trials side by side; then (4, 0.1)
    assert drawn[:3] == [
        ([(round(0.5 / shift, 9), 1.0)], blue, blue, [260.0], [2.0]),
        ([(round(0.5 * shift, 9), 1.0)], gray, None, [260.0], [2.0]),  # stopped: hollow
        ([(4.0, 0.1)], gray, gray, [260.0], [2.0])]  # a verdict without a colour: gray
    assert _scatters(linear) == [([(2.0, 0.5)], red, red, [260.0], [2.0])]
    assert [(a.get_text(), pytest.approx(a.xy), a.xyann, a.get_fontsize(),
             a.get_horizontalalignment()) for a in constant.texts] == [
        ("0.012", (0.5 / shift, 1.0), (0, -17), 7.0, "center"),
        ("2", (0.5 * shift, 1.0), (0, -17), 7.0, "center"),
        ("-", (4.0, 0.1), (0, -17), 7.0, "center")]
    assert all(a.anncoords == "offset points" for a in constant.texts)
    assert [a.get_text() for a in linear.texts] == ["3"]
    (legend,) = fig.legends
    # the verdicts drawn, in the verdicts' order (not "odd", which has no place there)
    assert [t.get_text() for t in legend.get_texts()] == ["collapsed", "leaking", "failed"]
    assert legend.get_title().get_text() == "verdict"
    assert [tuple(h.get_facecolor()[0]) for h in legend.legend_handles] == [blue, red, gray]
    # the legend's handles: empty scatters on the first panel, squares of size 80
    assert [(d[0], d[2], d[3]) for d in drawn[3:]] == [([], c, [80.0]) for c in (blue, red, gray)]
    square = constant.collections[0].get_paths()[0].vertices
    assert [np.array_equal(h.get_paths()[0].vertices, square)
            for h in legend.legend_handles] == [True] * 3
    assert fig._suptitle.get_text() == (
        "Collapse map\nfilled: ran to the end, hollow: stopped early; label: final raw KL "
        "(bits/token)")
    assert fig._suptitle.get_fontsize() == 10


def test_collapse_map_of_no_usable_trial_says_so(saved, tmp_path):
    for df in (report.runs_frame([]), pd.DataFrame([_table_row(kl_weight=math.nan)])):
        report.plot_collapse_map(df, tmp_path / "empty.png")
        fig = saved[-1][0]
        (ax,) = fig.axes
        assert ax.get_title() == "KL annealing: -"
        assert [t.get_text() for t in ax.texts] == [
            "no trial runs with kl_weight and free bits"]
        (text,) = ax.texts
        assert text.get_position() == (0.5, 0.5) and text.get_ha() == "center"
        assert text.get_transform() == ax.transAxes
        assert (ax.get_xscale(), ax.get_yscale()) == ("linear", "linear")
        assert len(ax.collections) == 0 and fig.legends == []
        assert ax.get_ylabel() == "kl_weight (beta)"
    assert tuple(saved[0][0].get_size_inches()) == pytest.approx((6.0, 4.8))


def test_representative_run_is_the_one_at_its_verdicts_median_kl():
    df = pd.DataFrame([
        _table_row(run_id="u1", verdict="used", **{"eval/kl_nats": 1.0, "train/kl_nats": 9.0}),
        _table_row(run_id="u2", verdict="used", **{"eval/kl_nats": math.nan,
                                                   "train/kl_nats": 2.9}),  # train's KL
        _table_row(run_id="u3", verdict="used", **{"eval/kl_nats": 5.0, "train/kl_nats": 0.0}),
        _table_row(run_id="c1", verdict="collapsed", **{"eval/kl_nats": math.nan,
                                                        "train/kl_nats": math.nan}),
        _table_row(run_id="f1", verdict="", outcome="failed",
                   **{"eval/kl_nats": -1.0, "train/kl_nats": 0.0}),
        _table_row(run_id="f2", verdict="", outcome="failed",
                   **{"eval/kl_nats": math.nan, "train/kl_nats": math.nan}),
    ], index=[10, 11, 12, 13, 14, 15])
    picks = report.representative_runs(df)
    # median 2.9: u2; collapsed has no KL at all: its first run; failed: the one with a KL
    assert list(picks["run_id"]) == ["c1", "u2", "f1"]
    assert list(picks.index) == [13, 11, 14]
    assert report.representative_runs(df.iloc[:0]).empty


class TraceClient:
    """MLflow's client for the KL traces: each (run, key)'s history, out of step order."""

    def __init__(self, histories):
        self.histories = histories

    def get_metric_history(self, run_id, key):
        return [SimpleNamespace(step=s, value=v)
                for s, v in self.histories.get((run_id, key), [])]


def test_kl_traces_draw_one_run_per_verdict_with_its_kappa(saved, tmp_path):
    from matplotlib.colors import to_rgba

    df = pd.DataFrame([
        _table_row(run_id="c", run_name="s/c", verdict="collapsed", **{"eval/kl_nats": 0.1}),
        _table_row(run_id="x", run_name="s/x", verdict="", outcome="failed",
                   **{"eval/kl_nats": 0.3}),
    ])
    client = TraceClient({("c", "train/kl_nats"): [(20, 0.5), (10, 0.25)],
                          ("c", "train/free_bits_nats"): [(10, 0.0625)],
                          ("x", "train/kl_nats"): [(5, 2.0)],
                          ("u", "train/kl_nats"): [(1, 9.0)]})  # not asked: not drawn
    assert report.plot_kl_traces(client, df, tmp_path / "kl.png") == tmp_path / "kl.png"
    ((fig, where),) = saved
    assert where == tmp_path / "kl.png"
    assert tuple(fig.get_size_inches()) == (8.0, 4.4)
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "step", "raw KL (nats per token)",
        "KL(Q(Z|S) || P(Z)) of one run per verdict (dashed: free-bits kappa)")
    assert [(list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle(),
             to_rgba(line.get_color()), line.get_label()) for line in ax.get_lines()] == [
        ([10, 20], [0.25, 0.5], "-", to_rgba("tab:blue"), "collapsed: c"),
        ([10], [0.0625], "--", to_rgba("tab:blue"), "_child1"),
        ([5], [2.0], "-", to_rgba("tab:gray"), "failed: x")]
    assert ax.get_yscale() == "symlog" and ax.yaxis.get_transform().linthresh == 1e-3
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["collapsed: c", "failed: x"]
    assert {t.get_fontsize() for t in legend.get_texts()} == {8.0}
    assert len(ax.texts) == 0
    assert ax.yaxis.get_gridlines()[0].get_visible()
    assert ax.yaxis.get_gridlines()[0].get_alpha() == 0.3


def test_kl_traces_without_a_history_say_so(saved, tmp_path):
    for df in (report.runs_frame([]), pd.DataFrame([_table_row(run_id="c")])):
        report.plot_kl_traces(TraceClient({}), df, tmp_path / "kl.png")
        (ax,) = saved[-1][0].axes
        assert [t.get_text() for t in ax.texts] == ["no KL history"]
        (text,) = ax.texts
        assert text.get_position() == (0.5, 0.5) and text.get_ha() == "center"
        assert text.get_transform() == ax.transAxes
        assert ax.get_yscale() == "linear" and ax.get_legend() is None


def test_write_report_writes_the_table_csv_and_both_figures(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(report, "plot_collapse_map",
                        lambda df, path: drawn.append(("map", len(df), path)) or path)
    monkeypatch.setattr(report, "plot_kl_traces",
                        lambda client, df, path: drawn.append(("kl", client, len(df), path))
                        or path)
    df = pd.DataFrame([_table_row(), _table_row(run_name="s/u")])
    out = tmp_path / "new" / "folder"
    paths = report.write_report("client", df, out)
    assert paths == {"table": out / "collapse_table.md", "csv": out / "trials.csv",
                     "map": out / "collapse_map.png", "kl_traces": out / "kl_traces.png"}
    assert list(paths) == ["table", "csv", "map", "kl_traces"]
    assert drawn == [("map", 2, out / "collapse_map.png"),
                     ("kl", "client", 2, out / "kl_traces.png")]
    assert paths["table"].read_text() == report.collapse_table(df) + "\n"
    written = pd.read_csv(paths["csv"])
    assert list(written.columns) == list(df.columns)  # no index column
    assert list(written["run_name"]) == ["s/t", "s/u"]
    report.write_report("client", df, out)  # the folder exists already


def test_summary_text_is_the_table_counts_files_and_where_to_look():
    df = pd.DataFrame([_table_row(), _table_row(run_name="s/u"),
                       _table_row(run_name="s/v", verdict="", outcome="failed")])
    paths = {"map": Path("/r/map.png"), "kl_traces": Path("/r/kl.png"),
             "table": Path("/r/t.md"), "csv": Path("/r/trials.csv")}
    tail = ["",
            "3 trials: 2 used, 1 failed",
            "collapse map:  /r/map.png",
            "KL traces:     /r/kl.png",
            "table:         /r/t.md (and trials.csv)",
            "compare runs:  mlflow ui --backend-store-uri sqlite:///m.db"]
    assert report.summary_text(df, paths, "sqlite:///m.db", "exp").split("\n") == [
        *report.collapse_table(df).split("\n"), *tail,
        "               then open experiment 'exp' at http://127.0.0.1:5000"]
    assert report.summary_text(df, paths, "sqlite:///m.db", "exp", "4").split("\n")[-1] == \
        "               then open http://127.0.0.1:5000/#/experiments/4/runs?" \
        "workflowType=machine_learning"
    empty = report.summary_text(df.iloc[:0], paths, "u", "exp")
    assert empty.split("\n")[:3] == ["(no trial runs)", "", "0 trials: none"]


def test_runs_frame_without_tags_reads_how_it_ended_from_the_status():
    runs = [_mlflow_run("f", "f", status="FINISHED"),
            _mlflow_run("k", "k", status="KILLED", tags={"freetf.stopped_early": "true"})]
    df = report.runs_frame(runs).set_index("run_id")
    assert df.loc["f", "outcome"] == "finished" and df.loc["k", "outcome"] == "stopped"
    assert df.loc["k", "stopped_early"] and df.loc["k", "stop_reason"] == ""  # no reason


def test_table_cells_in_exponent_form_and_a_deep_keys_last_part():
    row = _table_row(**{"sampled.training.free_bits_schedule.type": "linear",
                        "eval/valid_rate": 1e-5})
    header, _, line = report.collapse_table(pd.DataFrame([row])).split("\n")
    assert header.startswith("| trial | annealing | free bits (bits) | kl_weight | type |")
    assert " | 1e-05 | " in line


def test_the_collapse_maps_sizes_legend_and_grid_do_not_follow_the_style(saved, tmp_path):
    import matplotlib

    df = pd.DataFrame([_table_row(verdict="collapsed", **{"eval/kl_bits": 1.23e-5})])
    with matplotlib.rc_context({"figure.figsize": (3.0, 2.0), "font.size": 7.0}):
        report.plot_collapse_map(df, tmp_path / "map.png")
    fig = saved[-1][0]
    assert tuple(fig.get_size_inches()) == pytest.approx((6.0, 4.8))
    assert fig._suptitle.get_fontsize() == 10
    (ax,) = fig.axes
    assert [a.get_text() for a in ax.texts] == ["1.2e-05"]
    for axis in (ax.xaxis, ax.yaxis):  # the minor grid of the log axes too
        (minor,) = axis.get_minor_ticks(1)
        assert minor.gridline.get_visible() and minor.gridline.get_alpha() == 0.3
    (legend,) = fig.legends
    assert (legend._loc, legend._outside_loc) == (7, "right")  # "outside right center"
