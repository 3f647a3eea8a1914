"""freetf.training.loop_state: the training state saved at a step and resumed from it, on
a tiny model in one process (no training loop), against what was saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import freetf.training.loop_state as loop_state
from freetf import load_config
from freetf.data.datasets import build_data
from freetf.data.stream import BatchStream
from freetf.model.transformer import FreeTransformer
from freetf.training.checkpoint import rng_states
from freetf.training.checkpoint_files import CheckpointWriteError
from freetf.training.loop_state import resume_state, save_state
from freetf.training.schedules import build_lr_scheduler

pytestmark = pytest.mark.timeout(60)
CPU = torch.device("cpu")


class Ctx:
    """One rank of a run: ``all_gather`` adds the other ranks' objects after its own (in
    rank order for rank 0), ``from_main`` answers rank 0's object where it is given."""

    def __init__(self, root, rank=0, others=(), main=None, latest=None):
        self.root, self.rank, self.others, self.main = root, rank, list(others), main
        self.latest, self.calls, self.roots_asked_for = latest, [], []

    @property
    def is_main(self):
        return self.rank == 0

    def all_gather(self, obj):
        return [obj, *self.others] if self.rank == 0 else [*self.others, obj]

    def from_main(self, obj):
        self.calls.append(("from_main", obj))
        return obj if self.rank == 0 else self.main

    def checkpoint_root(self, cfg):
        self.roots_asked_for.append(cfg)
        return self.root

    def latest_checkpoint(self):
        return self.latest


