"""The sweep spec: a YAML around a base freetf config, parsed into frozen dataclasses.

Sections: ``base_config`` + ``overrides`` (the trials' config), ``space`` (any dotted
config key: ``grid``, ``choice``, ``uniform``, ``loguniform``, ``randint``), ``search``,
``asha``, ``stopper``, ``resources``, ``mlflow``.  Every searched key and grid value is
checked against the base config at load; errors name the key.  Used by
:mod:`freetf.sweeps.sweep`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from freetf.config import (
    Config,
    ConfigError,
    apply_overrides,
    build_section,
    config_path,
    flatten,
    read_yaml_mapping,
    split_override,
)
from freetf.sweeps.sections import (
    AshaSpec,
    BoundarySpec,
    MlflowSweepSpec,
    ResourcesSpec,
    SearchSpec,
    StopperSpec,
)

log = logging.getLogger(__name__)

SPEC_FILE = "freetf_sweep.yaml"  # the spec as run, beside Tune's state; used on resume
STOP_REASON = "freetf/stop_reason"  # written into the Tune result by the stopper
# Sections of the sweep spec; any other top-level --set key goes to the base config.
SWEEP_SECTIONS = ("base_config", "overrides", "space", "search", "boundary", "asha",
                  "stopper", "resources", "mlflow", "storage_path", "report_dir")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SECTION_TYPES = {"search": SearchSpec, "boundary": BoundarySpec, "asha": AshaSpec,
                 "stopper": StopperSpec, "resources": ResourcesSpec, "mlflow": MlflowSweepSpec}


class SweepError(ConfigError):
    """A sweep that cannot run as asked (bad spec, nothing to resume, name taken)."""


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``grid``/``choice`` values or a ``[low, high]`` range."""

    key: str
    kind: str
    values: tuple

    def domain(self, method: str) -> Any:
        from ray import tune  # here: parsing a spec imports no Ray

        if self.kind == "grid":
            return tune.choice(list(self.values)) if method == "optuna" else \
                tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform,
                "randint": tune.randint}[self.kind](low, high)

    def to_dict(self) -> dict[str, list]:
        return {self.kind: list(self.values)}


