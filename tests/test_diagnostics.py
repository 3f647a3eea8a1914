"""Latent diagnostics on constructed models, and the verdict on hand-made metrics."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL

import freetf.evaluation.diagnostics as diagnostics
from freetf import FreeTransformer, load_config
from freetf.evaluation.diagnostics import MIN_FREE_BITS_NATS, latent_diagnostics, verdict
from freetf.model.losses import LN2, kl_per_bit
from freetf.model.mapper import bits_to_codes, code_bits, sample_bits

pytestmark = pytest.mark.timeout(60)


def make(*overrides: str):
    cfg = load_config(overrides=[*TINY_MODEL, *overrides])
    return cfg, FreeTransformer(cfg.model)


def rows(n_batches: int = 2, b: int = 4, t: int = 16, vocab: int = 32) -> list[torch.Tensor]:
    return [torch.randint(0, vocab, (b, t)) for _ in range(n_batches)]


def set_readout(model, bias: list[float] | None = None, weight_scale: float = 0.0) -> None:
    with torch.no_grad():
        model.encoder_readout.weight.mul_(weight_scale)
        model.encoder_readout.bias.copy_(torch.tensor(bias or [0.0] * model.config.latent_dim))


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed CE of logits[:, :-1] against ids[:, 1:]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           ids[:, 1:].reshape(-1), reduction="sum")


# ----------------------------------------------------------------------------- (a) collapse


def test_zero_readout_gives_zero_kl_and_zero_mapper_gives_collapse():
    cfg, model = make()
    set_readout(model)  # z_logits = 0: every bit's posterior is exactly 1/2
    with torch.no_grad():
        model.mapper.weight.zero_()  # r = 0 whatever the code: Z is ignored
        model.mapper.bias.zero_()
    model.train()
    m = latent_diagnostics(model, rows(), cfg)
    assert model.training and model.encoder.training  # train mode restored
    assert m["eval/kl_nats"] == pytest.approx(0.0, abs=1e-6)
    assert m["eval/kl_bits"] == pytest.approx(0.0, abs=1e-6)
    for h in range(4):
        assert m[f"eval/kl_bit_{h}_nats"] == pytest.approx(0.0, abs=1e-6)
    assert m["eval/active_bits"] == 0
    assert m["eval/mutual_info_nats"] == pytest.approx(0.0, abs=1e-6)
    assert m["eval/ce_prior_nats"] == pytest.approx(m["eval/ce_posterior_nats"], abs=1e-6)
    assert m["eval/ce_shuffled_nats"] == pytest.approx(m["eval/ce_posterior_nats"], abs=1e-6)
    assert abs(m["eval/ce_gap_nats"]) < 1e-6
    assert m["eval/ppl_prior"] == pytest.approx(math.exp(m["eval/ce_prior_nats"]))
    assert verdict(m, cfg) == "collapsed"


class _Wrapped(torch.nn.Module):
    """A DistributedDataParallel-like wrapper: the model is ``.module``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def test_wrapped_model_and_another_default_device_give_the_same_metrics():
    """DDP's wrapper is unwrapped; batches, noise and sums live on the model's device even
    when the default device is another one (as on a GPU run, where it stays CPU)."""
    cfg, model = make()
    set_readout(model, weight_scale=50.0)
    batches = rows(2)
    torch.manual_seed(4)
    reference = latent_diagnostics(model, batches, cfg)
    torch.manual_seed(4)
    assert latent_diagnostics(_Wrapped(model), batches, cfg) == reference
    torch.manual_seed(4)
    with torch.device("meta"):  # tensors made without a device would land on "meta"
        assert latent_diagnostics(model, batches, cfg) == pytest.approx(reference)
    torch.manual_seed(4)
    with torch.device("meta"):
        assert latent_diagnostics(model, batches, cfg, device="cpu") == pytest.approx(reference)


def test_eval_mode_is_kept_when_the_model_was_in_eval():
    cfg, model = make()
    model.eval()
    latent_diagnostics(model, rows(1), cfg)
    assert not any(mod.training for mod in model.modules())


# ----------------------------------------------------------------------------- (b) KL, no MI


