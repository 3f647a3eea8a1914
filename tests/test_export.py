"""freetf export: a checkpoint as a pretrained folder that generate and eval read alike."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from freetf import FreeTransformer, load_config
from freetf.cli import main
from freetf.data.datasets import ByteTokenizer, CharTokenizer
from freetf.data.tokenization import train_bpe
from freetf.training.checkpoint import write_checkpoint
from freetf.training.export import (
    export_checkpoint,
    load_inference_model,
    load_inference_tokenizer,
)

pytestmark = pytest.mark.timeout(240)

# Model fields that change the output without changing a weight's shape (config.json must
# carry them), and data / diagnostics fields eval reads (freetf.json must carry them).
# init_std 0.3: at the default 0.02 the two-step model's logits are so flat that sampling
# gives the same tokens with rope_theta or norm_eps lost (seen: generate still agreed).
NON_DEFAULTS = ["model.rope_theta=500.0", "model.norm_eps=0.1", "model.injection_layer=0",
                "model.init_std=0.3", "data.val_samples=48", "data.seed=3",
                "diagnostics.free_generations=16"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint: two steps of ``freetf train --no-ray`` on the synthetic task."""
    out = tmp_path_factory.mktemp("export")
    argv = ["train", "--config", "freetf/configs/tiny.yaml", "--no-ray", "--max-steps", "2",
            "--set", f"checkpoint.dir={out / 'ckpt'}", "--set", "tracking.mlflow.enabled=false"]
    for override in NON_DEFAULTS:
        argv += ["--set", override]
    assert main(argv) == 0
    return out / "ckpt"


def _run(argv: list[str], capsys) -> str:
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_generate_and_eval_from_the_export_equal_the_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "exported"
    _run(["export", "--checkpoint", str(checkpoint), "--out", str(out)], capsys)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "freetf.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 500.0
    for extra in ([], ["--z", "5"], ["--temperature", "0.7", "--top-k", "5"]):
        argv = ["--prompt", "K>", "--num-samples", "3", "--seed", "7", *extra]
        from_checkpoint = _run(["generate", "--checkpoint", str(checkpoint), *argv], capsys)
        assert _run(["generate", "--checkpoint", str(out), *argv], capsys) == from_checkpoint
    lines = from_checkpoint.splitlines()  # the comparison can tell models apart
    assert len(set(lines)) == 3 and all(len(line) == 66 for line in lines)
    ours = json.loads(_run(["eval", "--checkpoint", str(out), "--json"], capsys))
    theirs = json.loads(_run(["eval", "--checkpoint", str(checkpoint), "--json"], capsys))
    assert ours == theirs and ours["step"] == 2


def test_the_export_loads_without_freetf_checkpoint_code(checkpoint, tmp_path, capsys):
    """from_pretrained alone, from the exported folder, with the checkpoint gone."""
    model, _, _ = load_inference_model(checkpoint)
    out = tmp_path / "exported"
    export_checkpoint(checkpoint, out)
    moved = shutil.move(str(checkpoint), tmp_path / "away")
    try:
        loaded = FreeTransformer.from_pretrained(out)
    finally:
        shutil.move(moved, checkpoint)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert loaded.config.injection_layer == 0 and loaded.config.norm_eps == 0.1


def test_export_refuses_what_it_cannot_do_in_one_line(checkpoint, tmp_path, capsys):
    def refused(argv: list[str], needle: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and err.count("\n") == 1, err

    out = tmp_path / "out"
    refused(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)],
            "checkpoint not found")
    (tmp_path / "empty").mkdir()
    refused(["export", "--checkpoint", str(tmp_path / "empty"), "--out", str(out)],
            "not a freetf checkpoint")
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(["export", "--checkpoint", str(checkpoint), "--out", str(out)], "add --force")
    assert (out / "notes.txt").read_text() == "mine"
    _run(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--force"], capsys)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    step = checkpoint / (checkpoint / "latest").read_text().strip()
    for holder in (checkpoint, step):  # --force never deletes the checkpoint it exports
        refused(["export", "--checkpoint", str(checkpoint), "--out", str(holder), "--force"],
                "holds the checkpoint")
    assert (step / "state.pt").is_file()
    (tmp_path / "file").write_text("x")
    refused(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "file")],
            "is not a folder")
    assert not list(tmp_path.glob(".*.partial"))  # no half export left behind


