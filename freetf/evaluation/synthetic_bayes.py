"""The Bayes-optimal floor of the per-token cross-entropy on the synthetic task (§4.1).

All values are in nats.  A row is 66 CharTokenizer ids ``[letter, ">", body_0..body_63]``
(``synthetic_sequences``); the scored tokens are ``t = 1..65`` (next-token setup:
``logits[:, :-1]`` against ``ids[:, 1:]``), ``t = 1`` is ">" and ``t >= 2`` is body
position ``j = t - 2``.  The prompt letter is given, never scored.

Generator: start ``s`` uniform on ``{0..56}`` (57 starts); the body is the letter on
``[s, s+8)`` and "_" elsewhere; each body char is independently replaced by "!" with
probability ``p``.  So ``P(x_j | s) = p`` if ``x_j`` is "!", ``1 - p`` if ``x_j`` is the
char under it (the letter inside the window, "_" outside), else 0.

Sequential posterior.  Given a prefix, ``P(s | x_<j)`` is proportional to the product of
those terms; "!" contributes ``p`` for every ``s``, a visible char ``(1 - p)`` or 0, so the
posterior is uniform on the starts consistent with every visible char so far (a boolean
mask, shape (N, 57)).  With ``f`` the fraction of those starts whose window covers ``j``:
``P("!") = p``, ``P(letter) = (1 - p) f``, ``P("_") = (1 - p)(1 - f)``, anything else 0
(nll ``+inf``; such a token leaves the mask as it was, so later tokens stay defined).

Chain rule.  ``sum_t -log P(x_t | x_<t) = -log P(x_1..x_65 | letter)
= -log((1/57) sum_s prod_j P(x_j | s))`` (:func:`row_nll`, computed directly).

Entropy.  The row is a function of ``(S, noise mask)`` and the noise mask is read off the
row ("!"), so ``H(X | letter) = log 57 + 64 H_b(p) - H(S | X)`` and, the posterior given the
whole row being uniform on the consistent set ``C(X)``, ``H(S | X) = E log|C(X)|``.  The
expected floor per scored token is ``H(X | letter) / 65`` (">" costs 0).

``|C|``.  With ``i`` (``k``) the number of leading (trailing) target letters hidden by noise
and ``L`` (``R``) the run of "!" just before ``s`` (after ``s + 7``), truncated at the body's
ends (so ``L <= s``, ``R <= 56 - s``): when a target letter is visible, a window shifted left
by ``m`` must still cover the last visible letter (``m <= k``) and lie on hidden chars
(``m <= L``), likewise to the right, so ``|C| = 1 + min(k, L) + min(i, R)``.  When all 8 are
hidden (probability ``p^8``) ``C`` is every 8-window of the body that is all "!": the
``L + R + 1`` windows in the run around ``s`` plus those in any other run of >= 8 "!"
(order ``p^16``), counted exactly by a dynamic programme over the body.
"""

from __future__ import annotations

import math

import numpy as np

from freetf.data.datasets import (
    SYNTHETIC_ALPHABET,
    SYNTHETIC_BODY_LEN,
    SYNTHETIC_NOISE_PROB,
    SYNTHETIC_SEQ_LEN,
    SYNTHETIC_TARGET_LEN,
)

BLANK, NOISE, ARROW = (SYNTHETIC_ALPHABET.index(c) for c in "_!>")
FIRST_LETTER = SYNTHETIC_ALPHABET.index("A")
NUM_STARTS = SYNTHETIC_BODY_LEN - SYNTHETIC_TARGET_LEN + 1  # 57
NUM_SCORED = SYNTHETIC_SEQ_LEN - 1  # 65

CLASS_OTHER, CLASS_POSITION, CLASS_NOISE, CLASS_LETTER = 0, 1, 2, 3
CLASS_NAMES = ("other", "position", "noise", "letter")

_STARTS = np.arange(NUM_STARTS)  # (57,)
# _COVER[j, s]: the window starting at s covers body position j.  (64, 57)
_COVER = ((np.arange(SYNTHETIC_BODY_LEN)[:, None] >= _STARTS)
          & (np.arange(SYNTHETIC_BODY_LEN)[:, None] < _STARTS + SYNTHETIC_TARGET_LEN))


