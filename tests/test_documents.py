"""prepare's inputs: UTF-8 or skipped, binary skipped, records whose text is not a string
refused with file and line, unreadable inputs one clear error."""

from __future__ import annotations

import os
import sys
import sysconfig
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freetf.data.documents import Loaded, PrepareError, decode_text, iter_documents, stdlib_files

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
    (b"\xef\xbb\xbf" + LATIN1, "replace",  # the BOM is dropped from repaired text too
     Loaded("caf\ufffd cr\ufffdme, na\ufffdve fa\ufffdade\n",
            "not UTF-8: byte 0xe9 at offset 6, replaced by U+FFFD")),
])
def test_decode_text(data, errors, expected):
    assert decode_text(data, errors) == expected


def test_decode_text_is_strict_by_default():
    assert decode_text(LATIN1) == Loaded(None, "not UTF-8: byte 0xe9 at offset 3")


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



def one_error(*inputs, **kwargs) -> str:
    with pytest.raises(PrepareError) as err:
        documents(*inputs, **kwargs)
    return str(err.value)


def test_jsonl_lines_blank_lines_fields_and_repairs(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", b'{"text": "a"}', b"", b"  ", b'{"text": "b"}')
    assert documents(path) == {"d.jsonl#0": Loaded("a"), "d.jsonl#3": Loaded("b")}
    nofield = write_jsonl(tmp_path / "f.jsonl", b'{"text": "a"}', b'{"body": "b"}')
    assert one_error(nofield) == f"{nofield}:2: no 'text' field (set --text-field)"
    # a repaired line, its BOM dropped as well; the clean line before it has no problem
    bad = write_jsonl(tmp_path / "bad.jsonl", b'{"text": "ok"}',
                      b'\xef\xbb\xbf{"text": "caf\xe9"}')
    assert documents(bad, encoding_errors="replace") == {
        "bad.jsonl#0": Loaded("ok"),
        "bad.jsonl#1": Loaded("caf\ufffd", "not UTF-8: byte 0xe9 at column 17, replaced by "
                                            "U+FFFD")}
    lone = write_jsonl(tmp_path / "lone.jsonl", b'{"text": "a\\ud800b\\u0000c\\u0000"}')
    assert documents(lone, encoding_errors="replace")["lone.jsonl#0"] == Loaded(
        None, "binary: a NUL character at offset 3")  # the first of two
    lone.write_bytes(b'{"text": "a\\ud800b"}\n')
    assert documents(lone, encoding_errors="replace")["lone.jsonl#0"] == Loaded(
        "a\ufffd\ufffd\ufffdb", "a lone surrogate, replaced by U+FFFD")

    real_open = type(tmp_path).open

    def refuse(self, *args, **kwargs):
        if self.name == "d.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "open", refuse)
    assert one_error(path) == f"{path}: cannot read it (Permission denied)"


def test_a_parquet_value_of_another_type_is_named_by_its_type(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [b"raw"]}), tmp_path / "b.parquet")
    assert one_error(tmp_path / "b.parquet") == (f"{tmp_path / 'b.parquet'}: row 0: the text "
                                                 f"field is a bytes, not a string")


def test_no_inputs_and_a_folder_without_text_are_one_error_each(tmp_path):
    assert one_error() == "no inputs: give folders, files, globs, 'stdlib' or hf:NAME"
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert one_error(tmp_path) == (f"{tmp_path}: a folder with no text or code files (.txt, "
                                   f".md, .rst, .py, .c, .h, ...)")


def test_files_and_globs_keep_their_paths_and_skip_what_is_not_utf8(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "deep.py").write_text("deep = 1\n")
    (tmp_path / "a" / "top.py").write_text("top = 1\n")
    (tmp_path / "a" / "dir.py").mkdir()  # matches the glob, not a file
    (tmp_path / "a" / "latin1.py").write_bytes(LATIN1)
    skipped = Loaded(None, "not UTF-8: byte 0xe9 at offset 3")
    assert documents(tmp_path / "a" / "latin1.py") == {str(tmp_path / "a" / "latin1.py"): skipped}
    assert documents(tmp_path / "a" / "**" / "*.py") == {
        str(tmp_path / "a" / "b" / "deep.py"): Loaded("deep = 1\n"),
        str(tmp_path / "a" / "latin1.py"): skipped,
        str(tmp_path / "a" / "top.py"): Loaded("top = 1\n")}
    assert one_error(tmp_path / "a" / "*.rs") == f"{tmp_path / 'a' / '*.rs'}: no such file, " \
                                                 f"folder or matching glob"


def test_stdlib_is_read_under_its_root_skipping_tests(tmp_path, monkeypatch):
    """The standard library seen through ``sysconfig``, here pointed at a small tree."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("mod = 1\n")
    (tmp_path / "tests" / "test_x.py").write_text("x = 1\n")
    (tmp_path / "latin1.py").write_bytes(LATIN1)
    real = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda: dict(real, stdlib=str(tmp_path)))
    assert stdlib_files() == [tmp_path / "latin1.py", tmp_path / "pkg" / "mod.py"]
    assert documents("stdlib") == {"latin1.py": Loaded(None, "not UTF-8: byte 0xe9 at offset 3"),
                                   os.path.join("pkg", "mod.py"): Loaded("mod = 1\n")}


def test_a_hugging_face_dataset_is_read_by_name_split_and_field(monkeypatch):
    calls = []

    class Dataset:
        column_names = ["body"]

        def __getitem__(self, field):
            return ["a", "b\ud800"]

    def load_dataset(name, split):
        calls.append((name, split))
        return Dataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert documents("hf:org/set:test", text_field="body", encoding_errors="replace") == {
        "hf:org/set:test#0": Loaded("a"),
        "hf:org/set:test#1": Loaded("b\ufffd\ufffd\ufffd", "a lone surrogate, replaced by U+FFFD")}
    assert calls == [("org/set", "test")]
    documents("hf:org/set", text_field="body", encoding_errors="replace")
    assert calls[-1] == ("org/set", "train")
    assert one_error("hf:org/set:test#0") == ("hf:org/set:test#0: no column 'text' (columns: "
                                              "['body']; set --text-field)")
    with pytest.raises(PrepareError, match=r"hf:org/set:test: row 1: the text holds a lone "
                                           r"surrogate U\+D800"):
        documents("hf:org/set:test", text_field="body")
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert one_error("hf:x") == ("hf:x: Hugging Face datasets need the `datasets` package "
                                 "(pip install 'freetf[hf]')")