def _state(cfg, seed):
    """A model, AdamW with moments, a scheduler and a stream moved on by ``seed`` steps."""
    torch.manual_seed(seed)
    model = FreeTransformer(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = build_lr_scheduler(optimizer, 2, 10, 1e-4)
    stream = BatchStream(build_data(cfg).train, 4, seed=cfg.data.seed)
    for _ in range(seed):
        model(next(stream))[0].sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler, stream


@pytest.fixture
def cfg(tmp_path):
    return load_config("freetf/configs/tiny.yaml", [
        "model.latent_dim=0", "model.num_layers=1", "data.num_samples=64",
        "data.val_samples=8", f"checkpoint.dir={tmp_path / 'unused'}", "checkpoint.keep=2"])


def test_a_saved_state_resumes_into_fresh_objects(tmp_path, cfg):
    model, optimizer, scheduler, stream = _state(cfg, 3)
    ctx = Ctx(tmp_path / "root")
    torch.manual_seed(11)
    path = save_state(ctx, cfg, model, optimizer, scheduler, stream, 7,
                      {"train/loss": 1.5}, CPU)
    after_save = torch.rand(3)  # the CPU generator's draws after the saved state
    assert path == tmp_path / "root" / "step_000007"
    assert (tmp_path / "root" / "latest").read_text().strip() == "step_000007"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and meta["train/loss"] == 1.5
    saved = torch.load(path / "state.pt", weights_only=True)
    assert set(saved) == {"scheduler", "step", "data", "rng", "model", "optimizer"}
    assert saved["step"] == 7 and saved["data"] == stream.state_dict()
    assert len(saved["rng"]) == 1 and saved["scheduler"] == scheduler.state_dict()
    expected_batch = next(stream)

    fresh = _state(cfg, 0)
    ctx.latest = tmp_path / "root"  # a root: resolved to its latest checkpoint
    torch.manual_seed(99)
    assert resume_state(ctx, *fresh, CPU) == (7, path)
    assert torch.equal(torch.rand(3), after_save)
    m, o, s, st = fresh
    for (name, a), b in zip(model.state_dict().items(), m.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state.values(), o.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and a["step"] == b["step"]
    assert s.last_epoch == 3 and s.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(next(st), expected_batch)


def test_only_the_newest_checkpoints_are_kept_and_other_ranks_write_none(tmp_path, cfg):
    state = _state(cfg, 1)
    for step in (1, 2, 3):
        save_state(Ctx(tmp_path), cfg, *state, step, {}, CPU)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000003"]
    other = Ctx(tmp_path / "other", rank=1, others=[rng_states(CPU)])
    assert save_state(other, cfg, *state, 4, {}, CPU) is None
    assert not (tmp_path / "other").exists()


def test_a_fresh_start_loads_nothing(tmp_path, cfg):
    model, optimizer, scheduler, stream = _state(cfg, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert resume_state(Ctx(tmp_path), model, optimizer, scheduler, stream, CPU) == (0, None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scheduler.last_epoch == 0 and not optimizer.state


def test_each_rank_saves_every_ranks_generators_and_resumes_its_own(tmp_path, cfg):
    state = _state(cfg, 1)
    torch.manual_seed(1)
    rank1 = rng_states(CPU)
    rank1_draws = torch.rand(3)
    torch.manual_seed(0)
    path = save_state(Ctx(tmp_path, others=[rank1]), cfg, *state, 5, {}, CPU)
    rank0_draws = torch.rand(3)
    saved = torch.load(path / "state.pt", weights_only=True)["rng"]
    assert torch.equal(saved[1]["cpu"], rank1["cpu"])
    for rank, draws in ((1, rank1_draws), (0, rank0_draws)):
        torch.manual_seed(42)
        resume_state(Ctx(tmp_path, rank=rank, latest=path), *_state(cfg, 0), CPU)
        assert torch.equal(torch.rand(3), draws), rank


def test_a_failed_write_names_the_last_good_checkpoint_on_every_rank(tmp_path, cfg,
                                                                    monkeypatch):
    state = _state(cfg, 1)

    def full_disk(root, *args, **kwargs):
        raise CheckpointWriteError(root / "step_000004", "disk full")

    monkeypatch.setattr(loop_state, "save_to_root", full_disk)
    ctx = Ctx(tmp_path)
    with pytest.raises(CheckpointWriteError) as info:
        save_state(ctx, cfg, *state, 4, {}, CPU, last_good=tmp_path / "step_000002")
    assert info.value.last_good == tmp_path / "step_000002"
    assert ctx.calls == [("from_main", info.value)]  # rank 0 tells the others
    with pytest.raises(CheckpointWriteError) as info:
        save_state(ctx, cfg, *state, 4, {}, CPU)
    assert info.value.last_good is None
    # another rank learns of rank 0's failure; a last good one it already names is kept
    error = CheckpointWriteError(tmp_path / "step_000004", "disk full", tmp_path / "keep")
    other = Ctx(tmp_path, rank=1, others=[rng_states(CPU)], main=error)
    with pytest.raises(CheckpointWriteError) as info:
        save_state(other, cfg, *state, 4, {}, CPU, last_good=tmp_path / "step_000002")
    assert info.value is error and error.last_good == tmp_path / "keep"
    assert other.calls == [("from_main", None)]


def test_under_fsdp_every_rank_writes_its_shards_and_raises_its_own_failure(
        tmp_path, cfg, monkeypatch):
    model, optimizer, scheduler, stream = _state(cfg, 1)
    calls = []

    def save_sharded(root, step, m, o, state, config, meta, rank, keep):
        calls.append((root, step, m, o, set(state), state["step"], config, meta, rank, keep))
        if rank == 2:
            raise CheckpointWriteError(root / "shard", "disk full")
        return root / "sharded"

    monkeypatch.setattr(loop_state, "is_fsdp", lambda m: m is model)  # this model only
    monkeypatch.setattr(loop_state, "save_sharded", save_sharded)
    ctx = Ctx(tmp_path, rank=1, others=[rng_states(CPU)])
    got = save_state(ctx, cfg, model, optimizer, scheduler, stream, 6, {"a": 1.0}, CPU)
    assert got == tmp_path / "sharded" and ctx.calls == []  # no broadcast: FSDP's agree
    assert ctx.roots_asked_for == [cfg]  # the root of this run's config
    assert calls == [(tmp_path, 6, model, optimizer, {"scheduler", "step", "data", "rng"}, 6,
                      cfg, {"step": 6, "a": 1.0}, 1, 2)]
    with pytest.raises(CheckpointWriteError) as info:
        save_state(Ctx(tmp_path, rank=2, others=[rng_states(CPU)]), cfg, model, optimizer,
                   scheduler, stream, 6, {}, CPU, last_good=tmp_path / "good")
    assert info.value.last_good == tmp_path / "good"


@pytest.mark.parametrize("sharded, fsdp, loader", [(True, False, "load_sharded"),
                                                   (True, True, "load_sharded"),
                                                   (False, True, "load_full_into_sharded")])
def test_a_resume_reads_shards_or_a_full_checkpoint_by_what_it_is(tmp_path, cfg,
                                                                  monkeypatch, sharded,
                                                                  fsdp, loader):
    model, optimizer, scheduler, stream = _state(cfg, 0)
    saved = _state(cfg, 2)
    state = {"scheduler": saved[2].state_dict(), "step": 2, "data": saved[3].state_dict(),
             "rng": [rng_states(CPU)], "model": {}, "optimizer": {}}
    calls = []
    monkeypatch.setattr(loop_state, "resolve_checkpoint",
                        lambda p: calls.append(("resolve", p)) or Path(p) / "step_2")
    monkeypatch.setattr(loop_state, "load_checkpoint",
                        lambda p, consolidate: calls.append(("load", p, consolidate))
                        or (state, None))
    monkeypatch.setattr(loop_state, "is_sharded", lambda p: sharded)
    monkeypatch.setattr(loop_state, "is_fsdp", lambda m: fsdp and m is model)
    for name in ("load_sharded", "load_full_into_sharded"):
        monkeypatch.setattr(loop_state, name,
                            lambda *a, name=name: calls.append((name, *a)))
    got = resume_state(Ctx(tmp_path, latest=tmp_path), model, optimizer, scheduler, stream,
                       CPU)
    assert got == (2, tmp_path / "step_2")
    arg = tmp_path / "step_2" if loader == "load_sharded" else state
    assert calls == [("resolve", tmp_path), ("load", tmp_path / "step_2", False),
                     (loader, arg, model, optimizer)]
    assert scheduler.last_epoch == 2 and stream.state_dict() == saved[3].state_dict()
