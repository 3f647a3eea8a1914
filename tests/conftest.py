"""Shared fixtures: tiny configs, a tiny prepared code corpus and a deterministic torch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from freetf import load_config

# The console scripts the tests run (ray, mlflow, freetf) are this interpreter's, found
# beside it, whether or not its environment is activated.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                      os.environ.get("PATH", "")])

# Ray Train restarts a worker group that has not started within this many seconds (60 by
# default): under load (two CPU-bound processes beside the suite) a worker's torch import
# alone took longer, and the group restarted until the test's timeout.  Inherited by the
# local Ray clusters the tests start.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")

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


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray for one test module (never one another process runs here)."""
    import ray

    from freetf.training.ray_train import init_ray

    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    init_ray(num_cpus=2)
    try:
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def prepared_code_corpus(root: Path, files: int = 20, repeats: int = 30) -> Path:
    """``files`` small Python modules under ``root/corpus``, prepared by ``freetf prepare``
    (byte-level BPE of 300 tokens, 30% of the files held out) into ``root/data``."""
    from freetf.data.prepare import PrepareSpec, prepare

    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(files):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * repeats)
    data = root / "data"
    prepare(PrepareSpec((str(corpus),), "bpe", vocab_size=300, val_fraction=0.3), data,
            progress=False)
    return data


def record_fit_boundary(monkeypatch, result) -> list[tuple]:
    """Replace ``verdicts.fit_boundary`` by a stand-in recording each call's (kind, x, y,
    low, high, confidence, groups); ``result(kind, n, x, low, high, confidence)`` gives
    the n-th call's fit.  -> the list of calls, filled as they come."""
    from freetf.evaluation import verdicts

    calls: list[tuple] = []

    def fit(kind, x, y, low, high, confidence, groups):
        calls.append((kind, list(x), list(y), low, high, confidence, list(groups)))
        return result(kind, len(calls), x, low, high, confidence)

    monkeypatch.setattr(verdicts, "fit_boundary", fit)
    return calls
