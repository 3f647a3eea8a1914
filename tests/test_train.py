"""The training loop in-process: learning, resume, non-finite handling, AMP, accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import RankContext, Recorder, losses, nan_losses_at, tiny

from freetf.training.checkpoint import load_checkpoint
from freetf.training.context import TrainContext
from freetf.training.loop import NonFiniteLossError, train_loop

pytestmark = pytest.mark.timeout(240)


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


def test_a_resume_with_more_steps_follows_the_new_schedule_from_its_first_step(tmp_path,
                                                                              monkeypatch):
    """Extending a run (max_steps 4 -> 8): the first resumed step's learning rate is the new
    schedule's, not the old schedule's last value that the optimizer's state holds."""
    from freetf.training.schedules import lr_at

    short = train_loop(tiny(tmp_path / "a", "training.max_steps=4", "scheduler.min_lr=0"))
    assert short.metrics["train/lr"] == 0.0  # the cosine ended
    used = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        used.append([group["lr"] for group in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train_loop(tiny(tmp_path / "b", "training.max_steps=8", "scheduler.min_lr=0"),
               TrainContext(resume_from=short.checkpoint))
    assert [lrs[0] for lrs in used] == pytest.approx([lr_at(s, 3e-3, 2, 8, 0.0)
                                                      for s in range(4, 8)])
    assert all(len(set(lrs)) == 1 for lrs in used)  # both groups


def test_resuming_a_finished_run_trains_nothing(tmp_path):
    done = train_loop(tiny(tmp_path / "a", "training.max_steps=3"))
    again = train_loop(tiny(tmp_path / "b", "training.max_steps=3"),
                       TrainContext(resume_from=done.checkpoint))
    assert (again.step, again.metrics, again.history, again.checkpoint,
            again.nonfinite_steps) == (3, {}, [], None, 0)


def test_an_injected_failure_fires_once_at_its_step_and_not_after_a_resume(tmp_path):
    from freetf.training.loop import InjectedFailure

    cfg = tiny(tmp_path, "training.max_steps=4", "training.fail_at_step=2",
               "checkpoint.every_steps=1", "checkpoint.keep=4")
    ctx = TrainContext()
    with pytest.raises(InjectedFailure, match=r"^injected failure at step 2 "
                                              r"\(training.fail_at_step\)$"):
        train_loop(cfg, ctx)
    assert sorted(losses(ctx.history)) == [1, 2]  # steps 0 and 1 trained
    resumed = train_loop(cfg, TrainContext(resume_from=tmp_path / "ckpt" / "step_000001"))
    assert sorted(losses(resumed.history)) == [2, 3, 4]  # step index 2 runs after a resume
    assert train_loop(tiny(tmp_path / "none", "training.max_steps=3")).step == 3


def test_checkpoints_keep_the_configured_number_and_their_metrics(tmp_path):
    import json

    result = train_loop(tiny(tmp_path, "training.max_steps=8", "checkpoint.every_steps=2",
                             "checkpoint.keep=4"))
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("step_*"))
    assert kept == ["step_000002", "step_000004", "step_000006", "step_000008"]
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["step"] == 8 and meta["train/loss"] == pytest.approx(losses(result.history)[8])


def test_baseline_through_the_same_loop(tmp_path):
    result = train_loop(tiny(tmp_path, "model.latent_dim=0", "training.max_steps=5"))
    assert "train/kl_nats" not in result.metrics
    assert result.metrics["eval/verdict"] == "baseline"


# foreach: the host decides each step; fused: the skip happens on the device and the host
# checks at log / eval / checkpoint steps only (here every 2 steps).
@pytest.mark.parametrize("optimizer", ["foreach", "fused"])
def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch, optimizer):
    nan_losses_at(monkeypatch, lambda n: n == 3 or n >= 6)  # one isolated NaN, then for good
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


def test_a_stop_before_any_save_names_no_checkpoint(tmp_path, monkeypatch):
    nan_losses_at(monkeypatch, lambda n: True)
    ctx = Recorder()
    with pytest.raises(NonFiniteLossError) as info:
        train_loop(tiny(tmp_path, "training.max_consecutive_nonfinite=2"), ctx)
    assert info.value.checkpoint is None and info.value.step == 2
    assert not (tmp_path / "ckpt").exists()
    assert [(step, path) for step, path, *_ in ctx.reports] == [(1, None)]  # a log step


