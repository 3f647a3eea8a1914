"""The training loop's side of its runners: the context it talks to, its result, and the
log window that keeps a step's metrics on the device between log steps.

:class:`TrainContext` runs in-process with one worker; Ray Train
(:mod:`freetf.training.ray_train`) and Tune trials (:mod:`freetf.sweeps.trainable`)
subclass it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from freetf.config import Config, ConfigError
from freetf.training.stop import requested_signal


class LogWindow:
    """Sums of each step's scalar metrics over a log window, kept on the device.

    A step's metrics are stacked into one vector, so adding them is three ops whatever
    their number; means are over finite values only (NaN where there was none).
    """

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.sums: torch.Tensor | None = None  # (K,)
        self.counts: torch.Tensor | None = None  # (K,) finite values seen

    def add(self, values: dict[str, torch.Tensor]) -> None:
        vector = torch.stack(list(values.values()))  # (K,) same keys every step
        finite = torch.isfinite(vector)
        vector = torch.where(finite, vector, 0.0)
        if self.sums is None:
            self.keys, self.sums, self.counts = list(values), vector, finite.float()
        else:
            self.sums += vector
            self.counts += finite

    def means(self) -> dict[str, float]:
        """The window's means: the log step's one host sync."""
        if self.sums is None:
            return {}
        return dict(zip(self.keys, (self.sums / self.counts).tolist(), strict=True))


@dataclass
class TrainContext:
    """How the loop talks to its runner.  The default runs in-process, one worker."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    resume_from: str | Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # At a non-finite stop, save the weights (those of the last finite update: the bad
    # ones were skipped) and report them with NONFINITE_STOP_KEY before raising: a runner
    # that only hears of checkpointed reports (Ray Train) learns of the stop that way.
    checkpoint_at_nonfinite_stop: bool = False
    # Wall-clock times (time.time()) of a run's milestones, for a runner to report
    # (bench/ray_overhead.py draws a trial's timeline from them).
    marks: dict[str, float] = field(default_factory=dict)
    # The optimizer steps the run will train to (set by the loop once the data is built).
    total_steps: int | None = None
    # Called with every report's metrics and total_steps, in-process (``freetf train``'s
    # console: freetf.training.console.TrainConsole.report).
    listener: Callable[[dict[str, Any], int | None], None] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mark(self, event: str) -> None:
        self.marks[event] = time.time()

    def timeline(self) -> dict[str, float]:
        """The marks as ``timeline/<event>`` metrics (for the runner's reports only)."""
        return {f"timeline/{event}": t for event, t in self.marks.items()}

    def resolve_device(self, cfg: Config) -> torch.device:
        if self.device is not None:
            return self.device
        if cfg.training.device == "cuda" or (cfg.training.device == "auto"
                                             and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")

    def shard_model(self, model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
        """Shard the model in place before the optimizer is built (scaling.strategy=fsdp);
        a runner with a process group does it (training/parallel.py), this one has none."""
        if cfg.scaling.strategy == "fsdp":
            raise ConfigError("scaling.strategy='fsdp' needs a process group: run it with "
                              "Ray Train workers (in a sweep: resources.trial_runner=train)")
        return model

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def latest_checkpoint(self) -> Path | None:
        return Path(self.resume_from) if self.resume_from else None

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a collective: all ranks call it)."""
        return [obj]

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank (a collective: all ranks call it)."""
        return obj

    def requested_stop(self, sync_point: bool) -> int | None:
        """The signal that asked the run to stop (:mod:`freetf.training.stop`), or None.

        Asked after every step, by every rank; ``sync_point`` (a log step or the last):
        a runner with several ranks may answer only there, where the ranks agree.
        """
        return requested_signal()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None,
               essential: bool = True) -> None:
        """Hand a result to the runner.  ``essential``: eval, checkpoint or final results,
        which a runner must not drop (plain log points it may thin out)."""
        self.history.append(dict(metrics))
        if self.listener is not None:
            self.listener(metrics, self.total_steps)

    def checkpoint_root(self, cfg: Config) -> Path:
        return Path(cfg.checkpoint.dir).resolve()


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    checkpoint: Path | None
    nonfinite_steps: int
