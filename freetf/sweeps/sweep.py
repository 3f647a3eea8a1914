"""Ray Tune sweeps over the KL weight, free bits and their schedules (arXiv:2510.17558 §3.3).

The free-bits KL term (eqs. 4-5) has two failure regimes, posterior collapse and leak;
a sweep over ``training.kl_weight``, ``training.free_bits[_bits]`` and the annealing
schedules locates the boundary between them.  One sweep is:

- a YAML spec (:class:`SweepConfig`): a base freetf config plus overrides, a search
  space over any dotted config key, the search method (grid, random, Optuna TPE), ASHA,
  the collapse / divergence stopper, per-trial resources and the MLflow names;
- one Tune trial per point (:mod:`freetf.sweeps.trainable`), running the training loop
  in the trial's process (one CPU worker) or under a ``TorchTrainer``;
- one MLflow parent run per sweep and one child run per trial, found again by its tags
  (``freetf.sweep``, ``freetf.trial_key``) so a resumed sweep (``resume=True``,
  ``Tuner.restore``) reuses its runs and never duplicates a finished trial;
- at the end, the collapse map of :mod:`freetf.results.report`, logged to the parent run.

Tune kills a trial stopped by ASHA or by the stopper without running the code after its
training: the driver closes its child run instead (KILLED,
``freetf.stopped_early=true``), from a Tune callback as soon as the trial stops.

SIGINT (Ctrl-C) and SIGTERM stop a sweep alike: Tune stops its trials, saves its state
and the sweep ends interrupted (exit 130, or 143 for SIGTERM), resumable with
``--resume``.  (Tune itself handles SIGINT and SIGUSR1 only; SIGTERM would end the
driver at once, through Ray's handler.)
"""

from __future__ import annotations

import logging
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from freetf.config import Config
from freetf.process_env import environment
from freetf.sweeps.console import SweepConsole
from freetf.sweeps.lock import sweep_lock
from freetf.sweeps.runs import (  # noqa: F401 - ended_trials: the public API
    close_open_runs,
    ended_trial_keys,
    ended_trials,
    space_params,
)
from freetf.sweeps.search import search_algorithm
from freetf.sweeps.spec import (  # noqa: F401 - load_sweep, SweepError: the public API
    SPEC_FILE,
    STOP_REASON,
    StopperSpec,
    SweepConfig,
    SweepError,
    load_sweep,
)
from freetf.sweeps.trainable import (  # noqa: F401 - trial_run_name: the public API
    TAG_KEY,
    TAG_ROLE,
    TAG_SWEEP,
    TrialContext,
    _plain,
    child_runs,
    find_trial_run,
    preload_trial_libraries,
    run_trial,
    trial_key,
    trial_run_name,
)
from freetf.tracking import tags
from freetf.training.stop import sigterm_as

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- stopping


class CollapseStopper(tune.Stopper):
    """Stop a trial once its KL stays near zero or its loss diverged (before ASHA would).

    ``low_kl``: raw train KL (``train/kl_nats``) below ``collapse_kl_nats`` in
    ``collapse_patience`` consecutive reports from step ``collapse_after_steps`` on (a
    cheap sign of collapse, not the verdict: the trial gets none).  ``diverged``: a
    train loss that is not finite or above ``diverge_loss``.  The reason is written into
    the result (``freetf/stop_reason``) for :class:`EarlyStopRecorder`.
    A trial's final report is never stopped: that would only keep it from closing its run.
    """

    def __init__(self, spec: StopperSpec, context: TrialContext) -> None:
        self.spec = spec
        self.context = context
        self._low_reports: dict[str, int] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        config = result.get("config") or {}
        sampled = {k: config.get(k) for k in self.context.keys if k in config}
        if "step" not in result or result["step"] >= self.context.max_steps(sampled):
            return False
        loss = result.get("train/loss")
        if loss is not None and not (math.isfinite(loss) and loss <= self.spec.diverge_loss):
            result[STOP_REASON] = "diverged"
            return True
        kl = result.get("train/kl_nats")
        if kl is None or result["step"] < self.spec.collapse_after_steps:
            return False
        low = self._low_reports.get(trial_id, 0) + 1 if kl < self.spec.collapse_kl_nats else 0
        self._low_reports[trial_id] = low
        if low >= self.spec.collapse_patience:
            result[STOP_REASON] = "low_kl"
            return True
        return False

    def stop_all(self) -> bool:
        return False