@dataclass(frozen=True)
class SweepConfig:
    base_config: str | None = None  # a freetf YAML (relative to the sweep file), or None
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys on the base
    space: tuple[Dimension, ...] = ()
    search: SearchSpec = field(default_factory=SearchSpec)
    boundary: BoundarySpec = field(default_factory=BoundarySpec)
    asha: AshaSpec = field(default_factory=AshaSpec)
    stopper: StopperSpec = field(default_factory=StopperSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    mlflow: MlflowSweepSpec = field(default_factory=MlflowSweepSpec)
    storage_path: str = "ray_results"  # Tune state in <storage_path>/<sweep_name>
    report_dir: str = "reports"  # the collapse map in <report_dir>/<sweep_name>

    @property
    def name(self) -> str:
        return self.mlflow.sweep_name

    @property
    def sweep_dir(self) -> Path:
        return Path(self.storage_path) / self.name

    @property
    def train_dir(self) -> Path:
        """Ray Train runs of the trials (their checkpoints), one folder per trial key."""
        return Path(self.storage_path) / f"{self.name}.train"

    @property
    def report_path(self) -> Path:
        return Path(self.report_dir) / self.name

    def trial_runner(self, base: Config) -> str:
        """``in_trial`` or ``train``: ``resources.trial_runner`` with ``auto`` resolved."""
        runner = self.resources.trial_runner
        if runner == "auto":
            single = (base.scaling.num_workers == 1 and not base.scaling.use_gpu
                      and base.scaling.strategy == "ddp")
            return "in_trial" if single else "train"
        return runner

    @property
    def settings(self) -> list[dict[str, Any]]:
        """Boundary search: one dict per combination of the other keys' values."""
        others = [d for d in self.space if d.key != self.boundary.key]
        return [dict(zip([d.key for d in others], combo, strict=True))
                for combo in itertools.product(*[d.values for d in others])]

    @property
    def trial_keys(self) -> tuple[str, ...]:
        """The config keys that make a trial (boundary: plus seed and latent size)."""
        keys = tuple(d.key for d in self.space)
        if self.search.method == "boundary":
            from freetf.sweeps.boundary import trial_keys

            return trial_keys(keys)
        return keys

    @property
    def named_keys(self) -> tuple[str, ...]:
        """The keys whose values tell this sweep's trials apart, which a trial's run name
        shows (:func:`freetf.sweeps.trainable.trial_run_name`): the searched keys with more
        than one value, and the boundary search's seeds (its baselines are named as such)."""
        keys = tuple(d.key for d in self.space if d.kind not in ("grid", "choice")
                     or len(d.values) > 1)
        if self.search.method == "boundary":
            from freetf.sweeps.boundary import SEED_KEY

            return (*keys, SEED_KEY)
        return keys

    @property
    def expected_trials(self) -> int:
        if self.search.method == "boundary":
            from freetf.evaluation.verdicts import changes_baseline

            b = self.boundary
            baselines = {tuple((k, v) for k, v in s.items() if changes_baseline(k))
                         for s in self.settings}
            return b.seeds * (len(baselines) + len(self.settings) * b.probes)
        if self.search.method == "optuna":
            return self.search.num_samples
        return self.search.num_samples * math.prod(
            len(d.values) for d in self.space if d.kind == "grid")

    def base(self) -> Config:
        """The resolved base config every trial starts from (absolute paths)."""
        from freetf.config import load_config
        from freetf.training.paths import absolute_paths

        overrides = dict(self.overrides)
        overrides.update({"scaling.use_ray": True, "tracking.mlflow.enabled": True})
        if self.mlflow.experiment:
            overrides["tracking.mlflow.experiment"] = self.mlflow.experiment
        if self.mlflow.tracking_uri:
            overrides["tracking.mlflow.tracking_uri"] = self.mlflow.tracking_uri
        if self.resources.cpus_per_worker is not None:
            overrides["scaling.cpus_per_worker"] = self.resources.cpus_per_worker
        if self.resources.num_workers is not None:
            overrides["scaling.num_workers"] = self.resources.num_workers
        if self.resources.gpus_per_worker is not None:
            overrides.update({"scaling.use_gpu": True, "training.device": "cuda",
                              "scaling.gpus_per_worker": self.resources.gpus_per_worker})
        return absolute_paths(load_config(self.base_config, overrides))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["space"] = {d.key: d.to_dict() for d in self.space}
        for name in ("search", "boundary", "asha", "stopper", "resources", "mlflow"):
            data[name] = dataclasses.asdict(data[name])
        data["overrides"] = dict(self.overrides)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_sweep(path: str | Path | None = None,
               overrides: list[str] | None = None) -> SweepConfig:
    """Load a sweep YAML (None: defaults) and apply ``--set`` style overrides.

    ``path``: a sweep YAML, or the name of a shipped one (``"search_kl"``,
    ``"search_kl_smoke"``, ``"reproduce_synthetic"``, ``"compare_code"``, ...).

    ``space.<dotted key>=...`` and the keys of :data:`SWEEP_SECTIONS` change the sweep;
    any other key (``training.max_steps=50``) is a base-config override.  Every key of
    the space is checked against the base config; errors name the key.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = config_path(path, "sweep", SweepError)
        raw = read_yaml_mapping(path, "sweep", SweepError)
    raw = _with_overrides(raw, overrides or [])
    unknown = sorted(set(raw) - set(SWEEP_SECTIONS))
    if unknown:
        raise SweepError(f"unknown sweep key {unknown[0]}; known keys: "
                         f"{', '.join(SWEEP_SECTIONS)}")
    base_config = raw.get("base_config")
    if base_config is not None and path is not None and not Path(base_config).is_absolute():
        base_config = str((path.parent / base_config).resolve())
    try:  # the config tree's own schema checks: errors name the dotted key
        sections = {name: build_section(cls, raw.get(name) or {}, name)
                    for name, cls in SECTION_TYPES.items()}
    except ConfigError as err:
        raise SweepError(str(err).replace("config key", "sweep key")) from None
    sweep = SweepConfig(
        base_config=base_config, overrides=_override_dict(raw.get("overrides")),
        space=tuple(_dimension(k, v) for k, v in (raw.get("space") or {}).items()),
        storage_path=str(Path(raw.get("storage_path", "ray_results")).expanduser().resolve()),
        report_dir=str(Path(raw.get("report_dir", "reports")).expanduser().resolve()),
        **sections)
    return _validated(sweep)


def _with_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = {**raw, "space": dict(raw.get("space") or {}),
           "overrides": _override_dict(raw.get("overrides"))}
    for text in overrides:
        key, value = _split_setting(text)
        section, _, rest = key.partition(".")
        if section in ("space", "overrides") and rest:
            raw[section][rest] = value  # their keys are dotted config keys: kept whole
        elif section in SECTION_TYPES and rest:  # an old name in --set replaces the file's
            raw[section] = apply_overrides(raw.get(section) or {}, {rest: value},
                                           SECTION_TYPES[section], section)
        elif section in SWEEP_SECTIONS:
            raw = apply_overrides(raw, {key: value})
        else:
            raw["overrides"][key] = value
    return raw


def _split_setting(text: str) -> tuple[str, Any]:
    try:
        return split_override(text)
    except ConfigError:
        raise SweepError(f"--set {text!r} must look like dotted.key=value") from None


def _override_dict(value: Any) -> dict[str, Any]:
    """``overrides`` as ``{dotted: value}``, from a mapping or a list of ``key=value``."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return flatten(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return dict(_split_setting(v) for v in value)
    raise SweepError(f"overrides={value!r} must be a mapping of dotted keys or a list of "
                     f"'key=value' strings")


def _dimension(key: str, spec: Any) -> Dimension:
    where = f"space.{key}"
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise SweepError(f"{where}={spec!r} must be one of {{grid: [...]}}, {{choice: [...]}}, "
                         f"{{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, "
                         f"{{randint: [lo, hi]}} (or a bare list, a grid)")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise SweepError(f"{where}.{kind}={values!r} must be a non-empty list")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(_is_number(v) for v in values):
            raise SweepError(f"{where}.{kind}={values!r} must be [low, high] with low < high")
        # YAML reads 1e-3 (no dot) as a string: compare the numbers, not the strings
        low, high = (float(v) if isinstance(v, str) else v for v in values)
        if low >= high:
            raise SweepError(f"{where}.{kind}={values!r} must be [low, high] with low < high")
        if kind == "loguniform" and low <= 0:
            raise SweepError(f"{where}.loguniform={values!r} needs low > 0")
        values = [low, high]
    return Dimension(key, kind, tuple(values))


def _is_number(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _validated(sweep: SweepConfig) -> SweepConfig:
    """Check the spec against the base config; errors name the offending key."""
    try:
        base = sweep.base()
    except ConfigError as err:
        raise SweepError(f"base config: {err}") from None
    known = flatten(base.to_dict())
    keys = [d.key for d in sweep.space]
    if not sweep.space:
        raise SweepError("space is empty: give at least one key, e.g. "
                         "space: {training.kl_weight: {grid: [0.1, 1.0]}}")
    for dim in sweep.space:
        if dim.key not in known:
            close = [k for k in known if k.endswith(dim.key.rsplit(".", 1)[-1])]
            hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
            raise SweepError(f"space.{dim.key} is not a config key{hint}")
        probes = dim.values if dim.kind in ("grid", "choice") else dim.values[:2]
        for value in probes:
            try:
                base.replace({dim.key: value})
            except ConfigError as err:
                raise SweepError(f"space.{dim.key}: {err}") from None
        if dim.kind != "grid" and sweep.search.method == "grid":
            raise SweepError(f"space.{dim.key} is a {dim.kind} distribution but "
                             f"search.method=grid; use search.method=random or optuna")
    if "training.free_bits" in keys and "training.free_bits_bits" in keys:
        raise SweepError("space has both training.free_bits (nats) and "
                         "training.free_bits_bits (bits); search one of them")
    if base.training.max_steps is None:
        raise SweepError("the base config needs training.max_steps: ASHA and the stopper "
                         "count optimizer steps")
    search = sweep.search
    if search.num_samples < 1:
        raise SweepError(f"search.num_samples={search.num_samples} must be >= 1")
    if search.method == "grid" and search.num_samples != 1:
        raise SweepError(f"search.num_samples={search.num_samples} would repeat identical "
                         f"grid points; put seeds in the space instead "
                         f"(space: {{training.seed: {{grid: [0, 1, 2]}}}})")
    if search.method == "optuna" and importlib.util.find_spec("optuna") is None:
        raise SweepError("search.method=optuna needs Optuna, which is not installed: "
                         "pip install 'freetf[optuna]' (grid and random need no extras)")
    if sweep.asha.enabled and not 0 < sweep.asha.grace_period < base.training.max_steps:
        raise SweepError(f"asha.grace_period={sweep.asha.grace_period} must be in "
                         f"(0, training.max_steps={base.training.max_steps})")
    if sweep.asha.enabled and sweep.asha.reduction_factor <= 1:
        raise SweepError(f"asha.reduction_factor={sweep.asha.reduction_factor} must be > 1")
    if base.scaling.num_workers < 1:
        # Ray 2.60 refuses ray.train.get_context() in a Tune function, where local mode
        # would run the loop; local mode would also report nothing to Tune.
        raise SweepError("a sweep needs scaling.num_workers >= 1 (resources.num_workers): "
                         "Ray Train's local mode (0) does not run inside a Tune trial")
    if sweep.resources.trial_runner == "in_trial" and base.scaling.num_workers != 1:
        raise SweepError(f"resources.trial_runner=in_trial runs one worker, in the trial "
                         f"process; set resources.num_workers=1 (it is "
                         f"{base.scaling.num_workers}) or resources.trial_runner=train")
    if sweep.resources.trial_runner == "in_trial" and base.scaling.strategy == "fsdp":
        raise SweepError("scaling.strategy=fsdp shards over Ray Train workers; set "
                         "resources.trial_runner=train")
    gpu = sweep.resources.gpus_per_worker
    if gpu is not None and not (gpu > 0 and (gpu <= 1 or float(gpu).is_integer())):
        # Ray schedules a fraction of one GPU, or whole GPUs
        raise SweepError(f"resources.gpus_per_worker={gpu} must be in (0, 1] (a share of one GPU) "
                         f"or a whole number of GPUs")
    if sweep.resources.cpus_per_trial < 0:
        raise SweepError(f"resources.cpus_per_trial={sweep.resources.cpus_per_trial} "
                         f"must be >= 0")
    if not sweep.name or "/" in sweep.name:
        raise SweepError(f"mlflow.sweep_name={sweep.name!r} must be a non-empty name "
                         f"without '/'")
    if search.method == "boundary":
        _check_boundary(sweep, base)
    if "training.free_bits" in keys and base.training.free_bits_bits is not None:
        # free_bits_bits wins over free_bits: clear it, or the searched value is ignored.
        log.info("space searches training.free_bits (nats): clearing the base's "
                 "training.free_bits_bits=%s", base.training.free_bits_bits)
        sweep = dataclasses.replace(
            sweep, overrides={**sweep.overrides, "training.free_bits_bits": None})
    return sweep


def _check_boundary(sweep: SweepConfig, base: Config) -> None:
    b = sweep.boundary
    dims = {d.key: d for d in sweep.space}
    if b.key not in dims:
        raise SweepError(f"search.method=boundary searches boundary.key={b.key} along "
                         f"log2; give its range: space: {{{b.key}: {{loguniform: [lo, hi]}}}}")
    if any(float(v) <= 0 for v in dims[b.key].values) or len(set(dims[b.key].values)) < 2:
        raise SweepError(f"space.{b.key}: the boundary search needs a range of values > 0")
    for dim in sweep.space:
        if dim.key != b.key and dim.kind not in ("grid", "choice"):
            raise SweepError(f"space.{dim.key} is a {dim.kind} distribution; with "
                             f"search.method=boundary the other keys must be grids")
        if dim.key in ("training.seed", "model.latent_dim"):
            raise SweepError(f"space.{dim.key}: the boundary search sets it (boundary.seeds, "
                             f"baselines with model.latent_dim=0); remove it from the space")
    if b.seeds < 2:
        raise SweepError(f"boundary.seeds={b.seeds} must be >= 2: one seed per probe "
                         f"cannot tell a boundary from a seed's own learning event")
    if b.at:
        _check_at(b, dims[b.key].values)
    elif not 2 <= b.initial <= b.probes:
        raise SweepError(f"boundary.initial={b.initial} must be in [2, boundary.probes="
                         f"{b.probes}]")
    if not 0 < b.confidence < 1:
        raise SweepError(f"boundary.confidence={b.confidence} must be in (0, 1)")
    from freetf.evaluation.verdicts import KINDS, REGIME_ONSETS

    known = (*KINDS, *REGIME_ONSETS)
    if not b.targets or len(set(b.targets)) != len(b.targets) or set(b.targets) - set(known):
        raise SweepError(f"boundary.targets={b.targets}: one or more of {', '.join(known)}, "
                         f"each once")
    if sweep.asha.enabled:
        raise SweepError("search.method=boundary needs every probe to the end: set "
                         "asha.enabled=false")
    if not base.model.has_latent:
        raise SweepError("search.method=boundary needs a Free Transformer: the base config "
                         "has model.latent_dim=0")


def _check_at(b, bounds) -> None:
    """``boundary.at``: >= 2 distinct values inside the key's range, at most ``probes``."""
    low, high = min(float(v) for v in bounds), max(float(v) for v in bounds)
    values = [float(v) for v in b.at]
    if len(set(values)) != len(values) or not 2 <= len(values) <= b.probes:
        raise SweepError(f"boundary.at={b.at}: 2 to boundary.probes={b.probes} distinct values")
    outside = [v for v in values if not low <= v <= high]
    if outside:
        raise SweepError(f"boundary.at: {', '.join(f'{v:g}' for v in outside)} outside the "
                         f"range [{low:g}, {high:g}] of space.{b.key}")
