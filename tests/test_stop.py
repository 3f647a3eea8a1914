"""A clean stop on SIGTERM / SIGINT (freetf.training.stop): the handlers, and the loop
that stops at the next step with a checkpoint a resume continues exactly from.
(tests/test_cli.py sends the signals to a real ``freetf train``.)"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
from pathlib import Path

import pytest
import torch
from train_helpers import losses, nan_losses_at, tiny

from freetf.training.checkpoint import load_checkpoint
from freetf.training.context import TrainContext
from freetf.training.loop import NonFiniteLossError, train_loop
from freetf.training.stop import (
    TrainingStopped,
    request_stop,
    requested_signal,
    signal_name,
    sigterm_as,
    stop_on_signals,
)

pytestmark = pytest.mark.timeout(120)


# first: with request_stop broken, a signal sent by a later test would end the process
def test_the_first_request_is_kept_until_the_block_ends():
    with stop_on_signals():
        assert requested_signal() is None
        assert request_stop(signal.SIGINT) is True
        assert request_stop(signal.SIGTERM) is False
        assert requested_signal() == signal.SIGINT
    assert requested_signal() is None


def test_the_first_signal_asks_for_a_stop_and_a_second_sigint_stops_at_once():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    forwarded = []
    with stop_on_signals(forwarded.append):
        os.kill(os.getpid(), signal.SIGTERM)  # the process lives on
        assert requested_signal() == signal.SIGTERM and forwarded == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert forwarded == [signal.SIGTERM]  # forwarded once
    assert requested_signal() is None
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_stop_ends_the_loop_at_the_next_step_with_a_checkpoint_to_resume_from(
        tmp_path, monkeypatch):
    """SIGTERM during step 3 (inside the loss): step 3 completes, is checkpointed and
    reported, TrainingStopped names that checkpoint; resuming from it gives the losses
    of an uninterrupted run."""
    import freetf.training.loop as loop
    from freetf.model.losses import compute_loss as real

    calls = {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    cfg = tiny(tmp_path, "training.max_steps=6", "training.log_every=4")
    uninterrupted = train_loop(cfg.replace([f"checkpoint.dir={tmp_path / 'ref'}"]))
    monkeypatch.setattr(loop, "compute_loss", signalled)
    ctx = TrainContext()
    with stop_on_signals(), pytest.raises(TrainingStopped) as info:
        train_loop(cfg, ctx)
    stopped = info.value
    assert (stopped.signum, stopped.step, stopped.exit_code) == (signal.SIGTERM, 3, 143)
    assert stopped.checkpoint == tmp_path / "ckpt" / "step_000003"
    assert str(stopped) == "stopped by SIGTERM after step 3"
    assert ctx.history[-1]["step"] == 3 and "train/loss" in ctx.history[-1]  # reported
    assert load_checkpoint(stopped.checkpoint)[0]["step"] == 3
    monkeypatch.undo()
    resumed = train_loop(cfg, TrainContext(resume_from=str(stopped.checkpoint)))
    # step 6's loss is the mean over steps 5-6 in both runs (step 4's window differs)
    assert losses(resumed.history)[6] == pytest.approx(losses(uninterrupted.history)[6],
                                                       rel=1e-6)
    ours, theirs = (load_checkpoint(r.checkpoint)[0]["model"] for r in (resumed, uninterrupted))
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)


def test_sigterm_takes_tunes_stop_while_a_sweep_runs():
    """Ray Tune stops a sweep gracefully (state saved, resumable) on SIGINT and SIGUSR1
    only: while the sweep runs, SIGTERM calls Tune's SIGUSR1 handler; with none there it
    is a KeyboardInterrupt (the sweep's own cleanup), never the default exit."""
    before, seen = signal.getsignal(signal.SIGTERM), []
    saved = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with sigterm_as(signal.SIGUSR1) as came:
            os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGUSR1] and came == [signal.SIGTERM]
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        with pytest.raises(KeyboardInterrupt), sigterm_as(signal.SIGUSR1):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGUSR1, saved)
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_stop_names_its_signal_step_and_checkpoint_and_crosses_processes():
    """What ``freetf train`` prints and exits with, and what Ray sends to the driver."""
    saved = TrainingStopped(signal.SIGINT, 7, Path("runs/ckpt/step_000007"))
    assert str(saved) == "stopped by SIGINT after step 7" and saved.exit_code == 130
    assert saved.explain() == ("stopped by SIGINT after step 7; checkpoint: "
                               "runs/ckpt/step_000007 (continue with --resume "
                               "runs/ckpt/step_000007)")
    early = TrainingStopped(signal.SIGTERM, 0)
    assert early.checkpoint is None and early.exit_code == 143
    assert early.explain() == "stopped by SIGTERM after step 0; no checkpoint was saved"
    for err in (saved, early):
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is TrainingStopped and str(copy) == str(err)
        assert (copy.signum, copy.step, copy.checkpoint) == (err.signum, err.step,
                                                              err.checkpoint)
    assert signal_name(signal.SIGTERM) == "SIGTERM" and signal_name(999) == "signal 999"


def test_a_second_signal_restores_the_default_handlers():
    with stop_on_signals():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _two_sigterms():
    with stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        os._exit(0)  # not reached: the second SIGTERM ends the process


def test_a_second_sigterm_ends_the_process_by_that_signal_from_its_default_handler(monkeypatch):
    child = multiprocessing.get_context("fork").Process(target=_two_sigterms)
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGTERM
    # the same in this process, with the final raise recorded instead of done
    raised = []
    with stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        with monkeypatch.context() as patch:
            patch.setattr(signal, "raise_signal", raised.append)
            os.kill(os.getpid(), signal.SIGTERM)
        assert raised == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_outside_the_main_thread_the_handlers_are_left_alone():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    seen = []

    def run():
        with stop_on_signals(seen.append):
            seen.append({s: signal.getsignal(s) for s in before})
        with sigterm_as(signal.SIGUSR1) as came:
            seen.append((came, signal.getsignal(signal.SIGTERM)))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert seen == [before, ([], before[signal.SIGTERM])]


