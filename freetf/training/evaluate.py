"""One evaluation of a model on its validation data: the latent diagnostics, bits per
byte, the use of Z, the honest bound, the exact floor (synthetic task), a per-run verdict,
and what free generations look like."""

from __future__ import annotations

import math
from typing import Any

import torch

from freetf.config import Config
from freetf.data.datasets import DataBundle
from freetf.data.stream import BatchStream
from freetf.evaluation.diagnostics import latent_diagnostics, verdict
from freetf.evaluation.measures import is_synthetic, task_measures
from freetf.evaluation.samples import sample_texts
from freetf.evaluation.synthetic_eval import free_generations, generation_stats
from freetf.model.transformer import FreeTransformer


def evaluate(model: FreeTransformer, data: DataBundle, cfg: Config, device: torch.device,
             free_bits_nats: float, samples: bool = False, generations: bool = False
             ) -> dict[str, Any]:
    """Validation diagnostics (CE with prior / posterior Z, KL, MI ...), the use of Z, the
    honest bound, the exact floor (synthetic task) and a per-trial verdict.

    ``samples`` (the final evaluation, on rank 0) adds decoded samples; ``generations``
    (every evaluation, on rank 0), on the synthetic task, what free generations look like
    (Z from the prior, ``diagnostics.free_generations`` of them; under a second on a CPU):
    ``eval/valid_rate`` with its Wilson interval, the target start's mean and spread and
    the noise rate (:func:`freetf.evaluation.synthetic_eval.generation_stats`).
    """
    val = BatchStream(data.val, min(cfg.training.batch_size, len(data.val)), seed=cfg.data.seed,
                      drop_last=True)
    batches = [next(val) for _ in range(min(cfg.training.eval_batches, val.steps_per_epoch))]
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(cfg.training.seed + 17)  # same eval noise each time
        result: dict[str, Any] = latent_diagnostics(model, batches, cfg, device)
        result.update(bits_per_byte(result, data.bytes_per_token))
        result.update(task_measures(model, batches, cfg, result))
        result["eval/verdict"] = verdict(result, cfg, free_bits_nats)
        if samples:
            result["eval/samples"] = sample_texts(model, data, cfg, device)
        draws = cfg.diagnostics.free_generations
        if (samples or generations) and is_synthetic(cfg) and draws:
            result.update(generation_stats(free_generations(model, draws,
                                                            seed=cfg.training.seed + 17)))
    return result


def bits_per_byte(metrics: dict[str, Any], bytes_per_token: float) -> dict[str, float]:
    """``eval/bpb_prior`` / ``eval/bpb_posterior``: CE per token in bits over the UTF-8
    bytes per token of the validation data, comparable across tokenizers."""
    return {f"eval/bpb_{z}": metrics[f"eval/ce_{z}_nats"] / math.log(2) / bytes_per_token
            for z in ("prior", "posterior") if f"eval/ce_{z}_nats" in metrics}