def test_confident_posterior_independent_of_x_has_kl_but_no_mutual_information():
    cfg, model = make()
    set_readout(model, bias=[12.0, -12.0, 0.0, 0.0])  # bits 0, 1 fixed; 2, 3 fair coins
    m = latent_diagnostics(model, rows(), cfg)
    assert m["eval/kl_bit_0_nats"] == pytest.approx(LN2, abs=1e-3)
    assert m["eval/kl_bit_1_nats"] == pytest.approx(LN2, abs=1e-3)
    assert m["eval/kl_bit_2_nats"] == pytest.approx(0.0, abs=1e-6)
    assert m["eval/kl_nats"] == pytest.approx(2 * LN2, abs=2e-3)
    assert m["eval/kl_bits"] == pytest.approx(2.0, abs=3e-3)
    assert m["eval/active_bits"] == 2
    assert m["eval/mutual_info_nats"] == pytest.approx(0.0, abs=1e-6)
    # a bit is active when its KL is strictly above the threshold: KL = 0 is not, even at 0
    at_zero = latent_diagnostics(model, rows(1), cfg.replace(
        ["diagnostics.active_bit_threshold_nats=0.0"]))
    assert at_zero["eval/kl_bit_3_nats"] == 0.0 and at_zero["eval/active_bits"] == 2
    # codes: bit0 = 1, bit1 = 0, bits 2-3 uniform -> 4 codes in use
    assert m["eval/code_usage"] == 4
    assert m["eval/code_perplexity"] == pytest.approx(4.0, rel=1e-3)


def test_mutual_information_is_per_bit_sum_and_bounds_the_joint_estimate():
    """x-dependent posterior: MI > 0, equal to sum_h I(X; B_h), >= the joint-q_bar value."""
    cfg, model = make()
    set_readout(model, weight_scale=100.0)
    with torch.no_grad():  # at init the encoder output is ~ zeta, the same for every x
        for name in ("wq", "wk", "wv", "wo"):
            getattr(model.encoder.attn, name).weight.mul_(10.0)
    batches = rows(2, b=4, t=12)
    m = latent_diagnostics(model, batches, cfg)
    with torch.no_grad():
        z = torch.cat([model.eval()(ids)[1][:, :-1].reshape(-1, 4) for ids in batches])
    z = z.double()  # (N, H)
    p = torch.sigmoid(z)
    table = code_bits(4).double()  # (16, H)
    q = torch.exp(F.logsigmoid(z) @ table.T + F.logsigmoid(-z) @ (1 - table).T)  # (N, 16)
    kl_tokens = (torch.special.xlogy(q, q) + q * 4 * LN2).sum(-1)  # (N,) eq. 4, brute force
    q_bar = q.mean(0)  # (16,) joint aggregate posterior
    mi_joint = kl_tokens.mean() - (torch.special.xlogy(q_bar, q_bar) + q_bar * 4 * LN2).sum()
    p_bar = p.mean(0)  # (H,)
    per_bit_kl = torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p) + LN2
    kl_bar = torch.special.xlogy(p_bar, p_bar) + torch.special.xlogy(1 - p_bar, 1 - p_bar) + LN2
    mi_factorised = (per_bit_kl.mean(0) - kl_bar).sum()
    assert m["eval/kl_nats"] == pytest.approx(kl_tokens.mean().item(), abs=1e-4)
    assert m["eval/mutual_info_nats"] == pytest.approx(mi_factorised.item(), abs=1e-4)
    assert mi_joint.item() > 0.5
    assert m["eval/mutual_info_nats"] >= mi_joint.item() - 1e-6
    assert m["eval/mutual_info_nats"] <= m["eval/kl_nats"] + 1e-6


