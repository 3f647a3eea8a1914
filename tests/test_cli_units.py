"""freetf/cli.py in-process: each command's options, defaults and help, what it hands to
the code behind it, what it prints, its exit codes and its one-line errors.  The code
behind the commands (training, Ray, the sweep, prepare, export, the report) is replaced
by stand-ins that record what they get; tests/test_cli.py runs the real commands."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import freetf.cli as cli
from freetf.cli import build_parser, main
from freetf.training.paths import OWN_FOLDER

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


HELPS = {
    "train": """\
usage: freetf train [-h] [--config CONFIG] [--batch-size BATCH_SIZE]
                    [--learning-rate LEARNING_RATE] [--num-epochs NUM_EPOCHS]
                    [--max-steps MAX_STEPS] [--num-workers NUM_WORKERS] [--strategy {ddp,fsdp}]
                    [--gpu] [--no-ray] [--resume [CHECKPOINT]] [--fresh] [--set KEY=VALUE] [-v]

options:
  -h, --help            show this help message and exit
  --config CONFIG       a YAML config, or the name of a shipped one (tiny, synthetic, code, ...:
                        freetf/configs/<name>.yaml); default: built-in defaults
  --batch-size BATCH_SIZE
                        per-worker batch size
  --learning-rate LEARNING_RATE
  --num-epochs NUM_EPOCHS
  --max-steps MAX_STEPS
  --num-workers NUM_WORKERS
                        Ray Train data-parallel workers (0: local mode, in the driver)
  --strategy {ddp,fsdp}
                        ddp: a full model per worker; fsdp: sharded over the workers (FSDP2; see
                        `freetf plan`)
  --gpu                 one GPU per worker, NCCL, bf16 AMP
  --no-ray              run the loop in-process
  --resume [CHECKPOINT]
                        continue the run: alone, from its own folder's latest checkpoint (as a
                        sweep's --resume; a run does this without the flag too, the flag says so
                        if there is nothing to continue); with a path, from that checkpoint (or
                        checkpoint root)
  --fresh               start over in a new folder beside the run's (NAME-2, NAME-3 ...), keeping
                        the old one as it is
  --set KEY=VALUE       dotted config override, e.g. training.kl_weight=0.2 (repeatable)
  -v, --verbose         freetf's log, and Ray's and the workers' output
""",
    "generate": """\
usage: freetf generate [-h] --checkpoint CHECKPOINT --prompt PROMPT
                       [--max-new-tokens MAX_NEW_TOKENS] [--temperature TEMPERATURE]
                       [--top-k TOP_K] [--top-p TOP_P] [--num-samples NUM_SAMPLES] [--z Z]
                       [--seed SEED]

options:
  -h, --help            show this help message and exit
  --checkpoint CHECKPOINT
                        a checkpoint, a checkpoint root, or a folder from `freetf export`
  --prompt PROMPT
  --max-new-tokens MAX_NEW_TOKENS
                        default: fill the context up to data.max_seq_len
  --temperature TEMPERATURE
                        0: greedy
  --top-k TOP_K
  --top-p TOP_P         nucleus sampling, in (0, 1]
  --num-samples NUM_SAMPLES
  --z Z                 one latent code in [0, 2^H) shared by every sample
  --seed SEED
""",
    "eval": """\
usage: freetf eval [-h] --checkpoint CHECKPOINT [--set KEY=VALUE] [--samples] [--json]

options:
  -h, --help            show this help message and exit
  --checkpoint CHECKPOINT
                        a checkpoint, a checkpoint root, or a folder from `freetf export`
  --set KEY=VALUE
  --samples             also print generations
  --json
""",
    "export": """\
usage: freetf export [-h] --checkpoint CHECKPOINT --out OUT [--force]

options:
  -h, --help            show this help message and exit
  --checkpoint CHECKPOINT
                        a checkpoint or checkpoint root: in-process, Ray Train or sharded
  --out OUT             the folder to write
  --force               replace a non-empty --out
""",
    "report": """\
usage: freetf report [-h] --experiment EXPERIMENT [--sweep SWEEP] [--tracking-uri TRACKING_URI]
                     [--out OUT]

options:
  -h, --help            show this help message and exit
  --experiment EXPERIMENT
  --sweep SWEEP         one sweep of the experiment (default: all its trials)
  --tracking-uri TRACKING_URI
  --out OUT
""",
    "plan": """\
usage: freetf plan [-h] [--config CONFIG] [--num-workers NUM_WORKERS] [--strategy {ddp,fsdp}]
                   [--gpu-gib GPU_GIB] [--set KEY=VALUE]

options:
  -h, --help            show this help message and exit
  --config CONFIG       a YAML config, or the name of a shipped one (tiny, synthetic, code, ...:
                        freetf/configs/<name>.yaml); default: built-in defaults
  --num-workers NUM_WORKERS
                        GPUs (one a worker)
  --strategy {ddp,fsdp}
                        default: both, side by side
  --gpu-gib GPU_GIB     GPU memory: add a row saying whether each plan fits
  --set KEY=VALUE
""",
    "prepare": """\
usage: freetf prepare [-h] --out OUT [--tokenizer TOKENIZER] [--vocab-size VOCAB_SIZE]
                      [--val-fraction VAL_FRACTION] [--seed SEED] [--text-field TEXT_FIELD]
                      [--shard-docs SHARD_DOCS] [--encoding-errors {strict,replace}]
                      [--workers WORKERS] [-q]
                      INPUT [INPUT ...]

