"""Config: every shipped file loads, overrides, and errors that name the key and value."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from freetf import ConfigError, config, load_config
from freetf.config import (
    flatten,
    from_dict,
    tree,
)

pytestmark = pytest.mark.timeout(60)
SHIPPED = Path(__file__).parent.parent / "freetf" / "configs"
CONFIGS = sorted(SHIPPED.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    if "space" in yaml.safe_load(path.read_text()):  # a sweep spec around a base config
        from freetf.sweeps.sweep import load_sweep

        assert load_sweep(path).base().model.hidden_dim > 0
        return
    cfg = load_config(path)
    assert cfg.model.hidden_dim % cfg.model.num_heads == 0


def test_guide_config_is_the_guides_schema():
    cfg = load_config(SHIPPED / "free_transformer.yaml")
    assert cfg.model.vocab_size == 50000 and cfg.model.latent_dim == 32
    assert cfg.training.learning_rate == 1e-4  # YAML reads "1e-4" as a string: coerced
    assert cfg.training.free_bits_nats == 0.5
    assert cfg.optimizer.betas == (0.9, 0.95) and cfg.optimizer.eps == 1e-8


def test_the_shipped_configs_are_package_data_found_through_importlib_resources():
    """freetf/configs is what importlib.resources finds in the package; the wheel takes every
    file of it (pyproject's package-data); the repository's configs/ is the same folder."""
    import fnmatch
    import tomllib
    from importlib.resources import files

    from freetf.config import shipped_configs, shipped_dir

    found = files("freetf").joinpath("configs")
    assert shipped_dir() == found and found.samefile(SHIPPED)
    assert shipped_configs() == [p.stem for p in CONFIGS]
    assert {"search_kl", "search_kl_smoke", "reproduce_synthetic", "compare_code", "tiny",
            "synthetic"} <= set(shipped_configs())
    root = SHIPPED.parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["freetf"]
    assert all(any(fnmatch.fnmatch(f"configs/{p.name}", pat) for pat in patterns)
               for p in SHIPPED.iterdir())
    assert (root / "configs").resolve() == SHIPPED.resolve()


def test_a_config_is_a_file_or_the_name_of_a_shipped_one(tmp_path, monkeypatch):
    from freetf.config import config_path

    monkeypatch.chdir(tmp_path)
    assert config_path("tiny") == config_path("tiny.yaml") == SHIPPED / "tiny.yaml"
    assert load_config("tiny") == load_config(SHIPPED / "tiny.yaml")
    (tmp_path / "tiny.yaml").write_text("model: {hidden_dim: 48}\n")  # a file wins
    assert config_path("tiny.yaml") == Path("tiny.yaml")
    assert load_config("tiny.yaml").model.hidden_dim == 48
    assert load_config("tiny").model.hidden_dim == 32  # no file named "tiny": shipped
    for missing in ("configs/tiny.yaml", "nope", str(tmp_path / "synthetic.yaml"), ""):
        with pytest.raises(ConfigError, match=r"config file not found: .*synthetic, tiny\)"):
            config_path(missing)


def test_a_shipped_sweep_by_name_finds_its_base_config_beside_it(tmp_path, monkeypatch):
    from freetf.sweeps.spec import SweepError, load_sweep

    monkeypatch.chdir(tmp_path)  # nothing here: the names are the package's
    sweep = load_sweep("search_kl_smoke")
    assert Path(sweep.base_config) == SHIPPED.resolve() / "tiny.yaml"
    assert sweep.base().training.max_steps == 20
    with pytest.raises(SweepError, match="sweep file not found: search_kl_smok "):
        load_sweep("search_kl_smok")


def test_dotted_overrides_and_bits_unit():
    cfg = load_config(overrides=["training.kl_weight=0.2", "training.free_bits_bits=1",
                                 "model.latent_dim=0"])
    assert cfg.training.kl_weight == 0.2
    assert cfg.training.free_bits_nats == pytest.approx(math.log(2))
    assert not cfg.model.has_latent
    again = cfg.replace({"training.kl_weight": 0.5})
    assert again.training.kl_weight == 0.5 and cfg.training.kl_weight == 0.2
    assert flatten(cfg.to_dict())["training.kl_weight"] == 0.2


@pytest.mark.parametrize("override,message", [
    (["model.hidden_dimm=3"], "unknown config key model.hidden_dimm"),
    (["training.kl_weight=-1"], "training.kl_weight=-1.0 must be >= 0"),
    (["model.num_heads=7"], "model.num_heads=7 must divide model.hidden_dim=256"),
    (["training.batch_size=abc"], "training.batch_size='abc' must be an integer"),
    (["data.max_seq_len=512"], "data.max_seq_len=512 exceeds model.max_seq_len=256"),
    (["training.amp=fp8"], "training.amp='fp8' must be one of"),
    (["model.latent_dim=32"], "model.mapper=factored"),
    (["training.curriculum=[{until_step: 5}, {until_step: 3}]"],
     "training.curriculum[1].until_step=3"),
    (["nokeyvalue"], "must look like dotted.key=value"),
    (["data.dataset_name=text"], "data.path=None is required"),
    (["checkpoint.metric=ce_prior"], "checkpoint.metric='ce_prior' must be a logged metric"),
])
def test_errors_name_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=override)
    assert message in str(err.value)


def test_yaml_off_is_the_string_off():
    assert load_config(overrides=["training.amp=off"]).training.amp == "off"
    with pytest.raises(ConfigError, match="training.amp=True must be one of"):
        load_config(overrides=["training.amp=on"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(listy)


def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    """safe_load only: a tag that would call Python is a YAML error, and nothing runs."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    assert not marker.exists()


def test_to_yaml_is_the_tree_in_field_order():
    cfg = load_config(overrides={"training.kl_weight": 0.25})
    text = cfg.to_yaml()
    assert text.startswith("model:\n  vocab_size: 29\n  hidden_dim: 256\n")
    assert yaml.safe_load(text) == cfg.to_dict()
    assert from_dict(yaml.safe_load(text)) == cfg


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.training.kl_weight = 3.0  # type: ignore[misc]


# ----------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(kl_weight=st.floats(0.0, 1e3, allow_nan=False),
       batch_size=st.integers(1, 4096),
       free_bits_bits=st.floats(0.0, 16.0, allow_nan=False),
       latent_dim=st.integers(0, 20))
