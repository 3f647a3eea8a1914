"""Objective (eqs. 4-5): KL against a brute-force sum, free-bits hinge, components."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from freetf.model.losses import compute_loss, free_bits_kl, kl_per_bit, kl_per_token

pytestmark = pytest.mark.timeout(60)


def brute_force_kl(logits: torch.Tensor) -> torch.Tensor:
    """sum_z Q(z) log(Q(z) / 2^-H) over all 2^H codes, one token.  (H,) -> scalar."""
    h = logits.shape[0]
    p = torch.sigmoid(logits.double())
    total = torch.zeros((), dtype=torch.float64)
    for bits in itertools.product([0, 1], repeat=h):
        b = torch.tensor(bits, dtype=torch.float64)
        q = torch.prod(torch.where(b.bool(), p, 1 - p))
        total = total + q * (torch.log(q) + h * math.log(2))
    return total


@pytest.mark.parametrize("h", [1, 3, 6])
def test_kl_equals_brute_force(h):
    torch.manual_seed(h)
    logits = torch.randn(2, 3, h) * 3
    kl = kl_per_token(logits)
    assert kl.shape == (2, 3)
    for i in range(2):
        for t in range(3):
            assert kl[i, t].item() == pytest.approx(brute_force_kl(logits[i, t]).item(), abs=1e-5)


def test_kl_zero_for_zero_logits_and_max_for_saturated():
    assert torch.allclose(kl_per_token(torch.zeros(2, 5, 16)), torch.zeros(2, 5), atol=1e-7)
    sat = kl_per_token(torch.full((1, 1, 4), 50.0))
    assert sat.item() == pytest.approx(4 * math.log(2), abs=1e-5)
    assert (kl_per_bit(torch.randn(3, 4, 5)) >= -1e-7).all()


def test_hinge_is_per_token_then_mean():
    kl = torch.tensor([[0.1, 0.9, 2.0]])
    assert free_bits_kl(kl, 0.5).item() == pytest.approx((0.0 + 0.4 + 1.5) / 3)
    # mean-then-hinge would give max(0, 1.0 - 0.5) = 0.5; the paper hinges per token
    assert free_bits_kl(kl, 0.5).item() != pytest.approx(0.5)


def test_hinge_gradient_zero_below_kappa():
    logits = (torch.randn(2, 4, 3) * 0.05).requires_grad_()
    kappa = kl_per_token(logits).max().item() + 0.1
    free_bits_kl(kl_per_token(logits), kappa).backward()
    assert torch.count_nonzero(logits.grad) == 0
    logits.grad = None
    free_bits_kl(kl_per_token(logits), 0.0).backward()
    assert logits.grad.abs().sum() > 0


def test_compute_loss_components_and_raw_kl():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    z_logits = torch.randn(2, 5, 4) * 2
    total, parts = compute_loss(logits, z_logits, targets, kl_weight=0.3, free_bits_nats=100.0)
    raw = kl_per_token(z_logits).mean()
    assert parts["kl"].item() == 0.0  # hinged away ...
    assert parts["kl_raw_nats"].item() == pytest.approx(raw.item(), rel=1e-5)  # ... raw is not
    assert parts["kl_raw_bits"].item() == pytest.approx(raw.item() / math.log(2), rel=1e-5)
    assert parts["kl_per_bit_nats"].shape == (4,)
    assert parts["kl_per_bit_nats"].sum().item() == pytest.approx(raw.item(), rel=1e-5)
    assert total.item() == pytest.approx(parts["reconstruction"].item(), rel=1e-6)
    total2, parts2 = compute_loss(logits, z_logits, targets, kl_weight=0.3, free_bits_nats=0.0)
    assert total2.item() == pytest.approx(parts2["reconstruction"].item() + 0.3 * raw.item(),
                                          rel=1e-5)
    assert parts2["total"].item() == total2.item() and not parts2["total"].requires_grad


def test_ignore_index_excluded_from_ce_and_kl():
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 7)
    targets = torch.tensor([[1, 2, -100, -100]])
    z_logits = torch.zeros(1, 4, 3)
    z_logits[0, 2:] = 20.0  # huge KL only on ignored positions
    _, parts = compute_loss(logits, z_logits, targets, free_bits_nats=0.0)
    assert parts["kl_raw_nats"].item() == pytest.approx(0.0, abs=1e-6)
    ref = torch.nn.functional.cross_entropy(logits[0, :2], targets[0, :2])
    assert parts["reconstruction"].item() == pytest.approx(ref.item(), rel=1e-6)


def test_baseline_loss_has_no_kl():
    logits = torch.randn(1, 3, 5)
    total, parts = compute_loss(logits, None, torch.tensor([[0, 1, 2]]))
    assert set(parts) == {"reconstruction", "total"}
    assert total.item() == parts["reconstruction"].item() == parts["total"].item()


# ---------------------------------------------------------------- chunked cross-entropy


def _plain_ce_and_grads(hidden, weight, targets, ignore_index=-100):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logits = (h @ w.T).reshape(-1, w.shape[0])  # fp64 here: the reference is exact
    loss = torch.nn.functional.cross_entropy(logits, targets.reshape(-1),
                                             ignore_index=ignore_index)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 3, 7, 0, 1000])
def test_chunked_cross_entropy_equals_plain(chunk):
    """Loss and both gradients equal F.cross_entropy(h W^T) in fp64, ignored targets
    included, for chunk sizes that do and do not divide the token count."""
    from freetf.model.losses import chunked_linear_cross_entropy

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)  # (B, T, D)
    weight = 2.0 * torch.randn(11, 6, generator=gen, dtype=torch.float64)  # (V, D)
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    targets[0, 2] = targets[1, 4] = -100
    ref_loss, ref_dh, ref_dw = _plain_ce_and_grads(hidden, weight, targets)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = chunked_linear_cross_entropy(h, w, targets, chunk_tokens=chunk)
    (3.0 * loss).backward()  # the incoming gradient scales both
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert torch.allclose(h.grad, 3.0 * ref_dh, rtol=1e-12, atol=1e-12)
    assert torch.allclose(w.grad, 3.0 * ref_dw, rtol=1e-12, atol=1e-12)  # fp64 accumulation
    assert h.grad[0, 2].abs().max() == 0  # an ignored position sends no gradient


def test_chunked_cross_entropy_under_bf16_autocast_matches_the_plain_path():
    """Under autocast both paths compute bf16 logits upcast to fp32: equal losses, and
    gradients equal to the plain autocast path's within bf16 rounding."""
    from freetf.model.losses import chunked_linear_cross_entropy

    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 16, 32, generator=gen)
    weight = torch.randn(50, 32, generator=gen) / 4
    targets = torch.randint(0, 50, (4, 16), generator=gen)
    out = []
    for chunked in (False, True):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                loss = chunked_linear_cross_entropy(h, w, targets, chunk_tokens=10)
            else:
                logits = torch.nn.functional.linear(h, w)  # bf16 under autocast
                loss = torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, 50), targets.reshape(-1))
        loss.backward()
        out.append((loss.detach(), h.grad, w.grad))
    (l0, dh0, dw0), (l1, dh1, dw1) = out
    assert l1.item() == pytest.approx(l0.item(), rel=1e-6)
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    scale_h, scale_w = dh0.abs().max().item(), dw0.abs().max().item()
    assert (dh1 - dh0).abs().max().item() < 0.02 * scale_h
    assert (dw1 - dw0).abs().max().item() < 0.02 * scale_w


