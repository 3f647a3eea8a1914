"""Latent diagnostics for the Free Transformer: is Z collapsed, in use, or leaking?

The paper (Fleuret 2025, §3.3) bounds the information in Z with the free-bits KL
(eqs. 4-5).  Two failure regimes bracket the useful range of ``kl_weight`` / kappa:

- posterior collapse: KL -> 0, every bit's posterior ~ 1/2, and the decoder reaches the
  same cross-entropy with Z from the prior as with Z from the encoder: Z is ignored;
- leak ("cheating"): KL far above kappa, or CE(posterior Z) far below CE(prior Z): the
  decoder relies on information that the uniform prior cannot supply, so free
  generation (Z from the prior) degrades.

``latent_diagnostics`` measures, on held-out rows and in the next-token setup of
training (logits[:, :-1] against ids[:, 1:]; KL over the same positions):

- raw KL per token (nats, bits) and per bit (eq. 4), and the number of active bits;
- an aggregate-posterior mutual information estimate (see ``latent_diagnostics``);
- the entropy and perplexity of the aggregate posterior over the 2^H codes, and the
  count of distinct posterior codes actually sampled;
- CE with Z from the prior, from the posterior, and from the posterior of another row
  of the batch (shuffled), and their gap.

``verdict`` maps those numbers to ``collapsed`` / ``used`` / ``leaking`` (or
``baseline``) with the thresholds of ``cfg.diagnostics``.

Pure torch: no Ray, MLflow or torch.distributed.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from freetf.config import Config
from freetf.model.losses import LN2, kl_per_bit
from freetf.model.mapper import bits_to_codes, code_bits, code_log_probs, sample_bits

logger = logging.getLogger(__name__)

VERDICTS = ("collapsed", "used", "leaking", "baseline")  # "active": the old word for used
# Floor of the free-bits budget in the leak test, so that kappa = 0 does not make the
# KL threshold exactly 0 (any positive KL would then read as a leak).
MIN_FREE_BITS_NATS = 1e-6
# Codes are counted with a dense bincount of 2^H bins up to this many bits, above it
# with a dictionary of the codes seen.
MAX_BINCOUNT_BITS = 20
# The aggregate posterior over all 2^H codes is summed exactly up to this many bits
# (the exact mapper's limit), and not reported above it.
MAX_AGGREGATE_BITS = 20


def latent_diagnostics(model: nn.Module, batches: Iterable[torch.Tensor], cfg: Config,
                       device: torch.device | str | None = None) -> dict[str, float]:
    """Diagnose the latent Z of ``model`` on ``batches`` of token rows (B, T), T >= 2.

    Runs under ``torch.no_grad()`` with every module in eval mode (dropout off); each
    module's train/eval flag is restored afterwards.  All averages are token-weighted
    over the next-token positions (B * (T - 1) per batch).

    Returned keys (floats):

    - ``eval/kl_nats``, ``eval/kl_bits``: raw KL(Q(Z_t | x) || uniform) per token, eq. 4,
      before any free-bits hinge; ``eval/kl_bit_<h>_nats``: its share from bit h.
    - ``eval/active_bits``: bits with KL_h > ``cfg.diagnostics.active_bit_threshold_nats``.
    - ``eval/mutual_info_nats``: I(X; Z) ~= E_t[KL(q_t || p)] - KL(q_bar || p), with q_bar
      the aggregate posterior over the evaluated tokens.  Bits are independent under each
      q_t but not under q_bar, and the joint q_bar has 2^H entries, so KL(q_bar || p) is
      replaced by the factorised sum_h KL(q_bar_h || 1/2) with q_bar_h = mean_t p_{t,h}:

          MI = mean_t sum_h KL(q_{t,h} || 1/2) - sum_h KL(q_bar_h || 1/2)
             = sum_h I(X; B_h),

      the sum of the per-bit mutual informations.  Since H(q_bar) <= sum_h H(q_bar_h),
      KL(q_bar || p) >= sum_h KL(q_bar_h || 1/2), so this is an UPPER bound on the
      aggregate-posterior I(X; Z), exact when the bits are also independent under
      q_bar.  Each per-bit term is >= 0 (Jensen) and clamped at 0 against rounding.
      A bit with a confident posterior that does not depend on x (KL_h ~ log 2) adds
      KL but no MI.  Like any plug-in estimate over N tokens it is biased upwards for
      small N (it can reach log N for a bijective code).
    - ``eval/code_entropy_nats``: the entropy H(q_bar) of the aggregate posterior
      q_bar(d) = mean_t Q(Z_t = d | x) = mean_t prod_h P(B_{t,h} = U_h(d)) (eq. 7),
      summed exactly over all 2^H codes (for H <= ``MAX_AGGREGATE_BITS``; absent
      above); ``eval/code_perplexity`` = exp(code_entropy_nats): the effective number of
      codes the encoder spreads its mass over, from 1 (one code for every token) to
      2^H (q_bar uniform).  q_bar is uniform for a collapsed posterior and for a
      healthy one alike: read it with ``eval/mutual_info_nats`` (the exact
      aggregate-posterior I(X; Z) is kl_nats - (H log 2 - code_entropy_nats)).  It is
      computed from the posterior probabilities, not from sampled codes, so it is not
      bounded by the number of evaluated tokens.
    - ``eval/code_usage``: the number of distinct posterior codes sampled at the
      evaluated positions (at most their number).
    - ``eval/ce_prior_nats``, ``eval/ppl_prior``: Z from the uniform prior (inference mode,
      the paper's generation setting); ``eval/ce_posterior_nats``, ``eval/ppl_posterior``:
      Z sampled from the encoder (training mode); ``eval/ce_shuffled_nats``: the same
      posterior codes rolled by one row along the batch, so each row is conditioned on
      another row's codes (NaN when no batch has two rows); ``eval/ce_gap_nats`` =
      ce_prior - ce_posterior.

    For the baseline (``latent_dim == 0``) only ``eval/ce_prior_nats`` / ``eval/ppl_prior``
    (the plain CE and perplexity) and ``eval/kl_nats = eval/kl_bits = 0`` are returned.
    """
    core = getattr(model, "module", model)  # unwrap DistributedDataParallel
    num_bits = core.config.latent_dim
    if device is None:
        device = next(core.parameters()).device
    modes = {m: m.training for m in core.modules()}
    core.eval()
    try:
        with torch.no_grad():
            acc = _Accumulator(num_bits, device)
            for ids in batches:
                ids = torch.as_tensor(ids, device=device).long()
                if ids.dim() != 2 or ids.shape[1] < 2:
                    raise ValueError(f"batches must be (B, T) with T >= 2, got "
                                     f"{tuple(ids.shape)}")
                _evaluate_batch(core, ids, acc)
    finally:
        for m, was_training in modes.items():
            m.training = was_training
    if acc.tokens == 0:
        raise ValueError("latent_diagnostics got no batches")
    metrics = acc.metrics(cfg.diagnostics.active_bit_threshold_nats)
    logger.debug("latent diagnostics over %d tokens: %s", acc.tokens, metrics)
    return metrics


def verdict(metrics: dict[str, float], cfg: Config,
            free_bits_nats: float | None = None) -> str:
    """Classify a run from ``latent_diagnostics`` output (§3.3's two failure regimes).

    With d = ``cfg.diagnostics``, KL = ``eval/kl_nats``, gap = ``eval/ce_gap_nats`` and
    kappa = ``free_bits_nats`` (default ``cfg.training.free_bits_nats``; pass the
    scheduled value when a free-bits schedule is in use), checked in this order:

    - ``baseline``: no posterior CE in ``metrics`` (a ``latent_dim = 0`` model);
    - ``collapsed``: KL < d.collapsed_kl_nats AND |gap| < d.collapsed_gap_nats
      (Z carries nothing and the decoder does not care which Z it gets);
    - ``leaking``: KL > d.leak_kl_factor * max(kappa, MIN_FREE_BITS_NATS) OR
      gap > d.leak_gap_nats (Z carries far more than the budget, or the posterior Z
      buys a CE the prior cannot);
    - ``used`` otherwise.

    All comparisons are strict: a value exactly on a threshold is not collapsed and not
    leaking.  A negative gap (prior Z better than posterior Z) is never a leak.  With
    kappa = 0 the KL test fires for any KL above 2e-6 nats that is not a collapse.
    Raises ``ValueError`` when KL or gap is missing or not finite.
    """
    if "eval/ce_posterior_nats" not in metrics:
        return "baseline"
    d = cfg.diagnostics
    kappa = cfg.training.free_bits_nats if free_bits_nats is None else free_bits_nats
    try:
        kl, gap = float(metrics["eval/kl_nats"]), float(metrics["eval/ce_gap_nats"])
    except KeyError as err:
        raise ValueError(f"verdict needs {err.args[0]!r} in metrics") from None
    if not (math.isfinite(kl) and math.isfinite(gap)):
        raise ValueError(f"verdict needs finite metrics, got eval/kl_nats={kl}, "
                         f"eval/ce_gap_nats={gap}")
    if kl < d.collapsed_kl_nats and abs(gap) < d.collapsed_gap_nats:
        return "collapsed"
    if kl > d.leak_kl_factor * max(kappa, MIN_FREE_BITS_NATS) or gap > d.leak_gap_nats:
        return "leaking"
    return "used"


# ----------------------------------------------------------------------------- internals


class _Accumulator:
    """Token-weighted sums over batches (float64 on ``device``; codes counted)."""

    def __init__(self, num_bits: int, device: torch.device | str) -> None:
        self.num_bits = num_bits
        self.tokens = 0
        self.shuffled_tokens = 0
        self.warned_single_row = False
        self.ce_sum = {"prior": 0.0, "posterior": 0.0, "shuffled": 0.0}
        f64 = dict(dtype=torch.float64, device=device)
        self.kl_bit_sum = torch.zeros(num_bits, **f64)  # (H,) sum_t KL_{t,h}
        self.p_sum = torch.zeros(num_bits, **f64)  # (H,) sum_t p_{t,h}
        dense = 0 < num_bits <= MAX_BINCOUNT_BITS
        self.code_counts = torch.zeros(2 ** num_bits if dense else 0, dtype=torch.int64,
                                       device=device)
        self.code_counter: Counter[int] = Counter()
        exact = 0 < num_bits <= MAX_AGGREGATE_BITS
        self.q_sum = torch.zeros(2 ** num_bits if exact else 0, **f64)  # (2^H,) sum_t Q_t(d)

    def add_posterior(self, z_logits: torch.Tensor) -> None:
        """z_logits (N, H): add sum_t Q(Z_t = d | x) for every code d (eq. 7).

        Q factorises over the bits, so with d = lo + 2^h1 hi (h1 = H // 2 low bits)
        sum_t Q_t(d) = sum_t Q_t^lo(lo) Q_t^hi(hi): one (2^h2, N) x (N, 2^h1) matmul.
        """
        if not self.q_sum.numel():
            return
        logits = z_logits.double()
        low = self.num_bits // 2
        q_lo, q_hi = (code_log_probs(part, code_bits(part.shape[-1], logits.device).double()
                                     ).exp()  # (N, 2^h)
                      for part in (logits[:, :low], logits[:, low:]))
        self.q_sum += (q_hi.T @ q_lo).reshape(-1)  # (2^h2, 2^h1) -> (2^H,), index hi 2^h1 + lo

    def add_codes(self, codes: torch.Tensor) -> None:
        """codes (N,) int64."""
        if self.num_bits <= MAX_BINCOUNT_BITS:
            self.code_counts += torch.bincount(codes, minlength=2 ** self.num_bits)
        else:
            values, counts = torch.unique(codes, return_counts=True)
            self.code_counter.update(dict(zip(values.tolist(), counts.tolist(), strict=True)))

    def metrics(self, active_threshold_nats: float) -> dict[str, float]:
        out = {"eval/ce_prior_nats": self.ce_sum["prior"] / self.tokens}
        out["eval/ppl_prior"] = _exp(out["eval/ce_prior_nats"])
        if self.num_bits == 0:
            out.update({"eval/kl_nats": 0.0, "eval/kl_bits": 0.0})
            return out
        kl_bit = self.kl_bit_sum / self.tokens  # (H,) mean_t KL_{t,h}
        q_bar = self.p_sum / self.tokens  # (H,) aggregate posterior per bit
        kl_bar = LN2 + torch.special.xlogy(q_bar, q_bar) + torch.special.xlogy(
            1.0 - q_bar, 1.0 - q_bar)  # (H,) KL(q_bar_h || 1/2)
        kl_nats = kl_bit.sum().item()
        out.update({"eval/kl_nats": kl_nats, "eval/kl_bits": kl_nats / LN2})
        out.update({f"eval/kl_bit_{h}_nats": v for h, v in enumerate(kl_bit.tolist())})
        out["eval/active_bits"] = float((kl_bit > active_threshold_nats).sum().item())
        out["eval/mutual_info_nats"] = (kl_bit - kl_bar).clamp(min=0.0).sum().item()
        if self.num_bits <= MAX_BINCOUNT_BITS:
            counts = self.code_counts[self.code_counts > 0].double()  # (codes used,)
        else:
            counts = torch.tensor(list(self.code_counter.values()), dtype=torch.float64)
        out["eval/code_usage"] = float(counts.numel())
        if self.q_sum.numel():
            q_bar = self.q_sum / self.q_sum.sum()  # (2^H,) aggregate posterior
            entropy = -torch.special.xlogy(q_bar, q_bar).sum().item()
            out["eval/code_entropy_nats"] = entropy
            out["eval/code_perplexity"] = _exp(entropy)
        out["eval/ce_posterior_nats"] = self.ce_sum["posterior"] / self.tokens
        out["eval/ppl_posterior"] = _exp(out["eval/ce_posterior_nats"])
        out["eval/ce_shuffled_nats"] = (self.ce_sum["shuffled"] / self.shuffled_tokens
                                   if self.shuffled_tokens else math.nan)
        out["eval/ce_gap_nats"] = out["eval/ce_prior_nats"] - out["eval/ce_posterior_nats"]
        return out


def _evaluate_batch(model: nn.Module, ids: torch.Tensor, acc: _Accumulator) -> None:
    """Add one batch ids (B, T) to ``acc``: three passes (prior, posterior, shuffled)."""
    b, t = ids.shape
    targets = ids[:, 1:]  # (B, T-1)
    n = b * (t - 1)
    acc.tokens += n
    logits, _ = model(ids, mode="inference")  # Z from the uniform prior
    acc.ce_sum["prior"] += _ce_sum(logits, targets)
    if acc.num_bits == 0:
        return
    noise = torch.rand(b, t, acc.num_bits, device=ids.device)  # (B, T, H)
    logits, z_logits = model(ids, mode="training", bit_noise=noise)  # Z from the encoder
    acc.ce_sum["posterior"] += _ce_sum(logits, targets)
    z_logits = z_logits.float()
    acc.kl_bit_sum += kl_per_bit(z_logits[:, :-1]).sum((0, 1)).double()
    acc.p_sum += torch.sigmoid(z_logits[:, :-1]).sum((0, 1)).double()
    acc.add_posterior(z_logits[:, :-1].reshape(-1, acc.num_bits))
    # The codes the mapper used: it samples bit = noise < sigmoid(logit) (eq. 6).
    codes = bits_to_codes(sample_bits(z_logits, noise))  # (B, T)
    acc.add_codes(codes[:, :-1].reshape(-1))
    if b < 2:
        if not acc.warned_single_row:
            logger.warning("a batch has one row: no other row to take codes from; "
                           "eval/ce_shuffled_nats skips such batches")
            acc.warned_single_row = True
        return
    # A cyclic roll is a derangement: no row keeps its own codes.
    logits, _ = model(ids, z=codes.roll(1, dims=0))
    acc.ce_sum["shuffled"] += _ce_sum(logits, targets)
    acc.shuffled_tokens += n


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed next-token CE in nats.  logits (B, T, V), targets (B, T-1) -> float."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           targets.reshape(-1), reduction="sum").item()


def _exp(x: float) -> float:
    """exp that saturates to inf instead of raising OverflowError."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