def _check(rows: np.ndarray, noise_prob: float | None = None) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != SYNTHETIC_SEQ_LEN:
        raise ValueError(f"rows must be a 2-D array of shape (N, {SYNTHETIC_SEQ_LEN}), "
                         f"got shape {rows.shape}")
    if not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must hold integer token ids, got dtype {rows.dtype}")
    letters = rows[:, 0]
    if ((letters < FIRST_LETTER) | (letters >= len(SYNTHETIC_ALPHABET))).any():
        raise ValueError("every row must start with a letter A-Z (the prompt)")
    if noise_prob is not None and not 0.0 <= noise_prob < 1.0:
        raise ValueError(f"noise_prob must be in [0, 1), got {noise_prob}")
    return rows.astype(np.int64, copy=False)


def _neg_log(prob: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return -np.log(prob)


def bayes_token_nll(rows: np.ndarray, noise_prob: float = SYNTHETIC_NOISE_PROB) -> np.ndarray:
    """Exact ``-log P(x_t | x_<t)`` of the Bayes predictor for t = 1..65, shape (N, 65)."""
    rows = _check(rows, noise_prob)
    n = len(rows)
    out = np.empty((n, NUM_SCORED))  # (N, 65)
    out[:, 0] = np.where(rows[:, 1] == ARROW, 0.0, np.inf)
    letter = rows[:, 0]  # (N,)
    mask = np.ones((n, NUM_STARTS), dtype=bool)  # consistent starts so far, (N, 57)
    for j in range(SYNTHETIC_BODY_LEN):
        x = rows[:, 2 + j]  # (N,)
        cover = _COVER[j]  # (57,)
        frac = (mask & cover).sum(1) / mask.sum(1)  # (N,), mask is never empty
        is_letter, is_blank = x == letter, x == BLANK
        prob = np.where(x == NOISE, noise_prob,
                        np.where(is_letter, (1 - noise_prob) * frac,
                                 np.where(is_blank, (1 - noise_prob) * (1 - frac), 0.0)))
        out[:, 1 + j] = _neg_log(prob)
        new = np.where(is_letter[:, None], mask & cover,
                       np.where(is_blank[:, None], mask & ~cover, mask))  # (N, 57)
        mask = np.where(new.any(1)[:, None], new, mask)  # an impossible char: keep the mask
    return out


def bayes_floor_nats(rows: np.ndarray, noise_prob: float = SYNTHETIC_NOISE_PROB) -> float:
    """Mean Bayes nll over the (N, 65) scored tokens: the per-token CE floor on ``rows``."""
    return float(bayes_token_nll(rows, noise_prob).mean())


def row_nll(rows: np.ndarray, noise_prob: float = SYNTHETIC_NOISE_PROB,
            chunk: int = 1024) -> np.ndarray:
    """``-log P(x_1..x_65 | letter) = -log((1/57) sum_s prod_j P(x_j | s))``, shape (N,)."""
    rows = _check(rows, noise_prob)
    log_p, log_q = math.log(noise_prob) if noise_prob else -np.inf, math.log1p(-noise_prob)
    out = np.empty(len(rows))
    for lo in range(0, len(rows), chunk):
        part = rows[lo:lo + chunk]
        body, letter = part[:, 2:, None], part[:, :1, None]  # (n, 64, 1), (n, 1, 1)
        under = np.where(_COVER, letter, BLANK)  # char under position j given s, (n, 64, 57)
        logp = np.where(body == NOISE, log_p,
                        np.where(body == under, log_q, -np.inf))  # log P(x_j | s), (n, 64, 57)
        joint = np.logaddexp.reduce(logp.sum(1), axis=1) - math.log(NUM_STARTS)  # (n,)
        out[lo:lo + chunk] = np.where(part[:, 1] == ARROW, -joint, np.inf)
    return out


def _binary_entropy(p: float) -> float:
    return -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0)


def _run_probs(cap: int, p: float, size: int) -> np.ndarray:
    """P(run of "!" = l), l = 0..size-1, for a run truncated at ``cap`` positions."""
    probs = np.zeros(size)
    ls = np.arange(cap)
    probs[:min(cap, size)] = (p ** ls * (1 - p))[:size]
    if cap < size:
        probs[cap] = p ** cap
    return probs


