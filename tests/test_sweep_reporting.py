"""``freetf report``'s wiring (freetf/sweeps/reporting.py) against recording stand-ins for
MLflow and the report's parts; tests/test_report.py runs it on a real store."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from freetf.results import analysis
from freetf.results.over_training import HISTORY_METRICS
from freetf.results.report import ReportError
from freetf.sweeps import reporting
from freetf.sweeps.spec import SweepConfig, load_sweep

pytestmark = pytest.mark.timeout(60)


class Client:
    def __init__(self, uri: str) -> None:
        self.uri = uri

    def get_experiment_by_name(self, name):
        return SimpleNamespace(experiment_id=f"id-of-{name}")


@pytest.fixture
def parts(monkeypatch):
    """Each part ``report`` calls, recording its arguments; ``seen["df"]`` is what
    collect_runs returns."""
    seen: dict = {"df": pd.DataFrame({"run_id": ["r1"], "sweep": ["s"],
                                      "model_kind": ["free_transformer"]})}

    def collect_runs(client, experiment, sweep=None):
        seen["collect"] = (client.uri, experiment, sweep)
        return seen["df"]

    def write_report(client, df, folder):
        seen["write"] = (client.uri, df is seen["df"], folder)
        return {"table": Path(folder) / "t.md"}

    def summary_text(df, paths, uri, experiment, experiment_id):
        seen["summary"] = df is seen["df"]
        return f"summary of {experiment} ({experiment_id}) at {uri}: {sorted(paths)}"

    def analyse_sweeps(client, experiment, df, folder):
        seen["analyse"] = (client.uri, experiment, df is seen["df"], folder)
        return {"s": ["line 1", "line 2"], "t": ["line 3"]}

    monkeypatch.setattr("freetf.tracking.mlflow_client", Client)
    for name, part in [("collect_runs", collect_runs), ("write_report", write_report),
                       ("summary_text", summary_text), ("analyse_sweeps", analyse_sweeps)]:
        monkeypatch.setattr(reporting, name, part)
    return seen


def test_report_is_the_summary_then_each_sweeps_verdicts(tmp_path, parts):
    store = tmp_path / "mlflow.db"
    store.touch()
    uri = f"sqlite:///{store}"
    out = reporting.report("exp", uri, tmp_path / "out")
    assert out == "\n".join([
        f"summary of exp (id-of-exp) at {uri}: ['table']",
        "", "sweep s: verdicts against its baselines", "line 1", "line 2",
        "", "sweep t: verdicts against its baselines", "line 3"])
    assert parts["collect"] == (uri, "exp", None)
    assert parts["summary"]  # of the runs collected
    assert parts["write"] == (uri, True, tmp_path / "out" / "exp")
    assert parts["analyse"] == (uri, "exp", True, tmp_path / "out" / "exp")
    # one sweep: its own folder, and only its trials
    reporting.report("exp", uri, str(tmp_path / "out"), sweep="s")
    assert parts["collect"] == (uri, "exp", "s")
    assert parts["write"] == (uri, True, tmp_path / "out" / "s")


def test_report_needs_a_store_and_trial_runs(tmp_path, parts, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = f"sqlite:///{tmp_path / 'mlflow.db'}"  # no --tracking-uri: ./mlflow.db
    with pytest.raises(ReportError, match=rf"^no MLflow store at {default}; pass "
                                          rf"--tracking-uri$"):
        reporting.report("exp", None, tmp_path / "out")
    assert "collect" not in parts
    parts["df"] = parts["df"].iloc[:0]
    server = "http://localhost:5000"  # not a file: no store to look for
    with pytest.raises(ReportError, match=r"^experiment 'exp' at http://localhost:5000 has "
                                          r"no sweep trial runs \(tag freetf.role=trial\)$"):
        reporting.report("exp", server, tmp_path / "out")
    assert parts["collect"] == (server, "exp", None)


def _frame() -> pd.DataFrame:
    """Sweep "b" trained baselines, sweep "a" did not; "c" did (listed first)."""
    rows = [("c1", "c", "baseline"), ("b1", "b", "free_transformer"),
            ("a1", "a", "free_transformer"), ("b2", "b", "baseline"),
            ("c2", "c", "free_transformer")]
    return pd.DataFrame(rows, columns=["run_id", "sweep", "model_kind"])


@pytest.fixture
def analysed(monkeypatch):
    """analyse_sweeps' collaborators, recording; ``seen["texts"]`` are the parents'
    search_space.yaml by sweep name (None: no parent run)."""
    seen: dict = {"calls": [], "texts": {}}

    def collect_histories(client, run_ids, keys):
        assert client == "client"  # the store's client is passed on, each time
        seen["calls"].append(("histories", run_ids, keys))
        return f"histories of {run_ids}"

    def find_parent(client, experiment, name):
        assert client == "client"
        seen["calls"].append(("parent", experiment, name))
        if seen["texts"].get(name) is None:
            return None
        return SimpleNamespace(info=SimpleNamespace(run_id=f"parent-{name}"))

    def run_artifact_text(client, run_id, path):
        assert client == "client"
        seen["calls"].append(("artifact", run_id, path))
        return seen["texts"][run_id.removeprefix("parent-")]

    def analyse_sweep(runs, spec, base, histories):
        assert isinstance(spec, SweepConfig)
        seen["calls"].append(("spec", list(runs["run_id"]), spec.name, base.training.max_steps,
                              histories))
        return _Result(f"spec {spec.name}")

    def analyse(runs, histories):
        seen["calls"].append(("defaults", list(runs["run_id"]), histories))
        return _Result("defaults")

    def write_analysis(result, folder):
        seen["calls"].append(("write", result.how, folder))
        return {"boundaries": folder / "boundaries.md", "phase": folder / "phase.png"}

    monkeypatch.setattr(reporting, "collect_histories", collect_histories)
    monkeypatch.setattr("freetf.tracking.find_parent", find_parent)
    monkeypatch.setattr("freetf.tracking.run_artifact_text", run_artifact_text)
    monkeypatch.setattr(analysis, "analyse_sweep", analyse_sweep)
    monkeypatch.setattr(analysis, "analyse", analyse)
    monkeypatch.setattr(analysis, "write_analysis", write_analysis)
    monkeypatch.setattr(analysis, "boundaries_table", lambda result: f"table ({result.how})")
    return seen


class _Result:
    def __init__(self, how: str) -> None:
        self.how = how

    def summary_lines(self) -> list[str]:
        return [f"summary ({self.how})"]


def test_each_sweep_with_baselines_is_analysed_with_its_spec_read_back(tmp_path, analysed):
    spec = load_sweep("search_kl_smoke", ["mlflow.sweep_name=b", "training.max_steps=7"])
    analysed["texts"] = {"b": spec.to_yaml(), "c": spec.to_yaml().replace("name: b", "name: c")}
    found = reporting.analyse_sweeps("client", "exp", _frame(), tmp_path)
    assert list(found) == ["b", "c"]  # by name; "a" trained no baselines
    assert found["b"] == ["table (spec b)", "summary (spec b)",
                          f"boundaries:    {tmp_path / 'b' / 'boundaries.md'}",
                          f"phase diagram: {tmp_path / 'b' / 'phase.png'}"]
    assert analysed["calls"][:5] == [
        ("histories", ["b1", "b2"], HISTORY_METRICS), ("parent", "exp", "b"),
        ("artifact", "parent-b", "search_space.yaml"),
        ("spec", ["b1", "b2"], "b", 7, "histories of ['b1', 'b2']"),
        ("write", "spec b", tmp_path / "b")]
    assert analysed["calls"][5:] == [
        ("histories", ["c1", "c2"], HISTORY_METRICS), ("parent", "exp", "c"),
        ("artifact", "parent-c", "search_space.yaml"),
        ("spec", ["c1", "c2"], "c", 7, "histories of ['c1', 'c2']"),
        ("write", "spec c", tmp_path / "c")]


@pytest.mark.parametrize("text", [None, "no parent run", "search: {method: nope}",
                                  "base_config: /nowhere/base.yaml"])
def test_a_sweep_whose_spec_is_gone_or_unusable_is_analysed_with_the_defaults(
        tmp_path, analysed, caplog, text):
    if text == "no parent run":
        analysed["texts"] = {}
    else:
        analysed["texts"] = {"b": text, "c": text}
    analysed["texts"]["c"] = None  # sweep c: no parent run
    caplog.set_level("INFO", logger="freetf.sweeps.reporting")
    found = reporting.analyse_sweeps("client", "exp", _frame(), tmp_path)
    assert found["b"] == ["table (defaults)", "summary (defaults)",
                          f"boundaries:    {tmp_path / 'b' / 'boundaries.md'}",
                          f"phase diagram: {tmp_path / 'b' / 'phase.png'}"]
    assert ("defaults", ["b1", "b2"], "histories of ['b1', 'b2']") in analysed["calls"]
    assert not [call for call in analysed["calls"] if call[0] == "spec"]
    assert "sweep b: its spec is not usable here" in caplog.text
    assert ("sweep c: its spec is not usable here (no search_space.yaml on the sweep's "
            "parent run); analysed with the defaults") in caplog.text
