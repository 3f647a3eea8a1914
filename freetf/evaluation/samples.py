"""Evaluation helpers: the guide's perplexity interface and decoded generation samples.

The latent diagnostics (CE with Z from the prior / posterior, KL, MI, verdict) live in
``freetf.evaluation.diagnostics``; this module holds what a user calls directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from freetf.config import Config
from freetf.data.datasets import DataBundle
from freetf.model.transformer import FreeTransformer


@torch.no_grad()
def calculate_perplexity(model: FreeTransformer, dataloader: Iterable,
                         z_source: str = "prior") -> torch.Tensor:
    """Token perplexity over ``dataloader`` (the training guide's interface).

    ``z_source="prior"`` samples Z from the uniform prior: the honest number, what free
    generation achieves.  ``"posterior"`` lets the encoder see the sequence (the guide's
    ``mode='training'`` call): an ELBO-side number that flatters a leaking model.
    Batches are (B, T) id tensors or dicts with ``input_ids``.
    """
    if z_source not in ("prior", "posterior"):
        raise ValueError(f"z_source must be 'prior' or 'posterior', got {z_source!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for batch in dataloader:
        ids = (batch["input_ids"] if isinstance(batch, dict) else batch).to(device)
        mode = "training" if z_source == "posterior" else "inference"
        logits, _ = model(ids, mode=mode)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                               ids[:, 1:].reshape(-1), reduction="sum")
        total_loss += loss.item()
        total_tokens += ids[:, 1:].numel()
    model.train(was_training)
    return torch.tensor(math.exp(total_loss / max(total_tokens, 1)))


@torch.no_grad()
def sample_texts(model: FreeTransformer, data: DataBundle, cfg: Config,
                 device: torch.device, num: int = 4, temperature: float = 1.0) -> list[str]:
    """Decoded generations from prompts of the validation set (synthetic: "<letter>>")."""
    was_training = model.training
    model.eval()
    prompt_len = 2 if cfg.data.dataset_name == "synthetic" else min(16, cfg.data.max_seq_len // 4)
    rows = torch.stack([data.val[i] for i in range(min(num, len(data.val)))])
    prompts = rows[:, :prompt_len].to(device)
    out = model.generate(prompts, cfg.data.max_seq_len - prompt_len, temperature=temperature)
    model.train(was_training)
    return [data.tokenizer.decode(row.tolist()) for row in out.cpu()]
