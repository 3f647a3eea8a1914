"""freetf.evaluation.samples: the guide's perplexity and the decoded samples, against
references written out in the test."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from freetf.config import ModelConfig
from freetf.evaluation.samples import calculate_perplexity, sample_texts
from freetf.model.transformer import FreeTransformer

pytestmark = pytest.mark.timeout(60)


def _model(max_seq_len=66):
    """Weights large enough that Z, dropout and the temperature change the outputs."""
    torch.manual_seed(0)
    return FreeTransformer(ModelConfig(vocab_size=29, hidden_dim=32, num_layers=2, num_heads=2,
                                       latent_dim=4, max_seq_len=max_seq_len, dropout=0.5,
                                       init_std=0.3))


def _reference_perplexity(model, batches, mode):
    """exp of the mean next-token CE over every scored token of every batch, eval mode."""
    model.eval()
    total, tokens = 0.0, 0
    for ids in batches:
        logits, _ = model(ids, mode=mode)
        log_p = logits[:, :-1].double().log_softmax(-1)  # (B, T-1, V)
        total -= log_p.gather(-1, ids[:, 1:, None]).sum().item()
        tokens += ids[:, 1:].numel()
    return math.exp(total / tokens)


@pytest.mark.parametrize("z_source, mode", [("prior", "inference"), ("posterior", "training")])
def test_perplexity_is_the_token_mean_over_batches_of_any_size(z_source, mode):
    model = _model()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 29, (2, 10), generator=gen),
               torch.randint(0, 29, (3, 7), generator=gen)]
    torch.manual_seed(5)
    expected = _reference_perplexity(model, batches, mode)
    other = "training" if mode == "inference" else "inference"
    torch.manual_seed(5)
    assert expected != pytest.approx(_reference_perplexity(model, batches, other), rel=1e-3)
    model.train()  # dropout 0.5: a train-mode forward would give another number
    torch.manual_seed(5)
    got = calculate_perplexity(model, [batches[0], {"input_ids": batches[1]}], z_source)
    assert model.training  # restored
    assert got.item() == pytest.approx(expected, rel=1e-5)
    if z_source == "prior":  # the default
        model.eval()
        torch.manual_seed(5)
        assert calculate_perplexity(model, batches).item() == pytest.approx(expected, rel=1e-5)
        assert not model.training  # restored to eval


def test_perplexity_of_one_token_and_of_nothing():
    model = _model()
    ids = torch.tensor([[3, 7]])  # one scored token
    torch.manual_seed(2)
    expected = _reference_perplexity(model, [ids], "inference")
    torch.manual_seed(2)
    assert calculate_perplexity(model, [ids]).item() == pytest.approx(expected, rel=1e-5)
    assert calculate_perplexity(model, []).item() == 1.0


def test_perplexity_refuses_another_z_source():
    with pytest.raises(ValueError, match=r"^z_source must be 'prior' or 'posterior', "
                                         r"got 'encoder'$"):
        calculate_perplexity(_model(), [], "encoder")


class _Tokenizer:
    def decode(self, ids):
        return ",".join(map(str, ids))


@pytest.mark.parametrize("dataset, seq_len, rows, prompt_len, num", [
    ("synthetic", 66, 6, 2, 4),   # the "<letter>>" prompt, 4 samples by default
    ("text", 40, 3, 10, 4),       # a quarter of the length; fewer rows than samples
    ("text", 100, 6, 16, 5),      # at most 16 tokens
])
def test_samples_continue_validation_prompts_to_the_full_length(dataset, seq_len, rows,
                                                               prompt_len, num):
    model = _model(max_seq_len=128)
    gen = torch.Generator().manual_seed(3)
    val = [torch.randint(0, 29, (seq_len,), generator=gen) for _ in range(rows)]
    data = SimpleNamespace(val=val, tokenizer=_Tokenizer())
    cfg = SimpleNamespace(data=SimpleNamespace(dataset_name=dataset, max_seq_len=seq_len))
    kwargs = {} if num == 4 else {"num": num}
    for temperature in (None, 0.5):
        model.eval()
        prompts = torch.stack(val[:min(num, rows)])[:, :prompt_len]
        torch.manual_seed(4)
        out = model.generate(prompts, seq_len - prompt_len, temperature=temperature or 1.0)
        expected = [",".join(map(str, row.tolist())) for row in out]
        assert all(len(row) == seq_len for row in out)
        model.train()  # dropout 0.5: sampling in train mode would differ
        torch.manual_seed(4)
        got = sample_texts(model, data, cfg, torch.device("cpu"),
                           **kwargs, **({} if temperature is None else
                                        {"temperature": temperature}))
        assert model.training  # restored
        assert got == expected, temperature
