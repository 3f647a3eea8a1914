"""A run's folder: each config its own, continued only by the same model, refused with
one line (before Ray or any worker starts) when another model's checkpoints are there."""

from __future__ import annotations

from pathlib import Path

import pytest

from freetf import load_config, tracking
from freetf.cli import main
from freetf.training import ray_train
from freetf.training.checkpoint import CheckpointError, save_to_root, write_checkpoint

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent

NO_MLFLOW = ["--set", "tracking.mlflow.enabled=false"]
SMALL = ["--set", "data.num_samples=64", "--set", "data.val_samples=16",
         "--set", "diagnostics.free_generations=8"]


@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if the run starts Ray, a worker, the loop or an MLflow run."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run started before the run-folder check")

    for name in ("init_ray", "train_loop", "build_trainer"):
        monkeypatch.setattr(ray_train, name, refuse)
    monkeypatch.setattr(tracking, "make_tracker", refuse)


class Launched(Exception):
    """Raised by a stand-in for run_training: the config it was handed."""


@pytest.fixture
def launched(monkeypatch):
    def capture(cfg, *args, **kwargs):
        raise Launched(cfg)

    monkeypatch.setattr(ray_train, "run_training", capture)


def _launched_config(argv):
    with pytest.raises(Launched) as info:
        main(argv)
    return info.value.args[0]


def test_the_readme_configs_get_their_own_run_folders(tmp_path, monkeypatch, launched):
    """`freetf train --config configs/tiny.yaml` then `... synthetic.yaml` in one folder:
    two runs, two folders (both were ray_results/freetf, and the second resumed the first)."""
    from freetf.training.paths import run_directory

    root = ROOT
    monkeypatch.chdir(tmp_path)
    folders = {name: run_directory(_launched_config(
        ["train", "--config", f"{root}/configs/{name}.yaml"])) for name in ("tiny", "synthetic")}
    assert folders == {name: tmp_path / "ray_results" / name for name in ("tiny", "synthetic")}
    assert run_directory(_launched_config(["train"])) == tmp_path / "ray_results" / "freetf"
    named = _launched_config(["train", "--config", f"{root}/configs/tiny.yaml",
                              "--set", "scaling.run_name=mine"])
    assert run_directory(named) == tmp_path / "ray_results" / "mine"
    by_mlflow = _launched_config(["train", "--config", f"{root}/configs/tiny.yaml",
                                  "--set", "tracking.mlflow.run_name=theirs"])
    assert run_directory(by_mlflow) == tmp_path / "ray_results" / "theirs"


def _tiny(tmp_path, *extra):
    return load_config("configs/tiny.yaml", [f"checkpoint.dir={tmp_path / 'ckpt'}", *extra])


def _ray_checkpoint(folder, cfg, step):
    """What Ray Train persists: storage_path/<run>/step_NNNNNN, no `latest` pointer."""
    write_checkpoint(folder / f"step_{step:06d}", {"step": step}, cfg, {"step": step})


def test_another_models_run_folder_is_refused_before_ray_starts(tmp_path, no_run, capsys):
    folder = tmp_path / "rr" / "tiny"
    _ray_checkpoint(folder, _tiny(tmp_path), 20)
    code = main(["train", "--config", "configs/synthetic.yaml",
                 "--set", f"scaling.storage_path={tmp_path / 'rr'}",
                 "--set", "scaling.run_name=tiny", *NO_MLFLOW])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{folder} holds checkpoints of another model" in err
    assert "model.hidden_dim 32, here 128" in err
    assert "--fresh" in err and "--set scaling.run_name=NAME" in err


def test_another_models_checkpoint_dir_is_refused_in_process(tmp_path, no_run, capsys):
    save_to_root(tmp_path / "ckpt", 20, {"step": 20}, _tiny(tmp_path), {"step": 20})
    code = main(["train", "--config", "configs/tiny.yaml", "--no-ray",
                 "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
                 "--set", "model.latent_dim=8", *NO_MLFLOW])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{tmp_path / 'ckpt'} holds checkpoints of another model (model.latent_dim 4, " \
           "here 8)" in err
    assert "--set checkpoint.dir=DIR" in err and len(err.strip().splitlines()) == 1


def test_resume_from_another_models_checkpoint_is_refused(tmp_path, no_run, capsys):
    other = save_to_root(tmp_path / "other", 5, {"step": 5}, _tiny(tmp_path, "model.num_layers=4"),
                         {"step": 5})
    code = main(["train", "--config", "configs/tiny.yaml", "--no-ray", "--resume", str(other),
                 "--set", f"checkpoint.dir={tmp_path / 'ckpt'}", *NO_MLFLOW])
    err = capsys.readouterr().err
    assert code == 2 and f"--resume: {other} holds a checkpoint of another model " \
        "(model.num_layers 4, here 2)" in err, err


