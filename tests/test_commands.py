"""The study commands (freetf/commands): `freetf sweep | reproduce | compare`, their options,
the shipped sweeps they run by default, and the tune/ scripts as their aliases.  The sweep
itself is replaced by a recorder here (tests/test_sweep.py runs real ones)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from freetf.cli import main

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command, options", [
    ("sweep", ["--config", "--smoke", "--resume", "--set", "--verbose"]),
    ("reproduce", ["--config", "--smoke", "--resume", "--in-process", "--merge", "--out"]),
    ("compare", ["--config", "--smoke", "--resume", "--report-only", "--out", "--verbose"]),
])
def test_help_lists_the_options(command, options, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: freetf {command}") and all(o in out for o in options)


@pytest.fixture
def recorded(monkeypatch):
    """run_sweep replaced: the calls it got; the result says ``interrupted`` when asked."""
    import freetf.results.report
    import freetf.sweeps.sweep
    import freetf.tracking

    class Calls(list):
        interrupt = False

    calls = Calls()

    def run_sweep(sweep, resume=False, verbose=False):
        calls.append(SimpleNamespace(sweep=sweep, resume=resume, verbose=verbose))
        return SimpleNamespace(tracking_uri="sqlite:///x.db", experiment="e", analysis=None,
                               runs=None, report={}, interrupted=calls.interrupt,
                               runs_view="v1", terminated=False)

    monkeypatch.setattr(freetf.sweeps.sweep, "run_sweep", run_sweep)
    monkeypatch.setattr(freetf.tracking, "mlflow_client", lambda uri: SimpleNamespace(
        get_experiment_by_name=lambda name: SimpleNamespace(experiment_id="1")))
    monkeypatch.setattr(freetf.results.report, "summary_text",
                        lambda *a: f"the summary, view {a[-1]}")
    return calls


@pytest.mark.parametrize("argv, name, max_steps, resume, verbose", [
    (["sweep"], "search_kl", 1000, False, False),
    (["sweep", "--smoke"], "search_kl_smoke", 20, False, False),
    (["sweep", "--config", "search_kl_smoke", "--set", "training.max_steps=7", "--resume",
      "-v"], "search_kl_smoke", 7, True, True),
    (["-v", "sweep", "--smoke"], "search_kl_smoke", 20, False, True),
    (["sweep", "--config", str(ROOT / "bench" / "search_kl_grid8.yaml")], "search_kl", 300,
     False, False),
])
def test_sweep_runs_the_shipped_sweep_or_the_one_named(recorded, tmp_path, monkeypatch, capsys,
                                                       argv, name, max_steps, resume, verbose):
    monkeypatch.chdir(tmp_path)  # an empty folder: the names are the package's
    assert main(argv) == 0
    (call,) = recorded
    assert call.sweep.name == name and call.sweep.base().training.max_steps == max_steps
    assert (call.resume, call.verbose) == (resume, verbose)
    assert "the summary, view v1" in capsys.readouterr().out  # the sweep's saved view


def test_an_interrupted_sweep_says_how_to_resume_it(recorded, capsys):
    recorded.interrupt = True
    assert main(["sweep", "--smoke", "--set", "training.max_steps=7"]) == 130
    assert "continue it with: freetf sweep --smoke --set training.max_steps=7 --resume" in \
        capsys.readouterr().out


def test_an_unknown_sweep_is_one_line_naming_the_shipped_ones(capsys):
    assert main(["sweep", "--config", "search_kl_smok"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("freetf sweep: error: sweep file not found: search_kl_smok (")
    assert "search_kl_smoke" in err and "Traceback" not in err


@pytest.mark.parametrize("script, command", [("search_kl", "sweep"),
                                             ("reproduce_synthetic", "reproduce"),
                                             ("compare_code", "compare")])
def test_the_tune_scripts_are_aliases_of_the_commands(script, command, monkeypatch):
    """``python tune/<script>.py ARGS`` is ``freetf <command> ARGS``."""
    import freetf.cli

    seen = []
    monkeypatch.setattr(freetf.cli, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", [f"tune/{script}.py", "--smoke", "--set", "a.b=1"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "tune" / f"{script}.py"), run_name="__main__")
    assert exit_.value.code == 0 and seen == [[command, "--smoke", "--set", "a.b=1"]]


def test_the_sweep_alias_runs_the_smoke_sweep(recorded, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tune/search_kl.py", "--smoke"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "tune" / "search_kl.py"), run_name="__main__")
    assert exit_.value.code == 0 and [c.sweep.name for c in recorded] == ["search_kl_smoke"]


def test_the_sweep_prints_its_analysis_then_the_summary_of_its_own_runs(monkeypatch, capsys):
    """``freetf sweep``'s output, whole: the analysis's lines, then the summary of the
    sweep's runs and report, asked of the sweep's store and experiment; the console set
    up as asked; a terminated sweep exits 143 with the resume command."""
    import freetf.results.report
    import freetf.sweeps.console
    import freetf.sweeps.sweep
    import freetf.tracking

    seen = {}
    result = SimpleNamespace(
        tracking_uri="sqlite:///s.db", experiment="exp", runs="the runs", report="the files",
        runs_view="v2", interrupted=False, terminated=False,
        analysis=SimpleNamespace(summary_lines=lambda: ["kappa_c: 0.25 bits", "kappa_l: 2"]))
    monkeypatch.setattr(freetf.sweeps.console, "setup_console",
                        lambda verbose: seen.setdefault("console", verbose))
    monkeypatch.setattr(freetf.sweeps.sweep, "run_sweep", lambda sweep, **kw: result)

    def client(uri):
        assert uri == "sqlite:///s.db"
        return SimpleNamespace(get_experiment_by_name=lambda name: SimpleNamespace(
            experiment_id={"exp": "7"}[name]))

    monkeypatch.setattr(freetf.tracking, "mlflow_client", client)
    monkeypatch.setattr(freetf.results.report, "summary_text",
                        lambda *args: "summary of " + ", ".join(map(str, args)))
    assert main(["sweep", "--smoke", "-v"]) == 0
    assert seen == {"console": True}
    assert capsys.readouterr().out == (
        "kappa_c: 0.25 bits\nkappa_l: 2\n"
        "summary of the runs, the files, sqlite:///s.db, exp, 7, v2\n")
    result.analysis = None
    assert main(["sweep", "--smoke"]) == 0
    assert capsys.readouterr().out == "summary of the runs, the files, sqlite:///s.db, exp, 7, v2\n"
    result.interrupted = result.terminated = True
    assert main(["sweep", "--smoke", "--resume"]) == 143
    assert capsys.readouterr().out.endswith(
        "\nThe sweep was interrupted; continue it with: freetf sweep --smoke --resume\n")


def test_the_sweeps_help_names_its_default_and_smoke_sweeps(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse's wrapping undone
    assert "a sweep YAML, or the name of a shipped one (default: search_kl)" in text
    assert "the pipeline at tiny size, not the result (search_kl_smoke)" in text


def test_a_sweeps_options_parse_and_are_explained_in_its_help(capsys):
    """add_sweep_arguments: each option's value and default, and its help, whole."""
    from freetf.cli import build_parser
    from freetf.commands import command_line, sweep_spec

    parse = build_parser().parse_args
    args = parse(["sweep"])
    assert (args.config, args.smoke, args.set, args.resume) == (None, False, [], False)
    assert sweep_spec(args, "d", "s") == "d"
    args = parse(["sweep", "--config", "a.yaml", "--smoke", "--set", "x=1", "--set", "y=2",
                  "--resume", "-v"])
    assert args.config == Path("a.yaml") and args.set == ["x=1", "y=2"]
    assert args.smoke and args.resume and args.verbose
    assert sweep_spec(args, "d", "s") == Path("a.yaml")
    assert sweep_spec(parse(["sweep", "--smoke"]), "d", "s") == "s"
    args.argv = ["sweep", "--resume", "--set", "a b=1"]
    assert command_line(args) == "freetf sweep --resume --set 'a b=1'"
    assert command_line(args, drop=("--resume",)) == "freetf sweep --set 'a b=1'"
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse's wrapping undone
    for said in ["--config CONFIG a sweep YAML, or the name of a shipped one (default: "
                 "search_kl)",
                 "--smoke the pipeline at tiny size, not the result (search_kl_smoke)",
                 "--set KEY=VALUE override: space.<key>={grid: [...]}, search.num_samples=4, "
                 "mlflow.sweep_name=NAME, or a base-config key such as training.max_steps=50 "
                 "(repeatable)",
                 "--resume continue an interrupted sweep of the same name",
                 "-v, --verbose Ray's and Tune's own output too (status tables, trial logs)"]:
        assert said in text, said
