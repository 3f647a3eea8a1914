"""Checkpoints: atomic, self-describing, loaded as data, pruned to keep K."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil

import pytest
import torch

from freetf import FreeTransformer, load_config
from freetf.training import checkpoint_files
from freetf.training.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
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


def test_keep_and_latest_count_steps_as_numbers_past_six_digits(tmp_path):
    """``step_1000000`` sorts before ``step_999999`` by name: pruning by name deleted the
    newest checkpoint there, and a run folder's latest was the older one."""
    from freetf.training.run_folder import latest_checkpoint

    cfg = load_config()
    for step in (999_998, 999_999, 1_000_000):
        save_to_root(tmp_path, step, {"step": step}, cfg, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_1000000", "step_999999"]
    assert load_checkpoint(tmp_path)[0]["step"] == 1_000_000
    (tmp_path / "latest").unlink()  # Ray Train's folders: no pointer, the highest step
    assert latest_checkpoint(tmp_path).name == "step_1000000"


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    cfg = load_config()
    write_checkpoint(tmp_path / "c", {"step": 1}, cfg)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(CheckpointWriteError, match="disk full"):
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
    size = (path / "state.pt").stat().st_size  # damaged, not cut short (see below)
    (path / "state.pt").write_bytes(b"garbage"[:1] * size)
    with pytest.raises(CheckpointError, match="cannot read") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value) and "likely succeed" not in str(info.value)


def test_code_in_a_checkpoint_is_refused(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path / "c", {"step": 1}, load_config())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path / "state.pt")
    _restamp(path)  # a crafted checkpoint whose meta.json agrees with its files
    with pytest.raises(CheckpointError, match="never runs code") as info:
        load_checkpoint(path)
    # never the advice to retry with weights_only=False (it would run the file's code)
    message = str(info.value)
    assert "weights_only" not in message and "likely succeed" not in message
    assert "add_safe_globals" not in message and "print" in message
    # refused where torch's own default is data-only too: freetf asks for it, whatever
    # the torch version (before 2.6 the default ran code) or the environment says
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="never runs code"):
        load_checkpoint(path)


def _restamp(path):
    """Record the files' present sizes in meta.json, as a crafted checkpoint would."""
    meta = json.loads((path / "meta.json").read_text())
    meta["files"] = {name: (path / name).stat().st_size for name in meta["files"]}
    (path / "meta.json").write_text(json.dumps(meta))


class FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, path, room):
        self.file, self.room = open(path, "wb"), room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def fileno(self):
        return self.file.fileno()

    def close(self):
        self.file.close()
        super().close()


def test_a_full_disk_is_one_error_naming_the_checkpoint_and_its_cause(tmp_path, monkeypatch):
    """torch.save to a path says only 'unexpected pos' on a full disk; the checkpoint's
    files are written through Python, so the error is the OS's, and nothing is left."""
    cfg = load_config()
    save_to_root(tmp_path, 2, {"step": 2}, cfg)
    real_open = open
    monkeypatch.setattr(checkpoint_files, "open", lambda path, mode="r", *a, **k:
                        io.BufferedWriter(FullDisk(path, 100)) if mode == "wb"
                        else real_open(path, mode, *a, **k), raising=False)
    big = {"step": 4, "w": torch.zeros(10_000)}
    with pytest.raises(CheckpointWriteError) as info:
        save_to_root(tmp_path, 4, big, cfg)
    message = str(info.value)
    assert message == (f"cannot write the checkpoint {tmp_path / 'step_000004'}: No space "
                       f"left on device; no checkpoint of this run was saved before")
    assert "\n" not in message and "unexpected pos" not in message
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000002"]
    assert load_checkpoint(tmp_path)[0]["step"] == 2
    info.value.last_good = tmp_path / "step_000002"  # the loop fills it in
    assert str(info.value).endswith(f"the last good checkpoint is {tmp_path / 'step_000002'} "
                                    f"(continue from it with --resume "
                                    f"{tmp_path / 'step_000002'})")


@pytest.mark.parametrize("cut", ["no meta.json", "state.pt cut short", "empty config.yaml",
                                 "no tokenizer.json"])
