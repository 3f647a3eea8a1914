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
from freetf.model.pretrained import PretrainedError
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
    export = json.loads((out / "freetf.json").read_text())
    assert export["tokenizer"] == {"kind": "bpe", "file": "tokenizer.json"}
    (out / "tokenizer.json").rename(out / "other.json")  # the file freetf.json names is read
    for described, error in (({"kind": "bpe", "file": "other.json"}, None),
                             ({"kind": "bpe"}, "holds no tokenizer.json, the BPE tokenizer its "
                                               "freetf.json names")):
        (out / "freetf.json").write_text(json.dumps({**export, "tokenizer": described}))
        if error is None:
            assert load_inference_tokenizer(out, cfg).encode(text) == bpe.encode(text)
        else:
            with pytest.raises(PretrainedError, match=f"^{out} {error}$"):
                load_inference_tokenizer(out, cfg)
    (out / "other.json").rename(out / "tokenizer.json")  # no "file": tokenizer.json
    assert load_inference_tokenizer(out, cfg).encode(text) == bpe.encode(text)

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


def _small_checkpoint(path, step: int | None = 2, *overrides: str):
    """A checkpoint of a small untrained model (write_checkpoint: no training)."""
    cfg = load_config(overrides=["model.vocab_size=29", "model.hidden_dim=32",
                                 "model.num_layers=2", "model.num_heads=2",
                                 "model.latent_dim=2", *overrides])
    model = FreeTransformer(cfg.model)
    state = {"model": model.state_dict(), **({} if step is None else {"step": step})}
    return write_checkpoint(path, state, cfg), cfg, model


@pytest.mark.timeout(60)
def test_the_model_card_and_freetf_json_describe_the_export(tmp_path):
    ckpt, cfg, model = _small_checkpoint(tmp_path / "ckpt")
    out = export_checkpoint(ckpt, tmp_path / "out")
    text = (out / "freetf.json").read_text()
    export = json.loads(text)
    alphabet = export["tokenizer"]["alphabet"]
    assert export["tokenizer"] == {"kind": "characters", "alphabet": alphabet} and alphabet
    assert text.startswith('{\n  "format": 1,\n  "step": 2,\n  "tokenizer": {\n')  # indent 2
    assert text.endswith("\n}\n")
    assert "model" not in export["config"]  # config.json is the model's only description
    assert export["config"]["data"] == cfg.to_dict()["data"]
    total = model.num_parameters()["total"]
    assert total > 1000  # printed with a thousands separator
    assert (out / "README.md").read_text() == f"""---
library_name: freetf
tags: [free-transformer]
---

# Free Transformer

A Free Transformer (Fleuret, arXiv:2510.17558) trained with freetf for 2 steps on
`synthetic` data: 2 blocks of width 32,
2 heads, a 2-bit latent Z per token (read after block 1); {total:,} parameters, context
256, vocabulary 29 (one token per character of {alphabet!r}).

| file | what |
|---|---|
| `config.json` | the model's config (freetf's `model` section) |
| `model.safetensors` | the weights |
| `freetf.json` | the tokenizer's kind, the run's config (data, training), the step |

```python
from freetf import FreeTransformer
model = FreeTransformer.from_pretrained("path/to/this/folder")
```

```bash
freetf generate --checkpoint path/to/this/folder --prompt "..."
freetf eval --checkpoint path/to/this/folder
```
"""


@pytest.mark.timeout(60)
def test_the_model_card_of_a_baseline_of_unknown_step_and_of_each_tokenizer(tmp_path):
    from freetf.training.export import model_card

    ckpt, _, _ = _small_checkpoint(tmp_path / "ckpt", None, "model.latent_dim=0")
    card = (export_checkpoint(ckpt, tmp_path / "out") / "README.md").read_text()
    assert "trained with freetf for an unknown number of steps on\n" in card
    assert "2 heads, no latent (the baseline decoder); " in card
    cfg = load_config(overrides=["model.vocab_size=300"])
    model = FreeTransformer(cfg.model)
    card = model_card(model, cfg, 5, {"kind": "bpe", "file": "tokenizer.json"})
    assert "vocabulary 300 (a byte-level BPE, tokenizer.json).\n" in card
    assert ("| `freetf.json` | the tokenizer's kind, the run's config (data, training), the "
            "step |\n| `tokenizer.json` | the tokenizer (Hugging Face `tokenizers`) |\n") in card
    card = model_card(model, cfg, 5, {"kind": "bytes"})
    assert "vocabulary 300 (UTF-8 bytes).\n" in card and "tokenizer.json" not in card


@pytest.mark.timeout(60)
def test_export_refuses_or_replaces_what_is_in_its_way(tmp_path, monkeypatch):
    from freetf.training import export as export_module
    from freetf.training.export import ExportError

    ckpt, _, _ = _small_checkpoint(tmp_path / "ckpt")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"exists and is not empty \(add --force"):
        export_checkpoint(ckpt, taken)  # force is off by default
    (tmp_path / ".nested.partial").mkdir()  # left by an interrupted export
    (tmp_path / ".nested.partial" / "config.json").write_text("{}")
    out = export_checkpoint(ckpt, tmp_path / "nested")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "freetf.json", "model.safetensors"]
    assert not list(tmp_path.glob(".*.partial"))
    deep = export_checkpoint(ckpt, tmp_path / "a" / "b" / "out")  # parents made
    assert (deep / "model.safetensors").is_file()
    monkeypatch.chdir(taken)
    with pytest.raises(ExportError, match=f"--out {taken} holds the working directory: "
                                          "--force would delete it; export elsewhere"):
        export_checkpoint(ckpt, taken, force=True)
    monkeypatch.setattr(export_module, "load_tokenizer", lambda *args: object())
    with pytest.raises(TypeError, match="^cannot export a tokenizer of type object$"):
        export_checkpoint(ckpt, tmp_path / "never")
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".*.partial"))


@pytest.mark.timeout(60)
def test_reading_an_export_refuses_what_freetf_does_not_write(tmp_path):
    ckpt, _, _ = _small_checkpoint(tmp_path / "ckpt")
    out = export_checkpoint(ckpt, tmp_path / "out")
    path = out / "freetf.json"
    for text, needle in (("{", f"{path} is not valid JSON: "),
                         ("[1]", f"{path} is not a freetf export of format 1"),
                         ('{"format": 2}', f"{path} is not a freetf export of format 1"),
                         ('{"format": 1, "config": {"data": {"bogus": 1}}}',
                          f"{path}: unknown config key data.bogus")):
        path.write_text(text)
        with pytest.raises(PretrainedError) as err:
            load_inference_model(out)
        assert str(err.value).startswith(needle), err.value
    path.write_text('{"format": 1}')  # no config, step or tokenizer: the defaults
    model, config, step = load_inference_model(out)
    assert step is None and config.data == load_config().data
    with pytest.raises(PretrainedError, match="the tokenizer {} is not one freetf writes"):
        load_inference_tokenizer(out, config)


@pytest.mark.timeout(60)
def test_a_model_loads_on_the_device_asked_for(tmp_path):
    from freetf.training.export import load_exported

    ckpt, _, _ = _small_checkpoint(tmp_path / "ckpt")
    out = export_checkpoint(ckpt, tmp_path / "out")
    for path in (ckpt, out):
        model, _, step = load_inference_model(path, "meta")
        assert step == 2 and {p.device.type for p in model.parameters()} == {"meta"}
    model, _, _ = load_exported(out)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