def test_compute_loss_takes_head_inputs_like_logits():
    """compute_loss(HeadInputs) == compute_loss(logits): total, parts and gradients."""
    from freetf.model.losses import HeadInputs

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 7, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(13, 8, generator=gen, dtype=torch.float64)
    z_logits = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 13, (2, 7), generator=gen)
    results = []
    for lazy in (False, True):
        h = hidden.clone().requires_grad_(True)
        logits = HeadInputs(h, weight, chunk_tokens=4) if lazy else h @ weight.T
        total, parts = compute_loss(logits[:, :-1], z_logits[:, :-1], ids[:, 1:],
                                    kl_weight=0.5, free_bits_nats=0.1)
        total.backward()
        results.append((total.item(), parts["reconstruction"].item(), h.grad))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-12)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-12)
    assert torch.allclose(results[1][2], results[0][2], atol=1e-12)
    assert results[1][2][:, -1].abs().max() == 0  # the last position predicts nothing

def test_chunked_cross_entropy_in_fp32_without_autocast_stays_fp32():
    """Outside autocast an fp32 loss is computed in fp32 (no bf16 from an autocast the
    function would turn on): within fp32 rounding of the fp64 reference."""
    from freetf.model.losses import chunked_linear_cross_entropy

    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 8, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(40, 16, generator=gen, dtype=torch.float64) / 2
    targets = torch.randint(0, 40, (3, 8), generator=gen)
    ref_loss, ref_dh, ref_dw = _plain_ce_and_grads(hidden, weight, targets)
    h = hidden.float().requires_grad_(True)
    w = weight.float().requires_grad_(True)
    loss = chunked_linear_cross_entropy(h, w, targets, chunk_tokens=5)
    loss.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)  # bf16 logits: ~1e-3
    assert torch.allclose(h.grad.double(), ref_dh, rtol=1e-4, atol=1e-6)
    assert torch.allclose(w.grad.double(), ref_dw, rtol=1e-4, atol=1e-6)


