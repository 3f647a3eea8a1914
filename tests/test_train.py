"""The training loop in-process: learning, resume == uninterrupted, non-finite handling."""

from __future__ import annotations

import math

import pytest
import torch

from freetf import load_config
from freetf.config import ConfigError
from freetf.training.checkpoint import load_checkpoint
from freetf.training.context import TrainContext
from freetf.training.loop import NonFiniteLossError, train_loop
from freetf.training.optim import amp_dtype

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


def test_a_stop_before_any_save_names_no_checkpoint(tmp_path, monkeypatch):
    _nan_losses_at(monkeypatch, lambda n: True)
    ctx = _Recorder()
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
    _nan_losses_at(monkeypatch, lambda n: n >= 3)
    ctx = _Recorder(checkpoint_at_nonfinite_stop=True)
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
    _nan_losses_at(monkeypatch, lambda n: n >= 6)
    cfg = tiny(tmp_path, "training.max_steps=20", "checkpoint.every_steps=0",
               "training.max_consecutive_nonfinite=3", "training.log_every=5",
               f"optimizer.fused={optimizer}", f"training.eval_every={eval_every}")
    with pytest.raises(NonFiniteLossError) as info:
        train_loop(cfg)
    assert (info.value.step, info.value.count) == (step, count)


def test_tokens_per_second_over_each_log_window(tmp_path, monkeypatch):
    """On a clock that ticks 0.25 s at each reading: every window is 0.25 s long."""
    import freetf.training.loop as train_mod

    ticks = iter(range(10_000))

    class Clock:
        @staticmethod
        def perf_counter():
            return next(ticks) * 0.25

    monkeypatch.setattr(train_mod, "time", Clock)
    result = train_loop(tiny(tmp_path, "training.max_steps=6", "training.log_every=3",
                             "training.grad_accum_steps=2"), _RankContext(rank=0, world_size=2,
                                                                           others={1: None}))
    rates = [h["train/tokens_per_s"] for h in result.history if "train/loss" in h]
    assert rates == [3 * 2 * 8 * 66 * 2 / 0.25] * 2  # steps x micro x rows x T x world


def test_amp_defaults():
    cfg = load_config()
    assert amp_dtype(cfg, torch.device("cpu")) is None
    assert amp_dtype(cfg, torch.device("cuda")) == torch.bfloat16
    assert amp_dtype(cfg.replace(["training.amp=fp16"]), torch.device("cuda")) == torch.float16
    assert amp_dtype(cfg.replace(["training.amp=bf16"]), torch.device("cpu")) == torch.bfloat16
    assert amp_dtype(cfg.replace(["training.amp=off"]), torch.device("cuda")) is None


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


def test_first_step_metrics_equal_a_reference_step(tmp_path):
    """Step 1 replayed outside the loop: next-token CE, and the KL over the positions
    that predict a token (z_logits[:, :-1], aligned with ids[:, 1:])."""
    from freetf.data.datasets import build_data
    from freetf.data.stream import BatchStream
    from freetf.model.losses import kl_per_token
    from freetf.model.transformer import FreeTransformer
    from freetf.training.loop import step_noise

    cfg = tiny(tmp_path, "training.max_steps=1", "training.free_bits_bits=0")
    result = train_loop(cfg)
    torch.manual_seed(cfg.training.seed)  # the loop's initial weights
    model = FreeTransformer(cfg.model)
    ids = next(BatchStream(build_data(cfg).train, cfg.training.batch_size, seed=cfg.data.seed))
    noise = step_noise(cfg, 0, cfg.training.batch_size, ids.shape[1], 0, 1)[0]
    logits, z_logits = model(ids, bit_noise=noise)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1))
    kl = kl_per_token(z_logits[:, :-1]).mean()
    step1 = next(h for h in result.history if h.get("step") == 1)
    assert step1["train/ce_nats"] == pytest.approx(ce.item(), rel=1e-6)
    assert step1["train/kl_nats"] == pytest.approx(kl.item(), rel=1e-6)
    assert kl.item() != pytest.approx(kl_per_token(z_logits[:, 1:]).mean().item(), rel=1e-6)


