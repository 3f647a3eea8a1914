"""The training loop's checkpoints: the full training state saved at a step, and the
resume from it (:func:`freetf.training.loop.train_loop` calls both; nothing here imports
Ray).  The state is the model and optimizer (full, or every rank's DCP shards under
FSDP), the learning-rate schedule, the data position and every rank's RNG states."""

from __future__ import annotations

import logging
from pathlib import Path

from freetf.training.checkpoint import (
    CheckpointWriteError,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_states,
    rng_states,
    save_to_root,
)
from freetf.training.checkpoint_files import is_sharded
from freetf.training.parallel import is_fsdp
from freetf.training.schedules import load_lr_scheduler_state
from freetf.training.sharded_checkpoint import (
    load_full_into_sharded,
    load_sharded,
    save_sharded,
)

log = logging.getLogger(__name__)


def save_state(ctx, cfg, model, optimizer, scheduler, stream, step, metrics, device,
               last_good: Path | None = None) -> Path | None:
    """Save the training state after ``step`` under ``ctx.checkpoint_root(cfg)`` (a
    collective: every rank calls it).  -> the checkpoint, on rank 0 (and every rank
    under FSDP); None on the other ranks of a full checkpoint.

    A failed write raises :class:`CheckpointWriteError` on every rank, naming
    ``last_good`` (the run's newest whole checkpoint) as the one to continue from.
    """
    rng = ctx.all_gather(rng_states(device))  # every rank's generators, in rank order
    state = {"scheduler": scheduler.state_dict(), "step": step, "data": stream.state_dict(),
             "rng": rng}
    path, error = None, None
    try:
        if is_fsdp(model):  # every rank writes its shards of the model and optimizer
            path = save_sharded(ctx.checkpoint_root(cfg), step, model, optimizer, state, cfg,
                                {"step": step, **metrics}, ctx.rank, keep=cfg.checkpoint.keep)
        else:
            state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
            if ctx.is_main:
                path = save_to_root(ctx.checkpoint_root(cfg), step, state, cfg,
                                    {"step": step, **metrics}, keep=cfg.checkpoint.keep)
    except CheckpointWriteError as err:
        error = err
    if not is_fsdp(model):  # rank 0 wrote alone: the others stop with it (FSDP's agree)
        error = ctx.from_main(error)
    if error is not None:
        error.last_good = error.last_good or last_good
        raise error
    if ctx.is_main:
        log.info("checkpoint: %s", path)
    return path


def resume_state(ctx, model, optimizer, scheduler, stream, device) -> tuple[int, Path | None]:
    """Load ``ctx.latest_checkpoint()``, if any, into the training state.  -> its step
    (0 for a fresh start) and its path."""
    path = ctx.latest_checkpoint()
    if path is None:
        return 0, None
    path = resolve_checkpoint(path)
    state, _ = load_checkpoint(path, consolidate=False)
    if is_sharded(path):  # any world size, FSDP or not: DCP reshards
        load_sharded(path, model, optimizer)
    elif is_fsdp(model):  # a full (DDP) checkpoint: each rank keeps its shards
        load_full_into_sharded(state, model, optimizer)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    load_lr_scheduler_state(scheduler, state["scheduler"])  # after the optimizer's state
    stream.load_state_dict(state["data"])
    restore_rng_states(state["rng"], ctx.rank, device)
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"]), path