# ----------------------------------------------------------------------------- CE values


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_ce_values_match_a_replay_of_the_sampling(dropout):
    """Prior, posterior and shuffled CE, and KL over the predicting positions, against a
    manual pass in eval mode with the same draws (a model left in train mode, with
    dropout, is evaluated with dropout off)."""
    cfg, model = make(f"model.dropout={dropout}")
    set_readout(model, weight_scale=50.0)  # codes that differ between rows
    ids = torch.randint(0, 32, (3, 10))
    model.train()
    torch.manual_seed(7)
    m = latent_diagnostics(model, [ids], cfg)
    assert model.training
    torch.manual_seed(7)  # replay: prior draw first, then the bit noise
    model.eval()
    with torch.no_grad():
        prior_logits, _ = model(ids, mode="inference")
        noise = torch.rand(3, 10, 4)
        post_logits, z_logits = model(ids, mode="training", bit_noise=noise)
        codes = bits_to_codes(sample_bits(z_logits, noise))  # (B, T)
        shuf_logits, _ = model(ids, z=codes[[2, 0, 1]])
    n = 3 * 9
    assert m["eval/ce_prior_nats"] == pytest.approx(
        next_token_ce(prior_logits, ids).item() / n, rel=1e-5)  # fp32 sums, another order
    assert m["eval/ce_posterior_nats"] == pytest.approx(
        next_token_ce(post_logits, ids).item() / n, rel=1e-5)  # fp32 sums, another order
    assert m["eval/ce_shuffled_nats"] == pytest.approx(
        next_token_ce(shuf_logits, ids).item() / n, rel=1e-5)  # fp32 sums, another order
    assert m["eval/ce_shuffled_nats"] != pytest.approx(m["eval/ce_posterior_nats"])
    assert m["eval/ce_gap_nats"] == pytest.approx(
        m["eval/ce_prior_nats"] - m["eval/ce_posterior_nats"])
    assert m["eval/ppl_posterior"] == pytest.approx(math.exp(m["eval/ce_posterior_nats"]))
    used = codes[:, :-1].unique().numel()
    assert m["eval/code_usage"] == used
    kl = kl_per_bit(z_logits[:, :-1])  # (B, T-1, H): positions that predict a token
    assert m["eval/kl_nats"] == pytest.approx(kl.sum(-1).mean().item(), rel=1e-6)
    assert m["eval/kl_bit_1_nats"] == pytest.approx(kl[..., 1].mean().item(), rel=1e-6)
    assert m["eval/kl_nats"] != pytest.approx(kl_per_bit(z_logits[:, 1:]).sum(-1).mean().item(),
                                              rel=1e-6)


def test_single_row_batches_leave_ce_shuffled_nan_with_one_warning(caplog):
    cfg, model = make()
    with caplog.at_level("WARNING", logger=diagnostics.__name__):
        m = latent_diagnostics(model, rows(3, b=1), cfg)
    assert math.isnan(m["eval/ce_shuffled_nats"])
    assert math.isfinite(m["eval/ce_posterior_nats"])
    assert len([r for r in caplog.records if "one row" in r.getMessage()]) == 1


def test_two_token_rows_of_a_two_row_batch():
    """T = 2 (one predicted token) is enough, and two rows swap their codes."""
    cfg, model = make()
    set_readout(model, weight_scale=50.0)
    ids = torch.randint(0, 32, (2, 2))
    torch.manual_seed(1)
    m = latent_diagnostics(model, [ids], cfg)
    torch.manual_seed(1)  # replay: prior draw, then the bit noise
    model.eval()
    with torch.no_grad():
        model(ids, mode="inference")
        noise = torch.rand(2, 2, 4)
        post_logits, z_logits = model(ids, mode="training", bit_noise=noise)
        codes = bits_to_codes(sample_bits(z_logits, noise))  # (2, 2)
        swapped, _ = model(ids, z=codes[[1, 0]])
    assert m["eval/ce_posterior_nats"] == pytest.approx(
        next_token_ce(post_logits, ids).item() / 2, rel=1e-5)  # fp32 sums, another order
    assert m["eval/ce_shuffled_nats"] == pytest.approx(
        next_token_ce(swapped, ids).item() / 2, rel=1e-5)  # fp32 sums, another order


def test_rejects_bad_input():
    cfg, model = make()
    with pytest.raises(ValueError, match="no batches"):
        latent_diagnostics(model, [], cfg)
    with pytest.raises(ValueError, match="T >= 2"):
        latent_diagnostics(model, [torch.zeros(2, 1, dtype=torch.long)], cfg)
    assert model.training  # restored after the error too


# ----------------------------------------------------------------------------- (d) codes


@pytest.mark.parametrize("bits", [1, 3])
def test_code_perplexity_is_two_to_the_h_for_fair_bits(bits):
    cfg, model = make(f"model.latent_dim={bits}")
    set_readout(model)  # p = 1/2 for every bit: codes uniform over 2^H
    m = latent_diagnostics(model, rows(4, b=8, t=64), cfg)  # 2016 tokens
    assert m["eval/code_usage"] == 2 ** bits
    assert m["eval/code_perplexity"] == pytest.approx(2.0 ** bits, rel=1e-9)
    assert m["eval/code_entropy_nats"] == pytest.approx(bits * LN2, rel=1e-9)


def test_code_perplexity_of_a_collapsed_posterior_is_not_bounded_by_the_token_count():
    """The aggregate posterior of p = 1/2 bits is uniform over 2^H codes, whatever the
    number of evaluated tokens (a count of sampled codes would read <= 8 here)."""
    cfg, model = make("model.latent_dim=12")
    set_readout(model)
    m = latent_diagnostics(model, rows(1, b=2, t=5), cfg)  # 8 tokens
    assert m["eval/code_usage"] <= 8
    assert m["eval/code_perplexity"] == pytest.approx(2.0 ** 12, rel=1e-9)