def test_chunked_cross_entropy_with_a_frozen_hidden_or_a_frozen_head():
    """Only the inputs that want a gradient get one; the other may be frozen."""
    from freetf.model.losses import chunked_linear_cross_entropy

    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 9, (2, 4), generator=gen)
    _, ref_dh, ref_dw = _plain_ce_and_grads(hidden, weight, targets)
    w = weight.clone().requires_grad_(True)
    chunked_linear_cross_entropy(hidden, w, targets, chunk_tokens=3).backward()
    assert torch.allclose(w.grad, ref_dw, rtol=1e-12, atol=1e-12)
    h = hidden.clone().requires_grad_(True)
    chunked_linear_cross_entropy(h, weight, targets, chunk_tokens=3).backward()
    assert torch.allclose(h.grad, ref_dh, rtol=1e-12, atol=1e-12)


def test_chunked_cross_entropy_computes_on_its_inputs_device_not_the_default_device():
    """CPU inputs under another default device ("meta"): every buffer follows the inputs
    (a tensor made without their device would land on "meta" and fail or read nothing)."""
    from freetf.model.losses import chunked_linear_cross_entropy

    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 5), generator=gen)
    ref_loss, _, ref_dw = _plain_ce_and_grads(hidden, weight, targets)
    w = weight.clone().requires_grad_(True)
    with torch.device("meta"):
        loss = chunked_linear_cross_entropy(hidden, w, targets, chunk_tokens=4)
    loss.backward()
    assert loss.device.type == "cpu"
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert torch.allclose(w.grad, ref_dw, rtol=1e-12, atol=1e-12)


def test_chunk_size_given_kept_or_sized_from_the_byte_budget(monkeypatch):
    """The chunk size reaching the kernel: a given one (1 included), HeadInputs' own
    through slicing and compute_loss, else the budget over 4 V bytes (at least 1)."""
    from freetf.model import losses

    seen = []

    def spy(hidden, weight, targets, chunk_tokens, ignore_index, compute_dtype):
        seen.append((chunk_tokens, ignore_index))
        return hidden.sum() * 0.0

    monkeypatch.setattr(losses._LinearCrossEntropy, "apply", spy)
    hidden, weight = torch.zeros(2, 3, 4), torch.zeros(10, 4)  # V = 10, D = 4
    targets = torch.zeros(2, 3, dtype=torch.long)
    monkeypatch.setitem(losses._CE_CHUNK_BYTES, "cpu", 4 * 10 * 7 + 39)  # 7 tokens
    losses.chunked_linear_cross_entropy(hidden, weight, targets)
    losses.chunked_linear_cross_entropy(hidden, weight, targets, chunk_tokens=1)
    losses.chunked_linear_cross_entropy(hidden, weight, targets, chunk_tokens=5)
    losses.compute_loss(losses.HeadInputs(hidden, weight, 3)[:, :-1], None,
                        targets[:, 1:], ignore_index=-7)
    monkeypatch.setitem(losses._CE_CHUNK_BYTES, "cpu", 4 * 10 + 39)  # 1 token
    losses.chunked_linear_cross_entropy(hidden, weight, targets)
    monkeypatch.setitem(losses._CE_CHUNK_BYTES, "cpu", 39)  # not one token: still 1
    losses.chunked_linear_cross_entropy(hidden, weight, targets)
    assert seen == [(7, -100), (1, -100), (5, -100), (3, -7), (1, -100), (1, -100)]


