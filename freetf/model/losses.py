"""The Free Transformer objective (§3.3, eqs. 4-5): pure functions.

Loss names follow the training guide: ``reconstruction`` (cross-entropy), ``kl`` (the
free-bits-hinged KL that enters the loss) and ``total``.  The RAW KL, before the hinge,
is always reported beside it: the hinged value reads 0 for a healthy and for a collapsed
model alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)
# Auto chunk size of the chunked cross-entropy: the fp32 logits of one chunk stay under
# this many bytes.  Smaller chunks re-read the (V, D) head weight once per chunk: at
# V = 32000, 131-token chunks (16 MiB) made the CPU loss 1.6x slower than plain, 1024-token
# chunks (128 MiB) as fast (bench/cross_entropy.py).
_CE_CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 128 * 2**20}


def kl_per_bit(z_logits: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(sigmoid(L)) || Bernoulli(1/2)) = log 2 - H_b(p), in nats.

    (B, T, H) -> (B, T, H).  Computed from logits for stability:
    H_b(p) = -p log p - (1-p) log(1-p) with log p = logsigmoid(L).
    """
    z_logits = z_logits.float()
    p = torch.sigmoid(z_logits)
    neg_entropy = p * F.logsigmoid(z_logits) + (1.0 - p) * F.logsigmoid(-z_logits)
    return LN2 + neg_entropy


def kl_per_token(z_logits: torch.Tensor) -> torch.Tensor:
    """KL(Q(Z_t | x) || uniform over 2^H codes), eq. 4, in nats.  (B, T, H) -> (B, T).

    Bits are independent under Q and under the prior, so the KL over the 2^H codes is
    the sum of the per-bit KLs: H log 2 + sum_z Q log Q = sum_h [log 2 - H_b(p_h)].
    """
    return kl_per_bit(z_logits).sum(-1)


def free_bits_kl(kl_tokens: torch.Tensor, free_bits_nats: float,
                 mask: torch.Tensor | None = None, per: str = "token") -> torch.Tensor:
    """Eq. 5: per-token hinge max(0, KL_t - kappa), THEN the mean over tokens.  -> scalar.

    ``per="sequence"`` (an ablation, not the paper's loss): each sequence's KL summed over
    its n_b scored tokens is hinged at n_b kappa, and the sum over sequences is divided by
    the scored tokens, so the two agree whenever no token exceeds kappa and the pooled
    hinge is never above the per-token one.  ``kl_tokens`` (B, T), ``mask`` (B, T) or None.
    """
    if per not in ("token", "sequence"):
        raise ValueError(f"free bits per {per!r}: expected 'token' or 'sequence'")
    mask = torch.ones_like(kl_tokens) if mask is None else mask.to(kl_tokens.dtype)
    tokens = mask.sum().clamp(min=1.0)
    if per == "token":
        return (torch.clamp(kl_tokens - free_bits_nats, min=0.0) * mask).sum() / tokens
    per_row = (kl_tokens * mask).sum(-1) - free_bits_nats * mask.sum(-1)  # (B,)
    return torch.clamp(per_row, min=0.0).sum() / tokens


@dataclass(frozen=True)
class HeadInputs:
    """Logits left unmaterialised: the final hidden states and the LM head's weight.

    ``compute_loss`` given these instead of a logits tensor runs the chunked linear +
    cross-entropy (``training.cross_entropy: chunked``): logits = hidden W^T exist one
    chunk of tokens at a time, so the (B, T, V) fp32 logits are never held in memory.
    """

    hidden: torch.Tensor  # (B, T, D)
    weight: torch.Tensor  # (V, D)
    chunk_tokens: int = 0  # tokens per chunk; 0 = sized from _CE_CHUNK_BYTES

    def __getitem__(self, index) -> HeadInputs:  # slice positions like a logits tensor
        return HeadInputs(self.hidden[index], self.weight, self.chunk_tokens)


