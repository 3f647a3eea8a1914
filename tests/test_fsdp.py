"""FSDP2 (scaling.strategy=fsdp) on CPU: gloo ranks spawned with torch.multiprocessing.

The ranks run the same loop Ray Train's workers run, through a context that shards the
model with the same function (``parallel.apply_fsdp``) or wraps it in DDP: the
equivalences (FSDP = DDP = one worker at twice the batch, a sharded checkpoint resumed
at another world size, generate on a sharded checkpoint) without Ray's start-up.
tests/test_ray_train.py runs FSDP through Ray Train itself.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import pathlib
import shutil
import sys
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from freetf import load_config
from freetf.config import ConfigError
from freetf.training.checkpoint import load_checkpoint
from freetf.training.context import TrainContext
from freetf.training.loop import train_loop
from freetf.training.parallel import apply_fsdp, clip_grad_norm, gradient_sync, is_fsdp

pytestmark = pytest.mark.timeout(180)


def tiny(root, *extra):
    return load_config("freetf/configs/tiny.yaml", [
        f"checkpoint.dir={root}/ckpt", "tracking.mlflow.enabled=false", "training.log_every=1",
        "training.max_steps=10", "data.num_samples=256", "diagnostics.free_generations=0",
        # clipping active at every step: a norm over this rank's shards alone would clip
        # each rank differently and the runs would part
        "training.grad_clip=0.05", *extra])


class ProcessGroupContext(TrainContext):
    """One rank of a torch.distributed process group (what Ray Train's worker sees)."""

    def __init__(self, **kwargs):
        super().__init__(rank=dist.get_rank(), world_size=dist.get_world_size(),
                         device=torch.device("cpu"), **kwargs)

    def shard_model(self, model, cfg):
        return apply_fsdp(model, cfg, self.device) if cfg.scaling.strategy == "fsdp" else model

    def prepare_model(self, model):
        if is_fsdp(model):
            return model
        return torch.nn.parallel.DistributedDataParallel(model)

    def all_gather(self, obj):
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered


def _rank_main(rank, world_size, tmp, fn, args):
    # the rank's stderr (a C++ abort's message, faulthandler's stacks) goes to a file the
    # parent reads when the rank dies
    log = open(f"{tmp}/rank{rank}.log", "w")  # noqa: SIM115 (open until the process ends)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


class RankDied(RuntimeError):
    """A spawned rank ended by a signal (a crash in C++, not a Python error)."""


def spawn_ranks(world_size, fn, *args):
    """``fn(rank, *args)`` in ``world_size`` processes of one gloo process group (met
    through a file, not a port another process could take first).  A rank ended by a
    signal raises ``RankDied`` with the last lines of each rank's stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_rank_main, args=(world_size, tmp, fn, args), nprocs=world_size)
        except mp.ProcessExitedException as error:
            if error.signal_name is None:
                raise
            logs = {r: pathlib.Path(tmp, f"rank{r}.log") for r in range(world_size)}
            tails = {r: log.read_text().splitlines()[-40:] if log.exists() else []
                     for r, log in logs.items()}
            # the last line before faulthandler's report: the C++ abort's own message
            said = tails[error.error_index]
            said = said[:next((i for i, line in enumerate(said)
                               if line.startswith("Fatal Python error")), len(said))]
            last = ([line for line in said if line.strip()] or ["(nothing on its stderr)"])[-1]
            raise RankDied(f"rank {error.error_index} died of {error.signal_name}: {last}\n"
                           + "\n".join(f"rank {r}| {line}" for r, lines in tails.items()
                                        for line in lines)) from error


def _train_jobs(rank, jobs, out, check_units=False):
    for name, overrides, resume in jobs:
        cfg = tiny(f"{out}/{name}", *overrides)
        result = train_loop(cfg, ProcessGroupContext(resume_from=resume))
        (out / f"{name}.{rank}.json").write_text(json.dumps(
            {"history": result.history, "checkpoint": str(result.checkpoint)}))
    if check_units:
        (out / f"units.{rank}.json").write_text(json.dumps(_units_and_sync(rank, out)))


def spawn_ranks_twice_at_most(world_size, fn, out, names, *args):
    """``spawn_ranks``; if a rank dies of a signal, a warning with its stderr, and once
    more from empty folders (``out/<name>`` and the ranks' JSON files); a second death
    fails.  A CI machine once saw rank 0 abort here, its cause not shown."""
    try:
        spawn_ranks(world_size, fn, *args)
    except RankDied as died:
        warnings.warn(f"the spawned ranks run again: {died}", stacklevel=2)
        for name in names:
            shutil.rmtree(out / name, ignore_errors=True)
        for written in out.glob("*.[0-9]*.json"):
            written.unlink()
        spawn_ranks(world_size, fn, *args)


def run_ranks(world_size, jobs, out, check_units=False):
    """Run ``jobs`` ((name, overrides, resume_from), in order) on ``world_size`` spawned
    ranks.  -> {name: [rank 0's result, rank 1's, ...]}."""
    names = [name for name, _, _ in jobs]
    spawn_ranks_twice_at_most(world_size, _train_jobs, out, names, jobs, out, check_units)
    return {name: [json.loads((out / f"{name}.{r}.json").read_text())
                   for r in range(world_size)] for name in names}


def _units_and_sync(rank, root):
    """What FSDP made of the model on this rank, with and without CPU offload."""
    from torch.distributed.fsdp import FSDPModule

    from freetf.model.transformer import FreeTransformer

    found = {}
    for offload in ("false", "true"):
        cfg = tiny(root, "scaling.strategy=fsdp", f"scaling.fsdp_cpu_offload={offload}")
        torch.manual_seed(0)
        model = apply_fsdp(FreeTransformer(cfg.model), cfg, torch.device("cpu"))
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
        with gradient_sync(model, enabled=False):  # accumulate, no reduce-scatter
            model(ids)[0].sum().backward()
        unreduced = all(p.grad is None for p in model.parameters())
        with gradient_sync(model, enabled=True):
            model(ids)[0].sum().backward()
        found[offload] = {
            "units": units == [model, *model.blocks, model.encoder, model.mapper],
            "rows": {name: [p.to_local().shape[0], p.shape[0]]
                     for name, p in model.named_parameters()},
            "unreduced_after_no_sync": unreduced,
            "reduced_after_sync": all(p.grad is not None for p in model.parameters())}
    return found


# ------------------------------------------------------- one spawn of 2 ranks for the module

# (name, overrides, resume): DDP and FSDP for the baseline and the Free Transformer; FSDP
# with micro-batches of 2 (no reduce-scatter before the last), recomputed blocks and the
# chunked cross-entropy (the tied LM head read outside forward); with CPU offload; a run
# checkpointing at step 3; a run resumed from a full (DDP) checkpoint.
FSDP = "scaling.strategy=fsdp"
JOBS = [("base_ddp", ["model.latent_dim=0", "training.batch_size=4"], None),
        ("base_fsdp", ["model.latent_dim=0", "training.batch_size=4", FSDP], None),
        ("ft_ddp", ["training.batch_size=4"], None),
        ("ft_fsdp", ["training.batch_size=4", FSDP], None),
        ("ft_accum", ["training.batch_size=2", "training.grad_accum_steps=2", FSDP,
                      "training.gradient_checkpointing=true", "training.cross_entropy=chunked"],
         None),
        ("ft_offload", ["training.batch_size=4", FSDP, "scaling.fsdp_cpu_offload=true"], None),
        ("two", ["training.batch_size=4", FSDP, "training.max_steps=6",
                 "checkpoint.every_steps=3"], None),
        ("from_full", ["training.batch_size=4", FSDP, "training.max_steps=6"], "FULL")]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every 2-rank run of this module, in one spawn (a spawn costs seconds).
    -> (folder, {name: per-rank results}, the in-process run whose step-3 checkpoint
    ``from_full`` resumed)."""
    out = tmp_path_factory.mktemp("two_ranks")
    full = train_loop(tiny(out / "full", "training.max_steps=6", "training.batch_size=8",
                           "checkpoint.every_steps=3", "scaling.use_ray=false"))
    step3 = str(out / "full" / "ckpt" / "step_000003")
    jobs = [(n, o, step3 if r == "FULL" else r) for n, o, r in JOBS]
    return out, run_ranks(2, jobs, out, check_units=True), full


def step_means(ranks, key="train/loss"):
    """Per step, the mean of ``key`` over the ranks (each rank logs its own rows' loss;
    equal-sized halves average to the global batch's)."""
    per_rank = [{h["step"]: h[key] for h in r["history"] if key in h} for r in ranks]
    return {s: sum(p[s] for p in per_rank) / len(per_rank) for s in per_rank[0]}


def assert_same_run(ranks, reference, steps):
    ref_loss = {h["step"]: h["train/loss"] for h in reference.history if "train/loss" in h}
    ref_norm = {h["step"]: h["train/grad_norm"] for h in reference.history
                if "train/grad_norm" in h}
    loss, norm = step_means(ranks), step_means(ranks, "train/grad_norm")
    assert sorted(loss) == sorted(ref_loss) == list(range(1, steps + 1))
    for s in ref_loss:
        assert loss[s] == pytest.approx(ref_loss[s], rel=2e-5), s
        assert norm[s] == pytest.approx(ref_norm[s], rel=2e-5), s  # the global norm
    assert ref_norm[1] > 0.05  # clipping was active


def assert_same_weights(checkpoint, reference_checkpoint):
    state, _ = load_checkpoint(checkpoint)  # a sharded one is consolidated
    ref, _ = load_checkpoint(reference_checkpoint)
    assert state["model"].keys() == ref["model"].keys()
    for key, value in ref["model"].items():
        assert torch.allclose(state["model"][key], value, atol=2e-6), key


@pytest.mark.parametrize("kind", ["base", "ft"])
def test_fsdp_trains_like_ddp_and_like_one_worker_at_twice_the_batch(tmp_path, two_ranks,
                                                                      kind):
    """Baseline and Free Transformer (exact mapper, chunked backward): 10 steps, the
    gradient norm (global) and clipping (active) compared at every step."""
    _, runs, _ = two_ranks
    latent = ["model.latent_dim=0"] if kind == "base" else []
    one = train_loop(tiny(tmp_path, *latent, "training.batch_size=8", "scaling.use_ray=false"))
    names = [n for n in runs if n.startswith(f"{kind}_")]
    assert len(names) == (2 if kind == "base" else 4)
    for name in names:
        assert_same_run(runs[name], one, steps=10)
        if name.endswith("_ddp"):
            continue
        assert_same_weights(runs[name][0]["checkpoint"], one.checkpoint)
    assert step_means(runs[f"{kind}_fsdp"]) == pytest.approx(step_means(runs[f"{kind}_ddp"]),
                                                            rel=2e-5)


def test_sharded_checkpoint_resumes_at_another_world_size(tmp_path, two_ranks, capsys):
    """Written by 2 FSDP ranks: resumed by 1 FSDP rank and by one plain process, each
    with the global batch of the 2 (4 rows each) and the same next-step losses; and
    ``freetf generate`` / ``eval`` read it in one process."""
    out, runs, _ = two_ranks
    root = out / "two" / "ckpt"
    step3 = root / "step_000003"
    files = {p.name for p in (step3 / "shards").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= files  # each rank's own shards
    listed = json.loads((step3 / "meta.json").read_text())["files"]  # the completion check's
    assert {f"shards/{name}" for name in files} | {"state.pt", "config.yaml"} == set(listed)
    state, _ = load_checkpoint(step3, consolidate=False)
    assert "model" not in state and "optimizer" not in state and len(state["rng"]) == 2
    expected = {s: v for s, v in step_means(runs["two"]).items() if s > 3}

    resumed = run_ranks(1, [("one_fsdp", [FSDP, "training.max_steps=6", "training.batch_size=8"],
                             str(step3))], tmp_path)["one_fsdp"]
    plain = train_loop(tiny(tmp_path / "plain", "training.max_steps=6", "training.batch_size=8",
                            "scaling.use_ray=false"), TrainContext(resume_from=step3))
    for run in (step_means(resumed), step_means([{"history": plain.history}])):
        assert sorted(run) == [4, 5, 6]
        for s in run:
            assert run[s] == pytest.approx(expected[s], rel=2e-5), s
    assert_same_weights(resumed[0]["checkpoint"], root / "step_000006")

    from freetf.cli import main

    outputs = []
    for checkpoint in (root, plain.checkpoint):  # sharded (via latest), then full
        assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "K>",
                     "--num-samples", "2", "--max-new-tokens", "12", "--seed", "3"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("K>")
    assert main(["eval", "--checkpoint", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 6


def test_full_checkpoint_resumes_into_fsdp(two_ranks):
    """A DDP-format checkpoint (full weights, positional optimizer state) resumes into 2
    FSDP ranks: each keeps its shards, AdamW's moments included."""
    _, runs, full = two_ranks
    resumed = step_means(runs["from_full"])
    expected = {h["step"]: h["train/loss"] for h in full.history if "train/loss" in h}
    assert sorted(resumed) == [4, 5, 6]
    for s in resumed:
        assert resumed[s] == pytest.approx(expected[s], rel=2e-5), s
    assert_same_weights(runs["from_full"][0]["checkpoint"], full.checkpoint)


def test_fsdp_shards_each_unit_and_reduces_only_when_asked(two_ranks):
    """Blocks, encoder, post-sampler and root are FSDP units holding half the rows on
    each of 2 ranks; a backward under gradient_sync(False) leaves the sharded gradients
    unreduced (the last micro-batch's backward reduces them).  With and without CPU
    offload."""
    out, _, _ = two_ranks
    for rank in (0, 1):
        found = json.loads((out / f"units.{rank}.json").read_text())
        for offload in ("false", "true"):
            facts = found[offload]
            assert facts["units"], (rank, offload)
            for name, (local, rows) in facts["rows"].items():
                assert local == (rows + 1 - rank) // 2, (rank, name)
            assert facts["unreduced_after_no_sync"] and facts["reduced_after_sync"]


@pytest.fixture
def one_rank(tmp_path):
    """A one-rank gloo process group in this process (the spawned ranks' code runs where
    mutation testing cannot see it)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("latent_dim", [0, 4], ids=["baseline", "free"])
def test_apply_fsdp_shards_each_unit_under_its_precision_policy(tmp_path, one_rank,
                                                                monkeypatch, latent_dim):
    """Every unit and the root get the policy of ``mixed_precision`` (on CUDA bf16; here
    fp64, which a CPU run can compute): the sharded model's logits are the fp64 model's.
    Only FSDP2's returned-a-view warning is silenced."""
    import copy
    import warnings

    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

    from freetf.model.transformer import FreeTransformer
    from freetf.training import parallel

    cfg = tiny(tmp_path, FSDP, f"model.latent_dim={latent_dim}")
    model = FreeTransformer(cfg.model)
    reference = copy.deepcopy(model).double()
    monkeypatch.setattr(parallel, "mixed_precision",
                        lambda cfg, device: MixedPrecisionPolicy(param_dtype=torch.float64))
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    torch.manual_seed(1)  # the same Z in both
    expected = reference(ids)[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert apply_fsdp(model, cfg, torch.device("cpu")) is model
        torch.manual_seed(1)
        logits = model(ids)[0]
        warnings.warn("another warning", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in seen]
    assert "another warning" in messages and not [m for m in messages if "a view" in m]
    units = [model, *model.blocks] + ([model.encoder, model.mapper] if latent_dim else [])
    assert [m for m in model.modules() if isinstance(m, FSDPModule)] == units
    assert logits.dtype == torch.float64
    assert torch.allclose(logits, expected, rtol=1e-9, atol=1e-9)


def _abort_once(rank, marker):
    if not marker.exists():
        marker.touch()
        print("rank about to abort", file=sys.stderr, flush=True)
        os.abort()
    (marker.parent / f"again.{rank}.json").write_text("{}")


def test_a_rank_that_dies_of_a_signal_is_named_with_its_stderr_and_run_once_more(tmp_path):
    """The harness itself: a rank's abort raises RankDied with the rank's last stderr
    line; the module's runs warn and run once more, from empty folders."""
    marker = tmp_path / "marker"
    with pytest.raises(RankDied, match="rank 0 died of SIGABRT: rank about to abort"):
        spawn_ranks(1, _abort_once, marker)
    marker.unlink()
    (tmp_path / "job").mkdir()
    (tmp_path / "job.0.json").write_text("{}")
    with pytest.warns(UserWarning, match="run again: rank 0 died of SIGABRT"):
        spawn_ranks_twice_at_most(1, _abort_once, tmp_path, ["job"], marker)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.0.json", "marker"]
    marker.unlink()
    with pytest.raises(RankDied), pytest.warns(UserWarning, match="run again"):
        spawn_ranks_twice_at_most(1, _abort_always, tmp_path, [], marker)  # dies both times


def _abort_always(rank, marker):
    os.abort()


def test_clip_grad_norm_returns_the_unclipped_norm_when_off():
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    grads = [p.grad.clone() for p in model.parameters()]
    assert clip_grad_norm(model.parameters(), 0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


def test_clip_grad_norm_scales_the_gradients_to_a_max_norm_below_one():
    model = torch.nn.Linear(3, 2)
    model(torch.full((1, 3), 4.0)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.cat([g.flatten() for g in grads]).norm()  # sqrt(2 * 48 + 2) ~ 9.9
    assert clip_grad_norm(model.parameters(), 0.5).item() == pytest.approx(norm.item())
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(p.grad, g * 0.5 / norm, rtol=1e-5)


def test_mixed_precision_policy_only_for_amp_on_cuda():
    from freetf.training.parallel import mixed_precision

    cfg = load_config("freetf/configs/tiny.yaml", ["scaling.strategy=fsdp"])
    policy = mixed_precision(cfg, torch.device("cuda"))  # amp=auto: bf16 on CUDA
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert mixed_precision(cfg, torch.device("cpu")) is None
    assert mixed_precision(cfg.replace(["training.amp=off"]), torch.device("cuda")) is None


def test_fsdp_config_needs_the_distributed_path(tmp_path):
    with pytest.raises(ConfigError, match="scaling.strategy='fsdp' needs the distributed"):
        tiny(tmp_path, "scaling.strategy=fsdp", "scaling.use_ray=false")
    with pytest.raises(ConfigError, match="scaling.num_workers >= 1"):
        tiny(tmp_path, "scaling.strategy=fsdp", "scaling.num_workers=0")
    with pytest.raises(ConfigError, match="training.amp='fp16'"):
        tiny(tmp_path, "scaling.strategy=fsdp", "training.amp=fp16")
    with pytest.raises(ConfigError, match="scaling.strategy"):
        tiny(tmp_path, "scaling.strategy=zero3")
    # a runner without a process group (a Tune trial running the loop itself) refuses it
    with pytest.raises(ConfigError, match="needs a process group"):
        train_loop(tiny(tmp_path, "scaling.strategy=fsdp", "training.max_steps=1"))


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_fsdp_composes_with_torch_compile(tmp_path):
    """training.compile=true on FSDP2 units: the eager FSDP run's losses (minutes of
    compilation on CPU, hence heavy)."""
    common = ["training.batch_size=4", FSDP, "training.max_steps=3"]
    runs = run_ranks(2, [("compiled", [*common, "training.compile=true"], None),
                         ("eager", common, None)], tmp_path)
    compiled, eager = step_means(runs["compiled"]), step_means(runs["eager"])
    assert sorted(compiled) == [1, 2, 3]
    assert compiled == pytest.approx(eager, rel=1e-5)
