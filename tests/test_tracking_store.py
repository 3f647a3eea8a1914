"""Tests for freetf.tracking.store: its schema lock (processes that open one new sqlite store
at once, two sweeps or a sweep's trials on a new mlflow.db, all get a working store), URIs,
the server check, errors in one line, the client's preparation and experiments."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
import urllib.error
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from freetf import files
from freetf.config import load_config
from freetf.tracking import mlflow_client, store
from freetf.tracking.store import (
    TrackingError,
    check_store_shared_by,
    check_tracking_server,
    resolve_tracking_uri,
)

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
# Reads a store URI per line, opens it and answers "ok" or the error.  The imports come
# first, so that the processes open the store at the same moment.
OPENER = """
import sys
from freetf.tracking import mlflow_client, preload_store_modules
from freetf.tracking.store import root_cause

preload_store_modules()
print("ready", flush=True)
for line in sys.stdin:
    try:
        mlflow_client(line.strip()).search_experiments()
        print("ok", flush=True)
    except Exception as err:
        print(root_cause(err), flush=True)
"""
PROCESSES, ROUNDS = 3, 2  # without the lock, every round on 2 cores broke a process
# (`duplicate column name: step`, `table alembic_version already exists`)


def test_processes_creating_one_new_store_at_once_all_succeed(tmp_path):
    openers = [subprocess.Popen([sys.executable, "-c", OPENER], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
               for _ in range(PROCESSES)]
    try:
        assert [p.stdout.readline() for p in openers] == ["ready\n"] * PROCESSES
        answers = []
        for round_ in range(ROUNDS):
            uri = f"sqlite:///{tmp_path / str(round_) / 'mlflow.db'}\n"
            for p in openers:
                p.stdin.write(uri)
                p.stdin.flush()
            answers.append([p.stdout.readline().strip() for p in openers])
    finally:
        for p in openers:
            p.stdin.close()
            p.wait(timeout=60)
    assert answers == [["ok"] * PROCESSES] * ROUNDS
    for round_ in range(ROUNDS):
        assert (tmp_path / str(round_) / "mlflow.db.lock").is_file()


def test_a_store_opens_without_fcntl(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "fcntl", None)
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_experiments()
    assert not (tmp_path / "mlflow.db.lock").exists()


# ----------------------------------------------------------------------------- the rest of
# freetf.tracking.store against recorded calls: URIs, errors in one line, experiments


def test_resolve_tracking_uri_makes_local_stores_absolute_and_keeps_the_rest(tmp_path,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    here = tmp_path.resolve()
    for uri, resolved in [("sqlite:///runs/x.db", f"sqlite:///{here}/runs/x.db"),
                          ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
                          ("sqlite:///:memory:", "sqlite:///:memory:"),
                          ("sqlite:///", "sqlite:///"),
                          ("file:runs", (here / "runs").as_uri()),
                          ("file:///abs/runs", "file:///abs/runs"),
                          ("runs/m", (here / "runs" / "m").as_uri()),
                          ("http://h:5000", "http://h:5000")]:
        cfg = load_config(overrides={"tracking.mlflow.tracking_uri": uri})
        assert resolve_tracking_uri(cfg) == resolved, uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:env")
    assert resolve_tracking_uri(load_config()) == (here / "env").as_uri()


def test_a_local_store_is_refused_by_name_on_two_hosts():
    with pytest.raises(TrackingError) as info:
        check_store_shared_by("/data/runs", {"h2", "h1"})
    assert str(info.value).startswith(
        "tracking.mlflow.tracking_uri=/data/runs is a file on this machine, but the Ray "
        "cluster spans 2 hosts (h1, h2); start an MLflow server")
    check_store_shared_by("https://h1", {"h1", "h2"})
    check_store_shared_by("sqlite:///x.db", set())


def _answering(monkeypatch, error=None):
    asked = []

    class Answer:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def urlopen(url, timeout):
        asked.append((url, timeout))
        if error is not None:
            raise error
        return Answer()

    monkeypatch.setattr(store.urllib.request, "urlopen", urlopen)
    return asked


@pytest.mark.parametrize("code", [401, 403])
def test_a_server_that_asks_for_credentials_is_reachable(code, monkeypatch):
    asked = _answering(monkeypatch, urllib.error.HTTPError("u", code, "no", {}, None))
    check_tracking_server("https://h:5000/", timeout_s=3)
    assert asked == [("https://h:5000/health", 3)]


def test_a_server_that_answers_health_is_reachable(monkeypatch):
    asked = _answering(monkeypatch)
    check_tracking_server("http://h:5000")
    assert asked == [("http://h:5000/health", 10.0)]
    check_tracking_server("http://boX//")
    check_tracking_server("ftp://h/x")  # not a server freetf checks
    assert asked[1:] == [("http://boX/health", 10.0)]


@pytest.mark.parametrize("error, reason", [
    (urllib.error.HTTPError("u", 404, "no", {}, None),
     "GET http://h/health answered HTTP 404; is this an MLflow tracking server?"),
    (urllib.error.URLError("refused"), "GET http://h/health failed: refused"),
    (OSError("reset"), "GET http://h/health failed: reset"),
    (ValueError("bad url"), "GET http://h/health failed: bad url")])
def test_an_unreachable_server_is_named_with_the_reason(error, reason, monkeypatch):
    _answering(monkeypatch, error)
    with pytest.raises(TrackingError) as info:
        check_tracking_server("http://h")
    assert str(info.value) == (
        f"MLflow tracking server http://h is unreachable ({reason}). Start it (e.g. "
        f"`mlflow server --host 127.0.0.1 --port 5000`), point tracking.mlflow.tracking_uri "
        f"or MLFLOW_TRACKING_URI at a running server or a sqlite:/// file, or set "
        f"tracking.mlflow.enabled=false.")


def test_sqlite_file_and_artifacts_beside_it():
    assert store.sqlite_file("sqlite:///a/b.db") == Path("a/b.db")
    assert store.sqlite_file("sqlite:////a/b.db") == Path("/a/b.db")
    for uri in ("sqlite:///", "sqlite:///:memory:", "http://h", "file:///a/b.db"):
        assert store.sqlite_file(uri) is None
    assert store._artifact_location("sqlite:////a/b.db") == "file:///a/mlartifacts"
    assert store._artifact_location("sqlite:///a/b.db") is None
    assert store._artifact_location("file:///a") is None


def test_an_error_is_its_first_line_and_its_root_cause():
    assert store.first_line(ValueError("  one\ntwo  ")) == "one"
    assert store.first_line(ValueError("")) == "ValueError"
    assert store.first_line(ValueError("x" * 300)) == "x" * 300
    assert store.first_line(ValueError("x" * 301)) == "x" * 300 + "..."
    assert store.first_line(ValueError("x" * 11), limit=10) == "x" * 10 + "..."
    try:
        try:
            try:
                raise OSError(28, "disk full")
            except OSError as err:
                raise KeyError("wrapped") from err
        except KeyError:
            raise RuntimeError("outer\nSQL")  # noqa: B904 (its context is the chain)
    except RuntimeError as err:
        assert store.root_cause(err) == "OSError: [Errno 28] disk full"
    looped = ValueError("self")
    looped.__context__ = looped
    assert store.root_cause(looped) == "ValueError: self"
    assert store.root_cause(RuntimeError("alone")) == "RuntimeError: alone"


def test_mlflows_database_error_logs_are_dropped_once_filtered():
    keep = store._ReraisedDatabaseErrors()
    record = logging.LogRecord("m", logging.ERROR, "f", 1, "SQLAlchemy database error: x",
                               None, None)
    other = logging.LogRecord("m", logging.ERROR, "f", 1, "other SQLAlchemy database error",
                              None, None)
    assert keep.filter(record) is False and keep.filter(other) is True


def test_a_client_prepares_its_store(tmp_path, monkeypatch):
    db_logger = logging.getLogger("mlflow.store.db.utils")
    monkeypatch.setattr(db_logger, "filters", [])
    made = []
    monkeypatch.setattr(store.mlflow, "MlflowClient",
                        lambda tracking_uri: made.append(tracking_uri) or tracking_uri)
    for name in ("MLFLOW_ALLOW_FILE_STORE", *store.HTTP_CLIENT_DEFAULTS):
        monkeypatch.delenv(name, raising=False)
    db = tmp_path / "new" / "m.db"
    assert mlflow_client(f"sqlite:///{db}") == f"sqlite:///{db}"
    assert db.parent.is_dir() and (db.parent / "m.db.lock").is_file()
    mlflow_client(f"sqlite:///{db}")
    assert [type(f) for f in db_logger.filters] == [store._ReraisedDatabaseErrors]
    monkeypatch.chdir(tmp_path)
    mlflow_client("sqlite:///rel/m.db")  # a relative file: its folder is not made
    assert not (tmp_path / "rel").exists()
    mlflow_client("file:///x/runs")
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mlflow_client("https://h")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert made == [f"sqlite:///{db}", f"sqlite:///{db}", "sqlite:///rel/m.db",
                    "file:///x/runs", "https://h"]


def test_a_client_makes_every_missing_folder_and_sets_http_defaults_for_http_too(
        tmp_path, monkeypatch):
    monkeypatch.setattr(store.mlflow, "MlflowClient", lambda tracking_uri: tracking_uri)
    for name in store.HTTP_CLIENT_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    db = tmp_path / "a" / "b" / "m.db"  # two folders new
    assert mlflow_client(f"sqlite:///{db}") == f"sqlite:///{db}"
    assert db.parent.is_dir() and (db.parent / "m.db.lock").is_file()
    assert mlflow_client("http://h:5000") == "http://h:5000"
    assert {name: os.environ[name] for name in store.HTTP_CLIENT_DEFAULTS} == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def test_a_file_store_opt_in_already_set_is_kept(monkeypatch):
    monkeypatch.setattr(store.mlflow, "MlflowClient", lambda tracking_uri: tracking_uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "TRUE")
    mlflow_client("file:///x/runs")
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "TRUE"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "no")
    mlflow_client("file:///x/runs")
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"


def test_the_schema_lock_is_held_while_the_store_opens_and_released(tmp_path):
    db = tmp_path / "m.db"
    with store.schema_lock(db):
        assert files.lock_file(db.with_name("m.db.lock"), wait=False) is None
    fd = files.lock_file(db.with_name("m.db.lock"), wait=False)
    assert fd is not None
    os.close(fd)
    with store.schema_lock(tmp_path / "missing" / "m.db"):  # no folder: no lock, no error
        pass


class Experiments:
    """An MLflow client's experiment calls, recorded; ``found`` answers by name in turn."""

    def __init__(self, *found, create_error=None):
        self.found, self.create_error, self.calls = list(found), create_error, []

    def get_experiment_by_name(self, name):
        self.calls.append(("get", name))
        return self.found.pop(0) if self.found else None

    def create_experiment(self, name, artifact_location, tags):
        self.calls.append(("create", name, artifact_location, tags))
        if self.create_error:
            raise self.create_error
        return "new"

    def restore_experiment(self, experiment_id):
        self.calls.append(("restore", experiment_id))

    def set_experiment_tag(self, experiment_id, key, value):
        self.calls.append(("tag", experiment_id, key, value))


