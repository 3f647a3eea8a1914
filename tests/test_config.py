"""Config: every shipped file loads, overrides, and errors that name the key and value."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from freetf import ConfigError, load_config
from freetf.config import (
    apply_overrides,
    build_section,
    flatten,
    from_dict,
    read_yaml_mapping,
    split_override,
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


def test_renamed_keys_still_work_say_so_once_and_refuse_both_names(caplog):
    """One name for kappa's start per unit: ``initial_free_bits`` (nats, like
    ``training.free_bits``) and ``initial_free_bits_bits`` (bits); ``initial_nats`` was
    its old name."""
    import logging

    from freetf.config import tree

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
    with pytest.raises(ConfigError, match=f"give only {key}.initial_free_bits"):
        from_dict({"training": {"free_bits_schedule": {"initial_nats": 0.5,
                                                       "initial_free_bits": 0.5}}})
    with pytest.raises(ConfigError, match=f"{key}.initial_free_bits_bits"):
        load_config(overrides={f"{key}.initial_free_bits_bits": -1.0})


def _coerced(key: str, value):
    """The value ``key`` holds after ``from_dict``, or the ConfigError's message."""
    section, name = key.rsplit(".", 1)
    data: dict = {}
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[name] = value
    try:
        cfg = from_dict(data)
    except ConfigError as err:
        return str(err)
    return flatten(cfg.to_dict())[key]


ANY_VALUE = st.one_of(st.booleans(), st.integers(-10**400, 10**400),
                      st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=8), st.sampled_from(["1e-4", "-2.5E3", "nan", "inf",
                                                            "-Infinity", "1_0", " 7 "]),
                      st.none(), st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(value=ANY_VALUE)
def test_an_integer_key_takes_integers_and_whole_floats_only(value):
    """``training.seed`` (an int, any value valid): booleans are not integers, a whole
    float is its integer, huge integers stay exact."""
    got = _coerced("training.seed", value)
    if isinstance(value, int) and not isinstance(value, bool):
        assert got == value and type(got) is int
    elif isinstance(value, float) and value.is_integer():
        assert got == int(value) and type(got) is int
    else:
        assert got == f"training.seed={value!r} must be an integer"


@settings(max_examples=300, deadline=None)
@given(value=ANY_VALUE)
def test_a_number_key_takes_finite_numbers_and_their_text(value):
    """``model.rope_theta`` (a float, any value valid): integers and number strings (YAML
    1.1 reads "1e-4" as a string) become floats; booleans, other strings, infinities, NaN
    and integers beyond the float range are refused, naming the key and the value."""
    got = _coerced("model.rope_theta", value)
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            assert got == f"model.rope_theta={value!r} must be a number"
            return
    if isinstance(number, bool) or not isinstance(number, int | float):
        assert got == f"model.rope_theta={value!r} must be a number"
        return
    try:
        float(number)
    except OverflowError:
        assert got == f"model.rope_theta={number!r} is too large for a float"
        return
    if not math.isfinite(number):
        assert got == f"model.rope_theta={number!r} must be finite"
    else:
        assert got == float(number) and type(got) is float


@settings(max_examples=200, deadline=None)
@given(value=ANY_VALUE)
def test_a_boolean_key_takes_true_and_false_only(value):
    got = _coerced("training.compile", value)
    if isinstance(value, bool):
        assert got is value
    else:
        assert got == f"training.compile={value!r} must be true or false"


@settings(max_examples=200, deadline=None)
@given(value=ANY_VALUE)
def test_a_string_key_takes_strings_and_an_optional_one_none(value):
    got = _coerced("tracking.mlflow.experiment", value)
    if isinstance(value, str):
        assert got == value
    else:
        assert got == f"tracking.mlflow.experiment={value!r} must be a string"
    optional = _coerced("tracking.mlflow.run_name", value)
    if value is None or isinstance(value, str):
        assert optional == value
    else:
        assert optional == f"tracking.mlflow.run_name={value!r} must be a string"


# ----------------------------------------------------------------------------- the generic tree


@dataclass(frozen=True)
class _Inner:
    RENAMED: ClassVar[dict[str, str]] = {"old": "new"}
    new: int = 0


@dataclass(frozen=True)
class _Outer:
    inner: _Inner | None = None
    n: int = 0


@dataclass(frozen=True)
class _Top:
    outer: _Outer


