"""The training loop's parts: optimizer groups, step counts, AMP dtype, the non-finite
guard and its error, Z's noise per step."""

from __future__ import annotations

import math

import pytest
import torch

from freetf import load_config
from freetf.config import ConfigError
from freetf.training.loop import NonFiniteLossError
from freetf.training.optim import amp_dtype

pytestmark = pytest.mark.timeout(240)


def test_amp_defaults():
    cfg = load_config()
    assert amp_dtype(cfg, torch.device("cpu")) is None
    assert amp_dtype(cfg, torch.device("cuda")) == torch.bfloat16
    assert amp_dtype(cfg.replace(["training.amp=fp16"]), torch.device("cuda")) == torch.float16
    assert amp_dtype(cfg.replace(["training.amp=bf16"]), torch.device("cpu")) == torch.bfloat16
    assert amp_dtype(cfg.replace(["training.amp=off"]), torch.device("cuda")) is None


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


@pytest.mark.parametrize("per", ["token", "sequence"])
def test_the_loop_hinges_free_bits_as_configured(tmp_path, monkeypatch, per):
    from train_helpers import tiny

    import freetf.training.loop as loop
    from freetf.model.losses import compute_loss
    from freetf.training.loop import train_loop

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("free_bits_per"))
        return compute_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", spy)
    train_loop(tiny(tmp_path, "training.max_steps=2", f"training.free_bits_per={per}"))
    assert seen and set(seen) == {per}
