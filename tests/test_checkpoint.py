"""Checkpoints: atomic, self-describing, loaded as data, pruned to keep K."""

from __future__ import annotations

import pytest
import torch

from freetf import FreeTransformer, load_config
from freetf.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    save_to_root,
    write_checkpoint,
)

pytestmark = pytest.mark.timeout(60)


def test_roundtrip_rebuilds_model_from_checkpoint_alone(tmp_path, tiny_model_cfg):
    cfg = load_config(overrides=["model.vocab_size=32", "model.hidden_dim=32",
                                 "model.num_layers=2", "model.num_heads=2",
                                 "model.latent_dim=3", "model.max_seq_len=66"])
    model = FreeTransformer(cfg.model)
    path = write_checkpoint(tmp_path / "c", {"model": model.state_dict(), "step": 7}, cfg)
    rebuilt, cfg2, state = load_model(path)
    assert cfg2 == cfg and state["step"] == 7
    for (n, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n


def test_root_latest_and_keep(tmp_path):
    cfg = load_config()
    for step in range(1, 6):
        save_to_root(tmp_path, step, {"step": step}, cfg, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000004", "step_000005"]
    state, _ = load_checkpoint(tmp_path)
    assert state["step"] == 5
    assert not list(tmp_path.glob(".step_*"))  # no temp dirs left behind


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    cfg = load_config()
    write_checkpoint(tmp_path / "c", {"step": 1}, cfg)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        write_checkpoint(tmp_path / "c", {"step": 2}, cfg)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "c")[0]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_corrupt_and_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a freetf checkpoint"):
        load_checkpoint(tmp_path / "empty")
    path = write_checkpoint(tmp_path / "c", {"step": 1}, load_config())
    (path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value) and "likely succeed" not in str(info.value)


def test_code_in_a_checkpoint_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "c", {"step": 1}, load_config())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path / "state.pt")
    with pytest.raises(CheckpointError, match="never runs code") as info:
        load_checkpoint(path)
    # never the advice to retry with weights_only=False (it would run the file's code)
    message = str(info.value)
    assert "weights_only" not in message and "likely succeed" not in message
    assert "add_safe_globals" not in message and "print" in message
