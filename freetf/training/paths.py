"""A run's paths made absolute before it is launched: Ray's workers chdir into the session
folder, so every relative path of the config is resolved in the launching process (no Ray
here: parsing a sweep spec uses it too); and the Ray Train run's name and folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from freetf.config import Config


class _OwnFolder:
    def __repr__(self) -> str:
        return "OWN_FOLDER"


# a run's resume: its own folder (``--resume`` without a path; not a string, which
# argparse would pass through the flag's type, and no path can be mistaken for it)
OWN_FOLDER: Any = _OwnFolder()


def absolute_paths(cfg: Config) -> Config:
    """Resolve every relative path and the tracking URI before workers chdir away."""
    from freetf.tracking import resolve_tracking_uri

    overrides: dict[str, Any] = {
        "checkpoint.dir": str(Path(cfg.checkpoint.dir).expanduser().resolve()),
        "scaling.storage_path": absolute_storage(cfg.scaling.storage_path),
    }
    if cfg.tracking.mlflow.enabled:
        overrides["tracking.mlflow.tracking_uri"] = resolve_tracking_uri(cfg)
    if cfg.data.path:
        overrides["data.path"] = str(Path(cfg.data.path).expanduser().resolve())
    if cfg.tracking.tensorboard.enabled:
        overrides["tracking.tensorboard.log_dir"] = str(
            Path(cfg.tracking.tensorboard.log_dir).expanduser().resolve())
    return cfg.replace(overrides)


def absolute_storage(path: str) -> str:
    """Workers chdir into the Ray session folder: resolve local paths before launch."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def run_name(cfg: Config) -> str:
    """The Ray Train run's name: its folder under ``scaling.storage_path``."""
    return cfg.scaling.run_name or cfg.tracking.mlflow.run_name or "freetf"


def run_directory(cfg: Config) -> Path:
    """``storage_path/<run name>``: where a (local) Ray Train run keeps its checkpoints."""
    return Path(absolute_storage(cfg.scaling.storage_path)) / run_name(cfg)
