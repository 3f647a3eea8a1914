"""A checkpoint directory's files: the write error, meta.json's file list, the prepared
data's tokenizer, the OS cause of a failed write, pruning and the ``step_*`` folders."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from freetf import load_config
from freetf.training.checkpoint_files import (
    CheckpointWriteError,
    atomic_write_text,
    attempt,
    incomplete_reason,
    publish,
    replace_dir,
    step_folders,
    write_failure,
    write_files,
)

pytestmark = pytest.mark.timeout(60)

NO_SPACE = os.strerror(errno.ENOSPC)


def test_a_write_error_keeps_its_fields_through_pickle():
    """Ray sends a worker's error to the driver pickled: path, cause and last good
    checkpoint arrive whole, and the exception's one argument is the path."""
    err = CheckpointWriteError("runs/a/step_000004", NO_SPACE, "runs/a/step_000002")
    assert err.args == ("runs/a/step_000004",)
    assert err.last_good == Path("runs/a/step_000002")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is CheckpointWriteError
    assert (back.path, back.cause, back.last_good) == (
        Path("runs/a/step_000004"), NO_SPACE, Path("runs/a/step_000002"))
    assert str(back) == str(err) == (
        f"cannot write the checkpoint runs/a/step_000004: {NO_SPACE}; the last good "
        f"checkpoint is runs/a/step_000002 (continue from it with --resume "
        f"runs/a/step_000002)")


def test_meta_json_lists_the_files_not_folders_and_numbers_as_floats(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "0.distcp").write_bytes(b"abc")
    cfg = load_config()
    write_files(tmp_path, {"step": 1}, cfg, {"step": 1, "loss": np.float32(0.5)},
                written={"shards/0.distcp": 3})
    files = {"shards/0.distcp": 3,
             "state.pt": (tmp_path / "state.pt").stat().st_size,
             "config.yaml": len(cfg.to_yaml().encode())}
    assert (tmp_path / "meta.json").read_text() == json.dumps(
        {"step": 1, "loss": 0.5, "files": files}, indent=2)


def _prepared(folder: Path, meta: dict) -> Path:
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "tok.json").write_text('{"model": "bpe"}')
    (folder / "train.bin").write_bytes(b"")
    return folder


@pytest.mark.parametrize("meta, tokenizer", [
    ({"tokenizer": {"kind": "bpe", "file": "tok.json"}}, True),
    ({"tokenizer": {"kind": "bytes", "file": None}}, False),
    ({"vocab_size": 256}, False),  # a meta.json without a tokenizer entry
])
def test_the_prepared_datas_meta_and_tokenizer_are_copied(tmp_path, meta, tokenizer):
    data = _prepared(tmp_path / "data", meta)
    cfg = load_config(overrides=["data.dataset_name=tokens", f"data.path={data}"])
    (tmp_path / "c").mkdir()
    write_files(tmp_path / "c", {"step": 1}, cfg, None)
    names = {"state.pt", "config.yaml", "meta.json", "data_meta.json"}
    assert {p.name for p in (tmp_path / "c").iterdir()} == (
        names | {"tokenizer.json"} if tokenizer else names)
    assert (tmp_path / "c" / "data_meta.json").read_text() == json.dumps(meta)
    if tokenizer:
        assert (tmp_path / "c" / "tokenizer.json").read_text() == '{"model": "bpe"}'


def test_a_prepared_folder_without_meta_json_adds_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = load_config(overrides=["data.dataset_name=tokens", f"data.path={tmp_path / 'data'}"])
    (tmp_path / "c").mkdir()
    write_files(tmp_path / "c", {"step": 1}, cfg, None)
    assert {p.name for p in (tmp_path / "c").iterdir()} == {
        "state.pt", "config.yaml", "meta.json"}


def test_an_old_checkpoint_missing_both_files_names_both(tmp_path):
    (tmp_path / "meta.json").write_text('{"step": 1}')
    assert incomplete_reason(tmp_path) == "state.pt and config.yaml missing"


def test_write_failure_finds_the_os_error_and_its_number():
    assert write_failure(OSError(errno.ENOSPC, "a long paragraph")) == NO_SPACE
    # an OSError whose errno is not set (pyarrow's): the number in its text
    assert write_failure(OSError("[Errno 28] Error writing bytes")) == NO_SPACE
    assert write_failure(OSError("IOError: [errno 122] quota")) == os.strerror(122)
    assert write_failure(OSError("the mount is gone")) == "the mount is gone"
    assert write_failure(OSError()) == "OSError"
    assert write_failure(FileNotFoundError()) == "FileNotFoundError"
    caused = RuntimeError("unexpected pos 64")
    caused.__cause__ = OSError(errno.ENOSPC, "No space")
    assert write_failure(caused) == NO_SPACE
    during = RuntimeError("unexpected pos 64")
    during.__context__ = OSError(errno.EDQUOT, "Quota")
    assert write_failure(during) == os.strerror(errno.EDQUOT)
    assert write_failure(RuntimeError("no OS error")) is None


def test_attempt_returns_the_cause_and_raises_or_names_other_errors():
    def fail(err):
        raise err

    assert attempt(lambda: None) is None
    assert attempt(fail, OSError(errno.ENOSPC, "x")) == NO_SPACE
    with pytest.raises(ValueError, match="a bug"):
        attempt(fail, ValueError("a bug"))
    assert attempt(fail, ValueError(" a bug\nits detail"), any_error=True) == "ValueError: a bug"
    assert attempt(fail, ValueError(), any_error=True) == "ValueError"
    assert attempt(fail, ValueError(" \n "), any_error=True) == "ValueError"


def test_a_failed_pointer_write_leaves_its_error_and_no_temporary_file(tmp_path, monkeypatch):
    def full(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)  # fails before the file exists
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "latest", "step_000002")
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_replace_dir_replaces_the_old_directory_whole(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "state.pt").write_text("new")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "stale.pt").write_text("old")
    replace_dir(tmp_path / "new", tmp_path / "old")
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["state.pt"]


def test_step_folders_are_folders_named_step_and_a_number(tmp_path):
    for name in ("step_000010", "step_9", "step_x5", "step_latest"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_000011").write_text("a file")
    assert [p.name for p in step_folders(tmp_path)] == ["step_9", "step_000010"]


def test_publish_prunes_past_an_old_folder_it_cannot_remove(tmp_path):
    """A step folder that is a link (rmtree refuses links) is left, not an error."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "state.pt").write_text("kept")
    (tmp_path / "step_000001").symlink_to(tmp_path / "elsewhere")
    for step in (2, 3):
        (tmp_path / f"step_00000{step}").mkdir()
    publish(tmp_path, tmp_path / "step_000003", keep=1)
    assert (tmp_path / "latest").read_text() == "step_000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "elsewhere", "latest", "step_000001", "step_000003"]
    assert (tmp_path / "elsewhere" / "state.pt").read_text() == "kept"
