"""``freetf train``'s console: what runs where, its progress, its evaluations, its result.

By default ``freetf train`` prints what a person reads while one run trains:

- one line of what runs where: the model, the steps, the workers, the run folder (and the
  step the run continues from);
- a progress line (step, loss, the raw KL in bits per token, tokens/s, the time left) at
  the first log step, then at doubling intervals up to a minute, and at the last step;
- one short line per evaluation before the last: cross-entropy with Z from the prior and
  from the encoder, KL, and the use of Z and the validity of free generations where they
  were measured;
- the summary: the final measurements, a few samples, the checkpoint and the MLflow run.

No verdict word unless the run's evaluations agree that it converged
(``eval/converged``): a 10-step run's fixed-threshold verdict is logged to MLflow (tag
``freetf.verdict``) but is not a finding.  The numbers are printed instead.

In-process the loop hands each report to :meth:`TrainConsole.report`
(``TrainContext.listener``).  Under Ray the loop runs in a worker whose output is not
shown: :class:`MlflowProgress` reads the metrics rank 0 logs to MLflow every few seconds
(with MLflow off there is no progress line, only the summary).  Ray's and the libraries'
output is hidden (:func:`freetf.logs.setup_console`, Ray started with
``log_to_driver=False``); ``--verbose`` brings it back, with freetf's own log lines, and
then only the first line and the summary come from here.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import IO, Any

from freetf.config import Config
from freetf.logs import duration

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
PROGRESS_EVERY_S = 10.0  # the second progress line; then at doubling intervals ...
PROGRESS_MAX_S = 60.0  # ... up to this
POLL_EVERY_S = 2.0  # MlflowProgress: seconds between two reads of the run's metrics
SAMPLES_SHOWN = 4


class TrainConsole:
    """The lines of one training run (see the module doc).  ``clock`` and ``stream`` are
    for tests; ``verbose``: no progress or evaluation lines (freetf's log shows them)."""

    def __init__(self, verbose: bool = False, stream: IO[str] | None = None,
                 clock=time.monotonic, progress_every_s: float = PROGRESS_EVERY_S) -> None:
        self.verbose = verbose
        self.stream = stream
        self.clock = clock
        self.cfg: Config | None = None
        self.total_steps: int | None = None
        self.progress_every_s = progress_every_s
        self._interval = progress_every_s
        self._anchor: tuple[float, int] | None = None  # (clock, step) of the first report
        self._last_line: float | None = None
        self._last_step = 0
        self._last_eval = 0
        self._lock = threading.Lock()  # MlflowProgress writes from its thread

    # -- what the runner calls

    def start(self, plan) -> None:
        """The first line: ``plan`` is a :class:`freetf.training.run_folder.RunPlan`."""
        self.cfg = plan.cfg
        self._last_step = self._last_eval = plan.start_step
        self._write(describe_run(plan))

    def report(self, metrics: dict[str, Any], total_steps: int | None = None) -> None:
        """One report of the loop (in-process): a progress line, an evaluation line."""
        step = int(metrics["step"])
        self.progress(step, metrics, total_steps)
        if any(key.startswith("eval/") for key in metrics):
            self.evaluation(step, metrics)

    def progress(self, step: int, metrics: dict[str, Any],
                 total_steps: int | None = None) -> None:
        """A progress line if one is due: the first, the last, or after the interval."""
        with self._lock:
            self.total_steps = total_steps or self.total_steps
            if step <= self._last_step or "train/loss" not in metrics:
                return  # (an evaluation before the first log step has no train metrics)
            self._last_step = step
            now = self.clock()
            if self._anchor is None:
                self._anchor = (now, step)
            elif step != self.total_steps and now - self._last_line < self._interval:
                return
            elif step != self.total_steps:
                self._interval = min(2 * self._interval,
                                     max(PROGRESS_MAX_S, self.progress_every_s))
            self._last_line = now
            if not self.verbose:
                self._write(self.progress_line(step, metrics, now))

    def evaluation(self, step: int, metrics: dict[str, Any]) -> None:
        """An evaluation line, but for the last step's (the summary shows it)."""
        with self._lock:
            if step <= self._last_eval:
                return
            self._last_eval = step
            if not self.verbose and step != self.total_steps:
                self._write(evaluation_line(step, metrics, self._latent_bits()))

    def summary(self, summary) -> None:
        """The end of a run: ``summary`` is a :class:`freetf.training.ray_train.RunSummary`."""
        for line in summary_lines(summary, self.cfg):
            self._write(line)

    def _latent_bits(self) -> int | None:
        return self.cfg.model.latent_bits if self.cfg is not None else None

    # -- the lines

    def progress_line(self, step: int, metrics: dict[str, Any], now: float) -> str:
        """``step 100/600  loss 2.134  KL 0.93 bits  2.6k tokens/s  about 4m10s left``."""
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"step {step}{total}", f"loss {_num(metrics.get('train/loss'), 4)}"]
        if metrics.get("train/kl_bits") is not None:
            parts.append(f"KL {_num(metrics['train/kl_bits'])} bits")
        if metrics.get("train/tokens_per_s"):
            parts.append(f"{_count(metrics['train/tokens_per_s'])} tokens/s")
        start_time, start_step = self._anchor or (now, step)
        if self.total_steps and start_step < step < self.total_steps and now > start_time:
            rate = (step - start_step) / (now - start_time)
            parts.append(f"about {duration((self.total_steps - step) / rate)} left")
        return "  ".join(parts)

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(text + "\n")
        stream.flush()


