"""Data: the paper's synthetic task (§4.1), byte-level text and memmap token files
(the rank-sharded, resumable batch stream over them is :mod:`freetf.data.stream`).

Every dataset is a ``torch.utils.data.Dataset`` of fixed-length LongTensor rows
(``T = data.max_seq_len``); ``build_data(cfg)`` returns them with their tokenizer.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from freetf.config import Config, ConfigError
from freetf.data.token_files import (
    SPLITS,
    check_token_files,
    check_token_ids,
    max_token_id,
    read_meta,
)

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


SYNTHETIC_ALPHABET = "_!>" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class CharTokenizer:
    """One id per character of a fixed alphabet (default: the synthetic task's 29)."""

    def __init__(self, alphabet: str = SYNTHETIC_ALPHABET) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet {alphabet!r} has repeated characters")
        self.alphabet = alphabet
        self.vocab_size = len(alphabet)
        self._ids = {ch: i for i, ch in enumerate(alphabet)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError:
            bad = sorted({ch for ch in text if ch not in self._ids})
            raise ValueError(f"characters {bad!r} are not in the vocabulary "
                             f"{self.alphabet!r}") from None

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = sorted({i for i in ids if not 0 <= i < self.vocab_size})
        if bad:
            raise ValueError(f"token ids {bad} are outside [0, {self.vocab_size})")
        return "".join(self.alphabet[i] for i in ids)


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); invalid byte sequences decode to U+FFFD."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- synthetic task

SYNTHETIC_BODY_LEN = 64
SYNTHETIC_TARGET_LEN = 8
SYNTHETIC_NOISE_PROB = 1.0 / 16.0
SYNTHETIC_SEQ_LEN = SYNTHETIC_BODY_LEN + 2  # "<letter>>" prompt + body
_CHARS = CharTokenizer()
_BLANK, _NOISE, _ARROW = (_CHARS.encode(c)[0] for c in "_!>")
_FIRST_LETTER = _CHARS.encode("A")[0]


def synthetic_sequences(num: int, seed: int) -> np.ndarray:
    """``num`` rows of the synthetic task (§4.1) as CharTokenizer ids, shape (num, 66).

    64 "_"; a letter A-Z and a start in [0, 56] drawn uniformly; the letter written 8 times
    from the start; every one of the 64 characters independently replaced by "!" with
    probability 1/16; the prompt "<letter>>" prepended.  Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    letters = rng.integers(0, 26, size=num) + _FIRST_LETTER  # (N,)
    starts = rng.integers(0, SYNTHETIC_BODY_LEN - SYNTHETIC_TARGET_LEN + 1, size=num)  # (N,)
    pos = np.arange(SYNTHETIC_BODY_LEN)  # (64,)
    in_target = (pos >= starts[:, None]) & (pos < starts[:, None] + SYNTHETIC_TARGET_LEN)
    body = np.where(in_target, letters[:, None], _BLANK)  # (N, 64)
    noise = rng.random((num, SYNTHETIC_BODY_LEN)) < SYNTHETIC_NOISE_PROB  # (N, 64)
    body[noise] = _NOISE
    prompt = np.stack([letters, np.full(num, _ARROW)], axis=1)  # (N, 2)
    return np.concatenate([prompt, body], axis=1).astype(np.int64)  # (N, 66)


@dataclass(frozen=True)
class SyntheticParse:
    """A decoded synthetic sequence, read back for evaluation."""

    letter: str | None  # the prompt's letter; None if the prompt is not "<A-Z>>"
    target_start: float | None  # body index where the target starts; None if not valid
    valid: bool  # a sequence the task's generator can produce (see parse_synthetic)
    noise_positions: tuple[int, ...]  # body indices holding "!"


def target_starts(body: str, letter: str) -> list[int]:
    """Starts s of the 8-wide windows that hold every ``letter`` of ``body`` and no "_".

    These are the target positions the generator could have drawn: noise ("!") may
    replace any target letter, its first or last included.
    """
    spots = [i for i, ch in enumerate(body) if ch == letter]
    if not spots:
        return []
    first, last = spots[0], spots[-1]
    return [s for s in range(max(0, last - SYNTHETIC_TARGET_LEN + 1),
                             min(first, SYNTHETIC_BODY_LEN - SYNTHETIC_TARGET_LEN) + 1)
            if "_" not in body[s:s + SYNTHETIC_TARGET_LEN]]


def parse_synthetic(text: str) -> SyntheticParse:
    """Parse a decoded sequence: the one definition of a valid sequence (§4.1).

    ``valid``: the task's generator can produce it: length 66, prompt "<letter>>", a body
    of "_", "!" and the prompt's letter only, whose letters all lie in one 8-wide window
    that holds no "_" (the target, with "!" noise allowed anywhere, on the target too).
    ``target_start``: the start of that window; when noise on the run's ends leaves
    several starts possible (equally likely under the generator), their mean.
    """
    head, body = text[:2], text[2:]
    letter = head[0] if len(head) == 2 and head[0].isupper() and head[1] == ">" else None
    noise = tuple(i for i, ch in enumerate(body) if ch == "!")
    starts = (target_starts(body, letter)
              if letter and len(text) == SYNTHETIC_SEQ_LEN and set(body) <= {"_", "!", letter}
              else [])
    target_start = sum(starts) / len(starts) if starts else None
    return SyntheticParse(letter, target_start, bool(starts), noise)


class RowsDataset(Dataset):
    """Rows of a (N, T) LongTensor held in memory."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows  # (N, T)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.rows[index]  # (T,)


# ----------------------------------------------------------------------------- text / tokens


class BlockDataset(Dataset):
    """Consecutive non-overlapping blocks of ``block_len`` tokens of a 1-D token array.

    ``source`` is an in-memory array or the path of a raw little-endian uint16 (or
    ``dtype``) token file,
    which is memory-mapped lazily in each process (so it is never loaded whole, and the
    dataset pickles cheaply into DataLoader workers).
    """

    def __init__(self, source: np.ndarray | str | Path, block_len: int, first_block: int,
                 num_blocks: int, dtype: str = "uint16") -> None:
        self.path = None if isinstance(source, np.ndarray) else str(source)
        self._tokens = source if isinstance(source, np.ndarray) else None
        self.block_len, self.first_block, self.num_blocks = block_len, first_block, num_blocks
        self.dtype = np.dtype(dtype).newbyteorder("<")

    def _array(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path is not None:
            state["_tokens"] = None  # reopen the memmap in the worker
        return state

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} out of range [0, {self.num_blocks})")
        begin = (self.first_block + index) * self.block_len
        block = self._array()[begin:begin + self.block_len]
        return torch.from_numpy(block.astype(np.int64))  # (T,)


def read_text_bytes(path: str | Path) -> np.ndarray:
    """A UTF-8 file, or a folder's sorted ``*.txt`` files joined by "\\n", as uint8 bytes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data.path {path} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"data.path {path} is a folder with no *.txt files")
        data = b"\n".join(f.read_bytes() for f in files)
    else:
        data = path.read_bytes()
    if not data:
        raise ValueError(f"data.path {path}: the corpus is empty")
    return np.frombuffer(data, dtype=np.uint8)


def write_token_file(path: str | Path, tokens: Sequence[int] | np.ndarray) -> Path:
    """Write token ids as a raw little-endian uint16 ``.bin`` file (atomically)."""
    arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"token ids must be in [0, 65535], got [{arr.min()}, {arr.max()}]")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    arr.astype("<u2").tofile(tmp)
    os.replace(tmp, path)
    return path


def _split_blocks(source: np.ndarray | str | Path, num_tokens: int, block_len: int,
                  val_fraction: float, where: str) -> tuple[BlockDataset, BlockDataset]:
    """Pack into blocks; the last ``ceil(val_fraction * blocks)`` blocks are validation."""
    num_blocks = num_tokens // block_len
    if num_blocks < 2:
        raise ValueError(f"{where} holds {num_tokens} tokens: too short for one training and "
                         f"one validation block of data.max_seq_len={block_len}")
    num_val = min(max(1, math.ceil(val_fraction * num_blocks)), num_blocks - 1)
    num_train = num_blocks - num_val
    if num_tokens % block_len:
        logger.info("%s: dropping the last %d tokens (not a full block)", where,
                    num_tokens % block_len)
    return (BlockDataset(source, block_len, 0, num_train),
            BlockDataset(source, block_len, num_train, num_val))


# ----------------------------------------------------------------------------- build_data


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    tokenizer: Tokenizer
    bytes_per_token: float = 1.0  # UTF-8 bytes per validation token (bits per byte)


def prepared_folder(cfg: Config) -> Path | None:
    """``data.path`` when it is a folder made by ``freetf prepare`` (data.dataset_name: tokens)."""
    if cfg.data.dataset_name != "tokens" or not cfg.data.path:
        return None
    path = Path(cfg.data.path)
    return path if path.is_dir() else None


def build_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer of ``cfg.data``: characters for synthetic, the prepared folder's
    (bytes or its tokenizer.json) for prepared tokens, bytes otherwise."""
    if cfg.data.dataset_name == "synthetic":
        return CharTokenizer()
    folder = prepared_folder(cfg)
    if folder is not None:
        from freetf.data.tokenization import BPETokenizer

        meta = read_meta(folder)
        if meta["tokenizer"]["file"]:
            return BPETokenizer.from_file(folder / meta["tokenizer"]["file"])
    return ByteTokenizer()


def _prepared_splits(cfg: Config, folder: Path) -> tuple[dict, dict[str, int]]:
    """A prepared folder's metadata, checked with its token files, and the number of
    blocks of ``data.max_seq_len`` in each split (at least one)."""
    meta = read_meta(folder)
    check_token_files(folder, meta)
    blocks = {}
    for split in SPLITS:
        tokens = meta["splits"][split]["tokens"]
        blocks[split] = tokens // cfg.data.max_seq_len
        if blocks[split] < 1:
            raise ConfigError(f"data.path {folder}: the {split} split holds {tokens} tokens, "
                              f"less than one block of data.max_seq_len={cfg.data.max_seq_len}")
    return meta, blocks


def _prepared_data(cfg: Config, folder: Path) -> tuple[Dataset, Dataset, float]:
    """Train / val block datasets of a prepared folder (its own document split)."""
    meta, blocks = _prepared_splits(cfg, folder)
    train, val = (BlockDataset(folder / meta["splits"][split]["file"], cfg.data.max_seq_len,
                               0, blocks[split], meta["dtype"]) for split in SPLITS)
    info = meta["splits"]["val"]
    return train, val, info["bytes"] / info["tokens"]


def build_data(cfg: Config) -> DataBundle:
    """The train/val datasets and tokenizer described by ``cfg.data``."""
    data = cfg.data
    bytes_per_token = 1.0  # synthetic characters and raw bytes are one byte each
    if data.dataset_name == "synthetic":
        if data.max_seq_len != SYNTHETIC_SEQ_LEN:
            raise ConfigError(f"data.max_seq_len={data.max_seq_len}: synthetic sequences have "
                             f"length {SYNTHETIC_SEQ_LEN}")
        # The validation seed is derived from, and distinct from, data.seed.
        val_seed = int(np.random.SeedSequence([data.seed, 1]).generate_state(1)[0])
        train = RowsDataset(torch.from_numpy(synthetic_sequences(data.num_samples, data.seed)))
        val = RowsDataset(torch.from_numpy(synthetic_sequences(data.val_samples, val_seed)))
        tokenizer = build_tokenizer(cfg)
    elif data.dataset_name == "text":
        tokens = read_text_bytes(data.path)
        train, val = _split_blocks(tokens, tokens.size, data.max_seq_len, data.val_fraction,
                                   f"data.path {data.path}")
        tokenizer = build_tokenizer(cfg)
    elif (folder := prepared_folder(cfg)) is not None:  # tokens: a freetf prepare folder
        train, val, bytes_per_token = _prepared_data(cfg, folder)
        tokenizer = build_tokenizer(cfg)
    elif data.dataset_name == "tokens":
        path = Path(data.path)
        if not path.is_file():
            raise FileNotFoundError(f"data.path {path} does not exist (expected a uint16 .bin "
                                    f"token file, or a folder made by freetf prepare)")
        num_tokens = path.stat().st_size // 2
        if num_tokens == 0:
            raise ValueError(f"data.path {path}: the token file is empty")
        train, val = _split_blocks(path, num_tokens, data.max_seq_len, data.val_fraction,
                                   f"data.path {path}")
        tokenizer = build_tokenizer(cfg)
    else:
        raise ConfigError(f"data.dataset_name={data.dataset_name!r} is not supported")
    check_vocabulary(cfg)
    logger.info("data %s: %d train rows, %d val rows of length %d", data.dataset_name,
                len(train), len(val), data.max_seq_len)
    return DataBundle(train, val, tokenizer, bytes_per_token)


def check_data(cfg: Config) -> None:
    """The data against the config, before any MLflow run or Ray worker starts (the run's
    preflight): a prepared folder's meta.json and token files, each split at least one
    block long, then the vocabulary and the largest id (:func:`check_vocabulary`)."""
    folder = prepared_folder(cfg)
    if folder is not None:
        _prepared_splits(cfg, folder)
    check_vocabulary(cfg)


def check_vocabulary(cfg: Config) -> None:
    """``model.vocab_size`` against the data, before any training step.

    Synthetic and text data are decoded by a tokenizer: the model's vocabulary must be
    the tokenizer's, or the model samples ids that nothing can decode.  A token file is
    decoded by nobody here: every id in it must be below ``model.vocab_size``.  A
    prepared folder's meta.json names its vocabulary, and its files are scanned for ids
    outside it.
    """
    vocab = cfg.model.vocab_size
    name = cfg.data.dataset_name
    folder = prepared_folder(cfg)
    if folder is not None:  # freetf prepare's output: its meta.json names the vocabulary
        meta = read_meta(folder)
        check_token_ids(folder, meta)  # first: ids outside meta.json's vocabulary mean damage
        size = meta["vocab_size"]
        if vocab != size:
            raise ConfigError(f"model.vocab_size={vocab} does not match the vocabulary of the "
                              f"data in {folder} ({size}, meta.json): set "
                              f"model.vocab_size={size}, or leave it out (it defaults to the "
                              f"data's vocabulary)")
        return
    if name == "tokens":
        highest = max_token_id(cfg.data.path)
        if highest >= vocab:
            raise ConfigError(f"model.vocab_size={vocab} is too small for data.path "
                              f"{cfg.data.path}, which holds token id {highest}: set "
                              f"model.vocab_size={highest + 1} or more")
        return
    size = build_tokenizer(cfg).vocab_size
    if vocab != size:
        what = f"synthetic task's {size} symbols" if name == "synthetic" else f"{size} byte values"
        harm = ("would sample ids that nothing decodes" if vocab > size
                else "cannot represent every id of the data")
        raise ConfigError(f"model.vocab_size={vocab} does not match the {what} of "
                          f"data.dataset_name={name!r}: the model {harm}. Set "
                          f"model.vocab_size={size}, or leave it out (it defaults to the "
                          f"data's vocabulary)")