@dataclass(frozen=True)
class _Two:
    RENAMED: ClassVar[dict[str, str]] = {"a_old": "a", "b_old": "b"}
    a: int = 0
    b: int = 0
    mode: Literal["on", "off", "auto"] = "auto"


def test_old_names_in_a_mapping_are_built_under_the_new_ones_and_said_once(caplog):
    tree._SAID.clear()
    with caplog.at_level(logging.WARNING, logger="freetf.config.tree"):
        assert build_section(_Two, {"b_old": 2}, "") == _Two(b=2)
        assert build_section(_Two, {"a_old": 1, "b_old": 2}, "sec") == _Two(a=1, b=2)
        cfg = from_dict({"training": {"free_bits_schedule": {"type": "linear",
                                                              "initial_nats": 0.5}}})
    assert cfg.training.free_bits_schedule.initial_free_bits == 0.5
    key = "training.free_bits_schedule"
    assert [r.getMessage() for r in caplog.records] == [
        "b_old is now called b (the old name still works)",
        "sec.a_old is now called sec.a (the old name still works)",
        "sec.b_old is now called sec.b (the old name still works)",
        f"{key}.initial_nats is now called {key}.initial_free_bits (the old name still works)"]


@dataclass(frozen=True)
class _Unsupported:
    table: dict


def test_a_field_type_the_tree_cannot_build_is_named_with_its_key():
    with pytest.raises(TypeError) as err:
        build_section(_Unsupported, {"table": {}}, "sec")
    assert str(err.value) == "unsupported config type <class 'dict'> at sec.table"


def test_yaml_on_and_off_are_the_strings_where_a_choice_has_them():
    assert build_section(_Two, {"mode": True}, "").mode == "on"
    assert build_section(_Two, {"mode": False}, "").mode == "off"


def test_build_section_names_the_top_of_the_tree_config():
    for data, message in (([1], "config must be a mapping, got [1]"),
                          ({"model": 3}, "model must be a mapping, got 3")):
        with pytest.raises(ConfigError) as err:
            from_dict(data)
        assert str(err.value) == message
    with pytest.raises(ConfigError) as err:
        from_dict({"zz": 1, "aa": 2})
    assert str(err.value) == ("unknown config key aa (value 2); known keys here: checkpoint, "
                              "data, diagnostics, model, optimizer, scaling, scheduler, "
                              "tracking, training")


def test_an_override_under_the_new_name_replaces_the_old_ones_value():
    old = {"inner": {"old": 1, "n": 2}}
    assert apply_overrides(old, ["inner.new=3"], _Outer) == {"inner": {"new": 3, "n": 2}}
    assert apply_overrides(old, ["inner.old=3"], _Outer) == {"inner": {"new": 3, "n": 2}}
    deeper = {"outer": {"inner": {"old": 1}}}
    assert apply_overrides(deeper, {"outer.inner.new": 3}, _Top) == {
        "outer": {"inner": {"new": 3}}}
    assert apply_overrides(old, ["inner.new=3"]) == {"inner": {"old": 1, "n": 2, "new": 3}}


def test_split_override_splits_at_the_first_equals_sign():
    assert split_override("a.b=1") == ("a.b", 1)
    assert split_override(" a.b =x=y") == ("a.b", "x=y")
    assert split_override("a=") == ("a", None) and split_override("a=  ") == ("a", None)
    assert split_override("a=[unclosed") == ("a", "[unclosed")  # not YAML: kept as text
    with pytest.raises(ConfigError) as err:
        split_override(" =1")
    assert str(err.value) == "override ' =1' has an empty key"


def test_read_yaml_mapping_names_the_file_and_what_it_holds(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as err:
        read_yaml_mapping(missing)
    assert str(err.value) == f"config file not found: {missing}"

    class SpecError(ConfigError):
        pass

    with pytest.raises(SpecError) as err:
        read_yaml_mapping(missing, "sweep", SpecError)
    assert str(err.value) == f"sweep file not found: {missing}"
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError) as err:
        read_yaml_mapping(listy)
    assert str(err.value) == f"{listy} must hold a mapping at top level, got list"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml_mapping(empty) == {}


