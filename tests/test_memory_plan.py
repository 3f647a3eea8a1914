"""freetf plan: memory per GPU against a hand count of freetf/configs/tiny.yaml."""

from __future__ import annotations

import pytest

from freetf import load_config
from freetf.training.memory_plan import GIB, MemoryPlan, count_parameters, format_plan, memory_plan

pytestmark = pytest.mark.timeout(60)

# freetf/configs/tiny.yaml by hand: vocab 29, D 32, 2 blocks, 2 heads (D_kv = D), H = 4, tied
# embeddings, SwiGLU width F = 64 * ceil(8 * 32 / 3 / 64) = 128.
D, F, V, H = 32, 128, 29, 4
BLOCK = D + 4 * D * D + D + 3 * D * F  # two norms, wq wk wv wo, w1 w3 w2
ENCODER = D + BLOCK + D + (D * H + H)  # zeta, block, norm, read-out
MAPPER = 2 ** H * D + D  # the exact post-sampler (2^H, D) and its bias
ROOT = V * D + D + D + D + (D * H + H)  # embeddings (= LM head), norm, zeta, norm, read-out
TOTAL = V * D + 2 * BLOCK + D + ENCODER + MAPPER
TOKENS = 8 * 66  # batch 8 x 66 tokens per worker
E = 2  # bf16 activations (training.amp=auto on a GPU)
PER_BLOCK = (5 * D + 2 * D + 4 * F) * E


def test_parameter_counts_are_the_models():
    counts = count_parameters(load_config("freetf/configs/tiny.yaml"))
    assert counts.total == TOTAL == 51044
    assert counts.largest_unit == BLOCK == 16448 and ROOT < BLOCK
    # a large vocabulary makes the root (embeddings + tied LM head) the largest unit
    wide = count_parameters(load_config("freetf/configs/tiny.yaml", ["model.vocab_size=1000"]))
    assert wide.largest_unit == ROOT + (1000 - V) * D


@pytest.mark.parametrize("workers", [1, 2, 8])
def test_plan_matches_a_hand_count(workers):
    cfg = load_config("freetf/configs/tiny.yaml")
    ddp, fsdp = (memory_plan(cfg, workers, s) for s in ("ddp", "fsdp"))
    assert ddp.rows["parameters (fp32)"] == 4 * TOTAL
    assert ddp.rows["AdamW state (fp32)"] == 8 * TOTAL
    assert "gathered FSDP units" not in ddp.rows
    assert fsdp.rows["parameters (fp32)"] == pytest.approx(4 * TOTAL / workers)
    assert fsdp.rows["gradients (fp32)"] == pytest.approx(4 * TOTAL / workers)
    assert fsdp.rows["AdamW state (fp32)"] == pytest.approx(8 * TOTAL / workers)
    assert fsdp.rows["gathered FSDP units"] == BLOCK * (2 * E + 4)
    # 3 blocks (2 decoder + the encoder), the embeddings' output, logits + fp32 CE
    activations = TOKENS * (D * E + 3 * PER_BLOCK + V * (E + 8))
    checkpointed = TOKENS * (D * E + 3 * D * E + PER_BLOCK + V * (E + 8))
    for plan in (ddp, fsdp):
        assert plan.rows["activations"] == activations
        assert plan.rows["activations (checkpointed)"] == checkpointed
    assert ddp.total == 16 * TOTAL + activations
    assert fsdp.total_checkpointed == pytest.approx(16 * TOTAL / workers + BLOCK * 8
                                                    + checkpointed)


def test_plan_follows_precision_chunked_loss_and_dense_mapper():
    base = load_config("freetf/configs/tiny.yaml")
    fp32 = memory_plan(base.replace(["training.amp=off"]), 1, "ddp")
    assert fp32.rows["activations"] == TOKENS * (D * 4 + 3 * (7 * D + 4 * F) * 4 + V * 12)
    chunked = memory_plan(base.replace(["training.cross_entropy=chunked"]), 1, "ddp")
    assert chunked.rows["activations"] == TOKENS * (D * E + 3 * PER_BLOCK + D * E) + V * D * 4
    dense = memory_plan(base.replace(["model.mapper_impl=dense"]), 1, "ddp")
    plain = memory_plan(base, 1, "ddp")
    assert dense.rows["activations"] - plain.rows["activations"] == TOKENS * 2 ** H * 8


