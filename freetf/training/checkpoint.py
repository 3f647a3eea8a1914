"""Atomic, self-describing checkpoints.

A checkpoint is a directory::

    step_000100/
      state.pt      model, optimizer, scheduler, data position, step, and every
                    rank's CPU and CUDA RNG states
      config.yaml   the resolved config: generate/eval rebuild the model from it alone
      meta.json     step and metrics, readable without torch
      tokenizer.json  (data from ``freetf prepare`` with a BPE or file tokenizer) the
                    tokenizer, and data_meta.json the data's meta.json: generation needs
                    no data folder

With ``scaling.strategy=fsdp`` the model and optimizer live in DCP shards beside these
files instead (:mod:`freetf.training.sharded_checkpoint`); loading consolidates them.

It is written into a temporary sibling and renamed into place, so a crash mid-save
never leaves a broken checkpoint; the ``latest`` pointer file of a checkpoint root is
replaced atomically too.  A write that fails (a full disk) is a
:class:`CheckpointWriteError` naming the checkpoint and the cause.  A checkpoint copied
in part (Ray's copy into ``scaling.storage_path`` cut short) is refused when loaded, and
a root without ``latest`` (Ray Train's ``storage_path/<run>``) resolves to its newest
complete checkpoint (:func:`resolve_checkpoint`).  Loading uses
``torch.load(..., weights_only=True)``: data, never code.  The same directory is what
Ray Train uploads as a ``ray.train.Checkpoint``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from freetf.config import Config, ConfigError, load_config
from freetf.training.checkpoint_files import (  # noqa: F401 - the file names: public API
    CONFIG_FILE,
    DATA_META_FILE,
    LATEST_FILE,
    META_FILE,
    SHARDS_DIR,
    STATE_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    CheckpointWriteError,
    incomplete_reason,
    is_sharded,
    publish,
    replace_dir,
    step_folders,
    write_failure,
    write_files,
)
from freetf.training.sharded_checkpoint import consolidated_model_state

log = logging.getLogger(__name__)



def write_checkpoint(directory: str | Path, state: dict[str, Any], config: Config,
                     meta: dict[str, Any] | None = None) -> Path:
    """Write ``state`` + resolved ``config`` into ``directory`` atomically."""
    directory = Path(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    except OSError as err:
        raise CheckpointWriteError(directory, write_failure(err)) from err
    try:
        write_files(tmp, state, config, meta)
        replace_dir(tmp, directory)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = write_failure(err) if isinstance(err, Exception) else None
        if cause is None:
            raise
        raise CheckpointWriteError(directory, cause) from err
    return directory


def load_tokenizer(path: str | Path, config: Config):
    """The tokenizer a checkpoint's model was trained with: its own tokenizer.json, else
    the one its config's data describes (:func:`freetf.data.datasets.build_tokenizer`).

    Raises :class:`CheckpointError` when neither is there: a checkpoint without
    tokenizer.json whose prepared data folder is gone (its vocabulary is not bytes).
    """
    from freetf.data.datasets import build_tokenizer, prepared_folder
    from freetf.data.tokenization import BPETokenizer

    path = resolve_checkpoint(path)
    if (path / TOKENIZER_FILE).is_file():
        return BPETokenizer.from_file(path / TOKENIZER_FILE)
    data = config.data
    if (data.dataset_name == "tokens" and data.path and prepared_folder(config) is None
            and not Path(data.path).is_file() and config.model.vocab_size > 256):
        raise CheckpointError(f"{path} holds no {TOKENIZER_FILE} and its data.path "
                              f"{data.path} is missing: restore the prepared folder (its "
                              f"tokenizer.json decodes the model's "
                              f"{config.model.vocab_size} tokens)")
    return build_tokenizer(config)


def save_to_root(root: str | Path, step: int, state: dict[str, Any], config: Config,
                 meta: dict[str, Any] | None = None, keep: int = 3) -> Path:
    """Save ``root/step_NNNNNN``, point ``root/latest`` at it, keep the newest ``keep``."""
    root = Path(root)
    path = write_checkpoint(root / f"step_{step:06d}", state, config, meta)
    try:
        publish(root, path, keep)
    except OSError as err:
        raise CheckpointWriteError(root / LATEST_FILE, write_failure(err)) from err
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a root, -> the checkpoint directory, if it is whole.

    A root holding ``latest`` resolves to the checkpoint it names; a root without it
    (Ray Train's ``storage_path/<run>``) to its newest complete ``step_*`` checkpoint.
    An incomplete checkpoint is refused, naming the newest complete one beside it.
    """
    path = Path(path)
    if (path / LATEST_FILE).is_file():
        path = path / (path / LATEST_FILE).read_text().strip()
    elif path.is_dir() and not _has_checkpoint_files(path) and step_folders(path):
        newest = newest_complete(path)
        if newest is None:
            names = ", ".join(p.name for p in step_folders(path))
            raise CheckpointError(f"{path} holds no complete checkpoint (its {names} are "
                                  f"incomplete)")
        path = newest
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not _has_checkpoint_files(path):
        raise CheckpointError(f"{path} is not a freetf checkpoint (needs {STATE_FILE} "
                              f"and {CONFIG_FILE})")
    reason = incomplete_reason(path)
    if reason is not None:
        other = newest_complete(path.parent)
        raise CheckpointError(
            f"{path} is incomplete ({reason}: a write or copy that did not finish); "
            + (f"the newest complete checkpoint beside it is {other}" if other is not None
               else "there is no complete checkpoint beside it"))
    return path


