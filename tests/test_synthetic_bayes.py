"""The Bayes floor of the synthetic task: chain rule, brute force, closed form vs Monte Carlo."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest

from freetf.data.datasets import CharTokenizer, synthetic_sequences
from freetf.evaluation.synthetic_bayes import (
    CLASS_LETTER,
    CLASS_NAMES,
    CLASS_NOISE,
    CLASS_OTHER,
    CLASS_POSITION,
    _all_hidden_log_count,
    bayes_floor_nats,
    bayes_token_nll,
    expected_floor_nats,
    row_nll,
    token_classes,
)

pytestmark = pytest.mark.timeout(60)
P = 1.0 / 16.0
TOK = CharTokenizer()
BODY = "_" * 64


def put(text: str, at: int) -> str:
    return BODY[:at] + text + BODY[at + len(text):]


def encode(*texts: str) -> np.ndarray:
    return np.array([TOK.encode(t) for t in texts], dtype=np.int64)


def hb(p: float) -> float:
    return -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)


def generate(n: int, p: float, seed: int, hide_target: bool = False):
    """The task's generator at noise ``p``; also returns the starts and the noise masks."""
    rng = np.random.default_rng(seed)
    letters = rng.integers(3, 29, size=n)
    starts = rng.integers(0, 57, size=n)
    pos = np.arange(64)
    window = (pos >= starts[:, None]) & (pos < starts[:, None] + 8)
    body = np.where(window, letters[:, None], 0)
    noise = rng.random((n, 64)) < p
    if hide_target:
        noise |= window
    body[noise] = 1
    rows = np.concatenate([letters[:, None], np.full((n, 1), 2), body], axis=1)
    return rows, starts, noise


def brute_token_nll(row: np.ndarray, p: float) -> np.ndarray:
    """-log P(x_t | x_<t) as ratios of prefix probabilities, enumerating s and each noise bit."""
    letter, body = int(row[0]), [int(x) for x in row[2:]]
    per_s = [1.0] * 57  # P(x_<j | s)
    out = [0.0 if row[1] == 2 else math.inf]
    for j, x in enumerate(body):
        before = sum(per_s) / 57
        for s in range(57):
            under = letter if s <= j < s + 8 else 0
            per_s[s] *= sum(pb * (x == (1 if bit else under))
                            for bit, pb in ((1, p), (0, 1 - p)))
        after = sum(per_s) / 57
        out.append(-math.log(after / before) if after > 0 else math.inf)
    return np.array(out)


def test_chain_rule_row_nll_equals_sum_of_token_nll():
    rows = synthetic_sequences(300, seed=5)
    np.testing.assert_allclose(row_nll(rows), bayes_token_nll(rows).sum(1), rtol=0, atol=1e-9)
    rows, _, _ = generate(300, 0.3, seed=1)
    np.testing.assert_allclose(row_nll(rows, 0.3), bayes_token_nll(rows, 0.3).sum(1),
                               rtol=0, atol=1e-9)


def test_token_nll_matches_brute_force():
    hand = encode("K>" + put("!!KKKK!K!!", 20), "K>" + put("!KKKKKK!", 0),
                  "K>" + put("KKKKKK!!!", 55), "K>" + put("!!!!!!!!!!", 30))
    for rows, p in ((synthetic_sequences(4, seed=2), P), (generate(4, 0.3, seed=3)[0], 0.3),
                    (hand, P), (hand, 0.3)):
        got = bayes_token_nll(rows, p)
        for row, nll in zip(rows, got, strict=True):
            np.testing.assert_allclose(nll, brute_token_nll(row, p), rtol=0, atol=1e-9)


def test_noise_free_rows_cost_log_57():
    rows = encode(*("Q>" + put("Q" * 8, s) for s in range(57)))
    np.testing.assert_allclose(row_nll(rows, 0.0), math.log(57), rtol=0, atol=1e-12)
    np.testing.assert_allclose(bayes_token_nll(rows, 0.0).sum(1), math.log(57), atol=1e-12)
    assert bayes_floor_nats(rows, 0.0) == pytest.approx(math.log(57) / 65, abs=1e-12)
    assert expected_floor_nats(0.0) == pytest.approx(math.log(57) / 65, abs=1e-15)


def consistent_count(start: int, noise: np.ndarray) -> int:
    """|C| from the derivation: shifts limited by hidden ends (i, k) and noise runs (L, R)."""
    tgt = noise[start:start + 8]
    if tgt.all():  # every all-"!" 8-window of the body
        return sum(bool(noise[a:a + 8].all()) for a in range(57))
    i, k = int(np.argmin(tgt)), int(np.argmin(tgt[::-1]))
    left = next((m for m in range(start) if not noise[start - 1 - m]), start)
    right = next((m for m in range(56 - start) if not noise[start + 8 + m]), 56 - start)
    return 1 + min(k, left) + min(i, right)


