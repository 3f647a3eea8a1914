"""The sweep spec's sections (``search``, ``boundary``, ``asha``, ``stopper``,
``resources``, ``mlflow``): frozen dataclasses with their defaults, read by
:func:`freetf.sweeps.spec.load_sweep`; docs/sweeps.md explains each key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal


@dataclass(frozen=True)
class SearchSpec:
    method: Literal["grid", "random", "optuna", "boundary"] = "grid"
    num_samples: int = 1  # random/optuna: trials; grid: must stay 1 (seeds go in the space)
    metric: str = "eval/ce_prior_nats"
    mode: Literal["min", "max"] = "min"
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs hold
    seed: int = 0


@dataclass(frozen=True)
class BoundarySpec:
    """``search.method: boundary`` (:mod:`freetf.sweeps.boundary`)."""

    key: str = "training.free_bits_bits"  # searched along log2 over its space range
    seeds: int = 3  # training.seed 0..seeds-1 at every probe and baseline
    probes: int = 5  # values of the key per setting, initial ones included
    initial: int = 3  # spread evenly over the range first
    # the initial probes at these values of the key instead (its units, inside the space's
    # range; replaces ``initial``): a ladder, e.g. the paper's kappas
    at: list[float] = field(default_factory=list)
    confidence: float = 0.95  # of the intervals of kappa_c and kappa_l
    # the boundaries the adaptive probes are placed for: collapse, leak, and on the
    # synthetic task the regime onsets position, noise, broken (Figure 4 located)
    targets: list[str] = field(default_factory=lambda: ["collapse", "leak"])


@dataclass(frozen=True)
class AshaSpec:
    enabled: bool = False
    metric: str | None = None  # None: search.metric (must be in the eval reports)
    grace_period: int = 50  # steps
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class StopperSpec:
    enabled: bool = True
    collapse_after_steps: int = 100  # no collapse verdict before this step
    collapse_kl_nats: float = 0.002  # raw train KL per token under this ...
    collapse_patience: int = 2  # ... in this many consecutive reports = collapsed
    diverge_loss: float = 20.0  # train loss above this (or non-finite) = diverged


@dataclass(frozen=True)
class ResourcesSpec:
    """What a trial holds; the per-worker keys override the base config's ``scaling.*``
    keys of the same name."""

    RENAMED: ClassVar[dict[str, str]] = {  # the names before they matched scaling.*
        "trial_cpu": "cpus_per_trial", "worker_cpu": "cpus_per_worker",
        "worker_gpu": "gpus_per_worker"}
    # auto: the loop runs in the trial process for 1-worker CPU trials (in_trial), under a
    # TorchTrainer otherwise (train).  See docs/sweeps.md, "Trial runners".
    trial_runner: Literal["auto", "in_trial", "train"] = "auto"
    reuse_actors: bool = True  # in_trial: one process per trial slot, reused by its trials
    # in_trial on a local Ray: a worker process imports a trial's libraries when it starts,
    # before Tune starts the trial (trainable.preload_trial_libraries; docs/sweeps.md)
    preload: bool = True
    cpus_per_trial: float = 0.01  # the trial process (in_trial: plus cpus_per_worker)
    cpus_per_worker: float | None = None  # None: the base scaling.cpus_per_worker
    # GPUs per Train worker, fractional to share a GPU (0.25: four trials' workers on one);
    # sets scaling.use_gpu.  None: the base scaling (use_gpu, gpus_per_worker).
    gpus_per_worker: float | None = None
    num_workers: int | None = None  # None: the base scaling.num_workers
    controller_failure_limit: int = 2  # a run whose workers cannot start fails, not hangs
    # Tune restarts a failed trial this often: its Train run resumes from its last
    # checkpoint and its MLflow run is reattached.  Under load Ray 2.60's placement-group
    # cleaner can take a live Train controller for dead and remove its workers.
    max_trial_failures: int = 1


@dataclass(frozen=True)
class MlflowSweepSpec:
    sweep_name: str = "search_kl"  # parent run name; stable across restarts
    experiment: str | None = None  # None: the base tracking.mlflow.experiment
    tracking_uri: str | None = None  # None: the base config, $MLFLOW_TRACKING_URI, ./mlflow.db
