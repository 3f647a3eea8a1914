"""Tokenizers for real corpora: a byte-level BPE trained on the corpus, or one from disk.

Both wrap Hugging Face ``tokenizers`` behind the project's ``Tokenizer`` protocol
(``vocab_size``, ``encode``, ``decode``).  The byte-level pre-tokenizer makes every
string encodable (no unknown tokens) and decoding exact.  Documents are separated by
the special token ``END_OF_DOCUMENT``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

END_OF_DOCUMENT = "<|endoftext|>"


def _tokenizers():
    try:
        import tokenizers
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("BPE tokenizers need the `tokenizers` package "
                          "(pip install tokenizers)") from err
    return tokenizers


class BPETokenizer:
    """A ``tokenizers.Tokenizer`` seen through the project's Tokenizer protocol."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.end_of_document = tokenizer.token_to_id(END_OF_DOCUMENT)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return cls(_tokenizers().Tokenizer.from_file(str(path)))

    @classmethod
    def from_str(cls, text: str) -> BPETokenizer:
        return cls(_tokenizers().Tokenizer.from_str(text))

    def to_str(self) -> str:
        return self.tokenizer.to_str()

    def save(self, path: str | Path) -> Path:
        self.tokenizer.save(str(path))
        return Path(path)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def train_bpe(texts: Iterator[str] | Iterable[str], vocab_size: int,
              min_frequency: int = 2) -> BPETokenizer:
    """A byte-level BPE with ``vocab_size`` entries (256 bytes + merges + the separator)."""
    tk = _tokenizers()
    if vocab_size < 257:
        raise ValueError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 257 "
                         f"entries (256 bytes and the end-of-document token)")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=[END_OF_DOCUMENT],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tokenizer)
