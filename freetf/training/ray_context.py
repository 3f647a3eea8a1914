"""The training loop's view of a Ray Train worker (:class:`RayTrainContext`).

The loop (:mod:`freetf.training.loop`) talks to its runner through a
:class:`~freetf.training.context.TrainContext`; this one reports through
``ray.train.report``, resumes from ``ray.train.get_checkpoint`` and prepares the model
for DDP or FSDP over Ray Train's process group.  Used by the workers that
:mod:`freetf.training.ray_train` starts.

Two things the driver and the workers share beyond Ray Train's own channels:

- a reported checkpoint reaches ``scaling.storage_path`` under a temporary name and is
  renamed once Ray's copy is complete (:meth:`RayTrainContext.persist`), so a copy cut
  short (a full disk) never looks like a checkpoint; the failure is a
  ``CheckpointWriteError`` on every rank;
- a stop asked by a signal (:mod:`freetf.training.stop`) goes from the driver to the
  workers through Ray's key-value store (:func:`publish_stop`, read by rank 0 at most
  every ``STOP_POLL_S``), and rank 0 hands it to the other ranks at log steps.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed

from freetf.config import Config
from freetf.training.checkpoint import CheckpointWriteError
from freetf.training.checkpoint_files import attempt, is_sharded
from freetf.training.context import TrainContext
from freetf.training.parallel import apply_fsdp, is_fsdp
from freetf.training.scratch import make_scratch, remove_scratch
from freetf.training.stop import requested_signal

STOP_NAMESPACE = "freetf"  # Ray's key-value store: <stop key> -> the signal's number
STOP_POLL_S = 0.5  # how often rank 0 asks the store


def publish_stop(key: str, signum: int) -> None:
    """Ask the workers that poll ``key`` to stop (the driver, in its signal handler)."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, str(signum), namespace=STOP_NAMESPACE)


def read_stop(key: str) -> int | None:
    from ray.experimental.internal_kv import _internal_kv_get

    value = _internal_kv_get(key, namespace=STOP_NAMESPACE)
    return int(value) if value else None