def test_four_steps_and_the_final_evaluation_equal_a_reference_written_out(tmp_path):
    """The loop's wiring replayed outside it: weights seeded by training.seed, batches by
    data.seed, Z's noise per step, the schedules (KL weight, free bits, curriculum length),
    AdamW's groups, the LR schedule, clipping, the log window's means, the final weights
    and the final evaluation (diagnostics, verdict at the scheduled kappa, bits per byte,
    samples, free generations)."""
    from freetf.data.datasets import build_data
    from freetf.data.stream import BatchStream
    from freetf.evaluation.diagnostics import latent_diagnostics, verdict
    from freetf.evaluation.samples import sample_texts
    from freetf.evaluation.synthetic_eval import free_generation_validity
    from freetf.model.losses import compute_loss
    from freetf.model.transformer import FreeTransformer
    from freetf.training.schedules import lr_at, schedule_values

    cfg = tiny(tmp_path, "training.max_steps=4", "training.log_every=2", "training.seed=3",
               "data.seed=5", "training.warmup_steps=1", "training.grad_clip=0.05",
               "training.weight_decay=0.2", "training.kl_weight=0.7",
               "training.kl_annealing.type=linear", "training.kl_annealing.initial_weight=0.2",
               "training.free_bits_bits=0.03", "training.free_bits_schedule.type=linear",
               "training.free_bits_schedule.initial_nats=0", "training.free_bits_schedule.steps=20",
               "training.curriculum="
               "[{until_step: 2, max_seq_len: 34}]", "scheduler.min_lr=1e-4",
               "diagnostics.free_generations=6", "checkpoint.every_steps=0",
               "data.val_samples=20", "training.eval_batches=3")
    result = train_loop(cfg)

    torch.manual_seed(3)
    model = FreeTransformer(cfg.model)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.2},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    lrs = [lr_at(s, 3e-3, 1, 4, 1e-4) for s in range(5)]
    data = build_data(cfg)
    stream = BatchStream(data.train, 8, seed=5)
    sched = [schedule_values(cfg, s, 4) for s in range(4)]
    assert [v["max_seq_len"] for v in sched] == [34, 34, 66, 66]
    steps = []
    for step in range(4):
        for group in optimizer.param_groups:
            group["lr"] = lrs[step]
        seq_len = sched[step]["max_seq_len"]
        ids = next(stream)[:, :seq_len]  # (8, T)
        noise = torch.rand(1, 8, seq_len, 4, generator=torch.Generator().manual_seed(
            3 * 1_000_003 + step))[0]
        logits, z_logits = model(ids, mode="training", bit_noise=noise)
        loss, parts = compute_loss(logits[:, :-1], z_logits[:, :-1], ids[:, 1:],
                                   sched[step]["kl_weight"], sched[step]["free_bits_nats"])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 0.05)
        assert norm > 0.05  # clipping acts
        optimizer.step()
        optimizer.zero_grad()
        steps.append({"train/loss": parts["total"], "train/ce_nats": parts["reconstruction"],
                      "train/kl_hinged_nats": parts["kl"], "train/kl_nats": parts["kl_raw_nats"],
                      "train/kl_bits": parts["kl_raw_bits"], "train/grad_norm": norm})
    assert steps[0]["train/kl_hinged_nats"] > 0 < steps[2]["train/kl_hinged_nats"]  # weighted
    logged = {h["step"]: h for h in result.history if "train/loss" in h}
    assert sorted(logged) == [2, 4]
    for done, window in ((2, steps[0:2]), (4, steps[2:4])):
        for key in window[0]:
            mean = (window[0][key] + window[1][key]).item() / 2
            assert logged[done][key] == pytest.approx(mean, rel=1e-5, abs=1e-7), (done, key)
        assert logged[done]["train/lr"] == pytest.approx(lrs[done], rel=1e-9)
        kappa = sched[done - 1]["free_bits_nats"]  # the window's last step
        assert logged[done]["train/kl_weight"] == sched[done - 1]["kl_weight"]
        assert logged[done]["train/free_bits_nats"] == pytest.approx(kappa)
        assert logged[done]["train/free_bits_bits"] == pytest.approx(kappa / math.log(2))
        assert logged[done]["train/nonfinite_steps"] == 0.0
        assert logged[done]["train/epoch"] == 0.0

    saved, _ = load_checkpoint(result.checkpoint)
    for key, value in model.state_dict().items():
        assert torch.allclose(saved["model"][key], value, atol=1e-6), key

    assert len(data.val) == 20
    val = BatchStream(data.val, 8, seed=5, drop_last=True)
    batches = [next(val), next(val)]  # eval_batches=3, but only 2 full batches
    torch.manual_seed(3 + 17)
    expected = latent_diagnostics(model, batches, cfg, "cpu")
    samples = sample_texts(model, data, cfg, torch.device("cpu"))
    valid = free_generation_validity(model, 6, seed=3 + 17)
    final = result.metrics
    for key, value in expected.items():
        assert final[key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key
    assert final["eval/bpb_prior"] == pytest.approx(
        expected["eval/ce_prior_nats"] / math.log(2) / data.bytes_per_token, rel=1e-5)
    assert final["eval/bpb_posterior"] == pytest.approx(
        expected["eval/ce_posterior_nats"] / math.log(2) / data.bytes_per_token, rel=1e-5)
    kappa = sched[3]["free_bits_nats"]
    assert final["eval/verdict"] == verdict(expected, cfg, kappa)
    assert final["eval/samples"] == samples and final["eval/valid_rate"] == valid
    assert result.step == 4 and result.history[-1]["step"] == 4


def test_bits_per_byte_divides_by_the_bytes_per_token():
    from freetf.training.loop import bits_per_byte

    metrics = {"eval/ce_prior_nats": 2.0, "eval/ce_posterior_nats": 1.0, "eval/kl_nats": 5.0}
    assert bits_per_byte(metrics, 4.0) == {"eval/bpb_prior": 2.0 / math.log(2) / 4.0,
                                           "eval/bpb_posterior": 1.0 / math.log(2) / 4.0}
    assert bits_per_byte({"eval/ce_prior_nats": 2.0}, 1.0) == {"eval/bpb_prior": 2 / math.log(2)}


class _Recorder(TrainContext):
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


class _Tracker:
    def __init__(self):
        self.params, self.metrics = {}, []

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))


