"""``freetf reproduce`` (freetf/commands/reproduce.py): its options and help, and ``run``'s
wiring, with the experiment's training, measuring and writing replaced by recording
stand-ins (tests/test_reproduce.py runs the pipeline itself at tiny size)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from freetf.cli import build_parser, main
from freetf.config import load_config

pytestmark = pytest.mark.timeout(60)

# tiny with every number in the header made distinct, so that one read in place of another
# shows
SIZE = ["model.hidden_dim=48", "model.num_layers=3", "model.num_heads=6", "model.latent_dim=5",
        "model.mapper=factored", "training.max_steps=7", "training.batch_size=9",
        "training.kl_weight=0.25"]
SETS = [arg for key in SIZE for arg in ("--set", key)]
MODEL = ("Model: d=48, 3 layers, 6 heads, H=5 latent bits (factored mapper); 7 steps of "
         "batch 9 x 66 tokens, kl_weight 0.25; ")
TITLE = "# Synthetic task (§4.1): what Z carries as free bits grow\n\n"

HELP = """\
usage: freetf reproduce [-h] [--config CONFIG] [--smoke] [--resume] [--in-process] \
[--device DEVICE] [--kappas KAPPAS [KAPPAS ...]] [--seeds SEEDS [SEEDS ...]] [--no-baseline] \
[--groups GROUPS] [--per-group PER_GROUP] [--out OUT] [--name NAME] [--set KEY=VALUE] \
[--note NOTE] [--note-file MD] [--merge JSON [JSON ...]]

the paper's synthetic experiment (Figure 4) as a measured table

options:
  -h, --help            show this help message and exit
  --config CONFIG       a sweep YAML or shipped sweep name (Tune; default: reproduce_synthetic), \