def test_head_inputs_honour_another_ignore_index():
    from freetf.model.losses import HeadInputs

    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 5, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    targets = torch.tensor([[2, -1, 5, -1, 0]])
    lazy, _ = compute_loss(HeadInputs(hidden, weight, 2), None, targets, ignore_index=-1)
    keep = targets[0] != -1
    ref = torch.nn.functional.cross_entropy(hidden[0, keep] @ weight.T, targets[0, keep])
    assert lazy.item() == pytest.approx(ref.item(), rel=1e-12)


def test_chunked_cross_entropy_of_a_one_token_vocabulary_is_zero():
    """V = 1: every kept target is certain (loss 0, no gradient); an ignored position's
    placeholder index must exist in the one-row head too."""
    from freetf.model.losses import chunked_linear_cross_entropy

    h = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    loss = chunked_linear_cross_entropy(h, w, torch.tensor([[0, -100, 0]]), chunk_tokens=2)
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_bf16_logits_are_scored_in_fp32():
    gen = torch.Generator().manual_seed(8)
    logits = (4 * torch.randn(2, 6, 50, generator=gen)).bfloat16()
    targets = torch.randint(0, 50, (2, 6), generator=gen)
    loss, _ = compute_loss(logits, None, targets)
    ref = torch.nn.functional.cross_entropy(logits.double().reshape(-1, 50),
                                            targets.reshape(-1))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)  # a bf16 loss is off ~1e-3


# ----------------------------------------------------------------------------- properties

_logit = st.floats(-15, 15, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(_logit, min_size=1, max_size=6))
def test_kl_per_token_is_the_brute_force_kl_for_any_logits(logits):
    l64 = torch.tensor(logits, dtype=torch.float64)
    kl = kl_per_token(l64[None, None])[0, 0]
    assert kl.item() == pytest.approx(brute_force_kl(l64).item(), abs=1e-5)
    per_bit = kl_per_bit(l64[None, None])[0, 0]
    assert torch.all(per_bit >= -1e-7) and torch.all(per_bit <= math.log(2) + 1e-7)


@settings(max_examples=60, deadline=None)
@given(kl=st.lists(st.floats(0, 10), min_size=1, max_size=12),
       kappa=st.floats(0, 5), data=st.data())
def test_free_bits_is_the_masked_mean_of_the_per_token_hinge(kl, kappa, data):
    mask = data.draw(st.lists(st.booleans(), min_size=len(kl), max_size=len(kl)))
    kl_t = torch.tensor([kl], dtype=torch.float64)
    kept = [max(0.0, k - kappa) for k, m in zip(kl, mask, strict=True) if m]
    expected = sum(kept) / len(kept) if kept else 0.0
    got = free_bits_kl(kl_t, kappa, torch.tensor([mask]))
    assert got.item() == pytest.approx(expected, abs=1e-9)
    assert free_bits_kl(kl_t, kappa).item() == pytest.approx(
        sum(max(0.0, k - kappa) for k in kl) / len(kl), abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 16), kl_weight=st.floats(0, 4), kappa=st.floats(0, 2),
       t=st.integers(2, 6))
