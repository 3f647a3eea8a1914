"""One typed config tree for freetf, loaded from YAML, with dotted overrides.

The schema accepts the training guide's YAML as printed (``model``, ``training``,
``optimizer``, ``scheduler``, ``data``) plus the sections freetf adds (annealing,
curriculum, checkpointing, tracking, Ray scaling, diagnostics).

Every error names the key's full dotted path and the offending value.  Configs are
frozen after loading: derived values are properties, never mutations.

Units: ``training.free_bits`` is in **nats per token** (the guide's unit);
``training.free_bits_bits`` is the same threshold in bits and, when set, wins.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from freetf.config.schema import (
    DATA_VOCAB_SIZES,
    LN2,
    MAX_EXACT_LATENT_BITS,
    CheckpointConfig,
    Config,
    CurriculumPhase,
    DataConfig,
    DiagnosticsConfig,
    FreeBitsScheduleConfig,
    KLAnnealingConfig,
    MlflowConfig,
    ModelConfig,
    OptimizerConfig,
    ScalingConfig,
    SchedulerConfig,
    TensorBoardConfig,
    TrackingConfig,
    TrainingConfig,
    WandbConfig,
)
from freetf.config.shipped import config_path, shipped_configs, shipped_dir
from freetf.config.tree import (
    ConfigError,
    apply_overrides,
    build_section,
    flatten,
    read_yaml_mapping,
    split_override,
)

__all__ = [
    "DATA_VOCAB_SIZES", "LN2", "MAX_EXACT_LATENT_BITS", "CheckpointConfig", "Config",
    "ConfigError", "CurriculumPhase", "DataConfig", "DiagnosticsConfig",
    "FreeBitsScheduleConfig", "KLAnnealingConfig", "MlflowConfig", "ModelConfig",
    "OptimizerConfig", "ScalingConfig", "SchedulerConfig", "TensorBoardConfig",
    "TrackingConfig", "TrainingConfig", "WandbConfig", "apply_overrides", "build_section",
    "config_path", "flatten", "from_dict", "load_config", "read_yaml_mapping",
    "shipped_configs", "shipped_dir", "split_override",
]


def load_config(path: str | Path | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a YAML config (None = defaults) and apply ``dotted.key=value`` overrides.

    ``path``: a YAML file, or the name of a shipped config (``"synthetic"``; see
    :func:`freetf.config.shipped.config_path`)."""
    data = read_yaml_mapping(config_path(path)) if path is not None else {}
    return from_dict(apply_overrides(data, overrides or [], Config))


def from_dict(data: dict[str, Any]) -> Config:
    config = build_section(Config, _default_vocab_from_data(data), "")
    config.validate()
    return config


def _default_vocab_from_data(data: Any) -> Any:
    """Fill in ``model.vocab_size`` from ``data.dataset_name`` when the config leaves it out."""
    if not isinstance(data, dict):
        return data  # build_section names the problem
    model = data.get("model", {})
    section = data.get("data", {})
    if not isinstance(model, dict) or "vocab_size" in model or not isinstance(section, dict):
        return data
    vocab = DATA_VOCAB_SIZES.get(section.get("dataset_name", DataConfig.dataset_name))
    meta = Path(str(section.get("path"))) / "meta.json"  # a folder made by freetf prepare
    if section.get("dataset_name") == "tokens" and section.get("path") and meta.is_file():
        try:
            found = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # damaged: the data check names it before training
            found = None
        size = found.get("vocab_size") if isinstance(found, dict) else None
        if type(size) is int and size >= 1:
            vocab = size
    if vocab is None:
        return data  # an unknown dataset_name: build_section names it
    return {**data, "model": {**model, "vocab_size": vocab}}
