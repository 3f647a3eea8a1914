"""The evaluation's measures on the synthetic task: the exact floor of the evaluated rows,
the use of Z by token class, the honest bound, the validity interval and the plateau."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from freetf import load_config
from freetf.config import ModelConfig
from freetf.data.datasets import build_data, synthetic_sequences
from freetf.data.stream import BatchStream
from freetf.evaluation.diagnostics import verdict
from freetf.evaluation.latent_use import latent_use
from freetf.evaluation.measures import task_measures
from freetf.evaluation.synthetic_bayes import CLASS_NAMES, bayes_floor_nats, token_classes
from freetf.evaluation.synthetic_eval import free_generations, generation_stats
from freetf.model.transformer import FreeTransformer
from freetf.training.context import TrainContext
from freetf.training.evaluate import evaluate
from freetf.training.loop import train_loop

pytestmark = pytest.mark.timeout(120)

TINY_SYNTHETIC = ["model.hidden_dim=32", "model.num_layers=2", "model.num_heads=2",
                  "data.num_samples=256", "data.val_samples=64", "training.batch_size=16",
                  "training.eval_batches=2", "diagnostics.free_generations=32",
                  "scaling.use_ray=false", "checkpoint.every_steps=0"]


@pytest.mark.parametrize("latent", [0, 4])
def test_an_evaluation_logs_the_floor_of_its_own_rows_and_the_use_of_z(latent):
    cfg = load_config("freetf/configs/synthetic.yaml",
                      [*TINY_SYNTHETIC, f"model.latent_dim={latent}"])
    data = build_data(cfg)
    model = FreeTransformer(cfg.model)
    m = evaluate(model, data, cfg, torch.device("cpu"), cfg.training.free_bits_nats,
                 samples=True)
    val = BatchStream(data.val, cfg.training.batch_size, seed=cfg.data.seed, drop_last=True)
    rows = np.concatenate([next(val).numpy() for _ in range(2)])  # the evaluated rows
    assert m["eval/floor_nats"] == pytest.approx(bayes_floor_nats(rows), abs=1e-12)
    ce = m["eval/ce_posterior_nats" if latent else "eval/ce_prior_nats"]
    assert m["eval/excess_nats"] == pytest.approx(ce - m["eval/floor_nats"], abs=1e-12)
    assert 0 <= m["eval/valid_low"] <= m["eval/valid_rate"] <= m["eval/valid_high"] <= 1
    assert m["eval/valid_draws"] == 32
    if latent:
        assert m["eval/use_rows"] == 32
        for name in ("use", "use_position", "use_noise", "use_letter", "ce_iw"):
            assert m[f"eval/{name}_low_nats"] <= m[f"eval/{name}_nats"] \
                <= m[f"eval/{name}_high_nats"], name
        assert m["eval/excess_iw_nats"] == pytest.approx(m["eval/ce_iw_nats"]
                                                         - m["eval/floor_nats"], abs=1e-12)
    else:
        assert not any(k.startswith("eval/use") or k.startswith("eval/ce_iw") for k in m)


def test_the_loop_logs_the_plateau_at_every_evaluation():
    cfg = load_config("freetf/configs/synthetic.yaml", [
        *TINY_SYNTHETIC, "training.max_steps=6", "training.eval_every=2",
        "training.log_every=2", "diagnostics.converge_evals=2",
        "diagnostics.converge_ce_nats=100", "diagnostics.converge_kl_bits=100"])
    result = train_loop(cfg, TrainContext())
    evals = [h for h in result.history if "eval/ce_prior_nats" in h]
    assert [h["eval/converged"] for h in evals] == [0.0, 1.0, 1.0]  # 2 evaluations needed
    spread = abs(evals[2]["eval/ce_posterior_nats"] - evals[1]["eval/ce_posterior_nats"])
    assert evals[2]["eval/plateau_ce_nats"] == pytest.approx(spread)


@pytest.mark.parametrize("kl_bits, kl_frac, converged", [(0.0, 0.0, 0.0), (0.0, 1e4, 1.0),
                                                          (1e4, 0.0, 1.0)])
def test_the_kl_tolerance_is_the_larger_of_bits_and_a_share_of_kappa(kl_bits, kl_frac,
                                                                     converged):
    cfg = load_config("freetf/configs/synthetic.yaml", [
        *TINY_SYNTHETIC, "training.max_steps=4", "training.eval_every=2",
        "training.log_every=2", "diagnostics.converge_evals=2",
        "diagnostics.converge_ce_nats=100", f"diagnostics.converge_kl_bits={kl_bits}",
        f"diagnostics.converge_kl_frac={kl_frac}", "diagnostics.free_generations=0"])
    result = train_loop(cfg, TrainContext())
    last = [h for h in result.history if "eval/ce_prior_nats" in h][-1]
    assert last["eval/plateau_kl_bits"] > 0  # the KL moved between the two evaluations
    assert last["eval/converged"] == converged


def _measures_cfg(dataset="synthetic", redraws=3):
    return SimpleNamespace(data=SimpleNamespace(dataset_name=dataset),
                           diagnostics=SimpleNamespace(use_redraws=redraws, iw_prior_draws=2),
                           training=SimpleNamespace(seed=7))


@pytest.mark.parametrize("dataset", ["synthetic", "text"])
@pytest.mark.parametrize("metrics, ce_key", [
    ({"eval/ce_posterior_nats": 3.5, "eval/ce_prior_nats": 3.9}, "eval/ce_posterior_nats"),
    ({"eval/ce_prior_nats": 3.9}, "eval/ce_prior_nats"),
    ({}, None)])
def test_task_measures_are_the_use_of_z_at_its_seed_and_the_floor_of_the_rows(
        dataset, metrics, ce_key):
    """Against latent_use and bayes_floor_nats called as the module docstring says, on a
    model wrapped the way DDP wraps it (``.module``)."""
    torch.manual_seed(0)
    model = FreeTransformer(ModelConfig(vocab_size=29, hidden_dim=16, num_layers=2,
                                        num_heads=2, latent_dim=3, max_seq_len=66,
                                        init_std=0.3))
    rows = torch.as_tensor(synthetic_sequences(8, seed=1))
    batches = [rows[:4], rows[4:].numpy()]
    classes = ({"token_classes": token_classes, "class_names": CLASS_NAMES}
               if dataset == "synthetic" else {})
    expected = latent_use(model, batches, 3, 2, seed=7 + 29, **classes)
    assert expected != latent_use(model, batches, 3, 2, seed=7 + 30, **classes)
    got = task_measures(SimpleNamespace(module=model), batches, _measures_cfg(dataset),
                        dict(metrics))
    floor = bayes_floor_nats(rows.numpy())
    if dataset == "synthetic":
        assert "eval/use_letter_nats" in expected
        expected["eval/floor_nats"] = floor
        expected["eval/excess_iw_nats"] = expected["eval/ce_iw_nats"] - floor
        if ce_key:
            expected["eval/excess_nats"] = metrics[ce_key] - floor
    assert got == expected


@pytest.mark.parametrize("redraws, latent, use", [(0, 3, False), (1, 3, True),
                                                   (2, 0, False)])
def test_task_measures_measure_the_use_of_z_only_with_a_latent_and_redraws(redraws, latent,
                                                                          use):
    model = FreeTransformer(ModelConfig(vocab_size=29, hidden_dim=16, num_layers=2,
                                        num_heads=2, latent_dim=latent, max_seq_len=66))
    rows = torch.as_tensor(synthetic_sequences(4, seed=1))
    got = task_measures(model, [rows], _measures_cfg(redraws=redraws),
                        {"eval/ce_prior_nats": 4.0})
    floor = bayes_floor_nats(rows.numpy())
    assert got["eval/floor_nats"] == floor and got["eval/excess_nats"] == 4.0 - floor
    assert ("eval/use_nats" in got) == use and ("eval/excess_iw_nats" in got) == use
    assert len(got) == (2 + 3 * 6 + 1 + 1 if use else 2)  # use, ce_iw, 4 classes; rows


def test_an_evaluation_leaves_samples_and_free_generations_to_be_asked_for():
    cfg = load_config("freetf/configs/synthetic.yaml", TINY_SYNTHETIC)
    data = build_data(cfg)
    model = FreeTransformer(cfg.model)
    plain = evaluate(model, data, cfg, torch.device("cpu"), cfg.training.free_bits_nats)
    assert "eval/samples" not in plain and "eval/valid_rate" not in plain
    generations = evaluate(model, data, cfg, torch.device("cpu"), cfg.training.free_bits_nats,
                           generations=True)
    assert "eval/samples" not in generations and generations["eval/valid_draws"] == 32


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cfg_kappa, kappa", [(50.0, 0.0), (0.0, 50.0)])
def test_the_verdict_is_judged_at_the_kappa_given_not_the_configs(cfg_kappa, kappa):
    """The loop passes the scheduled kappa, which differs from the config's: leaking at
    one, used at the other (no collapse, no gap test, so only the KL test decides)."""
    cfg = load_config("freetf/configs/synthetic.yaml", [
        *TINY_SYNTHETIC, "model.latent_dim=4", f"training.free_bits_bits={cfg_kappa}",
        "diagnostics.collapsed_kl_nats=0", "diagnostics.leak_gap_nats=1e9"])
    torch.manual_seed(0)
    m = evaluate(FreeTransformer(cfg.model), build_data(cfg), cfg, torch.device("cpu"), kappa)
    assert m["eval/verdict"] == verdict(m, cfg, kappa)
    assert {verdict(m, cfg, kappa), verdict(m, cfg)} == {"leaking", "used"}  # cfg's kappa


@pytest.mark.timeout(60)
@pytest.mark.parametrize("asked", [{"generations": True}, {"samples": True}])
def test_free_generations_are_drawn_at_the_training_seed_plus_17(monkeypatch, asked):
    """The same draws at every evaluation of a run, and others in a run of another seed."""
    import freetf.training.evaluate as eval_mod

    cfg = load_config("freetf/configs/synthetic.yaml", [
        *TINY_SYNTHETIC, "training.seed=3", "diagnostics.free_generations=4"])
    model = FreeTransformer(cfg.model)
    drawn = []

    def spied(model, num, seed=0, **kwargs):  # the real draws, their seed recorded
        drawn.append((num, seed))
        return free_generations(model, num, seed=seed, **kwargs)

    monkeypatch.setattr(eval_mod, "free_generations", spied)
    m = evaluate(model, build_data(cfg), cfg, torch.device("cpu"), 0.5, **asked)
    assert drawn == [(4, 3 + 17)]
    expected = generation_stats(free_generations(model, 4, seed=3 + 17))
    assert {k: m[k] for k in expected} == pytest.approx(expected, nan_ok=True)


@pytest.mark.timeout(60)
def test_free_generations_are_left_out_on_data_other_than_the_synthetic_task(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    cfg = load_config(overrides={
        "data.dataset_name": "text", "data.path": str(tmp_path / "a.txt"),
        "data.max_seq_len": 16, "model.max_seq_len": 16, "model.hidden_dim": 16,
        "model.num_layers": 2, "model.num_heads": 2, "model.latent_dim": 2,
        "training.batch_size": 4, "training.eval_batches": 1,
        "diagnostics.free_generations": 8})
    data = build_data(cfg)
    m = evaluate(FreeTransformer(cfg.model), data, cfg, torch.device("cpu"), 0.5,
                 samples=True, generations=True)
    assert m["eval/samples"]  # samples, but no free generations of the synthetic task
    assert not any(k.startswith(("eval/valid", "eval/gen_")) for k in m)