def _experiment(stage="active", tags=None):
    return types.SimpleNamespace(experiment_id="e1", lifecycle_stage=stage,
                                 tags={} if tags is None else tags)


def test_an_experiment_is_created_restored_or_marked_for_model_training():
    kind = {"mlflow.experimentKind": "custom_model_development"}
    client = Experiments()
    assert store._experiment_id(client, "x", "sqlite:////d/m.db") == "new"
    assert client.calls == [("get", "x"), ("create", "x", "file:///d/mlartifacts", kind)]
    client = Experiments(_experiment("deleted", {"mlflow.experimentKind": "genai"}))
    assert store._experiment_id(client, "x", "u") == "e1"
    assert client.calls == [("get", "x"), ("restore", "e1")]
    client = Experiments(_experiment())
    assert store._experiment_id(client, "x", "u") == "e1"
    assert client.calls == [("get", "x"), ("tag", "e1", *kind.popitem())]


def test_an_experiment_another_process_created_meanwhile_is_used():
    race = MlflowException("exists")
    client = Experiments(None, _experiment(tags={"mlflow.experimentKind": "k"}),
                         create_error=race)
    assert store._experiment_id(client, "x", "u") == "e1"
    assert [c[:2] for c in client.calls] == [("get", "x"), ("create", "x"), ("get", "x")]
    client = Experiments(create_error=race)
    with pytest.raises(MlflowException) as info:
        store._experiment_id(client, "x", "u")
    assert info.value is race and info.value.__suppress_context__


