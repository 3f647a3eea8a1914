"""Checks before the first step: every output location, one clear line each."""

from __future__ import annotations

import pytest

from freetf import load_config
from freetf.cli import main
from freetf.config import ConfigError
from freetf.files import unwritable
from freetf.training import ray_train
from freetf.training.preflight import check_before_training, output_problems

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def blocker(tmp_path):
    """A regular file where a folder would have to be."""
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the run gets as far as training or starting Ray."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the output check")

    monkeypatch.setattr(ray_train, "train_loop", refuse)
    monkeypatch.setattr(ray_train, "init_ray", refuse)


def tiny(tmp_path, *extra):
    return load_config("freetf/configs/tiny.yaml", [
        f"checkpoint.dir={tmp_path / 'ckpt'}", f"scaling.storage_path={tmp_path / 'rr'}",
        f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra])


@pytest.mark.parametrize("key,value,use_ray", [
    ("checkpoint.dir", "{blocker}/ckpt", False),
    ("scaling.storage_path", "{blocker}/ray_results", True),
    ("tracking.mlflow.tracking_uri", "sqlite:///{blocker}/mlflow.db", False),
    ("tracking.mlflow.tracking_uri", "file://{blocker}/mlruns", False),
    ("tracking.tensorboard.log_dir", "{blocker}/runs", False),
])
def test_each_unwritable_output_fails_before_training(key, value, use_ray, tmp_path, blocker,
                                                       no_training, capsys):
    argv = ["train", "--config", "freetf/configs/tiny.yaml",
            "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
            "--set", f"scaling.storage_path={tmp_path / 'rr'}",
            "--set", f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "--set", f"{key}={value.format(blocker=blocker)}"]
    if key.startswith("tracking.tensorboard"):
        argv += ["--set", "tracking.tensorboard.enabled=true"]
    if not use_ray:
        argv.append("--no-ray")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{blocker} is a file, not a folder" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one line
    assert not (tmp_path / "mlflow.db").exists()  # not even the MLflow run was started


def test_all_problems_are_listed_at_once(tmp_path, blocker):
    cfg = tiny(tmp_path, "scaling.use_ray=false", f"checkpoint.dir={blocker}",
               "tracking.tensorboard.enabled=true", f"tracking.tensorboard.log_dir={blocker}/tb")
    problems = output_problems(cfg)
    assert [p.split("=")[0] for p in problems] == ["checkpoint.dir", "tracking.tensorboard.log_dir"]
    with pytest.raises(ConfigError, match="cannot write where it would"):
        check_before_training(cfg)


def test_writable_places_pass_and_nothing_is_created(tmp_path):
    cfg = tiny(tmp_path / "new" / "deeper")
    check_before_training(cfg)
    check_before_training(cfg.replace(["scaling.use_ray=false"]))
    assert not (tmp_path / "new").exists()


def test_unwritable_reasons(tmp_path, blocker):
    assert unwritable(blocker) == f"{blocker} is a file, not a folder"
    assert unwritable(tmp_path, is_file=True) == f"{tmp_path} is a folder, not a file"
    assert unwritable(blocker, is_file=True) is None
    assert unwritable(tmp_path / "x" / "y") is None
    assert "cannot be created" in unwritable(blocker / "x" / "y")


def test_remote_storage_and_servers_are_not_local_paths(tmp_path):
    cfg = tiny(tmp_path, "scaling.storage_path=s3://bucket/ray_results",
               "tracking.mlflow.tracking_uri=http://127.0.0.1:5000")
    assert output_problems(cfg) == []


def test_vocabulary_is_checked_before_training(tmp_path, no_training, capsys):
    assert main(["train", "--config", "freetf/configs/tiny.yaml", "--no-ray",
                 "--set", "model.vocab_size=256",
                 "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
                 "--set", "tracking.mlflow.enabled=false"]) == 2
    assert "model.vocab_size=256 does not match" in capsys.readouterr().err


def test_each_place_is_checked_as_a_folder_or_a_file(tmp_path, blocker):
    """Ray's storage, the checkpoint and TensorBoard folders and a file store are
    folders; a sqlite store is a file: each line names the key and the reason."""
    store = "(tracking.mlflow.tracking_uri or MLFLOW_TRACKING_URI)"
    cases = [
        (["scaling.use_ray=true", f"scaling.storage_path={blocker}"],
         f"scaling.storage_path={blocker}: {blocker} is a file, not a folder"),
        (["scaling.use_ray=false", f"checkpoint.dir={blocker}"],
         f"checkpoint.dir={blocker}: {blocker} is a file, not a folder"),
        (["tracking.tensorboard.enabled=true", f"tracking.tensorboard.log_dir={blocker}"],
         f"tracking.tensorboard.log_dir={blocker}: {blocker} is a file, not a folder"),
        ([f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path}"],
         f"the MLflow store sqlite:///{tmp_path} {store}: {tmp_path} is a folder, not a file"),
        ([f"tracking.mlflow.tracking_uri=file://{blocker}"],
         f"the MLflow store file://{blocker} {store}: {blocker} is a file, not a folder"),
    ]
    for overrides, problem in cases:
        assert output_problems(tiny(tmp_path / "ok", *overrides)) == [problem]
    # the right kind of place passes
    assert output_problems(tiny(tmp_path / "ok", f"tracking.mlflow.tracking_uri=sqlite:///{blocker}",
                                "tracking.tensorboard.enabled=true",
                                f"tracking.tensorboard.log_dir={tmp_path}")) == []


def test_two_problems_are_one_message_a_line_each(tmp_path, blocker):
    cfg = tiny(tmp_path, "scaling.use_ray=false", f"checkpoint.dir={blocker}",
               "tracking.tensorboard.enabled=true", f"tracking.tensorboard.log_dir={blocker}")
    with pytest.raises(ConfigError) as raised:
        check_before_training(cfg)
    assert str(raised.value) == (
        "the run cannot write where it would:\n"
        f"  checkpoint.dir={blocker}: {blocker} is a file, not a folder\n"
        f"  tracking.tensorboard.log_dir={blocker}: {blocker} is a file, not a folder")


def test_what_is_no_local_path_is_not_checked_as_one(tmp_path, monkeypatch):
    """Remote storage, an in-memory sqlite store and one without a path are no places
    on this disk: not even where a relative path of their text would be a wrong kind of
    place (run from a folder holding a file ``s3:`` and folders ``:memory:``, ``.``)."""
    configs = [tiny(tmp_path / "ok", *overrides) for overrides in (
        ["scaling.use_ray=true", "scaling.storage_path=s3://bucket/results"],
        ["tracking.mlflow.tracking_uri='sqlite:///:memory:'"],
        ["tracking.mlflow.tracking_uri=sqlite:///"])]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s3:").write_text("a file")
    (tmp_path / ":memory:").mkdir()
    for cfg in configs:
        assert output_problems(cfg) == [], cfg.scaling.storage_path