def test_an_incomplete_export_is_refused_by_name(checkpoint, tmp_path, capsys):
    tiny = load_config("freetf/configs/tiny.yaml")
    FreeTransformer(tiny.model).save_pretrained(tmp_path / "bare")
    out = export_checkpoint(checkpoint, tmp_path / "exported")
    (out / "model.safetensors").unlink()
    for folder, needle in ((tmp_path / "bare", "no freetf.json"),
                           (out, "holds no model.safetensors")):
        for command in (["generate", "--prompt", "K>"], ["eval"]):
            assert main([*command, "--checkpoint", str(folder)]) == 2
            err = capsys.readouterr().err
            assert needle in err and err.count("\n") == 1, err
    out = export_checkpoint(checkpoint, tmp_path / "edited")
    export = json.loads((out / "freetf.json").read_text())
    (out / "freetf.json").write_text(json.dumps({**export, "tokenizer": {"kind": "characters"}}))
    assert main(["generate", "--checkpoint", str(out), "--prompt", "K>"]) == 2
    assert "is not one freetf writes" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_exports_its_consolidated_weights(tmp_path):
    """The FSDP format (DCP shards), written by save_sharded in one process."""
    from freetf.training.sharded_checkpoint import save_sharded

    cfg = load_config("freetf/configs/tiny.yaml")
    model = FreeTransformer(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_sharded(tmp_path / "ckpt", 3, model, optimizer, {"step": 3}, cfg,
                        {"step": 3}, rank=0)
    assert (path / "shards").is_dir() and "model" not in torch.load(path / "state.pt")
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "exported")
    loaded, _, step = load_inference_model(out)
    assert step == 3
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_the_checkpoints_tokenizer_travels_with_the_export(tmp_path):
    """A BPE checkpoint (tokenizer.json inside, its data folder gone), bytes and characters."""
    bpe = train_bpe([f"def f{i}(x):\n    return x * {i}\n" for i in range(50)] * 5, 300)
    cfg = load_config(overrides=[
        "model.vocab_size=300", "model.hidden_dim=32", "model.num_layers=2", "model.num_heads=2",
        "model.latent_dim=2", "model.max_seq_len=16", "data.max_seq_len=16",
        "data.dataset_name=tokens", f"data.path={tmp_path / 'gone'}"])
    model = FreeTransformer(cfg.model)
    ckpt = write_checkpoint(tmp_path / "bpe", {"model": model.state_dict(), "step": 1}, cfg)
    bpe.save(ckpt / "tokenizer.json")
    out = export_checkpoint(ckpt, tmp_path / "bpe_out")
    assert json.loads((out / "freetf.json").read_text())["tokenizer"]["kind"] == "bpe"
    text = "def f3(x):\n    return x * 3\n"
    tokenizer = load_inference_tokenizer(out, cfg)
    assert tokenizer.encode(text) == bpe.encode(text) != list(text.encode())
    assert tokenizer.decode(bpe.encode(text)) == text

    for overrides, kind in ((["data.dataset_name=text", "data.path=x.txt"], ByteTokenizer),
                            ([], CharTokenizer)):
        cfg = load_config(overrides=["model.vocab_size=256" if overrides else "model.vocab_size=29",
                                     "model.hidden_dim=32", "model.num_layers=2",
                                     "model.num_heads=2", "model.latent_dim=0", *overrides])
        model = FreeTransformer(cfg.model)
        ckpt = write_checkpoint(tmp_path / kind.__name__, {"model": model.state_dict()}, cfg)
        out = export_checkpoint(ckpt, tmp_path / f"{kind.__name__}_out")
        assert isinstance(load_inference_tokenizer(out, cfg), kind)
        assert not (out / "tokenizer.json").exists()
