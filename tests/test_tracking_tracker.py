"""Tests for freetf.tracking.tracker against recording sinks: the Tracker's fan-out,
make_tracker's sinks, params and tags, the git commit, and a restarted worker's replay."""

from __future__ import annotations

import os
import re
import subprocess
import time
import types
from pathlib import Path

import pytest

from freetf.config import flatten, load_config
from freetf.tracking import tracker as tracker_module
from freetf.tracking.params import config_tag, run_params
from freetf.tracking.sinks import _MlflowSink, _Sink
from freetf.tracking.tracker import (
    NullTracker,
    SkipLoggedSteps,
    Tracker,
    last_logged_step,
    make_tracker,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = "0123456789abcdef"


class Recording(_Sink):
    """Records each call; raises on the methods named in ``fail``."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    def _record(self, method: str, *args: object) -> None:
        if method in self.fail:
            raise RuntimeError(f"{method} is down")
        self.calls.append((method, *args))

    def log_params(self, params):
        self._record("log_params", params)

    def log_metrics(self, metrics, step):
        self._record("log_metrics", metrics, step)

    def set_tags(self, tags):
        self._record("set_tags", tags)

    def log_artifact(self, path, artifact_path):
        self._record("log_artifact", path, artifact_path)

    def log_text(self, text, filename):
        self._record("log_text", text, filename)

    def log_figure(self, fig, filename):
        self._record("log_figure", fig, filename)

    def flush(self):
        self._record("flush")

    def finish(self, status):
        self._record("finish", status)


class FakeClient:
    """An MLflow client that records calls; ``history`` answers get_metric_history."""

    def __init__(self, history: dict[tuple[str, str], list[int]] | None = None) -> None:
        self.calls: list[tuple] = []
        self.history = history or {}

    def get_metric_history(self, run_id: str, key: str) -> list:
        return [types.SimpleNamespace(step=s, value=float(s))
                for s in self.history.get((run_id, key), [])]

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_each_call_reaches_every_sink_in_strings_and_numbers():
    first, second = Recording(fail=("log_metrics", "set_tags")), Recording()
    tracker = Tracker([first, second])
    assert tracker.run_id is None and tracker.client is None
    figure = object()
    tracker.log_params({"model": {"dim": 8, "betas": (0.9, 0.95)}, "ids": [1, 2],
                        "note": None, "long": "p" * 6001, "edge": "q" * 6000})
    tracker.log_metrics({"a": 1, "b": "x", "c": None, "d": "2.5", "e": True}, step=3.0)
    tracker.log_metrics({"b": "x"}, step=4)  # nothing to log: no call
    tracker.set_tags({"t": "x" * 5001, "n": 5})
    tracker.log_artifact("out/b.txt", "extra")
    tracker.log_artifact(Path("c.txt"))
    tracker.log_text("some text", "notes.txt")
    tracker.log_figure(figure, "curves.png")
    tracker.flush()
    tracker.finish("KILLED")
    tracker.finish("FAILED")  # later calls are no-ops
    params = {"model.dim": "8", "model.betas": "(0.9, 0.95)", "ids": "[1, 2]", "note": "None",
              "long": "p" * 6000, "edge": "q" * 6000}
    assert second.calls == [
        ("log_params", params),
        ("log_metrics", {"a": 1.0, "d": 2.5, "e": 1.0}, 3),
        ("set_tags", {"t": "x" * 5000, "n": "5"}),
        ("log_artifact", Path("out/b.txt"), "extra"),
        ("log_artifact", Path("c.txt"), None),
        ("log_text", "some text", "notes.txt"),
        ("log_figure", figure, "curves.png"),
        ("flush",),
        ("finish", "KILLED"),
    ]
    assert type(second.calls[1][2]) is int
    assert first.calls == [c for c in second.calls if c[0] not in ("log_metrics", "set_tags")]


def test_finish_takes_the_three_run_statuses_only():
    sink = Recording()
    tracker = Tracker([sink])
    with pytest.raises(ValueError) as info:
        tracker.finish("DONE")
    assert str(info.value) == "status='DONE' must be one of FINISHED, FAILED, KILLED"
    assert sink.calls == []
    tracker.finish()
    assert sink.calls == [("finish", "FINISHED")]


@pytest.mark.parametrize("error, status", [(None, "FINISHED"), (ValueError, "FAILED"),
                                           (KeyboardInterrupt, "KILLED")])
def test_a_tracker_block_ends_the_run_by_how_the_block_ended(error, status):
    sink = Recording()
    tracker = Tracker([sink])
    raised = None
    try:
        with tracker as entered:
            assert entered is tracker
            if error:
                raise error
    except (ValueError, KeyboardInterrupt) as err:
        raised = type(err)
    assert raised is error  # the block's exception goes on
    assert sink.calls == [("finish", status)]


def test_the_run_id_and_client_are_the_first_mlflow_sinks():
    client = FakeClient()
    tracker = Tracker([Recording(), _MlflowSink(client, "r1"), _MlflowSink(FakeClient(), "r2")])
    assert tracker.run_id == "r1" and tracker.client is client
    null = NullTracker()
    assert null.run_id is None and null.client is None and null._sinks == []


@pytest.fixture
def sinks(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """make_tracker's backends replaced by recorders: the MLflow run's start arguments,
    the TensorBoard log folder and the W&B arguments, and the sinks made."""
    made: dict[str, list] = {"server": [], "mlflow": [], "tensorboard": [], "wandb": []}

    def start(cfg, uri, **kwargs):
        made["mlflow"].append((uri, kwargs))
        sink = _MlflowSink(FakeClient(), RUN_ID)
        made["sinks"] = [sink]
        return sink

    def tensorboard(log_dir):
        made["tensorboard"].append(log_dir)
        sink = Recording()
        made.setdefault("sinks", []).append(sink)
        return sink

    def wandb(cfg, run_name, run_id, params):
        made["wandb"].append((run_name, run_id, params))
        sink = Recording()
        made.setdefault("sinks", []).append(sink)
        return sink

    monkeypatch.setattr(_MlflowSink, "start", start)
    monkeypatch.setattr(tracker_module, "check_tracking_server", made["server"].append)
    monkeypatch.setattr(tracker_module, "_TensorBoardSink", tensorboard)
    monkeypatch.setattr(tracker_module, "_WandbSink", wandb)
    monkeypatch.setattr(tracker_module, "_git_commit", lambda: "c0ffee")
    return made


def _config(tmp_path: Path, **overrides: object):
    return load_config(overrides={"tracking.mlflow.tracking_uri": f"sqlite:///{tmp_path}/m.db",
                                  "tracking.tensorboard.enabled": True,
                                  "tracking.tensorboard.log_dir": str(tmp_path / "tb"),
                                  "tracking.wandb.enabled": True, **overrides})


def _strings(data: dict) -> dict[str, str]:
    return {k: repr(v) if isinstance(v, (list, tuple)) else str(v)
            for k, v in flatten(data).items()}


def test_make_tracker_starts_each_backend_with_the_runs_params_and_tags(tmp_path, sinks):
    cfg = _config(tmp_path)
    searched = ("model.num_kv_heads",)
    tracker = make_tracker(cfg, run_name="trial", parent_run_id="p1", searched=searched,
                           tags={"purpose": "x" * 5001, "n": 3})
    uri = f"sqlite:///{tmp_path}/m.db"
    tags = {"freetf.model_kind": "free_transformer", "freetf.latent_bits": "16",
            "freetf.config": config_tag(cfg, 5000), "git.commit": "c0ffee",
            "mlflow.source.git.commit": "c0ffee", "purpose": "x" * 5000, "n": "3"}
    params = run_params(cfg, searched)
    assert "num_kv_heads" in params  # a searched key that is not compared by default
    assert sinks["server"] == [uri]
    assert sinks["mlflow"] == [(uri, {"run_id": None, "parent_run_id": "p1",
                                      "run_name": "trial", "params": params, "tags": tags})]
    assert sinks["tensorboard"] == [(tmp_path / "tb").resolve() / "trial-01234567"]
    assert sinks["wandb"] == [("trial", RUN_ID, _strings(cfg.to_dict()))]
    mlflow_sink, board, wandb = sinks["sinks"]
    assert tracker._sinks == [mlflow_sink, board, wandb]
    assert tracker.run_id == RUN_ID and tracker.client is mlflow_sink.client
    assert mlflow_sink.client.calls == []  # its params and tags went with its start
    for sink in (board, wandb):
        assert sink.calls == [("log_params", params), ("set_tags", tags)]


def test_make_tracker_takes_the_run_name_from_the_config_and_params_as_given(tmp_path, sinks,
                                                                            monkeypatch):
    monkeypatch.setattr(tracker_module, "_git_commit", lambda: None)
    cfg = _config(tmp_path, **{"tracking.mlflow.run_name": "named", "model.latent_dim": 0})
    make_tracker(cfg, run_id="feedfacecafe", params={"a": {"b": [1, 2]}, "c": 0.5})
    params = {"a.b": "[1, 2]", "c": "0.5"}
    tags = {"freetf.model_kind": "baseline", "freetf.latent_bits": "0",
            "freetf.config": config_tag(cfg, 5000)}
    assert sinks["mlflow"] == [(sinks["server"][0], {
        "run_id": "feedfacecafe", "parent_run_id": None, "run_name": "named",
        "params": params, "tags": tags})]
    assert sinks["tensorboard"] == [(tmp_path / "tb").resolve() / "named-01234567"]
    assert sinks["wandb"][0][:2] == ("named", RUN_ID)
    assert sinks["sinks"][1].calls == [("log_params", params), ("set_tags", tags)]


def test_without_mlflow_the_folder_is_named_by_the_given_run_or_the_time(tmp_path, sinks):
    cfg = _config(tmp_path, **{"tracking.mlflow.enabled": False})
    tracker = make_tracker(cfg, run_id="abcdef1234567")
    assert sinks["server"] == [] and sinks["mlflow"] == []
    assert sinks["tensorboard"] == [(tmp_path / "tb").resolve() / "abcdef12"]
    assert sinks["wandb"][0][:2] == (None, "abcdef1234567")
    assert tracker.run_id is None and tracker._sinks == sinks["sinks"]
    make_tracker(cfg, run_name="solo")
    assert sinks["tensorboard"][-1].name == "solo" and sinks["wandb"][-1][:2] == ("solo", None)
    make_tracker(cfg)
    assert re.fullmatch(r"\d{8}-\d{6}", sinks["tensorboard"][-1].name)
    assert sinks["tensorboard"][-1].parent == (tmp_path / "tb").resolve()


def test_a_backend_that_cannot_start_ends_the_ones_already_started(tmp_path, sinks,
                                                                   monkeypatch):
    def broken(*args):
        raise RuntimeError("no wandb here")

    monkeypatch.setattr(tracker_module, "_WandbSink", broken)
    with pytest.raises(RuntimeError, match="no wandb here"):
        make_tracker(_config(tmp_path))
    mlflow_sink, board = sinks["sinks"]
    assert board.calls == [("finish", "FAILED")]
    assert [(name, args) for name, args, _ in mlflow_sink.client.calls] == [
        ("set_terminated", (RUN_ID, "FAILED"))]


def test_only_rank_zero_tracks(tmp_path, sinks):
    for rank in (1, 3):
        assert isinstance(make_tracker(_config(tmp_path), rank=rank), NullTracker)
    assert sinks["server"] == sinks["mlflow"] == sinks["tensorboard"] == sinks["wandb"] == []


def test_git_commit_is_head_of_the_checkout_holding_the_source(monkeypatch, tmp_path):
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    monkeypatch.chdir(tmp_path)  # the commit of the source, not of the current folder
    assert tracker_module._git_commit() == head and len(head) == 40


def test_git_commit_without_output_is_none(monkeypatch):
    monkeypatch.setattr(tracker_module.subprocess, "run",
                        lambda args, **kwargs: subprocess.CompletedProcess(args, 0, "\n", ""))
    assert tracker_module._git_commit() is None


def _fake_git(folder: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    git = folder / "git"
    git.write_text(f"#!/bin/sh\n{script}\n")
    git.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_git_that_fails_is_no_commit_even_when_it_prints_one(monkeypatch, tmp_path):
    """A repository without commits: ``git rev-parse HEAD`` prints HEAD and fails."""
    _fake_git(tmp_path, "echo HEAD; exit 128", monkeypatch)
    assert tracker_module._git_commit() is None


@pytest.mark.timeout(30)
def test_git_that_hangs_is_given_up_after_five_seconds(monkeypatch, tmp_path):
    _fake_git(tmp_path, "sleep 8; echo 0123", monkeypatch)
    start = time.monotonic()
    assert tracker_module._git_commit() is None
    assert time.monotonic() - start < 7


def test_a_restarted_worker_logs_only_steps_past_the_last_logged_one():
    sink = Recording()
    inner = Tracker([sink])
    tracker = SkipLoggedSteps(inner, through_step=5)
    for step in (4, 5, 6, 7):
        tracker.log_metrics({"train/loss": float(step)}, step)
    tracker.set_tags({"t": "v"})  # everything else goes to the tracker
    assert tracker.run_id is None and tracker.through_step == 5
    assert sink.calls == [("log_metrics", {"train/loss": 6.0}, 6),
                          ("log_metrics", {"train/loss": 7.0}, 7), ("set_tags", {"t": "v"})]


def test_last_logged_step_is_the_highest_step_of_train_steps_done():
    history = {("r1", "train/steps_done"): [3, 10, 7], ("r1", "train/loss"): [12],
               ("r2", "train/steps_done"): [20]}
    assert last_logged_step(Tracker([_MlflowSink(FakeClient(history), "r1")])) == 10
    assert last_logged_step(Tracker([_MlflowSink(FakeClient(history), "r3")])) == 0
    assert last_logged_step(Tracker([Recording()])) == 0