# Of 7 steps: evaluate every 3, log every 4, save every 5 (step 3 evaluates before any
# log step; step 6 reports after a save without one).  The default keeps the best checkpoint
# by an eval metric, so a save evaluates too; a train/ metric does not.
@pytest.mark.parametrize("metric, evaluated", [("eval/ce_prior_nats", [3, 5, 6, 7]),
                                               ("train/loss", [3, 6, 7])])
def test_reports_checkpoints_evaluations_and_marks_fall_on_their_steps(tmp_path, monkeypatch,
                                                                       caplog, metric,
                                                                       evaluated):
    import json

    import freetf.training.loop as train_mod
    from freetf.data.stream import BatchStream
    from freetf.model.transformer import FreeTransformer

    streams = []

    class SpiedStream(BatchStream):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            streams.append(kwargs)

    monkeypatch.setattr(train_mod, "BatchStream", SpiedStream)
    kappas, generations = [], []

    def verdict(metrics, cfg, free_bits_nats):
        kappas.append(free_bits_nats)
        return "spied"

    def free_generation_validity(model, num, seed):
        generations.append((num, seed))
        return 0.5

    monkeypatch.setattr(train_mod, "verdict", verdict)
    monkeypatch.setattr(train_mod, "free_generation_validity", free_generation_validity)
    cfg = tiny(tmp_path, "training.max_steps=7", "training.log_every=4", "training.eval_every=3",
               "checkpoint.every_steps=5", "checkpoint.keep=5", f"checkpoint.metric={metric}",
               "data.seed=7", "data.num_workers=1", "diagnostics.free_generations=2",
               "training.gradient_checkpointing=true", "training.seed=2",
               "training.free_bits_schedule.type=linear",
               "training.free_bits_schedule.initial_nats=1.0")
    ctx, tracker = _Recorder(), _Tracker()
    with caplog.at_level("INFO", logger="freetf.training.loop"):
        result = train_loop(cfg, ctx, tracker)
    ckpt = tmp_path / "ckpt"
    assert [(step, path, essential) for step, path, essential, _ in ctx.reports] == [
        (3, None, True), (4, None, False), (5, ckpt / "step_000005", True), (6, None, True),
        (7, ckpt / "step_000007", True)]
    assert [step for step, *_, m in ctx.reports if "eval/ce_prior_nats" in m] == evaluated
    assert [step for step, *_, m in ctx.reports if "train/loss" in m] == [4, 5, 6, 7]
    assert [step for step, *_, m in ctx.reports if "eval/samples" in m] == [7]  # the last only
    assert result.checkpoint == ckpt / "step_000007"
    assert ctx.reports[-1][3] == result.metrics | {"step": 7}
    for step, path, _, reported in ctx.reports:  # meta.json: the report's numbers
        if path is not None:
            meta = json.loads((path / "meta.json").read_text())
            assert meta == {k: v for k, v in reported.items()
                            if not isinstance(v, str | list)}, step
    assert [step for step, _ in tracker.metrics] == [3, 4, 5, 6, 7]
    assert all(m["train/steps_done"] == step and "eval/samples" not in m
               and "step" not in m for step, m in tracker.metrics)
    parameters = FreeTransformer(cfg.model).parameters()  # the tied head counted once
    assert tracker.params == {"num_parameters": sum(p.numel() for p in parameters)}
    assert ctx.events == ["loop_start", "data_built", "model_built", "first_step",
                          "last_step", "train_end"]  # each once, in this order
    assert list(ctx.marks.values()) == sorted(ctx.marks.values())
    assert streams[0] == {"seed": 7, "num_workers": 1}  # then the evaluations' val streams
    assert ctx.model.gradient_checkpointing
    # the verdict at the scheduled kappa of the step evaluated, free generations once
    kappa = cfg.training.free_bits_nats
    schedule = {step: 1.0 + (kappa - 1.0) * (step - 1) / 7 for step in evaluated}
    assert kappas == pytest.approx([schedule[step] for step in evaluated])
    assert generations == [(2, 2 + 17)]
    assert result.metrics["eval/valid_rate"] == 0.5
    progress = [r.getMessage().split(" loss")[0] for r in caplog.records
                if r.name == "freetf.training.loop" and r.getMessage().startswith("step ")]
    assert progress == ["step 4/7"]  # the console's progress line at log steps only


