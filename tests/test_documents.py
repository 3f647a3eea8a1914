"""prepare's inputs: UTF-8 or skipped, binary skipped, records whose text is not a string
refused with file and line, unreadable inputs one clear error."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freetf.data.documents import Loaded, PrepareError, decode_text, iter_documents

pytestmark = pytest.mark.timeout(60)

LATIN1 = "café crème, naïve façade\n".encode("latin-1")  # 0xe9 at offset 3


def documents(*inputs, **kwargs) -> dict[str, Loaded]:
    return {doc_id: load() for doc_id, load in iter_documents(tuple(map(str, inputs)),
                                                              **kwargs)}


@settings(max_examples=200, deadline=None)
@given(st.text(), st.booleans())
def test_utf8_text_decodes_exactly_without_its_bom(text, bom):
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass")
    loaded = decode_text(data)
    if "\0" in text:
        assert loaded.text is None and loaded.problem.startswith("binary")
    elif any(0xD800 <= ord(c) <= 0xDFFF for c in text):  # not encodable: not UTF-8
        assert loaded.text is None and loaded.problem.startswith("not UTF-8")
    else:
        assert loaded == Loaded(text)


@pytest.mark.parametrize("data,errors,expected", [
    (b"x = 1\n", "strict", Loaded("x = 1\n")),
    (b"\xef\xbb\xbfx = 1\n", "strict", Loaded("x = 1\n")),  # a BOM is dropped, not an error
    (b"\x89PNG\r\n\x1a\n\x00\x00", "strict", Loaded(None, "binary: a NUL byte at offset 8")),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "replace", Loaded(None, "binary: a NUL byte at offset 8")),
    (LATIN1, "strict", Loaded(None, "not UTF-8: byte 0xe9 at offset 3")),
    (LATIN1, "replace", Loaded("caf\ufffd cr\ufffdme, na\ufffdve fa\ufffdade\n",
                               "not UTF-8: byte 0xe9 at offset 3, replaced by U+FFFD")),
])
def test_decode_text(data, errors, expected):
    assert decode_text(data, errors) == expected


def test_a_folder_names_what_it_skips(tmp_path):
    (tmp_path / "ok.py").write_text("print('ok')\n")
    (tmp_path / "blob.py").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" * 50)
    (tmp_path / "latin1.txt").write_bytes(LATIN1)
    (tmp_path / "bom.md").write_bytes(b"\xef\xbb\xbf# title\n")
    docs = documents(tmp_path)
    assert docs == {"blob.py": Loaded(None, "binary: a NUL byte at offset 7"),
                    "bom.md": Loaded("# title\n"),
                    "latin1.txt": Loaded(None, "not UTF-8: byte 0xe9 at offset 3"),
                    "ok.py": Loaded("print('ok')\n")}
    assert documents(tmp_path / "blob.py")[str(tmp_path / "blob.py")].text is None  # named too


def write_jsonl(path, *lines: bytes):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("value,what", [
    ("null", "null"), ("12345", r"a number \(12345\)"), ("1.5", r"a number \(1.5\)"),
    ('{"nested": 1}', "an object"), ("[1, 2]", "an array"), ("true", r"a boolean \(true\)"),
])
def test_a_jsonl_text_that_is_not_a_string_names_file_and_line(tmp_path, value, what):
    path = write_jsonl(tmp_path / "docs.jsonl", b'{"text": "fine"}',
                       f'{{"text": {value}}}'.encode())
    with pytest.raises(PrepareError, match=rf"docs.jsonl:2: the text field is {what}, "
                                           r"not a string$"):
        documents(path)


def test_jsonl_encoding(tmp_path):
    path = write_jsonl(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"text": "first"}', b'{"text": "b"}')
    assert [d.text for d in documents(path).values()] == ["first", "b"]  # the BOM is dropped

    bad = write_jsonl(tmp_path / "bad.jsonl", b'{"text": "ok"}', b'{"text": "caf\xe9"}')
    with pytest.raises(PrepareError, match=r"bad.jsonl:2: not UTF-8: byte 0xe9 at column 14; "
                                           r"JSON Lines are UTF-8"):
        documents(bad)
    repaired = documents(bad, encoding_errors="replace")["bad.jsonl#1"]
    assert repaired == Loaded("caf\ufffd", "not UTF-8: byte 0xe9 at column 14, replaced by U+FFFD")

    lone = write_jsonl(tmp_path / "lone.jsonl", b'{"text": "a\\ud800b"}')
    with pytest.raises(PrepareError, match=r"lone.jsonl:1: the text holds a lone surrogate "
                                           r"U\+D800"):
        documents(lone)
    assert documents(lone, encoding_errors="replace")["lone.jsonl#0"].text == "a\ufffd\ufffd\ufffdb"

    nul = write_jsonl(tmp_path / "nul.jsonl", b'{"text": "a\\u0000b"}')
    assert documents(nul)["nul.jsonl#0"] == Loaded(None, "binary: a NUL character at offset 1")


def test_a_parquet_text_that_is_not_a_string_names_the_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "d.parquet")
    with pytest.raises(PrepareError, match=r"d.parquet: row 1: the text field is null"):
        documents(tmp_path / "d.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PrepareError, match=r"broken.parquet: not a readable Parquet file"):
        documents(tmp_path / "broken.parquet")


def test_unreadable_inputs_are_one_error(tmp_path, monkeypatch):
    """Permissions do not bind root, so the OS errors are planted where the reads happen."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.py").write_text("a = 1\n")
    (tmp_path / "b.py").write_text("b = 2\n")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    with monkeypatch.context() as m:
        m.setattr(os, "scandir", scandir)
        with pytest.raises(PrepareError, match=r"sub: cannot read this folder "
                                               r"\(Permission denied\)"):
            documents(tmp_path)

    real_read = type(tmp_path).read_bytes

    def read_bytes(self):
        if self.name == "b.py":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(type(tmp_path), "read_bytes", read_bytes)
    with pytest.raises(PrepareError, match=r"b.py: cannot read it \(Permission denied\)"):
        documents(tmp_path)
