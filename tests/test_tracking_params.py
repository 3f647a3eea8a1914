"""Tests for freetf.tracking.params and the experiment kind: what a run shows in MLflow's
runs table (short params, the config tag) and which view its experiment opens in."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from mlflow import MlflowClient

from freetf.config import Config, flatten, load_config
from freetf.tracking import (
    CONFIG_TAG,
    EXPERIMENT_KIND_TAG,
    MAX_TAG_VALUE_CHARS,
    make_tracker,
    run_config,
    run_params,
    runs_column,
    runs_page_url,
    save_runs_view,
)
from freetf.tracking.params import (
    config_tag,
    format_value,
    kappa_params,
    searched_names,
    short_names,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _config(uri: str, **overrides: object) -> Config:
    return load_config(overrides={"tracking.mlflow.tracking_uri": uri,
                                  "tracking.mlflow.experiment": "unit", **overrides})


def test_run_params_are_the_compared_keys_by_short_names() -> None:
    cfg = load_config(overrides={"training.free_bits": 0.25 * math.log(2),  # 1/4 bit in nats
                                 "training.kl_weight": 0.1, "training.seed": 3,
                                 "model.hidden_dim": 64})
    assert run_params(cfg) == {
        "kl_weight": "0.1", "kl_annealing": "constant", "free_bits_schedule": "constant",
        "seed": "3", "latent_dim": "16", "hidden_dim": "64", "num_layers": "8",
        "num_heads": "8", "max_seq_len": "256", "batch_size": "8", "learning_rate": "0.0003",
        "max_steps": "None", "dataset": "synthetic",
        "free_bits_bits": "0.25", "log2_free_bits_bits": "-2"}


def test_searched_keys_join_under_unambiguous_names() -> None:
    searched = ("training.kl_weight", "training.free_bits_bits", "training.weight_decay",
                "training.kl_annealing.warmup_steps", "training.warmup_steps",
                "training.kl_annealing.cycles")
    cfg = load_config(overrides={"training.free_bits_bits": 4.0,
                                 "training.kl_annealing.warmup_steps": 50})
    params = run_params(cfg, searched)
    extra = {k: v for k, v in params.items() if k not in run_params(cfg)}
    assert extra == {"weight_decay": "0.01", "kl_annealing.warmup_steps": "50",
                     "training.warmup_steps": "100", "cycles": "4"}
    assert params["free_bits_bits"] == "4" and params["log2_free_bits_bits"] == "2"
    in_nats = run_params(load_config(overrides={"training.free_bits": 0.5}),
                         ("training.free_bits",))
    assert in_nats["free_bits_nats"] == "0.5" and in_nats["free_bits_bits"] == "0.721348"


def test_baseline_has_no_kappa_or_kl_weight() -> None:
    params = run_params(load_config(overrides={"model.latent_dim": 0}))
    assert not {"kl_weight", "free_bits_bits", "log2_free_bits_bits"} & set(params)
    assert params["latent_dim"] == "0"


@given(st.lists(st.lists(st.sampled_from(["a", "b", "type", "x"]), min_size=1, max_size=4)
                .map(".".join), min_size=1, max_size=6, unique=True))
def test_short_names_are_unique_suffixes(keys: list[str]) -> None:
    names = short_names(keys, taken={"x"})
    assert set(names) == set(keys)
    for key, name in names.items():
        assert key == name or key.endswith("." + name)
    clashes = [n for n in names.values() if list(names.values()).count(n) > 1]
    assert not clashes


def test_a_whole_key_that_is_taken_keeps_its_whole_name() -> None:
    assert short_names(["x", "a.x"], taken={"x"}) == {"x": "x", "a.x": "a.x"}


def test_format_value() -> None:
    assert format_value(0.1 + 0.2) == "0.3"
    assert format_value(1 / 64) == "0.015625"
    assert format_value([0.9, 0.95]) == "[0.9, 0.95]"
    assert format_value(None) == "None" and format_value(True) == "True"


def test_the_whole_config_is_a_searchable_tag(sqlite_uri: str, tmp_path: Path) -> None:
    cfg = _config(sqlite_uri, **{"training.amp": "bf16"})
    tracker = make_tracker(cfg, run_name="tagged")
    tracker.finish()
    other = make_tracker(_config(sqlite_uri), run_name="other")
    other.finish()
    client = MlflowClient(sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert json.loads(run.data.tags[CONFIG_TAG]) == flatten(cfg.to_dict())
    assert run_config(run)["training.amp"] == "bf16"
    assert run_config(run)["training.kl_weight"] == "1"
    experiment = client.get_experiment_by_name("unit").experiment_id
    found = client.search_runs([experiment],
                               f"tags.`{CONFIG_TAG}` LIKE '%\"training.amp\": \"bf16\"%'")
    assert [r.info.run_id for r in found] == [tracker.run_id]
    config_file = client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(config_file).read_text()) == cfg.to_dict()


def test_run_config_of_an_older_run_is_its_params() -> None:
    from types import SimpleNamespace

    run = SimpleNamespace(data=SimpleNamespace(tags={}, params={"training.kl_weight": "0.1"}))
    assert run_config(run) == {"training.kl_weight": "0.1"}


def test_numpy_scalars_are_formatted_as_python_numbers() -> None:
    import numpy as np

    assert format_value(np.float32(1 / 3)) == "0.333333"
    assert format_value(np.int64(3)) == "3"
    assert format_value((0.9, 0.95)) == "(0.9, 0.95)"


def test_log2_kappa_is_rounded_to_six_decimals() -> None:
    """log2 of 1/64 bit reads -6, not -6.000000000001; a kappa of 1.4e-7 bits above 1 reads 0."""
    def log2_param(bits: float) -> str:
        cfg = load_config(overrides={"training.free_bits_bits": bits})
        return kappa_params(cfg)["log2_free_bits_bits"]

    assert log2_param(0.3) == "-1.73697"
    assert log2_param(2 ** 1.4e-7) == "0"
    assert log2_param(1 / 64) == "-6"


def test_a_searched_key_the_config_lacks_is_no_param_and_no_name_is_taken_twice() -> None:
    cfg = load_config()
    assert run_params(cfg, ("training.nope",)) == run_params(cfg)
    assert searched_names(("sweep.log2_free_bits_bits", "a.kl_weight")) == {
        "sweep.log2_free_bits_bits": "sweep.log2_free_bits_bits",
        "a.kl_weight": "a.kl_weight"}


def test_kappa_zero_has_no_log2_param() -> None:
    cfg = load_config(overrides={"training.free_bits": 0.0})
    assert kappa_params(cfg) == {"free_bits_bits": "0"}
    assert kappa_params(load_config(overrides={"training.free_bits_bits": 0.5})) == {
        "free_bits_bits": "0.5", "log2_free_bits_bits": "-1"}


def test_run_config_reads_a_null_as_none() -> None:
    from types import SimpleNamespace

    tag = json.dumps({"training.max_steps": None, "training.kl_weight": 0.1})
    run = SimpleNamespace(data=SimpleNamespace(tags={CONFIG_TAG: tag}, params={"x": "1"}))
    assert run_config(run) == {"training.max_steps": "None", "training.kl_weight": "0.1"}


def test_a_config_tag_of_exactly_the_limit_is_whole() -> None:
    text = config_tag(load_config(), 10 ** 6)
    assert config_tag(load_config(), len(text)) == text
    assert json.loads(config_tag(load_config(), len(text) - 1)) != json.loads(text)


def test_a_long_config_tag_leaves_out_the_longest_values() -> None:
    room = MAX_TAG_VALUE_CHARS - len(config_tag(load_config(), 10 ** 6))  # what defaults leave
    assert room > 200
    cfg = load_config(overrides={"tracking.mlflow.run_name": "r" * 3000,
                                 "data.path": "p" * (room - 100)})
    text = config_tag(cfg, MAX_TAG_VALUE_CHARS)
    assert len(text) <= MAX_TAG_VALUE_CHARS
    kept = json.loads(text)
    assert "tracking.mlflow.run_name" not in kept and kept["training.kl_weight"] == 1.0
    assert "data.path" in kept  # leaving out the longest was enough


def test_experiments_are_marked_model_training(sqlite_uri: str) -> None:
    client = MlflowClient(sqlite_uri)
    make_tracker(_config(sqlite_uri)).finish()  # created by freetf
    assert client.get_experiment_by_name("unit").tags[EXPERIMENT_KIND_TAG] == \
        "custom_model_development"
    old = client.create_experiment("made-elsewhere")  # before freetf set the tag
    make_tracker(_config(sqlite_uri, **{"tracking.mlflow.experiment": "made-elsewhere"})
                 ).finish()
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    genai = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    make_tracker(_config(sqlite_uri, **{"tracking.mlflow.experiment": "chosen"})).finish()
    assert client.get_experiment(genai).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_runs_page_url_opens_the_model_training_view() -> None:
    assert runs_page_url("7") == \
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    url = runs_page_url("7", "http://host:9/", "tags.`freetf.sweep` = 's'")
    assert url.startswith("http://host:9/#/experiments/7/runs?workflowType=machine_learning&")
    assert "searchFilter=tags.%60freetf.sweep%60+%3D+%27s%27" in url


def test_a_saved_view_is_the_experiment_tag_mlflows_ui_reads(sqlite_uri) -> None:
    """MLflow 3.17's UI (Views, Share) keeps a runs-page view in the experiment tag
    ``mlflow.sharedViewState.<id>``: ``{name, createdAt, updatedAt, state}``, ``state`` the
    page's state as a JSON string; ``viewStateShareKey=<id>`` in the URL opens it."""
    client = MlflowClient(sqlite_uri)
    experiment = client.create_experiment("views")
    columns = [runs_column("tags", "freetf.verdict"), runs_column("params", "seed"),
               runs_column("metrics", "eval/kl_bits")]
    assert columns == ["tags.`freetf.verdict`", "params.`seed`", "metrics.`eval/kl_bits`"]
    view = save_runs_view(client, experiment, "v-1", "s: trials", columns,
                          "tags.`freetf.sweep` = 's'")
    envelope = json.loads(client.get_experiment(experiment).tags["mlflow.sharedViewState.v-1"])
    assert envelope["name"] == "s: trials" and envelope["createdAt"] == envelope["updatedAt"]
    assert json.loads(envelope["state"]) == {"selectedColumns": columns,
                                             "searchFilter": "tags.`freetf.sweep` = 's'"}
    save_runs_view(client, experiment, view, "s: trials", columns[:1],  # the same id: replaced
                   group_by_tag="freetf.verdict")
    tags = client.get_experiment(experiment).tags
    assert [k for k in tags if k.startswith("mlflow.sharedViewState.")] == [
        "mlflow.sharedViewState.v-1"]
    assert json.loads(json.loads(tags["mlflow.sharedViewState.v-1"])["state"]) == {
        "selectedColumns": columns[:1], "groupBy": "tag.average.freetf.verdict"}
    assert runs_page_url(experiment, view=view).endswith(
        "/runs?workflowType=machine_learning&viewStateShareKey=v-1")
    with pytest.raises(ValueError, match="give search_filter or view"):
        runs_page_url(experiment, search_filter="x", view=view)  # the UI would drop the view
    with pytest.raises(ValueError, match="letters, digits"):
        save_runs_view(client, experiment, "a b", "n", columns)
    with pytest.raises(ValueError, match="not 'param'"):
        runs_column("param", "seed")