def test_compile_wraps_the_model_before_the_runner_prepares_it(tmp_path, monkeypatch):
    compiled = []

    def fake_compile(model):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    ctx = _Recorder()
    train_loop(tiny(tmp_path, "training.max_steps=1", "training.compile=true"), ctx)
    assert compiled == [ctx.model]
    train_loop(tiny(tmp_path / "b", "training.max_steps=1"), _Recorder())
    assert len(compiled) == 1


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_seeds_its_own_generator_after_the_shared_weights(tmp_path, caplog, rank):
    """And takes its rows of the global batch and its slice of Z's noise: rank r of 2
    trains on rows r::2 of a global batch of 16 (the first step replayed here)."""
    from freetf.data.datasets import build_data
    from freetf.data.stream import BatchStream
    from freetf.model.losses import compute_loss
    from freetf.model.transformer import FreeTransformer

    ctx = _RankContext(rank=rank, world_size=2, others={1 - rank: None})
    cfg = tiny(tmp_path, "training.max_steps=1", "training.seed=3", "training.log_every=1")
    with caplog.at_level("INFO", logger="freetf.training.loop"):
        train_loop(cfg, ctx)
    console = [r.getMessage().split()[0] for r in caplog.records
               if r.name == "freetf.training.loop"]
    assert console == (["model:", "checkpoint:", "step"] if rank == 0 else [])  # rank 0 speaks
    torch.manual_seed(3 * 1000 + rank)
    assert torch.equal(ctx.rng_after_resume, torch.get_rng_state())

    torch.manual_seed(3)
    model = FreeTransformer(cfg.model)
    rows = next(BatchStream(build_data(cfg).train, 16, seed=0))[rank::2]  # (8, 66)
    noise = torch.rand(1, 16, 66, 4, generator=torch.Generator().manual_seed(3 * 1_000_003))
    logits, z_logits = model(rows, mode="training", bit_noise=noise[0, rank::2])
    loss, _ = compute_loss(logits[:, :-1], z_logits[:, :-1], rows[:, 1:], 1.0,
                           cfg.training.free_bits_nats)
    assert losses(ctx.history)[1] == pytest.approx(loss.item(), rel=1e-6)


def test_epochs_set_the_number_of_steps_without_max_steps(tmp_path):
    from freetf.data.datasets import build_data

    cfg = tiny(tmp_path, "training.max_steps=null", "training.num_epochs=2",
               "training.grad_accum_steps=2", "data.num_samples=96", "training.log_every=100",
               "scheduler.type=constant")
    per_epoch = len(build_data(cfg).train) // 8
    assert per_epoch >= 5
    result = train_loop(cfg)
    assert result.step == 2 * per_epoch // 2 == result.history[-1]["step"]
    assert result.metrics["train/epoch"] == 1.0  # the last batch of the second epoch
    assert result.metrics["train/lr"] == 3e-3  # constant after the warmup, not cosine's min


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

