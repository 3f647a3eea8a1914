"""``freetf export``: a checkpoint as a folder anyone can load without freetf's pickle.

The exported folder::

    out/
      config.json        the model section of the config    (FreeTransformer.from_pretrained
      model.safetensors  the weights                          reads these two alone)
      tokenizer.json     the BPE of data from ``freetf prepare`` (Hugging Face tokenizers'
                         format), when the model was trained on one
      freetf.json        what ``freetf generate`` / ``eval`` need beyond the model: the
                         tokenizer's kind, the run's resolved config without its model
                         section (config.json is the model's only description), the step
      README.md          a model card: the model, the files, how to load them

Any checkpoint freetf writes exports: an in-process one, a Ray Train one (the same
directory), a sharded FSDP one (consolidated in this process by ``load_model``), or a
checkpoint root with ``latest``.  ``generate`` and ``eval`` take an exported folder
wherever they take a checkpoint (:func:`load_inference_model`): the two are told apart by
their files (``config.json`` against ``config.yaml``).  Reading an exported folder reads
JSON and safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from freetf.config import Config, ConfigError, from_dict
from freetf.data.datasets import ByteTokenizer, CharTokenizer, Tokenizer
from freetf.data.tokenization import BPETokenizer
from freetf.model.pretrained import MODEL_CONFIG_FILE, PretrainedError
from freetf.model.transformer import FreeTransformer
from freetf.training.checkpoint import (
    TOKENIZER_FILE,
    load_model,
    load_tokenizer,
    resolve_checkpoint,
)

EXPORT_FILE, CARD_FILE = "freetf.json", "README.md"
EXPORT_FORMAT = 1


class ExportError(ValueError):
    """An export that cannot be written where it was asked to go."""


def is_exported(path: str | Path) -> bool:
    """Is ``path`` a pretrained folder?  Its ``config.json`` says so: a checkpoint has a
    ``config.yaml`` instead (and a folder without its weights is then refused by name)."""
    return (Path(path) / MODEL_CONFIG_FILE).is_file()


def export_checkpoint(checkpoint: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the exported folder of ``checkpoint`` at ``out``.  -> ``out``.

    ``out`` must not exist or be empty unless ``force`` (then it is replaced).  The folder
    is written into a temporary sibling and renamed into place: a failed export leaves
    ``out`` as it was.
    """
    out = Path(out).resolve()
    _check_destination(resolve_checkpoint(checkpoint), out, force)
    model, config, state = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint, config)
    tmp = out.parent / f".{out.name}.partial"  # made by mkdir: the umask's permissions
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted export
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        described = _write_tokenizer(tokenizer, tmp)
        run_config = {k: v for k, v in config.to_dict().items() if k != "model"}
        export = {"format": EXPORT_FORMAT, "step": state.get("step"),
                  "tokenizer": described, "config": run_config}
        (tmp / EXPORT_FILE).write_text(json.dumps(export, indent=2) + "\n")
        (tmp / CARD_FILE).write_text(model_card(model, config, state.get("step"), described))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_destination(checkpoint: Path, out: Path, force: bool) -> None:
    """``out`` (resolved): absent, an empty folder, or (``force``) a folder that holds
    neither the checkpoint nor the working directory."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not force:
        raise ExportError(f"--out {out} exists and is not empty (add --force to replace it)")
    for inside, what in ((checkpoint.resolve(), f"the checkpoint {checkpoint}"),
                         (Path.cwd().resolve(), "the working directory")):
        if inside == out or out in inside.parents:
            raise ExportError(f"--out {out} holds {what}: --force would delete it; "
                              f"export elsewhere")


def _write_tokenizer(tokenizer: Tokenizer, directory: Path) -> dict[str, Any]:
    """Save the checkpoint's tokenizer into ``directory``.  -> its ``freetf.json`` entry."""
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save(directory / TOKENIZER_FILE)
        return {"kind": "bpe", "file": TOKENIZER_FILE}
    if isinstance(tokenizer, CharTokenizer):
        return {"kind": "characters", "alphabet": tokenizer.alphabet}
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "bytes"}
    raise TypeError(f"cannot export a tokenizer of type {type(tokenizer).__name__}")


