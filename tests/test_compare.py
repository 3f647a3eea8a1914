"""The code-corpus comparison (freetf.experiments.compare): its statistics against a hand
computation, its spec (kappa grid x seeds + baselines), its report files, and (heavy)
the whole command on a tiny prepared corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from freetf.experiments.compare import (
    REPLICATION_NLL,
    claim_verdict,
    compare_rows,
    interval,
    markdown_table,
    write_compare,
)
from freetf.sweeps import boundary
from freetf.sweeps.spec import load_sweep

pytestmark = pytest.mark.timeout(120)

T_975_DOF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


def trial(kind, kappa, seed, prior, posterior=math.nan, kl=math.nan, status="FINISHED",
          use_low=0.01):
    return {"model_kind": kind, "free_bits_bits": kappa, "seed": float(seed),
            "status": status, "eval/bpb_prior": prior, "eval/bpb_posterior": posterior,
            "eval/kl_bits": kl, "eval/use_nats": use_low + 0.002, "eval/use_low_nats": use_low}


def runs() -> pd.DataFrame:
    rows = [trial("baseline", 0.5, s, p) for s, p in enumerate([1.00, 1.10, 1.20])]
    rows += [trial("free_transformer", 0.5, s, p, p - 0.1, kl)
             for s, p, kl in [(0, 1.05, 0.50), (1, 1.12, 0.60), (2, 1.30, 0.70)]]
    rows += [trial("free_transformer", 4.0, s, p, p - 1.0, 4.0)
             for s, p in [(0, 2.0), (1, 2.2), (2, 2.3)]]
    rows.append(trial("free_transformer", 4.0, 3, 9.9, status="FAILED"))  # not counted
    rows.append(trial("free_transformer", 0.125, 7, 1.0))  # no baseline of seed 7
    rows += [trial("free_transformer", 1.0, s, p, use_low=u)  # Z unused by every seed
             for s, p, u in [(0, 0.9, 0.0), (1, 1.0, 0.002), (2, 1.1, -0.01)]]
    return pd.DataFrame(rows)


def hand_stats(xs):
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = T_975_DOF2 * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def test_rows_match_a_hand_computation():
    rows = compare_rows(runs())
    assert [r["kappa_bits"] for r in rows] == [None, 0.125, 0.5, 1.0, 4.0]
    base, lone, half, one, four = rows
    # kappa 1: better than the baseline on paper, but no seed's decoder uses Z
    assert one["used_seeds"] == 0 and one["claim"] == "untested: Z unused"
    assert one["delta_bpb"]["high"] < 0  # what claim_verdict alone would call "better"
    assert half["used_seeds"] == 3 and half["use_nats"]["mean"] == pytest.approx(0.012)
    mean, sd, low, high = hand_stats([1.00, 1.10, 1.20])
    assert base["bpb_prior"]["n"] == 3 and base["seeds"] == [0, 1, 2]
    assert (base["bpb_prior"]["mean"], base["bpb_prior"]["sd"]) == pytest.approx((mean, sd))
    assert (base["bpb_prior"]["low"], base["bpb_prior"]["high"]) == pytest.approx((low, high))
    # kappa 1/2: the paired differences 0.05, 0.02, 0.10 against the same seed's baseline
    d_mean, d_sd, d_low, d_high = hand_stats([0.05, 0.02, 0.10])
    delta = half["delta_bpb"]
    assert (delta["mean"], delta["sd"], delta["low"], delta["high"]) == pytest.approx(
        (d_mean, d_sd, d_low, d_high))
    assert half["bpb_posterior"]["mean"] == pytest.approx((1.05 + 1.12 + 1.30) / 3 - 0.1)
    assert half["kl_bits"]["mean"] == pytest.approx(0.6)
    assert half["kl_bits"]["sd"] == pytest.approx(0.1)
    assert half["relative_increase"] == pytest.approx((1.05 + 1.12 + 1.30) / 3 / 1.1 - 1)
    assert half["replication_relative_increase"] == pytest.approx(1.664 / 1.510 - 1)
    assert half["claim"] == "no difference"  # the interval [-0.04, 0.15] holds 0
    # kappa 4: the FAILED seed-3 trial is left out; above the claim's range: no verdict
    assert four["seeds"] == [0, 1, 2] and "claim" not in four
    assert four["replication_relative_increase"] == pytest.approx(3.379 / 1.510 - 1)
    # kappa 1/8: seed 7 has no baseline: no difference to measure
    assert lone["delta_bpb"]["n"] == 0 and math.isnan(lone["delta_bpb"]["mean"])
    assert lone["claim"] == "no difference"
    assert base["relative_increase"] == 0.0


def test_interval_and_claim_verdicts():
    one = interval([2.0])
    assert one["n"] == 1 and one["mean"] == 2.0 and math.isnan(one["sd"])
    assert math.isnan(interval([])["mean"])
    assert interval([1.0, 3.0], confidence=0.9)["high"] == pytest.approx(
        2.0 + 6.313751514675041 * math.sqrt(2) / math.sqrt(2))  # t(0.95, 1 dof)
    assert claim_verdict({"low": 0.01, "high": 0.2}) == "worse"
    assert claim_verdict({"low": -0.2, "high": -0.01}) == "better"
    assert claim_verdict({"low": -0.2, "high": 0.01}) == "no difference"
    assert claim_verdict({"low": math.nan, "high": math.nan}) == "no difference"


def test_replication_trend_is_the_issues():
    assert REPLICATION_NLL == {None: 1.510, 0.125: 1.559, 0.5: 1.664, 1.0: 1.819,
                               2.0: 2.242, 4.0: 3.379}


def test_report_files(tmp_path):
    rows = compare_rows(runs())
    paths = write_compare(rows, tmp_path, "# header", {"wall_s": 12.5})
    text = paths["compare_table"].read_text()
    assert text.startswith("# header") and "| baseline | 0,1,2 | – | – | 1.100 ± 0.100 |" \
        in text
    assert "| 0.5 | 0,1,2 | 3/3 | 0.0120 ± 0.0000 | 1.157 ± 0.129 |" in text
    assert "+10.2%" in text and "| 1 | 0,1,2 | 0/3 |" in text and "untested: Z unused" in text
    saved = json.loads(paths["compare_json"].read_text())
    assert saved["wall_s"] == 12.5 and len(saved["rows"]) == 5
    csv = pd.read_csv(paths["compare_csv"])
    assert list(csv["bpb_prior_n"]) == [3, 1, 3, 3, 3]
    assert list(csv["used_seeds"].fillna(-1)) == [-1, 1, 3, 0, 3]
    assert paths["compare_figure"].stat().st_size > 10_000
    assert markdown_table(rows).count("\n") == 6


def test_the_command_writes_the_sweeps_report_folder_by_default(tmp_path, monkeypatch):
    """``--report-only`` of the smoke spec: compare.* in reports/<sweep name>/, not docs/;
    ``--out`` moves them."""
    from freetf.cli import main
    from freetf.commands import compare

    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    monkeypatch.setattr(compare, "_finished_sweep", lambda sweep: (runs(), None))
    assert main(["compare", "--smoke", "--report-only"]) == 0
    names = ["compare.csv", "compare.json", "compare.md", "compare.png"]
    assert sorted(p.name for p in (tmp_path / "reports" / "compare_code_smoke").iterdir()) \
        == names
    assert not any((tmp_path / "docs").iterdir())
    assert main(["compare", "--smoke", "--report-only", "--out", "elsewhere"]) == 0
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == names


@pytest.mark.parametrize("name,trials,seeds,kappas,latent", [
    ("compare_code", 21, [0, 1, 2], [0.125, 0.25, 0.5, 1.0, 2.0, 4.0], 8),
    ("compare_code_smoke", 6, [0, 1], [0.125, 4.0], 4),
    ("compare_code_gpu", 21, [0, 1, 2], [0.125, 0.25, 0.5, 1.0, 2.0, 4.0], 16),
])
def test_spec_is_the_kappa_grid_times_seeds_plus_baselines(name, trials, seeds, kappas, latent):
    sweep = load_sweep(f"freetf/configs/{name}.yaml")
    base = sweep.base()
    assert sweep.expected_trials == trials
    assert not sweep.stopper.enabled and not sweep.asha.enabled  # every trial to the end
    search = boundary.from_sweep(sweep, base)
    configs = [search.config(spec) for spec in search.queue]
    assert len(configs) == search.budget == trials  # nothing left to place adaptively
    assert search._all_placed()
    baselines = [c for c in configs if c["model.latent_dim"] == 0]
    assert sorted(c["training.seed"] for c in baselines) == seeds
    ft = sorted((c["training.free_bits_bits"], c["training.seed"]) for c in configs
                if c["model.latent_dim"] == latent)
    assert ft == [(k, s) for k in kappas for s in seeds]
    assert configs[:len(seeds)] == baselines  # the baselines run first


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_the_command_end_to_end(tmp_path, monkeypatch, capsys):
    """The smoke spec on a tiny BPE corpus: 6 trials in MLflow, the table on the parent."""
    from conftest import prepared_code_corpus

    from freetf.cli import main
    from freetf.tracking import mlflow_client

    data = prepared_code_corpus(tmp_path, files=30, repeats=40)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    argv = ["--smoke", "--set", f"data.path={data}", "--set", "model.vocab_size=300",
            "--set", f"mlflow.tracking_uri={uri}"]
    assert main(["compare", *argv]) == 0
    out = capsys.readouterr().out
    assert "| baseline | 0,1 |" in out and "| 4 | 0,1 |" in out
    assert main(["compare", *argv, "--report-only"]) == 0
    again = capsys.readouterr().out
    assert [x for x in again.splitlines() if x.startswith("|")] == \
        [x for x in out.splitlines() if x.startswith("|")]  # the same table, from MLflow
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name("freetf-compare-code-smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("freetf.role") == "sweep"]
    assert len(parents) == 1 and len(runs) == 7
    assert parents[0].info.status == "FINISHED"  # the report-only run left it as it was
    names = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {"report/compare.md", "report/compare.csv", "report/compare.json",
            "report/compare.png"} <= names


def test_a_missing_corpus_is_prepared_once(tmp_path, monkeypatch, capsys):
    """ensure_prepared: the recipe into the sweep's data folder, with a progress line;
    the second call finds meta.json and prepares nothing."""
    from freetf.experiments import compare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i}.py").write_text(f"x{i} = {i}\n" * 20)
    monkeypatch.setattr(compare, "STDLIB_RECIPE",
                        {"inputs": (str(corpus),), "tokenizer": "bpe", "vocab_size": 300})
    data = tmp_path / "data"
    sweep = load_sweep("freetf/configs/compare_code_smoke.yaml", [f"data.path={data}"])
    said = []
    assert compare.ensure_prepared(sweep, workers=1, say=said.append)
    assert len(said) == 1
    assert said[0].startswith(f"preparing the corpus: Python's standard library -> {data}")
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "bpe" and (data / "tokenizer.json").is_file()
    assert load_sweep("freetf/configs/compare_code_smoke.yaml",  # the vocabulary follows the data
                      [f"data.path={data}"]).base().model.vocab_size == meta["vocab_size"]
    assert meta["vocab_size"] != 256
    assert not compare.ensure_prepared(sweep, workers=1, say=said.append)
    assert len(said) == 1 and capsys.readouterr().out == ""  # nothing printed by the library


@pytest.fixture
def command_parts(monkeypatch):
    """``freetf compare``'s collaborators, recording: preparing the data (it says so
    and returns ``prepared``), the sweep, the rows, the files and the parent's logging."""
    import time
    from types import SimpleNamespace

    from freetf.commands import compare as command
    from freetf.experiments import compare as experiment
    from freetf.sweeps import sweep as sweep_module

    seen = {"calls": [], "prepared": False}
    clock = iter([100.0, 400.0])  # 5 minutes between the start and the rows (4.9 by 61)
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))

    def ensure_prepared(sweep, say):
        seen["calls"].append(("prepare", sweep.name))
        if seen["prepared"]:
            say("preparing the corpus")
        return seen["prepared"]

    def run_sweep(sweep, resume, verbose):
        seen["calls"].append(("sweep", sweep.name, resume, verbose))
        return SimpleNamespace(runs="the trials", parent_run_id="parent-1")

    def compare_rows(trials):
        seen["calls"].append(("rows", trials))
        return [{"seeds": [2, 0]}, {"seeds": [1, 0]}]

    def write_compare(rows, folder, header, meta):
        seen["calls"].append(("write", folder, header, meta))
        return {"md": folder / "compare.md", "png": folder / "compare.png"}

    import freetf.sweeps.console

    monkeypatch.setattr(freetf.sweeps.console, "setup_console",
                        lambda verbose: seen["calls"].append(("console", verbose)))
    monkeypatch.setattr(experiment, "ensure_prepared", ensure_prepared)
    monkeypatch.setattr(sweep_module, "run_sweep", run_sweep)
    monkeypatch.setattr(experiment, "compare_rows", compare_rows)
    monkeypatch.setattr(experiment, "markdown_table", lambda rows: "| the table |")
    monkeypatch.setattr(experiment, "write_compare", write_compare)
    monkeypatch.setattr(command, "_log_to_parent",
                        lambda sweep, parent, paths: seen["calls"].append(
                            ("log", sweep.name, parent, sorted(paths))))
    return seen


