"""A clean stop on SIGTERM or SIGINT: finish the step, save a checkpoint, end the run.

Schedulers stop a job with SIGTERM (Slurm, Kubernetes, Ray's autoscaler) and send
SIGKILL after a grace period (Slurm's ``KillWait``, Kubernetes'
``terminationGracePeriodSeconds``: 30 s by default); Ctrl-C sends SIGINT.  While
:func:`stop_on_signals` is active (``freetf train``, around the whole run), the first
of either signal asks the training loop to stop (:func:`requested_signal`): it does so
at the next step boundary, saves a checkpoint, reports it and raises
:class:`TrainingStopped`; the run's MLflow run ends KILLED and the command exits with
128 + the signal's number (143 for SIGTERM, 130 for SIGINT).  A second signal stops at
once: SIGINT raises ``KeyboardInterrupt`` (``freetf train: interrupted``), SIGTERM takes
its default action (the process ends, its MLflow run stays RUNNING).

A Ray Tune sweep stops on SIGINT by itself (Tune saves its state and the sweep can be
resumed); :func:`sigterm_as` gives SIGTERM the same stop.

The flag is this process's: the loop reads it through its context
(:meth:`freetf.training.context.TrainContext.requested_stop`), and a runner whose loop
runs elsewhere forwards it (``on_request``; Ray Train: the driver publishes it for the
workers, :mod:`freetf.training.ray_context`).  Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_requested: list[int] = []  # the signal that asked for the stop (one at most)
_lock = threading.Lock()


class TrainingStopped(Exception):
    """The run stopped at a step boundary because a signal asked it to.

    ``checkpoint``: the checkpoint saved at the stop (under Ray, the persisted one, which
    the driver fills in); None if the stop came before the first step.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None = None) -> None:
        super().__init__(f"stopped by {signal_name(signum)} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    def __reduce__(self):
        return type(self), (self.signum, self.step, self.checkpoint)

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal: 128 + its number."""
        return 128 + self.signum

    def explain(self) -> str:
        """One line: which signal, after which step, where the checkpoint is."""
        if self.checkpoint is None:
            return f"{self}; no checkpoint was saved"
        return (f"{self}; checkpoint: {self.checkpoint} (continue with --resume "
                f"{self.checkpoint})")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def requested_signal() -> int | None:
    """The signal that asked this process's run to stop, or None."""
    return _requested[0] if _requested else None


def request_stop(signum: int) -> bool:
    """Ask for a stop (as the first signal does).  -> False if one was asked already."""
    with _lock:
        if _requested:
            return False
        _requested.append(signum)
        return True


@contextlib.contextmanager
def stop_on_signals(on_request: Callable[[int], None] | None = None) -> Iterator[None]:
    """Handle SIGTERM and SIGINT as above while the block runs (in the main thread; a
    no-op elsewhere), then restore the handlers and clear the request.

    ``on_request(signum)``: called in the handler at the first signal, to forward the
    stop (it must not block for long).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def handle(signum: int, frame) -> None:
        if not request_stop(signum):  # the second signal: stop at once
            _at_once(signum)
            return
        log.warning("%s: stopping after the current step (a checkpoint is saved); send it "
                    "again to stop at once", signal_name(signum))
        if on_request is not None:
            on_request(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handle)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        _requested.clear()


def _at_once(signum: int) -> None:
    for each in STOP_SIGNALS:
        signal.signal(each, signal.default_int_handler if each == signal.SIGINT
                      else signal.SIG_DFL)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.raise_signal(signum)


@contextlib.contextmanager
def sigterm_as(signum: int) -> Iterator[list[int]]:
    """While the block runs, SIGTERM calls the Python handler that ``signum`` has then
    (Ray Tune's SIGUSR1 handler is its Ctrl-C stop), or raises KeyboardInterrupt if it
    has none.  -> a list that holds SIGTERM once one came (main thread only)."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return

    def handle(received: int, frame) -> None:
        came.append(received)
        target = signal.getsignal(signum)
        if not callable(target) or target is handle:
            raise KeyboardInterrupt
        log.warning("SIGTERM: stopping as on Ctrl-C")
        target(signum, frame)

    saved = signal.signal(signal.SIGTERM, handle)
    try:
        yield came
    finally:
        signal.signal(signal.SIGTERM, saved)