class EarlyStopRecorder(tune.Callback):
    """Close the MLflow child run of a trial that Tune stopped early (ASHA, stopper).

    Such a trial is killed inside ``trainer.fit()``; its run is marked KILLED with tags
    ``freetf.outcome=stopped``, ``freetf.stopped_early=true``, ``freetf.stop_reason``
    (asha, low_kl, diverged), ``freetf.stopped_at_step`` and, stopped by ASHA, the last
    evaluation's ``freetf.verdict`` (the stopper's reasons are not verdicts: a trial
    whose KL stays low is not judged collapsed before its end).  Its worker may log a few
    more steps before Ray has torn it down.
    """

    def __init__(self, context: TrialContext) -> None:
        self.context = context
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict,
                        **info: Any) -> None:
        sampled = {k: _plain(trial.config[k]) for k in self.context.keys}
        if not result.get("done") or result.get("step", 0) >= self.context.max_steps(sampled):
            return
        reason = result.get(STOP_REASON, "asha")
        verdict = result.get("eval/verdict") if reason == "asha" else None
        from freetf.tracking import mlflow_client, set_outcome, set_verdict

        try:
            if self._client is None:
                self._client = mlflow_client(self.context.tracking_uri)
            run = find_trial_run(self._client, self.context.parent_run_id, trial_key(sampled))
            if run is None:
                return
            for tag, value in ((tags.STOPPED_EARLY, "true"), (tags.STOP_REASON, reason),
                               (tags.STOPPED_AT_STEP, str(result.get("step")))):
                self._client.set_tag(run.info.run_id, tag, value)
            set_outcome(self._client, run.info.run_id, "stopped")
            if verdict:
                set_verdict(self._client, run.info.run_id, verdict, result.get("step"))
            self._client.set_terminated(run.info.run_id, "KILLED")
            log.debug("trial %s stopped early at step %s (%s, verdict %s)", trial_key(sampled),
                      result.get("step"), reason, verdict)
        except Exception as err:  # never break the sweep over bookkeeping
            log.warning("could not close the MLflow run of stopped trial %s: %s", trial, err)


# ----------------------------------------------------------------------------- driver


@dataclass
class SweepResult:
    """What a sweep left behind: its MLflow runs, the collapse map, and whether it ended."""

    sweep: SweepConfig
    parent_run_id: str
    tracking_uri: str
    experiment: str
    runs: Any  # pandas DataFrame, one row per trial (freetf.results.report.collect_runs)
    report: dict[str, Path]
    interrupted: bool
    analysis: Any = None  # freetf.results.analysis.SweepAnalysis: verdicts, boundaries
    runs_view: str | None = None  # the trials' saved view in MLflow's UI (runs_page_url)
    terminated: bool = False  # interrupted by SIGTERM (not Ctrl-C)


def run_sweep(sweep: SweepConfig, resume: bool = False, verbose: bool = False,
              callbacks: list | tuple = ()) -> SweepResult:
    """Run (or, with ``resume``, continue) ``sweep`` on the local or joined Ray cluster.

    The sweep holds its name's lock while it runs (:mod:`freetf.sweeps.lock`): a second
    one of the name in the same storage folder is refused before Ray starts.  A fresh
    sweep refuses a name that already has Tune state or an MLflow parent run;
    ``resume`` restores Tune's state (``Tuner.restore``) with the spec saved by the first
    run and reattaches the parent and unfinished child runs.  The base config's data is
    checked before MLflow or Ray is touched (:func:`freetf.data.datasets.check_data`, as
    ``freetf train`` does).  Returns after the report is written, also when the sweep was
    interrupted (Ctrl-C): ``interrupted`` is then set.  The console shows
    :class:`freetf.sweeps.console.SweepConsole`'s progress; ``verbose`` brings back Tune's
    status tables and the trial processes' output.  ``callbacks``: more Tune callbacks.
    """
    # Train reports carry the eval metrics (ASHA's, the search's) only at eval steps;
    # Tune's new output prints its experiment box even at verbose=0.
    settings = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
                **({} if verbose else {"RAY_AIR_NEW_OUTPUT": "0"})}
    with sweep_lock(sweep), environment(settings):
        return _run_sweep(sweep, resume, verbose, callbacks)