def _aggregate_posterior_entropy(z_logits: torch.Tensor) -> float:
    """H(q_bar), q_bar(d) = mean_t prod_h P(B_h = U_h(d)), by enumerating the codes."""
    num_bits = z_logits.shape[-1]
    p = torch.sigmoid(z_logits.double()).reshape(-1, num_bits)  # (N, H)
    q_bar = []
    for code in range(2 ** num_bits):
        u = torch.tensor([(code >> h) & 1 for h in range(num_bits)], dtype=torch.float64)
        q_bar.append((p ** u * (1 - p) ** (1 - u)).prod(-1).mean())
    q = torch.stack(q_bar)
    return -(q * q.log()).sum().item()


def test_code_entropy_is_the_aggregate_posteriors_entropy():
    cfg, model = make("model.latent_dim=3")
    set_readout(model, weight_scale=40.0)  # x-dependent, not saturated posteriors
    batches = rows(2)
    m = latent_diagnostics(model, batches, cfg)
    with torch.no_grad():
        model.eval()
        z = torch.cat([model(ids)[1][:, :-1].reshape(-1, 3) for ids in batches])  # (N, H)
    reference = _aggregate_posterior_entropy(z)
    assert 0.5 < reference < 3 * LN2 - 0.05  # neither one code nor uniform
    assert m["eval/code_entropy_nats"] == pytest.approx(reference, rel=1e-6)
    assert m["eval/code_perplexity"] == pytest.approx(math.exp(reference), rel=1e-6)


@pytest.mark.parametrize("limit", [2, 4])  # 2: a dictionary; 4 = H: still the bincount
def test_dictionary_code_count_agrees_with_bincount(monkeypatch, limit):
    cfg, model = make()
    set_readout(model, weight_scale=30.0)
    batches = rows(3)
    torch.manual_seed(3)
    dense = latent_diagnostics(model, batches, cfg)
    monkeypatch.setattr(diagnostics, "MAX_BINCOUNT_BITS", limit)
    torch.manual_seed(3)
    sparse = latent_diagnostics(model, batches, cfg)
    assert sparse["eval/code_usage"] == dense["eval/code_usage"] > 1
    assert sparse["eval/code_perplexity"] == pytest.approx(dense["eval/code_perplexity"])


@pytest.mark.parametrize("limit", [3, 4])  # H = 4: one bit over the limit, at the limit
def test_code_entropy_is_reported_up_to_the_aggregate_limit(monkeypatch, limit):
    cfg, model = make()
    set_readout(model)  # uniform aggregate posterior over the 16 codes
    monkeypatch.setattr(diagnostics, "MAX_AGGREGATE_BITS", limit)
    m = latent_diagnostics(model, rows(1), cfg)
    if limit < 4:
        assert "eval/code_entropy_nats" not in m and "eval/code_perplexity" not in m
    else:
        assert m["eval/code_entropy_nats"] == pytest.approx(4 * LN2, rel=1e-9)


def test_many_bits_use_the_dictionary_path():
    """2^40 codes: counted in a dictionary, no table of 2^H entries (8 TiB) allocated."""
    cfg, model = make("model.latent_dim=40", "model.mapper=factored")
    set_readout(model)
    m = latent_diagnostics(model, rows(2, b=4, t=33), cfg)  # 256 tokens
    assert m["eval/code_usage"] == 256  # all distinct (a collision has probability 3e-8)
    assert "eval/code_perplexity" not in m  # 2^40 codes: not enumerated
    assert m["eval/active_bits"] == 0
    assert len([k for k in m if k.startswith("eval/kl_bit_")]) == 40


# ----------------------------------------------------------------------------- (e) baseline


def test_baseline_reports_plain_ce_and_verdict_baseline():
    cfg, model = make("model.latent_dim=0")
    batches = [torch.randint(0, 32, (3, 9)), torch.randint(0, 32, (5, 17))]
    m = latent_diagnostics(model, batches, cfg)
    assert set(m) == {"eval/ce_prior_nats", "eval/ppl_prior", "eval/kl_nats", "eval/kl_bits"}
    assert m["eval/kl_nats"] == 0.0 and m["eval/kl_bits"] == 0.0
    model.eval()
    with torch.no_grad():
        total = sum(next_token_ce(model(ids)[0], ids).item() for ids in batches)
    assert m["eval/ce_prior_nats"] == pytest.approx(total / (3 * 8 + 5 * 16))  # token-weighted
    assert m["eval/ppl_prior"] == pytest.approx(math.exp(m["eval/ce_prior_nats"]))
    assert verdict(m, cfg) == "baseline"