def test_overrides_under_a_schema_follow_renames_and_name_the_key_from_its_path(caplog):
    """An old name sets the new one, said once with the key's full path; keys past the
    schema's sections are kept as given."""
    tree._SAID.clear()
    data = {"inner": {"new": 1}, "n": 2}
    with caplog.at_level(logging.WARNING, logger="freetf.config.tree"):
        got = apply_overrides(data, {"inner.old": 3, "free.a.b": 4, "n": 5}, _Outer, "sec")
    assert got == {"inner": {"new": 3}, "n": 5, "free": {"a": {"b": 4}}}
    assert data == {"inner": {"new": 1}, "n": 2}  # the input is left alone
    assert [r.getMessage() for r in caplog.records] == [
        "sec.inner.old is now called sec.inner.new (the old name still works)"]
    assert apply_overrides({}, ["inner.old=6"], _Outer) == {"inner": {"new": 6}}
    with pytest.raises(ConfigError) as err:
        apply_overrides({"n": 1}, {"n.x": 2})
    assert str(err.value) == "override n.x: n is not a section"
    with pytest.raises(ConfigError) as err:
        apply_overrides({"a": {"n": 1}}, {"a.n.x": 2})
    assert str(err.value) == "override a.n.x: a.n is not a section"


def test_replace_names_a_bad_key_from_the_top_of_the_tree():
    cfg = load_config()
    with pytest.raises(ConfigError) as err:
        cfg.replace({"training.batch_size": "x"})
    assert str(err.value) == "training.batch_size='x' must be an integer"
    with pytest.raises(ConfigError, match=r"^unknown config key model\.nope \(value 1\)"):
        cfg.replace(["model.nope=1"])


@pytest.mark.parametrize("phase,message", [
    ({"until_step": 0}, "training.curriculum[0].until_step=0 must be > 0"),
    ({"until_step": 5, "max_seq_len": 0}, "training.curriculum[0].max_seq_len=0 must be > 0"),
    ({"until_step": 5, "kl_weight": -1}, "training.curriculum[0].kl_weight=-1.0 must be >= 0"),
])
def test_a_curriculum_phase_is_checked_under_its_index(phase, message):
    with pytest.raises(ConfigError) as err:
        from_dict({"training": {"curriculum": [phase]}})
    assert str(err.value) == message


FSDP = {"scaling.strategy": "fsdp", "scaling.num_workers": 2}


@pytest.mark.parametrize("extra,message", [
    ({"scaling.use_ray": False}, "scaling.strategy='fsdp' needs the distributed path: set "
     "scaling.use_ray=true (or scaling.strategy=ddp)"),
    ({"scaling.num_workers": 0}, "scaling.strategy='fsdp' needs Ray Train workers: set "
     "scaling.num_workers >= 1 (0 is the local mode, with no process group)"),
    ({"training.amp": "fp16"}, "training.amp='fp16' is not supported with "
     "scaling.strategy=fsdp (no sharded gradient scaler); use training.amp=bf16"),
    ({"scaling.fsdp_cpu_offload": True, "optimizer.fused": "fused"},
     "optimizer.fused='fused' cannot step parameters offloaded to the CPU "
     "(scaling.fsdp_cpu_offload=true); use optimizer.fused=auto"),
])
def test_fsdp_refuses_what_it_cannot_shard(extra, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides={**FSDP, **extra})
    assert str(err.value) == message


def test_fsdp_accepts_its_edges():
    """One worker, bf16 or off, CPU offload with a fused setting other than "fused", or
    "fused" without offload; none of the refusals applies to ddp."""
    for extra in ({"scaling.num_workers": 1}, {"training.amp": "bf16"},
                  {"training.amp": "off"},
                  {"scaling.fsdp_cpu_offload": True, "optimizer.fused": "foreach"},
                  {"optimizer.fused": "fused"}):
        assert load_config(overrides={**FSDP, **extra}).scaling.strategy == "fsdp"
    ddp = {"scaling.use_ray": False, "scaling.num_workers": 0, "training.amp": "fp16",
           "scaling.fsdp_cpu_offload": True, "optimizer.fused": "fused"}
    assert load_config(overrides=ddp).scaling.strategy == "ddp"