def describe_run(plan) -> str:
    """``training tiny: free transformer (H=4 bits), 20 steps of 8 x 66 tokens on the
    synthetic task, 1 Ray Train worker (CPU) -> ray_results/tiny``."""
    from freetf.training.paths import run_name
    from freetf.training.run_folder import shown_path

    cfg = plan.cfg
    tcfg, sc = cfg.training, cfg.scaling
    model = (f"free transformer (H={cfg.model.latent_bits} bits)" if cfg.model.has_latent
             else "baseline (no latent)")
    workers = max(sc.num_workers, 1) if sc.use_ray else 1
    batch = tcfg.batch_size * workers * tcfg.grad_accum_steps
    steps = (f"{tcfg.max_steps} steps" if tcfg.max_steps else
             f"{tcfg.num_epochs} epoch{'s' if tcfg.num_epochs > 1 else ''}")
    data = ("the synthetic task" if cfg.data.dataset_name == "synthetic"
            else f"{cfg.data.dataset_name} {shown_path(cfg.data.path)}")
    device = "GPU" if sc.use_gpu or tcfg.device == "cuda" else "CPU"
    if not sc.use_ray:
        where = "in this process"
    elif sc.num_workers == 0:
        where = "in Ray Train's local mode (this process)"
    else:
        plural = "s" if sc.num_workers > 1 else ""
        where = f"on {sc.num_workers} Ray Train worker{plural} ({device})"
    line = (f"training {run_name(cfg)}: {model}, {steps} of {batch} x "
            f"{cfg.data.max_seq_len} tokens on {data} {where} -> {shown_path(plan.folder)}")
    if plan.resume:
        line += f"; continuing from {shown_path(plan.resume)} (step {plan.start_step})"
    return line


def evaluation_line(step: int, metrics: dict[str, Any], latent_bits: int | None = None) -> str:
    """``eval at step 200: CE 1.5230 nats (prior Z), 1.4980 (encoder Z); KL 0.980 bits;
    use of Z 0.031 nats; valid 0.940``."""
    return f"eval at step {step}: " + "; ".join(_measured(metrics, latent_bits, short=True))


def summary_lines(summary, cfg: Config | None) -> list[str]:
    """The measurements at the end, samples, the checkpoint, and where MLflow has it all."""
    metrics = summary.metrics
    lines = [f"finished {metrics.get('step', '?')} steps in {summary.wall_s:.0f} s"]
    train = [f"loss {_num(metrics['train/loss'], 4)}"] if "train/loss" in metrics else []
    if "train/ce_nats" in metrics:
        train.append(f"CE {_num(metrics['train/ce_nats'], 4)} nats")
    if "train/kl_bits" in metrics:
        train.append(f"KL {_num(metrics['train/kl_bits'])} bits per token")
    if metrics.get("train/tokens_per_s"):
        train.append(f"{_count(metrics['train/tokens_per_s'])} tokens/s")
    if train:
        lines.append("  train  " + ", ".join(train))
    measured = _measured(metrics, cfg.model.latent_bits if cfg is not None else None)
    if measured:  # the cross-entropies and KL on one line, the use of Z and validity below
        lines.append("  eval   " + "; ".join(measured[:2]))
    if measured[2:]:
        lines.append("         " + "; ".join(measured[2:]))
    if metrics.get("eval/converged") and metrics.get("eval/verdict"):
        lines.append(f"  latent {metrics['eval/verdict']} (the last evaluations agree; "
                     f"per-run thresholds, diagnostics.*)")
    lines += [f"  sample: {text}" for text in metrics.get("eval/samples", [])[:SAMPLES_SHOWN]]
    if summary.checkpoint:
        lines.append(f"checkpoint: {summary.checkpoint}")
    if summary.run_id and cfg is not None:
        from freetf.tracking import mlflow_client, resolve_tracking_uri, runs_page_url

        uri = resolve_tracking_uri(cfg)
        experiment_id = mlflow_client(uri).get_run(summary.run_id).info.experiment_id
        lines += [f"MLflow run {summary.run_id} in experiment "
                  f"'{cfg.tracking.mlflow.experiment}'; compare runs with: mlflow ui "
                  f"--backend-store-uri {uri}", f"  then open {runs_page_url(experiment_id)}"]
    return lines