def _run_sweep(sweep: SweepConfig, resume: bool, verbose: bool,
               callbacks: list | tuple) -> SweepResult:
    from freetf.data.datasets import check_data
    from freetf.results import analysis, over_training, report
    from freetf.results.summary import log_sweep_summary
    from freetf.tracking import find_parent, log_sweep_analysis, make_tracker, mlflow_client

    restorable = tune.Tuner.can_restore(str(sweep.sweep_dir))
    if resume and not restorable:
        raise SweepError(f"nothing to resume: no Tune state of sweep {sweep.name!r} in "
                         f"{sweep.sweep_dir}; run it without --resume")
    if not resume and restorable:
        raise SweepError(f"sweep {sweep.name!r} already ran in {sweep.sweep_dir}: continue "
                         f"it with --resume, or start another with "
                         f"--set mlflow.sweep_name=NEW_NAME")
    if resume:
        sweep = _saved_spec(sweep)
    base = sweep.base()
    check_data(base)  # a damaged prepared folder: one line, before any run or trial
    uri, experiment = base.tracking.mlflow.tracking_uri, base.tracking.mlflow.experiment
    client = mlflow_client(uri)
    parent = find_parent(client, experiment, sweep.name)
    if parent is not None and not resume:
        raise SweepError(f"MLflow experiment {experiment!r} at {uri} already has a sweep "
                         f"named {sweep.name!r} (run {parent.info.run_id}); choose another "
                         f"with --set mlflow.sweep_name=NEW_NAME")
    _init_ray(verbose, uri,
              preload=sweep.resources.preload and sweep.trial_runner(base) == "in_trial")
    tracker = make_tracker(base, run_id=parent.info.run_id if parent else None,
                           run_name=sweep.name, tags={TAG_SWEEP: sweep.name, TAG_ROLE: "sweep"},
                           params=space_params(sweep))
    tracker.log_text(sweep.to_yaml(), "search_space.yaml")
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep.sweep_dir / SPEC_FILE).write_text(sweep.to_yaml())
    context = TrialContext(
        sweep_name=sweep.name, parent_run_id=tracker.run_id, tracking_uri=uri,
        base=base.to_dict(), keys=sweep.trial_keys,
        train_storage=str(sweep.train_dir),
        controller_failure_limit=sweep.resources.controller_failure_limit,
        runner=sweep.trial_runner(base), named_keys=sweep.named_keys)
    console = SweepConsole(sweep, base, verbose=verbose)
    try:
        with sigterm_as(signal.SIGUSR1) as terminated:  # Tune's Ctrl-C stop, for SIGTERM too
            results = _tuner(sweep, base, context, resume, [console, *callbacks],
                             verbose).fit()
    except BaseException as err:  # a second Ctrl-C, or Tune itself failed
        close_open_runs(client, context, None, interrupted=True)
        tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    # Tune marks the trials it stops on Ctrl-C TERMINATED too; only trials that ended
    # on their own (or were stopped by ASHA / the stopper) carry done=True.  A Ctrl-C can
    # also land after a trial closed its MLflow run but before Tune saw it end: MLflow
    # then knows it ended (and --resume will not run it again).
    done = ended_trials(results, context.keys, ended_trial_keys(client, context.parent_run_id))
    interrupted = done < sweep.expected_trials or bool(terminated)
    log.info("sweep %s: %d of %d trials ended (%d errors)%s", sweep.name, done,
             sweep.expected_trials, results.num_errors,
             "; interrupted, continue it with --resume" if interrupted else "")
    close_open_runs(client, context, results, interrupted)
    runs = report.collect_runs(client, experiment, sweep=sweep.name)
    histories = report.collect_histories(client, list(runs["run_id"]),
                                         over_training.HISTORY_METRICS)
    found = analysis.analyse_sweep(runs, sweep, base, histories)  # against the baselines
    log_sweep_analysis(client, context.parent_run_id, *analysis.mlflow_records(found))
    paths = report.write_report(client, found.trials, sweep.report_path)
    paths.update(analysis.write_analysis(found, sweep.report_path))
    for path in paths.values():
        tracker.log_artifact(path, "report")
    paths.update(log_sweep_summary(tracker, client, found.trials, sweep.report_path))
    view = _save_view(client, context.parent_run_id, sweep)
    tracker.finish("KILLED" if interrupted else "FINISHED")
    return SweepResult(sweep, context.parent_run_id, uri, experiment, found.trials, paths,
                       interrupted, found, view, terminated=bool(terminated))


def _save_view(client, parent_run_id: str, sweep: SweepConfig) -> str | None:
    """The trials' view of MLflow's runs table (:func:`save_sweep_view`), or None if the
    store refused it (a link without it still opens the runs table)."""
    from freetf.results.summary import save_sweep_view

    try:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        return save_sweep_view(client, experiment_id, sweep.name, sweep.named_keys)
    except Exception as err:  # never fail a finished sweep over a view
        log.warning("could not save the sweep's MLflow view: %s", err)
        return None


