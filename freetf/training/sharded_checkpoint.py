"""Sharded checkpoints (``scaling.strategy=fsdp``) through ``torch.distributed.checkpoint``.

A sharded checkpoint is the directory of :mod:`freetf.training.checkpoint` with the
model and optimizer moved out of ``state.pt`` into DCP shards::

    step_000100/
      state.pt      scheduler, data position, step, every rank's RNG states (no weights)
      shards/       DCP: .metadata + one __<rank>_0.distcp per rank, each holding that
                    rank's shards of the model and of AdamW's state (no gather on rank 0)
      config.yaml   the resolved config
      meta.json     step, metrics and "format": "sharded"

Every rank writes its own shards.  Under Ray Train each rank writes into its own local
folder and reports it with the same name: Ray merges them into one checkpoint in
``storage_path``.  Loading reshards: a checkpoint written by N ranks resumes on M ranks
(FSDP or not), and :func:`consolidated_model_state` reads the full weights in one
process with no process group (``freetf generate`` / ``eval``).
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from freetf.config import Config
from freetf.training.checkpoint_files import (
    SHARDS_DIR,
    CheckpointWriteError,
    attempt,
    publish,
    replace_dir,
    write_failure,
    write_files,
)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _model_and_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer
                         ) -> dict[str, Any]:
    """The DCP state: parameter names (FQNs) as keys, this rank's shards as values."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {"model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded(root: str | Path, step: int, model: nn.Module,
                 optimizer: torch.optim.Optimizer, state: dict[str, Any], config: Config,
                 meta: dict[str, Any], rank: int, keep: int = 3) -> Path:
    """Write ``root/step_NNNNNN`` from every rank (a collective).  -> its path, on every rank.

    ``state``: the rest of the training state (scheduler, data, step, RNG), written by
    rank 0.  The shards are written into a temporary sibling renamed into place once all
    ranks are done, so a crash mid-save leaves no half checkpoint; ``meta.json`` lists
    every rank's shard files with their sizes.  ``root`` may be shared by the ranks or
    each rank's own (Ray Train: a local folder per worker).  A failed write (a full
    disk) raises :class:`~freetf.training.checkpoint.CheckpointWriteError` on every rank.
    """
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.partial"
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    try:
        dcp.save(_model_and_optimizer(model, optimizer), checkpoint_id=tmp / SHARDS_DIR)
    except BaseException as err:  # DCP raises on every rank when one rank's write fails
        _fail_together([_dcp_failure(err)], err, final, tmp)
    written = _gathered_sizes(tmp / SHARDS_DIR)
    cause = (attempt(write_files, tmp, state, config, {**meta, "format": "sharded"}, written)
             if rank == 0 else None)  # state.pt, config.yaml and meta.json beside the shards
    _fail_together(_gather(cause), None, final, tmp)
    cause = attempt(_publish, root, tmp, final, keep) if rank == 0 else None
    _fail_together(_gather(cause), None, final, tmp)
    if tmp.exists():  # a root of this rank's own: its shards are still in tmp
        replace_dir(tmp, final)
    return final


def _publish(root: Path, tmp: Path, final: Path, keep: int) -> None:
    replace_dir(tmp, final)
    publish(root, final, keep)


def _dcp_failure(err: BaseException) -> str | None:
    """The I/O cause inside DCP's CheckpointException (its ``failures``: rank -> error)."""
    for failure in getattr(err, "failures", {}).values():
        cause = write_failure(failure[0] if isinstance(failure, tuple) else failure)
        if cause is not None:
            return cause
    return write_failure(err) if isinstance(err, Exception) else None


def _fail_together(causes: list[str | None], err: BaseException | None, final: Path,
                   tmp: Path) -> None:
    """Raise CheckpointWriteError if any rank's cause is set (every rank sees the same
    list); re-raise ``err`` if it was not an I/O failure."""
    cause = next((c for c in causes if c is not None), None)
    if cause is None:
        if err is not None:
            raise err
        return
    shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointWriteError(final, cause) from err


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (just ``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _gathered_sizes(shards: Path) -> dict[str, int]:
    """Every rank's shard files (``shards/<name>`` -> size): a rank sees its own only
    when the ranks do not share ``root``."""
    mine = {f"{SHARDS_DIR}/{p.name}": p.stat().st_size for p in shards.iterdir() if p.is_file()}
    return {name: size for sizes in _gather(mine) for name, size in sizes.items()}


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer into ``model`` / ``optimizer``.

    Any world size and any model: FSDP-sharded (each rank reads the pieces of its
    shards) or plain (each process reads the full tensors; no process group needed).
    Every rank of a process group must call it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    target = _model_and_optimizer(model, optimizer)
    in_group = dist.is_available() and dist.is_initialized()
    with _single_process_load():
        dcp.load(target, checkpoint_id=Path(path) / SHARDS_DIR, no_dist=not in_group)
    set_model_state_dict(model, target["model"])
    set_optimizer_state_dict(model, optimizer, target["optimizer"])


def load_full_into_sharded(state: dict[str, Any], model: nn.Module,
                           optimizer: torch.optim.Optimizer) -> None:
    """Load a full (``scaling.strategy=ddp``) checkpoint's state into an FSDP model.

    Every rank read the whole file; each keeps its shards.  The optimizer state of a full
    checkpoint is keyed by parameter position in the optimizer's groups, which the
    sharded model's optimizer has in the same order (same model, same groups): the
    positions are renamed to parameter names for ``set_optimizer_state_dict``.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=full)
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = state["optimizer"]
    by_name = {"state": {order[i]: value for i, value in saved["state"].items()},
               "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=full)


def consolidated_model_state(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded checkpoint, read in this process alone.

    ``model``: a plain (unsharded) model of the checkpoint's config, whose state dict
    gives the names and shapes to read.  Only the model's shards are read, never the
    optimizer's.
    """
    import torch.distributed.checkpoint as dcp

    target = {"model": model.state_dict()}
    with _single_process_load():
        dcp.load(target, checkpoint_id=Path(path) / SHARDS_DIR, no_dist=True)
    return target["model"]


@contextlib.contextmanager
def _single_process_load() -> Iterator[None]:
    """DCP warns at every load without a process group, even when asked for one
    (no_dist=True): that is the intent here, not news for the console."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
