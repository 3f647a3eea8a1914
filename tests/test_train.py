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


@pytest.mark.parametrize("latent_dim", [0, 4])
def test_chunked_cross_entropy_trains_like_the_plain_loss(tmp_path, latent_dim):
    """training.cross_entropy=chunked: the same losses and final weights as plain, for
    the baseline and the Free Transformer (the LM head's gradient arrives through it)."""
    runs = []
    for impl in ("plain", "chunked"):
        cfg = tiny(tmp_path / impl, "training.max_steps=6", f"model.latent_dim={latent_dim}",
                   "training.learning_rate=3e-3", f"training.cross_entropy={impl}",
                   "training.cross_entropy_chunk_tokens=50")
        runs.append(train_loop(cfg))
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
