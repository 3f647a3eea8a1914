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
    sample_groups,
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


def test_target_start_is_the_runs_start_when_noise_hides_its_first_letter():
    assert read_sequence("K>" + put("!KKKKKKK", 5)).target_start == 5
    assert read_sequence("K>" + put("KKKKKKK!", 5)).target_start == 5
    assert read_sequence("K>" + put("!!KKKKKK", 5)).target_start == 5
    # "!" on both sides of a 7-letter run: the start is 4 or 5, equally likely
    assert read_sequence("K>" + put("!KKKKKKK!", 4)).target_start == 4.5


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
    cfg = load_config("freetf/configs/tiny.yaml", [f"checkpoint.dir={tmp_path}",
                                             "tracking.mlflow.enabled=false",
                                             "training.max_steps=10",
                                             "training.eval_every=5"])
    result = train_loop(cfg)
    from freetf.training.checkpoint import load_model

    model, _, _ = load_model(result.checkpoint)
    # the loop reads free generations at every evaluation, as this function does
    evals = [h for h in result.history if "eval/ce_prior_nats" in h]
    assert [("eval/valid_rate" in h) for h in evals] == [True, True]
    assert evals[-1]["eval/valid_rate"] == free_generation_validity(
        model, cfg.diagnostics.free_generations, seed=cfg.training.seed + 17)
    metrics = figure4_metrics(model, groups=2, per_group=4)
    assert set(metrics) == {f"{m}/{k}" for m in ("independent", "shared")
                            for k in ("position_spread", "noise_overlap", "valid_rate")}
    for mode in ("independent", "shared"):  # the mean of the groups' rates, recomputed
        groups = sample_groups(model, "K", 2, 4, mode == "shared", seed=0)
        rates = [group_stats(texts).valid_rate for texts in groups]
        assert metrics[f"{mode}/valid_rate"] == pytest.approx(sum(rates) / len(rates))
    assert not math.isnan(metrics["shared/noise_overlap"])
    text = render_groups(model, groups=1, per_group=3)
    lines = text.splitlines()
    assert sum(line.startswith("K>") and len(line) == 66 for line in lines) == 6
    assert "shared Z" in text and "independent Z" in text


def test_shared_z_is_one_code_sequence_per_group(monkeypatch):
    """Figure 4: shared Z = one code per position, the same for every row of a group and
    drawn afresh for each group; independent Z = a sequence per row."""
    import torch

    from freetf.model.transformer import FreeTransformer

    cfg = load_config("freetf/configs/tiny.yaml")
    model = FreeTransformer(cfg.model)
    seen = []
    real = model.generate

    def recording(prompt, max_new_tokens, **kwargs):
        seen.append(kwargs["z"].clone())
        return real(prompt, max_new_tokens, **kwargs)

    monkeypatch.setattr(model, "generate", recording)
    sample_groups(model, "K", groups=3, per_group=5, shared=True, seed=1)
    assert len(seen) == 3
    for z in seen:
        assert z.shape == (5, 66) and 0 <= z.min() and z.max() < 2 ** cfg.model.latent_dim
        assert torch.equal(z, z[:1].expand(5, 66))  # every row the same sequence
        assert z[0].unique().numel() > 1  # one code per position, not one per sequence
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    seen.clear()
    sample_groups(model, "K", groups=2, per_group=5, shared=False, seed=1)
    for z in seen:
        assert z.shape == (5, 66)
        assert all(not torch.equal(z[i], z[j]) for i in range(5) for j in range(i + 1, 5))


def test_jaccard_and_degenerate_groups():
    from freetf.evaluation.synthetic_eval import jaccard

    assert jaccard(frozenset({1, 2, 3}), frozenset({2, 3, 4})) == 0.5
    assert jaccard(frozenset(), frozenset()) == 1.0  # no noise in either: identical
    assert jaccard(frozenset({1}), frozenset()) == 0.0
    one_valid = group_stats(["K>" + put("KKKKKKKK", 3), "K>" + put("KKKKKKKKK", 3)])
    assert math.isnan(one_valid.position_spread)  # a spread needs two valid sequences
    assert one_valid.valid_rate == 0.5
    assert math.isnan(group_stats(["K>" + put("!", 1)]).noise_overlap)  # no pair
    overlap = group_stats(["K>" + put("!!", 0), "K>" + put("!", 1), "K>" + BODY])
    assert overlap.noise_overlap == pytest.approx((0.5 + 0.0 + 0.0) / 3)