positional arguments:
  INPUT                 folders, files, globs, .jsonl / .parquet files, hf:NAME[:SPLIT], or
                        'stdlib' (this Python's standard-library source)

options:
  -h, --help            show this help message and exit
  --out OUT             output folder
  --tokenizer TOKENIZER
                        'byte' (default), 'bpe' (byte-level BPE trained on the corpus), or the
                        path of a tokenizer.json
  --vocab-size VOCAB_SIZE
                        BPE vocabulary
  --val-fraction VAL_FRACTION
                        share of documents held out for validation
  --seed SEED           seed of the document split
  --text-field TEXT_FIELD
                        JSONL / Parquet / HF text column
  --shard-docs SHARD_DOCS
                        documents per shard (the unit of resumption)
  --encoding-errors {strict,replace}
                        a file that is not UTF-8: skip it (strict, the default; it is named in a
                        summary) or keep it with U+FFFD for what does not decode (replace). Binary
                        files (NUL bytes) are skipped either way
  --workers WORKERS     processes encoding shards in parallel
  -q, --quiet           no progress bars
""",
    "wait-ray": """\
usage: freetf wait-ray [-h] [--dashboard DASHBOARD] [--agent AGENT] [--timeout TIMEOUT]

options:
  -h, --help            show this help message and exit
  --dashboard DASHBOARD
                        the head's dashboard (default http://127.0.0.1:8265)
  --agent AGENT         the head's dashboard agent (default http://127.0.0.1:52365)
  --timeout TIMEOUT     seconds
""",
}


@pytest.mark.parametrize("command", list(HELPS))
def test_each_commands_help_whole(command, capsys):
    assert _help([command], capsys) == HELPS[command]


@pytest.mark.parametrize("command", ["sweep", "reproduce", "compare"])
def test_the_study_commands_are_their_modules(command, monkeypatch, capsys):
    """sweep, reproduce and compare: described by their module's HELP, their options its,
    run by its ``run`` with the parsed arguments and its exit code."""
    import importlib

    module = importlib.import_module(f"freetf.commands.{command}")
    monkeypatch.setenv("COLUMNS", "1000")  # the description on one line
    lines = _help([command], capsys).splitlines()
    assert lines[0].startswith(f"usage: freetf {command} [-h]")
    assert lines[lines.index("") + 1] == module.HELP
    assert "--smoke" in lines[0]  # add_arguments' options
    seen = []
    monkeypatch.setattr(module, "run", lambda args: seen.append(args) or 7)
    assert main(["-v", command, "--smoke"]) == 7
    [args] = seen
    assert (args.command, args.smoke, args.verbose) == (command, True, True)


TRAIN_DEFAULTS = dict(verbose=False, command="train", config=None, batch_size=None,
                      learning_rate=None, num_epochs=None, max_steps=None, num_workers=None,
                      strategy=None, gpu=False, no_ray=False, resume=None, fresh=False, set=None)
GENERATE_DEFAULTS = dict(verbose=False, command="generate", checkpoint="ck", prompt="K>",
                         max_new_tokens=None, temperature=1.0, top_k=None, top_p=None,
                         num_samples=4, z=None, seed=0)
PREPARE_DEFAULTS = dict(verbose=False, command="prepare", inputs=["a", "b*"], out=Path("o"),
                        tokenizer="byte", vocab_size=8192, val_fraction=0.05, seed=0,
                        text_field="text", shard_docs=256, encoding_errors="strict",
                        workers=1, quiet=False)


@pytest.mark.parametrize("argv, func, expected", [
    (["train"], "_train", TRAIN_DEFAULTS),
    (["train", "--config", "c.yaml", "--batch-size", "8", "--learning-rate", "1e-3",
      "--num-epochs", "2", "--max-steps", "5", "--num-workers", "0", "--strategy", "fsdp",
      "--gpu", "--no-ray", "--resume", "ck", "--fresh", "--set", "a.b=1", "--set", "c=2",
      "-v"], "_train",
     dict(TRAIN_DEFAULTS, verbose=True, config=Path("c.yaml"), batch_size=8,
          learning_rate=0.001, num_epochs=2, max_steps=5, num_workers=0, strategy="fsdp",
          gpu=True, no_ray=True, resume="ck", fresh=True, set=["a.b=1", "c=2"])),
    (["-v", "train", "--strategy", "ddp"], "_train",
     dict(TRAIN_DEFAULTS, verbose=True, strategy="ddp")),
    (["train", "--resume"], "_train", dict(TRAIN_DEFAULTS, resume=OWN_FOLDER)),
    (["generate", "--checkpoint", "ck", "--prompt", "K>"], "_generate", GENERATE_DEFAULTS),
    (["generate", "--checkpoint", "ck", "--prompt", "K>", "--max-new-tokens", "9",
      "--temperature", "0", "--top-k", "3", "--top-p", "0.5", "--num-samples", "2",
      "--z", "0", "--seed", "11"], "_generate",
     dict(GENERATE_DEFAULTS, max_new_tokens=9, temperature=0.0, top_k=3, top_p=0.5,
          num_samples=2, z=0, seed=11)),
    (["eval", "--checkpoint", "ck"], "_eval",
     dict(verbose=False, command="eval", checkpoint="ck", set=None, samples=False,
          json=False)),
    (["eval", "--checkpoint", "ck", "--set", "a=1", "--samples", "--json"], "_eval",
     dict(verbose=False, command="eval", checkpoint="ck", set=["a=1"], samples=True,
          json=True)),
    (["export", "--checkpoint", "ck", "--out", "o"], "_export",
     dict(verbose=False, command="export", checkpoint="ck", out="o", force=False)),
    (["export", "--checkpoint", "ck", "--out", "o", "--force"], "_export",
     dict(verbose=False, command="export", checkpoint="ck", out="o", force=True)),
    (["report", "--experiment", "e"], "_report",
     dict(verbose=False, command="report", experiment="e", sweep=None, tracking_uri=None,
          out=Path("reports"))),
    (["report", "--experiment", "e", "--sweep", "s", "--tracking-uri", "u", "--out", "r"],
     "_report", dict(verbose=False, command="report", experiment="e", sweep="s",
                     tracking_uri="u", out=Path("r"))),
    (["plan"], "_plan", dict(verbose=False, command="plan", config=None, num_workers=1,
                             strategy=None, gpu_gib=None, set=None)),
    (["plan", "--config", "c.yaml", "--num-workers", "8", "--strategy", "fsdp",
      "--gpu-gib", "80", "--set", "a=1"], "_plan",
     dict(verbose=False, command="plan", config=Path("c.yaml"), num_workers=8,
          strategy="fsdp", gpu_gib=80.0, set=["a=1"])),
    (["prepare", "a", "b*", "--out", "o"], "_prepare", PREPARE_DEFAULTS),
    (["prepare", "a", "b*", "--out", "o", "--tokenizer", "bpe", "--vocab-size", "300",
      "--val-fraction", "0.1", "--seed", "-3", "--text-field", "body", "--shard-docs", "9",
      "--encoding-errors", "replace", "--workers", "2", "-q"], "_prepare",
     dict(PREPARE_DEFAULTS, tokenizer="bpe", vocab_size=300, val_fraction=0.1, seed=-3,
          text_field="body", shard_docs=9, encoding_errors="replace", workers=2,
          quiet=True)),
    (["wait-ray"], "_wait_ray",
     dict(verbose=False, command="wait-ray", dashboard="http://127.0.0.1:8265",
          agent="http://127.0.0.1:52365", timeout=300.0)),
    (["wait-ray", "--dashboard", "http://h:1", "--agent", "http://h:2", "--timeout", "5"],
     "_wait_ray", dict(verbose=False, command="wait-ray", dashboard="http://h:1",
                       agent="http://h:2", timeout=5.0)),
])
def test_each_commands_options_and_defaults(argv, func, expected):
    """Every option's value, default and type (a Path, an int, a float: ``==`` alone
    would take 8.0 for 8, so the types are compared too)."""
    args = vars(build_parser().parse_args(argv))
    assert args.pop("func") is getattr(cli, func)
    assert args == expected
    assert {k: type(v) for k, v in args.items()} == {k: type(v) for k, v in expected.items()}


@pytest.mark.parametrize("argv, error", [
    ([], "freetf: error: the following arguments are required: command"),
    (["train", "--strategy", "zero"],
     "freetf train: error: argument --strategy: invalid choice: 'zero' (choose from 'ddp', "
     "'fsdp')"),
    (["train", "--learning-rate", "0"], "freetf train: error: argument --learning-rate: 0.0 "
     "must be > 0"),
    (["generate", "--prompt", "K>"],
     "freetf generate: error: the following arguments are required: --checkpoint"),
    (["generate", "--checkpoint", "ck"],
     "freetf generate: error: the following arguments are required: --prompt"),
    (["eval"], "freetf eval: error: the following arguments are required: --checkpoint"),
    (["export", "--out", "o"],
     "freetf export: error: the following arguments are required: --checkpoint"),
    (["report"], "freetf report: error: the following arguments are required: --experiment"),
    (["report", "--experiment", "e", "--sweep", ""],
     "freetf report: error: argument --sweep: must not be empty"),
    (["report", "--experiment", "e", "--tracking-uri", ""],
     "freetf report: error: argument --tracking-uri: must not be empty"),
    (["plan", "--num-workers", "0"], "freetf plan: error: argument --num-workers: 0 must be "
     ">= 1"),
    (["plan", "--strategy", "zero"],
     "freetf plan: error: argument --strategy: invalid choice: 'zero' (choose from 'ddp', "
     "'fsdp')"),
    (["plan", "--gpu-gib", "0"], "freetf plan: error: argument --gpu-gib: 0.0 must be > 0"),
    (["prepare", "--out", "o"],
     "freetf prepare: error: the following arguments are required: INPUT"),
    (["prepare", "a"], "freetf prepare: error: the following arguments are required: --out"),
    (["prepare", "a", "--out", "o", "--vocab-size", "0"],
     "freetf prepare: error: argument --vocab-size: 0 must be >= 1"),
    (["prepare", "a", "--out", "o", "--val-fraction", "1"],
     "freetf prepare: error: argument --val-fraction: 1.0 must be in (0, 1)"),
    (["prepare", "a", "--out", "o", "--seed", "x"],
     "freetf prepare: error: argument --seed: invalid int value: 'x'"),
    (["prepare", "a", "--out", "o", "--shard-docs", "0"],
     "freetf prepare: error: argument --shard-docs: 0 must be >= 1"),
    (["prepare", "a", "--out", "o", "--workers", "0"],
     "freetf prepare: error: argument --workers: 0 must be >= 1"),
    (["prepare", "a", "--out", "o", "--encoding-errors", "ignore"],
     "freetf prepare: error: argument --encoding-errors: invalid choice: 'ignore' (choose "
     "from 'strict', 'replace')"),
    (["wait-ray", "--dashboard", ""],
     "freetf wait-ray: error: argument --dashboard: must not be empty"),
    (["wait-ray", "--agent", " "], "freetf wait-ray: error: argument --agent: must not be empty"),
    (["wait-ray", "--timeout", "0"], "freetf wait-ray: error: argument --timeout: 0.0 must "
     "be > 0"),
])
def test_bad_options_are_argparse_errors(argv, error, monkeypatch, capsys):
    # a value let through runs a stand-in and fails at once (not a 300 s wait for Ray)
    for command in ("_train", "_generate", "_eval", "_export", "_report", "_plan",
                    "_prepare", "_wait_ray"):
        monkeypatch.setattr(cli, command, lambda args: 0)
    assert _argparse_error(argv, capsys) == error


# ------------------------------------------------------------------------------ main


@pytest.fixture
def exported(monkeypatch):
    """export_checkpoint replaced: its calls; it raises ``raises`` when set."""
    import freetf.training.export

    calls = SimpleNamespace(seen=[], raises=None)

    def export_checkpoint(checkpoint, out, force=False):
        calls.seen.append((checkpoint, out, force))
        if calls.raises is not None:
            raise calls.raises
        return Path("exports") / "tiny"

    monkeypatch.setattr(freetf.training.export, "export_checkpoint", export_checkpoint)
    return calls


@pytest.mark.parametrize("force", [False, True])
def test_export_hands_over_its_options_and_says_how_to_load_the_result(exported, force,
                                                                       capsys):
    argv = ["export", "--checkpoint", "ck/step_2", "--out", "out"] + ["--force"] * force
    assert main(argv) == 0
    assert exported.seen == [("ck/step_2", "out", force)]
    assert capsys.readouterr().out == (
        "exported ck/step_2 to exports/tiny: load it with "
        "FreeTransformer.from_pretrained('exports/tiny') or freetf generate --checkpoint "
        "exports/tiny\n")


def _errors():
    from freetf.config import ConfigError
    from freetf.model.pretrained import PretrainedError
    from freetf.tracking import TrackingError
    from freetf.training.checkpoint import CheckpointError
    from freetf.training.export import ExportError

    return [ExportError("out is not empty"), ConfigError("bad key a.b"),
            CheckpointError("no checkpoint"), PretrainedError("not a folder"),
            TrackingError("no server"), FileNotFoundError("nothing here")]


@pytest.mark.parametrize("error", _errors(), ids=lambda e: type(e).__name__)
def test_a_users_mistake_is_one_line_and_exit_2(exported, error, capsys):
    exported.raises = error
    assert main(["export", "--checkpoint", "ck", "--out", "o"]) == 2
    out = capsys.readouterr()
    assert (out.out, out.err) == ("", f"freetf export: error: {error}\n")


def test_ctrl_c_is_one_line_and_exit_130_and_other_errors_are_not_caught(exported, capsys):
    exported.raises = KeyboardInterrupt()
    assert main(["export", "--checkpoint", "ck", "--out", "o"]) == 130
    assert capsys.readouterr().err == "freetf export: interrupted\n"
    exported.raises = ValueError("a bug")
    with pytest.raises(ValueError, match="a bug"):
        main(["export", "--checkpoint", "ck", "--out", "o"])


def test_main_keeps_the_command_as_typed_and_sets_the_log_level(monkeypatch, logging_levels):
    seen = []
    monkeypatch.setattr(cli, "_wait_ray", lambda args: seen.append(args.argv) or 5)
    argv = ["wait-ray", "--timeout", "3"]
    assert main(argv) == 5  # the command's own exit code
    assert main(["-v", *argv]) == 5
    monkeypatch.setattr(sys, "argv", ["freetf", "wait-ray", "--agent", "http://a"])
    assert main() == 5
    assert seen == [argv, ["-v", *argv], ["wait-ray", "--agent", "http://a"]]
    assert seen[0] is not argv  # a copy
    assert logging_levels == [logging.INFO, logging.DEBUG, logging.INFO]


# ----------------------------------------------------------------------------- train


@pytest.fixture
def training(monkeypatch):
    """The config's loading, the run's name, the console and run_training replaced: what
    each got; ``summary`` is what the run returns."""
    import freetf.training.console
    import freetf.training.ray_train
    import freetf.training.run_folder

    calls = SimpleNamespace(loaded=[], named=[], runs=[], consoles=[], setup=[],
                            summary=SimpleNamespace(error=None, checkpoint=None))

    class Console:
        def __init__(self, verbose=False):
            self.verbose, self.cfg, self.summaries = verbose, "the console's config", []
            calls.consoles.append(self)

        def summary(self, summary):
            self.summaries.append(summary)

    def run_training(cfg, resume=None, *, fresh=False, console=None):
        calls.runs.append((cfg, resume, fresh, console))
        return calls.summary

    monkeypatch.setattr(cli, "load_config",
                        lambda config, overrides: calls.loaded.append((config, overrides))
                        or "loaded")
    monkeypatch.setattr(freetf.training.run_folder, "with_default_run_name",
                        lambda cfg, config: calls.named.append((cfg, config)) or "named")
    monkeypatch.setattr(freetf.training.console, "TrainConsole", Console)
    monkeypatch.setattr(freetf.training.ray_train, "run_training", run_training)
    monkeypatch.setattr(cli, "setup_console",
                        lambda verbose, level: calls.setup.append((verbose, level)))
    return calls


def test_train_turns_its_flags_into_overrides_after_the_sets(training, capsys):
    assert main(["train", "--config", "c.yaml", "--set", "a.b=1", "--batch-size", "8",
                 "--learning-rate", "1e-3", "--num-epochs", "2", "--max-steps", "5",
                 "--num-workers", "0", "--strategy", "fsdp", "--gpu", "--no-ray",
                 "--set", "c=2", "--resume", "ck", "--fresh", "-v"]) == 0
    assert training.loaded == [(Path("c.yaml"), [
        "a.b=1", "c=2", "training.batch_size=8", "training.learning_rate=0.001",
        "training.num_epochs=2", "training.max_steps=5", "scaling.num_workers=0",
        "scaling.strategy=fsdp", "scaling.use_gpu=true", "training.device=cuda",
        "scaling.use_ray=false"])]
    assert training.named == [("loaded", Path("c.yaml"))]
    [console] = training.consoles
    assert training.runs == [("named", "ck", True, console)]
    assert console.verbose is True and console.summaries == [training.summary]
    assert training.setup == [(True, logging.WARNING)]
    assert capsys.readouterr() == ("", "")


def test_train_without_flags_overrides_nothing(training):
    assert main(["train"]) == 0
    assert training.loaded == [(None, [])]
    assert training.named == [("loaded", None)]
    [console] = training.consoles
    assert training.runs == [("named", None, False, console)]
    assert console.verbose is False and console.summaries == [training.summary]
    assert training.setup == [(False, logging.WARNING)]


@pytest.mark.parametrize("signum, checkpoint, code, line", [
    (signal.SIGTERM, Path("ck/step_000007"), 143,
     "freetf train: stopped by SIGTERM after step 7; checkpoint: ck/step_000007 (continue "
     "with --resume ck/step_000007)"),
    (signal.SIGINT, None, 130,
     "freetf train: stopped by SIGINT after step 7; no checkpoint was saved"),
])
def test_a_stopped_run_says_where_it_stopped_and_exits_by_its_signal(training, signum,
                                                                     checkpoint, code, line,
                                                                     capsys):
    from freetf.training.stop import TrainingStopped

    training.summary.error = TrainingStopped(signum, 7, checkpoint)
    assert main(["train"]) == code
    assert capsys.readouterr() == ("", line + "\n")
    assert training.consoles[0].summaries == []  # no summary of a stopped run


def test_a_diverged_run_is_explained_from_the_consoles_config_and_exits_1(training, capsys):
    from freetf.training.loop import NonFiniteLossError

    class Diverged(NonFiniteLossError):
        def explain(self, cfg, checkpoint):
            return f"explained from {cfg} and {checkpoint}"

    training.summary.error = Diverged(3, 8)
    training.summary.checkpoint = "ck/step_000004"
    assert main(["train"]) == 1
    assert capsys.readouterr() == (
        "", "freetf train: explained from the console's config and ck/step_000004\n")
    assert training.consoles[0].summaries == []


def test_another_error_of_the_run_is_raised(training, capsys):
    from freetf.training.checkpoint import CheckpointError

    training.summary.error = CheckpointError("the disk is full")
    assert main(["train"]) == 2
    assert capsys.readouterr() == ("", "freetf train: error: the disk is full\n")
    training.summary.error = RuntimeError("a worker died")
    with pytest.raises(RuntimeError, match="a worker died"):
        main(["train"])
    assert [c.summaries for c in training.consoles] == [[], []]


# -------------------------------------------------------------------------- generate


def _model_cfg(has_latent=True, latent_bits=4, max_seq_len=16, data_max_seq_len=10):
    return SimpleNamespace(model=SimpleNamespace(has_latent=has_latent, latent_bits=latent_bits,
                                                 max_seq_len=max_seq_len),
                           data=SimpleNamespace(max_seq_len=data_max_seq_len))


@pytest.fixture
def generating(monkeypatch):
    """A checkpoint of a stand-in model (4 latent bits, a context of 16, trained on 10)
    and a tokenizer of one id per character ('?' is outside its vocabulary)."""
    import freetf.training.export

    calls = SimpleNamespace(loaded=[], tokenizers=[], generated=[], cfg=_model_cfg(),
                            raises=None)

    class Tokenizer:
        def encode(self, text):
            if "?" in text:
                raise ValueError("'?' is not in the vocabulary")
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    class Model:
        def generate(self, prompt, max_new, temperature=1.0, top_k=None, top_p=None, z=None):
            calls.generated.append(dict(prompt=prompt.tolist(), max_new=max_new,
                                        temperature=temperature, top_k=top_k, top_p=top_p,
                                        z=z, seed=torch.initial_seed()))
            if calls.raises is not None:
                raise calls.raises
            rows = torch.arange(len(prompt)).unsqueeze(1) + ord("a")  # a, b, c, ...
            return torch.cat([prompt, rows.expand(-1, max_new)], dim=1)

    def load_inference_model(path):
        calls.loaded.append(path)
        return Model(), calls.cfg, 12

    def load_inference_tokenizer(path, cfg):
        calls.tokenizers.append((path, cfg))
        return Tokenizer()

    monkeypatch.setattr(freetf.training.export, "load_inference_model", load_inference_model)
    monkeypatch.setattr(freetf.training.export, "load_inference_tokenizer",
                        load_inference_tokenizer)
    return calls


def test_generate_hands_its_options_to_the_model_and_prints_each_sample(generating, capsys):
    assert main(["generate", "--checkpoint", "ck", "--prompt", "K>", "--num-samples", "3",
                 "--max-new-tokens", "4", "--temperature", "0.5", "--top-k", "7",
                 "--top-p", "0.9", "--z", "15", "--seed", "42"]) == 0
    assert generating.loaded == ["ck"] and generating.tokenizers == [("ck", generating.cfg)]
    assert generating.generated == [dict(prompt=[[75, 62]] * 3, max_new=4, temperature=0.5,
                                          top_k=7, top_p=0.9, z=15, seed=42)]
    assert capsys.readouterr() == ("K>aaaa\nK>bbbb\nK>cccc\n", "")


def test_generate_fills_the_trained_context_by_default(generating, capsys):
    assert main(["generate", "--checkpoint", "ck", "--prompt", "K>"]) == 0
    assert generating.generated == [dict(prompt=[[75, 62]] * 4, max_new=8, temperature=1.0,
                                          top_k=None, top_p=None, z=None, seed=0)]
    assert capsys.readouterr().out == "K>aaaaaaaa\nK>bbbbbbbb\nK>cccccccc\nK>dddddddd\n"


@pytest.mark.parametrize("prompt, raises, error", [
    ("K?", None, "--prompt: '?' is not in the vocabulary"),
    ("", None, "--prompt is empty"),
    ("K>", ValueError("top_k must be positive"), "top_k must be positive"),
])
def test_generate_errors_are_one_line(generating, prompt, raises, error, capsys):
    generating.raises = raises
    assert main(["generate", "--checkpoint", "ck", "--prompt", prompt]) == 2
    assert capsys.readouterr() == ("", f"freetf generate: error: {error}\n")


def test_generate_checks_z_and_the_length_before_sampling(generating, capsys):
    assert main(["generate", "--checkpoint", "ck", "--prompt", "K>", "--z", "16"]) == 2
    assert main(["generate", "--checkpoint", "ck", "--prompt", "K>",
                 "--max-new-tokens", "15"]) == 2
    assert generating.generated == []
    assert capsys.readouterr().err.splitlines() == [
        "freetf generate: error: argument --z: 16 is outside [0, 16): the model's latent has "
        "4 bits",
        "freetf generate: error: argument --max-new-tokens: 15 + the prompt's 2 tokens exceed "
        "the model's context of 16; use at most 14"]


@pytest.mark.parametrize("z, has_latent", [(None, True), (None, False), (0, True),
                                           (15, True)])
def test_a_latent_code_in_range_or_none_passes(z, has_latent):
    assert cli._check_latent_code(z, _model_cfg(has_latent=has_latent).model) is None


@pytest.mark.parametrize("z, has_latent, bits, error", [
    (0, False, 0, "argument --z: this checkpoint is a baseline model (latent_dim=0); it has "
     "no latent code to fix"),
    (16, True, 4, "argument --z: 16 is outside [0, 16): the model's latent has 4 bits"),
    (8, True, 3, "argument --z: 8 is outside [0, 8): the model's latent has 3 bits"),
])
def test_a_latent_code_out_of_range_is_refused(z, has_latent, bits, error):
    with pytest.raises(cli.UserError) as err:
        cli._check_latent_code(z, _model_cfg(has_latent=has_latent, latent_bits=bits).model)
    assert str(err.value) == error


@pytest.mark.parametrize("requested, prompt_len, budget", [
    (None, 2, 8),    # up to the trained length (10), within the context (16)
    (None, 9, 1),    # the trained length's last token
    (None, 12, 1),   # past the trained length: one token still
    (None, 15, 1),   # the context's last token
    (14, 2, 14),     # the whole context asked for
    (1, 15, 1),
    (3, 2, 3),
])
def test_the_new_token_budget(requested, prompt_len, budget):
    assert cli._new_token_budget(requested, prompt_len, _model_cfg()) == budget


@pytest.mark.parametrize("requested, prompt_len, error", [
    (None, 16, "argument --prompt: 16 tokens leave no room in the model's context of 16 "
     "(model.max_seq_len)"),
    (5, 17, "argument --prompt: 17 tokens leave no room in the model's context of 16 "
     "(model.max_seq_len)"),
    (15, 2, "argument --max-new-tokens: 15 + the prompt's 2 tokens exceed the model's "
     "context of 16; use at most 14"),
    (2, 15, "argument --max-new-tokens: 2 + the prompt's 15 tokens exceed the model's "
     "context of 16; use at most 1"),
])
def test_a_budget_past_the_context_is_refused(requested, prompt_len, error):
    with pytest.raises(cli.UserError) as err:
        cli._new_token_budget(requested, prompt_len, _model_cfg())
    assert str(err.value) == error


# ------------------------------------------------------------------------------ eval


@pytest.fixture
def evaluating(monkeypatch):
    """A checkpoint at step 1234 whose parameters are on the ``meta`` device; the data and
    the evaluation replaced: what they got."""
    import freetf.data.datasets
    import freetf.training.evaluate
    import freetf.training.export

    class Cfg:
        def __init__(self, name):
            self.name, self.training = name, SimpleNamespace(free_bits_nats=0.25)

        def replace(self, overrides):
            calls.replaced.append(overrides)
            return Cfg(f"{self.name}+{','.join(overrides)}")

        def __repr__(self):
            return self.name

    model = SimpleNamespace(parameters=lambda: iter([torch.zeros(1, device="meta")]))
    calls = SimpleNamespace(loaded=[], replaced=[], data=[], evaluated=[], model=model)

    def evaluate(model, data, cfg, device, free_bits_nats, samples=False):
        calls.evaluated.append((model, data, repr(cfg), device, free_bits_nats, samples))
        return {"eval/ce_nats": 1.23456, "eval/bits_active": 3,
                "eval/kl_nats": np.float32(0.5), "samples": ["K>abc", "K>xyz"]}

    def build_data(cfg):
        calls.data.append(repr(cfg))
        return "data"

    def load_inference_model(path):
        calls.loaded.append(path)
        return model, Cfg("ckpt-cfg"), 1234

    monkeypatch.setattr(freetf.training.export, "load_inference_model", load_inference_model)
    monkeypatch.setattr(freetf.data.datasets, "build_data", build_data)
    monkeypatch.setattr(freetf.training.evaluate, "evaluate", evaluate)
    return calls


def test_eval_prints_each_measure_on_its_line(evaluating, capsys):
    assert main(["eval", "--checkpoint", "ck"]) == 0
    assert evaluating.loaded == ["ck"] and evaluating.replaced == []
    assert evaluating.data == ["ckpt-cfg"]
    assert evaluating.evaluated == [(evaluating.model, "data", "ckpt-cfg",
                                     torch.device("meta"), 0.25, False)]
    assert capsys.readouterr() == ("eval/ce_nats                 1.2346\n"
                                   "eval/bits_active             3\n"
                                   "eval/kl_nats                 0.5\n"
                                   "  sample: K>abc\n"
                                   "  sample: K>xyz\n"
                                   "step                         1234\n", "")


def test_eval_with_overrides_and_samples_as_json(evaluating, capsys):
    assert main(["eval", "--checkpoint", "ck", "--set", "a=1", "--set", "b=2", "--samples",
                 "--json"]) == 0
    assert evaluating.replaced == [["a=1", "b=2"]]
    assert evaluating.data == ["ckpt-cfg+a=1,b=2"]
    assert evaluating.evaluated == [(evaluating.model, "data", "ckpt-cfg+a=1,b=2",
                                     torch.device("meta"), 0.25, True)]
    out = capsys.readouterr().out
    assert out == json.dumps({"eval/ce_nats": 1.23456, "eval/bits_active": 3,
                              "eval/kl_nats": 0.5, "samples": ["K>abc", "K>xyz"],
                              "step": 1234}, indent=2) + "\n"


# --------------------------------------------------------------------------- prepare


@pytest.fixture
def preparing(monkeypatch):
    """prepare replaced: what it got; its splits: one without tokens, one of one token."""
    import freetf.data.prepare

    calls = SimpleNamespace(seen=[], raises=None)

    def prepare(spec, out_dir, workers=1, progress=True):
        calls.seen.append((spec, out_dir, workers, progress))
        if calls.raises is not None:
            raise calls.raises
        return {"vocab_size": 300, "tokenizer": {"kind": "bpe"}, "dtype": "uint16",
                "splits": {"train": {"documents": 95, "tokens": 12345, "bytes": 45678},
                           "val": {"documents": 0, "tokens": 0, "bytes": 0},
                           "test": {"documents": 1, "tokens": 1, "bytes": 3}}}

    monkeypatch.setattr(freetf.data.prepare, "prepare", prepare)
    return calls


PREPARED = """\
prepared out: vocabulary 300 (bpe), uint16
  train      95 documents       12345 tokens       45678 bytes (3.70 bytes/token)
  val         0 documents           0 tokens           0 bytes (0.00 bytes/token)
  test        1 documents           1 tokens           3 bytes (3.00 bytes/token)
