"""Shared fixtures: tiny configs and a deterministic torch."""

from __future__ import annotations

import pytest
import torch

from freetf import load_config

TINY_MODEL = [
    "model.vocab_size=32", "model.hidden_dim=32", "model.num_layers=4", "model.num_heads=4",
    "model.num_kv_heads=2", "model.max_seq_len=66", "model.latent_dim=4",
]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture
def tiny_model_cfg():
    return load_config(overrides=TINY_MODEL).model
