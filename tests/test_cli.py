"""CLI: train -> generate -> eval in-process, and one-paragraph errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import train_until_signal

from freetf.cli import main

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    code = main(["train", "--config", "freetf/configs/tiny.yaml", "--no-ray", "--max-steps", "6",
                 "--batch-size", "4", "--learning-rate", "1e-3",
                 "--set", f"checkpoint.dir={out / 'ckpt'}",
                 "--set", "tracking.mlflow.enabled=false"])
    assert code == 0
    return out / "ckpt"


def test_train_prints_summary(trained, capsys):
    assert (trained / "latest").is_file()


def test_generate_and_eval(trained, capsys):
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "K>",
                 "--num-samples", "2", "--z", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("K>") and len(line) == 66 for line in lines)
    assert main(["eval", "--checkpoint", str(trained), "--json"]) == 0
    assert '"eval/ce_prior_nats"' in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["train", "--config", "missing.yaml"], "config file not found"),
    (["train", "--config", "freetf/configs/tiny.yaml", "--set", "model.bogus=1"],
     "unknown config key model.bogus"),
    (["generate", "--checkpoint", "nowhere", "--prompt", "A>"], "checkpoint not found"),
])
def test_user_errors_exit_2_without_traceback(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_prompt_outside_vocabulary(trained, capsys):
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "k>"]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_bad_yaml_via_python_m(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden_dim: [\n")
    proc = subprocess.run([sys.executable, "-m", "freetf", "train", "--config", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


# Every flag's range is checked by argparse: exit status 2, "argument --flag: ..." and
# no traceback, before any checkpoint or data is loaded.
@pytest.mark.parametrize("argv,needle", [
    (["train", "--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    (["train", "--batch-size", "two"], "argument --batch-size: 'two' is not an integer"),
    (["train", "--learning-rate=-1e-3"], "argument --learning-rate: -0.001 must be > 0"),
    (["train", "--learning-rate", "nan"], "argument --learning-rate: 'nan' must be finite"),
    (["train", "--num-epochs", "0"], "argument --num-epochs: 0 must be >= 1"),
    (["train", "--max-steps", "-5"], "argument --max-steps: -5 must be >= 1"),
    (["train", "--num-workers", "-1"], "argument --num-workers: -1 must be >= 0"),
    (["train", "--resume", ""], "argument --resume: must not be empty"),
    (["generate", "--checkpoint", "c", "--prompt", "K>", "--num-samples", "0"],
     "argument --num-samples: 0 must be >= 1"),
    (["generate", "--checkpoint", "c", "--prompt", "K>", "--max-new-tokens", "-3"],
     "argument --max-new-tokens: -3 must be >= 1"),
    (["generate", "--checkpoint", "c", "--prompt", "K>", "--top-p", "2"],
     "argument --top-p: 2.0 must be in (0, 1]"),
    (["generate", "--checkpoint", "c", "--prompt", "K>", "--top-p", "0"],
     "argument --top-p: 0.0 must be in (0, 1]"),
    (["generate", "--checkpoint", "c", "--prompt", "K>", "--top-k", "0"],
     "argument --top-k: 0 must be >= 1"),
    (["generate", "--checkpoint", "c", "--prompt", "K>", "--temperature", "-1"],
     "argument --temperature: -1.0 must be >= 0"),
    (["generate", "--checkpoint", "c", "--prompt", "K>", "--z", "-1"],
     "argument --z: -1 must be >= 0"),
    (["generate", "--checkpoint", "c", "--prompt", "K>", "--seed", "x"],
     "argument --seed: 'x' is not an integer"),
    (["generate", "--checkpoint", "", "--prompt", "K>"], "argument --checkpoint: must not be"),
    (["eval", "--checkpoint", ""], "argument --checkpoint: must not be empty"),
    (["report", "--experiment", " "], "argument --experiment: must not be empty"),
    (["export", "--checkpoint", "", "--out", "x"], "argument --checkpoint: must not be"),
    (["export", "--checkpoint", "c", "--out", " "], "argument --out: must not be empty"),
    (["export", "--checkpoint", "c"], "the following arguments are required: --out"),
])
def test_flag_ranges_are_argparse_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("extra,needle", [
    (["--z", "16"], "argument --z: 16 is outside [0, 16): the model's latent has 4 bits"),
    (["--max-new-tokens", "65"], "argument --max-new-tokens: 65 + the prompt's 2 tokens "
                                 "exceed the model's context of 66; use at most 64"),
    (["--prompt", "K>" * 33], "argument --prompt: 66 tokens leave no room"),
])
def test_checkpoint_dependent_ranges(trained, extra, needle, capsys):
    argv = ["generate", "--checkpoint", str(trained), "--prompt", "K>", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_edge_values_are_accepted(trained, capsys):
    """The bounds themselves are valid: the last code, top-p 1, greedy, a full context."""
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "K>", "--z", "15",
                 "--top-p", "1", "--temperature", "0", "--num-samples", "1",
                 "--max-new-tokens", "64"]) == 0
    assert len(capsys.readouterr().out.strip()) == 66


def _printed_checkpoint(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("checkpoint: ")]
    assert len(lines) == 1, out
    return lines[0].removeprefix("checkpoint: ")


def test_generate_from_the_printed_checkpoint_in_process(tmp_path, capsys):
    assert main(["train", "--config", "freetf/configs/tiny.yaml", "--no-ray", "--max-steps", "2",
                 "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
                 "--set", "tracking.mlflow.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert "\nfinished 2 steps in " in out  # the step count, as under Ray (it said '?')
    printed = _printed_checkpoint(out)
    assert main(["generate", "--checkpoint", printed, "--prompt", "K>", "--num-samples",
                 "1"]) == 0
    assert capsys.readouterr().out.startswith("K>")


@pytest.mark.heavy
@pytest.mark.timeout(600)
@pytest.mark.parametrize("config", ["none", "empty"])
def test_defaults_form_a_working_run(config, tmp_path, monkeypatch, capsys):
    """No config (or an empty YAML): trains, evaluates, samples and saves a checkpoint
    that generate reads (model.vocab_size follows the data's 29 symbols)."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--no-ray", "--max-steps", "2"]
    if config == "empty":
        (tmp_path / "empty.yaml").write_text("")
        argv += ["--config", "empty.yaml"]
    assert main(argv) == 0
    printed = _printed_checkpoint(capsys.readouterr().out)
    assert printed == str(tmp_path / "checkpoints" / "step_000002")
    assert main(["generate", "--checkpoint", printed, "--prompt", "K>", "--num-samples",
                 "1", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.strip()) == 6


def _nan_from_call(monkeypatch, first_bad: int) -> None:
    """The loss turns NaN from the ``first_bad``-th loss computation on, for good."""
    import freetf.training.loop as loop
    from freetf.model.losses import compute_loss as real

    calls = {"n": 0}

    def diverging(*args, **kwargs):
        calls["n"] += 1
        total, parts = real(*args, **kwargs)
        return (total * float("nan") if calls["n"] >= first_bad else total), parts

    monkeypatch.setattr(loop, "compute_loss", diverging)


def test_nonfinite_stop_says_what_happened_and_where_the_checkpoint_is(tmp_path, monkeypatch,
                                                                        capsys):
    _nan_from_call(monkeypatch, first_bad=6)
    code = main(["train", "--config", "freetf/configs/tiny.yaml", "--no-ray", "--max-steps", "20",
                 "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
                 "--set", "checkpoint.every_steps=4",
                 "--set", "training.max_consecutive_nonfinite=3",
                 "--set", "tracking.mlflow.enabled=false"])
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "training stopped at step 8: 3 steps in a row had a non-finite loss" in err
    checkpoint = tmp_path / "ckpt" / "step_000004"
    assert f"The last checkpoint is {checkpoint}" in err and checkpoint.is_dir()
    assert "lower training.learning_rate (now 0.003)" in err
    assert "grad_clip" not in err  # already on in tiny.yaml: not advice


def test_nonfinite_stop_without_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    _nan_from_call(monkeypatch, first_bad=1)
    code = main(["train", "--config", "freetf/configs/tiny.yaml", "--no-ray", "--max-steps", "20",
                 "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
                 "--set", "training.max_consecutive_nonfinite=3",
                 "--set", "training.grad_clip=0", "--set", "tracking.mlflow.enabled=false"])
    assert code == 1
    err = capsys.readouterr().err
    assert "No checkpoint was saved before the stop" in err and "Traceback" not in err
    assert "training.grad_clip=1.0 (now off)" in err
    assert not (tmp_path / "ckpt").exists()


def test_ctrl_c_during_training_ends_quietly_and_marks_the_run_killed(tmp_path, monkeypatch,
                                                                       capsys):
    from freetf.tracking import mlflow_client
    from freetf.training import ray_train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_train, "train_loop", interrupted)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", "--config", "freetf/configs/tiny.yaml", "--no-ray",
                 "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
                 "--set", f"tracking.mlflow.tracking_uri={uri}"]) == 130
    err = capsys.readouterr().err
    assert "freetf train: interrupted" in err and "Traceback" not in err
    client = mlflow_client(uri)
    [run] = client.search_runs([client.get_experiment_by_name("freetf-tiny").experiment_id])
    assert run.info.status == "KILLED"


