"""The config's checks: every key with a sign or range check, the model's and the
cross-section checks, FSDP's refusals and curriculum phases, by their whole messages and
at their edges."""

from __future__ import annotations

import pytest

from freetf import ConfigError, load_config
from freetf.config import (
    flatten,
    from_dict,
)

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("phase,message", [
    ({"until_step": 0}, "training.curriculum[0].until_step=0 must be > 0"),
    ({"until_step": 5, "max_seq_len": 0}, "training.curriculum[0].max_seq_len=0 must be > 0"),
    ({"until_step": 5, "kl_weight": -1}, "training.curriculum[0].kl_weight=-1.0 must be >= 0"),
])
def test_a_curriculum_phase_is_checked_under_its_index(phase, message):
    with pytest.raises(ConfigError) as err:
        from_dict({"training": {"curriculum": [phase]}})
    assert str(err.value) == message


FSDP = {"scaling.strategy": "fsdp", "scaling.num_workers": 2}


@pytest.mark.parametrize("extra,message", [
    ({"scaling.use_ray": False}, "scaling.strategy='fsdp' needs the distributed path: set "
     "scaling.use_ray=true (or scaling.strategy=ddp)"),
    ({"scaling.num_workers": 0}, "scaling.strategy='fsdp' needs Ray Train workers: set "
     "scaling.num_workers >= 1 (0 is the local mode, with no process group)"),
    ({"training.amp": "fp16"}, "training.amp='fp16' is not supported with "
     "scaling.strategy=fsdp (no sharded gradient scaler); use training.amp=bf16"),
    ({"scaling.fsdp_cpu_offload": True, "optimizer.fused": "fused"},
     "optimizer.fused='fused' cannot step parameters offloaded to the CPU "
     "(scaling.fsdp_cpu_offload=true); use optimizer.fused=auto"),
])
def test_fsdp_refuses_what_it_cannot_shard(extra, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides={**FSDP, **extra})
    assert str(err.value) == message


def test_fsdp_accepts_its_edges():
    """One worker, bf16 or off, CPU offload with a fused setting other than "fused", or
    "fused" without offload; none of the refusals applies to ddp."""
    for extra in ({"scaling.num_workers": 1}, {"training.amp": "bf16"},
                  {"training.amp": "off"},
                  {"scaling.fsdp_cpu_offload": True, "optimizer.fused": "foreach"},
                  {"optimizer.fused": "fused"}):
        assert load_config(overrides={**FSDP, **extra}).scaling.strategy == "fsdp"
    ddp = {"scaling.use_ray": False, "scaling.num_workers": 0, "training.amp": "fp16",
           "scaling.fsdp_cpu_offload": True, "optimizer.fused": "fused"}
    assert load_config(overrides=ddp).scaling.strategy == "ddp"


