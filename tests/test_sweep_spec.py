"""The sweep spec (freetf/sweeps/spec.py): each check's whole message, the properties a
sweep derives from its spec, and the spec written back out; no Ray instance is started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from freetf.sweeps.spec import SWEEP_SECTIONS, Dimension, SweepError, load_sweep

pytestmark = pytest.mark.timeout(60)

CONFIGS = Path(__file__).resolve().parent.parent / "freetf" / "configs"
SMOKE = CONFIGS / "search_kl_smoke.yaml"  # a boundary search of 6 trials over tiny.yaml
# The smoke file as a grid with ASHA (max_steps 20, grace period 15)
GRID = ["search.method=grid", "space.training.free_bits_bits={grid: [0.015625, 1.0, 4.0]}",
        "asha.enabled=true"]
RANDOM = ["search.method=random", "space.training.free_bits_bits={grid: [0.015625, 1.0]}"]
SHAPES = ("{grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, "
          "{randint: [lo, hi]} (or a bare list, a grid)")


def _error(settings: list[str], path: Path | None = SMOKE) -> str:
    with pytest.raises(SweepError) as err:
        load_sweep(path, settings)
    return str(err.value)


@pytest.mark.parametrize("settings, message", [
    (["nokey"], "--set 'nokey' must look like dotted.key=value"),
    (["overrides=5"],
     "overrides=5 must be a mapping of dotted keys or a list of 'key=value' strings"),
    (["overrides=[training.max_steps=3, 4]"],
     "overrides=['training.max_steps=3', 4] must be a mapping of dotted keys or a list of "
     "'key=value' strings"),
    (["space.training.kl_weight={normal: [0, 1]}"],
     "space.training.kl_weight={'normal': [0, 1]} must be one of " + SHAPES),
    (["space.training.kl_weight={grid: [1.0], choice: [1.0]}"],
     "space.training.kl_weight={'grid': [1.0], 'choice': [1.0]} must be one of " + SHAPES),
    (["space.training.kl_weight=0.5"],
     "space.training.kl_weight=0.5 must be one of " + SHAPES),
    (["space.training.kl_weight={grid: 0.5}"],
     "space.training.kl_weight.grid=0.5 must be a non-empty list"),
    (["space.training.kl_weight=[]"], "space.training.kl_weight.grid=[] must be a non-empty list"),
    (["space.training.kl_weight={uniform: [1, 0.5]}"],
     "space.training.kl_weight.uniform=[1, 0.5] must be [low, high] with low < high"),
    (["space.training.kl_weight={uniform: [0.5, 0.5]}"],
     "space.training.kl_weight.uniform=[0.5, 0.5] must be [low, high] with low < high"),
    (["space.training.kl_weight={uniform: [0.1, 0.5, 1]}"],
     "space.training.kl_weight.uniform=[0.1, 0.5, 1] must be [low, high] with low < high"),
    (["space.training.kl_weight={uniform: [0.1]}"],
     "space.training.kl_weight.uniform=[0.1] must be [low, high] with low < high"),
    (["space.training.kl_weight={uniform: [0.1, x]}"],
     "space.training.kl_weight.uniform=[0.1, 'x'] must be [low, high] with low < high"),
    (["space.training.kl_weight={uniform: [x, 0.1]}"],
     "space.training.kl_weight.uniform=['x', 0.1] must be [low, high] with low < high"),
    (["space.training.kl_weight={uniform: [false, true]}"],
     "space.training.kl_weight.uniform=[False, True] must be [low, high] with low < high"),
    (["space.training.kl_weight={uniform: [0.1, .inf]}"],
     "space.training.kl_weight.uniform=[0.1, inf] must be [low, high] with low < high"),
    (["space.training.kl_weight={uniform: [0.1, null]}"],
     "space.training.kl_weight.uniform=[0.1, None] must be [low, high] with low < high"),
    (["space.training.seed={randint: [5, 1]}"],
     "space.training.seed.randint=[5, 1] must be [low, high] with low < high"),
    (["space.training.kl_weight={loguniform: [0, 1]}"],
     "space.training.kl_weight.loguniform=[0, 1] needs low > 0"),
    (["space.training.kl_weight={loguniform: [-1, 1]}"],
     "space.training.kl_weight.loguniform=[-1, 1] needs low > 0"),
])
def test_a_malformed_setting_or_dimension_is_refused_whole(settings, message):
    assert _error([*RANDOM, *settings]) == message


@pytest.mark.parametrize("settings, message", [
    (["space.kl_weight=[1.0]"], "space.kl_weight is not a config key; did you mean "
                                "training.kl_weight?"),
    (["space.seed=[1]"], "space.seed is not a config key; did you mean training.seed, "
                         "data.seed?"),
    # the hint: the known keys of the same last part, at most three
    (["space.a.b.kl_weight=[1.0]"], "space.a.b.kl_weight is not a config key; did you mean "
                                    "training.kl_weight?"),
    (["space.x.type=[a]"], "space.x.type is not a config key; did you mean "
                           "training.kl_annealing.type, training.free_bits_schedule.type, "
                           "optimizer.type?"),
    (["space.training.kl_wieght=[1.0]"], "space.training.kl_wieght is not a config key"),
    # each value of a grid or a choice is tried on the base config
    (["space.training.kl_annealing.type=[cosine, linear, none]"],
     "space.training.kl_annealing.type: training.kl_annealing.type='none' must be one of "
     "'constant', 'linear', 'cosine', 'cyclical'"),
    (["space.training.kl_annealing.type={choice: [cosine, linear, none]}"],
     "space.training.kl_annealing.type: training.kl_annealing.type='none' must be one of "
     "'constant', 'linear', 'cosine', 'cyclical'"),
    (["space.training.kl_weight={uniform: [-2, -1]}"],
     "space.training.kl_weight: training.kl_weight=-2.0 must be >= 0"),
    (["space.training.kl_weight={uniform: [-1, 2]}"],
     "space.training.kl_weight: training.kl_weight=-1.0 must be >= 0"),
    (["space.training.kl_weight={uniform: [1, 2]}",
      "space.training.learning_rate={uniform: [1, -2]}"],
     "space.training.learning_rate.uniform=[1, -2] must be [low, high] with low < high"),
    (["search.method=grid", "space.training.kl_weight={uniform: [0.1, 1]}"],
     "space.training.kl_weight is a uniform distribution but search.method=grid; use "
     "search.method=random or optuna"),
    (["search.method=grid", "space.training.kl_weight={choice: [0.1, 1]}"],
     "space.training.kl_weight is a choice distribution but search.method=grid; use "
     "search.method=random or optuna"),
    (["space.training.free_bits=[0.1]", "space.training.free_bits_bits=[0.5]"],
     "space has both training.free_bits (nats) and training.free_bits_bits (bits); search "
     "one of them"),
    (["training.max_steps=null"], "the base config needs training.max_steps: ASHA and the "
                                  "stopper count optimizer steps"),
    (["search.num_samples=0"], "search.num_samples=0 must be >= 1"),
    (["search.method=grid", "search.num_samples=2"],
     "search.num_samples=2 would repeat identical grid points; put seeds in the space "
     "instead (space: {training.seed: {grid: [0, 1, 2]}})"),
    (["search.method=grid", "search.num_samples=0"], "search.num_samples=0 must be >= 1"),
    (["asha.enabled=true", "asha.grace_period=20"],
     "asha.grace_period=20 must be in (0, training.max_steps=20)"),
    (["asha.enabled=true", "asha.grace_period=0"],
     "asha.grace_period=0 must be in (0, training.max_steps=20)"),
    (["asha.enabled=true", "asha.reduction_factor=1"], "asha.reduction_factor=1.0 must be > 1"),
    (["asha.enabled=true", "asha.reduction_factor=0.5"],
     "asha.reduction_factor=0.5 must be > 1"),
    (["resources.num_workers=0"], "a sweep needs scaling.num_workers >= 1 "
                                  "(resources.num_workers): Ray Train's local mode (0) does "
                                  "not run inside a Tune trial"),
    (["resources.trial_runner=in_trial", "resources.num_workers=2"],
     "resources.trial_runner=in_trial runs one worker, in the trial process; set "
     "resources.num_workers=1 (it is 2) or resources.trial_runner=train"),
    (["resources.trial_runner=in_trial", "scaling.strategy=fsdp"],
     "scaling.strategy=fsdp shards over Ray Train workers; set resources.trial_runner=train"),
    (["resources.gpus_per_worker=1.5"], "resources.gpus_per_worker=1.5 must be in (0, 1] (a "
                                        "share of one GPU) or a whole number of GPUs"),
    (["resources.gpus_per_worker=0"], "resources.gpus_per_worker=0.0 must be in (0, 1] (a "
                                      "share of one GPU) or a whole number of GPUs"),
    (["resources.cpus_per_trial=-0.5"], "resources.cpus_per_trial=-0.5 must be >= 0"),
    (["mlflow.sweep_name=a/b"], "mlflow.sweep_name='a/b' must be a non-empty name without '/'"),
    (["mlflow.sweep_name=''"], "mlflow.sweep_name='' must be a non-empty name without '/'"),
])
def test_a_spec_the_base_config_cannot_run_is_refused_naming_the_key(settings, message):
    assert _error([*RANDOM, *settings]) == message


@pytest.mark.parametrize("settings, message", [
    (["boundary.key=training.learning_rate"],
     "search.method=boundary searches boundary.key=training.learning_rate along log2; give "
     "its range: space: {training.learning_rate: {loguniform: [lo, hi]}}"),
    (["space.training.free_bits_bits=[0, 1.0]"],
     "space.training.free_bits_bits: the boundary search needs a range of values > 0"),
    (["space.training.free_bits_bits=[1.0, 1]"],
     "space.training.free_bits_bits: the boundary search needs a range of values > 0"),
    (["space.training.kl_weight={choice: [0.5, 1.0]}"], None),  # a choice is a grid here
    (["space.training.kl_weight={uniform: [0.5, 1.0]}"],
     "space.training.kl_weight is a uniform distribution; with search.method=boundary the "
     "other keys must be grids"),
    (["space.training.seed=[0, 1]"],
     "space.training.seed: the boundary search sets it (boundary.seeds, baselines with "
     "model.latent_dim=0); remove it from the space"),
    (["space.model.latent_dim=[4, 8]"],
     "space.model.latent_dim: the boundary search sets it (boundary.seeds, baselines with "
     "model.latent_dim=0); remove it from the space"),
    (["boundary.seeds=1"], "boundary.seeds=1 must be >= 2: one seed per probe cannot tell a "
                           "boundary from a seed's own learning event"),
    (["boundary.initial=1"], "boundary.initial=1 must be in [2, boundary.probes=2]"),
    (["boundary.initial=3"], "boundary.initial=3 must be in [2, boundary.probes=2]"),
    (["boundary.probes=3", "boundary.initial=3"], None),
    (["boundary.confidence=0"], "boundary.confidence=0.0 must be in (0, 1)"),
    (["boundary.confidence=1"], "boundary.confidence=1.0 must be in (0, 1)"),
    (["boundary.confidence=0.5"], None),
    (["boundary.targets=[collapse, collapse]"],
     "boundary.targets=['collapse', 'collapse']: one or more of collapse, leak, position, "
     "noise, broken, each once"),
    (["boundary.targets=[collapse, phase]"],
     "boundary.targets=['collapse', 'phase']: one or more of collapse, leak, position, "
     "noise, broken, each once"),
    (["boundary.targets=[]"], "boundary.targets=[]: one or more of collapse, leak, position, "
                              "noise, broken, each once"),
    (["boundary.targets=[broken, leak]"], None),
    (["asha.enabled=true"], "search.method=boundary needs every probe to the end: set "
                            "asha.enabled=false"),
    (["model.latent_dim=0"], "search.method=boundary needs a Free Transformer: the base "
                             "config has model.latent_dim=0"),
    # boundary.at: 2 to probes distinct values inside the key's range, ends included
    (["boundary.at=[0.5, 0.5]"], "boundary.at=[0.5, 0.5]: 2 to boundary.probes=2 distinct "
                                 "values"),
    (["boundary.at=[0.5]"], "boundary.at=[0.5]: 2 to boundary.probes=2 distinct values"),
    (["boundary.at=[0.5, 1, 2]"], "boundary.at=[0.5, 1.0, 2.0]: 2 to boundary.probes=2 "
                                  "distinct values"),
    (["boundary.at=[0.001, 1.0]"], "boundary.at: 0.001 outside the range [0.015625, 4] of "
                                   "space.training.free_bits_bits"),
    (["boundary.at=[0.001, 8, 1]", "boundary.probes=3"],
     "boundary.at: 0.001, 8 outside the range [0.015625, 4] of space.training.free_bits_bits"),
    (["boundary.at=[0.015625, 4.0]", "boundary.initial=9"], None),  # at: initial unused
    (["boundary.at=[0.5, 1, 2]", "boundary.probes=3"], None),
])
def test_a_boundary_search_the_base_config_cannot_run_is_refused(settings, message):
    if message is None:
        assert load_sweep(SMOKE, settings).search.method == "boundary"
    else:
        assert _error(settings) == message


def test_an_unknown_sweep_key_and_a_bad_section_are_named(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base_config: {CONFIGS / 'tiny.yaml'}\nspace: {{training.seed: [0]}}\n"
                    "reports: x\nabc: 1\n")
    assert _error([], path) == (f"unknown sweep key abc; known keys: "
                                f"{', '.join(SWEEP_SECTIONS)}")
    assert SWEEP_SECTIONS == ("base_config", "overrides", "space", "search", "boundary",
                              "asha", "stopper", "resources", "mlflow", "storage_path",
                              "report_dir")
    # a section's own check, its "config key" said as a sweep key
    assert _error(["search.methd=random"]) == (
        "unknown sweep key search.methd (value 'random'); known keys here: "
        "max_concurrent_trials, method, metric, mode, num_samples, seed")
    # an unknown top-level --set key goes to the base config, which names it
    assert _error(["reports=x"]) == (
        "base config: unknown config key reports (value 'x'); known keys here: checkpoint, "
        "data, diagnostics, model, optimizer, scaling, scheduler, tracking, training")
    # no file: the defaults, whose space is empty
    assert _error([], None) == ("space is empty: give at least one key, e.g. space: "
                                "{training.kl_weight: {grid: [0.1, 1.0]}}")


def test_a_spec_file_is_read_relative_to_itself_and_set_routes_each_key(tmp_path,
                                                                         monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text((CONFIGS / "tiny.yaml").read_text())
    path = tmp_path / "sub" / "sweep.yaml"
    path.write_text("base_config: base.yaml\n"
                    "overrides: [training.max_steps=30, training.log_every=3]\n"
                    "space: {training.kl_weight: {loguniform: [1e-3, 1e-1]}}\n"
                    "search: {method: random, num_samples: 2}\n"
                    "mlflow: {sweep_name: s1}\nstorage_path: ~/ray\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(path, ["overrides.training.eval_every=6", "space.training.seed=[0, 1]",
                              "report_dir=out", "mlflow.experiment=e", "data.seed=4"])
    assert sweep.base_config == str(tmp_path / "sub" / "base.yaml")
    assert sweep.overrides == {"training.max_steps": 30, "training.log_every": 3,
                               "training.eval_every": 6, "data.seed": 4}
    # YAML reads 1e-3 as a string: the range is numbers
    assert sweep.space[0] == Dimension("training.kl_weight", "loguniform", (0.001, 0.1))
    assert sweep.space[1] == Dimension("training.seed", "grid", (0, 1))
    assert sweep.storage_path == str(tmp_path / "home" / "ray")
    assert sweep.report_dir == str(tmp_path / "out")
    assert sweep.name == "s1" and sweep.mlflow.experiment == "e"
    assert sweep.sweep_dir == tmp_path / "home" / "ray" / "s1"
    assert sweep.train_dir == tmp_path / "home" / "ray" / "s1.train"
    assert sweep.report_path == tmp_path / "out" / "s1"
    assert sweep.expected_trials == 2 * 2  # num_samples per seed
    # the defaults of the two folders, under the working folder
    plain = load_sweep(SMOKE)
    assert plain.storage_path == str(tmp_path / "ray_results")
    assert plain.report_dir == str(tmp_path / "reports")
    # no base_config: the default config (None), a file's folder or not
    bare = tmp_path / "bare.yaml"
    bare.write_text("overrides: {training.max_steps: 10}\nspace: {training.kl_weight: [0.5]}\n")
    assert load_sweep(bare).base_config is None
    assert load_sweep(bare).base().training.max_steps == 10
    # an absolute base_config is kept as it is
    path.write_text(path.read_text().replace("base.yaml", str(CONFIGS / "tiny.yaml")))
    assert load_sweep(path).base_config == str(CONFIGS / "tiny.yaml")


def test_the_base_takes_the_sweeps_mlflow_and_resources():
    sweep = load_sweep(SMOKE, ["mlflow.experiment=exp", "mlflow.tracking_uri=http://mlflow:5000",
                               "resources.cpus_per_worker=0.25", "resources.num_workers=2",
                               "resources.gpus_per_worker=0.5"])
    base = sweep.base()
    assert base.scaling.use_ray and base.tracking.mlflow.enabled
    assert base.tracking.mlflow.experiment == "exp"
    assert base.tracking.mlflow.tracking_uri == "http://mlflow:5000"
    assert (base.scaling.cpus_per_worker, base.scaling.num_workers) == (0.25, 2)
    assert base.scaling.use_gpu and base.training.device == "cuda"
    assert base.scaling.gpus_per_worker == 0.5
    assert sweep.trial_runner(base) == "train"
    # without them: the base config's own (the smoke file's experiment, one CPU worker)
    plain = load_sweep(SMOKE).base()
    assert plain.tracking.mlflow.experiment == "freetf-search-kl-smoke"
    assert plain.tracking.mlflow.tracking_uri.endswith("/mlflow.db")
    assert (plain.scaling.cpus_per_worker, plain.scaling.num_workers) == (0.49, 1)
    assert not plain.scaling.use_gpu and plain.training.device != "cuda"
    # whole GPUs are a valid share
    assert load_sweep(SMOKE, ["resources.gpus_per_worker=2"]).base().scaling.gpus_per_worker == 2


def test_a_boundary_search_counts_a_baseline_per_setting_that_changes_it():
    """expected_trials: seeds x (one baseline per distinct baseline setting + probes per
    setting); ``training.kl_weight`` changes the baseline (a model without latent has no
    KL), ``training.learning_rate`` does."""
    sweep = load_sweep(SMOKE, ["space.training.kl_weight=[0.5, 1.0]",
                               "space.training.learning_rate=[0.001, 0.01, 0.1]"])
    settings = [{"training.kl_weight": w, "training.learning_rate": lr}
                for w in (0.5, 1.0) for lr in (0.001, 0.01, 0.1)]
    assert sweep.settings == settings
    from freetf.evaluation.verdicts import changes_baseline

    baselines = len({tuple((k, v) for k, v in s.items() if changes_baseline(k))
                     for s in settings})
    assert sweep.expected_trials == 2 * (baselines + 6 * 2)
    assert sweep.named_keys == ("training.free_bits_bits", "training.kl_weight",
                                "training.learning_rate", "training.seed")


def test_the_trial_count_of_each_method():
    grid = load_sweep(SMOKE, [*GRID, "space.training.kl_weight=[0.5, 1.0]"])
    assert grid.expected_trials == 3 * 2
    rand = load_sweep(SMOKE, [*RANDOM, "search.num_samples=3",
                              "space.training.kl_weight={uniform: [0.5, 1.0]}",
                              "space.training.seed={choice: [0, 1, 2]}"])
    assert rand.expected_trials == 3 * 2  # the grid's 2 values only
    assert rand.named_keys == ("training.free_bits_bits", "training.kl_weight",
                               "training.seed")


@pytest.mark.parametrize("kind, values, method, expected", [
    ("grid", (1, 2), "grid", {"grid_search": [1, 2]}),
    ("grid", (1, 2), "random", {"grid_search": [1, 2]}),
    ("grid", (1, 2), "optuna", ("Categorical", [1, 2])),
    ("choice", (1, 2), "grid", ("Categorical", [1, 2])),
    ("uniform", (0.5, 2.0), "random", ("Float", (0.5, 2.0))),
    ("loguniform", (0.5, 2.0), "random", ("Float", (0.5, 2.0))),
    ("randint", (1, 5), "random", ("Integer", (1, 5))),
])
def test_a_dimension_is_the_tune_domain_of_its_kind(kind, values, method, expected):
    dim = Dimension("training.kl_weight", kind, values)
    domain = dim.domain(method)
    assert dim.to_dict() == {kind: list(values)}
    if isinstance(expected, dict):
        assert domain == expected
        return
    cls, bounds = expected
    assert type(domain).__name__ == cls
    if cls == "Categorical":
        assert domain.categories == bounds
    else:
        assert (domain.lower, domain.upper) == bounds
        sampler = type(domain.get_sampler()).__name__
        assert sampler == ("_LogUniform" if kind == "loguniform" else "_Uniform")


def test_the_spec_as_run_reads_back_as_the_same_sweep(tmp_path):
    sweep = load_sweep(SMOKE, ["boundary.at=[0.5, 1.0]", "mlflow.experiment=e",
                               "overrides.training.max_steps=12", f"storage_path={tmp_path}"])
    data = yaml.safe_load(sweep.to_yaml())
    assert list(data) == list(SWEEP_SECTIONS)
    assert data["space"] == {"training.free_bits_bits": {"loguniform": [0.015625, 4.0]},
                             "training.kl_weight": {"grid": [1.0]}}
    assert data["boundary"]["at"] == [0.5, 1.0] and data["mlflow"]["experiment"] == "e"
    assert data["overrides"]["training.max_steps"] == 12
    assert data["storage_path"] == str(tmp_path)
    path = tmp_path / "as_run.yaml"
    path.write_text(sweep.to_yaml())
    assert load_sweep(path) == sweep


@pytest.mark.parametrize("text, values", [
    ("[1e-3, 1e-1]", (0.001, 0.1)),  # both strings: "1e-3" > "1e-1" as strings
    ("[1e-3, 1.0]", (0.001, 1.0)),  # a string and a float: not comparable
    ("[0.25, 2e0]", (0.25, 2.0)),
])
def test_a_range_yaml_reads_as_strings_is_compared_as_numbers(text, values):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; the range is still a range."""
    sweep = load_sweep(SMOKE, [*RANDOM, f"space.training.kl_weight={{loguniform: {text}}}"])
    assert sweep.space[-1] == Dimension("training.kl_weight", "loguniform", values)
    # only strings are converted: a randint range stays whole numbers
    seeds = load_sweep(SMOKE, [*RANDOM, "space.training.seed={randint: [0, 4]}"]).space[-1]
    assert [type(v) for v in seeds.values] == [int, int] and seeds.values == (0, 4)
    assert _error([*RANDOM, "space.training.kl_weight={uniform: [2e0, 1e-1]}"]) == (
        "space.training.kl_weight.uniform=['2e0', '1e-1'] must be [low, high] with low < high")
    assert _error([*RANDOM, "space.training.kl_weight={loguniform: [0e0, 1e-1]}"]) == (
        "space.training.kl_weight.loguniform=['0e0', '1e-1'] needs low > 0")


