"""freetf/cli.py in-process: each command's options, defaults and help, what it hands to
the code behind it, what it prints, its exit codes and its one-line errors.  The code
behind the commands (training, Ray, the sweep, prepare, export, the report) is replaced
by stand-ins that record what they get; tests/test_cli.py runs the real commands."""

from __future__ import annotations

import pytest

import freetf.cli as cli
from freetf.cli import main

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def logging_levels(monkeypatch):
    """The help at 100 columns; setup_logging recorded instead of set (the levels asked)."""
    monkeypatch.setenv("COLUMNS", "100")
    levels = []
    monkeypatch.setattr(cli, "setup_logging", levels.append)
    return levels


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _argparse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


MAIN_HELP = """\
usage: freetf [-h] [-v]
              {train,generate,eval,export,sweep,reproduce,compare,report,plan,prepare,wait-ray}
              ...

``freetf`` command line: train, generate, eval, export, sweep, reproduce, compare, report,
prepare, plan, wait-ray.

positional arguments:
  {train,generate,eval,export,sweep,reproduce,compare,report,plan,prepare,wait-ray}
    train               train a model (through Ray Train by default)
    generate            sample text from a checkpoint
    eval                latent diagnostics and perplexity of a checkpoint
    export              a checkpoint as safetensors + JSON (FreeTransformer.from_pretrained; no
                        pickle)
    sweep               Ray Tune sweep over KL weight, free bits and schedules (default: the
                        boundary search)
    reproduce           the paper's synthetic experiment (Figure 4) as a measured table
    compare             the baseline against the Free Transformer across kappa, on Python's
                        standard library
    report              collapse map of a sweep, from MLflow alone
    plan                memory per GPU under DDP and FSDP, from a config
    prepare             tokenize a corpus into training shards (+ meta.json)
    wait-ray            wait until a Ray head takes `ray job submit`

options:
  -h, --help            show this help message and exit
  -v, --verbose         debug logging (train: also Ray's and the workers' output)
"""


def test_the_help_lists_every_command_under_the_modules_first_paragraph(capsys):
    """The description is the docstring's whole first paragraph (it was its first line,
    cut after "report,")."""
    assert _help([], capsys) == MAIN_HELP
