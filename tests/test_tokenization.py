"""The byte-level BPE: its size limits, merge threshold and messages."""

from __future__ import annotations

import sys

import pytest

from freetf.data.tokenization import END_OF_DOCUMENT, BPETokenizer, train_bpe

pytestmark = pytest.mark.timeout(60)


def test_a_pair_seen_twice_is_merged_by_default_and_not_at_three():
    texts = ["ab", "ab"]  # the pair (a, b) twice
    assert train_bpe(texts, 1000).vocab_size == 258  # 256 bytes, the separator, "ab"
    assert train_bpe(texts, 1000, min_frequency=3).vocab_size == 257
    merged = train_bpe(texts, 1000)
    assert merged.encode("ab") == [merged.tokenizer.token_to_id("ab")]
    assert merged.end_of_document == merged.tokenizer.token_to_id(END_OF_DOCUMENT)


def test_the_smallest_vocabulary_is_257():
    assert train_bpe(["abc"], 257).vocab_size == 257
    with pytest.raises(ValueError) as err:
        train_bpe(["abc"], 256)
    assert str(err.value) == ("--vocab-size 256: a byte-level BPE needs at least 257 entries "
                              "(256 bytes and the end-of-document token)")


def test_a_missing_file_and_a_missing_package_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        BPETokenizer.from_file(tmp_path / "tok.json")
    assert str(err.value) == f"tokenizer file {tmp_path / 'tok.json'} does not exist"
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError) as err:
        train_bpe(["abc"], 300)
    assert str(err.value) == ("BPE tokenizers need the `tokenizers` package "
                              "(pip install tokenizers)")