def test_a_missing_or_malformed_sweep_file_is_a_sweep_error(tmp_path):
    assert _error([], tmp_path / "nope.yaml").startswith(
        f"sweep file not found: {tmp_path / 'nope.yaml'} (give a YAML file, or the name of a "
        f"shipped config: ")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert _error([], path) == f"{path} must hold a mapping at top level, got list"
    path.write_text("space: [\n")
    assert _error([], path).startswith(f"{path} is not valid YAML: ")


@pytest.mark.parametrize("settings", [
    ["asha.enabled=true", "asha.grace_period=1"],
    ["asha.enabled=true", "asha.grace_period=19"],  # training.max_steps=20
    ["asha.enabled=true", "asha.reduction_factor=1.01"],
    ["resources.gpus_per_worker=1"],
    ["resources.gpus_per_worker=0.125"],
    ["resources.cpus_per_trial=0"],
    ["resources.trial_runner=in_trial"],
    ["resources.trial_runner=train", "resources.num_workers=2", "scaling.strategy=fsdp"],
])
def test_the_edges_of_each_range_are_accepted(settings):
    sweep = load_sweep(SMOKE, [*RANDOM, *settings])
    assert sweep.search.method == "random"
    assert "training.free_bits_bits" not in sweep.overrides  # not searched in nats


def test_optuna_is_needed_only_when_searched_with(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "optuna" else real(name, *a))
    sweep = load_sweep(SMOKE, [*RANDOM, "search.method=optuna", "search.num_samples=4"])
    assert sweep.search.method == "optuna" and sweep.expected_trials == 4
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optuna" else real(name, *a))
    assert _error([*RANDOM, "search.method=optuna"]) == (
        "search.method=optuna needs Optuna, which is not installed: pip install "
        "'freetf[optuna]' (grid and random need no extras)")
