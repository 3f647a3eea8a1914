"""Ray Tune sweeps over the KL weight, free bits and their schedules (arXiv:2510.17558 §3.3).

The free-bits KL term (eqs. 4-5) has two failure regimes, posterior collapse and leak;
a sweep over ``training.kl_weight``, ``training.free_bits[_bits]`` and the annealing
schedules locates the boundary between them.  One sweep is:

- a YAML spec (:class:`SweepConfig`): a base freetf config plus overrides, a search
  space over any dotted config key, the search method (grid, random, Optuna TPE), ASHA,
  the collapse / divergence stopper, per-trial resources and the MLflow names;
- one Tune trial per point, each running the Ray Train loop (``TorchTrainer`` inside a
  function trainable, reporting through ``TuneReportCallback``: Ray 2.60's pattern,
  since ``Tuner(trainer)`` is not supported by Train V2);
- one MLflow parent run per sweep and one child run per trial, found again by its tags
  (``freetf.sweep``, ``freetf.trial_key``) so a resumed sweep (``resume=True``,
  ``Tuner.restore``) reuses its runs and never duplicates a finished trial;
- at the end, the collapse map of :mod:`freetf.report`, logged to the parent run.

Tune kills a trial stopped by ASHA or by the stopper without running the code after
``trainer.fit()``: the driver closes its child run instead (KILLED,
``freetf.stopped_early=true``), from a Tune callback as soon as the trial stops.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from freetf.config import Config, ConfigError, apply_overrides, from_dict
from freetf.sweeps.search import search_algorithm
from freetf.sweeps.spec import (  # noqa: F401 - load_sweep, SweepError: the public API
    SPEC_FILE,
    STOP_REASON,
    StopperSpec,
    SweepConfig,
    SweepError,
    load_sweep,
)

log = logging.getLogger(__name__)

TAG_SWEEP, TAG_ROLE, TAG_KEY = "freetf.sweep", "freetf.role", "freetf.trial_key"


# ----------------------------------------------------------------------------- trials


def trial_key(sampled: dict[str, Any]) -> str:
    """A stable id of a trial's sampled values (the same point always gets the same key)."""
    text = json.dumps({k: _plain(v) for k, v in sorted(sampled.items())}, sort_keys=True,
                      default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def trial_run_name(sweep_name: str, sampled: dict[str, Any]) -> str:
    """``<sweep>/<key>=<value>,...``, with the shortest unambiguous key names."""
    labels = {k: k.rsplit(".", 1)[-1] for k in sampled}
    if len(set(labels.values())) < len(labels):
        labels = {k: k for k in sampled}
    parts = [f"{labels[k]}={_short(v)}" for k, v in sorted(sampled.items())]
    return f"{sweep_name}/{','.join(parts)}"


def _short(value: Any) -> str:
    value = _plain(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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

    def trial_config(self, sampled: dict[str, Any]) -> Config:
        key = trial_key(sampled)
        return from_dict(apply_overrides(self.base, {
            **sampled, "tracking.mlflow.run_name": trial_run_name(self.sweep_name, sampled),
            "scaling.run_name": f"trial-{key}"}))

    def max_steps(self, sampled: dict[str, Any]) -> int:
        return int(sampled.get("training.max_steps") or self.base["training"]["max_steps"])


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Tune function trainable: one Ray Train run in its own MLflow child run.

    A child run of the same trial key that already FINISHED (a resumed sweep whose
    driver died after the trial ended) is not trained again: its metrics are reported.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from freetf.logs import setup_logging
    from freetf.tracking import make_tracker, mlflow_client
    from freetf.training.ray_train import build_trainer

    setup_logging()
    sampled = {k: _plain(config[k]) for k in context.keys}
    key = trial_key(sampled)
    cfg = context.trial_config(sampled)
    client = mlflow_client(context.tracking_uri)
    existing = find_trial_run(client, context.parent_run_id, key)
    if existing is not None and existing.info.status == "FINISHED":
        log.info("trial %s already finished in MLflow run %s; not rerun", key,
                 existing.info.run_id)
        tune.report({**existing.data.metrics,
                     "eval/verdict": existing.data.tags.get("freetf.verdict", "")})
        return
    tracker = make_tracker(
        cfg, run_id=existing.info.run_id if existing else None,
        parent_run_id=context.parent_run_id, run_name=cfg.tracking.mlflow.run_name,
        tags={TAG_SWEEP: context.sweep_name, TAG_ROLE: "trial", TAG_KEY: key,
              "freetf.sampled": json.dumps(sampled), "freetf.stopped_early": "false"})
    tracker.log_params({f"sampled.{k}": v for k, v in sampled.items()})
    if existing is not None and "freetf.error" in existing.data.tags:  # from a cut-off try
        client.delete_tag(tracker.run_id, "freetf.error")
    trainer = build_trainer(cfg, run_id=tracker.run_id, callbacks=[TuneReportCallback()],
                            storage_path=context.train_storage,
                            controller_failure_limit=context.controller_failure_limit)
    try:
        result = trainer.fit()
    except BaseException as err:
        # Tune stopping the trial (ASHA, stopper) also lands here when it removes the
        # trial's resources: the driver has then already closed the run as stopped early.
        if client.get_run(tracker.run_id).data.tags.get("freetf.stopped_early") != "true":
            tracker.set_tags({"freetf.verdict": "failed",
                              "freetf.error": f"{type(err).__name__}: {err}"})
            tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    _finish_trial_run(tracker, client, dict(result.metrics or {}), result.checkpoint)


def _finish_trial_run(tracker, client, metrics: dict[str, Any], checkpoint) -> None:
    from freetf.tracking import CURVE_METRICS, metric_history, plot_training_curves
    from freetf.training.ray_train import log_run_artifacts

    history = metric_history(client, tracker.run_id, CURVE_METRICS)
    path = Path(checkpoint.path) if checkpoint is not None else None
    log_run_artifacts(tracker, metrics, path, history, plot_training_curves)
    tracker.finish("FINISHED")


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


# ----------------------------------------------------------------------------- stopping


class CollapseStopper(tune.Stopper):
    """Stop a trial once it is clearly collapsed or diverged (before ASHA would).

    Collapsed: raw train KL (``train/kl_nats``) below ``collapse_kl_nats`` in
    ``collapse_patience`` consecutive reports from step ``collapse_after_steps`` on.
    Diverged: a train loss that is not finite or above ``diverge_loss``.  The reason is
    written into the result (``freetf/stop_reason``) for :class:`EarlyStopRecorder`.
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
            result[STOP_REASON] = "collapsed"
            return True
        return False

    def stop_all(self) -> bool:
        return False


class EarlyStopRecorder(tune.Callback):
    """Close the MLflow child run of a trial that Tune stopped early (ASHA, stopper).

    Such a trial is killed inside ``trainer.fit()``; its run is marked KILLED with tags
    ``freetf.stopped_early=true``, ``freetf.stop_reason``, ``freetf.stopped_at_step`` and
    ``freetf.verdict`` (the last evaluation's, or the stopper's reason).  Its worker may
    log a few more steps before Ray has torn it down.
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
        verdict = result.get("eval/verdict") if reason == "asha" else reason
        try:
            if self._client is None:
                from freetf.tracking import mlflow_client

                self._client = mlflow_client(self.context.tracking_uri)
            run = find_trial_run(self._client, self.context.parent_run_id, trial_key(sampled))
            if run is None:
                return
            for tag, value in (("freetf.stopped_early", "true"), ("freetf.stop_reason", reason),
                               ("freetf.stopped_at_step", str(result.get("step"))),
                               ("freetf.verdict", verdict or "unknown")):
                self._client.set_tag(run.info.run_id, tag, value)
            self._client.set_terminated(run.info.run_id, "KILLED")
            log.info("trial %s stopped early at step %s (%s, verdict %s)", trial_key(sampled),
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
    runs: Any  # pandas DataFrame, one row per trial (freetf.report.collect_runs)
    report: dict[str, Path]
    interrupted: bool
    analysis: Any = None  # freetf.sweeps.analysis.SweepAnalysis: verdicts, boundaries


def run_sweep(sweep: SweepConfig, resume: bool = False) -> SweepResult:
    """Run (or, with ``resume``, continue) ``sweep`` on the local or joined Ray cluster.

    A fresh sweep refuses a name that already has Tune state or an MLflow parent run;
    ``resume`` restores Tune's state (``Tuner.restore``) with the spec saved by the first
    run and reattaches the parent and unfinished child runs.  Returns after the report
    is written, also when the sweep was interrupted (Ctrl-C): ``interrupted`` is then set.
    """
    from freetf.sweeps import analysis, report
    from freetf.tracking import log_sweep_analysis, make_tracker, mlflow_client

    # Train reports carry the eval metrics (ASHA's, the search's) only at eval steps.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
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
    uri, experiment = base.tracking.mlflow.tracking_uri, base.tracking.mlflow.experiment
    client = mlflow_client(uri)
    parent = _find_parent(client, experiment, sweep.name)
    if parent is not None and not resume:
        raise SweepError(f"MLflow experiment {experiment!r} at {uri} already has a sweep "
                         f"named {sweep.name!r} (run {parent.info.run_id}); choose another "
                         f"with --set mlflow.sweep_name=NEW_NAME")
    _init_ray()
    tracker = make_tracker(base, run_id=parent.info.run_id if parent else None,
                           run_name=sweep.name, tags={TAG_SWEEP: sweep.name, TAG_ROLE: "sweep"})
    tracker.log_params({"sweep.method": sweep.search.method, "sweep.metric": sweep.search.metric,
                        "sweep.keys": ",".join(d.key for d in sweep.space)})
    tracker.log_text(sweep.to_yaml(), "search_space.yaml")
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep.sweep_dir / SPEC_FILE).write_text(sweep.to_yaml())
    context = TrialContext(
        sweep_name=sweep.name, parent_run_id=tracker.run_id, tracking_uri=uri,
        base=base.to_dict(), keys=sweep.trial_keys,
        train_storage=str(sweep.train_dir),
        controller_failure_limit=sweep.resources.controller_failure_limit)
    try:
        results = _tuner(sweep, base, context, resume).fit()
    except BaseException as err:  # a second Ctrl-C, or Tune itself failed
        _close_open_runs(client, context, None, interrupted=True)
        tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    # Tune marks the trials it stops on Ctrl-C TERMINATED too; only trials that ended
    # on their own (or were stopped by ASHA / the stopper) carry done=True.  A Ctrl-C can
    # also land after a trial closed its MLflow run but before Tune saw it end: MLflow
    # then knows it ended (and --resume will not run it again).
    done = ended_trials(results, context.keys, _ended_trial_keys(client, context.parent_run_id))
    interrupted = done < sweep.expected_trials
    log.info("sweep %s: %d of %d trials ended (%d errors)%s", sweep.name, done,
             sweep.expected_trials, results.num_errors,
             "; interrupted, continue it with --resume" if interrupted else "")
    _close_open_runs(client, context, results, interrupted)
    runs = report.collect_runs(client, experiment, sweep=sweep.name)
    found = analysis.analyse_sweep(runs, sweep, base)  # verdicts against the baselines
    log_sweep_analysis(client, context.parent_run_id, *analysis.mlflow_records(found))
    paths = report.write_report(client, found.trials, sweep.report_path)
    paths.update(analysis.write_analysis(found, sweep.report_path))
    for path in paths.values():
        tracker.log_artifact(path, "report")
    tracker.finish("KILLED" if interrupted else "FINISHED")
    return SweepResult(sweep, context.parent_run_id, uri, experiment, found.trials, paths,
                       interrupted, found)


def _init_ray() -> None:
    """``RAY_ADDRESS`` (a cluster you started) if set, else a new local Ray."""
    from freetf.training.ray_train import init_ray

    init_ray()


def _tuner(sweep: SweepConfig, base: Config, context: TrialContext, resume: bool):
    trial_cpu = sweep.resources.trial_cpu
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"cpu": trial_cpu})
    if resume:
        log.info("resuming sweep %s from %s", sweep.name, sweep.sweep_dir)
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
    concurrency = search.max_concurrent_trials or max_concurrent_trials(base, trial_cpu)
    log.info("sweep %s: %d trials, at most %d at a time, Tune state in %s", sweep.name,
             sweep.expected_trials, concurrency, sweep.sweep_dir)
    search_alg, param_space, num_samples = search_algorithm(sweep, base, concurrency)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=str(Path(sweep.storage_path)),
            stop=CollapseStopper(sweep.stopper, context) if sweep.stopper.enabled else None,
            callbacks=[EarlyStopRecorder(context)], verbose=1,
            failure_config=tune.FailureConfig(
                max_failures=sweep.resources.max_trial_failures)))


