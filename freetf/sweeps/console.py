"""A sweep's console: progress, a short status table, and quiet libraries.

By default a sweep prints what a person reads while it runs:

- one line per ended trial, with the progress (trials ended / total, time elapsed and an
  estimate of the time left, from the steps trained so far);
- a table of the running trials after ``status_every_s``, then at doubling intervals up
  to five minutes (a long sweep stays short): kappa (bits), ``kl_weight``, seed, step,
  raw KL (bits per token), the decoder's use of Z (``eval/use_nats``, nats per token) and
  the validity of free generations at the last evaluation.  No verdict word: a verdict
  needs the trial's baseline and comes in the sweep's summary.

Ray's and the libraries' own output (Tune's status tables, the trial processes'
per-report dumps and log lines, MLflow's database set-up) is hidden: :func:`setup_console`
quiets their loggers, and the sweep starts Ray with ``log_to_driver=False`` (the trial
processes still write their logs into Ray's session folder).  ``--verbose`` brings all
of it back, and then :class:`SweepConsole` stays silent.
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any

from ray import tune

from freetf.config import Config, apply_overrides, from_dict
from freetf.logs import QUIET_LOGGERS, duration, setup_console  # noqa: F401 - the sweep's API
from freetf.sweeps.spec import STOP_REASON, SweepConfig

STATUS_EVERY_S = 60.0  # the first status table; then at doubling intervals ...
STATUS_MAX_S = 300.0  # ... up to this
LN2 = math.log(2.0)


class SweepConsole(tune.Callback):
    """Progress lines and a status table of the running trials (see the module doc).

    ``total``: the trials the sweep will run (``SweepConfig.expected_trials``; 0 when
    unknown: no time estimate then).  ``clock`` and ``stream`` are for tests.
    """

    def __init__(self, sweep: SweepConfig, base: Config, verbose: bool = False,
                 stream: IO[str] | None = None, status_every_s: float = STATUS_EVERY_S,
                 clock=time.monotonic) -> None:
        self.enabled = not verbose
        self.total = sweep.expected_trials
        self.keys = sweep.trial_keys  # boundary search: the seed and latent size too
        self.base = base.to_dict()
        self.max_steps = base.training.max_steps
        self.status_every_s = status_every_s
        self.stream = stream
        self.clock = clock
        self._reset()

    def _reset(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}  # trial id -> what the table shows
        self.ended = 0
        self._start: float | None = None
        self._last_table: float | None = None
        self._interval = self.status_every_s

    def __getstate__(self) -> dict[str, Any]:  # pickled into Tune's state (resume)
        return {**self.__dict__, "stream": None, "clock": None, "rows": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.clock = time.monotonic
        self._reset()

    # -- Tune's hooks

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        if self._start is None:
            self._start = self._last_table = self.clock()
        self._row(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict,
                        **info: Any) -> None:
        row = self._row(trial)
        row["step"] = result.get("step", row["step"])
        kl = result.get("eval/kl_bits", result.get("train/kl_bits"))
        if kl is not None:
            row["kl_bits"] = kl
        for key, name in (("eval/use_nats", "use_nats"), ("eval/valid_rate", "valid")):
            if result.get(key) is not None:
                row[name] = result[key]
        if result.get(STOP_REASON):
            row["stop"] = result[STOP_REASON]
        if self.enabled and self._last_table is not None and \
                self.clock() - self._last_table >= self._interval:
            self._last_table = self.clock()
            self._interval = min(2 * self._interval, max(STATUS_MAX_S, self.status_every_s))
            self._write(self.status_table())

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._ended(trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._ended(trial, "failed")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        if self.enabled:
            self._write(f"retrying {self._describe(self._row(trial))} after an error")

    # -- what is shown

    def progress(self) -> str:
        """``3/8 trials ended, 1m40s elapsed, about 2m50s left``."""
        elapsed = self.clock() - self._start if self._start is not None else 0.0
        text = f"{self.ended}/{self.total or '?'} trials ended, {duration(elapsed)} elapsed"
        if self.total and self.max_steps:
            running = sum(min(r["step"], self.max_steps) / self.max_steps
                          for r in self.rows.values() if not r["ended"])
            fraction = min(1.0, (self.ended + running) / self.total)
            if 0 < fraction < 1 and elapsed >= 1:
                text += f", about {duration(elapsed * (1 - fraction) / fraction)} left"
        return text

    def status_table(self) -> str:
        """The running trials, one line each, under the progress line."""
        rows = [r for r in self.rows.values() if not r["ended"]]
        lines = [self.progress()]
        if rows:
            lines += _table(["kappa bits", "kl_weight", "seed", "step", "KL bits",
                             "use nats", "state", *(["point"] if self._others() else [])],
                            [self._cells(r) for r in rows])
        return "\n".join(lines)

    def _ended(self, trial, verdict: str | None) -> None:
        row = self._row(trial)
        if row["ended"]:
            return
        row["ended"] = True
        self.ended += 1
        if verdict is not None:
            row["verdict"] = verdict
        elif self.max_steps and row["step"] < self.max_steps and not row["stop"]:
            row["stop"] = "asha"  # stopped early without the stopper's reason
        if self.enabled:
            self._write(f"[{self.progress()}] {self._describe(row)}")

    def _describe(self, row: dict[str, Any]) -> str:
        """``kappa 0.25 bits, kl_weight 1, seed 0: ended at step 300, KL 0.245 bits, ...``"""
        cells = self._cells(row)
        point = ", ".join(part for part in (
            f"kappa {cells[0]} bits" if cells[0] != "-" else "baseline",
            f"kl_weight {cells[1]}", f"seed {cells[2]}", *cells[7:]) if part)
        verdict = cells[6] if cells[6] != "-" else "ended"
        text = f"{point}: {verdict} at step {row['step']}"
        if row["kl_bits"] is not None:
            text += f", KL {cells[4]} bits"
        if row["use_nats"] is not None:
            text += f", use {cells[5]} nats"
        if row["valid"] is not None:
            text += f", valid {_num(row['valid'])}"
        return text

    def _cells(self, row: dict[str, Any]) -> list[str]:
        verdict = row["verdict"] or "-"
        if row["stop"]:  # "asha": ended early by the scheduler, which gives no reason
            reason = row["stop"] if row["stop"] != "asha" else row["verdict"] or "ended"
            verdict = f"{reason} (stopped)"
        step = f"{row['step']}/{self.max_steps}" if self.max_steps else str(row["step"])
        cells = [_num(row["kappa_bits"]), _num(row["kl_weight"]), str(row["seed"]), step,
                 _num(row["kl_bits"]), _num(row["use_nats"]), verdict]
        if self._others():
            cells.append(",".join(f"{k.rsplit('.', 1)[-1]}={_num(row['sampled'].get(k))}"
                                  for k in self._others()))
        return cells

    def _others(self) -> tuple[str, ...]:
        shown = ("training.free_bits_bits", "training.free_bits", "training.kl_weight",
                 "training.seed")
        return tuple(k for k in self.keys if k not in shown)

    def _row(self, trial) -> dict[str, Any]:
        row = self.rows.get(trial.trial_id)
        if row is None:
            sampled = {k: _plain(trial.config.get(k)) for k in self.keys if k in trial.config}
            cfg = from_dict(apply_overrides(self.base, sampled))
            row = self.rows[trial.trial_id] = {
                "sampled": sampled, "kl_weight": cfg.training.kl_weight,
                "kappa_bits": cfg.training.free_bits_nats / LN2 if cfg.model.has_latent else None,
                "seed": cfg.training.seed, "step": 0, "kl_bits": None, "use_nats": None,
                "valid": None, "verdict": None, "stop": None, "ended": False}
        return row

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(text + "\n")
        stream.flush()


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
            for cells in (headers, *rows)]


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