def test_quietly_swallows_and_end_active_run_ends_only_a_run(monkeypatch):
    called = []
    store._quietly(lambda *a: called.append(a) or 1 / 0, 1, 2)
    assert called == [(1, 2)]
    ended = []
    monkeypatch.setattr(store.mlflow, "end_run", lambda: ended.append(True))
    monkeypatch.setattr(store.mlflow, "active_run", lambda: None)
    store.end_active_run()
    assert ended == []
    run = types.SimpleNamespace(info=types.SimpleNamespace(run_id="r"))
    monkeypatch.setattr(store.mlflow, "active_run", lambda: run)
    store.end_active_run()
    assert ended == [True]


def test_a_runs_table_column_is_named_by_its_kind():
    assert [store.runs_column(kind, "x") for kind in ("attributes", "params", "metrics",
                                                      "tags")] == [
        "attributes.`x`", "params.`x`", "metrics.`x`", "tags.`x`"]
    with pytest.raises(ValueError) as info:
        store.runs_column("param", "seed")
    assert str(info.value) == ("a runs-table column is attributes, params, metrics or tags, "
                               "not 'param'")


def test_a_runs_page_has_a_filter_or_a_view_and_one_slash_after_the_host():
    with pytest.raises(ValueError) as info:
        store.runs_page_url("7", search_filter="x", view="v")
    assert str(info.value) == "a saved view carries its own filter: give search_filter or view"
    assert store.runs_page_url("7", "http://boX//", view="v") == (
        "http://boX/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=v")