def newest_complete(root: Path) -> Path | None:
    """The ``step_*`` checkpoint of ``root`` with the highest step that is whole."""
    return next((p for p in reversed(step_folders(root)) if incomplete_reason(p) is None), None)


def _has_checkpoint_files(path: Path) -> bool:
    return any((path / name).exists() for name in (STATE_FILE, CONFIG_FILE, META_FILE))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    consolidate: bool = True) -> tuple[dict[str, Any], Config]:
    """Load ``(state, config)`` from a checkpoint directory or root.

    A sharded checkpoint (``scaling.strategy=fsdp``) keeps its weights in DCP shards:
    ``consolidate`` reads them into ``state["model"]`` (full tensors, in this process);
    its optimizer state is only read when resuming (``sharded_checkpoint.load_sharded``).
    """
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read {path / STATE_FILE}: {_load_failure(err)}") from None
    try:
        config = load_config(path / CONFIG_FILE)
    except ConfigError as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: {err}") from None
    if consolidate and is_sharded(path) and "model" not in state:
        state["model"] = _consolidated_weights(path, config)
    return state, config


def _consolidated_weights(path: Path, config: Config) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint import CheckpointException

    from freetf.model.transformer import FreeTransformer

    try:
        return consolidated_model_state(path, FreeTransformer(config.model))
    # DCP raises many types for missing or mismatched shards; its own CheckpointException
    # is a BaseException whose text is its ranks and their tracebacks: the error of the
    # first rank says what went wrong (``failures``: rank -> (error, traceback))
    except (Exception, CheckpointException) as err:
        failure = next(iter(getattr(err, "failures", {}).values()), err)
        err = failure[0] if isinstance(failure, tuple) else failure
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read the model shards of {path / SHARDS_DIR}: "
                              f"{first}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the model of a checkpoint from its own config.  -> (model, config, state)."""
    from freetf.model.transformer import FreeTransformer

    state, config = load_checkpoint(path)
    model = FreeTransformer(config.model)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: model weights do not match its config: {err}") from None
    return model.to(device).eval(), config, state


def _load_failure(err: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, without torch's advice to retry
    with ``weights_only=False``: that would run whatever code the file holds."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker not in text:
        return text.strip().splitlines()[0] if text.strip() else type(err).__name__
    detail = text.split(marker, 1)[1].strip().split("\n")[0]
    detail = detail.split(" Please use")[0].strip().rstrip(".")
    if "GLOBAL" in detail:
        return (f"it holds objects that are not tensors or plain data ({detail}); freetf "
                f"loads checkpoints as data only and never runs code stored in them")
    return f"the file is damaged or not a freetf checkpoint ({detail})"


def rng_states(device: torch.device) -> dict[str, torch.Tensor | None]:
    """This process's RNG states: CPU, and the CUDA generator of ``device`` if on CUDA."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def restore_rng_states(saved: list[dict[str, Any]] | torch.Tensor, rank: int,
                       device: torch.device) -> None:
    """Restore rank ``rank``'s states from the per-rank list :func:`rng_states` built.

    A checkpoint from a run with fewer ranks, or from before per-rank states (one CPU
    state, rank 0's), leaves the other ranks with their freshly seeded generators.
    """
    if isinstance(saved, torch.Tensor):
        saved = [{"cpu": saved, "cuda": None}]
    if rank >= len(saved):
        log.warning("the checkpoint holds RNG states of %d rank(s); rank %d keeps its "
                    "seeded generators", len(saved), rank)
        return
    mine = saved[rank]
    torch.set_rng_state(mine["cpu"])
    if mine.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)
