"""Binary mapper (eqs. 6-8): value, exact gradient, memory-efficient gradient, sampling."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from freetf.model.mapper import (
    BinaryMapper,
    _ChunkedMapper,
    bits_to_codes,
    chunk_codes,
    chunked_mapper,
    code_bits,
    code_log_probs,
    codes_to_bits,
    dense_mapper,
    sample_bits,
)

pytestmark = pytest.mark.timeout(60)


def test_code_bits_roundtrip():
    table = code_bits(5)
    assert table.shape == (32, 5)
    assert torch.equal(bits_to_codes(table), torch.arange(32))
    assert torch.equal(codes_to_bits(torch.arange(32), 5), table)


def test_forward_value_is_exactly_one_hot_row():
    torch.manual_seed(0)
    mapper = BinaryMapper(num_bits=6, dim=8)
    logits = torch.randn(3, 5, 6)
    noise = torch.rand(3, 5, 6)
    r, codes = mapper(logits, noise)
    bits = (noise < torch.sigmoid(logits)).float()
    assert torch.equal(codes, bits_to_codes(bits))
    assert torch.equal(r, mapper.weight[codes] + mapper.bias)
    dense = dense_mapper(logits.reshape(-1, 6), bits.reshape(-1, 6), mapper.weight)
    # the dense reference adds G - sg(G): one-hot up to float rounding of 1 + g - g
    assert torch.allclose(dense, mapper.weight[codes.reshape(-1)], atol=1e-7)


def _eq8_gradient_by_hand(logits, bits, weight, grad_out):
    """dL/dL_h = sum_d s_d G_d (U_h(d) - p_h) with s = grad_out W^T: the paper's estimator."""
    table = code_bits(logits.shape[-1]).to(logits.dtype)
    p = torch.sigmoid(logits)
    g = torch.prod(torch.where(table.bool()[None], p[:, None], 1 - p[:, None]), -1)  # (N, C)
    s = grad_out @ weight.T
    return (s * g) @ table - p * (s * g).sum(-1, keepdim=True)


@pytest.mark.parametrize("num_bits,chunk", [(3, 2), (6, 16), (8, 256), (8, 1000), (10, 0)])
def test_chunked_gradient_equals_dense_eq8(num_bits, chunk):
    torch.manual_seed(num_bits)
    n, d = 17, 12
    logits = torch.randn(n, num_bits, dtype=torch.float64) * 2
    weight = torch.randn(2 ** num_bits, d, dtype=torch.float64)
    bits = sample_bits(logits)
    codes = bits_to_codes(bits)
    grad_out = torch.randn(n, d, dtype=torch.float64)

    l_dense, w_dense = logits.clone().requires_grad_(), weight.clone().requires_grad_()
    (dense_mapper(l_dense, bits, w_dense) * grad_out).sum().backward()
    l_chunk, w_chunk = logits.clone().requires_grad_(), weight.clone().requires_grad_()
    out = chunked_mapper(l_chunk, codes, w_chunk, chunk)
    (out * grad_out).sum().backward()

    assert torch.allclose(l_chunk.grad, l_dense.grad, atol=1e-10)
    assert torch.allclose(w_chunk.grad, w_dense.grad, atol=1e-10)
    assert torch.allclose(l_dense.grad, _eq8_gradient_by_hand(logits, bits, weight, grad_out),
                          atol=1e-10)
    # not the straight-through estimator on the sampled slot d* only, whose gradient is
    # s_d* G_d* (U_h(d*) - p_h): it is non-zero too, so compare the values
    p = torch.sigmoid(logits)
    g_star = torch.prod(torch.where(bits.bool(), p, 1 - p), -1, keepdim=True)  # (N, 1)
    s_star = (grad_out * weight[codes]).sum(-1, keepdim=True)  # (N, 1)
    straight_through = s_star * g_star * (bits - p)
    assert (l_dense.grad - straight_through).abs().max() > 1e-2 * l_dense.grad.abs().max()


