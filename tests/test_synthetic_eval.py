"""Figure 4 protocol: reading sequences, group statistics, the pipeline on a tiny model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from freetf import load_config
from freetf.data.datasets import CharTokenizer, synthetic_sequences
from freetf.evaluation.synthetic_eval import (
    figure4_metrics,
    free_generation_validity,
    group_stats,
    read_sequence,
    render_groups,
)
from freetf.training.loop import train_loop

pytestmark = pytest.mark.timeout(180)
BODY = "_" * 64


def put(text: str, at: int) -> str:
    return BODY[:at] + text + BODY[at + len(text):]


def test_read_sequence_cases():
    assert read_sequence("K>" + put("KKKKKKKK", 5)).target_start == 5
    assert read_sequence("K>" + put("K!KKKKKK", 5)).valid  # noise on the target is fine
    assert not read_sequence("K>" + put("KKKKKKKKK", 5)).valid  # 9 in a row
    assert not read_sequence("K>" + put("KKKKKKKA", 5)).valid  # wrong letter
    assert not read_sequence("K>" + put("KKKK", 5)[:30] + put("KKKK", 40)[30:]).valid
    assert not read_sequence("K>" + BODY[:-1]).valid  # short
    assert read_sequence("K>" + put("!", 3)).noise == frozenset({3})


def test_group_stats_on_constructed_groups():
    same = ["K>" + put("!KKKKKKKK", 10)] * 4
    stats = group_stats(same)
    assert stats.position_spread == 0 and stats.noise_overlap == 1 and stats.valid_rate == 1
    spread = ["K>" + put("KKKKKKKK", at) for at in (0, 10, 20, 30)]
    assert group_stats(spread).position_spread == pytest.approx(11.18, abs=0.01)


def test_data_itself_is_valid_with_independent_noise():
    tok = CharTokenizer()
    rows = [tok.decode(r) for r in synthetic_sequences(400, 3)]
    stats = group_stats(rows)
    assert stats.valid_rate == 1.0
    assert stats.noise_overlap < 0.1  # independent noise barely overlaps


class ScriptedModel(torch.nn.Module):
    """Generates the rows it is given: every other one valid for its prompt's letter."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(latent_dim=latent_dim, has_latent=latent_dim > 0)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def generate(self, prompt, max_new_tokens, temperature=1.0, z=None):
        self.calls.append((prompt.clone(), z))
        tok = CharTokenizer()
        rows = []
        for i, ids in enumerate(prompt.tolist()):
            letter = tok.decode(ids)[0]
            rows.append(tok.encode(f"{letter}>" + put(letter * (8 if i % 2 else 9), 3)))
        assert len(rows[0]) == prompt.shape[1] + max_new_tokens
        return torch.tensor(rows)


@pytest.mark.parametrize("latent_dim", [3, 0])
def test_free_generation_validity_reads_prior_generations(latent_dim):
    model = ScriptedModel(latent_dim)
    assert free_generation_validity(model, 10, seed=1) == 0.5
    (prompt, z), = model.calls
    letters = {CharTokenizer().decode(p)[0] for p in prompt.tolist()}
    assert len(letters) > 3 and prompt.shape == (10, 2)  # each its own prompt
    if latent_dim:  # Z from the uniform prior at every position, prompt included
        assert z.shape == (10, 66) and 0 <= int(z.min()) and int(z.max()) < 2 ** latent_dim
        assert len(set(z.flatten().tolist())) == 2 ** latent_dim
    else:
        assert z is None
    assert model.training  # mode restored


def test_pipeline_on_a_tiny_trained_model(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"checkpoint.dir={tmp_path}",
                                             "tracking.mlflow.enabled=false",
                                             "training.max_steps=10",
                                             "training.eval_every=5"])
    result = train_loop(cfg)
    from freetf.training.checkpoint import load_model

    model, _, _ = load_model(result.checkpoint)
    # the loop reads free generations at the final evaluation only, as this function does
    evals = [h for h in result.history if "eval/ce_prior_nats" in h]
    assert [("eval/valid_rate" in h) for h in evals] == [False, True]
    assert evals[-1]["eval/valid_rate"] == free_generation_validity(
        model, cfg.diagnostics.free_generations, seed=cfg.training.seed + 17)
    metrics = figure4_metrics(model, groups=2, per_group=4)
    assert set(metrics) == {f"{m}/{k}" for m in ("independent", "shared")
                            for k in ("position_spread", "noise_overlap", "valid_rate")}
    assert all(0.0 <= metrics[f"{m}/valid_rate"] <= 1.0 for m in ("independent", "shared"))
    assert not math.isnan(metrics["shared/noise_overlap"])
    text = render_groups(model, groups=1, per_group=3)
    lines = text.splitlines()
    assert sum(line.startswith("K>") and len(line) == 66 for line in lines) == 6
    assert "shared Z" in text and "independent Z" in text