# A runner that hears only of checkpointed reports (Ray Train) learns of the stop from one:
# the weights of the last finite update, evaluated when checkpoints are kept by an eval metric.
@pytest.mark.parametrize("metric", ["eval/ce_prior_nats", "train/loss"])
def test_a_stop_can_be_checkpointed_and_reported(tmp_path, monkeypatch, metric):
    from freetf.training.loop import NONFINITE_STOP_KEY

    args = ("training.max_consecutive_nonfinite=2", f"checkpoint.metric={metric}",
            "checkpoint.every_steps=0", "training.log_every=10")
    finite = train_loop(tiny(tmp_path / "finite", "training.max_steps=2", *args))
    nan_losses_at(monkeypatch, lambda n: n >= 3)
    ctx = Recorder(checkpoint_at_nonfinite_stop=True)
    with pytest.raises(NonFiniteLossError) as info:
        train_loop(tiny(tmp_path, *args), ctx)
    assert info.value.checkpoint == tmp_path / "ckpt" / "step_000004"
    step, path, essential, report = ctx.reports[-1]
    assert (step, path, essential) == (4, info.value.checkpoint, True)
    assert report[NONFINITE_STOP_KEY] == 2.0 == info.value.count
    assert ("eval/ce_prior_nats" in report) == metric.startswith("eval/")
    assert all(not isinstance(v, str) for v in report.values())  # no verdict text
    assert "eval/samples" not in report and "eval/valid_rate" not in report  # no generation
    state, _ = load_checkpoint(info.value.checkpoint)
    last_good, _ = load_checkpoint(finite.checkpoint)
    assert state["step"] == 4
    for key, value in last_good["model"].items():
        assert torch.equal(state["model"][key], value), key


# The host reads the non-finite count at log, eval and checkpoint steps only under fused
# AdamW (here every 5 steps: the run of bad steps from step 6 is seen at step 10, 5 long);
# otherwise at each bad step (3 in a row at step 8).
# An evaluation step (every 4) is a check too.
@pytest.mark.parametrize("optimizer, eval_every, step, count", [
    ("foreach", 0, 8, 3), ("fused", 0, 10, 5), ("fused", 4, 8, 3)])
def test_when_the_host_sees_a_nonfinite_run(tmp_path, monkeypatch, optimizer, eval_every,
                                            step, count):
    nan_losses_at(monkeypatch, lambda n: n >= 6)
    cfg = tiny(tmp_path, "training.max_steps=20", "checkpoint.every_steps=0",
               "training.max_consecutive_nonfinite=3", "training.log_every=5",
               f"optimizer.fused={optimizer}", f"training.eval_every={eval_every}")
    with pytest.raises(NonFiniteLossError) as info:
        train_loop(cfg)
    assert (info.value.step, info.value.count) == (step, count)