# Every key with a sign check, and its refused value as the message prints it.
POSITIVE = {
    "model.vocab_size": "0", "model.hidden_dim": "0", "model.num_layers": "0",
    "model.num_heads": "0", "model.max_seq_len": "0",
    "training.kl_annealing.cycles": "0",
    "training.batch_size": "0", "training.learning_rate": "0.0", "training.num_epochs": "0",
    "training.max_steps": "0", "training.grad_accum_steps": "0", "training.log_every": "0",
    "training.eval_batches": "0", "training.max_consecutive_nonfinite": "0",
    "optimizer.eps": "0.0", "optimizer.post_sampler_lr_mult": "0.0",
    "data.max_seq_len": "0", "data.num_samples": "0", "data.val_samples": "0",
    "checkpoint.keep": "0",
    "scaling.cpus_per_worker": "0.0",
    "diagnostics.iw_prior_draws": "0", "diagnostics.converge_evals": "0",
}
NON_NEGATIVE = {
    "model.mapper_chunk_size": "-1", "model.post_sampler_init_std": "-1.0",
    "model.readout_init_std": "-1.0",
    "training.kl_annealing.initial_weight": "-1.0", "training.kl_annealing.warmup_steps": "-1",
    "training.free_bits_schedule.initial_free_bits": "-1.0",
    "training.free_bits_schedule.initial_free_bits_bits": "-1.0",
    "training.free_bits_schedule.steps": "-1",
    "training.warmup_steps": "-1", "training.weight_decay": "-1.0",
    "training.kl_weight": "-1.0", "training.free_bits": "-1.0",
    "training.free_bits_bits": "-1.0", "training.grad_clip": "-1.0",
    "training.eval_every": "-1", "training.cross_entropy_chunk_tokens": "-1",
    "scheduler.min_lr": "-1.0",
    "data.num_workers": "-1",
    "checkpoint.every_steps": "-1",
    "scaling.num_workers": "-1", "scaling.gpus_per_worker": "-1.0",
    "scaling.max_failures": "-1", "scaling.report_interval_s": "-1.0",
    **{f"diagnostics.{name}": "-1.0" for name in (
        "active_bit_threshold_nats", "collapsed_kl_nats", "collapsed_gap_nats",
        "leak_kl_factor", "leak_gap_nats", "noise_z", "use_tol_nats", "leak_valid_tol",
        "broken_valid", "leak_cost_tol_nats", "converge_ce_nats", "converge_kl_bits",
        "converge_kl_frac", "floor_tol_nats", "regime_tol_nats")},
    "diagnostics.free_generations": "-1", "diagnostics.use_redraws": "-1",
}


@pytest.mark.parametrize("key,shown", POSITIVE.items(), ids=list(POSITIVE))
def test_a_positive_key_refuses_zero(key, shown):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{key}=0"])
    assert str(err.value) == f"{key}={shown} must be > 0"


@pytest.mark.parametrize("key,shown", NON_NEGATIVE.items(), ids=list(NON_NEGATIVE))
def test_a_non_negative_key_refuses_minus_one_and_takes_zero(key, shown):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{key}=-1"])
    assert str(err.value) == f"{key}={shown} must be >= 0"
    assert flatten(load_config(overrides=[f"{key}=0"]).to_dict())[key] == 0