def test_a_saved_view_is_stamped_in_milliseconds_and_its_state_is_compact_json(monkeypatch):
    """As the UI writes it (JavaScript's Date.now() and JSON.stringify)."""
    tags = []
    client = types.SimpleNamespace(set_experiment_tag=lambda *args: tags.append(args))
    monkeypatch.setattr(store.time, "time", lambda: 1234.5678)
    assert store.save_runs_view(client, "7", "v_1", "trials", ["params.`a`"], "x = 1",
                                "freetf.verdict") == "v_1"
    assert tags == [("7", "mlflow.sharedViewState.v_1", json.dumps({
        "name": "trials", "createdAt": 1234567, "updatedAt": 1234567,
        "state": '{"selectedColumns":["params.`a`"],"searchFilter":"x = 1",'
                 '"groupBy":"tag.average.freetf.verdict"}'}))]
    with pytest.raises(ValueError, match=r"^view id 'v 1': letters, digits, '-' and '_' only$"):
        store.save_runs_view(client, "7", "v 1", "trials", [])


def test_the_default_store_is_mlflow_db_here_and_absolute_paths_are_kept_as_given(
        tmp_path, monkeypatch):
    """No URI anywhere: ./mlflow.db made absolute.  An absolute sqlite or file store is
    left as written (its ``..`` not resolved), only relative ones are resolved."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(load_config()) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    for uri in ("sqlite:////abs/../x.db", "file:///abs/../runs"):
        cfg = load_config(overrides={"tracking.mlflow.tracking_uri": uri})
        assert resolve_tracking_uri(cfg) == uri


@pytest.mark.parametrize("uri", ["sqlite:///x.db", "file:///data/runs", "runs"])
def test_every_local_store_is_refused_on_two_hosts_and_allowed_on_one(uri):
    with pytest.raises(TrackingError, match="is a file on this machine"):
        check_store_shared_by(uri, {"h1", "h2"})
    check_store_shared_by(uri, {"h1"})


def test_a_runs_page_is_on_the_local_ui_by_default_and_carries_its_filter():
    assert store.runs_page_url("7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning")
    assert store.runs_page_url("7", search_filter="params.x = '1'") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
        "&searchFilter=params.x+%3D+%271%27")