def _trial_dirname(trial) -> str:
    return f"trial-{trial_key(trial.config)}"


def max_concurrent_trials(base: Config, trial_cpu: float) -> int:
    """As many trials as the cluster's CPUs (and GPUs) hold at once, at least 1."""
    import ray

    sc = base.scaling
    available = ray.cluster_resources()
    counts = [available.get("CPU", 1.0) / (trial_cpu + sc.num_workers * sc.cpus_per_worker)]
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


def _find_parent(client, experiment: str, name: str):
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], max_results=10,
                              filter_string=f"tags.`{TAG_SWEEP}` = '{name}' "
                                            f"and tags.`{TAG_ROLE}` = 'sweep'")
    return min(runs, key=lambda r: r.info.start_time) if runs else None


def ended_trials(results, keys: tuple[str, ...], ended_in_mlflow: set[str]) -> int:
    """Trials that ended: failed, done by Tune's account, or ended by MLflow's."""
    def ended(result) -> bool:
        if result.error is not None or (result.metrics or {}).get("done"):
            return True
        return bool(result.config) and \
            trial_key({k: result.config.get(k) for k in keys}) in ended_in_mlflow
    return sum(1 for result in results if ended(result))


def _run_ended(run) -> bool:
    """A trial's MLflow run says it ended: FINISHED, or stopped early by ASHA / the stopper."""
    return run.info.status == "FINISHED" or run.data.tags.get("freetf.stopped_early") == "true"