@pytest.mark.parametrize("p, hide", [(0.3, False), (0.5, True)])
def test_consistent_set_size_formula_against_row_likelihood(p, hide):
    rows, starts, noise = generate(400, p, seed=4, hide_target=hide)
    n = noise.sum(1)
    log_c = -(row_nll(rows, p) + n * math.log(p) + (64 - n) * math.log1p(-p) - math.log(57))
    sizes = [consistent_count(int(s), m) for s, m in zip(starts, noise, strict=True)]
    np.testing.assert_allclose(log_c, np.log(sizes), rtol=0, atol=1e-9)
    assert max(sizes) > 2


def mc_estimates(rows: np.ndarray, p: float):
    """(plain, control-variate) Monte Carlo estimates of the floor, each with its SE."""
    sums = bayes_token_nll(rows, p).sum(1)  # (N,)
    n = (rows[:, 2:] == 1).sum(1)
    # The noise term -n log p - (64 - n) log(1 - p) has known mean 64 H_b(p); removing it
    # leaves log 57 - log|C| per row, whose spread is far smaller.
    cv = sums + n * math.log(p) + (64 - n) * math.log1p(-p) + 64 * hb(p)
    return [(x.mean() / 65, x.std(ddof=1) / 65 / math.sqrt(len(x))) for x in (sums, cv)]


def test_expected_floor_matches_monte_carlo_at_task_noise():
    exact = expected_floor_nats()
    blind_to_runs = (math.log(57) + 64 * hb(P)) / 65  # |C| = 1 always
    (plain, se), (cv, cv_se) = mc_estimates(synthetic_sequences(20000, seed=11), P)
    assert abs(plain - exact) < 4 * se
    assert abs(cv - exact) < 4 * cv_se
    # The plain estimate cannot tell (se ~ 7x the gap); the control-variate one can.
    assert cv_se < (blind_to_runs - exact) / 4


@pytest.mark.parametrize("p", [0.3, 0.5, 0.8])
def test_expected_floor_matches_monte_carlo_at_high_noise(p):
    exact = expected_floor_nats(p)
    blind_to_runs = (math.log(57) + 64 * hb(p)) / 65
    (plain, se), (cv, cv_se) = mc_estimates(generate(20000, p, seed=12)[0], p)
    assert abs(plain - exact) < 4 * se and abs(cv - exact) < 4 * cv_se
    assert cv_se < (blind_to_runs - exact) / 4


def test_floor_beats_a_position_blind_predictor():
    rows = synthetic_sequences(2000, seed=7)
    body, letter = rows[:, 2:], rows[:, :1]
    prob = np.where(body == 1, P, np.where(body == letter, (1 - P) / 8, (1 - P) * 7 / 8))
    blind = -np.log(prob).sum() / rows.shape[0] / 65
    floor = bayes_floor_nats(rows)
    assert floor < blind - 0.01
    assert floor == pytest.approx(expected_floor_nats(), abs=0.01)


def test_token_classes_on_hand_written_rows():
    o, q, n, a = CLASS_OTHER, CLASS_POSITION, CLASS_NOISE, CLASS_LETTER
    assert CLASS_NAMES[q] == "position" and len(CLASS_NAMES) == 4
    rows = encode("K>" + put("!KKKKKKK", 5),  # noise on the first target letter
                  "K>" + put("KKKKKKKK", 0),  # starts at body 0: no "_" before it
                  "K>" + put("!KKKKKKKK", 4),  # "!" just before the target
                  "K>" + put("KKKKKKKK", 5)[:30] + "!" + BODY[31:],  # plain + one noise
                  "K>" + put("!!!!!!!!", 20))  # every target letter hidden: no position
    blank = [o] * 64

    def body(at: int, classes: list[int]) -> list[int]:
        return [o] + blank[:at] + classes + blank[at + len(classes):]

    expected = [body(5, [n, q] + [a] * 6),
                body(0, [q] + [a] * 7),
                body(4, [n, q] + [a] * 7),
                body(4, [q, q] + [a] * 7),
                body(20, [n] * 8)]
    expected[3][1 + 30] = n
    got = token_classes(rows)
    assert got.dtype == np.int8 and got.shape == (5, 65)
    np.testing.assert_array_equal(got, np.array(expected))