def test_a_checkpoint_copied_in_part_is_refused_and_the_complete_one_named(tmp_path, cut):
    """Ray copies a checkpoint into storage_path file by file; a copy cut short (a full
    disk) is refused by generate, resume and export, which name the complete one."""
    cfg = load_config()
    for step in (2, 4):
        save_to_root(tmp_path, step, {"step": step, "w": torch.ones(1000)}, cfg)
    (tmp_path / "latest").unlink()  # as in Ray Train's storage_path/<run>
    broken = tmp_path / "step_000004"
    if cut == "no meta.json":
        (broken / "meta.json").unlink()
    elif cut == "state.pt cut short":
        data = (broken / "state.pt").read_bytes()
        (broken / "state.pt").write_bytes(data[: len(data) // 2])
    elif cut == "empty config.yaml":
        (broken / "config.yaml").write_text("")
    else:  # a file the checkpoint had (a prepared folder's tokenizer) did not arrive
        meta = json.loads((broken / "meta.json").read_text())
        meta["files"]["tokenizer.json"] = 1234
        (broken / "meta.json").write_text(json.dumps(meta))
    complete = tmp_path / "step_000002"
    with pytest.raises(CheckpointError, match="is incomplete") as info:
        load_checkpoint(broken)
    assert str(info.value).endswith(f"the newest complete checkpoint beside it is {complete}")
    assert resolve_checkpoint(tmp_path) == complete  # a root: its newest complete one
    assert load_checkpoint(tmp_path)[0]["step"] == 2
    shutil.rmtree(complete)
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_checkpoint(tmp_path)


def test_a_checkpoint_from_before_the_file_list_still_loads(tmp_path):
    path = write_checkpoint(tmp_path / "c", {"step": 3}, load_config())
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]
    (path / "meta.json").write_text(json.dumps(meta))
    assert load_checkpoint(path)[0]["step"] == 3
    (path / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="config.yaml missing"):
        load_checkpoint(path)


def test_a_checkpoint_makes_its_parents_and_its_temporary_folder_beside_it(tmp_path,
                                                                         monkeypatch):
    from freetf.training import checkpoint

    used = []

    def recording(directory, *args):
        used.append(directory)
        checkpoint_files.write_files(directory, *args)

    monkeypatch.setattr(checkpoint, "write_files", recording)
    path = write_checkpoint(tmp_path / "a" / "b" / "c", {"step": 1}, load_config(),
                            {"step": 1, "loss": 2.5})
    assert used[0].parent == tmp_path / "a" / "b" and used[0].name.startswith(".c.")
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["step"], meta["loss"]) == (1, 2.5)
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["c"]


def test_a_checkpoint_under_a_file_is_a_write_error_naming_it(tmp_path):
    (tmp_path / "f").write_text("not a folder")
    with pytest.raises(CheckpointWriteError) as info:
        write_checkpoint(tmp_path / "f" / "c", {"step": 1}, load_config())
    assert str(info.value) == (f"cannot write the checkpoint {tmp_path / 'f' / 'c'}: "
                               f"{os.strerror(errno.EEXIST)}; no checkpoint of this run was "
                               f"saved before")