train on it with: --set data.dataset_name=tokens --set data.path=out --set model.vocab_size=300
"""


def test_prepare_hands_its_options_over_and_summarizes_the_splits(preparing, capsys):
    from freetf.data.prepare import PrepareSpec

    assert main(["prepare", "a", "b*", "--out", "out", "--tokenizer", "bpe",
                 "--vocab-size", "300", "--val-fraction", "0.1", "--seed", "3",
                 "--text-field", "body", "--shard-docs", "9", "--encoding-errors", "replace",
                 "--workers", "2"]) == 0
    assert preparing.seen == [(PrepareSpec(
        inputs=("a", "b*"), tokenizer="bpe", vocab_size=300, val_fraction=0.1, seed=3,
        text_field="body", shard_docs=9, encoding_errors="replace"), Path("out"), 2, True)]
    assert capsys.readouterr() == (PREPARED, "")


def test_prepare_quietly_with_the_defaults_and_its_errors(preparing, capsys):
    from freetf.data.prepare import PrepareError, PrepareSpec

    assert main(["prepare", "a", "--out", "out", "-q"]) == 0
    assert preparing.seen == [(PrepareSpec(inputs=("a",), tokenizer="byte"), Path("out"), 1,
                               False)]
    capsys.readouterr()
    preparing.raises = PrepareError("no documents in a")
    assert main(["prepare", "a", "--out", "out"]) == 2
    assert capsys.readouterr() == ("", "freetf prepare: error: no documents in a\n")


# ------------------------------------------------------------------------------ plan


@pytest.fixture
def planning(monkeypatch):
    import freetf.training.memory_plan

    calls = SimpleNamespace(loaded=[], counted=[], planned=[], formatted=[])
    monkeypatch.setattr(cli, "load_config",
                        lambda config, overrides: calls.loaded.append((config, overrides))
                        or "cfg")
    monkeypatch.setattr(freetf.training.memory_plan, "count_parameters",
                        lambda cfg: calls.counted.append(cfg) or "counts")

    def memory_plan(cfg, num_workers, strategy, counts):
        calls.planned.append((cfg, num_workers, strategy, counts))
        return f"{strategy} on {num_workers}"

    def format_plan(cfg, plans, gpu_gib=None):
        calls.formatted.append((cfg, plans, gpu_gib))
        return "the plan"

    monkeypatch.setattr(freetf.training.memory_plan, "memory_plan", memory_plan)
    monkeypatch.setattr(freetf.training.memory_plan, "format_plan", format_plan)
    return calls


def test_plan_shows_both_strategies_by_default(planning, capsys):
    assert main(["plan"]) == 0
    assert planning.loaded == [(None, [])] and planning.counted == ["cfg"]
    assert planning.planned == [("cfg", 1, "ddp", "counts"), ("cfg", 1, "fsdp", "counts")]
    assert planning.formatted == [("cfg", ["ddp on 1", "fsdp on 1"], None)]
    assert capsys.readouterr() == ("the plan\n", "")


def test_plan_of_one_strategy_with_overrides_and_a_gpus_memory(planning, capsys):
    assert main(["plan", "--config", "c.yaml", "--num-workers", "8", "--strategy", "fsdp",
                 "--gpu-gib", "80", "--set", "a=1"]) == 0
    assert planning.loaded == [(Path("c.yaml"), ["a=1"])]
    assert planning.planned == [("cfg", 8, "fsdp", "counts")]
    assert planning.formatted == [("cfg", ["fsdp on 8"], 80.0)]
    assert capsys.readouterr() == ("the plan\n", "")


# ---------------------------------------------------------------- report, wait-ray


def test_report_hands_its_options_over_and_prints_the_report(monkeypatch, capsys):
    import freetf.sweeps.reporting
    from freetf.results.report import ReportError

    seen = []

    def report(experiment, tracking_uri, out, sweep=None):
        seen.append((experiment, tracking_uri, out, sweep))
        if experiment == "none":
            raise ReportError("no experiment none")
        return "the report"

    monkeypatch.setattr(freetf.sweeps.reporting, "report", report)
    assert main(["report", "--experiment", "e", "--sweep", "s", "--tracking-uri", "u",
                 "--out", "r"]) == 0
    assert main(["report", "--experiment", "e"]) == 0
    assert capsys.readouterr() == ("the report\nthe report\n", "")
    assert main(["report", "--experiment", "none"]) == 2
    assert capsys.readouterr() == ("", "freetf report: error: no experiment none\n")
    assert seen == [("e", "u", Path("r"), "s"), ("e", None, Path("reports"), None),
                    ("none", None, Path("reports"), None)]


def test_wait_ray_waits_for_the_heads_addresses(monkeypatch, capsys):
    import freetf.training.ray_ready

    seen = []

    def wait_for_job_agent(dashboard, agent, timeout_s=300.0):
        seen.append((dashboard, agent, timeout_s))
        if timeout_s < 1:
            raise TimeoutError("the Ray head at d does not take jobs")
        return 12.6

    monkeypatch.setattr(freetf.training.ray_ready, "wait_for_job_agent", wait_for_job_agent)
    assert main(["wait-ray", "--dashboard", "http://h:1", "--agent", "http://h:2",
                 "--timeout", "5"]) == 0
    assert main(["wait-ray"]) == 0
    assert capsys.readouterr() == (
        "Ray head at http://h:1 takes jobs (waited 13 s)\n"
        "Ray head at http://127.0.0.1:8265 takes jobs (waited 13 s)\n", "")
    assert main(["wait-ray", "--timeout", "0.5"]) == 2
    assert capsys.readouterr() == ("", "freetf wait-ray: error: the Ray head at d does not "
                                   "take jobs\n")
    assert seen == [("http://h:1", "http://h:2", 5.0),
                    ("http://127.0.0.1:8265", "http://127.0.0.1:52365", 300.0),
                    ("http://127.0.0.1:8265", "http://127.0.0.1:52365", 0.5)]