def test_the_command_runs_the_sweep_then_writes_and_prints_its_table(tmp_path, monkeypatch,
                                                                    capsys, command_parts):
    """The whole of ``freetf compare --smoke``: the data prepared (and the spec read again
    for its vocabulary), the sweep, the rows of its trials, the files with their header
    and the run's facts, logged to the parent; then the table and where it went."""
    from freetf.cli import main

    monkeypatch.chdir(tmp_path)
    command_parts["prepared"] = True
    argv = ["compare", "--smoke", "--resume", "--out", "out", "--set", "training.max_steps=7",
            "-v"]
    assert main(argv) == 0
    calls = command_parts["calls"]
    assert [c[0] for c in calls] == ["console", "prepare", "sweep", "rows", "write", "log"]
    assert calls[0] == ("console", True)
    calls = calls[1:]
    assert calls[1] == ("sweep", "compare_code_smoke", True, True)
    assert calls[2] == ("rows", "the trials")
    _, folder, header, meta = calls[3]
    assert folder == Path("out")  # --out as given
    command = "freetf compare --smoke --resume --out out --set training.max_steps=7 -v"
    assert meta == {"command": command, "wall_s": 300.0,
                    "sweep": "compare_code_smoke", "parent_run_id": "parent-1"}
    base = load_sweep("compare_code_smoke", ["training.max_steps=7"]).base()
    m, t = base.model, base.training
    assert t.max_steps == 7  # the --set, also in the spec read again after preparing
    assert header == (
        "# compare_code_smoke: the baseline against the Free Transformer across free bits\n\n"
        f"`{command}`; wall time 5.0 min. "
        f"Data {Path(base.data.path).relative_to(tmp_path)}; model d={m.hidden_dim}, "
        f"{m.num_layers} layers, {m.num_heads} heads, H={m.latent_dim} latent bits; "
        f"{t.max_steps} steps of "
        f"{t.batch_size} x {base.data.max_seq_len} tokens, kl_weight {t.kl_weight}; "
        f"seeds [0, 1, 2]; {t.eval_batches} validation batches, the same for every trial. "
        "Bits per byte = CE (bits/token) / UTF-8 bytes per token of the validation split. "
        "Δ: bits/byte minus the same seed's baseline.")
    assert calls[4] == ("log", "compare_code_smoke", "parent-1", ["md", "png"])
    assert capsys.readouterr().out == (
        "preparing the corpus\n| the table |\n\n"
        "wrote out/compare.md, out/compare.png in 5.0 min\n")