def test_overrides_round_trip_through_text_and_dict(kl_weight, batch_size, free_bits_bits,
                                                    latent_dim):
    """A dotted override as text (YAML-parsed) or as a dict sets exactly that value."""
    text = [f"training.kl_weight={kl_weight!r}", f"training.batch_size={batch_size}",
            f"training.free_bits_bits={free_bits_bits!r}", f"model.latent_dim={latent_dim}"]
    from_text = load_config(overrides=text)
    from_dict = load_config().replace({"training.kl_weight": kl_weight,
                                       "training.batch_size": batch_size,
                                       "training.free_bits_bits": free_bits_bits,
                                       "model.latent_dim": latent_dim})
    for cfg in (from_text, from_dict):
        assert cfg.training.kl_weight == kl_weight
        assert cfg.training.batch_size == batch_size
        assert cfg.training.free_bits_nats == pytest.approx(free_bits_bits * math.log(2))
        assert cfg.model.latent_dim == latent_dim and cfg.model.has_latent == (latent_dim > 0)
    assert load_config(overrides=[f"{k}={v!r}" for k, v in flatten(
        from_text.to_dict()).items() if isinstance(v, int | float) and not isinstance(
        v, bool)]).to_dict() == from_text.to_dict()  # every numeric key round-trips


@settings(max_examples=40, deadline=None)
@given(section=st.sampled_from(["model", "training", "data", "optimizer"]),
       name=st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1,
                    max_size=12))
