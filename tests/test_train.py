"""The training loop in-process: learning, resume == uninterrupted, non-finite handling."""

from __future__ import annotations

import math

import pytest
import torch

from freetf import load_config
from freetf.training.checkpoint import load_checkpoint
from freetf.training.loop import NonFiniteLossError, TrainContext, amp_dtype, train_loop

pytestmark = pytest.mark.timeout(240)


def tiny(tmp_path, *extra):
    return load_config("configs/tiny.yaml", [
        f"checkpoint.dir={tmp_path / 'ckpt'}", "tracking.mlflow.enabled=false",
        "training.log_every=1", "scaling.use_ray=false", *extra])


def losses(history):
    return {h["step"]: h["train/loss"] for h in history if "train/loss" in h}


def test_synthetic_reconstruction_drops(tmp_path):
    cfg = tiny(tmp_path, "training.max_steps=80",
               "training.learning_rate=1e-2", "model.hidden_dim=64")
    result = train_loop(cfg)
    recon = [h["train/ce_nats"] for h in result.history if "train/ce_nats" in h]
    assert recon[0] > 2.0  # ~ log(29) at the start
    assert recon[-1] < 0.5 * recon[0]
    assert result.metrics["eval/ce_prior_nats"] < 0.5 * math.log(29)
    assert "train/kl_nats" in result.metrics and "train/tokens_per_s" in result.metrics
    assert result.checkpoint is not None and result.checkpoint.name == "step_000080"


def test_resume_equals_uninterrupted(tmp_path):
    full = train_loop(tiny(tmp_path / "a", "training.max_steps=8", "checkpoint.every_steps=4",
                           "checkpoint.keep=5"))
    ckpt = tmp_path / "a" / "ckpt" / "step_000004"
    assert ckpt.is_dir()
    resumed = train_loop(tiny(tmp_path / "b", "training.max_steps=8"),
                         TrainContext(resume_from=ckpt))
    a, b = losses(full.history), losses(resumed.history)
    assert sorted(b) == [5, 6, 7, 8]  # the step counter continues from the checkpoint
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)
    sa, _ = load_checkpoint(full.checkpoint)
    sb, _ = load_checkpoint(resumed.checkpoint)
    for key in sa["model"]:
        assert torch.allclose(sa["model"][key], sb["model"][key], atol=1e-6), key


def test_baseline_through_the_same_loop(tmp_path):
    result = train_loop(tiny(tmp_path, "model.latent_dim=0", "training.max_steps=5"))
    assert "train/kl_nats" not in result.metrics
    assert result.metrics["eval/verdict"] == "baseline"


def _nan_losses_at(monkeypatch, bad_call):
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


# foreach: the host decides each step; fused: the skip happens on the device and the host
# checks at log / eval / checkpoint steps only (here every 2 steps).
@pytest.mark.parametrize("optimizer", ["foreach", "fused"])
def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch, optimizer):
    _nan_losses_at(monkeypatch, lambda n: n == 3 or n >= 6)  # one isolated NaN, then for good
    cfg = tiny(tmp_path, "training.max_steps=20", "checkpoint.every_steps=4",
               "training.max_consecutive_nonfinite=3", "training.log_every=2",
               f"optimizer.fused={optimizer}")
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps") as info:
        train_loop(cfg)
    assert info.value.checkpoint == tmp_path / "ckpt" / "step_000004"  # this run's last save
    # the last good checkpoint is kept and loads
    state, _ = load_checkpoint(tmp_path / "ckpt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_amp_defaults():
    cfg = load_config()
    assert amp_dtype(cfg, torch.device("cpu")) is None
    assert amp_dtype(cfg, torch.device("cuda")) == torch.bfloat16
    assert amp_dtype(cfg.replace(["training.amp=fp16"]), torch.device("cuda")) == torch.float16


def test_curriculum_and_annealing_reach_the_loop(tmp_path):
    cfg = tiny(tmp_path, "training.max_steps=6",
               "training.curriculum=[{until_step: 3, max_seq_len: 34, kl_weight: 0.5}]",
               "training.kl_annealing.type=linear", "training.kl_annealing.warmup_steps=4")
    result = train_loop(cfg)
    weights = [h["train/kl_weight"] for h in result.history if "train/kl_weight" in h]
    assert weights[0] < weights[-1] == pytest.approx(1.0)


def test_gradient_accumulation_and_checkpointing_run(tmp_path):
    result = train_loop(tiny(tmp_path, "training.max_steps=3", "training.grad_accum_steps=2",
                             "training.gradient_checkpointing=true"))
    assert math.isfinite(result.metrics["train/loss"])


def test_bf16_autocast_loop_runs_on_cpu(tmp_path):
    """The CUDA default (bf16 autocast) exercised on CPU at tiny size."""
    result = train_loop(tiny(tmp_path, "training.max_steps=2", "training.amp=bf16"))
    assert math.isfinite(result.metrics["train/loss"])


def test_fused_optimizer_skips_a_nonfinite_step_without_host_syncs(tmp_path, monkeypatch):
    """With fused AdamW the loop reads no device value between log steps."""
    import sys

    import freetf.training.loop as train_mod

    item_calls = {"n": 0}
    real_item = torch.Tensor.item

    def counting_item(self):
        if sys._getframe(1).f_code.co_filename == train_mod.__file__:
            item_calls["n"] += 1
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    _nan_losses_at(monkeypatch, lambda n: n == 3)
    extra = ("training.max_steps=8", "training.log_every=4", "training.eval_every=0",
             "checkpoint.every_steps=0")
    fused = train_loop(tiny(tmp_path / "fused", *extra, "optimizer.fused=fused"))
    assert item_calls["n"] == 0
    assert fused.nonfinite_steps == 1
    assert fused.metrics["train/nonfinite_steps"] == 1
    assert all(math.isfinite(v) for v in losses(fused.history).values())
    # the host-side path (foreach) reads every step, and skips the same step
    _nan_losses_at(monkeypatch, lambda n: n == 3)
    foreach = train_loop(tiny(tmp_path / "foreach", *extra, "optimizer.fused=foreach"))
    assert item_calls["n"] >= 8
    assert foreach.nonfinite_steps == 1
    for step, loss in losses(foreach.history).items():
        assert losses(fused.history)[step] == pytest.approx(loss, rel=1e-4)


@pytest.mark.timeout(120)
def test_fp16_overflow_steps_are_the_grad_scalers_not_a_reason_to_stop(tmp_path, monkeypatch):
    """Under fp16 the scaler starting far too high overflows for many steps in a row."""
    import functools

    monkeypatch.setattr(torch.amp, "GradScaler",
                        functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 40))
    cfg = tiny(tmp_path, "training.amp=fp16", "training.max_steps=40",
               "training.max_consecutive_nonfinite=3", "training.log_every=5",
               "training.eval_every=0")
    result = train_loop(cfg)
    assert result.nonfinite_steps == 0
    assert all(math.isfinite(v) for v in losses(result.history).values())