def _measured(metrics: dict[str, Any], latent_bits: int | None = None,
              short: bool = False) -> list[str]:
    """An evaluation's numbers, those that were measured: the cross-entropies, KL, the use
    of Z, the validity of free generations (``short``: without intervals)."""
    parts = []
    if "eval/ce_prior_nats" in metrics:
        text = f"CE {_num(metrics['eval/ce_prior_nats'], 4)} nats"
        if "eval/ce_posterior_nats" in metrics:
            posterior = _num(metrics["eval/ce_posterior_nats"], 4)
            text += (f" (prior Z), {posterior} (encoder Z)" if short else
                     f" with Z from the prior, {posterior} from the encoder")
        parts.append(text)
    if "eval/kl_bits" in metrics:
        text = f"KL {_num(metrics['eval/kl_bits'])} bits"
        if "eval/active_bits" in metrics and not short:
            of = f" of {latent_bits}" if latent_bits else ""
            text += f", {int(metrics['eval/active_bits'])}{of} bits active"
        parts.append(text)
    if "eval/use_nats" in metrics:
        parts.append(f"use of Z {_num(metrics['eval/use_nats'])} nats"
                     + ("" if short else _interval(metrics, "eval/use_low_nats",
                                                   "eval/use_high_nats")))
    if "eval/valid_rate" in metrics:
        parts.append(f"valid {_num(metrics['eval/valid_rate'])}" if short else
                     f"valid generations {_num(metrics['eval/valid_rate'])}"
                     + _interval(metrics, "eval/valid_low", "eval/valid_high"))
    return parts


class MlflowProgress:
    """Under Ray: read the run's MLflow metrics (rank 0 logs every log step) every
    ``interval_s`` in a thread, and hand them to ``console``.  A context manager around
    ``fit()``: on leaving it reads once more (the last step).  A failed read is skipped:
    the console never stops a run."""

    def __init__(self, client, run_id: str, console: TrainConsole,
                 interval_s: float = POLL_EVERY_S) -> None:
        self.client, self.run_id, self.console = client, run_id, console
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="freetf-progress", daemon=True)

    def __enter__(self) -> MlflowProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10 * self.interval_s)
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        try:
            run = self.client.get_run(self.run_id)
            metrics, params = run.data.metrics, run.data.params
            if "train/steps_done" not in metrics:
                return
            total = int(params["total_steps"]) if params.get("total_steps") else None
            self.console.progress(int(metrics["train/steps_done"]), metrics, total)
            if "eval/ce_prior_nats" in metrics:
                history = self.client.get_metric_history(self.run_id, "eval/ce_prior_nats")
                self.console.evaluation(max(point.step for point in history), metrics)
        except Exception as err:  # noqa: BLE001 - progress is best effort
            log.debug("reading the run's progress from MLflow failed: %s", err)


def _interval(metrics: dict[str, Any], low: str, high: str) -> str:
    if metrics.get(low) is None or metrics.get(high) is None:
        return ""
    return f" [{_num(metrics[low])}, {_num(metrics[high])}]"


def _num(value: Any, digits: int = 3) -> str:
    """``0.1348`` -> ``0.135``; what would read 0.000 in scientific notation, ``1.2e-06``."""
    if value is None:
        return "-"
    if isinstance(value, float) and 0 < abs(value) < 10 ** -digits:
        return f"{value:.1e}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _count(value: float) -> str:
    """``26241.9`` -> ``26.2k``."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"