def read_tokenizer(directory: Path, described: dict[str, Any]) -> Tokenizer:
    """The tokenizer ``freetf.json`` describes (the inverse of :func:`_write_tokenizer`)."""
    kind = described.get("kind")
    if kind == "bpe":
        path = directory / described.get("file", TOKENIZER_FILE)
        if not path.is_file():
            raise PretrainedError(f"{directory} holds no {path.name}, the BPE tokenizer its "
                                  f"{EXPORT_FILE} names")
        return BPETokenizer.from_file(path)
    if kind == "characters" and isinstance(described.get("alphabet"), str):
        return CharTokenizer(described["alphabet"])
    if kind == "bytes":
        return ByteTokenizer()
    raise PretrainedError(f"{directory / EXPORT_FILE}: the tokenizer {described!r} is not "
                          f"one freetf writes (bpe, characters with an alphabet, bytes)")


def read_export(directory: Path) -> dict[str, Any]:
    """The contents of ``directory/freetf.json``."""
    path = directory / EXPORT_FILE
    if not path.is_file():
        raise PretrainedError(f"{directory} holds a model but no {EXPORT_FILE}: generate and "
                              f"eval need its tokenizer and data config; write the folder "
                              f"with `freetf export --checkpoint ... --out ...`")
    try:
        export = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PretrainedError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(export, dict) or export.get("format") != EXPORT_FORMAT:
        raise PretrainedError(f"{path} is not a freetf export of format {EXPORT_FORMAT}")
    return export


def load_exported(directory: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[FreeTransformer, Config, dict[str, Any]]:
    """An exported folder's ``(model, resolved config, freetf.json contents)``.

    The config is ``freetf.json``'s run config with ``config.json`` as its model section.
    """
    directory = Path(directory)
    model = FreeTransformer.from_pretrained(directory, device)
    export = read_export(directory)
    try:
        config = from_dict({**export.get("config", {}),
                            "model": dataclasses.asdict(model.config)})
    except ConfigError as err:
        raise PretrainedError(f"{directory / EXPORT_FILE}: {err}") from None
    return model, config, export


def load_inference_model(path: str | Path, device: str | torch.device = "cpu"
                         ) -> tuple[FreeTransformer, Config, int | None]:
    """``(model, config, step)`` of a checkpoint, a checkpoint root or an exported folder."""
    if is_exported(path):
        model, config, export = load_exported(path, device)
        return model, config, export.get("step")
    model, config, state = load_model(path, device)
    return model, config, state.get("step")


def load_inference_tokenizer(path: str | Path, config: Config) -> Tokenizer:
    """The tokenizer of a checkpoint (:func:`load_tokenizer`) or of an exported folder."""
    if is_exported(path):
        return read_tokenizer(Path(path), read_export(Path(path)).get("tokenizer", {}))
    return load_tokenizer(path, config)


def model_card(model: FreeTransformer, config: Config, step: int | None,
               tokenizer: dict[str, Any]) -> str:
    """A short README.md: what the model is, what the files are, how to load them."""
    m = config.model
    latent = (f"a {m.latent_dim}-bit latent Z per token (read after block "
              f"{m.encoder_after})" if m.has_latent else "no latent (the baseline decoder)")
    vocab = {"bpe": "a byte-level BPE, tokenizer.json", "bytes": "UTF-8 bytes",
             "characters": f"one token per character of {tokenizer.get('alphabet')!r}"}
    files = [("config.json", "the model's config (freetf's `model` section)"),
             ("model.safetensors", "the weights"),
             ("freetf.json", "the tokenizer's kind, the run's config (data, training), "
              "the step")]
    if tokenizer["kind"] == "bpe":
        files.append(("tokenizer.json", "the tokenizer (Hugging Face `tokenizers`)"))
    table = "\n".join(f"| `{name}` | {what} |" for name, what in files)
    steps = "an unknown number of" if step is None else str(step)
    return f"""---
library_name: freetf
tags: [free-transformer]
---

# Free Transformer

A Free Transformer (Fleuret, arXiv:2510.17558) trained with freetf for {steps} steps on
`{config.data.dataset_name}` data: {m.num_layers} blocks of width {m.hidden_dim},
{m.num_heads} heads, {latent}; {model.num_parameters()["total"]:,} parameters, context
{m.max_seq_len}, vocabulary {m.vocab_size} ({vocab[tokenizer["kind"]]}).

| file | what |
|---|---|
{table}

```python
from freetf import FreeTransformer
model = FreeTransformer.from_pretrained("path/to/this/folder")
```

```bash
freetf generate --checkpoint path/to/this/folder --prompt "..."
freetf eval --checkpoint path/to/this/folder
```
"""