# ----------------------------------------------------------------------------- (c) verdict

CFG = load_config(overrides=TINY_MODEL)
KAPPA = CFG.training.free_bits_nats  # log(2) / 2
LEAK_KL = CFG.diagnostics.leak_kl_factor * KAPPA


def metrics(kl: float, gap: float) -> dict[str, float]:
    return {"eval/kl_nats": kl, "eval/ce_gap_nats": gap, "eval/ce_posterior_nats": 2.0}


@pytest.mark.parametrize(("kl", "gap", "expected"), [
    (0.0, 0.0, "collapsed"),
    (0.009, -0.009, "collapsed"),
    (0.01, 0.0, "used"),  # kl on the collapse threshold: not collapsed
    (0.0, 0.01, "used"),  # gap on the collapse threshold
    (0.0, -0.01, "used"),
    (0.3, 0.1, "used"),
    (LEAK_KL, 0.1, "used"),  # kl on the leak threshold: not leaking
    (math.nextafter(LEAK_KL, math.inf), 0.1, "leaking"),
    (5.0, 0.0, "leaking"),
    (0.3, 0.5, "used"),  # gap on the leak threshold
    (0.3, math.nextafter(0.5, math.inf), "leaking"),
    (0.005, 2.0, "leaking"),  # tiny KL but the posterior buys a large CE gain
    (0.3, -3.0, "used"),  # prior Z better than posterior Z is not a leak
])
def test_verdict_branches_and_boundaries(kl, gap, expected):
    assert verdict(metrics(kl, gap), CFG) == expected


def test_verdict_uses_the_free_bits_passed_in():
    m = metrics(1.0, 0.1)
    assert verdict(m, CFG) == "leaking"  # 1.0 > 2 * log(2) / 2
    assert verdict(m, CFG, free_bits_nats=1.0) == "used"  # scheduled kappa = 1 nat
    assert verdict(m, CFG.replace(["training.free_bits=0.6"])) == "used"
    # kappa = 0 is floored, so the KL threshold is tiny but positive
    assert verdict(metrics(0.02, 0.0), CFG, free_bits_nats=0.0) == "leaking"
    floor = CFG.diagnostics.leak_kl_factor * MIN_FREE_BITS_NATS
    with_floor = CFG.replace(["diagnostics.collapsed_kl_nats=0.0"])
    assert verdict(metrics(floor, 0.1), with_floor, free_bits_nats=0.0) == "used"


def test_verdict_uses_the_configured_thresholds():
    loose = CFG.replace(["diagnostics.collapsed_kl_nats=0.5", "diagnostics.collapsed_gap_nats=0.2"])
    assert verdict(metrics(0.3, 0.1), CFG) == "used"
    assert verdict(metrics(0.3, 0.1), loose) == "collapsed"
    strict = CFG.replace(["diagnostics.leak_gap_nats=0.05"])
    assert verdict(metrics(0.3, 0.1), strict) == "leaking"


def test_verdict_rejects_missing_or_non_finite_metrics():
    assert verdict({"eval/ce_prior_nats": 3.0, "eval/kl_nats": 0.0}, CFG) == "baseline"
    with pytest.raises(ValueError, match="eval/ce_gap_nats"):
        verdict({"eval/ce_posterior_nats": 1.0, "eval/kl_nats": 0.1}, CFG)
    with pytest.raises(ValueError, match="finite"):
        verdict(metrics(math.nan, 0.0), CFG)
    with pytest.raises(ValueError, match="finite"):
        verdict(metrics(0.1, math.inf), CFG)


def test_verdict_set_is_closed():
    seen = {verdict(metrics(kl, gap), CFG)
            for kl, gap in itertools.product([0.0, 0.3, 9.0], [-1.0, 0.0, 0.2, 1.0])}
    assert seen <= set(diagnostics.VERDICTS)


def test_exp_saturates_instead_of_overflowing():
    assert diagnostics._exp(1.0) == pytest.approx(math.e)
    assert diagnostics._exp(709.5) == math.exp(709.5)  # exact up to the float64 limit
    assert diagnostics._exp(709.8) == math.inf
    assert diagnostics._exp(math.inf) == math.inf