def test_figure4_metrics_average_the_groups_skipping_nan(monkeypatch):
    import freetf.evaluation.synthetic_eval as se

    groups = {
        True: [["K>" + put("KKKKKKKK", 0), "K>" + put("KKKKKKKK", 2)],  # spread 1
               ["K>" + put("KKKKKKKK", 5), "K>" + put("KKKKKKKKK", 5)]],  # spread NaN
        False: [["K>" + put("KKKKKKKK", 0), "K>" + put("KKKKKKKK", 10)],  # spread 5
                ["K>" + put("KKKKKKKK", 0), "K>" + put("KKKKKKKK", 30)]],  # spread 15
    }
    calls = []

    def fake(model, letter, n_groups, per_group, shared, temperature, seed):
        calls.append((letter, n_groups, per_group, shared, temperature, seed))
        return groups[shared]

    monkeypatch.setattr(se, "sample_groups", fake)
    m = se.figure4_metrics(None, letter="Q", groups=2, per_group=2, temperature=0.7, seed=4)
    assert calls == [("Q", 2, 2, False, 0.7, 4), ("Q", 2, 2, True, 0.7, 4)]
    assert m["shared/position_spread"] == pytest.approx(1.0)  # the NaN group skipped
    assert m["independent/position_spread"] == pytest.approx(10.0)
    assert m["shared/valid_rate"] == pytest.approx(0.75)
    assert m["independent/valid_rate"] == 1.0
    assert m["independent/noise_overlap"] == 1.0  # no noise anywhere
    calls.clear()
    se.figure4_metrics(None)  # the paper's protocol by default: 16 groups of 16, "K"
    assert calls == [("K", 16, 16, False, 1.0, 0), ("K", 16, 16, True, 1.0, 0)]
    monkeypatch.setattr(se, "sample_groups", lambda *args: [groups[args[4]][0]])
    one = se.figure4_metrics(None, groups=1)  # a single group
    assert one["independent/position_spread"] == pytest.approx(5.0)


def test_render_groups_lists_shared_then_independent(monkeypatch):
    import freetf.evaluation.synthetic_eval as se

    monkeypatch.setattr(se, "sample_groups", lambda model, letter, groups, per_group, shared,
                        seed=0: [[f"{'s' if shared else 'i'}{g}{k}" for k in range(per_group)]
                                 for g in range(groups)])
    calls = []
    real = se.sample_groups
    monkeypatch.setattr(se, "sample_groups", lambda *args, **kwargs: calls.append(
        (args[1:], kwargs)) or real(*args, **kwargs))
    assert se.render_groups(None, seed=5).count("\n") == 2 * (2 + 2 * 6) - 1
    assert calls == [(("K", 2, 6, True), {"seed": 5}), (("K", 2, 6, False), {"seed": 5})]
    calls.clear()
    se.render_groups(None, groups=1, per_group=1)
    assert [kwargs for _, kwargs in calls] == [{"seed": 0}] * 2  # the default seed
    text = se.render_groups(None, groups=2, per_group=2)
    assert text.splitlines() == [
        "-- shared Z, group 1", "s00", "s01", "-- shared Z, group 2", "s10", "s11",
        "-- independent Z, group 1", "i00", "i01", "-- independent Z, group 2", "i10", "i11"]


def _measured(spread=(16.0, 16.0), overlap=(0.05, 0.05), valid=(0.95, 0.95)):
    """Figure 4 measurements: (independent, shared) for each quantity."""
    return {"independent/position_spread": spread[0], "shared/position_spread": spread[1],
            "independent/noise_overlap": overlap[0], "shared/noise_overlap": overlap[1],
            "independent/valid_rate": valid[0], "shared/valid_rate": valid[1]}


@pytest.mark.parametrize("kappa, measured, expected", [
    # 1/64 bit, nothing: the shared spread stays >= 0.8 of the independent one.
    (1 / 64, _measured(spread=(16.0, 12.8)), True),
    (1 / 64, _measured(spread=(16.0, 12.7)), False),
    # 1/8 bit, position: spread ratio <= 0.5, overlap not raised (< 1.5x).
    (0.125, _measured(spread=(16.0, 8.0)), True),
    (0.125, _measured(spread=(16.0, 8.1)), False),
    (0.125, _measured(spread=(16.0, 4.0), overlap=(0.04, 0.06)), False),
    (0.125, _measured(spread=(16.0, 4.0), overlap=(0.04, 0.059)), True),
    # 1 bit, position and noise: spread ratio < 0.8 and overlap >= 1.5x.
    (1.0, _measured(spread=(8.8, 6.3), overlap=(0.06, 0.12)), True),
    (1.0, _measured(spread=(8.8, 7.1), overlap=(0.06, 0.12)), False),
    (1.0, _measured(spread=(8.8, 2.0), overlap=(0.06, 0.089)), False),
    (1.0, _measured(spread=(10.0, 8.0), overlap=(0.5, 1.0)), False),  # 0.8 is not < 0.8
    (1.0, _measured(spread=(10.0, 2.0), overlap=(0.5, 0.75)), True),  # 1.5 is >= 1.5
    # 8 bits, broken generation: free generations (Z from the prior) valid < 0.2.
    (8.0, _measured(valid=(0.19, 0.5)), True),
    (8.0, _measured(valid=(0.2, 0.0)), False),
    # No valid sequence: the spread cannot be measured, and the test fails.
    (0.125, _measured(spread=(float("nan"), float("nan"))), False),
    (1 / 64, _measured(spread=(16.0, float("nan"))), False),
])
def test_reproduces_tests_each_paper_row(kappa, measured, expected):
    from freetf.evaluation.synthetic_eval import reproduces

    assert reproduces(kappa, measured) is expected