def test_chunked_mapper_float32_matches_dense():
    torch.manual_seed(1)
    logits = torch.randn(64, 10, requires_grad=True)
    weight = torch.randn(1024, 16, requires_grad=True)
    bits = sample_bits(logits.detach())
    grad_out = torch.randn(64, 16)
    (dense_mapper(logits, bits, weight) * grad_out).sum().backward()
    gl, gw = logits.grad.clone(), weight.grad.clone()
    logits.grad = weight.grad = None
    (chunked_mapper(logits, bits_to_codes(bits), weight, 128) * grad_out).sum().backward()
    assert torch.allclose(logits.grad, gl, atol=1e-5, rtol=1e-4)
    assert torch.allclose(weight.grad, gw, atol=1e-6)


def test_factored_is_eq8_for_a_bit_linear_post_sampler():
    """Eq. 8 with W_d = sum_h U_h(d) w_h reduces to W_f (B + p - sg(p))."""
    torch.manual_seed(2)
    h, d = 5, 7
    logits = torch.randn(9, h, dtype=torch.float64)
    w_f = torch.randn(h, d, dtype=torch.float64)
    noise = torch.rand(9, h, dtype=torch.float64)
    mapper = BinaryMapper(h, d, kind="factored").double()
    with torch.no_grad():
        mapper.weight.copy_(w_f)
    l1 = logits.clone().requires_grad_()
    r, codes = mapper(l1, noise)
    grad_out = torch.randn_like(r)
    (r * grad_out).sum().backward()
    full_w = code_bits(h).double() @ w_f  # (2^h, d)
    l2 = logits.clone().requires_grad_()
    bits = (noise < torch.sigmoid(logits)).double()
    ref = dense_mapper(l2, bits, full_w) + mapper.bias
    (ref * grad_out).sum().backward()
    assert torch.allclose(r, ref.detach(), rtol=0, atol=1e-12)  # both in float64
    assert torch.allclose(l1.grad, l2.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind,impl", [("exact", "chunked"), ("exact", "dense"),
                                       ("factored", "chunked"), ("factored", "dense")])
def test_float64_mapper_computes_in_float64(kind, impl):
    """A float64 mapper matches a float64 reference written here to 1e-12, value and
    logit gradient (fp32 arithmetic anywhere on the path is off by ~1e-8)."""
    torch.manual_seed(11)
    h, d = 4, 6
    mapper = BinaryMapper(h, d, kind=kind, impl=impl, chunk_size=4).double()
    with torch.no_grad():
        mapper.weight.normal_()
        mapper.bias.normal_()
    logits = (torch.randn(3, 5, h, dtype=torch.float64) * 2).requires_grad_()
    noise = torch.rand(3, 5, h, dtype=torch.float64)
    grad_out = torch.randn(3, 5, d, dtype=torch.float64)
    r, codes = mapper(logits, noise)
    (r * grad_out).sum().backward()
    assert r.dtype == torch.float64

    w, b = mapper.weight.detach(), mapper.bias.detach()
    flat, g = logits.detach().reshape(-1, h), grad_out.reshape(-1, d)  # (N, H), (N, D)
    p = torch.sigmoid(flat)  # (N, H)
    bits = (noise.reshape(-1, h) < p).double()
    if kind == "factored":  # r = W_f B + b; dr/dL_h = p_h (1 - p_h) W_f[h]
        ref = bits @ w + b
        ref_grad = (g @ w.T) * p * (1 - p)
    else:  # r = W[d] + b; dL/dL_h = sum_d s_d G_d (U_h(d) - p_h), s = g W^T
        ref = w[(bits * 2 ** torch.arange(h)).sum(-1).long()] + b
        table = torch.tensor([[(c >> k) & 1 for k in range(h)] for c in range(2 ** h)],
                             dtype=torch.float64)  # (2^H, H)
        prob = torch.stack([torch.prod(torch.where(u.bool(), p, 1 - p), -1)
                            for u in table], -1)  # (N, 2^H)
        weighted = (g @ w.T) * prob  # (N, 2^H): s_d G_d
        ref_grad = weighted @ table - p * weighted.sum(-1, keepdim=True)
    assert (r.reshape(-1, d) - ref).abs().max() < 1e-12
    assert (logits.grad.reshape(-1, h) - ref_grad).abs().max() < 1e-12
    assert ref_grad.abs().max() > 1e-2  # a gradient worth comparing


