"""The evaluation's measures beyond :func:`latent_diagnostics`: use of Z with its row
noise, the honest importance-weighted bound, and on the synthetic task the exact
Bayes floor and the validity interval of free generations.

``eval/floor_nats``: the Bayes-optimal per-token CE of the synthetic task's generator on
exactly the evaluated rows and tokens (:mod:`freetf.evaluation.synthetic_bayes`);
``eval/excess_nats``: the model's CE above it (Z from the posterior for a Free
Transformer, the plain CE for a baseline); ``eval/excess_iw_nats``: the honest bound
above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from freetf.config import Config
from freetf.evaluation.latent_use import latent_use


def is_synthetic(cfg: Config) -> bool:
    return cfg.data.dataset_name == "synthetic"


def task_measures(model, batches: Sequence[torch.Tensor], cfg: Config,
                  metrics: dict[str, Any]) -> dict[str, float]:
    """Measures of one evaluation (module docstring); ``metrics``: the diagnostics so far."""
    core = getattr(model, "module", model)
    d = cfg.diagnostics
    out: dict[str, float] = {}
    synthetic = is_synthetic(cfg)
    if core.config.has_latent and d.use_redraws > 0:
        kwargs: dict[str, Any] = {}
        if synthetic:
            from freetf.evaluation.synthetic_bayes import CLASS_NAMES, token_classes

            kwargs = {"token_classes": token_classes, "class_names": CLASS_NAMES}
        out.update(latent_use(model, batches, d.use_redraws, d.iw_prior_draws,
                              seed=cfg.training.seed + 29, **kwargs))
    if synthetic:
        from freetf.evaluation.synthetic_bayes import bayes_floor_nats

        rows = np.concatenate([torch.as_tensor(b).cpu().numpy() for b in batches])
        floor = bayes_floor_nats(rows)
        out["eval/floor_nats"] = floor
        ce = metrics.get("eval/ce_posterior_nats", metrics.get("eval/ce_prior_nats"))
        if ce is not None:
            out["eval/excess_nats"] = ce - floor
        if "eval/ce_iw_nats" in out:
            out["eval/excess_iw_nats"] = out["eval/ce_iw_nats"] - floor
    return out