@pytest.mark.parametrize("overrides,message", [
    ({"training.kl_annealing.ratio": 0}, "training.kl_annealing.ratio=0.0 must be in (0, 1]"),
    ({"training.kl_annealing.ratio": 1.5},
     "training.kl_annealing.ratio=1.5 must be in (0, 1]"),
    ({"optimizer.betas": [-0.1, 0.9]}, "optimizer.betas[0]=-0.1 must be in [0, 1)"),
    ({"optimizer.betas": [0.9, 1.0]}, "optimizer.betas[1]=1.0 must be in [0, 1)"),
    ({"data.val_fraction": 0}, "data.val_fraction=0.0 must be in (0, 1)"),
    ({"data.val_fraction": 1}, "data.val_fraction=1.0 must be in (0, 1)"),
    ({"data.dataset_name": "tokens", "data.path": ""},
     "data.path='' is required when data.dataset_name='tokens'"),
    ({"data.dataset_name": "text"}, "data.path=None is required when data.dataset_name='text'"),
    ({"checkpoint.metric": "ce"}, "checkpoint.metric='ce' must be a logged metric: 'step', "
     "'train/...' or 'eval/...' (e.g. eval/ce_prior_nats)"),
    ({"checkpoint.metric": "Step"}, "checkpoint.metric='Step' must be a logged metric: "
     "'step', 'train/...' or 'eval/...' (e.g. eval/ce_prior_nats)"),
])
def test_a_range_check_refuses_its_edges_by_name(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert str(err.value) == message


@pytest.mark.parametrize("overrides", [
    {"training.kl_annealing.ratio": 1.0}, {"training.kl_annealing.ratio": 1e-9},
    {"optimizer.betas": [0.0, 0.999]},
    {"data.val_fraction": 1e-9}, {"data.val_fraction": 0.999},
    {"data.dataset_name": "tokens", "data.path": "t.bin"},
    {"checkpoint.metric": "step"}, {"checkpoint.metric": "train/loss"},
    {"checkpoint.metric": "eval/ce_prior_nats"},
], ids=str)
def test_a_range_check_takes_its_edges(overrides):
    cfg = flatten(load_config(overrides=overrides).to_dict())
    for key, value in overrides.items():
        assert cfg[key] == value


TEXT = {"data.dataset_name": "text", "data.path": "corpus.txt"}


@pytest.mark.parametrize("overrides,message", [
    ({"model.num_heads": 7}, "model.num_heads=7 must divide model.hidden_dim=256"),
    ({"model.hidden_dim": 24}, "model.num_heads=8 gives an odd head dim 3; RoPE needs it even"),
    ({"model.num_kv_heads": 0},
     "model.num_kv_heads=0 must be positive and divide model.num_heads=8"),
    ({"model.num_kv_heads": 3},
     "model.num_kv_heads=3 must be positive and divide model.num_heads=8"),
    ({"model.latent_dim": -1}, "model.latent_dim=-1 must be >= 0 (0 = baseline)"),
    ({"model.dropout": 1.0}, "model.dropout=1.0 must be in [0, 1)"),
    ({"model.dropout": -0.1}, "model.dropout=-0.1 must be in [0, 1)"),
    ({"model.injection_layer": 8}, "model.injection_layer=8 must be in [0, num_layers=8)"),
    ({"model.injection_layer": -1}, "model.injection_layer=-1 must be in [0, num_layers=8)"),
    ({"model.latent_dim": 21}, "model.latent_dim=21 is too large for the exact binary mapper "
     "(its post-sampler has 2^21 rows); use model.mapper=factored, or latent_dim <= 20"),
    ({"training.curriculum": [{"until_step": 5}, {"until_step": 5}]},
     "training.curriculum[1].until_step=5 phases must end at increasing steps"),
    ({"data.max_seq_len": 257}, "data.max_seq_len=257 exceeds model.max_seq_len=256"),
    ({"training.curriculum": [{"until_step": 5, "max_seq_len": 67}]},
     "training.curriculum[0].max_seq_len=67 exceeds data.max_seq_len=66"),
    ({**TEXT, "model.vocab_size": 255},
     "model.vocab_size=255 must be >= 256 for byte-level text data"),
])
def test_the_model_and_cross_section_checks_by_whole_message(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert str(err.value) == message


@pytest.mark.parametrize("overrides", [
    {"model.num_kv_heads": 1}, {"model.num_kv_heads": 8}, {"model.hidden_dim": 16},
    {"model.latent_dim": 0}, {"model.dropout": 0.0}, {"model.dropout": 0.99},
    {"model.injection_layer": 0}, {"model.injection_layer": 7},
    {"model.latent_dim": 20}, {"model.latent_dim": 64, "model.mapper": "factored"},
    {"training.curriculum": [{"until_step": 1}, {"until_step": 2}]},
    {"data.max_seq_len": 256},
    {"training.curriculum": [{"until_step": 5, "max_seq_len": 66}]},
    {**TEXT, "model.vocab_size": 256},
], ids=str)
def test_the_model_and_cross_section_checks_take_their_edges(overrides):
    cfg = flatten(load_config(overrides=overrides).to_dict())
    for key, value in overrides.items():
        if key == "training.curriculum":  # a phase's unset keys read None
            value = [{"max_seq_len": None, "kl_weight": None, **phase} for phase in value]
        assert cfg[key] == value


@pytest.mark.parametrize("data,message", [
    ({"training": {"amp": "fp8"}},
     "training.amp='fp8' must be one of 'auto', 'bf16', 'fp16', 'off'"),
    ({"training": {"curriculum": 3}}, "training.curriculum=3 must be a list"),
    ({"training": {"curriculum": [{"until_step": 1}, {"until_step": "x"}]}},
     "training.curriculum[1].until_step='x' must be an integer"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas=[0.9] must be a list of 2 values"),
    ({"optimizer": {"betas": 0.9}}, "optimizer.betas=0.9 must be a list of 2 values"),
    ({"optimizer": {"betas": [0.9, "x"]}}, "optimizer.betas[1]='x' must be a number"),
])
def test_choices_lists_and_pairs_name_the_element(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert str(err.value) == message