def test_an_interrupt_during_a_failed_write_stays_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C while handling an OSError: the interrupt, not a write error, and no
    temporary folder left."""
    def interrupted(*a, **k):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise KeyboardInterrupt from None

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "c", {"step": 1}, load_config())
    assert list(tmp_path.iterdir()) == []


def test_save_to_root_keeps_three_and_passes_meta_on(tmp_path):
    cfg = load_config()
    for step in range(1, 6):
        save_to_root(tmp_path, step, {"step": step}, cfg, {"step": step, "loss": 0.25})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        "step_000003", "step_000004", "step_000005"]
    meta = json.loads((tmp_path / "step_000005" / "meta.json").read_text())
    assert (meta["step"], meta["loss"]) == (5, 0.25)


def test_a_latest_pointer_that_cannot_be_written_is_a_write_error_naming_it(tmp_path):
    (tmp_path / "latest" / "x").mkdir(parents=True)  # a folder where the pointer goes
    with pytest.raises(CheckpointWriteError) as info:
        save_to_root(tmp_path, 2, {"step": 2}, load_config())
    assert str(info.value) == (f"cannot write the checkpoint {tmp_path / 'latest'}: "
                               f"{os.strerror(errno.EISDIR)}; no checkpoint of this run was "
                               f"saved before")


def test_the_refusals_of_incomplete_checkpoints_name_what_there_is(tmp_path):
    cfg = load_config()
    for step in (2, 4):
        write_checkpoint(tmp_path / f"step_00000{step}", {"step": step}, cfg)
        (tmp_path / f"step_00000{step}" / "meta.json").unlink()
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(tmp_path)
    assert str(info.value) == (f"{tmp_path} holds no complete checkpoint (its step_000002, "
                               f"step_000004 are incomplete)")
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(tmp_path / "step_000004")
    assert str(info.value) == (f"{tmp_path / 'step_000004'} is incomplete (it has no "
                               f"meta.json, which is written last: a write or copy that did "
                               f"not finish); there is no complete checkpoint beside it")


def test_load_maps_tensors_to_the_asked_device_and_names_a_bad_config(tmp_path):
    path = write_checkpoint(tmp_path / "c", {"step": 1, "w": torch.ones(3)}, load_config())
    assert load_checkpoint(path, map_location="meta")[0]["w"].device.type == "meta"
    (path / "config.yaml").write_text("model:\n  nope: 1\n")
    _restamp(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path / 'config.yaml'}: ")
    assert "model.nope" in str(info.value)


def test_load_model_names_weights_that_do_not_fit_and_moves_to_the_device(tmp_path):
    cfg = load_config(overrides=["model.vocab_size=32", "model.hidden_dim=32",
                                 "model.num_layers=2", "model.num_heads=2",
                                 "model.latent_dim=3", "model.max_seq_len=66"])
    model = FreeTransformer(cfg.model)
    path = write_checkpoint(tmp_path / "c", {"model": model.state_dict()}, cfg)
    rebuilt, _, _ = load_model(path, device="meta")
    assert {p.device.type for p in rebuilt.parameters()} == {"meta"}
    bad = write_checkpoint(tmp_path / "bad", {"model": {}}, cfg)
    with pytest.raises(CheckpointError) as info:
        load_model(bad)
    assert str(info.value).startswith(f"{bad}: model weights do not match its config: ")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_loads_its_consolidated_weights_unless_asked_not_to(tmp_path):
    from freetf.training.sharded_checkpoint import save_sharded

    cfg = load_config(overrides=["model.vocab_size=32", "model.hidden_dim=32",
                                 "model.num_layers=2", "model.num_heads=2",
                                 "model.latent_dim=3", "model.max_seq_len=66"])
    model = FreeTransformer(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_sharded(tmp_path / "ckpt", 3, model, optimizer, {"step": 3}, cfg,
                        {"step": 3}, rank=0)
    state, _ = load_checkpoint(path)
    assert state["model"].keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(state["model"][name], value), name
    assert "model" not in load_checkpoint(path, consolidate=False)[0]
    (path / "config.yaml").write_text(cfg.replace({"model.hidden_dim": 64}).to_yaml())
    _restamp(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"cannot read the model shards of {path / 'shards'}: ")
    assert message.endswith("Size mismatch between saved torch.Size([32]) and current: "
                            "torch.Size([64]) for model.zeta")


@pytest.mark.parametrize("text, reason", [
    ("first line\nsecond line", "first line"),
    ("", "EOFError"),
    ("Weights only load failed. WeightsUnpickler error: Unsupported operand 149 "
     "(WeightsUnpickler error: inner).\n\nCheck the documentation",
     "the file is damaged or not a freetf checkpoint (Unsupported operand 149 "
     "(WeightsUnpickler error: inner))"),
    ("WeightsUnpickler error: Unsupported operand X. Please use something else.",
     "the file is damaged or not a freetf checkpoint (Unsupported operand X)"),
    ("WeightsUnpickler error: .Unsupported global_step key.",
     "the file is damaged or not a freetf checkpoint (.Unsupported global_step key)"),
])
def test_why_a_load_failed_in_one_line(text, reason):
    from freetf.training.checkpoint import _load_failure

    assert _load_failure(EOFError(text) if text else EOFError()) == reason


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_with_full_weights_in_its_state_keeps_them(tmp_path,
                                                                        monkeypatch):
    from freetf.training import checkpoint
    from freetf.training.sharded_checkpoint import save_sharded

    cfg = load_config(overrides=["model.vocab_size=32", "model.hidden_dim=32",
                                 "model.num_layers=2", "model.num_heads=2",
                                 "model.latent_dim=3", "model.max_seq_len=66"])
    model = FreeTransformer(cfg.model)
    path = save_sharded(tmp_path / "ckpt", 3, model, torch.optim.AdamW(model.parameters()),
                        {"step": 3}, cfg, {"step": 3}, rank=0)
    torch.save({"step": 3, "model": {"w": torch.full((2,), 7.0)}}, path / "state.pt")
    _restamp(path)
    assert torch.equal(load_checkpoint(path)[0]["model"]["w"], torch.full((2,), 7.0))
    # errors other than DCP's own: their first line, or their type's name
    torch.save({"step": 3}, path / "state.pt")
    _restamp(path)
    for err, first in [(ValueError(""), "ValueError"), (OSError("gone\ndetail"), "gone")]:
        monkeypatch.setattr(checkpoint, "consolidated_model_state",
                            lambda *a, err=err: (_ for _ in ()).throw(err))
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(info.value) == f"cannot read the model shards of {path / 'shards'}: {first}"


def test_rng_states_on_cpu_are_the_cpu_generators_and_restore_by_rank():
    from freetf.training.checkpoint import restore_rng_states, rng_states

    cpu = torch.device("cpu")
    torch.manual_seed(1)
    first = rng_states(cpu)
    assert first.keys() == {"cpu", "cuda"} and first["cuda"] is None
    assert torch.equal(first["cpu"], torch.get_rng_state())
    torch.manual_seed(2)
    second = rng_states(cpu)
    # a CUDA state in the checkpoint is not applied on a CPU device
    saved = [first, {"cpu": second["cpu"], "cuda": torch.zeros(16, dtype=torch.uint8)}]
    restore_rng_states(saved, 1, cpu)
    assert torch.equal(torch.get_rng_state(), second["cpu"])
    restore_rng_states(saved, 0, cpu)
    assert torch.equal(torch.get_rng_state(), first["cpu"])
    restore_rng_states(saved, 2, cpu)  # a rank the checkpoint has no state of keeps its own
    assert torch.equal(torch.get_rng_state(), first["cpu"])
    restore_rng_states(second["cpu"], 0, cpu)  # the old format: rank 0's CPU state only
    assert torch.equal(torch.get_rng_state(), second["cpu"])
    restore_rng_states(first["cpu"], 1, cpu)
    assert torch.equal(torch.get_rng_state(), second["cpu"])


def test_load_tokenizer_reads_the_checkpoints_own_else_the_configs(tmp_path):
    from tokenizers import Tokenizer, models

    from freetf.data.datasets import ByteTokenizer, CharTokenizer
    from freetf.data.tokenization import BPETokenizer
    from freetf.training.checkpoint import load_tokenizer

    cfg = load_config()
    path = save_to_root(tmp_path / "a", 1, {"step": 1}, cfg)
    assert isinstance(load_tokenizer(tmp_path / "a", cfg), CharTokenizer)
    Tokenizer(models.BPE()).save(str(path / "tokenizer.json"))
    assert isinstance(load_tokenizer(tmp_path / "a", cfg), BPETokenizer)
    gone = tmp_path / "gone"
    tokens = cfg.replace({"data.dataset_name": "tokens", "data.path": str(gone),
                          "model.vocab_size": 256})
    assert isinstance(load_tokenizer(tmp_path / "a", tokens), BPETokenizer)
    bare = write_checkpoint(tmp_path / "b", {"step": 1}, tokens)
    assert isinstance(load_tokenizer(bare, tokens), ByteTokenizer)  # 256 tokens: bytes
    big = tokens.replace({"model.vocab_size": 257})
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(bare, big)
    assert str(info.value) == (f"{bare} holds no tokenizer.json and its data.path {gone} is "
                               f"missing: restore the prepared folder (its tokenizer.json "
                               f"decodes the model's 257 tokens)")
    gone.write_bytes(b"raw text")  # a single file of raw text: bytes
    assert isinstance(load_tokenizer(bare, big), ByteTokenizer)
    synthetic = cfg.replace({"data.path": str(tmp_path / "nowhere"),
                             "model.vocab_size": 300})
    assert isinstance(load_tokenizer(bare, synthetic), CharTokenizer)


def test_rng_states_of_a_cuda_device_go_through_its_own_generator(monkeypatch):
    """The CUDA calls recorded (no GPU needed): the state of ``device``'s generator is
    saved, and restored into it only on a CUDA device."""
    from freetf.training.checkpoint import restore_rng_states, rng_states

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device: calls.append(("get", device)) or torch.ones(4))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: calls.append(("set", state, device)))
    gpu = torch.device("cuda", 1)
    states = rng_states(gpu)
    assert calls == [("get", gpu)] and torch.equal(states["cuda"], torch.ones(4))
    assert torch.equal(states["cpu"], torch.get_rng_state())
    calls.clear()
    cuda_state = torch.full((4,), 3, dtype=torch.uint8)
    restore_rng_states([{"cpu": states["cpu"], "cuda": cuda_state}], 0, gpu)
    assert len(calls) == 1 and calls[0][0] == "set" and calls[0][2] == gpu
    assert torch.equal(calls[0][1], cuda_state)
    calls.clear()
    restore_rng_states([{"cpu": states["cpu"], "cuda": cuda_state}], 0, torch.device("cpu"))
    restore_rng_states([{"cpu": states["cpu"], "cuda": None}], 0, gpu)
    restore_rng_states(states["cpu"], 0, gpu)
    assert calls == []
