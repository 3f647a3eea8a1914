"""The binary mapper and post-sampler of the Free Transformer (§3.4, eqs. 6-8).

The encoder emits H bit logits L_{t,h} per token.  Bits B_{t,h} ~ Bernoulli(sigmoid(L)),
the code is d = sum_h 2^h B_{t,h}, Y_t = one_hot(d) in R^{2^H}, and

    G_{t,d} = prod_h P(B_{t,h} = U_h(d))                                        (eq. 7)
    r_t = post_sampler(Y_t + G_t - sg(G_t)) = W[d] + b + (G_t - sg(G_t)) W      (eq. 8)

The forward value is the row W[d]; the gradient reaches the logits through the full
distribution G over all 2^H codes.  Three implementations:

- ``dense``: the reference, materialising G: O(N 2^H) activations.
- ``chunked`` (default): a custom autograd function that gathers W[d] forward and
  recomputes G chunk by chunk in backward: O(N D) activations, same gradients.
- ``factored`` (an explicit deviation for large H): the post-sampler is linear in the
  bits, r = W_f B + b.  Eq. 8 applied to such a post-sampler reduces exactly to
  r = W_f (B + p - sg(p)) + b with p = sigmoid(L), so the estimator stays the paper's, but
  the post-sampler is a restricted (H x D instead of 2^H x D) family.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def code_bits(num_bits: int, device: torch.device | None = None,
              start: int = 0, end: int | None = None) -> torch.Tensor:
    """U(d) for d in [start, end): binary digits, least significant first.  (C, H) float."""
    end = 2 ** num_bits if end is None else end
    codes = torch.arange(start, end, device=device)
    shifts = torch.arange(num_bits, device=device)
    return ((codes[:, None] >> shifts) & 1).float()


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """(..., H) {0,1} -> (...) int64 code index d = sum_h 2^h bits_h."""
    weights = 2 ** torch.arange(bits.shape[-1], device=bits.device, dtype=torch.int64)
    return (bits.to(torch.int64) * weights).sum(-1)


def codes_to_bits(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """(...) int64 -> (..., H) float bits, least significant first."""
    shifts = torch.arange(num_bits, device=codes.device)
    return ((codes[..., None] >> shifts) & 1).float()


def sample_bits(logits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """B_h ~ Bernoulli(sigmoid(L_h)) (eq. 6).  (..., H) -> (..., H) float {0, 1}."""
    if noise is None:
        noise = torch.rand_like(logits, dtype=torch.float32)
    return (noise < torch.sigmoid(logits.float())).float()


def code_log_probs(logits: torch.Tensor, bits_table: torch.Tensor,
                   log_p0: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """log G_{n,d} for the codes in ``bits_table`` (eq. 7).  (N, H), (C, H) -> (N, C).

    log G_d = sum_h [U_h log p_h + (1 - U_h) log(1 - p_h)] = sum_h log(1 - p_h) + L . U(d),
    since log p - log(1 - p) = L: one matmul instead of two.  ``log_p0`` (N, 1), the
    first term, may be passed in when the logits are reused over chunks; ``out`` is an
    (N, C) buffer to write into.
    """
    if log_p0 is None:
        log_p0 = F.logsigmoid(-logits).sum(-1, keepdim=True)  # (N, 1) log P(all bits 0)
    return torch.addmm(log_p0, logits, bits_table.T, out=out)


def dense_mapper(logits: torch.Tensor, bits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reference eq. 8: (Y + G - sg(G)) W with G materialised.  (N, H), (N, H), (2^H, D)."""
    num_bits = logits.shape[-1]
    dtype = _compute_dtype(logits)
    table = code_bits(num_bits, logits.device).to(dtype)  # (2^H, H)
    g = code_log_probs(logits.to(dtype), table).exp()  # (N, 2^H)
    y = F.one_hot(bits_to_codes(bits), 2 ** num_bits).to(dtype)  # (N, 2^H)
    return (y + g - g.detach()) @ weight.to(dtype)  # (N, D)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """At least fp32 (low-precision logits would make G underflow), fp64 kept: a float64
    module computes in float64 (the tests' reference precision), bf16/fp16 in float32."""
    return torch.promote_types(t.dtype, torch.float32)


class _ChunkedMapper(torch.autograd.Function):
    """Eq. 8 in O(N D) memory: gather forward, chunk-wise recomputed G backward.

    With s = dL/dr @ W^T (N, 2^H), dL/dL_h = sum_d s_d G_d (U_h(d) - p_h), and the weight
    gradient is the one-hot part only (the G - sg(G) coefficient is zero in value).
    """

    @staticmethod
    def forward(ctx, logits, codes, weight, chunk_size, score_dtype):  # noqa: D102
        ctx.save_for_backward(logits, codes, weight)
        ctx.chunk_size, ctx.score_dtype = chunk_size, score_dtype
        return weight[codes]  # (N, D)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        logits, codes, weight = ctx.saved_tensors
        with torch.autocast(logits.device.type, enabled=False):  # backward may run under it
            return _ChunkedMapper._backward(ctx, logits, codes, weight, grad_out)

    @staticmethod
    def _backward(ctx, logits, codes, weight, grad_out):
        dtype = _compute_dtype(logits)
        grad_out = grad_out.to(dtype)
        grad_logits = grad_weight = None
        if ctx.needs_input_grad[0]:
            num_bits, n = logits.shape[-1], logits.shape[0]
            num_codes = 2 ** num_bits
            size = chunk_codes(ctx.chunk_size, n, num_codes, logits.device)
            logits32 = logits.to(dtype)
            log_p0 = F.logsigmoid(-logits32).sum(-1, keepdim=True)  # (N, 1), once for all chunks
            acc_bits = torch.zeros_like(logits32)  # (N, H): sum_d s_d G_d U_h(d)
            acc_sum = torch.zeros_like(log_p0)  # (N, 1): sum_d s_d G_d
            # s = dL/dr W^T in fp32, or in the autocast dtype if asked (G stays fp32).
            score_dtype = ctx.score_dtype or dtype
            grad_scores = grad_out.to(score_dtype)
            # Two (N, C) buffers reused by every chunk: no allocation (and, on CPU, no
            # fresh page faults) per chunk.
            g = logits32.new_empty(n, size)
            s = logits32.new_empty(n, size, dtype=score_dtype)
            for start in range(0, num_codes, size):  # size divides 2^H
                end = start + size
                table = code_bits(num_bits, logits.device, start, end).to(dtype)  # (C, H)
                code_log_probs(logits32, table, log_p0, out=g).exp_()  # G_d, eq. 7
                torch.mm(grad_scores, weight[start:end].to(score_dtype).T, out=s)  # s_d
                g.mul_(s)  # s_d G_d
                acc_bits.addmm_(g, table)
                acc_sum.add_(g.sum(-1, keepdim=True))
            grad_logits = (acc_bits - torch.sigmoid(logits32) * acc_sum).to(logits.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = torch.zeros_like(weight, dtype=dtype)
            grad_weight.index_add_(0, codes, grad_out)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_logits, None, grad_weight, None, None


# Automatic chunk size: (bytes of one (N, C) fp32 temporary, most codes per chunk).  CPU:
# measured fastest here at 128-512 codes and <= 4 MiB per temporary (near cache sizes, and
# well under glibc's 32 MiB mmap ceiling, above which every allocation is mapped and
# page-faulted afresh).  CUDA: large chunks keep the GEMMs big; the caching allocator
# reuses the memory.
AUTO_CHUNK = {"cpu": (4 * 1024 ** 2, 512), "cuda": (256 * 1024 ** 2, 1 << 30)}


def chunk_codes(chunk_size: int, num_tokens: int, num_codes: int,
                device: torch.device) -> int:
    """Codes per backward chunk: ``chunk_size`` if positive, else from :data:`AUTO_CHUNK`.

    Always a power of two (at least 64, at most 2^H), so chunks tile the 2^H codes.
    """
    if chunk_size <= 0:
        budget, most = AUTO_CHUNK.get(device.type, AUTO_CHUNK["cuda"])
        chunk_size = max(64, min(most, budget // (4 * max(num_tokens, 1))))
    return min(1 << (chunk_size.bit_length() - 1), num_codes)


def chunked_mapper(logits: torch.Tensor, codes: torch.Tensor, weight: torch.Tensor,
                   chunk_size: int = 0, score_dtype: torch.dtype | None = None
                   ) -> torch.Tensor:
    """Memory-efficient exact eq. 8.  (N, H), (N,), (2^H, D) -> (N, D).

    ``chunk_size``: codes per backward chunk (rounded down to a power of two); 0 sizes
    chunks by bytes (:func:`chunk_codes`).  ``score_dtype``: dtype of the backward's
    s = dL/dr W^T products (None: fp32, exact); G and the sums are always fp32.
    """
    return _ChunkedMapper.apply(logits, codes, weight, chunk_size, score_dtype)


class BinaryMapper(nn.Module):
    """Binary mapper + post-sampler: bit logits -> code -> D-dim injection r (§3.4)."""

    def __init__(self, num_bits: int, dim: int, kind: str = "exact", impl: str = "chunked",
                 chunk_size: int = 0, score_precision: str = "fp32", init: str = "normal",
                 init_std: float = 0.02) -> None:
        super().__init__()
        for name, value, known in (("kind", kind, ("exact", "factored")),
                                   ("impl", impl, ("chunked", "dense")),
                                   ("score_precision", score_precision, ("fp32", "autocast"))):
            if value not in known:
                raise ValueError(f"unknown mapper {name} {value!r}; known: {', '.join(known)}")
        self.num_bits, self.kind, self.impl, self.chunk_size = num_bits, kind, impl, chunk_size
        self.score_precision = score_precision  # "fp32" or "autocast" (chunked backward)
        rows = 2 ** num_bits if kind == "exact" else num_bits
        self.weight = nn.Parameter(torch.empty(rows, dim))  # (2^H or H, D)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.reset_weight(init, init_std)

    @torch.no_grad()
    def reset_weight(self, init: str = "normal", std: float = 0.02) -> None:
        """Initialise the post-sampler (``model.post_sampler_init``).

        ``normal``: i.i.d. N(0, std^2) entries (each of the H factored rows at std/sqrt(H)).
        ``zero``: all rows 0, so Z has no effect until a sampled row is trained.
        ``bits`` (exact mapper): the table starts inside the factored family,
        W[d] = sum_h (2 U_h(d) - 1) V_h with V_h ~ N(0, std^2 / H), so each entry is still
        N(0, std^2) but every bit has one direction shared by all 2^H rows; the rows then
        train freely.  For the factored mapper it is the same as ``normal``.
        """
        if init == "zero":
            self.weight.zero_()
        elif init == "bits" and self.kind == "exact":
            directions = torch.randn(self.num_bits, self.weight.shape[1],
                                     device=self.weight.device) * (std / math.sqrt(self.num_bits))
            signs = code_bits(self.num_bits, self.weight.device) * 2 - 1  # (2^H, H)
            self.weight.copy_(signs @ directions)
        elif init in ("normal", "bits"):
            nn.init.normal_(self.weight, std=std if self.kind == "exact"
                            else std / math.sqrt(self.num_bits))
        else:
            raise ValueError(f"unknown post-sampler init {init!r}; known: normal, zero, bits")

    def forward(self, logits: torch.Tensor, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample Z from the posterior.  (B, T, H) -> r (B, T, D), codes (B, T)."""
        bits = sample_bits(logits, noise)  # (B, T, H)
        codes = bits_to_codes(bits)  # (B, T)
        flat = logits.reshape(-1, self.num_bits)  # (N, H)
        device_type = logits.device.type
        score_dtype = (torch.get_autocast_dtype(device_type)
                       if self.score_precision == "autocast"
                       and torch.is_autocast_enabled(device_type) else None)
        # G is a product of H probabilities: computed in fp32 even under autocast.
        with torch.autocast(device_type, enabled=False):
            if self.kind == "factored":
                dtype = torch.promote_types(_compute_dtype(flat), self.weight.dtype)
                p = torch.sigmoid(flat.to(dtype))  # (N, H)
                r = (bits.reshape(-1, self.num_bits).to(dtype) + p - p.detach()) \
                    @ self.weight.to(dtype)  # (N, D)
            elif self.impl == "dense":
                r = dense_mapper(flat, bits.reshape(-1, self.num_bits), self.weight)
            else:
                r = chunked_mapper(flat, codes.reshape(-1), self.weight, self.chunk_size,
                                   score_dtype)
            r = r.to(self.bias.dtype) + self.bias
        return r.reshape(*logits.shape[:-1], -1), codes

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Post-sampler of given codes (no gradient path to logits).  (B, T) -> (B, T, D)."""
        if self.kind == "factored":
            bits = codes_to_bits(codes, self.num_bits).to(self.weight.dtype)  # (B, T, H)
            return bits @ self.weight + self.bias
        return self.weight[codes] + self.bias

    def sample_prior(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Codes from the uniform prior over 2^H values.  -> (shape) int64."""
        if self.num_bits >= 63:
            raise ValueError("latent_dim must be < 63 to index codes as int64")
        return torch.randint(0, 2 ** self.num_bits, shape, device=device)