def test_report_only_reads_the_finished_sweep_and_times_nothing(tmp_path, monkeypatch, capsys,
                                                                command_parts):
    from freetf.cli import main
    from freetf.commands import compare as command

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(command, "_finished_sweep",
                        lambda sweep: ("its trials", None) if sweep.name == "compare_code"
                        else pytest.fail(f"read {sweep.name}"))
    assert main(["compare", "--report-only", "--set", "training.max_steps=9"]) == 0
    calls = command_parts["calls"]
    assert [c[0] for c in calls] == ["console", "rows", "write", "log"]
    assert calls[0] == ("console", False) and calls[1] == ("rows", "its trials")
    _, folder, header, meta = calls[2]
    sweep = load_sweep("compare_code")
    assert folder == sweep.report_path
    command = "freetf compare --report-only --set training.max_steps=9"
    assert meta == {"command": command, "wall_s": None,
                    "sweep": "compare_code", "parent_run_id": None}
    assert f"`{command}`. Data " in header  # no wall time
    assert "; 9 steps of " in header  # the --set
    assert calls[3] == ("log", "compare_code", None, ["md", "png"])
    assert capsys.readouterr().out.endswith(f"{sweep.report_path / 'compare.png'}\n")


def test_a_path_under_the_working_folder_is_shown_relative_to_it(tmp_path, monkeypatch):
    from freetf.commands.compare import _shown

    monkeypatch.chdir(tmp_path)
    assert _shown(str(tmp_path / "data" / "stdlib")) == "data/stdlib"
    assert _shown("/elsewhere/data") == "/elsewhere/data"
    assert _shown(None) == "None" and _shown("") == ""


