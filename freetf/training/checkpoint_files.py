"""The files of a checkpoint directory and how they are written, for both formats: the
full one (:mod:`freetf.training.checkpoint`) and the sharded one
(:mod:`freetf.training.sharded_checkpoint`).

Everything here is written atomically: a directory is filled under a temporary name and
renamed into place (:func:`replace_dir`), the ``latest`` pointer of a root is replaced
in one rename (:func:`atomic_write_text`), and :func:`publish` does both for a new step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from freetf.config import Config

STATE_FILE, CONFIG_FILE, META_FILE, LATEST_FILE = "state.pt", "config.yaml", "meta.json", "latest"
TOKENIZER_FILE, DATA_META_FILE = "tokenizer.json", "data_meta.json"
SHARDS_DIR = "shards"


def is_sharded(path: str | Path) -> bool:
    """Does the checkpoint directory ``path`` keep its weights in DCP shards?"""
    return (Path(path) / SHARDS_DIR).is_dir()


def write_files(directory: Path, state: dict[str, Any], config: Config,
                meta: dict[str, Any] | None) -> None:
    """``state.pt``, ``config.yaml``, ``meta.json`` and the prepared data's tokenizer
    (:func:`_copy_tokenizer`) into an existing ``directory``."""
    torch.save(state, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(config.to_yaml())
    (directory / META_FILE).write_text(json.dumps(meta or {}, indent=2, default=float))
    _copy_tokenizer(config, directory)


def _copy_tokenizer(config: Config, directory: Path) -> None:
    """The prepared data's tokenizer.json and meta.json (as data_meta.json), if any."""
    from freetf.data.datasets import prepared_folder

    folder = prepared_folder(config)
    if folder is None or not (folder / "meta.json").is_file():
        return
    shutil.copyfile(folder / "meta.json", directory / DATA_META_FILE)
    name = json.loads((folder / "meta.json").read_text()).get("tokenizer", {}).get("file")
    if name:
        shutil.copyfile(folder / name, directory / TOKENIZER_FILE)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the complete directory ``src`` to ``dst``, replacing what was there."""
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def publish(root: Path, path: Path, keep: int) -> None:
    """Point ``root/latest`` at the checkpoint ``path`` and keep the newest ``keep``."""
    atomic_write_text(root / LATEST_FILE, path.name)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