def test_figure4_rows_are_the_papers_four_kappas_only():
    from freetf.evaluation.synthetic_eval import figure4_row, reproduces

    assert [figure4_row(k) for k in (2 ** -6, 0.125000001, 1.0, 8.0)] == [
        "nothing", "position", "position and noise", "broken generation"]
    assert figure4_row(0.5) is None and figure4_row(None) is None and figure4_row(0) is None
    assert reproduces(0.5, _measured()) is None and reproduces(None, _measured()) is None


def test_a_measurement_that_is_missing_or_zero_fails_its_row():
    from freetf.evaluation.synthetic_eval import _ratio, reproduces

    assert math.isnan(_ratio({}, "position_spread"))
    assert math.isnan(_ratio({"independent/position_spread": 4.0}, "position_spread"))
    assert math.isnan(_ratio({"shared/position_spread": 4.0}, "position_spread"))
    assert math.isnan(_ratio(_measured(spread=(0.0, 3.0)), "position_spread"))
    assert _ratio(_measured(spread=(4.0, 3.0)), "position_spread") == 0.75
    assert reproduces(1 / 64, {}) is False and reproduces(1.0, {}) is False
    assert reproduces(8.0, {"shared/valid_rate": 0.0}) is False  # no free generations


def test_generation_stats_against_hand_counts():
    from freetf.evaluation.synthetic_eval import TASK_START_SD, generation_stats

    texts = ["K>" + put("KKKKKKKK", 4),  # valid, start 4, no noise
             "K>" + put("!!", 40)[:50] + put("KKKKKKKK", 50)[50:],  # valid, start 50, 2 "!"
             "K>" + put("KKKKKKKA", 5)]  # not valid: not counted in the statistics
    got = generation_stats([read_sequence(t) for t in texts])
    assert got["eval/valid_rate"] == pytest.approx(2 / 3)
    assert got["eval/gen_start_mean"] == pytest.approx(27.0)
    assert got["eval/gen_start_sd"] == pytest.approx(23.0)  # population sd of 4 and 50
    assert got["eval/gen_noise_rate"] == pytest.approx(2 / 128)
    # Wilson 95% of 2 valid in 3 draws, by hand: centre (p + z^2/2n) / (1 + z^2/n),
    # half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n) with z = 1.96
    assert got["eval/valid_draws"] == 3.0
    assert got["eval/valid_low"] == pytest.approx(0.20766, abs=1e-4)
    assert got["eval/valid_high"] == pytest.approx(0.93851, abs=1e-4)
    assert TASK_START_SD == pytest.approx(16.4520, abs=1e-4)
    empty = generation_stats([read_sequence(texts[2])])
    assert empty["eval/valid_rate"] == 0 and math.isnan(empty["eval/gen_noise_rate"])
    assert empty["eval/valid_draws"] == 1.0 and empty["eval/valid_low"] == 0.0
    assert empty["eval/valid_high"] == pytest.approx(0.79345, abs=1e-4)
    assert set(got) == set(empty) == {
        "eval/valid_rate", "eval/valid_low", "eval/valid_high", "eval/valid_draws",
        "eval/gen_start_mean", "eval/gen_start_sd", "eval/gen_noise_rate"}


class LetterModel(ScriptedModel):
    """Valid rows for the prompts' letters A to M only; records each call's temperature."""

    def generate(self, prompt, max_new_tokens, temperature=1.0, z=None):
        self.calls.append(temperature)
        tok = CharTokenizer()
        rows = []
        for ids in prompt.tolist():
            letter = tok.decode(ids)[0]
            body = letter * (8 if letter <= "M" else 9)  # nine in a row: not valid
            rows.append(tok.encode(f"{letter}>" + put(body, 3)))
        return torch.tensor(rows)


@pytest.mark.timeout(10)
def test_free_generation_validity_draws_at_seed_0_and_temperature_1_unless_told():
    def rate(seed):  # the letters free_generations draws first at this seed, read by hand
        letters = torch.randint(0, 26, (40,),
                                generator=torch.Generator().manual_seed(seed)).tolist()
        return sum(i < 13 for i in letters) / 40

    assert rate(0) != rate(1)
    model = LetterModel(2)
    assert free_generation_validity(model, 40) == rate(0)
    assert free_generation_validity(model, 40, seed=1, temperature=0.5) == rate(1)
    assert model.calls == [1.0, 0.5]


@pytest.mark.timeout(10)
def test_generation_stats_of_no_readings_are_nan_over_0_draws():
    from freetf.evaluation.synthetic_eval import generation_stats

    got = generation_stats([])
    assert got["eval/valid_draws"] == 0.0
    assert all(math.isnan(v) for k, v in got.items() if k != "eval/valid_draws")
