"""A run's folder, decided before Ray or any worker starts: which one, and whether the
run continues what is in it.

A training run writes its checkpoints into one folder: ``scaling.storage_path/<run name>``
under Ray (Ray Train restores the latest checkpoint it finds there), ``checkpoint.dir``
in-process.  ``freetf train --config configs/<name>.yaml`` names its run after the file
(``tiny``, ``synthetic``; ``freetf`` without a config), so each config has its own
folder.  :func:`plan_run` then looks in the folder:

- empty or missing: a new run;
- checkpoints of the same model (:func:`model_differences`: the model section, the data
  and the tokenizer): the run continues from the latest one, under Ray and in-process
  alike; one that reached ``training.max_steps`` is refused (nothing is left to train);
- checkpoints of another model: refused, in one line naming the folder and the two ways
  out, ``--fresh`` or a folder of its own (``--set scaling.run_name=NAME``, in-process
  ``--set checkpoint.dir=DIR``).

An explicit ``--resume`` checkpoint is held to the same model check, and refused when the
folder holds checkpoints of its own (Ray Train would continue from those instead).

``--fresh`` moves and deletes nothing: the run starts in the first unused folder beside
the old one (``tiny-2``, ``tiny-3`` ...), so every checkpoint path printed or logged to
MLflow before stays valid.  Nothing here imports Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freetf.config import Config, ConfigError, load_config
from freetf.training.checkpoint import CheckpointError, resolve_checkpoint
from freetf.training.checkpoint_files import (
    CONFIG_FILE,
    LATEST_FILE,
    META_FILE,
    TOKENIZER_FILE,
    step_folders,
)
from freetf.training.paths import OWN_FOLDER, absolute_paths, run_directory
from freetf.training.preflight import check_before_training

DEFAULT_RUN_NAME = "freetf"

# Model keys that say how the weights were initialised or how a result is computed, not
# which model they are: a checkpoint continues under other values.
NOT_THE_MODEL = {"init_std", "post_sampler_init", "post_sampler_init_std", "readout_init_std",
                 "mapper_impl", "mapper_chunk_size", "mapper_score_precision"}
NOT_THE_DATA = {"num_workers"}  # how the data is loaded
SHOWN_DIFFERENCES = 3


class RunFolderError(CheckpointError):
    """A run folder (or --resume checkpoint) the run must not continue."""


@dataclass(frozen=True)
class RunPlan:
    """What a launch needs: the config (absolute paths, its folder), the folder, and the
    checkpoint it continues (``--resume``, else the folder's latest; None: a new run)."""

    cfg: Config
    folder: Path
    resume: str | None
    start_step: int
    fresh: bool = False


def default_run_name(config_path: str | Path | None) -> str:
    """The run's name when the config gives none: the config file's stem."""
    return Path(config_path).stem if config_path else DEFAULT_RUN_NAME


def with_default_run_name(cfg: Config, config_path: str | Path | None) -> Config:
    """``cfg`` with ``scaling.run_name`` set from the config file, unless the config names
    the run (``scaling.run_name`` or ``tracking.mlflow.run_name``)."""
    if cfg.scaling.run_name or cfg.tracking.mlflow.run_name:
        return cfg
    return cfg.replace({"scaling.run_name": default_run_name(config_path)})


def run_folder(cfg: Config) -> Path:
    """Where the run keeps its checkpoints."""
    if cfg.scaling.use_ray:
        return run_directory(cfg)
    return Path(cfg.checkpoint.dir).expanduser().resolve()


def plan_run(cfg: Config, resume: str | None = None, fresh: bool = False) -> RunPlan:
    """Resolve paths, check every output and the data (:mod:`~freetf.training.preflight`),
    then decide the folder and what the run continues (the module's rules).  Raises
    :class:`RunFolderError` (a :class:`CheckpointError`) or ``ConfigError``.

    ``resume``: a checkpoint (or checkpoint root) to start from; :data:`OWN_FOLDER`
    (``--resume`` without a path, as a sweep's ``--resume``): continue the run in its own
    folder, and say so if there is nothing there to continue."""
    own = resume is OWN_FOLDER
    if own:
        if fresh:
            raise RunFolderError("--resume continues the run in its folder and --fresh starts "
                                 "one in a new folder: give one of them")
        resume = None
    if resume is not None:
        try:
            resume = str(resolve_checkpoint(resume).resolve())
        except CheckpointError as err:
            raise CheckpointError(f"--resume: {err}") from None
    cfg = absolute_paths(cfg)
    check_before_training(cfg)  # every output location and the vocabulary, before any step
    if fresh:
        cfg = _unused_folder(cfg)
    folder = run_folder(cfg)
    if resume is not None:
        differences = model_differences(_saved_config(Path(resume)), cfg, Path(resume))
        if differences:
            raise RunFolderError(f"--resume: {shown_path(resume)} holds a checkpoint of another "
                                 f"model ({_listed(differences)}); resume it with its own "
                                 f"config, or leave out --resume")
    latest = latest_checkpoint(folder)
    if latest is not None:
        differences = model_differences(_saved_config(latest), cfg, latest)
        if differences:
            raise RunFolderError(f"{shown_path(folder)} holds checkpoints of another model "
                                 f"({_listed(differences)}): start afresh in a new folder "
                                 f"beside it with --fresh, or give this run its own with "
                                 f"{_own_folder_flag(cfg)}")
        if resume is not None and Path(resume) != latest.resolve():
            # Ray Train would restore the folder's own latest, ignoring --resume; in-process
            # the two runs' step folders would mix
            raise RunFolderError(f"--resume: the run's folder {shown_path(folder)} holds its "
                                 f"own checkpoints (latest: step {checkpoint_step(latest)}): "
                                 f"continue from there without --resume, or start from "
                                 f"{shown_path(resume)} in a new folder with --fresh")
    if own and latest is None:
        raise RunFolderError(f"--resume: nothing to continue in {shown_path(folder)} (no "
                             f"complete checkpoint there): leave out --resume to start the "
                             f"run, or name the checkpoint to start from: --resume PATH")
    start = resume or (str(latest) if latest is not None else None)
    step = checkpoint_step(Path(start)) if start else 0
    max_steps = cfg.training.max_steps
    if start and max_steps and step >= max_steps:
        where = f"--resume {shown_path(start)}" if resume else shown_path(folder)
        raise RunFolderError(f"{where} holds a finished run (step {step} of "
                             f"training.max_steps={max_steps}): train it further with a "
                             f"larger --max-steps, or start afresh with --fresh")
    return RunPlan(cfg, folder, start, step, fresh)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint in a run folder: the one ``latest`` names (in-process, Ray
    Train's local mode), else the highest ``step_*`` holding a config (Ray Train's)."""
    if (folder / LATEST_FILE).is_file():
        try:
            return resolve_checkpoint(folder)
        except CheckpointError:
            pass  # a dangling pointer: look at the step folders
    steps = [p for p in step_folders(folder) if (p / CONFIG_FILE).is_file()]
    return steps[-1] if steps else None


def checkpoint_step(path: Path) -> int:
    """A checkpoint's step, from its meta.json (else its folder's name)."""
    try:
        return int(json.loads((path / META_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        digits = path.name.rpartition("_")[2]
        return int(digits) if digits.isdigit() else 0


def model_differences(saved: Config, cfg: Config, checkpoint: Path | None = None) -> list[str]:
    """How ``cfg``'s model differs from a checkpoint's: ``"model.hidden_dim 32, here 128"``
    for each model or data key (but :data:`NOT_THE_MODEL`, :data:`NOT_THE_DATA`), and the
    tokenizer when ``checkpoint`` holds one that the prepared data no longer has."""
    differences = []
    for section, ignored in (("model", NOT_THE_MODEL), ("data", NOT_THE_DATA)):
        old, new = saved.to_dict()[section], cfg.to_dict()[section]
        differences += [f"{section}.{key} {old.get(key)}, here {new.get(key)}"
                        for key in new if key not in ignored and old.get(key) != new.get(key)]
    if checkpoint is not None and not differences and _tokenizer_changed(cfg, checkpoint):
        differences.append(f"the tokenizer (data.path {cfg.data.path} holds another "
                           f"{TOKENIZER_FILE})")
    return differences


def _tokenizer_changed(cfg: Config, checkpoint: Path) -> bool:
    """Does the prepared data's tokenizer file differ from the one the checkpoint keeps?
    (A checkpoint that keeps none, from before they did, cannot tell: no.)"""
    from freetf.data.datasets import prepared_folder
    from freetf.data.token_files import read_meta

    kept = checkpoint / TOKENIZER_FILE
    if not kept.is_file():
        return False
    folder = prepared_folder(cfg)
    name = read_meta(folder).get("tokenizer", {}).get("file") if folder is not None else None
    current = folder / name if name else None
    return current is None or not current.is_file() or current.read_bytes() != kept.read_bytes()


def _saved_config(checkpoint: Path) -> Config:
    try:
        return load_config(checkpoint / CONFIG_FILE)
    except ConfigError as err:
        raise RunFolderError(f"{shown_path(checkpoint / CONFIG_FILE)}: {err}") from None


def _unused_folder(cfg: Config) -> Config:
    """``cfg`` moved to the first folder beside its own that no run has used."""
    folder = run_folder(cfg)
    candidate, n = folder, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")
    if candidate == folder:
        return cfg
    if cfg.scaling.use_ray:
        return cfg.replace({"scaling.run_name": candidate.name})
    return cfg.replace({"checkpoint.dir": str(candidate)})


def _own_folder_flag(cfg: Config) -> str:
    return "--set scaling.run_name=NAME" if cfg.scaling.use_ray else "--set checkpoint.dir=DIR"


def _listed(differences: list[str]) -> str:
    shown = "; ".join(differences[:SHOWN_DIFFERENCES])
    more = len(differences) - SHOWN_DIFFERENCES
    return shown + (f"; {more} more" if more > 0 else "")


def shown_path(path: Any) -> str:
    """A path as the user reads it: relative to the current folder when inside it."""
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
