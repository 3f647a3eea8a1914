"""The Free Transformer objective (§3.3, eqs. 4-5): pure functions.

Loss names follow the training guide: ``reconstruction`` (cross-entropy), ``kl`` (the
free-bits-hinged KL that enters the loss) and ``total``.  The RAW KL, before the hinge,
is always reported beside it: the hinged value reads 0 for a healthy and for a collapsed
model alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


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
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5: per-token hinge max(0, KL_t - kappa), THEN the mean over tokens.  -> scalar."""
    hinged = torch.clamp(kl_tokens - free_bits_nats, min=0.0)
    if mask is None:
        return hinged.mean()
    mask = mask.to(hinged.dtype)
    return (hinged * mask).sum() / mask.sum().clamp(min=1.0)


def reconstruction_loss(logits: torch.Tensor, targets: torch.Tensor,
                        ignore_index: int = -100) -> torch.Tensor:
    """Token cross-entropy in nats.  (B, T, V), (B, T) -> scalar (mean over kept tokens)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index)


def compute_loss(logits: torch.Tensor, z_logits: torch.Tensor | None, targets: torch.Tensor,
                 kl_weight: float = 1.0, free_bits_nats: float = 0.0,
                 ignore_index: int = -100) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """total = reconstruction + kl_weight * mean_t max(0, KL_t - kappa).

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
    hinged = free_bits_kl(kl_tokens, free_bits_nats, mask)
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