def test_curriculum_and_annealing_reach_the_loop(tmp_path):
    cfg = tiny(tmp_path, "training.max_steps=6",
               "training.curriculum=[{until_step: 3, max_seq_len: 34, kl_weight: 0.5}]",
               "training.kl_annealing.type=linear", "training.kl_annealing.warmup_steps=4")
    result = train_loop(cfg)
    weights = [h["train/kl_weight"] for h in result.history if "train/kl_weight" in h]
    assert weights[0] < weights[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_k_micro_batches_equal_one_batch_k_times_larger(tmp_path, checkpointing):
    """grad_accum_steps=2 of batch 4 == batch 8: the same rows, bits of Z, loss, KL and
    gradient (its norm before clipping) at every step, and the same weights after."""
    common = ["training.max_steps=3", "training.grad_clip=0", "training.free_bits_bits=0",
              f"training.gradient_checkpointing={checkpointing}"]
    accum = train_loop(tiny(tmp_path / "a", *common, "training.batch_size=4",
                            "training.grad_accum_steps=2"))
    big = train_loop(tiny(tmp_path / "b", *common, "training.batch_size=8"))
    keys = ("train/loss", "train/ce_nats", "train/kl_nats", "train/grad_norm")
    a = [h for h in accum.history if "train/loss" in h]
    b = [h for h in big.history if "train/loss" in h]
    assert [h["step"] for h in a] == [h["step"] for h in b] == [1, 2, 3]
    for ha, hb in zip(a, b, strict=True):
        for key in keys:
            assert ha[key] == pytest.approx(hb[key], rel=1e-5), (ha["step"], key)
    sa, _ = load_checkpoint(accum.checkpoint)
    sb, _ = load_checkpoint(big.checkpoint)
    for key in sa["model"]:
        assert torch.allclose(sa["model"][key], sb["model"][key], atol=1e-6), key


def test_bf16_autocast_loop_runs_on_cpu(tmp_path):
    """The CUDA default (bf16 autocast) exercised on CPU at tiny size."""
    bf16 = train_loop(tiny(tmp_path, "training.max_steps=2", "training.amp=bf16"))
    fp32 = train_loop(tiny(tmp_path / "fp32", "training.max_steps=2"))
    a, b = losses(bf16.history)[2], losses(fp32.history)[2]
    assert math.isfinite(a) and a != b and a == pytest.approx(b, rel=0.05)  # bf16 rounding


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
    nan_losses_at(monkeypatch, lambda n: n == 3)
    extra = ("training.max_steps=8", "training.log_every=4", "training.eval_every=0",
             "checkpoint.every_steps=0")
    fused = train_loop(tiny(tmp_path / "fused", *extra, "optimizer.fused=fused"))
    assert item_calls["n"] == 0
    assert fused.nonfinite_steps == 1
    assert fused.metrics["train/nonfinite_steps"] == 1
    assert all(math.isfinite(v) for v in losses(fused.history).values())
    # the host-side path (foreach) reads every step, and skips the same step
    nan_losses_at(monkeypatch, lambda n: n == 3)
    foreach = train_loop(tiny(tmp_path / "foreach", *extra, "optimizer.fused=foreach"))
    assert item_calls["n"] >= 8
    assert foreach.nonfinite_steps == 1
    for step, loss in losses(foreach.history).items():
        assert losses(fused.history)[step] == pytest.approx(loss, rel=1e-4)


@pytest.mark.timeout(120)
def test_fp16_overflow_steps_are_the_grad_scalers_not_a_reason_to_stop(tmp_path, monkeypatch):
    """Under fp16 the scaler starting far too high overflows for many steps in a row."""
    scalers = []

    def scaler(*args, **kwargs):
        scalers.append(real(*args, init_scale=2.0 ** 40, **kwargs))
        return scalers[-1]

    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", scaler)
    cfg = tiny(tmp_path, "training.amp=fp16", "training.max_steps=40",
               "training.max_consecutive_nonfinite=3", "training.log_every=5",
               "training.eval_every=0")
    result = train_loop(cfg)
    assert result.nonfinite_steps == 0
    assert 1.0 < scalers[0].get_scale() < 2.0 ** 37  # on this device, and it backed off
    assert all(math.isfinite(v) for v in losses(result.history).values())


@pytest.mark.parametrize("latent_dim", [0, 4])
def test_chunked_cross_entropy_trains_like_the_plain_loss(tmp_path, monkeypatch, latent_dim):
    """training.cross_entropy=chunked: the same losses and final weights as plain, for
    the baseline and the Free Transformer (the LM head's gradient arrives through it)."""
    import freetf.training.loop as train_mod
    from freetf.model.losses import compute_loss

    runs, inputs = [], []

    def spy(logits, *args, **kwargs):
        inputs.append(getattr(logits, "chunk_tokens", type(logits)))
        return compute_loss(logits, *args, **kwargs)

    monkeypatch.setattr(train_mod, "compute_loss", spy)
    for impl in ("plain", "chunked"):
        cfg = tiny(tmp_path / impl, "training.max_steps=6", f"model.latent_dim={latent_dim}",
                   "training.learning_rate=3e-3", f"training.cross_entropy={impl}",
                   "training.cross_entropy_chunk_tokens=50")
        runs.append(train_loop(cfg))
    assert inputs == [torch.Tensor] * 6 + [50] * 6  # HeadInputs of the configured chunk
    a, b = losses(runs[0].history), losses(runs[1].history)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    sa, _ = load_checkpoint(runs[0].checkpoint)
    sb, _ = load_checkpoint(runs[1].checkpoint)
    for key in sa["model"]:
        assert torch.allclose(sa["model"][key], sb["model"][key], atol=1e-5), key


def test_checkpoint_saves_and_restores_each_ranks_rng_state(tmp_path):
    rank1 = {"cpu": torch.Generator().manual_seed(1234).get_state(), "cuda": None}
    cfg = tiny(tmp_path, "training.max_steps=2", "checkpoint.every_steps=2")
    saver = RankContext(others={1: rank1}, rank=0, world_size=2)
    result = train_loop(cfg, saver)
    state, _ = load_checkpoint(result.checkpoint)
    assert [set(s) for s in state["rng"]] == [{"cpu", "cuda"}] * 2
    assert torch.equal(state["rng"][1]["cpu"], rank1["cpu"])
    assert not torch.equal(state["rng"][0]["cpu"], rank1["cpu"])
    more = tiny(tmp_path / "b", "training.max_steps=3")
    for rank in (0, 1):
        resumed = RankContext(rank=rank, world_size=2, resume_from=result.checkpoint,
                               others={1 - rank: None})
        train_loop(more, resumed)
        assert torch.equal(resumed.rng_after_resume, state["rng"][rank]["cpu"]), rank


def test_rng_states_carry_the_cuda_generator(monkeypatch):
    """The CUDA state of this rank's device is saved and restored (CUDA faked on CPU)."""
    from freetf.training.checkpoint import restore_rng_states, rng_states

    fake = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8), "set": None}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: fake["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device=None: fake.update(set=(state.clone(), device)))
    cuda = torch.device("cuda", 1)
    saved = [rng_states(torch.device("cpu")), rng_states(cuda)]
    assert saved[0]["cuda"] is None and torch.equal(saved[1]["cuda"], fake["state"])
    saved[1]["cuda"] = torch.tensor([7, 7], dtype=torch.uint8)
    restore_rng_states(saved, rank=1, device=cuda)
    assert torch.equal(fake["set"][0], saved[1]["cuda"]) and fake["set"][1] == cuda
    assert torch.equal(torch.get_rng_state(), saved[1]["cpu"])