def test_invalid_input_is_refused_with_its_reason():
    rows = synthetic_sequences(3, seed=0)

    def refused(message: str, call, *args, **kwargs) -> None:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            call(*args, **kwargs)

    shape = "rows must be a 2-D array of shape (N, 66), got shape "
    for bad in (rows[0], rows[:, :65], rows[None]):
        refused(shape + str(bad.shape), bayes_token_nll, bad)
    refused(shape + "(3, 65)", token_classes, rows[:, 1:])
    refused(shape + "(3, 65)", row_nll, rows[:, 1:])
    refused("rows must hold integer token ids, got dtype float64", bayes_token_nll,
            rows.astype(float))
    letter = "every row must start with a letter A-Z (the prompt)"
    for first in (0, 2, 29):  # "_", ">", one past "Z"
        bad = rows.copy()
        bad[1, 0] = first
        for call in (bayes_token_nll, row_nll, token_classes):
            refused(letter, call, bad)
    edge = rows.copy()
    edge[:, 0] = [3, 28, 3]  # "A" and "Z" are letters
    assert token_classes(edge).shape == (3, 65)
    for p in (1.0, -0.5, 1.5):
        for call in (bayes_token_nll, row_nll):
            refused(f"noise_prob must be in [0, 1), got {p}", call, rows, p)
        refused(f"noise_prob must be in [0, 1), got {p}", expected_floor_nats, p)


def test_impossible_tokens_cost_infinity_without_a_warning():
    odd = encode("K>" + put("KKKAKKKK", 5), "K>" + put("KKKKKKKK", 5)[:40] + "K" + BODY[41:],
                 "K_" + put("KKKKKKKK", 5))  # a wrong letter; a letter outside; no ">"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # log(0) is +inf, not a RuntimeWarning
        nll = bayes_token_nll(odd)
        assert np.isinf(nll[0, 1 + 8]) and np.isfinite(np.delete(nll[0], 1 + 8)).all()
        assert np.isinf(nll[1, 1 + 40])
        assert np.isinf(nll[2, 0]) and np.isfinite(nll[2, 1:]).all()
        assert (row_nll(odd) == np.inf).all()
        # Without noise a "!" is impossible: +inf at its position and for its row.
        noisy = encode("K>" + put("KK!KKKKK", 5), "K>" + put("KKKKKKKK", 5))
        nll = bayes_token_nll(noisy, 0.0)
        assert np.isinf(nll[0, 1 + 7]) and np.isfinite(np.delete(nll, 1 + 7, axis=1)).all()
        np.testing.assert_array_equal(row_nll(noisy, 0.0), [np.inf, math.log(57)])


def test_row_nll_is_the_same_in_any_chunks():
    rows, _, _ = generate(5, 0.3, seed=6)
    whole = bayes_token_nll(rows, 0.3).sum(1)
    for chunk in (1, 2, 4, 1024):
        np.testing.assert_allclose(row_nll(rows, 0.3, chunk=chunk), whole, rtol=0, atol=1e-9)


@pytest.mark.parametrize("start, p", [(0, 0.5), (30, 0.5), (56, 0.5), (0, 0.8), (20, 0.8)])
def test_all_hidden_log_count_matches_sampled_bodies(start, p):
    """E[log |C|] given the 8 target chars hidden: |C| counts the all-"!" 8-windows."""
    noise = np.random.default_rng(start).random((20000, 64)) < p
    noise[:, start:start + 8] = True
    windows = np.lib.stride_tricks.sliding_window_view(noise, 8, axis=1).all(-1).sum(1)
    log_c = np.log(windows)  # (N,), every count >= 1
    se = log_c.std(ddof=1) / math.sqrt(len(log_c))
    assert abs(_all_hidden_log_count(start, p) - log_c.mean()) < 4 * se
    assert _all_hidden_log_count(start, 0.0) == 0.0


def expected_floor_reference(p: float) -> float:
    """(log 57 + 64 H_b(p) - E log|C|) / 65, E log|C| summed over the start, the 2^8 noise
    masks of the target and the runs of "!" beside it, |C| = 1 + min(k, L) + min(i, R)."""
    masks = np.array([[(m >> b) & 1 for b in range(8)] for m in range(256)], dtype=bool)
    e_log_c = 0.0
    for s in range(57):
        run_left = np.array([p ** m * (1 - p) for m in range(s)] + [p ** s])  # P(L = m)
        run_right = np.array([p ** m * (1 - p) for m in range(56 - s)] + [p ** (56 - s)])
        for mask in masks:
            prob = p ** mask.sum() * (1 - p) ** (8 - mask.sum())
            if mask.all():
                e_log_c += prob * _all_hidden_log_count(s, p)
                continue
            i, k = int(np.argmin(mask)), int(np.argmin(mask[::-1]))
            left = np.minimum(k, np.arange(s + 1))[:, None]  # (L + 1, 1)
            right = np.minimum(i, np.arange(57 - s))[None, :]  # (1, R + 1)
            e_log_c += prob * (np.outer(run_left, run_right) * np.log1p(left + right)).sum()
    return (math.log(57) + 64 * hb(p) - e_log_c / 57) / 65


@pytest.mark.parametrize("p", [P, 0.3, 0.5, 0.95])
def test_expected_floor_equals_the_sum_over_starts_masks_and_runs(p):
    assert expected_floor_nats(p) == pytest.approx(expected_floor_reference(p), rel=0,
                                                   abs=1e-12)