def _min_dist(run: np.ndarray) -> np.ndarray:
    """``A[k, a] = P(min(k, run) = a)`` for k, a in 0..7, from the run's law ``run`` (>= 9)."""
    t = SYNTHETIC_TARGET_LEN
    a = np.zeros((t, t))
    for k in range(t):
        a[k, :k] = run[:k]
        a[k, k] = run[k:].sum()
    return a


def _all_hidden_log_count(s: int, p: float) -> float:
    """E[log |C|] given start ``s`` and all 8 target chars hidden: |C| = number of all-"!"
    8-windows in the body, by a DP over (run length capped at 8, windows so far)."""
    t, body = SYNTHETIC_TARGET_LEN, SYNTHETIC_BODY_LEN
    dist = np.zeros((t + 1, NUM_STARTS + 1))  # (run, count)
    dist[0, 0] = 1.0
    for e in range(body):
        q = 1.0 if s <= e < s + t else p
        grown = np.zeros_like(dist)  # position e is "!": the run grows
        grown[1:t] = dist[:t - 1]
        grown[t, 1:] = dist[t - 1, :-1] + dist[t, :-1]  # run reaches 8: one more window
        reset = np.zeros_like(dist)  # position e is visible: the run restarts
        reset[0] = dist.sum(0)
        dist = q * grown + (1 - q) * reset
    counts = dist.sum(0)  # P(|C| = c), c = 0..57
    return float((counts[1:] * np.log(np.arange(1, NUM_STARTS + 1))).sum())


def expected_floor_nats(noise_prob: float = SYNTHETIC_NOISE_PROB) -> float:
    """Exact E[per-token floor] = (log 57 + 64 H_b(p) - E log|C|) / 65 over the generator."""
    p = float(noise_prob)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"noise_prob must be in [0, 1), got {p}")
    t = SYNTHETIC_TARGET_LEN
    ik = np.add.outer(np.arange(t), np.arange(t))  # i + k, (8, 8)
    p_ik = np.where(ik <= t - 2, p ** ik * (1 - p) ** 2,
                    np.where(ik == t - 1, p ** (t - 1) * (1 - p), 0.0))  # P(i, k), (8, 8)
    log_c = np.log1p(np.add.outer(np.arange(t), np.arange(t)))  # log(1 + a + b), (8, 8)
    e_log_c = 0.0
    for s in _STARTS:
        left = _min_dist(_run_probs(s, p, NUM_STARTS + t))  # P(min(k, L) = a), (8, 8)
        right = _min_dist(_run_probs(NUM_STARTS - 1 - s, p, NUM_STARTS + t))  # min(i, R)
        e_log_c += np.einsum("ik,ka,ib,ab->", p_ik, left, right, log_c)
        if p > 0:
            e_log_c += p ** t * _all_hidden_log_count(int(s), p)
    e_log_c /= NUM_STARTS
    entropy = math.log(NUM_STARTS) + SYNTHETIC_BODY_LEN * _binary_entropy(p) - e_log_c
    return entropy / NUM_SCORED


def token_classes(rows: np.ndarray) -> np.ndarray:
    """Class of each scored token (CLASS_*), shape (N, 65) int8; see CLASS_NAMES.

    position: the first visible target letter and, if it is "_", the body token just
    before it; noise: every "!"; letter: the other visible target letters; other: the rest.
    """
    rows = _check(rows)
    body = rows[:, 2:]  # (N, 64)
    is_letter = body == rows[:, :1]  # (N, 64)
    has = is_letter.any(1)  # (N,)
    first = np.where(has, is_letter.argmax(1), -10)  # (N,)
    pos = np.arange(SYNTHETIC_BODY_LEN)
    before = (pos == (first - 1)[:, None]) & (body == BLANK)  # (N, 64)
    cls = np.full(body.shape, CLASS_OTHER, dtype=np.int8)
    cls[is_letter] = CLASS_LETTER
    cls[(pos == first[:, None]) | before] = CLASS_POSITION
    cls[body == NOISE] = CLASS_NOISE
    return np.concatenate([np.full((len(rows), 1), CLASS_OTHER, np.int8), cls], axis=1)
