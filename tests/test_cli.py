"""CLI: train -> generate -> eval in-process, and one-paragraph errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from freetf.cli import main

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    code = main(["train", "--config", "configs/tiny.yaml", "--no-ray", "--max-steps", "6",
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
    (["train", "--config", "configs/tiny.yaml", "--set", "model.bogus=1"],
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
