"""One sweep trial: its key and names, its context, and the Tune function trainable.

A trial trains in its own MLflow child run, found again by its tags (``freetf.sweep``,
``freetf.trial_key``) so a resumed sweep reuses it, in one of two ways
(``resources.trial_runner``, resolved by :meth:`SweepConfig.trial_runner`):

- ``in_trial``: the training loop runs in the trial's process, reporting and
  checkpointing through Tune (:class:`TuneTrialContext`).  Tune may reuse the process for
  the next trial of its slot; :func:`reset_process_state` runs first.
- ``train``: a ``TorchTrainer`` inside the trial (Ray 2.60's pattern, reporting through
  ``TuneReportCallback``, since ``Tuner(trainer)`` is not supported by Train V2), for
  several workers or GPUs.

Used by :mod:`freetf.sweeps.sweep`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray
import torch
from ray import tune

from freetf.config import Config, apply_overrides, from_dict
from freetf.evaluation.verdicts import changes_baseline
from freetf.sweeps.boundary import LATENT_KEY, SEED_KEY
from freetf.tracking import tags
from freetf.tracking.params import searched_names
from freetf.training.context import TrainContext
from freetf.training.loop import train_loop
from freetf.training.scratch import make_scratch, remove_scratch

log = logging.getLogger(__name__)

TAG_SWEEP, TAG_ROLE, TAG_KEY = tags.SWEEP, tags.ROLE, tags.TRIAL_KEY
TAG_NODE = tags.RAY_NODE  # the Ray node id the trial's process ran on (its last try)
KAPPA_KEY = "training.free_bits_bits"  # named first in a trial's run name, as kappa
MAX_KAPPA_DENOMINATOR = 1024  # kappa as n/d down to 2^-10 bits


# ----------------------------------------------------------------------------- trials


def trial_key(sampled: dict[str, Any]) -> str:
    """A stable id of a trial's sampled values (the same point always gets the same key)."""
    text = json.dumps({k: _plain(v) for k, v in sorted(sampled.items())}, sort_keys=True,
                      default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def trial_run_name(sampled: dict[str, Any], shown: tuple[str, ...] | None = None) -> str:
    """What tells this trial from the sweep's others, first (MLflow's Run Name column shows
    the start of a name): ``kappa=1/4 s1``, ``baseline s1``, ``kappa=0.177 kl_weight=0.1
    s2``.

    kappa (``training.free_bits_bits``) in bits first, as a fraction where that is exact
    (``1/64``, ``3/8``) and to 3 significant digits otherwise; a trial without latent
    (``model.latent_dim = 0``) is ``baseline``, followed only by the keys that change a
    baseline; then the other keys of ``shown`` by their param names (``kl_weight=0.1``);
    the seed last (``s1``).  ``shown``: the keys whose values differ between the sweep's
    trials (:attr:`SweepConfig.named_keys`; default: every sampled key).  The trial's
    identity is its key, in the tag ``freetf.trial_key``; two trials that differ only
    below 3 digits can share a name.
    """
    shown = tuple(sampled) if shown is None else tuple(k for k in shown if k in sampled)
    baseline = sampled.get(LATENT_KEY) == 0
    keys = [k for k in shown if k not in (KAPPA_KEY, SEED_KEY, LATENT_KEY)
            and not (baseline and not changes_baseline(k))]
    names = searched_names(keys)
    parts = []
    if baseline:
        parts.append("baseline")
    elif KAPPA_KEY in shown:
        parts.append(f"kappa={kappa_text(sampled[KAPPA_KEY])}")
    if LATENT_KEY in shown and not baseline:
        parts.append(f"latent_dim={_plain(sampled[LATENT_KEY])}")
    parts += [f"{names[k]}={_short(sampled[k])}" for k in sorted(keys, key=names.get)]
    if SEED_KEY in shown:
        parts.append(f"s{_plain(sampled[SEED_KEY])}")
    return " ".join(parts) or f"trial {trial_key(sampled)}"


def kappa_text(bits: Any) -> str:
    """kappa in bits for a reader: ``1/64``, ``3/8``, ``1``, ``8``; else 3 significant
    digits (``0.177``, ``2.83``)."""
    value = float(_plain(bits))
    if value.is_integer():
        return str(int(value))
    exact = Fraction(value)
    if 0 < value < 1 and exact.denominator <= MAX_KAPPA_DENOMINATOR:
        return f"{exact.numerator}/{exact.denominator}"
    return f"{value:.3g}"


def _short(value: Any) -> str:
    value = _plain(value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> Any:
    """numpy scalars (Tune's samplers) to Python ones."""
    return value.item() if hasattr(value, "item") else value


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs from the driver (pickled into Tune's state)."""

    sweep_name: str
    parent_run_id: str
    tracking_uri: str
    base: dict[str, Any]  # the resolved base config
    keys: tuple[str, ...]  # the searched keys
    train_storage: str
    controller_failure_limit: int
    runner: str = "train"  # in_trial | train (SweepConfig.trial_runner)
    # the keys a run's name shows (SweepConfig.named_keys); None (a context pickled before
    # there were any): every searched key
    named_keys: tuple[str, ...] | None = None

    def trial_config(self, sampled: dict[str, Any]) -> Config:
        key = trial_key(sampled)
        return from_dict(apply_overrides(self.base, {
            **sampled, "tracking.mlflow.run_name": trial_run_name(sampled, self.named_keys),
            "scaling.run_name": f"trial-{key}"}))

    def max_steps(self, sampled: dict[str, Any]) -> int:
        return int(sampled.get("training.max_steps") or self.base["training"]["max_steps"])


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Tune function trainable: one training run in its own MLflow child run.

    ``context.runner`` says how: ``in_trial`` runs the loop here, in the trial's process
    (reporting and checkpointing through Tune); ``train`` runs it under a ``TorchTrainer``
    (DDP workers, GPUs).  A child run of the same trial key that already FINISHED (a
    resumed sweep whose driver died after the trial ended) is not trained again: its
    metrics are reported.
    """
    marks = {"trial_start": time.time()}
    from freetf.logs import setup_logging
    from freetf.tracking import make_tracker, mlflow_client

    setup_logging()
    sampled = {k: _plain(config[k]) for k in context.keys}
    key = trial_key(sampled)
    cfg = context.trial_config(sampled)
    client = mlflow_client(context.tracking_uri)
    existing = find_trial_run(client, context.parent_run_id, key)
    if existing is not None and existing.info.status == "FINISHED":
        log.info("trial %s already finished in MLflow run %s; not rerun", key,
                 existing.info.run_id)
        metrics = existing.data.metrics
        tune.report({**metrics, "step": metrics.get("train/steps_done", 0),
                     "eval/verdict": existing.data.tags.get(tags.VERDICT, "")})
        return
    marks["imports"] = time.time()
    tracker = make_tracker(
        cfg, run_id=existing.info.run_id if existing else None,
        parent_run_id=context.parent_run_id, run_name=cfg.tracking.mlflow.run_name,
        tags={TAG_SWEEP: context.sweep_name, TAG_ROLE: "trial", TAG_KEY: key,
              tags.SAMPLED: json.dumps(sampled), tags.STOPPED_EARLY: "false",
              TAG_NODE: ray.get_runtime_context().get_node_id()},
        searched=context.keys)
    if existing is not None and tags.ERROR in existing.data.tags:  # from a cut-off try
        client.delete_tag(tracker.run_id, tags.ERROR)
    marks["mlflow_run"] = time.time()
    try:
        if context.runner == "in_trial":
            metrics, checkpoint, history = _train_in_trial(cfg, tracker, marks)
        else:
            metrics, checkpoint, history = _train_with_trainer(cfg, tracker, context)
    except BaseException as err:
        # Tune stopping the trial (ASHA, stopper) also lands here (SystemExit in the
        # trial's thread, or the trainer's resources removed): the driver has then
        # already closed the run as stopped early.
        if client.get_run(tracker.run_id).data.tags.get(tags.STOPPED_EARLY) != "true":
            cut = isinstance(err, KeyboardInterrupt)
            tracker.set_tags({tags.ERROR: f"{type(err).__name__}: {err}",
                              tags.OUTCOME: "interrupted" if cut else "failed"})
            tracker.finish("KILLED" if cut else "FAILED")
        raise
    _finish_trial_run(tracker, client, metrics, checkpoint, history)


def _train_with_trainer(cfg: Config, tracker, context: TrialContext):
    """The loop under a ``TorchTrainer`` (its workers log into the trial's run)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from freetf.training.ray_train import build_trainer

    trainer = build_trainer(cfg, run_id=tracker.run_id, callbacks=[TuneReportCallback()],
                            storage_path=context.train_storage,
                            controller_failure_limit=context.controller_failure_limit)
    result = trainer.fit()
    checkpoint = Path(result.checkpoint.path) if result.checkpoint is not None else None
    return dict(result.metrics or {}), checkpoint, None  # history: from MLflow


def _train_in_trial(cfg: Config, tracker, marks: dict[str, float]):
    """The loop in this process, after resetting what a reused process carries over."""
    reset_process_state(cfg)
    ctx = TuneTrialContext(cfg.scaling.report_interval_s)
    ctx.marks.update(marks)
    try:
        result = train_loop(cfg, ctx, tracker=tracker)
    finally:
        ctx.close()
    # A retried trial resumed mid-way: its own history misses the first steps.
    history = ctx.history if not ctx.resumed else None
    return result.metrics, ctx.last_checkpoint, history


def _finish_trial_run(tracker, client, metrics: dict[str, Any], checkpoint: Path | None,
                      history: list[dict[str, Any]] | None = None) -> None:
    from freetf.tracking import CURVE_METRICS, metric_history, plot_training_curves
    from freetf.training.ray_train import log_run_artifacts

    if history is None:  # Ray Train's reports are thinned: MLflow has every log step
        history = metric_history(client, tracker.run_id, CURVE_METRICS)
    log_run_artifacts(tracker, metrics, checkpoint, history, plot_training_curves)
    tracker.set_tags({tags.OUTCOME: "finished"})
    tracker.finish("FINISHED")


# ----------------------------------------------------------------------------- in-trial runs


class TuneTrialContext(TrainContext):
    """The loop's view of a Tune trial that runs it in its own process (one worker).

    Reports go to ``tune.report`` (the final and the checkpoint ones always, metric-only
    ones at most every ``report_interval_s``: each report waits for the driver), and a
    checkpoint is persisted by Tune into the trial's folder; ``tune.get_checkpoint``
    resumes a retried or restored trial from its last one.
    """

    def __init__(self, report_interval_s: float = 0.0) -> None:
        super().__init__()
        self.report_interval_s = report_interval_s
        self.last_checkpoint: Path | None = None  # as persisted by Tune
        self.resumed = False
        self._tmp = make_scratch("freetf-trial-")  # removed by close()
        self._last_report = -math.inf
        self.marks["process_start"] = psutil.Process().create_time()

    def latest_checkpoint(self) -> Path | None:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        self.resumed = True
        return Path(checkpoint.to_directory(str(self._tmp / "restore")))

    def checkpoint_root(self, cfg: Config) -> Path:
        return self._tmp / "out"  # Tune persists what is reported into the trial folder

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None,
               essential: bool = True) -> None:
        self.history.append(dict(metrics))
        now = time.monotonic()
        if not essential and now - self._last_report < self.report_interval_s:
            return
        self._last_report = now
        checkpoint = (tune.Checkpoint.from_directory(str(checkpoint_dir))
                      if checkpoint_dir is not None else None)
        tune.report({**metrics, **self.timeline()}, checkpoint=checkpoint)
        if checkpoint_dir is not None:
            self.last_checkpoint = Path(tune.get_checkpoint().path)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def close(self) -> None:
        remove_scratch(self._tmp)


def preload_trial_libraries() -> None:
    """Import what a trial imports beyond torch and Ray, when its worker process starts.

    Ray's ``worker_process_setup_hook`` for local sweeps with ``in_trial`` trials
    (``resources.preload``).  Without it each slot's first trial spends about 5 s of its
    clock importing freetf's tracking and MLflow, the sqlite store's ORM and schema check
    (the default ``./mlflow.db``), ``torch._dynamo`` (the first ``torch.optim`` optimizer
    imports it) and matplotlib's Agg canvas (the run's curves); with it they are part of
    the process's start-up, before Tune starts its first trial, like torch's and Ray's.
    The work is the same, once per slot: it moves, it does not shrink (bench/README.md,
    item 5b, measures both the per-trial and the whole-sweep figures).
    """
    import matplotlib.figure  # noqa: F401
    import torch._dynamo  # noqa: F401
    from matplotlib.backends import backend_agg  # noqa: F401

    from freetf.tracking import preload_store_modules

    preload_store_modules()


def reset_process_state(cfg: Config) -> None:
    """Reset what a reused trial process carries from one trial to the next.

    The global RNGs (Python, NumPy, torch on every device; the loop seeds torch again
    itself), torch's thread count (that of a Ray Train worker holding
    ``scaling.cpus_per_worker``), and a fluent MLflow run left active.  freetf keeps no
    other per-trial state in globals: data, model, optimizer and tracker are built per
    trial.
    """
    from freetf.tracking import end_active_run

    seed = cfg.training.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, math.floor(cfg.scaling.cpus_per_worker)))
    end_active_run()


# ----------------------------------------------------------------------------- MLflow runs


def find_trial_run(client, parent_run_id: str, key: str):
    """The child run of ``parent_run_id`` for trial ``key``, or None (oldest if several)."""
    runs = _search(client, parent_run_id,
                   f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                   f"and tags.`{TAG_KEY}` = '{key}'")
    if len(runs) > 1:
        log.warning("%d MLflow runs for trial %s; using the oldest", len(runs), key)
    return min(runs, key=lambda r: r.info.start_time) if runs else None


def child_runs(client, parent_run_id: str) -> list:
    return _search(client, parent_run_id, f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def _search(client, parent_run_id: str, filter_string: str) -> list:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return list(client.search_runs([experiment_id], filter_string=filter_string,
                                   max_results=10_000))