class _RankContext(TrainContext):
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


def test_checkpoint_saves_and_restores_each_ranks_rng_state(tmp_path):
    rank1 = {"cpu": torch.Generator().manual_seed(1234).get_state(), "cuda": None}
    cfg = tiny(tmp_path, "training.max_steps=2", "checkpoint.every_steps=2")
    saver = _RankContext(others={1: rank1}, rank=0, world_size=2)
    result = train_loop(cfg, saver)
    state, _ = load_checkpoint(result.checkpoint)
    assert [set(s) for s in state["rng"]] == [{"cpu", "cuda"}] * 2
    assert torch.equal(state["rng"][1]["cpu"], rank1["cpu"])
    assert not torch.equal(state["rng"][0]["cpu"], rank1["cpu"])
    more = tiny(tmp_path / "b", "training.max_steps=3")
    for rank in (0, 1):
        resumed = _RankContext(rank=rank, world_size=2, resume_from=result.checkpoint,
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


# ----------------------------------------------------------------------------- loop parts


def test_total_steps_and_optimizer_groups(tiny_model_cfg):
    from freetf.model.transformer import FreeTransformer
    from freetf.training.loop import total_steps
    from freetf.training.optim import build_optimizer

    cfg = load_config(overrides=["training.num_epochs=3", "training.grad_accum_steps=2"])
    assert total_steps(cfg, 10) == 15  # epochs * steps per epoch / accumulation
    assert total_steps(cfg, 0) == 1
    assert total_steps(cfg.replace(["training.max_steps=7"]), 10) == 7
    cfg = load_config(overrides=["training.weight_decay=0.3", "training.learning_rate=0.004",
                                 "optimizer.betas=[0.8, 0.9]", "optimizer.eps=1e-7"])
    model = FreeTransformer(tiny_model_cfg)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model.parameters()
                                                   if p.dim() < 2}  # norms, biases, zeta
    assert opt.defaults["lr"] == 0.004 and opt.defaults["betas"] == (0.8, 0.9)
    assert opt.defaults["eps"] == 1e-7
    assert opt.defaults["foreach"] and not opt.defaults.get("fused")  # auto on CPU
    fused = build_optimizer(model, cfg.replace(["optimizer.fused=fused"]), torch.device("cpu"))
    assert fused.defaults["fused"]
    auto_cuda = build_optimizer(model, cfg, torch.device("cuda"))  # the device picks "auto"
    assert auto_cuda.defaults["fused"] and not auto_cuda.defaults.get("foreach")


def test_post_sampler_learning_rate_multiplier_has_its_own_groups(tiny_model_cfg):
    from freetf.model.transformer import FreeTransformer
    from freetf.training.optim import build_optimizer
    from freetf.training.schedules import build_lr_scheduler

    cfg = load_config(overrides=["training.learning_rate=0.004", "training.weight_decay=0.3",
                                 "optimizer.post_sampler_lr_mult=8"])
    model = FreeTransformer(tiny_model_cfg)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    decay, no_decay, table, bias = opt.param_groups
    assert [g["lr"] for g in opt.param_groups] == [0.004, 0.004, 0.032, 0.032]
    assert table["params"] == [model.mapper.weight] and table["weight_decay"] == 0.3
    assert bias["params"] == [model.mapper.bias] and bias["weight_decay"] == 0.0
    others = {id(model.mapper.weight), id(model.mapper.bias)}
    assert {id(p) for p in decay["params"] + no_decay["params"]} == \
        {id(p) for p in model.parameters()} - others
    # The schedule keeps the ratio (warmup here), down to min_lr.
    sched = build_lr_scheduler(opt, warmup_steps=10, total_steps=100, min_lr=0.0)
    for _ in range(3):
        opt.step()
        sched.step()
    assert table["lr"] == pytest.approx(8 * decay["lr"]) and decay["lr"] < 0.004
    with pytest.raises(ConfigError, match="post_sampler_lr_mult"):
        load_config(overrides=["optimizer.post_sampler_lr_mult=0"])
    # Under a wrapper's prefix (DDP's "module.", torch.compile's "_orig_mod.", both), and
    # not for a module that only ends in "mapper" or holds a mapper deeper down.
    for prefixes in (["module"], ["_orig_mod"], ["module", "_orig_mod"]):
        wrapped = model
        for prefix in reversed(prefixes):
            outer = torch.nn.Module()
            outer.add_module(prefix, wrapped)
            wrapped = outer
        groups = build_optimizer(wrapped, cfg, torch.device("cpu")).param_groups
        assert groups[2]["params"] == [model.mapper.weight], prefixes
        assert groups[3]["params"] == [model.mapper.bias], prefixes
    decoy = torch.nn.Module()
    decoy.post_mapper = torch.nn.Linear(2, 2)
    decoy.mapper = torch.nn.Module()
    decoy.mapper.inner = torch.nn.Linear(2, 2)
    assert len(build_optimizer(decoy, cfg, torch.device("cpu")).param_groups) == 2