def test_compute_loss_is_ce_plus_weighted_hinge_over_kept_positions(seed, kl_weight, kappa, t):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, t, 5, generator=gen, dtype=torch.float64)
    z = 3 * torch.randn(2, t, 3, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 5, (2, t), generator=gen)
    targets[0, 0] = -100  # one ignored position
    total, parts = compute_loss(logits, z, targets, kl_weight, kappa)
    keep = targets != -100
    ce = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    kl = torch.stack([brute_force_kl(z[i, j]) for i, j in keep.nonzero().tolist()])
    assert parts["reconstruction"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert parts["kl_raw_nats"].item() == pytest.approx(kl.mean().item(), rel=1e-5, abs=1e-9)
    hinged = (kl - kappa).clamp(min=0).mean().item()
    # the KL is computed in fp32: kl - kappa loses ~1e-7 absolute
    assert parts["kl"].item() == pytest.approx(hinged, rel=1e-5, abs=1e-6)
    assert total.item() == pytest.approx(ce.item() + kl_weight * hinged, rel=1e-5, abs=1e-5)
    per_bit = kl_per_bit(z)[keep].double().mean(0)  # (H,)
    assert torch.allclose(parts["kl_per_bit_nats"].double(), per_bit, rtol=1e-5, atol=1e-7)


def test_compute_loss_defaults_and_another_ignore_index():
    """Defaults: kl_weight 1, kappa 0; ``ignore_index`` reaches the CE and the KL mask,
    also with a single kept position."""
    torch.manual_seed(0)
    logits, z = torch.randn(1, 4, 5), 3 * torch.randn(1, 4, 3)
    targets = torch.tensor([[-1, -1, 2, -1]])  # one kept position, ignore_index = -1
    total, parts = compute_loss(logits, z, targets, ignore_index=-1)
    ce = torch.nn.functional.cross_entropy(logits[0, 2:3], targets[0, 2:3])
    kl = kl_per_token(z)[0, 2]
    assert parts["reconstruction"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert parts["kl_raw_nats"].item() == pytest.approx(kl.item(), rel=1e-6)
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-6)  # kappa = 0
    assert total.item() == pytest.approx(ce.item() + kl.item(), rel=1e-6)  # weight 1
    assert torch.allclose(parts["kl_per_bit_nats"], kl_per_bit(z)[0, 2], rtol=1e-6)


def test_the_sequence_hinge_pools_a_rows_budget_over_its_tokens():
    # row 0: 0.1 + 0.9 = 1.0 against 2 x 0.5 -> 0; row 1: 1.5 + 0.5 = 2.0 against 1.0 -> 1.0
    kl = torch.tensor([[0.1, 0.9], [1.5, 0.5]], dtype=torch.float64)
    assert free_bits_kl(kl, 0.5, per="sequence").item() == pytest.approx(1.0 / 4)
    assert free_bits_kl(kl, 0.5).item() == pytest.approx((0.4 + 1.0) / 4)  # per token
    mask = torch.tensor([[True, False], [True, True]])  # row 0: 0.1 against 0.5 -> 0
    assert free_bits_kl(kl, 0.5, mask, per="sequence").item() == pytest.approx(1.0 / 3)
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        free_bits_kl(kl, 0.5, per="batch")


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(st.tuples(st.floats(0, 5), st.booleans()), min_size=1,
                              max_size=6), min_size=1, max_size=4),
       kappa=st.floats(0, 3))
def test_the_sequence_hinge_against_a_reference(rows, kappa):
    width = max(len(r) for r in rows)
    kl = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        for t, (value, kept) in enumerate(row):
            kl[b, t], mask[b, t] = value, kept
    scored = [[v for v, kept in row if kept] for row in rows]
    tokens = sum(len(s) for s in scored)
    expected = sum(max(0.0, sum(s) - kappa * len(s)) for s in scored) / max(tokens, 1)
    pooled = free_bits_kl(kl, kappa, mask, per="sequence").item()
    assert pooled == pytest.approx(expected, abs=1e-9)
    # pooling never costs more than the per-token hinge, and they agree under the budget
    assert pooled <= free_bits_kl(kl, kappa, mask).item() + 1e-12


def test_compute_loss_passes_the_hinge_kind_on():
    torch.manual_seed(0)
    logits, z_logits = torch.randn(2, 5, 7), 3 * torch.randn(2, 5, 4)
    targets = torch.randint(0, 7, (2, 5))
    kl_t = kl_per_token(z_logits)
    kappa = float(kl_t.mean())
    for per in ("token", "sequence"):
        total, parts = compute_loss(logits, z_logits, targets, 1.0, kappa, free_bits_per=per)
        assert parts["kl"].item() == pytest.approx(free_bits_kl(kl_t, kappa, per=per).item())
    assert free_bits_kl(kl_t, kappa, per="sequence") < free_bits_kl(kl_t, kappa)
