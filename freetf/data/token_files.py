"""Token files on disk: the folder ``freetf prepare`` writes (``meta.json`` beside its
``.bin`` files), read back, and the largest id of a token file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

META_FORMAT = "freetf-tokens/1"


def read_meta(folder: str | Path) -> dict:
    """The metadata of a prepared folder (``meta.json``), checked."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no meta.json: prepare it with "
                                f"`freetf prepare ... --out {folder}`")
    meta = json.loads(path.read_text())
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {META_FORMAT!r}")
    return meta


def max_token_id(path: str | Path, chunk_tokens: int = 1 << 24) -> int:
    """The largest id in a uint16 token file, read in chunks (never loaded whole)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path {path} does not exist (expected a uint16 .bin "
                                f"token file)")
    tokens = np.memmap(path, dtype="<u2", mode="r") if path.stat().st_size >= 2 else []
    highest = -1
    for begin in range(0, len(tokens), chunk_tokens):
        highest = max(highest, int(tokens[begin:begin + chunk_tokens].max()))
    return highest
