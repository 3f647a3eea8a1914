"""Tests for freetf.evaluation.verdicts: the verdict rule, convergence, boundary fits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from freetf.evaluation import verdicts
from freetf.evaluation.verdicts import Outcome, Tolerances

pytestmark = pytest.mark.timeout(60)


# dyadic values: the edge cases are exact in binary
TOL = Tolerances(use_nats=0.002, leak_valid=0.125, broken_valid=0.2, leak_cost_nats=0.03125)
BASE = Outcome(1.0, valid_rate=0.95, valid_low=0.875, valid_high=0.97, converged=1.0)


def used(**kw) -> Outcome:
    values = dict(ce_prior_nats=1.0, use_low_nats=0.01, valid_rate=0.9, valid_low=0.86,
                  valid_high=0.93, converged=1.0)
    return Outcome(**{**values, **kw})


@pytest.mark.parametrize("trial, expected", [
    (used(), "used"),
    # the use interval must lie above the tolerance, whatever the MI, KL or gap
    (used(use_low_nats=0.002), "collapsed"),
    (used(use_low_nats=0.0021), "used"),
    (used(use_low_nats=-0.01, mutual_info_nats=0.3, ce_gap_nats=0.2), "collapsed"),
    (used(use_low_nats=math.nan), "collapsed"),  # not measured: no evidence of use
    # a single prior draw's CE far above the baseline is Jensen's gap, not a leak
    (used(ce_prior_nats=1.5), "used"),
    # broken free generation: leaking, used or not
    (used(valid_rate=0.19, valid_low=0.15, valid_high=0.24), "leaking"),
    (used(use_low_nats=0.0, valid_rate=0.19, valid_low=0.15, valid_high=0.24), "leaking"),
    (used(valid_rate=0.2, valid_low=0.15, valid_high=0.9), "used"),  # on the edge: not
    # the validity interval a stated amount below the baseline's
    (used(valid_rate=0.7, valid_low=0.65, valid_high=0.74), "leaking"),  # < 0.875 - 0.125
    (used(valid_rate=0.7, valid_low=0.65, valid_high=0.75), "used"),  # == 0.75: not
    # no validity (real data): the honest bound's interval above the baseline's CE
    (used(valid_rate=math.nan, ce_iw_low_nats=1.032), "leaking"),
    (used(valid_rate=math.nan, ce_iw_low_nats=1.03125), "used"),
    (used(valid_rate=math.nan), "used"),  # no bound measured either
    # no verdict from a run whose last evaluations still move
    (used(converged=0.0), "unconverged"),
    (used(converged=math.nan), "used"),  # not measured (older runs)
])
def test_classify(trial, expected):
    assert verdicts.classify(trial, BASE, TOL) == expected


def test_tolerances_come_from_the_config():
    from freetf import load_config

    d = load_config(overrides=["diagnostics.use_tol_nats=0.01",
                               "diagnostics.leak_valid_tol=0.2",
                               "diagnostics.broken_valid=0.3",
                               "diagnostics.leak_cost_tol_nats=0.05",
                               "diagnostics.floor_tol_nats=0.02"]).diagnostics
    assert Tolerances.from_config(d) == Tolerances(0.01, 0.2, 0.3, 0.05, 0.02)
    assert Tolerances.from_config(load_config().diagnostics) == Tolerances()


@pytest.mark.parametrize("baseline, expected", [
    (Outcome(1.0, converged=1.0, excess_nats=0.005, valid_rate=0.9), True),
    (Outcome(1.0, converged=0.0, excess_nats=0.005, valid_rate=0.9), False),  # moving
    (Outcome(1.0, converged=1.0, excess_nats=0.0101, valid_rate=0.9), False),  # off floor
    (Outcome(1.0, converged=1.0, excess_nats=0.01, valid_rate=0.8), True),  # on the edges
    (Outcome(1.0, converged=1.0, excess_nats=0.005, valid_rate=0.79), False),  # invalid
    (Outcome(1.0), True),  # real data: no floor, no validity, not measured
])
def test_baseline_converged(baseline, expected):
    assert verdicts.baseline_converged(baseline, TOL) is expected


def test_plateau_reads_the_last_evaluations_only():
    def ev(step, ce, kl=1.0, post=None):
        h = {"step": step, "eval/ce_prior_nats": ce, "eval/kl_bits": kl}
        if post is not None:
            h["eval/ce_posterior_nats"] = post
        return h
    train_only = {"step": 5, "train/loss": 3.0}
    history = [ev(100, 2.0), train_only, ev(200, 1.0), ev(300, 1.004), ev(400, 0.998)]
    got = verdicts.plateau(history, evals=3, ce_nats=0.01, kl_bits=0.1)
    assert got["eval/plateau_ce_nats"] == pytest.approx(0.006)
    assert got["eval/plateau_kl_bits"] == 0.0 and got["eval/converged"] == 1.0
    assert verdicts.plateau(history, 4, 0.01, 0.1)["eval/converged"] == 0.0  # 2.0 is in
    assert verdicts.plateau(history[:3], 3, 0.01, 0.1)["eval/converged"] == 0.0  # 2 evals
    moving_kl = [ev(1, 1.0, kl=1.0), ev(2, 1.0, kl=1.2), ev(3, 1.0, kl=1.15)]
    assert verdicts.plateau(moving_kl, 3, 0.01, 0.1)["eval/converged"] == 0.0
    assert verdicts.plateau(moving_kl, 3, 0.01, 0.2)["eval/converged"] == 1.0
    # a Free Transformer: the posterior CE, not the single-draw prior CE
    ft = [ev(1, 1.5, post=1.0), ev(2, 1.2, post=1.001), ev(3, 1.6, post=1.002)]
    assert verdicts.plateau(ft, 3, 0.01, 0.1)["eval/converged"] == 1.0
    empty = verdicts.plateau([train_only], 3, 0.01, 0.1)
    assert empty["eval/converged"] == 0.0 and math.isnan(empty["eval/plateau_ce_nats"])


def test_changes_baseline():
    assert not verdicts.changes_baseline("training.kl_weight")
    assert not verdicts.changes_baseline("training.kl_annealing.type")
    assert not verdicts.changes_baseline("training.free_bits_bits")
    assert verdicts.changes_baseline("training.learning_rate")
    assert verdicts.changes_baseline("model.hidden_dim")


def test_fit_finds_a_sharp_boundary_between_the_probes():
    x = [-6, -6, -4, -4, -2, -2, 0, 0]
    collapsed = [True, True, True, True, False, False, False, False]
    fit = verdicts.fit_boundary("collapse", x, collapsed, -6, 0, confidence=0.9)
    assert -4 < fit.median_log2 < -2
    assert -4.6 < fit.low_log2 < fit.median_log2 < fit.high_log2 < -1.4
    assert fit.trials == 8 and not fit.below_range and not fit.above_range
    # the same verdicts read as leaks put the leak onset on the other side
    leak = verdicts.fit_boundary("leak", x, [not c for c in collapsed], -6, 0, 0.9)
    assert leak.median_log2 == pytest.approx(fit.median_log2, abs=0.1)


def test_no_leak_seen_puts_the_leak_onset_above_the_range():
    fit = verdicts.fit_boundary("leak", [-6, -2, 2] * 3, [False] * 9, -6, 2, 0.95)
    assert fit.above_range and fit.median_log2 > 1.0
    assert fit.text().endswith("> 4] (95%, 9 trials)")


def _reference_log_lik(kind, x, y, groups, x0, slope, tau):
    """sum over seeds of log integral prod_i P(y_i | x_i; x0 + e, slope) N(e; 0, tau^2) de,
    by adaptive quadrature (scipy), written out from the model."""
    from scipy import integrate, stats

    sign = -1.0 if kind == "collapse" else 1.0

    def p_one(xi, e):
        p = verdicts.LAPSE + (1 - 2 * verdicts.LAPSE) / (
            1 + math.exp(-sign * slope * (xi - x0 - e)))
        return p
    total = 0.0
    for g in dict.fromkeys(groups):
        rows = [i for i, gi in enumerate(groups) if gi == g]

        def seed_lik(e, rows=rows):
            return math.prod(p_one(x[i], e) if y[i] else 1 - p_one(x[i], e) for i in rows)
        if tau == 0:
            total += math.log(seed_lik(0.0))
        else:
            value, _ = integrate.quad(lambda e: seed_lik(e) * stats.norm.pdf(e, 0, tau),
                                      -8 * tau, 8 * tau)
            total += math.log(value)
    return total


def test_a_seeds_offset_is_shared_by_its_verdicts_and_integrated_out():
    """The posterior's log ratio between grid points equals the model's, integrated by
    adaptive quadrature in the test; one seed's verdicts are not independent draws."""
    x = [-3.0, -2.0, -1.0, -3.0, -2.0, -1.0, -2.5]
    y = [False, True, True, False, False, True, True]
    groups = ["a", "a", "a", "b", "b", "b", "c"]
    x0s, post = verdicts.boundary_posterior("leak", x, y, -4, 0, groups)
    slopes = np.asarray(verdicts.SLOPES)
    points = [(int(np.argmin(abs(x0s - a))), s, t) for a, s, t in
              [(-2.0, 2, 3), (-1.5, 4, 2), (-2.5, 1, 1), (-1.0, 6, 0), (-2.0, 3, 3)]]
    ref = [_reference_log_lik("leak", x, y, groups, x0s[g], slopes[s], verdicts.SEED_SDS[t])
           for g, s, t in points]
    got = [math.log(post[g, s, t]) for g, s, t in points]
    for r, q in zip(ref[1:], got[1:], strict=True):
        assert q - got[0] == pytest.approx(r - ref[0], abs=0.02)
    # the same verdicts, each read as its own seed, weigh the grid otherwise
    _, alone = verdicts.boundary_posterior("leak", x, y, -4, 0, None)
    g, s, t = points[0]
    assert not math.isclose(alone[g, s, t], post[g, s, t], rel_tol=0.05)
    _, alone_named = verdicts.boundary_posterior("leak", x, y, -4, 0, list(range(len(x))))
    assert np.allclose(alone, alone_named)
    with pytest.raises(ValueError, match="groups"):
        verdicts.boundary_posterior("leak", x, y, -4, 0, groups[:-1])


