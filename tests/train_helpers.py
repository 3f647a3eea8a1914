"""Helpers of the training-loop tests: tiny configs, recording contexts, a NaN loss."""

from __future__ import annotations

import subprocess
import sys

import torch

from freetf import load_config
from freetf.training.context import TrainContext


def tiny(tmp_path, *extra):
    return load_config("freetf/configs/tiny.yaml", [
        f"checkpoint.dir={tmp_path / 'ckpt'}", "tracking.mlflow.enabled=false",
        "training.log_every=1", "scaling.use_ray=false", *extra])


def losses(history):
    return {h["step"]: h["train/loss"] for h in history if "train/loss" in h}


def nan_losses_at(monkeypatch, bad_call):
    """Make the loss NaN on the loss computations for which ``bad_call(n)`` is true."""
    import freetf.training.loop as train_mod
    from freetf.model.losses import compute_loss as real

    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        total, parts = real(*args, **kwargs)
        if bad_call(calls["n"]):
            total = total * float("nan")
        return total, parts

    monkeypatch.setattr(train_mod, "compute_loss", flaky)


class Recorder(TrainContext):
    """A context that keeps every report with its checkpoint and essential flag."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reports, self.model, self.events = [], None, []

    def prepare_model(self, model):
        self.model = model
        return model

    def mark(self, event):
        super().mark(event)
        self.events.append(event)

    def report(self, metrics, checkpoint_dir=None, essential=True):
        super().report(metrics, checkpoint_dir, essential)
        self.reports.append((metrics["step"], checkpoint_dir, essential, dict(metrics)))


class Tracker:
    def __init__(self):
        self.params, self.metrics = {}, []

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))


class RankContext(TrainContext):
    """One rank of a 2-rank run, in-process: ``all_gather`` returns what the collective
    would (``others`` stands in for the other rank's object); records the RNG state the
    loop holds right after resuming (``prepare_model`` is called just after)."""

    def __init__(self, others=None, **kwargs):
        super().__init__(**kwargs)
        self.others = others or {}
        self.rng_after_resume = None

    def all_gather(self, obj):
        return [obj if r == self.rank else self.others[r] for r in range(self.world_size)]

    def prepare_model(self, model):
        self.rng_after_resume = torch.get_rng_state()
        return model


def train_until_signal(argv, step_text, signum, timeout_s=240):
    """Run ``freetf <argv>`` until its log shows ``step_text``, send ``signum`` to it,
    wait.  -> (exit code, its output: stderr and stdout, with Ray's workers' lines)."""
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "freetf", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, seen = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if step_text in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.wait(timeout_s), "".join(lines)
        proc.send_signal(signum)
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    return proc.returncode, "".join(lines)