def test_code_frequencies_match_bit_probabilities():
    torch.manual_seed(3)
    probs = torch.tensor([0.1, 0.5, 0.8])
    logits = torch.logit(probs).expand(200_000, 3)
    codes = bits_to_codes(sample_bits(logits))
    freq = torch.bincount(codes, minlength=8).float() / codes.numel()
    table = code_bits(3)
    expected = torch.prod(torch.where(table.bool(), probs, 1 - probs), -1)
    assert torch.allclose(freq, expected, atol=0.005)


def test_bit_noise_is_an_fp32_uniform_whatever_the_logits_dtype():
    """eq. 6 draws u ~ U(0, 1) in fp32 (bf16 noise would quantise P(B = 1) to 8 bits)."""
    logits = torch.randn(64, 16).bfloat16()
    torch.manual_seed(8)
    bits = sample_bits(logits)
    torch.manual_seed(8)
    reference = (torch.rand(64, 16) < torch.sigmoid(logits.float())).float()
    assert torch.equal(bits, reference)


def test_post_sampler_defaults_and_initial_scale():
    """Exact: a (2^H, D) table of std 0.02.  Factored: (H, D) of std 0.02 / sqrt(H), so
    that r = W_f B, a sum of ~H/2 rows, starts at the exact table's scale."""
    torch.manual_seed(9)
    exact = BinaryMapper(6, 512)
    assert exact.weight.shape == (64, 512)
    assert exact.weight.std().item() == pytest.approx(0.02, rel=0.03)
    factored = BinaryMapper(16, 4096, kind="factored")
    assert factored.weight.shape == (16, 4096)
    assert factored.weight.std().item() == pytest.approx(0.02 / 4, rel=0.03)
    assert abs(factored.weight.mean().item()) < 0.01 * 0.02
    assert torch.equal(factored.bias, torch.zeros(4096))
    assert (exact.kind, exact.impl, exact.chunk_size, exact.score_precision) == (
        "exact", "chunked", 0, "fp32")
    for name, value in (("kind", "dense"), ("impl", "exact"), ("score_precision", "bf16")):
        with pytest.raises(ValueError, match=f"unknown mapper {name} '{value}'"):
            BinaryMapper(4, 8, **{name: value})
    with pytest.raises(ValueError, match="; known: chunked, dense$"):
        BinaryMapper(4, 8, impl="sparse")


def test_post_sampler_bits_init_gives_each_bit_one_shared_direction():
    """``bits``: W[d] = sum_h (2 U_h(d) - 1) V_h, so flipping bit h moves every row by the
    same vector 2 V_h (whatever the other bits), and entries keep the normal init's scale."""
    torch.manual_seed(3)
    mapper = BinaryMapper(5, 2048, init="bits", init_std=0.05)
    w = mapper.weight.detach()
    table = code_bits(5)
    for h in range(5):
        ones = torch.nonzero(table[:, h] == 1).squeeze(1)  # codes with bit h set
        steps = w[ones] - w[ones - 2 ** h]  # flip bit h off
        assert torch.allclose(steps, steps[:1].expand_as(steps), atol=1e-6)
    # Rows are sums of signed directions: d and its complement are opposite.
    assert torch.allclose(w, -w.flip(0), atol=1e-6)
    assert w.std().item() == pytest.approx(0.05, rel=0.05)
    assert not torch.allclose(w[0], w[1], atol=1e-6)


def test_post_sampler_zero_and_unknown_inits():
    assert torch.equal(BinaryMapper(4, 8, init="zero").weight, torch.zeros(16, 8))
    assert torch.equal(BinaryMapper(4, 8, kind="factored", init="zero").weight,
                       torch.zeros(4, 8))
    torch.manual_seed(1)
    a = BinaryMapper(4, 8, kind="factored", init="bits").weight
    torch.manual_seed(1)
    b = BinaryMapper(4, 8, kind="factored").weight  # bits == normal when factored
    assert torch.equal(a, b)
    torch.manual_seed(1)
    assert BinaryMapper(6, 4096, init="normal", init_std=0.1).weight.std().item() == \
        pytest.approx(0.1, rel=0.03)
    with pytest.raises(ValueError, match="unknown post-sampler init"):
        BinaryMapper(4, 8, init="uniform")