def _init_ray(verbose: bool, tracking_uri: str, preload: bool = False) -> None:
    """``RAY_ADDRESS`` (a cluster you started) if set, else a new local Ray; the trial
    processes' output reaches this console only if ``verbose``.  ``preload``: a local
    Ray's worker processes run :func:`preload_trial_libraries` when they start.  Then
    the MLflow store is checked against the cluster: a sqlite file is no use to trials
    on other hosts."""
    from freetf.training.ray_train import check_tracking_store, init_ray

    hook = f"{preload_trial_libraries.__module__}.{preload_trial_libraries.__name__}"
    init_ray(quiet=not verbose, setup_hook=hook if preload else None)
    check_tracking_store(tracking_uri)



def trial_resources(sweep: SweepConfig, base: Config) -> dict[str, float]:
    """What one trial process holds: ``cpus_per_trial``, plus its worker's share when the
    loop runs in it (``in_trial``); under a TorchTrainer the workers hold their own."""
    cpus_per_trial = sweep.resources.cpus_per_trial
    if sweep.trial_runner(base) == "train":
        return {"cpu": cpus_per_trial}
    sc = base.scaling
    return {"cpu": cpus_per_trial + sc.cpus_per_worker,
            **({"gpu": sc.gpus_per_worker} if sc.use_gpu else {})}


def _tuner(sweep: SweepConfig, base: Config, context: TrialContext, resume: bool,
           callbacks: list, verbose: bool):
    cpus_per_trial = sweep.resources.cpus_per_trial
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    trial_resources(sweep, base))
    if resume:
        log.info("resuming sweep %s from %s", sweep.name, sweep.sweep_dir)
        # Tune's state brings back the first run's callbacks (its console) and verbosity.
        return tune.Tuner.restore(str(sweep.sweep_dir), trainable=trainable)
    search = sweep.search
    scheduler = None
    if sweep.asha.enabled:
        # max_t just below max_steps, stop_last_trials off: ASHA never stops a trial at its
        # final report, which would kill it before it closes its MLflow run.
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="step", metric=sweep.asha.metric or search.metric, mode=search.mode,
            max_t=base.training.max_steps - 1, grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor, stop_last_trials=False)
    concurrency = search.max_concurrent_trials or max_concurrent_trials(base, cpus_per_trial)
    log.info("sweep %s: %d trials, at most %d at a time, Tune state in %s", sweep.name,
             sweep.expected_trials, concurrency, sweep.sweep_dir)
    in_trial = context.runner == "in_trial"
    checkpoint = base.checkpoint
    search_alg, param_space, num_samples = search_algorithm(sweep, base, concurrency)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
            trial_dirname_creator=_trial_dirname,
            reuse_actors=in_trial and sweep.resources.reuse_actors),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=str(Path(sweep.storage_path)),
            stop=CollapseStopper(sweep.stopper, context) if sweep.stopper.enabled else None,
            callbacks=[EarlyStopRecorder(context), *callbacks], verbose=1 if verbose else 0,
            # in_trial checkpoints are Tune's (a TorchTrainer keeps its own, alike)
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=checkpoint.keep, checkpoint_score_attribute=checkpoint.metric,
                checkpoint_score_order=checkpoint.mode) if in_trial else None,
            failure_config=tune.FailureConfig(
                max_failures=sweep.resources.max_trial_failures)))


def _trial_dirname(trial) -> str:
    return f"trial-{trial_key(trial.config)}"


def max_concurrent_trials(base: Config, cpus_per_trial: float) -> int:
    """As many trials as the cluster's CPUs (and GPUs) hold at once, at least 1."""
    import ray

    sc = base.scaling
    available = ray.cluster_resources()
    counts = [available.get("CPU", 1.0) / (cpus_per_trial + sc.num_workers * sc.cpus_per_worker)]
    if sc.use_gpu and sc.num_workers:
        counts.append(available.get("GPU", 0.0) / (sc.num_workers * sc.gpus_per_worker))
    return max(1, math.floor(min(counts) + 1e-9))


def _saved_spec(sweep: SweepConfig) -> SweepConfig:
    path = sweep.sweep_dir / SPEC_FILE
    if not path.is_file():
        return sweep
    saved = load_sweep(path)
    if saved.to_dict() != sweep.to_dict():
        log.warning("--resume continues sweep %s with the spec it started with (%s), not "
                    "the one given now", sweep.name, path)
    return saved