def reconstruction_loss(logits: torch.Tensor | HeadInputs, targets: torch.Tensor,
                        ignore_index: int = -100) -> torch.Tensor:
    """Token cross-entropy in nats.  (B, T, V), (B, T) -> scalar (mean over kept tokens)."""
    if isinstance(logits, HeadInputs):
        return chunked_linear_cross_entropy(logits.hidden, logits.weight, targets,
                                            logits.chunk_tokens, ignore_index)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                 targets: torch.Tensor, chunk_tokens: int = 0,
                                 ignore_index: int = -100) -> torch.Tensor:
    """cross_entropy(hidden W^T, targets) without materialising the logits.

    (B, T, D), (V, D), (B, T) -> scalar, the mean over kept tokens, in nats.  Numerically
    the plain path's: each chunk's logits are computed in the autocast dtype (when autocast
    is on) and upcast to fp32 for the log-softmax.  The gradients are computed chunk by
    chunk during the forward pass (softmax - one-hot, then two matmuls) and scaled by the
    incoming gradient in backward, so peak memory holds one chunk of logits.
    """
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type)
                     if torch.is_autocast_enabled(device_type) else hidden.dtype)
    if chunk_tokens <= 0:
        budget = _CE_CHUNK_BYTES.get(device_type, _CE_CHUNK_BYTES["cpu"])
        chunk_tokens = max(1, budget // (4 * weight.shape[0]))
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                         targets.reshape(-1), chunk_tokens, ignore_index,
                                         compute_dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, ignore_index, compute_dtype):
        # hidden (N, D), weight (V, D), targets (N,)
        keep = targets != ignore_index  # (N,)
        count = keep.sum()
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32, or fp64
        w = weight.to(compute_dtype)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) \
            if want_w else None
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[lo:lo + chunk_tokens].to(compute_dtype)  # (n, D)
            logits = (h @ w.T).to(acc_dtype)  # (n, V), fp32 as in the plain path
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            tgt = targets[lo:lo + chunk_tokens]
            m = keep[lo:lo + chunk_tokens]
            safe = torch.where(m, tgt, 0)
            picked = logits.gather(1, safe[:, None]).squeeze(1)  # (n,)
            total += ((lse - picked) * m).sum()
            if want_h or want_w:
                # d(sum of kept CE)/d logits = softmax - one-hot, zero on ignored rows.
                g = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of logits
                g[torch.arange(len(safe), device=g.device), safe] -= 1.0
                g.mul_(m[:, None])
                g = g.to(compute_dtype)  # (n, V)
                if want_h:
                    grad_h[lo:lo + chunk_tokens] = (g @ w).to(hidden.dtype)
                if want_w:
                    grad_w += g.T @ h  # (V, D), summed over chunks in fp32
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        dh = (grad_h * scale).to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None


def compute_loss(logits: torch.Tensor, z_logits: torch.Tensor | None, targets: torch.Tensor,
                 kl_weight: float = 1.0, free_bits_nats: float = 0.0,
                 ignore_index: int = -100, free_bits_per: str = "token"
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """total = reconstruction + kl_weight * mean_t max(0, KL_t - kappa)
    (``free_bits_per="sequence"``: the pooled hinge of :func:`free_bits_kl`).

    ``targets`` are aligned with ``logits`` (already shifted by the caller); positions
    equal to ``ignore_index`` count neither in the cross-entropy nor in the KL.
    Returns ``(total, components)``; components are detached scalars except
    ``kl_per_bit_nats`` (H,).
    """
    recon = reconstruction_loss(logits, targets, ignore_index)
    parts = {"reconstruction": recon.detach()}
    if z_logits is None:
        parts["total"] = recon.detach()
        return recon, parts
    mask = targets != ignore_index  # (B, T)
    per_bit = kl_per_bit(z_logits)  # (B, T, H)
    kl_tokens = per_bit.sum(-1)  # (B, T)
    hinged = free_bits_kl(kl_tokens, free_bits_nats, mask, free_bits_per)
    total = recon + kl_weight * hinged
    denom = mask.sum().clamp(min=1)
    raw_nats = (kl_tokens.detach() * mask).sum() / denom
    parts.update(
        kl=hinged.detach(),
        kl_raw_nats=raw_nats,
        kl_raw_bits=raw_nats / LN2,
        kl_per_bit_nats=(per_bit.detach() * mask[..., None]).sum((0, 1)) / denom,
        total=total.detach(),
    )
    return total, parts