def test_a_seed_that_leaks_at_every_probe_reads_as_a_seed_offset():
    """One seed leaks at every kappa probed, two at none: the posterior moves its weight
    to a wide spread of the seeds' onsets (tau = 1), where independent draws would need a
    curve that is flat over the probes."""
    x = [-1.0, 0.0, 1.0] * 3
    y = [True, True, True] + [False] * 6
    _, post = verdicts.boundary_posterior("leak", x, y, -6, 2, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    tau = post.sum((0, 1))
    assert verdicts.SEED_SDS[-1] == 1.0 and tau[-1] > 2 * tau[0], tau
    _, mixed = verdicts.boundary_posterior("leak", x, y, -6, 2, [0, 1, 2] * 3)
    assert mixed.sum((0, 1))[-1] < tau[-1]  # the same verdicts spread over the seeds


def test_probe_information_peaks_between_disagreeing_verdicts():
    x = [-6, -6, 2, 2]
    y = [True, True, False, False]
    candidates = np.arange(-6, 2.01, 0.5)
    gain = verdicts.probe_information("collapse", candidates, x, y, -6, 2)
    best = candidates[int(np.argmax(gain))]
    assert -4 <= best <= 0  # inside the bracket, not at a probed end
    assert gain[0] < gain.max() / 2 and gain[-1] < gain.max() / 2


@pytest.mark.parametrize("pos, noise, valid, expected", [
    (0.0, 0.0, 0.9, "nothing"),
    (0.06, 0.0, 0.9, "position"),
    (0.05, 0.0, 0.9, "nothing"),  # on the tolerance: not above it
    (0.0, 0.3, 0.9, "noise"),
    (0.5, 0.3, 0.9, "position+noise"),
    (0.5, 0.3, 0.19, "broken"),
    (math.nan, math.nan, 0.9, ""),  # not the synthetic task
])
def test_regime(pos, noise, valid, expected):
    trial = Outcome(1.0, valid_rate=valid, use_position_low_nats=pos, use_noise_low_nats=noise)
    assert verdicts.regime(trial, Tolerances(regime_nats=0.05)) == expected


def test_from_metrics_reads_each_key_into_its_own_field():
    keys = ["ce_prior_nats", "ce_gap_nats", "mutual_info_nats", "valid_rate", "use_low_nats",
            "ce_iw_low_nats", "valid_low", "valid_high", "excess_nats", "converged",
            "use_position_low_nats", "use_noise_low_nats"]
    metrics = {f"eval/{k}": float(i + 1) for i, k in enumerate(keys)}
    assert Outcome.from_metrics(metrics) == Outcome(**{k: float(i + 1)
                                                       for i, k in enumerate(keys)})
    assert math.isnan(Outcome.from_metrics({"eval/ce_prior_nats": 1.0}).ce_iw_low_nats)


def test_the_regime_tolerance_comes_from_the_config():
    from freetf import load_config

    d = load_config(overrides=["diagnostics.regime_tol_nats=0.25"]).diagnostics
    assert Tolerances.from_config(d).regime_nats == 0.25


@pytest.mark.parametrize("pos, noise, valid, expected", [
    (0.0, 0.0, 0.2, "nothing"),  # validity on broken_valid: not broken
    (0.0, 0.05, 0.9, "nothing"),  # noise use on the tolerance: not above it
    (0.06, math.nan, 0.9, "position"),  # one class measured
    (math.nan, 0.06, 0.9, "noise"),
])
def test_regime_edges_and_one_class_measured(pos, noise, valid, expected):
    trial = Outcome(1.0, valid_rate=valid, use_position_low_nats=pos, use_noise_low_nats=noise)
    assert verdicts.regime(trial, Tolerances(regime_nats=0.05, broken_valid=0.2)) == expected


def test_plateau_spreads_on_their_tolerances_converge_and_a_baseline_has_no_kl():
    history = [{"eval/ce_prior_nats": ce, "eval/kl_bits": kl}
               for ce, kl in [(1.0, 2.0), (1.5, 2.25), (1.25, 2.0)]]
    got = verdicts.plateau(history, 3, ce_nats=0.5, kl_bits=0.25)
    assert got == {"eval/plateau_ce_nats": 0.5, "eval/plateau_kl_bits": 0.25,
                   "eval/converged": 1.0}
    baseline = [{"eval/ce_prior_nats": ce} for ce in (1.0, 1.25, 1.0)]
    got = verdicts.plateau(baseline, 3, ce_nats=0.25, kl_bits=0.0)
    assert got == {"eval/plateau_ce_nats": 0.25, "eval/plateau_kl_bits": 0.0,
                   "eval/converged": 1.0}


def test_run_plateau_takes_the_larger_kl_tolerance_of_bits_and_fraction_of_kappa():
    from types import SimpleNamespace

    d = SimpleNamespace(converge_evals=2, converge_ce_nats=0.25, converge_kl_bits=0.5,
                        converge_kl_frac=0.25)
    history = [{"eval/ce_prior_nats": 1.0, "eval/kl_bits": kl} for kl in (3.0, 2.0, 3.0)]
    # KL spread 1 bit: within 0.25 * 4 bits of kappa, not within 0.5 bit (kappa 1)
    assert verdicts.run_plateau(history, d, kappa_bits=4.0)["eval/converged"] == 1.0
    assert verdicts.run_plateau(history, d, kappa_bits=1.0)["eval/converged"] == 0.0
    assert verdicts.run_plateau(history, d, kappa_bits=2.0)["eval/converged"] == 0.0
    d.converge_kl_bits = 1.0
    assert verdicts.run_plateau(history, d, kappa_bits=1.0)["eval/converged"] == 1.0
    # the CE's tolerance and the number of evaluations are the config's
    moving = [*history, {"eval/ce_prior_nats": 1.5, "eval/kl_bits": 3.0}]
    assert verdicts.run_plateau(moving, d, kappa_bits=4.0)["eval/converged"] == 0.0
    d.converge_ce_nats = 0.5
    assert verdicts.run_plateau(moving, d, kappa_bits=4.0) == {
        "eval/plateau_ce_nats": 0.5, "eval/plateau_kl_bits": 0.0, "eval/converged": 1.0}
    d.converge_evals = 5
    assert verdicts.run_plateau(moving, d, kappa_bits=4.0)["eval/converged"] == 0.0


@pytest.mark.parametrize("key, value", [
    ("training.free_bits_per", "sequence"), ("model.mapper", "factored"),
    ("model.mapper_impl", "dense"), ("model.mapper_chunk_size", 7),
    ("model.mapper_score_precision", "autocast"), ("model.post_sampler_init", "zero"),
    ("model.post_sampler_init_std", 0.5), ("model.readout_init_std", 0.3),
    ("model.injection_layer", 1), ("optimizer.post_sampler_lr_mult", 10.0),
    ("model.init_std", 0.05)])  # the control: it changes a baseline
def test_a_latent_only_key_leaves_a_model_without_latent_as_it_is(key, value):
    """A baseline (latent_dim = 0) built and optimised with the key changed: the same
    weights, optimizer groups and logits, exactly when the key is latent-only."""
    import torch

    from freetf.config import load_config
    from freetf.model.transformer import FreeTransformer
    from freetf.training.optim import build_optimizer

    def build(changes):
        cfg = load_config("tiny", [f"{k}={v}" for k, v in {"model.latent_dim": 0,
                                                          **changes}.items()])
        torch.manual_seed(0)
        model = FreeTransformer(cfg.model)
        groups = [(g["lr"], g["weight_decay"], [tuple(p.shape) for p in g["params"]])
                  for g in build_optimizer(model, cfg, torch.device("cpu")).param_groups]
        tokens = torch.arange(24).reshape(2, 12) % cfg.model.vocab_size
        with torch.no_grad():
            return model.state_dict(), groups, model(tokens)[0]

    weights, groups, logits = build({})
    other_weights, other_groups, other_logits = build({key: value})
    same = (groups == other_groups and torch.equal(logits, other_logits)
            and all(torch.equal(weights[k], other_weights[k]) for k in weights))
    assert same is not verdicts.changes_baseline(key)