class RayTrainContext(TrainContext):
    """The loop's view of a Ray Train worker."""

    def __init__(self, resume_from: str | None = None, report_interval_s: float = 0.0,
                 persist_root: Path | None = None, quiet_nonfinite_stop: bool = False,
                 stop_key: str | None = None) -> None:
        """``persist_root``: write checkpoints there and keep them (Ray Train's local
        mode, which runs the loop in the driver and persists nothing it is handed).
        ``quiet_nonfinite_stop``: report a non-finite stop with a checkpoint (below).
        ``stop_key``: where the driver publishes a stop (:func:`publish_stop`)."""
        ctx = ray.train.get_context()
        super().__init__(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                         device=ray.train.torch.get_device(), resume_from=resume_from)
        self._tmp = make_scratch("freetf-ckpt-")  # removed by close()
        self._persist_root = persist_root
        # Ray Train's Result holds the latest checkpointed report only: a non-finite stop
        # reaches the driver as a checkpoint of the last finite weights (loop.py).
        self.checkpoint_at_nonfinite_stop = quiet_nonfinite_stop
        self.report_interval_s = report_interval_s
        self._last_report = -math.inf
        self._stop_key, self._stop_polled = stop_key, -math.inf
        self.marks["process_start"] = psutil.Process().create_time()

    def shard_model(self, model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
        """scaling.strategy=fsdp: FSDP2 over Ray Train's process group (parallel.py)."""
        if cfg.scaling.strategy != "fsdp":
            return model
        return apply_fsdp(model, cfg, self.device)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if is_fsdp(model):  # sharded already: no DDP on top
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def _report_due(self) -> bool:
        """Has ``report_interval_s`` passed since the last report?  Rank 0's clock decides
        for all: ``ray.train.report`` is a collective, so every rank must call it alike."""
        if self.report_interval_s <= 0:
            return True
        due = time.monotonic() - self._last_report >= self.report_interval_s
        if self.world_size > 1:
            flag = torch.tensor([float(due)], device=self.device)  # CUDA under NCCL
            torch.distributed.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:  # fresh start, or --resume from a stopped run
            return Path(self.resume_from) if self.resume_from else None
        local = checkpoint.to_directory(str(self._tmp / "restore"))
        return Path(local)

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def from_main(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def requested_stop(self, sync_point: bool) -> int | None:
        """This process's stop (local mode: the loop runs in the driver) or the driver's,
        read by rank 0; with several ranks, rank 0's answer at sync points only."""
        if self.world_size > 1 and not sync_point:
            return None
        signum = requested_signal()
        now = time.monotonic()
        if (signum is None and self.is_main and self._stop_key
                and now - self._stop_polled >= STOP_POLL_S):
            self._stop_polled = now
            signum = read_stop(self._stop_key)
        return self.from_main(signum)

    def checkpoint_root(self, cfg: Config) -> Path:
        if self._persist_root is not None:
            return self._persist_root
        return self._tmp / "out"  # Ray persists what is reported into storage_path

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None,
               essential: bool = True) -> None:
        """``ray.train.report``, thinned to one metric-only report per ``report_interval_s``.

        Ray Train (2.60, v2) hands each result to the controller through a one-slot queue
        that the controller drains when it polls the workers (every
        ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default): a second report within
        that interval blocks the training thread until the next poll.  Reporting every
        log step capped training at one log interval per poll (0.70x the in-process
        tokens/s in bench/ray_overhead.py; 0.92-0.99x with this thinning).  The skipped
        points are not lost: rank 0 logs every log step to MLflow, which the plots read.
        """
        self.history.append(dict(metrics))
        if not essential and not self._report_due():
            return
        self._last_report = time.monotonic()
        checkpoint = (ray.train.Checkpoint.from_directory(str(checkpoint_dir))
                      if checkpoint_dir is not None else None)
        error = None
        try:
            ray.train.report({**metrics, **self.timeline()}, checkpoint=checkpoint,
                             checkpoint_dir_name=checkpoint_dir.name if checkpoint_dir else None,
                             checkpoint_upload_fn=self.persist if self._persist_root is None
                             else None)
        except CheckpointWriteError as err:
            error = err
        if essential:  # rank 0 alone persists a full checkpoint: the others stop with it
            error = self.from_main(error)
        if error is not None:
            raise error
        if checkpoint_dir is not None and self._persist_root is None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # Ray has its own copy

    def persist(self, checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
        """Ray's ``checkpoint_upload_fn``: Ray's own copy into ``storage_path/<run>``,
        made as ``.<name>.partial`` and renamed to ``name`` once complete (on a local or
        mounted ``storage_path`` a rename; on object stores a copy).  A sharded
        checkpoint is reported by every rank into one folder: the ranks agree that
        every copy is done before rank 0 renames it.  -> the persisted checkpoint."""
        storage = ray.train.get_context().get_storage()
        fs = storage.storage_filesystem
        partial, final = (storage.build_checkpoint_path_from_name(n)
                          for n in (f".{name}.partial", name))
        shared = self.world_size > 1 and is_sharded(Path(checkpoint.path))
        cause = attempt(storage.persist_current_checkpoint, checkpoint, f".{name}.partial",
                        any_error=True)
        causes = self.all_gather(cause) if shared else [cause]
        if not shared or self.is_main:
            cause = next((c for c in causes if c is not None), None)
            cause = cause or attempt(_rename_dir, fs, partial, final, any_error=True)
            if cause is not None:
                attempt(_delete_dir, fs, partial, any_error=True)
        if shared:
            cause = self.from_main(cause)
        if cause is not None:
            raise CheckpointWriteError(final, cause)
        return ray.train.Checkpoint(filesystem=fs, path=final)

    def close(self) -> None:
        """Remove this worker's scratch folder: the checkpoints staged for Ray (each is
        removed once Ray has copied it, a failed one at once) and the ``restore/`` copy."""
        remove_scratch(self._tmp)


def _rename_dir(fs, src: str, dst: str) -> None:
    _delete_dir(fs, dst)  # a retried run reporting this step again
    fs.move(src, dst)


def _delete_dir(fs, path: str) -> None:
    import pyarrow.fs

    if fs.get_file_info(path).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(path)