def test_prior_codes_are_uniform():
    torch.manual_seed(4)
    mapper = BinaryMapper(3, 4)
    codes = mapper.sample_prior((100_000,), torch.device("cpu"))
    freq = torch.bincount(codes, minlength=8).float() / codes.numel()
    assert torch.allclose(freq, torch.full((8,), 1 / 8), atol=0.01)


def test_chunked_mapper_uses_less_memory_than_dense():
    """The chunked backward never holds an (N, 2^H) tensor across forward and backward."""
    logits = torch.randn(256, 12, requires_grad=True)
    weight = torch.randn(4096, 8, requires_grad=True)
    bits = sample_bits(logits.detach())
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_mapper(logits, bits_to_codes(bits), weight, 512).sum()
    chunk_saved = sum(saved) - weight.numel()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dense_mapper(logits, bits, weight).sum()
    dense_saved = sum(saved)
    assert chunk_saved < 256 * 64
    assert dense_saved > 256 * 4096


@pytest.mark.parametrize("kind,impl", [("exact", "chunked"), ("exact", "dense"),
                                       ("factored", "chunked")])
def test_mapper_under_bf16_autocast_matches_fp32(kind, impl):
    """Under autocast (even with backward inside it) the mapper computes G in fp32."""
    torch.manual_seed(5)
    mapper = BinaryMapper(6, 8, kind=kind, impl=impl)
    logits = torch.randn(2, 5, 6)
    noise = torch.rand(2, 5, 6)
    grad_out = torch.randn(2, 5, 8)
    l32 = logits.clone().requires_grad_()
    r32, _ = mapper(l32, noise)
    (r32 * grad_out).sum().backward()
    lbf = logits.clone().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rbf, _ = mapper(lbf, noise)
        (rbf.float() * grad_out).sum().backward()
    assert rbf.dtype == torch.float32
    assert torch.allclose(rbf, r32, atol=1e-6)
    # the gradient is ~1e-2; bf16 rounding of the returned gradient costs ~5e-5
    scale = l32.grad.abs().max()
    assert scale > 1e-3
    assert torch.allclose(lbf.grad.float(), l32.grad, rtol=1e-2, atol=1e-2 * scale)


def test_chunk_codes_tile_the_codes_in_powers_of_two():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert chunk_codes(1000, 2048, 2 ** 16, cpu) == 512  # rounded down to 2^k
    assert chunk_codes(4096, 2048, 2 ** 8, cpu) == 256  # at most 2^H
    assert chunk_codes(0, 2048, 2 ** 16, cpu) == 512  # auto: CPU's cap
    assert chunk_codes(0, 8192, 2 ** 16, cpu) == 128  # auto: 4 MiB per (N, C) buffer
    assert chunk_codes(0, 10 ** 6, 2 ** 16, cpu) == 64  # auto: never below 64
    assert chunk_codes(0, 16384, 2 ** 16, cuda) == 4096  # auto: 256 MiB on CUDA
    for n in (1, 7, 300, 5000):
        size = chunk_codes(0, n, 2 ** 12, cpu)
        assert 2 ** 12 % size == 0
    assert chunk_codes(1, 2048, 2 ** 16, cpu) == 1  # 1 is a size, not "auto"
    other = torch.device("meta")  # any other device type is sized like CUDA
    assert chunk_codes(0, 16384, 2 ** 16, other) == chunk_codes(0, 16384, 2 ** 16, cuda)


def test_prior_codes_need_fewer_than_63_bits():
    codes = BinaryMapper(62, 2, kind="factored").sample_prior((1000,), torch.device("cpu"))
    assert codes.dtype == torch.int64 and codes.min() >= 0 and codes.max() < 2 ** 62
    assert codes.max() > 2 ** 61  # the whole range, not a prefix
    with pytest.raises(ValueError, match="latent_dim must be < 63"):
        BinaryMapper(63, 2, kind="factored").sample_prior((1,), torch.device("cpu"))


@pytest.mark.parametrize("kind,impl", [("exact", "chunked"), ("exact", "dense"),
                                       ("factored", "chunked")])