def test_sigterm_as_sigterm_itself_is_a_keyboard_interrupt():
    with pytest.raises(KeyboardInterrupt), sigterm_as(signal.SIGTERM) as came:
        os.kill(os.getpid(), signal.SIGTERM)
    assert came == [signal.SIGTERM]


# no evaluation at the saves, no free generations at the last step's
_QUICK = ("checkpoint.metric=train/loss", "diagnostics.free_generations=0")


class _StopAt(TrainContext):
    """A context that asks for a stop after ``stop_after`` steps (None: never) and keeps
    each ``sync_point`` the loop passes."""

    def __init__(self, stop_after=None, **kwargs):
        super().__init__(**kwargs)
        self.stop_after, self.sync_points = stop_after, []

    def requested_stop(self, sync_point):
        self.sync_points.append(sync_point)
        done = len(self.sync_points)
        return signal.SIGTERM if self.stop_after is not None and done >= self.stop_after else None


def _closes(monkeypatch):
    """The streams closed (the loop closes its training stream; nothing else does)."""
    from freetf.data.stream import BatchStream

    closed, real = [], BatchStream.close

    def close(self):
        closed.append(self)
        real(self)

    monkeypatch.setattr(BatchStream, "close", close)
    return closed


def test_the_loop_asks_for_a_stop_after_each_step_ranks_agree_at_log_steps_and_the_last(
        tmp_path, monkeypatch):
    """sync_point is true at the log steps and the last (where several ranks agree); the
    listener hears the run's total steps with each report; the stream is closed once."""
    closed = _closes(monkeypatch)
    heard = []
    ctx = _StopAt(listener=lambda metrics, total: heard.append((metrics["step"], total)))
    cfg = tiny(tmp_path, "training.max_steps=7", "training.log_every=3",
               "training.eval_every=0", "checkpoint.every_steps=0", *_QUICK)
    result = train_loop(cfg, ctx)
    assert ctx.sync_points == [False, False, True, False, False, True, True]
    assert ctx.total_steps == 7 and heard == [(3, 7), (6, 7), (7, 7)]
    assert len(closed) == 1 and result.checkpoint == tmp_path / "ckpt" / "step_000007"


def test_a_stop_at_the_last_step_finishes_the_run_and_a_stop_closes_the_stream(
        tmp_path, monkeypatch):
    closed = _closes(monkeypatch)
    cfg = tiny(tmp_path, "training.max_steps=4", "training.log_every=10",
               "training.eval_every=0", "checkpoint.every_steps=0", *_QUICK)
    result = train_loop(cfg, _StopAt(stop_after=4))  # asked after the last step: no stop
    assert result.checkpoint == tmp_path / "ckpt" / "step_000004"
    assert len(closed) == 1
    closed.clear()
    with pytest.raises(TrainingStopped) as info:
        train_loop(cfg.replace(["training.max_steps=6"]), _StopAt(stop_after=2))
    assert (info.value.step, info.value.checkpoint) == (2, tmp_path / "ckpt" / "step_000002")
    assert len(closed) == 1  # the stream's DataLoader workers shut down


def test_each_save_names_the_runs_last_good_checkpoint_the_resumed_one_first(
        tmp_path, monkeypatch):
    """save_state's last_good (what a failed write names to continue from): None on a fresh
    run's first save, then this run's previous checkpoint; after a resume the checkpoint
    resumed from, until this run saved one.  The same for a non-finite stop's save."""
    import freetf.training.loop as loop

    last_goods, real = [], loop.save_state

    def save_state(*args, **kwargs):
        last_goods.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "save_state", save_state)
    ckpt = tmp_path / "ckpt"
    cfg = tiny(tmp_path, "training.max_steps=4", "checkpoint.every_steps=2",
               "training.eval_every=0", *_QUICK)
    train_loop(cfg)
    assert last_goods == [None, ckpt / "step_000002"]
    last_goods.clear()
    more = cfg.replace(["training.max_steps=6"])
    train_loop(more, TrainContext(resume_from=str(ckpt / "step_000002")))
    assert last_goods == [ckpt / "step_000002", ckpt / "step_000004"]
    last_goods.clear()
    nan_losses_at(monkeypatch, lambda n: True)
    with pytest.raises(NonFiniteLossError):
        train_loop(more.replace(["training.max_consecutive_nonfinite=1"]),
                   TrainContext(resume_from=str(ckpt / "step_000004"),
                                checkpoint_at_nonfinite_stop=True))
    assert last_goods == [ckpt / "step_000004"]


@pytest.mark.timeout(120)
def test_the_plateau_at_each_evaluation_is_judged_at_kappa_in_bits(tmp_path, monkeypatch):
    """run_plateau's KL tolerance is a fraction of kappa in bits: the loop hands it the
    scheduled free bits (0.5 bits in tiny.yaml) converted from nats, at each evaluation."""
    import freetf.training.loop as loop

    kappas, real = [], loop.run_plateau

    def run_plateau(history, diagnostics, kappa_bits):
        kappas.append(kappa_bits)
        return real(history, diagnostics, kappa_bits)

    monkeypatch.setattr(loop, "run_plateau", run_plateau)
    train_loop(tiny(tmp_path, "training.max_steps=4", "training.eval_every=2", *_QUICK))
    assert kappas == [pytest.approx(0.5, abs=1e-12)] * 2
