"""Sharded checkpoints (freetf.training.sharded_checkpoint) written and read in one
process, without a process group: the folder, its meta.json, a failed write, a rank
writing into a root of its own, a load into a plain model and optimizer.
(tests/test_fsdp.py saves and resumes them across spawned FSDP ranks.)"""

from __future__ import annotations

import errno
import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from freetf import FreeTransformer, load_config
from freetf.training import sharded_checkpoint
from freetf.training.checkpoint import CheckpointWriteError, load_checkpoint
from freetf.training.sharded_checkpoint import (
    consolidated_model_state,
    load_sharded,
    save_sharded,
)

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]


@pytest.fixture
def trained():
    """A small model and AdamW after one step: (cfg, model, optimizer)."""
    cfg = load_config(overrides=["model.vocab_size=32", "model.hidden_dim=32",
                                 "model.num_layers=2", "model.num_heads=2",
                                 "model.latent_dim=3", "model.max_seq_len=66"])
    model = FreeTransformer(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sum(p.square().sum() for p in model.parameters()).backward()
    optimizer.step()
    return cfg, model, optimizer


def _save(root, step, trained, rank=0, **kwargs):
    cfg, model, optimizer = trained
    return save_sharded(root, step, model, optimizer, {"step": step}, cfg, {"step": step},
                        rank=rank, **kwargs)


def test_the_folder_holds_the_shards_beside_state_config_and_meta(tmp_path, trained):
    stale = tmp_path / ".step_000003.partial"  # left by a save that crashed
    (stale / "shards").mkdir(parents=True)
    (stale / "shards" / "junk.distcp").write_text("x")
    path = _save(tmp_path, 3, trained)
    assert path == tmp_path / "step_000003" and not stale.exists()
    shards = sorted(p.name for p in (path / "shards").iterdir())
    assert shards == [".metadata", "__0_0.distcp"]
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "meta.json", "shards",
                                                      "state.pt"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 3 and meta["format"] == "sharded"
    assert meta["files"] == {name: (path / name).stat().st_size for name in
                             ["shards/.metadata", "shards/__0_0.distcp", "state.pt",
                              "config.yaml"]}
    assert torch.load(path / "state.pt") == {"step": 3}
    assert (tmp_path / "latest").read_text() == "step_000003"


def test_saves_keep_the_newest_three_by_default_or_as_asked(tmp_path, trained):
    for step in (1, 2, 3, 4):
        _save(tmp_path / "default", step, trained)
        _save(tmp_path / "two", step, trained, keep=2)
    names = lambda root: sorted(p.name for p in root.glob("step_*"))  # noqa: E731
    assert names(tmp_path / "default") == ["step_000002", "step_000003", "step_000004"]
    assert names(tmp_path / "two") == ["step_000003", "step_000004"]


def test_a_rank_with_a_root_of_its_own_keeps_only_its_shards(tmp_path, trained):
    """Under Ray Train each worker saves into its own folder; rank 0 alone writes the
    rest of the state, and Ray merges the folders."""
    path = _save(tmp_path, 5, trained, rank=1)
    assert path == tmp_path / "step_000005"
    assert sorted(p.name for p in path.iterdir()) == ["shards"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000005"]


def test_a_load_into_a_plain_model_restores_weights_and_adamw_state(tmp_path, trained):
    cfg, model, optimizer = trained
    path = _save(tmp_path, 1, trained)
    torch.manual_seed(1)
    fresh = FreeTransformer(cfg.model)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    sum(p.sum() for p in fresh.parameters()).backward()
    fresh_optimizer.step()  # other moments, to be replaced
    load_sharded(path, fresh, fresh_optimizer)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    ours, theirs = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for index, moments in ours["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[key], theirs["state"][index][key]), (index, key)
    weights = consolidated_model_state(path, FreeTransformer(cfg.model))
    for name, value in model.state_dict().items():
        assert torch.equal(weights[name], value), name


class _DcpFailure(Exception):
    """What DCP raises when a rank's write fails: ``failures`` maps rank -> error (or
    (error, traceback))."""

    def __init__(self, failures):
        super().__init__("CheckpointException ranks:...")
        self.failures = failures


@pytest.mark.parametrize("raised", [
    OSError(errno.ENOSPC, "No space left on device"),
    _DcpFailure({0: ValueError("no I/O here"),
                 1: (OSError(errno.ENOSPC, "No space left on device"), "traceback")}),
    _DcpFailure({2: OSError(errno.ENOSPC, "No space left on device")}),
], ids=["os-error", "rank-1-tuple", "rank-2-plain"])
def test_a_failed_shard_write_is_one_error_naming_the_checkpoint(tmp_path, trained,
                                                                 monkeypatch, raised):
    _save(tmp_path, 1, trained)

    def save(*args, **kwargs):
        (tmp_path / ".step_000002.partial" / "shards").mkdir(parents=True)
        raise raised

    monkeypatch.setattr(dcp, "save", save)
    with pytest.raises(CheckpointWriteError) as info:
        _save(tmp_path, 2, trained)
    assert (info.value.path, info.value.cause) == (tmp_path / "step_000002",
                                                   "No space left on device")
    assert info.value.__cause__ is raised
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]


def _interrupt_while_a_write_failed() -> KeyboardInterrupt:
    interrupt = KeyboardInterrupt()
    interrupt.__context__ = OSError(errno.ENOSPC, "No space left on device")
    return interrupt


@pytest.mark.parametrize("raised", [ValueError("a bug"), _interrupt_while_a_write_failed(),
                                    _DcpFailure({0: ValueError("a bug")})],
                         ids=["bug", "ctrl-c-during-a-failed-write", "dcp-bug"])
def test_an_error_that_is_not_a_write_failure_is_raised_as_it_is(tmp_path, trained,
                                                                  monkeypatch, raised):
    monkeypatch.setattr(dcp, "save", lambda *a, **k: (_ for _ in ()).throw(raised))
    with pytest.raises(type(raised)) as info:
        _save(tmp_path, 2, trained)
    assert info.value is raised


@pytest.mark.parametrize("failing", ["write_files", "replace_dir", "publish"])
def test_a_failed_state_or_publish_is_one_error_and_leaves_no_partial(tmp_path, trained,
                                                                      monkeypatch, failing):
    _save(tmp_path, 1, trained)

    def fail(*args):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(sharded_checkpoint, failing, fail)
    with pytest.raises(CheckpointWriteError) as info:
        _save(tmp_path, 2, trained)
    assert (info.value.path, info.value.cause) == (tmp_path / "step_000002",
                                                   "Disk quota exceeded")
    assert not (tmp_path / ".step_000002.partial").exists()
    assert load_checkpoint(tmp_path / "step_000001")[0]["step"] == 1