@pytest.mark.parametrize("train_weight", [True, False])
def test_mapper_with_bf16_parameters_matches_fp32(kind, impl, train_weight):
    """A mapper cast to bf16 (``model.to(torch.bfloat16)``), its post-sampler trained or
    frozen: the same r and logit gradient as in fp32, to bf16 precision."""
    torch.manual_seed(2)
    mapper = BinaryMapper(5, 8, kind=kind, impl=impl)
    with torch.no_grad():
        mapper.bias.normal_()
    logits, noise, grad_out = torch.randn(3, 4, 5), torch.rand(3, 4, 5), torch.randn(3, 4, 8)
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        m = mapper.to(dtype)
        m.weight.requires_grad_(train_weight)
        lg = logits.to(dtype).detach().clone().requires_grad_()
        r, codes = m(lg, noise)
        (r.float() * grad_out).sum().backward()
        outs.append((r.float(), lg.grad.float(), m.embed_codes(codes).float()))
        assert (m.weight.grad is not None) == train_weight
        if train_weight:
            assert m.weight.grad.dtype == dtype
    (r32, g32, e32), (r16, g16, e16) = outs
    assert torch.allclose(r16, r32, rtol=2e-2, atol=2e-2)
    assert torch.allclose(e16, e32, rtol=2e-2, atol=2e-2)
    assert torch.allclose(g16, g32, rtol=2e-2, atol=2e-2 * g32.abs().max())


def test_autocast_score_precision_is_close_to_fp32_and_only_acts_under_amp():
    """`mapper_score_precision: autocast` runs s = dL/dr W^T in bf16 under AMP only."""
    torch.manual_seed(6)
    exact = BinaryMapper(8, 32)
    fast = BinaryMapper(8, 32, score_precision="autocast")
    fast.load_state_dict(exact.state_dict())
    logits, noise = torch.randn(4, 16, 8), torch.rand(4, 16, 8)
    grad_out = torch.randn(4, 16, 32)

    def logit_grad(mapper, amp):
        x = logits.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            r, _ = mapper(x, noise)
        (r * grad_out).sum().backward()
        return x.grad

    reference = logit_grad(exact, amp=True)  # fp32 scores even under autocast
    assert torch.equal(reference, logit_grad(exact, amp=False))  # the default is exact
    assert torch.equal(logit_grad(fast, amp=False), logit_grad(exact, amp=False))
    approx = logit_grad(fast, amp=True)
    assert not torch.equal(approx, reference)  # the bf16 products did run
    assert torch.allclose(approx, reference, rtol=0.02, atol=2e-3 * reference.abs().max())


# ----------------------------------------------------------------------------- properties


@st.composite
def _codes(draw):
    num_bits = draw(st.integers(1, 30))
    values = draw(st.lists(st.integers(0, 2 ** num_bits - 1), min_size=1, max_size=20))
    return num_bits, torch.tensor(values, dtype=torch.int64)