def _ended_trial_keys(client, parent_run_id: str) -> set[str]:
    """Trial keys whose MLflow run says they ended."""
    return {run.data.tags.get(TAG_KEY) for run in child_runs(client, parent_run_id)
            if _run_ended(run)}


def _close_open_runs(client, context: TrialContext, results, interrupted: bool) -> None:
    """End the child runs that Tune left open: trials stopped before closing their run,
    and trials that Ctrl-C cut off (KILLED, verdict ``interrupted``: --resume reattaches
    them).  A trial's own except-clause may have marked a cut-off run FAILED: Tune
    knows better, so only a trial that Tune saw fail stays FAILED."""
    last = {}
    for result in results or []:
        if result.config:
            last[trial_key({k: result.config.get(k) for k in context.keys})] = result
    for run in child_runs(client, context.parent_run_id):
        tags = run.data.tags
        if _run_ended(run):
            continue
        result = last.get(tags.get(TAG_KEY))
        metrics = dict(result.metrics or {}) if result is not None else {}
        sampled = json.loads(tags.get("freetf.sampled", "{}"))
        step = metrics.get("step", run.data.metrics.get("step", 0))
        run_id = run.info.run_id
        if step >= context.max_steps(sampled):  # trained; stopped before closing its run
            if tags.get("freetf.verdict") in (None, "failed") and metrics.get("eval/verdict"):
                client.set_tag(run_id, "freetf.verdict", metrics["eval/verdict"])
            client.set_terminated(run_id, "FINISHED")
        elif result is not None and result.error is not None:
            if run.info.status == "RUNNING":
                client.set_tag(run_id, "freetf.verdict", "failed")
                client.set_terminated(run_id, "FAILED")
        else:
            client.set_tag(run_id, "freetf.verdict", "interrupted" if interrupted else "unknown")
            client.set_terminated(run_id, "KILLED")


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None, default_config: str | Path | None = None,
         smoke_config: str | Path | None = None) -> int:
    """``search_kl.py [--config YAML | --smoke] [--set KEY=VALUE ...] [--resume]``."""
    from freetf.logs import setup_logging
    from freetf.sweeps import report
    from freetf.tracking import TrackingError

    parser = argparse.ArgumentParser(description="Ray Tune sweep over KL weight, free bits "
                                     "and their schedules, with a collapse map in MLflow")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"sweep YAML (default: {default_config})")
    parser.add_argument("--smoke", action="store_true",
                        help=f"the one-minute smoke sweep ({smoke_config})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override: space.<key>={grid: [...]}, search.num_samples=4, "
                             "or a base-config key such as training.max_steps=50")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep of the same name")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    path = args.config or (smoke_config if args.smoke else default_config)
    try:
        result = run_sweep(load_sweep(path, args.set), resume=args.resume)
    except (ConfigError, TrackingError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print("\n".join([*result.analysis.summary_lines(), ""]) if result.analysis else "", end="")
    print(report.summary_text(result.runs, result.report, result.tracking_uri,
                              result.experiment))
    if result.interrupted:
        again = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
        print(f"\nThe sweep was interrupted; continue it with: "
              f"{' '.join([parser.prog, *again, '--resume'])}")
        return 130
    return 0
