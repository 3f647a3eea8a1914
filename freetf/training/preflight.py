"""Checks run before the first training step, so that a run fails in seconds, not after.

``check_before_training(cfg)`` looks at every place the run will write (the checkpoint
folder in-process, ``scaling.storage_path`` under Ray, the MLflow store when it is a
local file, TensorBoard's log dir) and at the data: a prepared folder's files against its
meta.json, and the model's vocabulary against the data (``check_data``).  It
writes nothing: a folder that does not exist yet passes when its nearest existing parent
is a folder the run may write in.  Each problem is one line naming the key and the fix.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from freetf.config import Config, ConfigError
from freetf.files import unwritable


def check_before_training(cfg: Config) -> None:
    """Raise :class:`ConfigError` listing every output location the run cannot write."""
    problems = output_problems(cfg)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("the run cannot write where it would:\n  " + "\n  ".join(problems))
    from freetf.data.datasets import check_data

    check_data(cfg)


def output_problems(cfg: Config) -> list[str]:
    """One line per output location of ``cfg`` that cannot be written."""
    places: list[tuple[str, Path, bool]] = []  # (what, path, is_file)
    if cfg.scaling.use_ray:
        if "://" not in cfg.scaling.storage_path:  # remote storage is Ray's to check
            places.append((f"scaling.storage_path={cfg.scaling.storage_path}",
                           Path(cfg.scaling.storage_path), False))
    else:
        places.append((f"checkpoint.dir={cfg.checkpoint.dir}", Path(cfg.checkpoint.dir), False))
    if cfg.tracking.mlflow.enabled:
        store = _local_mlflow_store(cfg)
        if store is not None:
            places.append(store)
    if cfg.tracking.tensorboard.enabled:
        places.append((f"tracking.tensorboard.log_dir={cfg.tracking.tensorboard.log_dir}",
                       Path(cfg.tracking.tensorboard.log_dir), False))
    problems = []
    for what, path, is_file in places:
        why = unwritable(path, is_file)
        if why:
            problems.append(f"{what}: {why}")
    return problems


def _local_mlflow_store(cfg: Config) -> tuple[str, Path, bool] | None:
    """The MLflow store's local path (sqlite file or file-store folder), or None."""
    from freetf.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg)
    what = f"the MLflow store {uri} (tracking.mlflow.tracking_uri or MLFLOW_TRACKING_URI)"
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        if db and db != ":memory:":
            return what, Path(db), True
    elif urlparse(uri).scheme == "file":
        return what, Path(urlparse(uri).path), False
    return None
