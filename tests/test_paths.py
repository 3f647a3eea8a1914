"""A run's paths made absolute before launch, and the Ray Train run's name and folder."""

from __future__ import annotations

import pytest

from freetf import load_config
from freetf.training.paths import (
    OWN_FOLDER,
    absolute_paths,
    absolute_storage,
    run_directory,
    run_name,
)

pytestmark = pytest.mark.timeout(60)


def test_every_relative_path_and_the_tracking_uri_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(overrides=[
        "checkpoint.dir=ck", "scaling.storage_path=rr", "data.path=corpus.txt",
        "tracking.mlflow.enabled=true", "tracking.mlflow.tracking_uri=sqlite:///db/m.db",
        "tracking.tensorboard.enabled=true", "tracking.tensorboard.log_dir=tb"])
    out = absolute_paths(cfg)
    assert (out.checkpoint.dir, out.scaling.storage_path, out.data.path,
            out.tracking.mlflow.tracking_uri, out.tracking.tensorboard.log_dir) == (
        str(tmp_path / "ck"), str(tmp_path / "rr"), str(tmp_path / "corpus.txt"),
        f"sqlite:///{tmp_path / 'db' / 'm.db'}", str(tmp_path / "tb"))
    off = load_config(overrides=["tracking.mlflow.enabled=false", "data.path=",
                                 "tracking.tensorboard.enabled=false",
                                 "tracking.tensorboard.log_dir=tb"])
    kept = absolute_paths(off)
    assert (kept.tracking.mlflow.tracking_uri, kept.data.path,
            kept.tracking.tensorboard.log_dir) == (
        off.tracking.mlflow.tracking_uri, off.data.path, "tb")


def test_remote_storage_is_kept_and_local_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_storage("s3://bucket/runs") == "s3://bucket/runs"
    assert absolute_storage("runs") == str(tmp_path / "runs")


def test_the_ray_runs_name_and_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["scaling.storage_path=rr", "scaling.run_name=",
                                 "tracking.mlflow.run_name="])
    assert run_name(cfg) == "freetf"
    assert run_directory(cfg) == tmp_path / "rr" / "freetf"
    by_mlflow = cfg.replace({"tracking.mlflow.run_name": "theirs"})
    assert run_name(by_mlflow) == "theirs"
    both = by_mlflow.replace({"scaling.run_name": "mine"})
    assert run_name(both) == "mine"
    assert run_directory(both) == tmp_path / "rr" / "mine"
    assert repr(OWN_FOLDER) == "OWN_FOLDER"
