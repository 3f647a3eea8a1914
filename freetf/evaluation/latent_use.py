"""Does the decoder use Z, and what does free generation cost?  Per-token measurements
with their own noise.

Both questions are asked of one model, on held-out rows, in the next-token setup of
training (logits[:, :-1] against ids[:, 1:]):

- **use** (``eval/use_nats``): the CE with Z taken from *another* row's posterior minus
  the CE with the row's own posterior Z, per scored token.  Z drawn for another row keeps
  the marginal of Z (so biases the decoder reads from any Z cancel) and breaks its link
  to the row: a decoder that ignores Z gains 0, one that reads the row's information from
  Z gains the CE it saves.  ``redraws`` posterior draws per row average the bit noise.
- **honest likelihood** (``eval/ce_iw_nats``): the importance-weighted bound with
  ``prior_draws`` = K draws of Z from the uniform prior,

      -log p(x) <= -log (1/K) sum_k p(x | z_k),    z_k ~ prior,

  per row, divided by the row's scored tokens: an upper bound on the CE of the model as
  a generative model (Z from the prior), tight as K grows, and below the single-draw
  honest CE (``eval/ce_prior_nats``, which pays Jensen's gap: E log p(x|z) <= log E p(x|z)).

Noise comes from the quantities' own sources: the per-row values (already averaged over
the Z draws) are resampled with a row bootstrap (``boot`` resamples) for a
``confidence`` interval (``*_low`` / ``*_high``).  With ``token_classes`` (the synthetic
task: :func:`freetf.evaluation.synthetic_bayes.token_classes`), the use is also split by
the class of the scored token (``eval/use_<class>_nats``): what Z encodes.

Pure torch and numpy: no Ray, MLflow or torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL per scored token.  logits (B, T, V), ids (B, T) -> (B, T-1) float64."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                           reduction="none").double()


def row_interval(values: np.ndarray, weights: np.ndarray | None = None, boot: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Ratio estimate sum(values) / sum(weights) over rows, with a row-bootstrap
    percentile interval.  values, weights (N,) -> (estimate, low, high); NaN if no weight.

    ``weights`` are the rows' token counts (default 1 each): a per-token mean over rows
    that hold different numbers of tokens (e.g. one class of tokens).
    """
    values = np.asarray(values, float)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, float)
    if weights.sum() <= 0:
        return math.nan, math.nan, math.nan
    estimate = float(values.sum() / weights.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(boot, len(values)))  # (boot, N)
    num, den = values[idx].sum(1), weights[idx].sum(1)
    stats = num[den > 0] / den[den > 0]
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return estimate, float(low), float(high)


@torch.no_grad()
def latent_use(model: nn.Module, batches: Sequence[torch.Tensor], redraws: int = 2,
               prior_draws: int = 4, token_classes: Callable[[np.ndarray], np.ndarray]
               | None = None, class_names: Sequence[str] = (), boot: int = 1000,
               confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Use of Z and the honest likelihood bound (module docstring) on ``batches`` (B, T).

    Needs a model with a latent and batches of >= 2 rows (a row takes another row's Z).
    Returns ``eval/use_nats`` (+ ``_low`` / ``_high``), ``eval/ce_iw_nats`` (+ interval),
    ``eval/use_<class>_nats`` (+ interval) per class name, and ``eval/use_rows``.
    Every module is put in eval mode for the measurement and restored after.
    """
    core = getattr(model, "module", model)
    if not core.config.has_latent:
        raise ValueError("latent_use needs a model with a latent (model.latent_dim > 0)")
    if redraws < 1 or prior_draws < 1:
        raise ValueError(f"redraws={redraws} and prior_draws={prior_draws} must be >= 1")
    device = next(core.parameters()).device
    codes_n = 2 ** core.config.latent_dim
    gen = torch.Generator(device="cpu").manual_seed(seed)
    modes = {m: m.training for m in core.modules()}
    core.eval()
    gains, iw, rows, classes = [], [], [], []
    try:
        for ids in batches:
            ids = torch.as_tensor(ids, device=device).long()  # (B, T)
            b, t = ids.shape
            if b < 2:
                raise ValueError("latent_use needs batches of >= 2 rows")
            gain = torch.zeros(b, t - 1, dtype=torch.float64, device=device)
            for _ in range(redraws):
                noise = torch.rand(b, t, core.config.latent_dim, generator=gen).to(device)
                logits, _, codes = core.forward_codes(ids, sample="posterior", bit_noise=noise)
                own = token_nll(logits, ids)  # (B, T-1)
                other = token_nll(core(ids, z=codes.roll(1, dims=0))[0], ids)  # a derangement
                gain += (other - own) / redraws
            log_p = torch.stack([  # (K, B): log p(x | z_k) over the scored tokens
                -token_nll(core(ids, z=torch.randint(0, codes_n, (b, t), generator=gen)
                                .to(device))[0], ids).sum(1)
                for _ in range(prior_draws)])
            bound = -(torch.logsumexp(log_p, 0) - math.log(prior_draws))  # (B,) -log p(x)
            gains.append(gain.cpu().numpy())
            iw.append(bound.cpu().numpy())
            rows.append(ids.cpu().numpy())
    finally:
        for m, was_training in modes.items():
            m.training = was_training
    if not gains:
        raise ValueError("latent_use got no batches")
    gain = np.concatenate(gains)  # (N, T-1)
    per_row_tokens = np.full(len(gain), gain.shape[1], float)
    out: dict[str, float] = {"eval/use_rows": float(len(gain))}
    _put(out, "eval/use_nats", row_interval(gain.sum(1), per_row_tokens, boot, confidence,
                                             seed))
    _put(out, "eval/ce_iw_nats", row_interval(np.concatenate(iw), per_row_tokens, boot,
                                               confidence, seed))
    if token_classes is not None:
        classes = token_classes(np.concatenate(rows))  # (N, T-1)
        for c, name in enumerate(class_names):
            mask = classes == c
            _put(out, f"eval/use_{name}_nats",
                 row_interval((gain * mask).sum(1), mask.sum(1), boot, confidence, seed))
    return out


def _put(out: dict[str, float], key: str, interval: tuple[float, float, float]) -> None:
    stem = key.removesuffix("_nats")
    out[key], out[f"{stem}_low_nats"], out[f"{stem}_high_nats"] = interval


def wilson_interval(successes: int, trials: int, confidence: float = 0.95
                    ) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (NaN, NaN with no trials)."""
    if trials <= 0:
        return math.nan, math.nan
    from scipy import stats

    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials ** 2)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)