def test_readout_init_std_sets_the_encoder_readout_scale(tiny_model_cfg):
    from dataclasses import replace

    from freetf.model.transformer import FreeTransformer

    torch.manual_seed(0)
    wide = FreeTransformer(replace(tiny_model_cfg, hidden_dim=256, latent_dim=16,
                                   readout_init_std=0.3))
    assert wide.encoder_readout.weight.std().item() == pytest.approx(0.3, rel=0.05)
    assert wide.embed.weight.std().item() == pytest.approx(tiny_model_cfg.init_std, rel=0.05)
    torch.manual_seed(0)
    default = FreeTransformer(replace(tiny_model_cfg, hidden_dim=256, latent_dim=16))
    assert default.encoder_readout.weight.std().item() == \
        pytest.approx(tiny_model_cfg.init_std, rel=0.05)


def test_log_window_means_finite_values_only():
    from freetf.training.context import LogWindow

    window = LogWindow()
    assert window.means() == {}
    window.add({"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))})
    window.add({"a": torch.tensor(3.0), "b": torch.tensor(float("inf"))})
    window.add({"a": torch.tensor(float("nan")), "b": torch.tensor(float("nan"))})
    means = window.means()
    assert means["a"] == 2.0 and math.isnan(means["b"]) and list(means) == ["a", "b"]


def test_nonfinite_guard_counts_runs_and_stops_at_the_limit(tmp_path, caplog):
    from freetf.training.loop import NonFiniteGuard

    guard = NonFiniteGuard(limit=3, device=torch.device("cpu"))
    for bad in (False, True, True, False, True):
        guard.observe(torch.tensor(bad))
    with caplog.at_level("WARNING", logger="freetf.training.loop"):
        assert guard.check(5, tmp_path) == 3  # total skipped; longest run 2 < 3
    assert "3 non-finite step(s) skipped" in caplog.text
    caplog.clear()
    assert guard.check(6, tmp_path) == 3 and not caplog.text  # nothing new: no warning
    guard.observe(torch.tensor(True))
    guard.observe(torch.tensor(True))  # a run of 3 (one before the check)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps by step 8"):
        guard.check(8, tmp_path)


def test_nonfinite_stop_explains_itself_and_crosses_processes(tmp_path):
    import pickle

    err = NonFiniteLossError(4, 12, tmp_path / "step_000010")
    clone = pickle.loads(pickle.dumps(err))  # a Ray worker's error reaches the driver so
    assert (clone.count, clone.step, clone.checkpoint) == (4, 12, tmp_path / "step_000010")
    assert str(clone) == "4 consecutive non-finite steps by step 12; stopping"

    risky = load_config(overrides=["training.learning_rate=0.003", "training.warmup_steps=10",
                                   "training.grad_clip=0", "training.amp=fp16",
                                   "training.max_consecutive_nonfinite=4"])
    assert err.explain(risky, tmp_path / "ckpt") == (
        "training stopped at step 12: 4 steps in a row had a non-finite loss or gradient "
        "(training.max_consecutive_nonfinite=4); their updates were skipped.\n"
        f"The last checkpoint is {tmp_path / 'ckpt'}; it holds finite weights (resume from "
        "it with --resume after changing the config).\n"
        "To change: lower training.learning_rate (now 0.003); or lengthen "
        "training.warmup_steps (now 10); or turn on gradient clipping, e.g. "
        "training.grad_clip=1.0 (now off); or use training.amp=bf16 (fp16 overflows more "
        "easily).")
    careful = load_config(overrides=["training.learning_rate=1e-4", "training.warmup_steps=100",
                                     "training.grad_clip=1.0", "training.amp=bf16",
                                     "checkpoint.every_steps=0"])
    lines = err.explain(careful, None).split("\n")
    assert lines[1:] == ["No checkpoint was saved before the stop (checkpoint.every_steps=0 "
                         "saves only at the end).",
                         "To change: lower training.learning_rate (now 0.0001)."]
    saving = careful.replace(["checkpoint.every_steps=5"])
    assert err.explain(saving, None).split("\n")[1] == "No checkpoint was saved before the stop."


def test_step_noise_slices_one_draw_per_step_by_rank_and_micro_batch():
    from freetf.training.loop import step_noise

    cfg = load_config(overrides=["model.latent_dim=3", "training.grad_accum_steps=2"])
    one = step_noise(cfg, 5, 8, 6, 0, 1)  # (k, G, T, H)
    assert one.shape == (2, 8, 6, 3)
    for rank in range(2):
        assert torch.equal(step_noise(cfg, 5, 8, 6, rank, 2), one[:, rank::2])
    assert not torch.equal(step_noise(cfg, 6, 8, 6, 0, 1), one)  # a new draw each step
    assert not torch.equal(one[0], one[1])
    assert step_noise(cfg.replace(["model.latent_dim=0"]), 5, 8, 6, 0, 1) is None


# ----------------------------------------------------------------------------- FSDP, one rank


@pytest.fixture
def process_group(tmp_path):
    """A one-rank gloo process group in this process (tests/test_fsdp.py spawns several)."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


class _ShardingContext(TrainContext):
    def shard_model(self, model, cfg):
        from freetf.training.parallel import apply_fsdp

        if cfg.scaling.strategy != "fsdp":
            return model
        return apply_fsdp(model, cfg, torch.device("cpu"))


def test_fsdp_in_process_trains_saves_and_resumes_like_the_plain_loop(tmp_path, process_group):
    """The loop's FSDP paths on one rank: sharded saves (and their pruning), resumes from
    shards into FSDP and into a plain model, a full checkpoint into FSDP, CPU offload."""
    import json

    def run(name, *extra, resume=None):
        cfg = tiny(tmp_path / name, "training.max_steps=6", "checkpoint.every_steps=3",
                   "checkpoint.keep=1", "diagnostics.free_generations=0",
                   "scaling.use_ray=true", *extra)  # the loop itself never starts Ray
        return train_loop(cfg, _ShardingContext(resume_from=resume))

    plain = run("plain", "checkpoint.keep=2")
    fsdp = run("fsdp", "scaling.strategy=fsdp", "checkpoint.keep=2")
    offload = run("offload", "scaling.strategy=fsdp", "scaling.fsdp_cpu_offload=true")
    expected = losses(plain.history)
    for result in (fsdp, offload):
        assert losses(result.history) == pytest.approx(expected, rel=1e-5)
        assert result.checkpoint.name == "step_000006" and (result.checkpoint / "shards").is_dir()
    for result, kept in ((fsdp, ["step_000003", "step_000006"]), (offload, ["step_000006"])):
        assert sorted(p.name for p in result.checkpoint.parent.glob("step_*")) == kept
        meta = json.loads((result.checkpoint / "meta.json").read_text())
        assert meta["step"] == 6 and meta["train/loss"] == pytest.approx(expected[6], rel=1e-5)
        full, _ = load_checkpoint(result.checkpoint)  # consolidated from the shards
        reference, _ = load_checkpoint(plain.checkpoint)
        for key, value in reference["model"].items():
            assert torch.allclose(full["model"][key], value, atol=1e-5), key

    sharded = fsdp.checkpoint.parent / "step_000003"
    full_step_3 = tmp_path / "plain" / "ckpt" / "step_000003"
    for name, extra, resume in (("shards->fsdp", ["scaling.strategy=fsdp"], sharded),
                                ("shards->plain", [], sharded),
                                ("full->fsdp", ["scaling.strategy=fsdp"], full_step_3)):
        resumed = losses(run(name, *extra, resume=resume).history)
        assert sorted(resumed) == [4, 5, 6], name
        for step, loss in resumed.items():
            assert loss == pytest.approx(expected[step], rel=1e-5), (name, step)