def test_unknown_override_keys_fail_with_their_full_path(section, name):
    if name in load_config().to_dict()[section]:
        return  # a real key or sub-section
    with pytest.raises(ConfigError, match=f"{section}.{name}"):
        load_config(overrides=[f"{section}.{name}=1"])


def test_renamed_keys_still_work_say_so_once_and_refuse_both_names(caplog, tmp_path):
    """One name for kappa's start per unit: ``initial_free_bits`` (nats, like
    ``training.free_bits``) and ``initial_free_bits_bits`` (bits); ``initial_nats`` was
    its old name."""


    tree._SAID.clear()
    key = "training.free_bits_schedule"
    with caplog.at_level(logging.WARNING, logger="freetf.config.tree"):
        old = load_config(overrides={f"{key}.type": "linear", f"{key}.initial_nats": 0.5})
        again = load_config(overrides={f"{key}.type": "linear", f"{key}.initial_nats": 0.5})
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"{key}.initial_nats is now called {key}.initial_free_bits "
                    "(the old name still works)"]
    new = load_config(overrides={f"{key}.type": "linear", f"{key}.initial_free_bits": 0.5})
    assert old == again == new and new.training.free_bits_schedule.initial_nats == 0.5
    bits = load_config(overrides={f"{key}.type": "linear",
                                  f"{key}.initial_free_bits_bits": 2.0})
    assert bits.training.free_bits_schedule.initial_nats == pytest.approx(2.0 * math.log(2))
    assert f"{key}.initial_free_bits" in flatten(new.to_dict())
    assert f"{key}.initial_nats" not in flatten(new.to_dict())
    # an old name in an override replaces the file's value under the new name
    assert new.replace({f"{key}.initial_nats": 0.25}).training.free_bits_schedule \
        .initial_free_bits == 0.25
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("training:\n  free_bits_schedule:\n    initial_free_bits: 0.5\n")
    assert load_config(yaml_file, [f"{key}.initial_nats=0.125"]).training \
        .free_bits_schedule.initial_free_bits == 0.125  # the file's and the flag's: one key
    with pytest.raises(ConfigError, match=f"give only {key}.initial_free_bits"):
        from_dict({"training": {"free_bits_schedule": {"initial_nats": 0.5,
                                                       "initial_free_bits": 0.5}}})
    with pytest.raises(ConfigError, match=f"{key}.initial_free_bits_bits"):
        load_config(overrides={f"{key}.initial_free_bits_bits": -1.0})


# ----------------------------------------------------------------------------- shipped configs


def test_the_shipped_configs_are_the_yaml_files_of_the_packages_configs_folder(monkeypatch,
                                                                             tmp_path):
    import freetf
    from freetf.config import shipped

    folder = Path(freetf.__file__).parent / "configs"
    assert shipped.shipped_dir() == folder
    assert shipped.shipped_configs() == sorted(p.stem for p in folder.glob("*.yaml"))
    for name in ("b.yaml", "a.yaml", "c.yml", "d.txt", "e.yaml.bak"):
        (tmp_path / name).write_text("{}")
    monkeypatch.setattr(shipped, "shipped_dir", lambda: tmp_path)
    assert shipped.shipped_configs() == ["a", "b"]


def test_shipped_configs_that_are_no_folder_are_named(monkeypatch):
    from freetf.config import shipped

    class Zipped:
        def joinpath(self, name):
            return f"zip:freetf/{name}"

    monkeypatch.setattr(shipped, "files", lambda package: Zipped())
    with pytest.raises(ConfigError) as info:
        shipped.shipped_dir()
    assert str(info.value) == ("freetf's shipped configs are not files on disk "
                               "(zip:freetf/configs); give --config a path")


