"""freetf.evaluation.latent_use: shuffle gain, importance-weighted honest bound, intervals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from freetf.evaluation.latent_use import latent_use, row_interval, token_nll, wilson_interval

pytestmark = pytest.mark.timeout(60)

V = 3  # vocabulary of the fake model


class CodeReader(nn.Module):
    """A decoder whose next-token distribution reads Z: when the code at a position equals
    the row's own code (its first token), the true next token gets logit ``sharp``, else
    every token is equally likely.  The posterior code of a row is its first token."""

    def __init__(self, sharp: float = 3.0, latent_dim: int = 2):
        super().__init__()
        self.config = SimpleNamespace(has_latent=True, latent_dim=latent_dim)
        self.sharp = sharp
        self.w = nn.Parameter(torch.zeros(1))

    def forward_codes(self, ids, sample="posterior", bit_noise=None):
        codes = ids[:, :1].expand_as(ids)
        return self._logits(ids, codes), None, codes

    def forward(self, ids, mode="training", z=None):
        return self._logits(ids, torch.as_tensor(z).expand_as(ids)), None

    def _logits(self, ids, codes):
        b, t = ids.shape
        logits = torch.zeros(b, t, V)
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)  # the token each position predicts
        hit = (codes == ids[:, :1]).float() * self.sharp  # (B, T)
        return logits.scatter(2, nxt[..., None], hit[..., None])


def nll(hit: bool, sharp: float) -> float:
    return -math.log(math.exp(sharp) / (math.exp(sharp) + V - 1)) if hit else math.log(V)


def test_use_is_the_ce_saved_by_the_rows_own_code_against_a_reference():
    sharp = 3.0
    ids = torch.tensor([[0, 1, 2, 0], [1, 2, 0, 1], [1, 0, 0, 2], [2, 2, 1, 0]])
    m = latent_use(CodeReader(sharp), [ids], redraws=2, prior_draws=3, boot=200)
    # rolled by one row: row r gets row r-1's code; rows 1 and 2 share code 1
    own = nll(True, sharp)
    others = [nll(c_prev == c, sharp) for c, c_prev in zip([0, 1, 1, 2], [2, 0, 1, 1],
                                                             strict=True)]
    expected = float(np.mean([o - own for o in others]))
    assert m["eval/use_nats"] == pytest.approx(expected, abs=1e-6)  # fp32 CE
    assert m["eval/use_rows"] == 4
    assert m["eval/use_low_nats"] <= m["eval/use_nats"] <= m["eval/use_high_nats"]


def test_the_iw_bound_is_exact_for_a_decoder_that_ignores_z_and_below_one_draw_otherwise():
    torch.manual_seed(0)
    ids = torch.randint(0, 2, (6, 5))
    blind = latent_use(CodeReader(0.0), [ids], redraws=1, prior_draws=4, boot=100)
    assert blind["eval/use_nats"] == pytest.approx(0.0, abs=1e-12)
    assert blind["eval/ce_iw_nats"] == pytest.approx(math.log(V), abs=1e-6)
    # latent_dim 1: each position's prior code hits the row's code with probability 1/2
    # (rows hold codes 0 and 1); many draws approach -log E p(x | z) < E -log p(x | z)
    sharp = 4.0
    many = latent_use(CodeReader(sharp, latent_dim=1), [ids], redraws=1, prior_draws=256,
                      boot=100)
    per_token = 0.5 * math.exp(-nll(True, sharp)) + 0.5 / V  # E p(x_t | z_t), independent
    assert many["eval/ce_iw_nats"] == pytest.approx(-math.log(per_token), abs=0.08)
    one_draw = 0.5 * nll(True, sharp) + 0.5 * math.log(V)  # E -log p(x | z) per token
    assert many["eval/ce_iw_nats"] < one_draw - 0.1


def test_use_split_by_token_class():
    sharp = 2.0
    ids = torch.tensor([[0, 1, 2, 0], [1, 2, 0, 1], [2, 0, 1, 2]])

    def classes(rows):  # class 1: the last scored token, class 0 the rest
        out = np.zeros((rows.shape[0], rows.shape[1] - 1), np.int8)
        out[:, -1] = 1
        return out
    m = latent_use(CodeReader(sharp), [ids], redraws=1, prior_draws=1, boot=100,
                   token_classes=classes, class_names=("rest", "last"))
    gap = math.log(V) - nll(True, sharp)  # every row's neighbour holds another code
    assert m["eval/use_rest_nats"] == pytest.approx(gap, abs=1e-6)
    assert m["eval/use_last_nats"] == pytest.approx(gap, abs=1e-6)


def test_latent_use_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="latent"):
        latent_use(SimpleNamespace(config=SimpleNamespace(has_latent=False)), [])
    with pytest.raises(ValueError, match=">= 2 rows"):
        latent_use(CodeReader(), [torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="no batches"):
        latent_use(CodeReader(), [])


def test_token_nll_against_cross_entropy_by_hand():
    logits = torch.randn(2, 4, 5)
    ids = torch.randint(0, 5, (2, 4))
    got = token_nll(logits, ids)
    want = -torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None])[..., 0]
    assert got.shape == (2, 3) and torch.allclose(got, want.double(), atol=1e-6)


def test_row_interval_ratio_and_coverage():
    est, low, high = row_interval(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 2.0]))
    assert est == pytest.approx(1.5) and low <= est <= high
    assert all(math.isnan(v) for v in row_interval(np.zeros(3), np.zeros(3)))
    # coverage of a 95% interval of a mean over 200 repetitions: 0.90-0.99 (binomial 3 sd)
    rng = np.random.default_rng(1)
    hits = 0
    for rep in range(200):
        x = rng.exponential(1.0, size=300)
        _, lo, hi = row_interval(x, boot=400, seed=rep)
        hits += lo <= 1.0 <= hi
    assert 0.90 <= hits / 200 <= 0.99


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(256, 256)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.9852, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def _bootstrap(values, weights, boot, confidence, seed):
    """The percentile row bootstrap written out: ``boot`` resamples of the N rows with
    replacement, each a ratio sum(values) / sum(weights) (resamples without weight
    skipped), and the equal-tailed ``confidence`` quantiles of those ratios."""
    rng = np.random.default_rng(seed)
    n = len(values)
    ratios = []
    for rows in rng.integers(0, n, size=(boot, n)):
        if weights[rows].sum() > 0:
            ratios.append(values[rows].sum() / weights[rows].sum())
    tail = (1 - confidence) / 2
    return np.quantile(ratios, tail), np.quantile(ratios, 1 - tail)


def test_row_interval_is_the_percentile_row_bootstrap_at_its_defaults_and_arguments():
    values = np.random.default_rng(5).normal(size=40)  # ratios of resamples all distinct
    got = row_interval(values)  # weights 1, 1000 resamples, 95%, seed 0
    assert got == (pytest.approx(values.mean()),
                   *(pytest.approx(q, rel=1e-9) for q in _bootstrap(values, np.ones(40), 1000,
                                                                    0.95, 0)))
    assert row_interval([2.0], [1.0]) == (2.0, 2.0, 2.0)  # a total weight of 1 is a weight
    # weights 0 in most rows: many resamples hold no weight and are left out
    values, weights = np.array([0.0, 0.0, 0.0, 3.0, 1.0]), np.array([0, 0, 0, 2, 1])
    got = row_interval(list(values), list(weights), boot=300, confidence=0.6, seed=4)
    assert got == (pytest.approx(4 / 3),
                   *(pytest.approx(q, rel=1e-9) for q in _bootstrap(values, weights, 300, 0.6,
                                                                    4)))
    assert got[1] < got[2]


def test_use_intervals_are_the_row_bootstrap_of_the_per_row_values():
    sharp = 3.0
    ids = torch.tensor([[0, 1, 2, 0], [1, 2, 0, 1], [1, 0, 0, 2], [2, 2, 1, 0]])
    own = nll(True, sharp)
    per_row = np.array([3 * (nll(c_prev == c, sharp) - own) for c, c_prev in
                        zip([0, 1, 1, 2], [2, 0, 1, 1], strict=True)])  # 3 scored tokens
    for kwargs, (boot, confidence, seed) in (({}, (1000, 0.95, 0)),
                                             ({"boot": 50, "confidence": 0.5, "seed": 3},
                                              (50, 0.5, 3))):
        m = latent_use(CodeReader(sharp), [ids], redraws=1, prior_draws=1, **kwargs)
        est, low, high = row_interval(per_row, np.full(4, 3.0), boot, confidence, seed)
        assert (m["eval/use_nats"], m["eval/use_low_nats"], m["eval/use_high_nats"]) == \
            (pytest.approx(est, abs=1e-6), pytest.approx(low, abs=1e-6),
             pytest.approx(high, abs=1e-6))
        assert low < high


def test_wilson_interval_at_another_confidence():
    # 3 of 10 at 90% (z = 1.6449): Wilson's centre and half-width written out
    z = 1.6448536269514722
    centre = (0.3 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.3 * 0.7 / 10 + z * z / 400) / (1 + z * z / 10)
    assert wilson_interval(3, 10, confidence=0.9) == (pytest.approx(centre - half, abs=1e-12),
                                                      pytest.approx(centre + half, abs=1e-12))


def test_wilson_interval_of_one_trial():
    z2 = 1.959963984540054 ** 2  # one success in one trial: [1 / (1 + z^2), 1]
    assert wilson_interval(1, 1) == (pytest.approx(1 / (1 + z2), abs=1e-12),
                                     pytest.approx(1.0, abs=1e-12))
