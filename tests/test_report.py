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