@settings(max_examples=80, deadline=None)
@given(_codes())
def test_bits_and_codes_are_inverse_and_least_significant_first(case):
    num_bits, codes = case
    bits = codes_to_bits(codes, num_bits)  # (N, H)
    assert bits.shape == (len(codes), num_bits) and set(bits.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(bits_to_codes(bits), codes)
    for code, row in zip(codes.tolist(), bits.tolist(), strict=True):
        assert row == [float((code >> h) & 1) for h in range(num_bits)]  # U_h(d)


@settings(max_examples=40, deadline=None)
@given(num_bits=st.integers(1, 10), data=st.data())
def test_code_bits_table_is_codes_to_bits_of_its_range(num_bits, data):
    start = data.draw(st.integers(0, 2 ** num_bits - 1))
    end = data.draw(st.integers(start + 1, 2 ** num_bits))
    table = code_bits(num_bits, start=start, end=end)
    assert torch.equal(table, codes_to_bits(torch.arange(start, end), num_bits))
    assert torch.equal(code_bits(num_bits), codes_to_bits(torch.arange(2 ** num_bits), num_bits))


@settings(max_examples=40, deadline=None)
@given(logits=st.lists(st.floats(-12, 12), min_size=1, max_size=7))
def test_code_log_probs_is_the_product_of_bit_probabilities(logits):
    """log G_d = sum_h log P(B_h = U_h(d)) (eq. 7), and G sums to one over the codes."""
    l64 = torch.tensor([logits], dtype=torch.float64)  # (1, H)
    num_bits = l64.shape[1]
    table = code_bits(num_bits).double()
    log_g = code_log_probs(l64, table)[0]  # (2^H,)
    p = torch.sigmoid(l64[0])
    for d in range(2 ** num_bits):
        ref = sum(math.log(p[h] if (d >> h) & 1 else 1 - p[h]) for h in range(num_bits))
        assert log_g[d].item() == pytest.approx(ref, abs=1e-9)
    assert log_g.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_tables_and_prior_codes_stay_on_the_inputs_device():
    """Device placement, checked without a GPU on the meta device."""
    meta = torch.device("meta")
    assert codes_to_bits(torch.zeros(5, dtype=torch.int64, device=meta), 3).device == meta
    assert code_bits(3, meta, 2, 6).device == meta
    assert BinaryMapper(4, 8).sample_prior((3, 2), meta).device == meta


@pytest.mark.parametrize("kind,impl", [("exact", "chunked"), ("exact", "dense"),
                                       ("factored", "chunked")])
def test_mapper_computes_on_its_inputs_device_not_the_default_device(kind, impl):
    """Forward and backward of CPU inputs under another default device (as CUDA inputs
    under the default CPU device): every table is built on the inputs' device."""
    torch.manual_seed(10)
    mapper = BinaryMapper(6, 8, kind=kind, impl=impl)
    logits, noise, grad_out = torch.randn(2, 5, 6), torch.rand(2, 5, 6), torch.randn(2, 5, 8)

    def run():
        x = logits.clone().requires_grad_()
        r, codes = mapper(x, noise)
        (r * grad_out).sum().backward()
        return r.detach(), codes, x.grad

    reference = run()
    with torch.device("meta"):  # tensors made without a device would land on "meta"
        moved = run()
        codes = bits_to_codes(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], device="cpu"))
    assert codes.device.type == "cpu" and codes.tolist() == [5, 6]
    for a, b in zip(reference, moved, strict=True):
        assert b.device.type == "cpu" and torch.equal(a, b)


def test_chunked_backward_builds_its_tables_on_the_inputs_device():
    """The autograd engine runs backward outside the default-device context of the test
    above, so the backward is called here directly, under another default device."""
    torch.manual_seed(11)
    logits, weight = torch.randn(10, 6, requires_grad=True), torch.randn(64, 8)
    codes, grad_out = torch.randint(0, 64, (10,)), torch.randn(10, 8)
    (chunked_mapper(logits, codes, weight, 16) * grad_out).sum().backward()
    ctx = SimpleNamespace(saved_tensors=(logits.detach(), codes, weight),
                          needs_input_grad=(True, False, False), chunk_size=16,
                          score_dtype=None)
    with torch.device("meta"):  # tensors made without a device would land on "meta"
        grad_logits = _ChunkedMapper.backward(ctx, grad_out)[0]
    assert grad_logits.device.type == "cpu" and torch.equal(grad_logits, logits.grad)


def test_factored_bf16_mapper_takes_the_sigmoid_gradient_in_fp32():
    """A bf16 factored mapper computes p = sigmoid(logits) in fp32: the logit gradient is
    the fp64 one of the same bf16 values, dL/dlogits = (dL/dr W^T) p (1 - p), rounded once
    to bf16 (a bf16 sigmoid would round several times: errors of ~8% seen)."""
    torch.manual_seed(0)
    mapper = BinaryMapper(6, 16, kind="factored").to(torch.bfloat16)
    logits = (2 * torch.randn(4, 8, 6)).bfloat16().requires_grad_()
    grad_out = torch.randn(4, 8, 16).bfloat16()  # r is bf16: its gradient too
    r, _ = mapper(logits, torch.rand(4, 8, 6))
    (r.float() * grad_out.float()).sum().backward()
    p = torch.sigmoid(logits.detach().double())
    ref = (grad_out.double() @ mapper.weight.detach().double().T) * p * (1 - p)
    assert logits.grad.dtype == torch.bfloat16
    assert ((logits.grad.double() - ref).abs() <= 1e-2 * ref.abs()).all()