def test_plan_command_prints_both_strategies_and_whether_they_fit(capsys):
    from freetf.cli import main

    assert main(["plan", "--config", "freetf/configs/tiny.yaml", "--num-workers", "2",
                 "--gpu-gib", "0.0016"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[-4:] == ["ddp", "x2", "fsdp", "x2"]
    rows = {line[:30].strip(): line[30:].split() for line in out[2:]}
    total = 16 * TOTAL + TOKENS * (D * E + 3 * PER_BLOCK + V * (E + 8))
    assert float(rows["total"][0]) == pytest.approx(total / GIB, abs=0.005)
    # 1.72 MB: DDP needs 1.88 MB even checkpointed, FSDP over 2 workers 1.61 MB
    assert rows["fits 0.0016 GiB"] == ["no", "ckpt"]
    assert main(["plan", "--config", "freetf/configs/tiny.yaml", "--strategy", "fsdp"]) == 0
    assert "ddp" not in capsys.readouterr().out


def _plans():
    ddp = MemoryPlan("ddp", 2, 3_000_000_000, {
        "parameters (fp32)": 1 * GIB, "gradients (fp32)": 2 * GIB,
        "AdamW state (fp32)": 0.5 * GIB, "activations": 4 * GIB,
        "activations (checkpointed)": 1 * GIB})
    fsdp = MemoryPlan("fsdp", 8, 3_000_000_000, {
        "parameters (fp32)": 0.5 * GIB, "gradients (fp32)": 0.5 * GIB,
        "AdamW state (fp32)": 1 * GIB, "gathered FSDP units": 0.25 * GIB,
        "activations": 4 * GIB, "activations (checkpointed)": 1 * GIB})
    return ddp, fsdp


def test_a_plan_totals_its_rows_with_one_kind_of_activations():
    ddp, fsdp = _plans()
    assert (ddp.total, ddp.total_checkpointed) == (7.5 * GIB, 4.5 * GIB)
    assert (fsdp.total, fsdp.total_checkpointed) == (6.25 * GIB, 3.25 * GIB)


def test_format_plan_lays_the_plans_side_by_side_in_gib():
    """The table written out: names in 30 columns, a plan in 12, GiB to 2 decimals, "-"
    where a plan has no such row; a GPU of 6.25 GiB fits FSDP's 6.25 exactly and DDP only
    checkpointed (4.5)."""
    cfg = load_config("freetf/configs/tiny.yaml")
    ddp, fsdp = _plans()
    assert format_plan(cfg, [ddp, fsdp], gpu_gib=6.25) == (
        "3B parameters (2 blocks, D=32, H=4); per worker: batch 8 x 66 tokens,"
        " activations in bf16\n"
        "GiB per GPU                         ddp x2     fsdp x8\n"
        "parameters (fp32)                     1.00        0.50\n"
        "gradients (fp32)                      2.00        0.50\n"
        "AdamW state (fp32)                    0.50        1.00\n"
        "gathered FSDP units                      -        0.25\n"
        "activations                           4.00        4.00\n"
        "activations (checkpointed)            1.00        1.00\n"
        "total                                 7.50        6.25\n"
        "total, checkpointed                   4.50        3.25\n"
        "fits 6.25 GiB                         ckpt         yes")
    fits = format_plan(cfg, [ddp, fsdp], gpu_gib=4.5).splitlines()[-1]
    assert fits == "fits 4.5 GiB                          ckpt        ckpt"
    fits = format_plan(cfg, [ddp, fsdp], gpu_gib=3).splitlines()[-1]
    assert fits == "fits 3 GiB                              no          no"
    fp32 = format_plan(cfg.replace(["training.amp=off", "model.latent_dim=0"]), [ddp])
    assert fp32.splitlines()[0].endswith("H=0); per worker: batch 8 x 66 tokens, "
                                         "activations in fp32")
    assert "gathered" not in fp32 and fp32.splitlines()[-1].startswith("total, checkpointed")


def test_memory_plan_refuses_an_unknown_strategy_or_no_workers():
    cfg = load_config("freetf/configs/tiny.yaml")
    with pytest.raises(ValueError) as info:
        memory_plan(cfg, 1, "zero3")
    assert str(info.value) == "strategy must be one of ('ddp', 'fsdp'), got 'zero3'"
    with pytest.raises(ValueError) as info:
        memory_plan(cfg, 0, "ddp")
    assert str(info.value) == "num_workers must be >= 1, got 0"
    one = memory_plan(cfg, 1, "fsdp")
    assert one.strategy == "fsdp" and one.num_workers == 1 and one.parameters == TOTAL


def test_a_model_without_a_latent_has_no_encoder_block_to_keep():
    """latent_dim=0: the 2 decoder blocks alone (no encoder block), checkpointed or not."""
    cfg = load_config("freetf/configs/tiny.yaml", ["model.latent_dim=0"])
    plan = memory_plan(cfg, 1, "ddp")
    assert plan.rows["activations"] == TOKENS * (D * E + 2 * PER_BLOCK + V * (E + 8))
    assert plan.rows["activations (checkpointed)"] == TOKENS * (D * E + 2 * D * E + PER_BLOCK
                                                                + V * (E + 8))


def test_the_parameter_count_is_in_billions_to_three_digits():
    """1.235e9 parameters read as 1.24B (a divisor a hair over 1e9 would give 1.23B)."""
    cfg = load_config("freetf/configs/tiny.yaml")
    plan = MemoryPlan("ddp", 1, 1_235_000_000, {"activations": 0.0})
    assert format_plan(cfg, [plan]).startswith("1.24B parameters (2 blocks, D=32, H=4);")