def test_a_run_continues_in_its_folder_and_a_finished_one_says_so(tmp_path, capsys):
    argv = ["train", "--config", "configs/tiny.yaml", "--no-ray", *SMALL, *NO_MLFLOW,
            "--set", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    assert main([*argv, "--max-steps", "2"]) == 0
    capsys.readouterr()
    first = (tmp_path / "ckpt" / "step_000002").stat().st_ino
    assert main([*argv, "--max-steps", "4"]) == 0
    out = capsys.readouterr().out
    assert f"continuing from {tmp_path / 'ckpt' / 'step_000002'} (step 2)" in out
    assert f"checkpoint: {tmp_path / 'ckpt' / 'step_000004'}" in out
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == \
        ["step_000002", "step_000004"]
    assert (tmp_path / "ckpt" / "step_000002").stat().st_ino == first  # not trained again
    assert main([*argv, "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ckpt'} holds a finished run (step 4 of training.max_steps=4)" in err
    assert "--fresh" in err and len(err.strip().splitlines()) == 1


def test_resume_without_a_path_continues_the_runs_folder_as_a_sweeps_does(tmp_path, capsys):
    """``--resume`` alone (the sweep's switch): nothing to continue is one line; then it
    continues the folder's latest checkpoint; with --fresh it is refused."""
    argv = ["train", "--config", "configs/tiny.yaml", "--no-ray", *SMALL, *NO_MLFLOW,
            "--set", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    assert main([*argv, "--resume", "--max-steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"freetf train: error: --resume: nothing to continue in {tmp_path / 'ckpt'} "
                   "(no complete checkpoint there): leave out --resume to start the run, or "
                   "name the checkpoint to start from: --resume PATH")
    assert not (tmp_path / "ckpt").exists()
    assert main([*argv, "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert main([*argv, "--max-steps", "4", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"continuing from {tmp_path / 'ckpt' / 'step_000002'} (step 2)" in out
    assert main([*argv, "--max-steps", "6", "--resume", "--fresh"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_fresh_starts_in_a_new_folder_and_keeps_the_old_one(tmp_path, capsys):
    old = save_to_root(tmp_path / "ckpt", 20, {"step": 20}, _tiny(tmp_path, "model.latent_dim=8"),
                       {"step": 20})
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert main(["train", "--config", "configs/tiny.yaml", "--no-ray", "--fresh",
                 "--max-steps", "1", *SMALL, *NO_MLFLOW,
                 "--set", f"checkpoint.dir={tmp_path / 'ckpt'}"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {tmp_path / 'ckpt-2' / 'step_000001'}" in out
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    assert old.is_dir()


def test_resume_into_a_folder_with_checkpoints_of_its_own_is_refused(tmp_path, capsys):
    """Ray Train would continue from the folder's own latest checkpoint and ignore
    --resume (in-process the two runs' steps would mix): refused, --fresh the way out."""
    argv = ["train", "--config", "configs/tiny.yaml", "--no-ray", *SMALL, *NO_MLFLOW]
    assert main([*argv, "--max-steps", "2", "--set", f"checkpoint.dir={tmp_path / 'other'}"]) == 0
    save_to_root(tmp_path / "ckpt", 4, {"step": 4}, _tiny(tmp_path, *SMALL[1::2]), {"step": 4})
    capsys.readouterr()
    resume = ["--resume", str(tmp_path / "other"), "--max-steps", "3",
              "--set", f"checkpoint.dir={tmp_path / 'ckpt'}"]
    assert main([*argv, *resume]) == 2
    err = capsys.readouterr().err
    assert f"--resume: the run's folder {tmp_path / 'ckpt'} holds its own checkpoints " \
           "(latest: step 4)" in err and "--fresh" in err, err
    assert main([*argv, *resume, "--fresh"]) == 0
    out = capsys.readouterr().out
    assert f"continuing from {tmp_path / 'other' / 'step_000002'} (step 2)" in out
    assert f"checkpoint: {tmp_path / 'ckpt-2' / 'step_000003'}" in out


def test_what_counts_as_another_model(tmp_path):
    from freetf.training.run_folder import model_differences

    cfg = _tiny(tmp_path)
    same = ["model.mapper_impl=dense", "model.mapper_chunk_size=8", "model.init_std=0.1",
            "data.num_workers=2", "training.learning_rate=1e-4", "training.max_steps=99",
            "checkpoint.dir=elsewhere"]
    assert model_differences(cfg, cfg.replace(same)) == []
    other = cfg.replace(["model.hidden_dim=64", "data.num_samples=9", "model.dropout=0.1"])
    assert model_differences(cfg, other) == [
        "model.hidden_dim 32, here 64", "model.dropout 0.0, here 0.1", "data.num_samples 512, "
        "here 9"]


def test_a_different_tokenizer_is_another_vocabulary(tmp_path):
    from conftest import prepared_code_corpus

    from freetf.training.run_folder import model_differences

    data = prepared_code_corpus(tmp_path)
    cfg = _tiny(tmp_path, "data.dataset_name=tokens", f"data.path={data}",
                "model.vocab_size=300")
    checkpoint = save_to_root(tmp_path / "ckpt", 1, {"step": 1}, cfg, {"step": 1})
    assert model_differences(cfg, cfg, checkpoint) == []
    (data / "tokenizer.json").write_text((data / "tokenizer.json").read_text() + "\n")
    assert model_differences(cfg, cfg, checkpoint) == [
        f"the tokenizer (data.path {data} holds another tokenizer.json)"]


def test_the_mlflow_run_is_named_after_the_runs_folder(tmp_path, capsys):
    """The folder's name (``ckpt`` here, ``tiny`` by default), then ``ckpt-2`` with --fresh
    (it was a random MLflow name); a name given in ``tracking.mlflow.run_name`` wins."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["train", "--config", "configs/tiny.yaml", "--no-ray", "--max-steps", "1", *SMALL,
            "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
            "--set", f"tracking.mlflow.tracking_uri={uri}"]
    assert main(argv) == 0
    assert main([*argv, "--fresh"]) == 0
    assert main([*argv, "--fresh", "--set", "tracking.mlflow.run_name=mine"]) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              order_by=["attributes.start_time ASC"])
    assert [r.info.run_name for r in runs] == ["ckpt", "ckpt-2", "mine"]


def test_a_checkpoints_step_is_its_meta_jsons_else_its_names(tmp_path):
    from freetf.training.run_folder import checkpoint_step

    folder = tmp_path / "step_000007"
    folder.mkdir()
    assert checkpoint_step(folder) == 7  # no meta.json
    (folder / "meta.json").write_text('{"step": 12}')
    assert checkpoint_step(folder) == 12
    (folder / "meta.json").write_text('{"loss": 1.5}')
    assert checkpoint_step(folder) == 7
    for name in ("my_run_step_5", "step_x"):
        (tmp_path / name).mkdir()
    assert checkpoint_step(tmp_path / "my_run_step_5") == 5
    assert checkpoint_step(tmp_path / "step_x") == 0


def test_the_differences_listed_are_the_first_three_and_how_many_more():
    from freetf.training.run_folder import _listed

    assert _listed(["a", "b", "c"]) == "a; b; c"
    assert _listed(["a", "b", "c", "d"]) == "a; b; c; 1 more"
    assert _listed(["a", "b", "c", "d", "e"]) == "a; b; c; 2 more"


def test_plan_run_by_its_messages_and_fields(tmp_path):
    from freetf.training.paths import OWN_FOLDER
    from freetf.training.run_folder import RunFolderError, plan_run

    cfg = _tiny(tmp_path, "training.max_steps=10", "scaling.use_ray=false", *NO_MLFLOW[1::2])
    with pytest.raises(RunFolderError) as info:
        plan_run(cfg, OWN_FOLDER, fresh=True)
    assert str(info.value) == ("--resume continues the run in its folder and --fresh starts "
                               "one in a new folder: give one of them")
    with pytest.raises(CheckpointError) as info:
        plan_run(cfg, str(tmp_path / "nope"))
    assert str(info.value) == f"--resume: checkpoint not found: {tmp_path / 'nope'}"
    new = plan_run(cfg)
    assert (new.folder, new.resume, new.start_step, new.fresh) == (
        tmp_path / "ckpt", None, 0, False)
    save_to_root(tmp_path / "ckpt", 4, {"step": 4}, cfg, {"step": 4})
    plan = plan_run(cfg)  # not fresh by default: the folder's own run goes on
    assert (plan.folder, plan.resume, plan.start_step, plan.fresh) == (
        tmp_path / "ckpt", str(tmp_path / "ckpt" / "step_000004"), 4, False)
    moved = plan_run(cfg, fresh=True)
    assert (moved.folder, moved.resume, moved.fresh) == (tmp_path / "ckpt-2", None, True)
    other = tmp_path / "other"
    save_to_root(other, 10, {"step": 10}, cfg, {"step": 10})
    fresh_cfg = cfg.replace({"checkpoint.dir": str(tmp_path / "empty")})
    with pytest.raises(RunFolderError) as info:
        plan_run(fresh_cfg, str(other))
    assert str(info.value).startswith(f"--resume {other / 'step_000010'} holds a finished run "
                                      f"(step 10 of training.max_steps=10)")
    (tmp_path / "ckpt" / "step_000004" / "config.yaml").write_text("model:\n  nope: 1\n")
    with pytest.raises(RunFolderError) as info:
        plan_run(cfg)
    path = tmp_path / "ckpt" / "step_000004" / "config.yaml"
    assert str(info.value).startswith(f"{path}: ") and "model.nope" in str(info.value)


def test_under_ray_a_fresh_run_and_the_other_model_hint_name_the_run(tmp_path):
    from freetf.training.run_folder import RunFolderError, plan_run

    cfg = load_config("configs/tiny.yaml", [f"scaling.storage_path={tmp_path / 'rr'}",
                                            "scaling.run_name=tiny", *NO_MLFLOW[1::2]])
    _ray_checkpoint(tmp_path / "rr" / "tiny", cfg, 2)
    assert plan_run(cfg, fresh=True).cfg.scaling.run_name == "tiny-2"
    with pytest.raises(RunFolderError) as info:
        plan_run(cfg.replace({"model.hidden_dim": 2 * cfg.model.hidden_dim}))
    assert str(info.value).endswith("with --set scaling.run_name=NAME")
    with pytest.raises(RunFolderError) as info:
        plan_run(cfg.replace({"model.hidden_dim": 2 * cfg.model.hidden_dim,
                              "scaling.use_ray": False,
                              "checkpoint.dir": str(tmp_path / "rr" / "tiny")}))
    assert str(info.value).endswith("with --set checkpoint.dir=DIR")


def _token_meta(tokenizer: str) -> str:
    split = '{"file": "%s.bin", "tokens": 8, "bytes": 8, "documents": 1}'
    return ('{"format": "freetf-tokens/1", "dtype": "uint16", "vocab_size": 256, '
            f'"tokenizer": {tokenizer}, "splits": {{"train": {split % "train"}, '
            f'"val": {split % "val"}}}}}')


def test_a_changed_tokenizer_is_another_model_and_none_kept_cannot_tell(tmp_path,
                                                                        monkeypatch):
    from freetf.training import run_folder
    from freetf.training.run_folder import RunFolderError, _tokenizer_changed, plan_run

    # the data's own checks are not under test here: the folder holds no token files
    monkeypatch.setattr(run_folder, "check_before_training", lambda cfg: None)
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(_token_meta('{"kind": "bpe", "file": "tok.json"}'))
    (data / "tok.json").write_text("first")
    cfg = load_config("configs/tiny.yaml", [
        "data.dataset_name=tokens", f"data.path={data}", "model.vocab_size=256",
        "scaling.use_ray=false", f"checkpoint.dir={tmp_path / 'ckpt'}",
        "training.max_steps=10", *NO_MLFLOW[1::2]])
    ckpt = save_to_root(tmp_path / "ckpt", 2, {"step": 2}, cfg, {"step": 2})
    assert (ckpt / "tokenizer.json").read_text() == "first"
    assert not _tokenizer_changed(cfg, ckpt)
    (data / "tok.json").write_text("second")
    assert _tokenizer_changed(cfg, ckpt)
    changed = (f"the tokenizer (data.path {data} holds another tokenizer.json)")
    with pytest.raises(RunFolderError) as info:
        plan_run(cfg)
    assert f"holds checkpoints of another model ({changed})" in str(info.value)
    with pytest.raises(RunFolderError) as info:
        plan_run(cfg.replace({"checkpoint.dir": str(tmp_path / "new")}), str(ckpt))
    assert f"holds a checkpoint of another model ({changed})" in str(info.value)
    for tokenizer in ('{"kind": "bytes", "file": null}', '{"kind": "bpe", "file": "gone.json"}'):
        (data / "meta.json").write_text(_token_meta(tokenizer))
        assert _tokenizer_changed(cfg, ckpt), tokenizer
    synthetic = load_config("configs/tiny.yaml")
    assert _tokenizer_changed(synthetic, ckpt)  # no prepared folder: not the kept one
    (ckpt / "tokenizer.json").unlink()
    assert not _tokenizer_changed(cfg, ckpt)