def test_a_full_disk_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                 capsys):
    """The disk fills at the second checkpoint: one line (what, where, why, the last good
    checkpoint), exit 2, the run FAILED in MLflow, and the last good checkpoint loads."""
    import errno

    from freetf.tracking import mlflow_client
    from freetf.training import checkpoint_files
    from freetf.training.checkpoint import load_checkpoint

    real_open, opened = open, []

    def open_on_a_filling_disk(path, mode="r", *args, **kwargs):
        if mode == "wb":
            opened.append(path)
            if len(opened) > 1:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_files, "open", open_on_a_filling_disk, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--config", "configs/tiny.yaml", "--no-ray", "--max-steps", "6",
                 "--set", f"checkpoint.dir={ckpt}", "--set", "checkpoint.every_steps=2",
                 "--set", f"tracking.mlflow.tracking_uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("freetf train:")]
    assert line == (f"freetf train: error: cannot write the checkpoint {ckpt / 'step_000004'}: "
                    f"No space left on device; the last good checkpoint is "
                    f"{ckpt / 'step_000002'} (continue from it with --resume "
                    f"{ckpt / 'step_000002'})")
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_000002"]
    assert load_checkpoint(ckpt)[0]["step"] == 2
    client = mlflow_client(uri)
    [run] = client.search_runs([client.get_experiment_by_name("freetf-tiny").experiment_id])
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_training_at_a_step_with_a_checkpoint(tmp_path, signame, code):
    """``freetf train --no-ray`` sent SIGTERM (what Slurm, Kubernetes and Ray's
    autoscaler send) or SIGINT mid-run: it finishes the step, saves a checkpoint, marks
    the MLflow run KILLED and exits 128 + the signal's number with one line."""
    import re
    import signal

    from freetf.tracking import mlflow_client
    from freetf.training.checkpoint import load_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code_seen, err = train_until_signal(
        ["train", "--verbose", "--config", "configs/tiny.yaml", "--no-ray",
         "--max-steps", "100000",
         "--set", "training.log_every=1", "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
         "--set", f"tracking.mlflow.tracking_uri={uri}"], "step 3/100000",
        getattr(signal, signame))
    assert code_seen == code, err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("freetf train:")]
    found = re.fullmatch(rf"freetf train: stopped by {signame} after step (\d+); checkpoint: "
                         r"(\S+) \(continue with --resume \2\)", line)
    assert found, line
    step, checkpoint = int(found[1]), Path(found[2])
    assert step >= 3 and checkpoint == tmp_path / "ckpt" / f"step_{step:06d}"
    assert load_checkpoint(checkpoint)[0]["step"] == step
    client = mlflow_client(uri)
    [run] = client.search_runs([client.get_experiment_by_name("freetf-tiny").experiment_id])
    assert run.info.status == "KILLED"