def test_config_path_is_a_file_then_a_bare_shipped_name_else_the_error_listing_them(
        monkeypatch, tmp_path):
    from freetf.config import shipped

    class NotFound(ConfigError):
        pass

    folder = tmp_path / "shipped"
    folder.mkdir()
    for name in ("b.yaml", "a.yaml", ".yaml", "...yaml"):  # what "" and ".." would name
        (folder / name).write_text("{}")
    (folder / "dir.yaml").mkdir()
    monkeypatch.setattr(shipped, "shipped_dir", lambda: folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert shipped.config_path("a") == shipped.config_path("a.yaml") == folder / "a.yaml"
    (tmp_path / "b.yaml").write_text("{}")
    assert shipped.config_path("b.yaml") == Path("b.yaml")
    assert shipped.config_path("~/b.yaml") == tmp_path / "b.yaml"
    for missing in ("c", "shipped/x.yaml", "dir", "", ".", "..", "~"):
        with pytest.raises(NotFound) as info:
            shipped.config_path(missing, "sweep", NotFound)
        assert str(info.value) == (f"sweep file not found: {missing} (give a YAML file, or "
                                   f"the name of a shipped config: .., .yaml, a, b, dir)")
    with pytest.raises(ConfigError, match=r"^config file not found: c \("):
        shipped.config_path("c")


# ----------------------------------------------------------------------------- the vocabulary


def test_the_vocabulary_defaults_to_the_datas(tmp_path, monkeypatch):
    text = {"data.dataset_name": "text", "data.path": "c.txt"}
    assert load_config().model.vocab_size == 29
    assert load_config(overrides=text).model.vocab_size == 256
    assert load_config(overrides={**text, "model.vocab_size": 300}).model.vocab_size == 300
    assert load_config(overrides=["model.hidden_dim=64"]).model.vocab_size == 29
    (tmp_path / "meta.json").write_text('{"vocab_size": 50257}')
    tokens = {"data.dataset_name": "tokens", "data.path": str(tmp_path)}
    assert load_config(overrides=tokens).model.vocab_size == 50257  # the prepared folder's
    assert load_config(overrides={**tokens, "model.vocab_size": 300}).model.vocab_size == 300
    text_there = {"data.dataset_name": "text", "data.path": str(tmp_path)}
    assert load_config(overrides=text_there).model.vocab_size == 256
    for meta in ('{"vocab_size": 0}', '{"vocab_size": true}', '{"vocab_size": 300.0}',
                 '{"vocab_size": "300"}', '{"size": 300}', "[300]", "{", "\xff"):
        (tmp_path / "meta.json").write_bytes(meta.encode("latin-1"))
        assert load_config(overrides=tokens).model.vocab_size == 256, meta
    (tmp_path / "meta.json").write_text('{"vocab_size": 1}')  # taken, then refused
    with pytest.raises(ConfigError, match="^model.vocab_size=1 must be >= 256"):
        load_config(overrides=tokens)
    (tmp_path / "meta.json").unlink()
    (tmp_path / "meta.json").mkdir()
    assert load_config(overrides=tokens).model.vocab_size == 256


def test_the_vocabulary_is_left_to_the_checks_where_the_data_says_nothing(tmp_path,
                                                                        monkeypatch):
    fill = config._default_vocab_from_data
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta.json").write_text('{"vocab_size": 300}')  # not a data folder's
    (tmp_path / "None").mkdir()
    (tmp_path / "None" / "meta.json").write_text('{"vocab_size": 300}')
    for data in ([1], {"model": [1]}, {"data": "x"}, {"model": {"vocab_size": 5}},
                 {"data": {"dataset_name": "nope"}}):
        assert fill(data) is data
    assert fill({}) == {"model": {"vocab_size": 29}}
    assert fill({"data": {}, "model": {"hidden_dim": 8}}) == {
        "data": {}, "model": {"hidden_dim": 8, "vocab_size": 29}}
    for path in ("", None):
        data = {"data": {"dataset_name": "tokens", "path": path}}
        assert fill(data) == {**data, "model": {"vocab_size": 256}}