# Every key with a sign check, and its refused value as the message prints it.
POSITIVE = {
    "model.vocab_size": "0", "model.hidden_dim": "0", "model.num_layers": "0",
    "model.num_heads": "0", "model.max_seq_len": "0",
    "training.kl_annealing.cycles": "0",
    "training.batch_size": "0", "training.learning_rate": "0.0", "training.num_epochs": "0",
    "training.max_steps": "0", "training.grad_accum_steps": "0", "training.log_every": "0",
    "training.eval_batches": "0", "training.max_consecutive_nonfinite": "0",
    "optimizer.eps": "0.0", "optimizer.post_sampler_lr_mult": "0.0",
    "data.max_seq_len": "0", "data.num_samples": "0", "data.val_samples": "0",
    "checkpoint.keep": "0",
    "scaling.cpus_per_worker": "0.0",
    "diagnostics.iw_prior_draws": "0", "diagnostics.converge_evals": "0",
}
NON_NEGATIVE = {
    "model.mapper_chunk_size": "-1", "model.post_sampler_init_std": "-1.0",
    "model.readout_init_std": "-1.0",
    "training.kl_annealing.initial_weight": "-1.0", "training.kl_annealing.warmup_steps": "-1",
    "training.free_bits_schedule.initial_free_bits": "-1.0",
    "training.free_bits_schedule.initial_free_bits_bits": "-1.0",
    "training.free_bits_schedule.steps": "-1",
    "training.warmup_steps": "-1", "training.weight_decay": "-1.0",
    "training.kl_weight": "-1.0", "training.free_bits": "-1.0",
    "training.free_bits_bits": "-1.0", "training.grad_clip": "-1.0",
    "training.eval_every": "-1", "training.cross_entropy_chunk_tokens": "-1",
    "scheduler.min_lr": "-1.0",
    "data.num_workers": "-1",
    "checkpoint.every_steps": "-1",
    "scaling.num_workers": "-1", "scaling.gpus_per_worker": "-1.0",
    "scaling.max_failures": "-1", "scaling.report_interval_s": "-1.0",
    **{f"diagnostics.{name}": "-1.0" for name in (
        "active_bit_threshold_nats", "collapsed_kl_nats", "collapsed_gap_nats",
        "leak_kl_factor", "leak_gap_nats", "noise_z", "use_tol_nats", "leak_valid_tol",
        "broken_valid", "leak_cost_tol_nats", "converge_ce_nats", "converge_kl_bits",
        "converge_kl_frac", "floor_tol_nats", "regime_tol_nats")},
    "diagnostics.free_generations": "-1", "diagnostics.use_redraws": "-1",
}


@pytest.mark.parametrize("key,shown", POSITIVE.items(), ids=list(POSITIVE))
def test_a_positive_key_refuses_zero(key, shown):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{key}=0"])
    assert str(err.value) == f"{key}={shown} must be > 0"


@pytest.mark.parametrize("key,shown", NON_NEGATIVE.items(), ids=list(NON_NEGATIVE))
def test_a_non_negative_key_refuses_minus_one_and_takes_zero(key, shown):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{key}=-1"])
    assert str(err.value) == f"{key}={shown} must be >= 0"
    assert flatten(load_config(overrides=[f"{key}=0"]).to_dict())[key] == 0