def test_a_finished_sweep_is_its_trials_and_parent_from_its_own_store(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import freetf.results.report
    import freetf.tracking
    from freetf.commands.compare import _finished_sweep

    store = f"sqlite:///{tmp_path}/m.db"
    sweep = load_sweep("compare_code_smoke", [f"tracking.mlflow.tracking_uri={store}",
                                              "tracking.mlflow.experiment=exp"])
    asked = []
    monkeypatch.setattr(freetf.tracking, "mlflow_client",
                        lambda uri: asked.append(("client", uri)) or "client")
    parents = {"compare_code_smoke": SimpleNamespace(info=SimpleNamespace(run_id="p-7"))}
    monkeypatch.setattr(freetf.tracking, "find_parent",
                        lambda client, experiment, name: asked.append(
                            ("parent", client, experiment, name)) or parents.get(name))
    monkeypatch.setattr(freetf.results.report, "collect_runs",
                        lambda client, experiment, sweep: asked.append(
                            ("runs", client, experiment, sweep)) or "the trials")
    assert _finished_sweep(sweep) == ("the trials", "p-7")
    assert asked == [("client", f"sqlite:///{tmp_path}/m.db"),
                     ("parent", "client", "exp", "compare_code_smoke"),
                     ("runs", "client", "exp", "compare_code_smoke")]
    parents.clear()  # no parent run: the trials alone
    assert _finished_sweep(sweep) == ("the trials", None)


def test_the_files_go_to_the_parent_run_when_there_is_one(monkeypatch, tmp_path):
    import freetf.tracking
    from freetf.commands.compare import _log_to_parent

    store = f"sqlite:///{tmp_path}/m.db"
    sweep = load_sweep("compare_code_smoke", [f"tracking.mlflow.tracking_uri={store}"])
    logged = []
    monkeypatch.setattr(freetf.tracking, "mlflow_client", lambda uri: f"client of {uri}")
    monkeypatch.setattr(freetf.tracking, "log_files_to_run",
                        lambda client, run_id, paths, folder: logged.append(
                            (client, run_id, list(paths), folder)))
    paths = {"md": tmp_path / "compare.md", "png": tmp_path / "compare.png"}
    _log_to_parent(sweep, None, paths)
    assert logged == []
    _log_to_parent(sweep, "p-7", paths)
    assert logged == [(f"client of sqlite:///{tmp_path}/m.db", "p-7", list(paths.values()),
                       "report")]


def test_the_help_names_each_options_default(capsys):
    from freetf.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse's wrapping undone
    for said in ["a sweep YAML, or the name of a shipped one (default: compare_code)",
                 "the pipeline at tiny size, not the result (compare_code_smoke)",
                 "--report-only no training: the table and figure of a finished sweep, "
                 "from MLflow",
                 "--out OUT folder of compare.{md,csv,json,png} (default: the sweep's report "
                 "folder, reports/<sweep name>)"]:
        assert said in text, said
