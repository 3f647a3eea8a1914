"""The training loop against references: steps replayed outside it, what it reports at
which step, the config reaching its consumers, FSDP on one rank against the plain loop."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import RankContext, Recorder, Tracker, losses, tiny

from freetf.training.checkpoint import load_checkpoint
from freetf.training.context import TrainContext
from freetf.training.loop import train_loop

pytestmark = pytest.mark.timeout(240)


def test_first_step_metrics_equal_a_reference_step(tmp_path):
    """Step 1 replayed outside the loop: next-token CE, and the KL over the positions
    that predict a token (z_logits[:, :-1], aligned with ids[:, 1:])."""
    from freetf.data.datasets import build_data
    from freetf.data.stream import BatchStream
    from freetf.model.losses import kl_per_token
    from freetf.model.transformer import FreeTransformer
    from freetf.training.loop import step_noise

    cfg = tiny(tmp_path, "training.max_steps=1", "training.free_bits_bits=0")
    result = train_loop(cfg)
    torch.manual_seed(cfg.training.seed)  # the loop's initial weights
    model = FreeTransformer(cfg.model)
    ids = next(BatchStream(build_data(cfg).train, cfg.training.batch_size, seed=cfg.data.seed))
    noise = step_noise(cfg, 0, cfg.training.batch_size, ids.shape[1], 0, 1)[0]
    logits, z_logits = model(ids, bit_noise=noise)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1))
    kl = kl_per_token(z_logits[:, :-1]).mean()
    step1 = next(h for h in result.history if h.get("step") == 1)
    assert step1["train/ce_nats"] == pytest.approx(ce.item(), rel=1e-6)
    assert step1["train/kl_nats"] == pytest.approx(kl.item(), rel=1e-6)
    assert kl.item() != pytest.approx(kl_per_token(z_logits[:, 1:]).mean().item(), rel=1e-6)


def test_four_steps_and_the_final_evaluation_equal_a_reference_written_out(tmp_path):
    """The loop's wiring replayed outside it: weights seeded by training.seed, batches by
    data.seed, Z's noise per step, the schedules (KL weight, free bits, curriculum length),
    AdamW's groups, the LR schedule, clipping, the log window's means, the final weights
    and the final evaluation (diagnostics, verdict at the scheduled kappa, bits per byte,
    samples, free generations)."""
    from freetf.data.datasets import build_data
    from freetf.data.stream import BatchStream
    from freetf.evaluation.diagnostics import latent_diagnostics, verdict
    from freetf.evaluation.samples import sample_texts
    from freetf.evaluation.synthetic_eval import free_generation_validity
    from freetf.model.losses import compute_loss
    from freetf.model.transformer import FreeTransformer
    from freetf.training.schedules import lr_at, schedule_values

    cfg = tiny(tmp_path, "training.max_steps=4", "training.log_every=2", "training.seed=3",
               "data.seed=5", "training.warmup_steps=1", "training.grad_clip=0.05",
               "training.weight_decay=0.2", "training.kl_weight=0.7",
               "training.kl_annealing.type=linear", "training.kl_annealing.initial_weight=0.2",
               "training.free_bits_bits=0.03", "training.free_bits_schedule.type=linear",
               "training.free_bits_schedule.initial_free_bits=0",
               "training.free_bits_schedule.steps=20",
               "training.curriculum="
               "[{until_step: 2, max_seq_len: 34}]", "scheduler.min_lr=1e-4",
               "diagnostics.free_generations=6", "checkpoint.every_steps=0",
               "data.val_samples=20", "training.eval_batches=3")
    result = train_loop(cfg)

    torch.manual_seed(3)
    model = FreeTransformer(cfg.model)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.2},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    lrs = [lr_at(s, 3e-3, 1, 4, 1e-4) for s in range(5)]
    data = build_data(cfg)
    stream = BatchStream(data.train, 8, seed=5)
    sched = [schedule_values(cfg, s, 4) for s in range(4)]
    assert [v["max_seq_len"] for v in sched] == [34, 34, 66, 66]
    steps = []
    for step in range(4):
        for group in optimizer.param_groups:
            group["lr"] = lrs[step]
        seq_len = sched[step]["max_seq_len"]
        ids = next(stream)[:, :seq_len]  # (8, T)
        noise = torch.rand(1, 8, seq_len, 4, generator=torch.Generator().manual_seed(
            3 * 1_000_003 + step))[0]
        logits, z_logits = model(ids, mode="training", bit_noise=noise)
        loss, parts = compute_loss(logits[:, :-1], z_logits[:, :-1], ids[:, 1:],
                                   sched[step]["kl_weight"], sched[step]["free_bits_nats"])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 0.05)
        assert norm > 0.05  # clipping acts
        optimizer.step()
        optimizer.zero_grad()
        steps.append({"train/loss": parts["total"], "train/ce_nats": parts["reconstruction"],
                      "train/kl_hinged_nats": parts["kl"], "train/kl_nats": parts["kl_raw_nats"],
                      "train/kl_bits": parts["kl_raw_bits"], "train/grad_norm": norm})
    assert steps[0]["train/kl_hinged_nats"] > 0 < steps[2]["train/kl_hinged_nats"]  # weighted
    logged = {h["step"]: h for h in result.history if "train/loss" in h}
    assert sorted(logged) == [2, 4]
    for done, window in ((2, steps[0:2]), (4, steps[2:4])):
        for key in window[0]:
            mean = (window[0][key] + window[1][key]).item() / 2
            assert logged[done][key] == pytest.approx(mean, rel=1e-5, abs=1e-7), (done, key)
        assert logged[done]["train/lr"] == pytest.approx(lrs[done], rel=1e-9)
        kappa = sched[done - 1]["free_bits_nats"]  # the window's last step
        assert logged[done]["train/kl_weight"] == sched[done - 1]["kl_weight"]
        assert logged[done]["train/free_bits_nats"] == pytest.approx(kappa)
        assert logged[done]["train/free_bits_bits"] == pytest.approx(kappa / math.log(2))
        assert logged[done]["train/nonfinite_steps"] == 0.0
        assert logged[done]["train/epoch"] == 0.0

    saved, _ = load_checkpoint(result.checkpoint)
    for key, value in model.state_dict().items():
        assert torch.allclose(saved["model"][key], value, atol=1e-6), key

    assert len(data.val) == 20
    val = BatchStream(data.val, 8, seed=5, drop_last=True)
    batches = [next(val), next(val)]  # eval_batches=3, but only 2 full batches
    torch.manual_seed(3 + 17)
    expected = latent_diagnostics(model, batches, cfg, "cpu")
    samples = sample_texts(model, data, cfg, torch.device("cpu"))
    valid = free_generation_validity(model, 6, seed=3 + 17)  # what the loop's reading gives
    final = result.metrics
    for key, value in expected.items():
        assert final[key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key
    assert final["eval/bpb_prior"] == pytest.approx(
        expected["eval/ce_prior_nats"] / math.log(2) / data.bytes_per_token, rel=1e-5)
    assert final["eval/bpb_posterior"] == pytest.approx(
        expected["eval/ce_posterior_nats"] / math.log(2) / data.bytes_per_token, rel=1e-5)
    kappa = sched[3]["free_bits_nats"]
    assert final["eval/verdict"] == verdict(expected, cfg, kappa)
    assert final["eval/samples"] == samples and final["eval/valid_rate"] == valid
    assert result.step == 4 and result.history[-1]["step"] == 4


def test_bits_per_byte_divides_by_the_bytes_per_token():
    from freetf.training.evaluate import bits_per_byte

    metrics = {"eval/ce_prior_nats": 2.0, "eval/ce_posterior_nats": 1.0, "eval/kl_nats": 5.0}
    assert bits_per_byte(metrics, 4.0) == {"eval/bpb_prior": 2.0 / math.log(2) / 4.0,
                                           "eval/bpb_posterior": 1.0 / math.log(2) / 4.0}
    assert bits_per_byte({"eval/ce_prior_nats": 2.0}, 1.0) == {"eval/bpb_prior": 2 / math.log(2)}


# Of 7 steps: evaluate every 3, log every 4, save every 5 (step 3 evaluates before any
# log step; step 6 reports after a save without one).  The default keeps the best checkpoint
# by an eval metric, so a save evaluates too; a train/ metric does not.
@pytest.mark.parametrize("metric, evaluated", [("eval/ce_prior_nats", [3, 5, 6, 7]),
                                               ("train/loss", [3, 6, 7])])
def test_reports_checkpoints_evaluations_and_marks_fall_on_their_steps(tmp_path, monkeypatch,
                                                                       caplog, metric,
                                                                       evaluated):
    import json

    import freetf.training.evaluate as eval_mod
    import freetf.training.loop as train_mod
    from freetf.data.stream import BatchStream
    from freetf.model.transformer import FreeTransformer

    streams = []

    class SpiedStream(BatchStream):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            streams.append(kwargs)

    monkeypatch.setattr(train_mod, "BatchStream", SpiedStream)
    monkeypatch.setattr(eval_mod, "BatchStream", SpiedStream)
    kappas, generations = [], []

    def verdict(metrics, cfg, free_bits_nats):
        kappas.append(free_bits_nats)
        return "spied"

    def free_generations(model, num, seed):
        from freetf.evaluation.synthetic_eval import read_sequence

        generations.append((num, seed))
        valid = [read_sequence("K>" + "_" * s + "KKKKKKKK" + "_" * (56 - s)) for s in (0, 4)]
        return valid + [read_sequence("K>" + "A" * 64)] * 2  # half valid

    monkeypatch.setattr(eval_mod, "verdict", verdict)
    monkeypatch.setattr(eval_mod, "free_generations", free_generations)
    cfg = tiny(tmp_path, "training.max_steps=7", "training.log_every=4", "training.eval_every=3",
               "checkpoint.every_steps=5", "checkpoint.keep=5", f"checkpoint.metric={metric}",
               "data.seed=7", "data.num_workers=1", "diagnostics.free_generations=2",
               "training.gradient_checkpointing=true", "training.seed=2",
               "training.free_bits_schedule.type=linear",
               "training.free_bits_schedule.initial_free_bits=1.0")
    ctx, tracker = Recorder(), Tracker()
    with caplog.at_level("INFO", logger="freetf.training.loop"):
        result = train_loop(cfg, ctx, tracker)
    ckpt = tmp_path / "ckpt"
    assert [(step, path, essential) for step, path, essential, _ in ctx.reports] == [
        (3, None, True), (4, None, False), (5, ckpt / "step_000005", True), (6, None, True),
        (7, ckpt / "step_000007", True)]
    assert [step for step, *_, m in ctx.reports if "eval/ce_prior_nats" in m] == evaluated
    assert [step for step, *_, m in ctx.reports if "train/loss" in m] == [4, 5, 6, 7]
    assert [step for step, *_, m in ctx.reports if "eval/samples" in m] == [7]  # the last only
    assert result.checkpoint == ckpt / "step_000007"
    assert ctx.reports[-1][3] == result.metrics | {"step": 7}
    for step, path, _, reported in ctx.reports:  # meta.json: the report's numbers
        if path is not None:
            meta = json.loads((path / "meta.json").read_text())
            files = meta.pop("files")  # and the checkpoint's other files, with their sizes
            assert files == {p.name: p.stat().st_size for p in path.iterdir()
                             if p.name != "meta.json"}
            assert meta == {k: v for k, v in reported.items()
                            if not isinstance(v, str | list)}, step
    assert [step for step, _ in tracker.metrics] == [3, 4, 5, 6, 7]
    assert all(m["train/steps_done"] == step and "eval/samples" not in m
               and "step" not in m for step, m in tracker.metrics)
    parameters = FreeTransformer(cfg.model).parameters()  # the tied head counted once
    assert tracker.params == {"num_parameters": sum(p.numel() for p in parameters),
                              "total_steps": 7}  # what the console's time left rests on
    assert ctx.events == ["loop_start", "data_built", "model_built", "first_step",
                          "last_step", "train_end"]  # each once, in this order
    assert list(ctx.marks.values()) == sorted(ctx.marks.values())
    assert streams[0] == {"seed": 7, "num_workers": 1}  # then the evaluations' val streams
    assert ctx.model.gradient_checkpointing
    # the verdict at the scheduled kappa of the step evaluated, free generations at each
    kappa = cfg.training.free_bits_nats
    schedule = {step: 1.0 + (kappa - 1.0) * (step - 1) / 7 for step in evaluated}
    assert kappas == pytest.approx([schedule[step] for step in evaluated])
    assert generations == [(2, 2 + 17)] * len(evaluated)
    assert result.metrics["eval/valid_rate"] == 0.5
    assert result.metrics["eval/valid_draws"] == 4  # the readings returned
    assert result.metrics["eval/gen_start_mean"] == 2.0
    progress = [r.getMessage().split(" loss")[0] for r in caplog.records
                if r.name == "freetf.training.loop" and r.getMessage().startswith("step ")]
    assert progress == ["step 4/7"]  # the console's progress line at log steps only


def test_compile_wraps_the_model_before_the_runner_prepares_it(tmp_path, monkeypatch):
    compiled = []

    def fake_compile(model):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    ctx = Recorder()
    train_loop(tiny(tmp_path, "training.max_steps=1", "training.compile=true"), ctx)
    assert compiled == [ctx.model]
    train_loop(tiny(tmp_path / "b", "training.max_steps=1"), Recorder())
    assert len(compiled) == 1


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_seeds_its_own_generator_after_the_shared_weights(tmp_path, caplog, rank):
    """And takes its rows of the global batch and its slice of Z's noise: rank r of 2
    trains on rows r::2 of a global batch of 16 (the first step replayed here)."""
    from freetf.data.datasets import build_data
    from freetf.data.stream import BatchStream
    from freetf.model.losses import compute_loss
    from freetf.model.transformer import FreeTransformer

    ctx = RankContext(rank=rank, world_size=2, others={1 - rank: None})
    cfg = tiny(tmp_path, "training.max_steps=1", "training.seed=3", "training.log_every=1")
    with caplog.at_level("INFO", logger="freetf.training"):
        train_loop(cfg, ctx)
    console = [r.getMessage().split()[0] for r in caplog.records  # loop and loop_state
               if r.name.startswith("freetf.training.loop")]
    assert console == (["model:", "checkpoint:", "step"] if rank == 0 else [])  # rank 0 speaks
    torch.manual_seed(3 * 1000 + rank)
    assert torch.equal(ctx.rng_after_resume, torch.get_rng_state())

    torch.manual_seed(3)
    model = FreeTransformer(cfg.model)
    rows = next(BatchStream(build_data(cfg).train, 16, seed=0))[rank::2]  # (8, 66)
    noise = torch.rand(1, 16, 66, 4, generator=torch.Generator().manual_seed(3 * 1_000_003))
    logits, z_logits = model(rows, mode="training", bit_noise=noise[0, rank::2])
    loss, _ = compute_loss(logits[:, :-1], z_logits[:, :-1], rows[:, 1:], 1.0,
                           cfg.training.free_bits_nats)
    assert losses(ctx.history)[1] == pytest.approx(loss.item(), rel=1e-6)


def test_epochs_set_the_number_of_steps_without_max_steps(tmp_path):
    from freetf.data.datasets import build_data

    cfg = tiny(tmp_path, "training.max_steps=null", "training.num_epochs=2",
               "training.grad_accum_steps=2", "data.num_samples=96", "training.log_every=100",
               "scheduler.type=constant")
    per_epoch = len(build_data(cfg).train) // 8
    assert per_epoch >= 5
    result = train_loop(cfg)
    assert result.step == 2 * per_epoch // 2 == result.history[-1]["step"]
    assert result.metrics["train/epoch"] == 1.0  # the last batch of the second epoch
    assert result.metrics["train/lr"] == 3e-3  # constant after the warmup, not cosine's min


def test_tokens_per_second_over_each_log_window(tmp_path, monkeypatch):
    """On a clock that ticks 0.25 s at each reading: every window is 0.25 s long."""
    import freetf.training.loop as train_mod

    ticks = iter(range(10_000))

    class Clock:
        @staticmethod
        def perf_counter():
            return next(ticks) * 0.25

    monkeypatch.setattr(train_mod, "time", Clock)
    result = train_loop(tiny(tmp_path, "training.max_steps=6", "training.log_every=3",
                             "training.grad_accum_steps=2"), RankContext(rank=0, world_size=2,
                                                                           others={1: None}))
    rates = [h["train/tokens_per_s"] for h in result.history if "train/loss" in h]
    assert rates == [3 * 2 * 8 * 66 * 2 / 0.25] * 2  # steps x micro x rows x T x world


@pytest.fixture
def process_group(tmp_path):
    """A one-rank gloo process group in this process (tests/test_fsdp.py spawns several)."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