@pytest.mark.parametrize("overrides,message", [
    ({"training.kl_annealing.ratio": 0}, "training.kl_annealing.ratio=0.0 must be in (0, 1]"),
    ({"training.kl_annealing.ratio": 1.5},
     "training.kl_annealing.ratio=1.5 must be in (0, 1]"),
    ({"optimizer.betas": [-0.1, 0.9]}, "optimizer.betas[0]=-0.1 must be in [0, 1)"),
    ({"optimizer.betas": [0.9, 1.0]}, "optimizer.betas[1]=1.0 must be in [0, 1)"),
    ({"data.val_fraction": 0}, "data.val_fraction=0.0 must be in (0, 1)"),
    ({"data.val_fraction": 1}, "data.val_fraction=1.0 must be in (0, 1)"),
    ({"data.dataset_name": "tokens", "data.path": ""},
     "data.path='' is required when data.dataset_name='tokens'"),
    ({"data.dataset_name": "text"}, "data.path=None is required when data.dataset_name='text'"),
    ({"checkpoint.metric": "ce"}, "checkpoint.metric='ce' must be a logged metric: 'step', "
     "'train/...' or 'eval/...' (e.g. eval/ce_prior_nats)"),
    ({"checkpoint.metric": "Step"}, "checkpoint.metric='Step' must be a logged metric: "
     "'step', 'train/...' or 'eval/...' (e.g. eval/ce_prior_nats)"),
])
def test_a_range_check_refuses_its_edges_by_name(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert str(err.value) == message


@pytest.mark.parametrize("overrides", [
    {"training.kl_annealing.ratio": 1.0}, {"training.kl_annealing.ratio": 1e-9},
    {"optimizer.betas": [0.0, 0.999]},
    {"data.val_fraction": 1e-9}, {"data.val_fraction": 0.999},
    {"data.dataset_name": "tokens", "data.path": "t.bin"},
    {"checkpoint.metric": "step"}, {"checkpoint.metric": "train/loss"},
    {"checkpoint.metric": "eval/ce_prior_nats"},
], ids=str)
def test_a_range_check_takes_its_edges(overrides):
    cfg = flatten(load_config(overrides=overrides).to_dict())
    for key, value in overrides.items():
        assert cfg[key] == value


TEXT = {"data.dataset_name": "text", "data.path": "corpus.txt"}


@pytest.mark.parametrize("overrides,message", [
    ({"model.num_heads": 7}, "model.num_heads=7 must divide model.hidden_dim=256"),
    ({"model.hidden_dim": 24}, "model.num_heads=8 gives an odd head dim 3; RoPE needs it even"),
    ({"model.num_kv_heads": 0},
     "model.num_kv_heads=0 must be positive and divide model.num_heads=8"),
    ({"model.num_kv_heads": 3},
     "model.num_kv_heads=3 must be positive and divide model.num_heads=8"),
    ({"model.latent_dim": -1}, "model.latent_dim=-1 must be >= 0 (0 = baseline)"),
    ({"model.dropout": 1.0}, "model.dropout=1.0 must be in [0, 1)"),
    ({"model.dropout": -0.1}, "model.dropout=-0.1 must be in [0, 1)"),
    ({"model.injection_layer": 8}, "model.injection_layer=8 must be in [0, num_layers=8)"),
    ({"model.injection_layer": -1}, "model.injection_layer=-1 must be in [0, num_layers=8)"),
    ({"model.latent_dim": 21}, "model.latent_dim=21 is too large for the exact binary mapper "
     "(its post-sampler has 2^21 rows); use model.mapper=factored, or latent_dim <= 20"),
    ({"training.curriculum": [{"until_step": 5}, {"until_step": 5}]},
     "training.curriculum[1].until_step=5 phases must end at increasing steps"),
    ({"data.max_seq_len": 257}, "data.max_seq_len=257 exceeds model.max_seq_len=256"),
    ({"training.curriculum": [{"until_step": 5, "max_seq_len": 67}]},
     "training.curriculum[0].max_seq_len=67 exceeds data.max_seq_len=66"),
    ({**TEXT, "model.vocab_size": 255},
     "model.vocab_size=255 must be >= 256 for byte-level text data"),
])
def test_the_model_and_cross_section_checks_by_whole_message(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert str(err.value) == message


@pytest.mark.parametrize("overrides", [
    {"model.num_kv_heads": 1}, {"model.num_kv_heads": 8}, {"model.hidden_dim": 16},
    {"model.latent_dim": 0}, {"model.dropout": 0.0}, {"model.dropout": 0.99},
    {"model.injection_layer": 0}, {"model.injection_layer": 7},
    {"model.latent_dim": 20}, {"model.latent_dim": 64, "model.mapper": "factored"},
    {"training.curriculum": [{"until_step": 1}, {"until_step": 2}]},
    {"data.max_seq_len": 256},
    {"training.curriculum": [{"until_step": 5, "max_seq_len": 66}]},
    {**TEXT, "model.vocab_size": 256},
], ids=str)
def test_the_model_and_cross_section_checks_take_their_edges(overrides):
    cfg = flatten(load_config(overrides=overrides).to_dict())
    for key, value in overrides.items():
        if key == "training.curriculum":  # a phase's unset keys read None
            value = [{"max_seq_len": None, "kl_weight": None, **phase} for phase in value]
        assert cfg[key] == value


@pytest.mark.parametrize("data,message", [
    ({"training": {"amp": "fp8"}},
     "training.amp='fp8' must be one of 'auto', 'bf16', 'fp16', 'off'"),
    ({"training": {"curriculum": 3}}, "training.curriculum=3 must be a list"),
    ({"training": {"curriculum": [{"until_step": 1}, {"until_step": "x"}]}},
     "training.curriculum[1].until_step='x' must be an integer"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas=[0.9] must be a list of 2 values"),
    ({"optimizer": {"betas": 0.9}}, "optimizer.betas=0.9 must be a list of 2 values"),
    ({"optimizer": {"betas": [0.9, "x"]}}, "optimizer.betas[1]='x' must be a number"),
])
def test_choices_lists_and_pairs_name_the_element(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert str(err.value) == message