or with --in-process a train config or its name (e.g. synthetic)
  --smoke               a minute-sized pipeline check (reproduce_synthetic_smoke)
  --resume              continue an interrupted sweep
  --in-process          no Ray/MLflow: train one run after another (e.g. on a GPU box)
  --device DEVICE
  --kappas KAPPAS [KAPPAS ...]
  --seeds SEEDS [SEEDS ...]
  --no-baseline         in-process: skip the baselines (latent_dim = 0) trained per seed
  --groups GROUPS
  --per-group PER_GROUP
  --out OUT             folder of the table, figure and JSON (default: the sweep's report \
folder, reports/<sweep name>; in-process and --merge: reports); --out docs rewrites the \
committed docs/synthetic_reproduction.*
  --name NAME
  --set KEY=VALUE
  --note NOTE           a paragraph written under the table's header
  --note-file MD        a markdown file written under the table's header (after --note)
  --merge JSON [JSON ...]
                        no training: one table from the rows of earlier runs' JSON files \
(e.g. one process per seed on a GPU box)
"""


def test_the_help_is_each_options_explanation_whole(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps nothing
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == HELP
    assert "  reproduce           the paper's synthetic experiment (Figure 4) as a measured " \
           "table\n" in build_parser().format_help()


def test_the_options_parse_to_their_defaults_and_types():
    from freetf.commands import reproduce

    assert (reproduce.DEFAULT, reproduce.SMOKE) == ("reproduce_synthetic",
                                                    "reproduce_synthetic_smoke")
    assert reproduce.KAPPAS_BITS == (0.015625, 0.125, 1.0, 8.0)
    parse = build_parser().parse_args
    args = vars(parse(["reproduce"]))
    del args["func"], args["verbose"]
    assert args == {"command": "reproduce", "config": None, "smoke": False, "resume": False,
                    "in_process": False, "device": "cpu", "kappas": [0.015625, 0.125, 1.0, 8.0],
                    "seeds": [0, 1, 2], "no_baseline": False, "groups": 16, "per_group": 16,
                    "out": None, "name": "synthetic_reproduction", "set": [], "note": "",
                    "note_file": None, "merge": None}
    args = vars(parse(["reproduce", "--config", "s.yaml", "--smoke", "--resume", "--in-process",
                       "--device", "cuda:1", "--kappas", "0.5", "2", "--seeds", "3", "4",
                       "--no-baseline", "--groups", "5", "--per-group", "6", "--out", "o",
                       "--name", "n", "--set", "a=1", "--set", "b=2", "--note", "N",
                       "--note-file", "f.md", "--merge", "x.json", "y.json"]))
    del args["func"], args["verbose"]
    assert args == {"command": "reproduce", "config": Path("s.yaml"), "smoke": True,
                    "resume": True, "in_process": True, "device": "cuda:1", "kappas": [0.5, 2.0],
                    "seeds": [3, 4], "no_baseline": True, "groups": 5, "per_group": 6,
                    "out": Path("o"), "name": "n", "set": ["a=1", "b=2"], "note": "N",
                    "note_file": Path("f.md"), "merge": [Path("x.json"), Path("y.json")]}
    assert type(args["kappas"][1]) is float and type(args["seeds"][0]) is int
    assert type(args["groups"]) is int and type(args["per_group"]) is int
    assert build_parser().parse_args(["reproduce"]).func is reproduce.run


@pytest.fixture
def parts(monkeypatch):
    """``run``'s collaborators, recording what each is given: the clock reads 100 s and then
    400 s (5.0 minutes; 4.9 by 61), the table is ``| the table |``."""
    import freetf.tracking
    from freetf.experiments import reproduce as experiment

    seen = SimpleNamespace(calls=[], knobs=["model.mapper=factored"], located="", sweep=None,
                           parent="parent-1", analysis=SimpleNamespace(summary_lines=lambda: [
                               "kappa_pos: 0.1 bits", "kappa_noise: 1 bit"]))
    clock = iter([100.0, 400.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    rows, samples = [{"kappa_bits": 1.0}], {"k1": "the samples"}

    def files(out, name):
        return {"table": out / f"{name}.md", "figure": out / f"{name}.png",
                "json": out / f"{name}.json"}

    def merge(paths, out, name, note):
        seen.calls.append(("merge", paths, out, name, note))
        return rows, files(out, name)

    def reproduce_in_process(*args, **kwargs):
        seen.calls.append(("in_process", *args, kwargs))
        return rows, samples

    def reproduce_with_tune(*args):
        seen.calls.append(("tune", *args))
        return rows, samples, SimpleNamespace(
            sweep=seen.sweep, parent_run_id=seen.parent, analysis=seen.analysis,
            report="the report")

    def located_section(analysis, report, out, name):
        seen.calls.append(("located", analysis, report, out, name))
        return seen.located

    def write_outputs(*args):
        seen.calls.append(("write", *args))
        return files(args[2], args[3])

    def changed_knobs(cfg):
        seen.calls.append(("knobs", cfg))
        return seen.knobs

    def summary_table(got):
        assert got is rows
        return "| the table |"

    tracker = SimpleNamespace(log_artifact=lambda path, folder: seen.calls.append(
        ("artifact", path, folder)), finish=lambda status: seen.calls.append(("finish", status)))
    monkeypatch.setattr(freetf.tracking, "make_tracker", lambda cfg, **kw: seen.calls.append(
        ("tracker", cfg, kw)) or tracker)
    for name, stand_in in [("merge", merge), ("reproduce_in_process", reproduce_in_process),
                           ("reproduce_with_tune", reproduce_with_tune),
                           ("located_section", located_section),
                           ("write_outputs", write_outputs), ("changed_knobs", changed_knobs),
                           ("summary_table", summary_table)]:
        monkeypatch.setattr(experiment, name, stand_in)
    seen.rows, seen.samples = rows, samples
    return seen


def test_in_process_trains_each_kappa_and_seed_then_writes_and_prints_the_table(
        parts, tmp_path, capsys):
    """``--in-process``: the config with its --set, the kappas and seeds as tuples, the
    sample groups and the device passed on; the header says the model, the protocol, the
    wall time and the changed knobs; no tracker, no located section, no summary lines."""
    argv = ["reproduce", "--in-process", "--config", "tiny", *SETS,
            "--kappas", "0.5", "2", "--seeds", "3", "4", "--groups", "5", "--per-group", "6",
            "--device", "cuda:1", "--no-baseline", "--out", str(tmp_path), "--name", "n",
            "--note", "A note."]
    assert main(argv) == 0
    cfg = load_config("tiny", SIZE)
    assert [c[0] for c in parts.calls] == ["in_process", "knobs", "write"]
    _, base, *given, kwargs = parts.calls[0]
    assert base == cfg and given == [(0.5, 2.0), (3, 4), 5, 6, "cuda:1"]
    assert kwargs == {"baseline": False}
    assert parts.calls[1] == ("knobs", cfg)
    header = (TITLE + MODEL + "Figure 4 protocol with 5 groups of 6 sequences (prompt \"K>\"). "
              "Wall time 5.0 min on cuda:1. Non-default options: model.mapper=factored.\n\n"
              "A note.")
    assert parts.calls[2] == ("write", parts.rows, parts.samples, tmp_path, "n", header, "")
    assert capsys.readouterr().out == (
        f"| the table |\n\nwrote {tmp_path}/n.md, {tmp_path}/n.png, {tmp_path}/n.json in "
        "5.0 min\n")


def test_in_process_defaults_train_the_baselines_and_write_reports(parts, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parts.knobs = []
    assert main(["reproduce", "--in-process", "--config", "tiny", *SETS]) == 0
    _, base, *given, kwargs = parts.calls[0]
    assert given == [(0.015625, 0.125, 1.0, 8.0), (0, 1, 2), 16, 16, "cpu"]
    assert kwargs == {"baseline": True}
    header = (TITLE + MODEL + "Figure 4 protocol with 16 groups of 16 sequences "
              "(prompt \"K>\"). Wall time 5.0 min on CPU.")  # no options, no note
    assert parts.calls[2] == ("write", parts.rows, parts.samples, Path("reports"),
                              "synthetic_reproduction", header, "")
    assert capsys.readouterr().out == (
        "| the table |\n\nwrote reports/synthetic_reproduction.md, "
        "reports/synthetic_reproduction.png, reports/synthetic_reproduction.json in 5.0 min\n")


@pytest.mark.parametrize("argv, spec", [
    ([], "reproduce_synthetic"),
    (["--smoke"], "reproduce_synthetic_smoke"),
    (["--smoke", "--config", "mine.yaml"], Path("mine.yaml")),
])
def test_the_sweep_is_the_one_asked_for(parts, tmp_path, argv, spec):
    parts.sweep = SimpleNamespace(base=lambda: load_config("tiny", SIZE),
                                  report_path=tmp_path / "sweep")
    assert main(["reproduce", *argv]) == 0
    assert parts.calls[0] == ("tune", spec, [], False, 16, 16)


def test_through_tune_the_sweeps_base_and_boundaries_and_the_files_logged_to_its_parent(
        parts, tmp_path, capsys):
    """Through Ray Tune: the sweep's options passed on, its base config in the header, its
    parent run given the files, its located section written and its lines printed."""
    cfg = load_config("tiny", SIZE)
    parts.sweep = SimpleNamespace(base=lambda: cfg, report_path=tmp_path / "sweep")
    parts.located = "## Located"
    parts.knobs = ["model.mapper=factored", "training.free_bits_per=sequence"]
    assert main(["reproduce", "--config", "mine.yaml", "--set", "a=1", "--set", "b=2",
                 "--resume", "--groups", "5", "--per-group", "6", "--name", "n"]) == 0
    out = tmp_path / "sweep"
    paths = [out / "n.md", out / "n.png", out / "n.json"]
    header = (TITLE + MODEL + "Figure 4 protocol with 5 groups of 6 sequences (prompt \"K>\"). "
              "Wall time 5.0 min on CPU. Non-default options: model.mapper=factored, "
              "training.free_bits_per=sequence.")
    assert parts.calls == [
        ("tune", Path("mine.yaml"), ["a=1", "b=2"], True, 5, 6),
        ("tracker", cfg, {"run_id": "parent-1"}),
        ("located", parts.analysis, "the report", out, "n"),
        ("knobs", cfg),
        ("write", parts.rows, parts.samples, out, "n", header, "## Located"),
        *[("artifact", path, "reproduction") for path in paths],
        ("finish", "FINISHED")]
    assert capsys.readouterr().out == (
        "| the table |\n\nkappa_pos: 0.1 bits\nkappa_noise: 1 bit\n"
        f"wrote {', '.join(map(str, paths))} in 5.0 min\n")


def test_through_tune_nothing_located_prints_no_lines_and_out_wins(parts, tmp_path, capsys):
    """Without located boundaries the analysis' lines are not read (a grid sweep has none)."""
    def unread():
        raise AssertionError("summary lines read without boundaries")

    cfg = load_config("tiny", SIZE)
    parts.sweep = SimpleNamespace(base=lambda: cfg, report_path=tmp_path / "sweep")
    parts.parent, parts.analysis = None, SimpleNamespace(summary_lines=unread)
    out = tmp_path / "o"
    assert main(["reproduce", "--out", str(out)]) == 0
    assert parts.calls[1] == ("tracker", cfg, {"run_id": None})
    assert parts.calls[2][3] == out  # --out, not the sweep's folder
    assert parts.calls[4][3] == out and parts.calls[4][-1] == ""
    assert capsys.readouterr().out == (
        f"| the table |\n\nwrote {out}/synthetic_reproduction.md, "
        f"{out}/synthetic_reproduction.png, {out}/synthetic_reproduction.json in 5.0 min\n")


@pytest.mark.parametrize("note, text, expect", [
    ([], "  ## Reading\n\nThe ladder.\n\n", "## Reading\n\nThe ladder."),
    (["--note", "GPU."], "\n## Reading\n", "GPU.\n\n## Reading"),
    (["--note", "GPU."], " \n\n", "GPU."),
])
def test_merge_writes_one_table_from_earlier_runs_with_the_notes(parts, tmp_path,
                                                                 monkeypatch, capsys,
                                                                 note, text, expect):
    """``--merge``: no training, no clock; the files, the folder (``reports`` by default),
    the name and the notes (--note, then --note-file stripped, blank parts left out)."""
    monkeypatch.chdir(tmp_path)
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text("[]")
    (tmp_path / "note.md").write_text(text)
    assert main(["reproduce", "--merge", "a.json", "b.json", *note, "--note-file",
                 "note.md"]) == 0
    assert parts.calls == [("merge", [Path("a.json"), Path("b.json")], Path("reports"),
                            "synthetic_reproduction", expect)]
    assert capsys.readouterr().out == (
        "| the table |\n\nwrote reports/synthetic_reproduction.md, "
        "reports/synthetic_reproduction.png, reports/synthetic_reproduction.json\n")
    assert time.perf_counter() == 100.0  # the clock not read


def test_merge_into_out_with_a_name_and_no_note_file(parts, tmp_path, capsys):
    (tmp_path / "a.json").write_text("[]")
    assert main(["reproduce", "--merge", str(tmp_path / "a.json"), "--out", str(tmp_path / "o"),
                 "--name", "m", "--note", "N"]) == 0
    assert parts.calls == [("merge", [tmp_path / "a.json"], tmp_path / "o", "m", "N")]
    assert capsys.readouterr().out.endswith(f"wrote {tmp_path}/o/m.md, {tmp_path}/o/m.png, "
                                            f"{tmp_path}/o/m.json\n")


def test_missing_files_are_named_each_and_nothing_runs(parts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("b.json").write_text("[]")
    assert main(["reproduce", "--merge", "a.json", "b.json", "c.json"]) == 2
    assert capsys.readouterr() == ("", "freetf reproduce: error: --merge: no such file: "
                                       "a.json, c.json\n")
    assert main(["reproduce", "--merge", "b.json", "--note-file", "n.md"]) == 2
    assert capsys.readouterr() == ("", "freetf reproduce: error: --note-file: no such file: "
                                       "n.md\n")
    Path("n.md").mkdir()  # a folder is not a note
    assert main(["reproduce", "--merge", "b.json", "--note-file", "n.md"]) == 2
    assert capsys.readouterr().err == "freetf reproduce: error: --note-file: no such file: n.md\n"
    assert parts.calls == []