class _ShardingContext(TrainContext):
    def shard_model(self, model, cfg):
        from freetf.training.parallel import apply_fsdp

        if cfg.scaling.strategy != "fsdp":
            return model
        return apply_fsdp(model, cfg, torch.device("cpu"))


def test_fsdp_in_process_trains_saves_and_resumes_like_the_plain_loop(tmp_path, process_group):
    """The loop's FSDP paths on one rank: sharded saves (and their pruning), resumes from
    shards into FSDP and into a plain model, a full checkpoint into FSDP, CPU offload."""
    import json

    def run(name, *extra, resume=None):
        cfg = tiny(tmp_path / name, "training.max_steps=6", "checkpoint.every_steps=3",
                   "checkpoint.keep=1", "diagnostics.free_generations=0",
                   "scaling.use_ray=true", *extra)  # the loop itself never starts Ray
        return train_loop(cfg, _ShardingContext(resume_from=resume))

    plain = run("plain", "checkpoint.keep=2")
    fsdp = run("fsdp", "scaling.strategy=fsdp", "checkpoint.keep=2")
    offload = run("offload", "scaling.strategy=fsdp", "scaling.fsdp_cpu_offload=true")
    expected = losses(plain.history)
    for result in (fsdp, offload):
        assert losses(result.history) == pytest.approx(expected, rel=1e-5)
        assert result.checkpoint.name == "step_000006" and (result.checkpoint / "shards").is_dir()
    for result, kept in ((fsdp, ["step_000003", "step_000006"]), (offload, ["step_000006"])):
        assert sorted(p.name for p in result.checkpoint.parent.glob("step_*")) == kept
        meta = json.loads((result.checkpoint / "meta.json").read_text())
        assert meta["step"] == 6 and meta["train/loss"] == pytest.approx(expected[6], rel=1e-5)
        full, _ = load_checkpoint(result.checkpoint)  # consolidated from the shards
        reference, _ = load_checkpoint(plain.checkpoint)
        for key, value in reference["model"].items():
            assert torch.allclose(full["model"][key], value, atol=1e-5), key

    sharded = fsdp.checkpoint.parent / "step_000003"
    full_step_3 = tmp_path / "plain" / "ckpt" / "step_000003"
    for name, extra, resume in (("shards->fsdp", ["scaling.strategy=fsdp"], sharded),
                                ("shards->plain", [], sharded),
                                ("full->fsdp", ["scaling.strategy=fsdp"], full_step_3)):
        resumed = losses(run(name, *extra, resume=resume).history)
        assert sorted(resumed) == [4, 5, 6], name
        for step, loss in resumed.items():
            assert loss == pytest.approx(expected[step], rel=1e-5), (name, step)
