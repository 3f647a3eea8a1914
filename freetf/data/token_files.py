"""Token files on disk: the folder ``freetf prepare`` writes (``meta.json`` beside its
``.bin`` files), read back and checked, and the largest id of a token file.

A prepared folder is checked before training starts (:func:`freetf.data.datasets.check_data`,
called by the run's preflight): ``meta.json`` against its schema (:func:`read_meta`),
each split's file against the token count it records (:func:`check_token_files`: a
truncated or edited file would otherwise train on a fraction of the data, or crash
inside the model), and every id against the vocabulary (:func:`check_token_ids`: a
chunked scan, about as fast as the disk reads; ``max_id``, recorded per split by
prepare, must match it).  Every problem is one :class:`ConfigError` naming
``data.path`` and the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from freetf.config import ConfigError

META_FORMAT = "freetf-tokens/1"
TOKEN_DTYPES = ("uint16", "uint32")
SPLITS = ("train", "val")


def _damaged(folder: Path, what: str) -> ConfigError:
    return ConfigError(f"data.path {folder}: {what}; the folder is damaged or was changed "
                       f"after `freetf prepare`: prepare it again")


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _integer(folder: Path, mapping: dict, key: str, where: str, minimum: int,
             below: int | None = None) -> int:
    """``mapping[key]``, an integer in [minimum, below)."""
    value = mapping.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        shown = "missing" if key not in mapping else f"{value!r} ({_json_type(value)})"
        raise _damaged(folder, f"meta.json's {where}{key} is {shown}, expected an integer")
    if value < minimum or (below is not None and value >= below):
        bound = f">= {minimum}" if below is None else f"in [{minimum}, {below})"
        raise _damaged(folder, f"meta.json's {where}{key} is {value}, expected {bound}")
    return value


def read_meta(folder: str | Path) -> dict:
    """The metadata of a prepared folder (``meta.json``), checked against its schema."""
    folder = Path(folder)
    path = folder / "meta.json"
    if not path.is_file():
        raise ConfigError(f"data.path {folder} has no meta.json: prepare it with "
                          f"`freetf prepare ... --out {folder}`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise _damaged(folder, f"meta.json cannot be read ({err})") from None
    if not isinstance(meta, dict):
        raise _damaged(folder, f"meta.json holds {_json_type(meta)}, not an object")
    if meta.get("format") != META_FORMAT:
        raise _damaged(folder, f"meta.json's format is {meta.get('format')!r}, expected "
                               f"{META_FORMAT!r}")
    vocab = _integer(folder, meta, "vocab_size", "", 1)
    dtype = meta.get("dtype")
    if dtype not in TOKEN_DTYPES:
        raise _damaged(folder, f"meta.json's dtype {dtype!r} is not one of "
                               f"{', '.join(TOKEN_DTYPES)}")
    if vocab - 1 > np.iinfo(dtype).max:
        raise _damaged(folder, f"meta.json's vocab_size {vocab} does not fit its dtype {dtype}")
    tokenizer = meta.get("tokenizer")
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("file"), str | None):
        raise _damaged(folder, "meta.json's tokenizer is not an object naming its file "
                               "(or null)")
    splits = meta.get("splits")
    for split in SPLITS:
        info = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(info, dict):
            raise _damaged(folder, f"meta.json has no {split} split (splits.{split})")
        name = info.get("file")
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise _damaged(folder, f"meta.json's splits.{split}.file is {name!r}, expected "
                                   f"the name of a file in the folder")
        _integer(folder, info, "tokens", f"splits.{split}.", 1)
        _integer(folder, info, "bytes", f"splits.{split}.", 0)
        _integer(folder, info, "documents", f"splits.{split}.", 0)
        if "max_id" in info:  # recorded since prepare checks ids; older folders are scanned
            _integer(folder, info, "max_id", f"splits.{split}.", 0, below=vocab)
    return meta


def check_token_files(folder: str | Path, meta: dict) -> None:
    """Each split's file holds exactly the tokens ``meta.json`` records; the tokenizer
    file it names is there."""
    folder = Path(folder)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        info = meta["splits"][split]
        path = folder / info["file"]
        if not path.is_file():
            raise _damaged(folder, f"{info['file']} (the {split} split) is missing")
        size, expected = path.stat().st_size, info["tokens"] * itemsize
        if size != expected:
            raise _damaged(folder, f"{info['file']} holds {size} bytes, but meta.json records "
                                   f"{info['tokens']} {meta['dtype']} tokens ({expected} bytes)")
    name = meta["tokenizer"]["file"]
    if name and not (folder / name).is_file():
        raise _damaged(folder, f"{name} (the tokenizer meta.json names) is missing")


def check_token_ids(folder: str | Path, meta: dict, chunk_tokens: int = 1 << 24) -> None:
    """Every id of every split below ``meta.json``'s vocabulary, and the largest equal to
    the ``max_id`` prepare recorded (when it did): one chunked scan per file."""
    folder = Path(folder)
    for split in SPLITS:
        info = meta["splits"][split]
        highest = max_token_id(folder / info["file"], meta["dtype"], chunk_tokens)
        if highest >= meta["vocab_size"]:
            raise _damaged(folder, f"{info['file']} holds token id {highest}, outside the "
                                   f"vocabulary of {meta['vocab_size']} (meta.json)")
        if info.get("max_id", highest) != highest:
            raise _damaged(folder, f"the largest token id in {info['file']} is {highest}, "
                                   f"but meta.json records {info['max_id']}")


def max_token_id(path: str | Path, dtype: str = "uint16", chunk_tokens: int = 1 << 24) -> int:
    """The largest id in a little-endian token file, read in chunks (never loaded whole);
    -1 for an empty file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.path {path} does not exist (expected a {dtype} .bin "
                                f"token file)")
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ConfigError(f"data.path {path} holds {size} bytes, not a whole number of "
                          f"{dtype} tokens ({itemsize} bytes each)")
    tokens = (np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
              if size else [])
    highest = -1
    for begin in range(0, len(tokens), chunk_tokens):
        highest = max(highest, int(tokens[begin:begin + chunk_tokens].max()))
    return highest