def test_generate_needs_no_data_folder_the_checkpoint_carries_the_tokenizer(tmp_path, capsys):
    """A model trained on prepared BPE data: the checkpoint holds tokenizer.json and the
    data's meta, so generate decodes with the BPE after the data folder is gone."""
    import shutil

    from conftest import prepared_code_corpus

    data = prepared_code_corpus(tmp_path)
    assert main(["train", "--config", "freetf/configs/code.yaml", "--no-ray", "--max-steps", "2",
                 "--set", f"data.path={data}", "--set", "model.hidden_dim=32",
                 "--set", "model.num_layers=1", "--set", "model.num_heads=2",
                 "--set", "model.latent_dim=2", "--set", "model.max_seq_len=16",
                 "--set", "data.max_seq_len=16", "--set", "training.batch_size=2",
                 "--set", "training.eval_every=2", "--set", "training.eval_batches=1",
                 "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
                 "--set", "tracking.mlflow.enabled=false"]) == 0
    printed = Path(_printed_checkpoint(capsys.readouterr().out))
    assert (printed / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    assert (printed / "data_meta.json").read_bytes() == (data / "meta.json").read_bytes()
    shutil.rmtree(data)
    prompt = "def f3(x):"
    assert main(["generate", "--checkpoint", str(printed), "--prompt", prompt,
                 "--num-samples", "1", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith(prompt)
    # a checkpoint from before tokenizer.json was copied (meta.json does not list it),
    # whose data folder is gone: neither the checkpoint's tokenizer nor the data's, refused
    (printed / "tokenizer.json").unlink()
    meta = json.loads((printed / "meta.json").read_text())
    del meta["files"]["tokenizer.json"]
    (printed / "meta.json").write_text(json.dumps(meta))
    assert main(["generate", "--checkpoint", str(printed), "--prompt", prompt]) == 2
    assert "holds no tokenizer.json" in capsys.readouterr().err
