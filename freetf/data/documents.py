"""The documents of ``freetf prepare``'s inputs: folders, files, globs, JSONL, Parquet,
Hugging Face datasets and the standard library, each as (document id, text loader).

A file's text is loaded only when its shard is encoded, so a resumed run reads only
the documents of the shards it has still to write.  Text is UTF-8 (a leading byte-order
mark is dropped).  A file holding NUL bytes is binary and skipped; a file that is not
UTF-8 is skipped too, or, with ``encoding_errors="replace"``, kept with U+FFFD where
its bytes do not decode.  A loader says which (:class:`Loaded`), so that the skipped
documents are counted and named.  A JSONL, Parquet or dataset record whose text is not
a string is an error naming the file and line.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java",
                 ".js", ".ts", ".go", ".rs", ".rb", ".sh", ".tex", ".json", ".yaml", ".yml",
                 ".toml", ".html", ".css")
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__",
                        "lib2to3", "turtledemo"}


ENCODING_ERRORS = ("strict", "replace")  # what a file that is not UTF-8 becomes


class PrepareError(ValueError):
    """Bad arguments or inputs to ``freetf prepare`` (the CLI prints one line)."""


class Loaded(NamedTuple):
    """A document's text, or None when it is skipped; ``problem`` says why it was
    skipped, or what was replaced to decode it (None for clean UTF-8 text)."""

    text: str | None
    problem: str | None = None


Loader = Callable[[], Loaded]


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (tests, IDLE and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not _SKIPPED_STDLIB_DIRS & set(p.relative_to(root).parts[:-1]))


def _bom_length(data: bytes) -> int:
    """The length of the UTF-8 byte-order mark ``data`` starts with, 0 without one."""
    return len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0


def decode_text(data: bytes, encoding_errors: str = "strict") -> Loaded:
    """A file's bytes as a document: UTF-8 without its byte-order mark; a file with NUL
    bytes is binary (skipped); one that is not UTF-8 is skipped, or kept with U+FFFD in
    place of what does not decode when ``encoding_errors`` is "replace"."""
    if b"\0" in data:
        return Loaded(None, f"binary: a NUL byte at offset {data.index(0)}")
    try:
        return Loaded(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:  # err.start counts from after the byte-order mark
        at = err.start + _bom_length(data)
        why = f"not UTF-8: byte 0x{data[at]:02x} at offset {at}"
    if encoding_errors == "strict":
        return Loaded(None, why)
    return Loaded(data.decode("utf-8-sig", errors="replace"), f"{why}, replaced by U+FFFD")


def _record_text(value: object, where: str, encoding_errors: str) -> Loaded:
    """A JSONL / Parquet / dataset record's text field as a document."""
    if not isinstance(value, str):
        raise PrepareError(f"{where}: the text field is {_json_type(value)}, not a string")
    if "\0" in value:
        return Loaded(None, f"binary: a NUL character at offset {value.index(chr(0))}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate, written "\udXXX" in JSON
        if encoding_errors == "strict":
            raise PrepareError(f"{where}: the text holds a lone surrogate "
                               f"U+{ord(value[err.start]):04X}, not Unicode text "
                               f"(--encoding-errors replace replaces it)") from None
        fixed = value.encode("utf-8", "surrogatepass").decode("utf-8", errors="replace")
        return Loaded(fixed, "a lone surrogate, replaced by U+FFFD")
    return Loaded(value)


def _json_type(value: object) -> str:
    """What a record's value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


def _read_text(path: Path, encoding_errors: str) -> Loaded:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PrepareError(f"{path}: cannot read it ({err.strerror})") from None
    return decode_text(data, encoding_errors)


def _file_documents(paths: list[Path], root: Path | None, encoding_errors: str
                    ) -> Iterator[tuple[str, Loader]]:
    """A file's id is its path relative to the input folder: the split does not change
    when the corpus moves."""
    for path in paths:
        yield (str(path.relative_to(root) if root else path),
               lambda p=path: _read_text(p, encoding_errors))


def _folder_files(folder: Path) -> list[Path]:
    """The text and code files under ``folder``; a sub-folder that cannot be read is an
    error, not a silent gap in the corpus."""
    def fail(err: OSError) -> None:
        raise PrepareError(f"{err.filename}: cannot read this folder ({err.strerror})")

    files = [Path(root, name) for root, _, names in os.walk(folder, onerror=fail)
             for name in names if Path(name).suffix.lower() in TEXT_SUFFIXES]
    return sorted(p for p in files if p.is_file())


def _jsonl_documents(path: Path, field: str, encoding_errors: str
                     ) -> Iterator[tuple[str, Loader]]:
    try:
        f = path.open("rb")
    except OSError as err:
        raise PrepareError(f"{path}: cannot read it ({err.strerror})") from None
    with f:
        for i, raw in enumerate(f):
            replaced = None
            try:
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError as err:
                at = err.start + _bom_length(raw)
                replaced = f"not UTF-8: byte 0x{raw[at]:02x} at column {at + 1}"
                if encoding_errors == "strict":
                    raise PrepareError(f"{path}:{i + 1}: {replaced}; JSON Lines are UTF-8 "
                                       f"(--encoding-errors replace decodes it anyway)") from None
                line = raw.decode("utf-8-sig", errors="replace")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PrepareError(f"{path}:{i + 1}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise PrepareError(f"{path}:{i + 1}: no {field!r} field (set --text-field)")
            loaded = _record_text(record[field], f"{path}:{i + 1}", encoding_errors)
            if replaced and loaded.problem is None:
                loaded = Loaded(loaded.text, f"{replaced}, replaced by U+FFFD")
            yield f"{path.name}#{i}", (lambda d=loaded: d)


def _parquet_documents(path: Path, field: str, encoding_errors: str
                       ) -> Iterator[tuple[str, Loader]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:  # pyarrow's errors are both
        raise PrepareError(f"{path}: not a readable Parquet file ({err})") from None
    if field not in table.column_names:
        raise PrepareError(f"{path}: no column {field!r} (columns: {table.column_names}; "
                           f"set --text-field)")
    for i, text in enumerate(table.column(field).to_pylist()):
        loaded = _record_text(text, f"{path}: row {i}", encoding_errors)
        yield f"{path.name}#{i}", (lambda d=loaded: d)


def _hf_documents(spec: str, field: str, encoding_errors: str
                  ) -> Iterator[tuple[str, Loader]]:
    try:
        import datasets
    except ImportError:
        raise PrepareError(f"{spec}: Hugging Face datasets need the `datasets` package "
                           f"(pip install 'freetf[hf]')") from None
    name, _, split = spec[3:].partition(":")
    data = datasets.load_dataset(name, split=split or "train")
    if field not in data.column_names:
        raise PrepareError(f"{spec}: no column {field!r} (columns: {data.column_names}; "
                           f"set --text-field)")
    for i, text in enumerate(data[field]):
        loaded = _record_text(text, f"{spec}: row {i}", encoding_errors)
        yield f"{spec}#{i}", (lambda d=loaded: d)


def iter_documents(inputs: tuple[str, ...], text_field: str = "text",
                   encoding_errors: str = "strict") -> Iterator[tuple[str, Loader]]:
    """(document id, text loader) for every document of every input, in a fixed order."""
    if not inputs:
        raise PrepareError("no inputs: give folders, files, globs, 'stdlib' or hf:NAME")
    for item in inputs:
        path = Path(item)
        if item == "stdlib":
            yield from _file_documents(stdlib_files(), Path(sysconfig.get_paths()["stdlib"]),
                                       encoding_errors)
        elif item.startswith("hf:"):
            yield from _hf_documents(item, text_field, encoding_errors)
        elif path.is_dir():
            files = _folder_files(path)
            if not files:
                raise PrepareError(f"{item}: a folder with no text or code files "
                                   f"({', '.join(TEXT_SUFFIXES[:6])}, ...)")
            yield from _file_documents(files, path, encoding_errors)
        elif path.suffix == ".jsonl" and path.is_file():
            yield from _jsonl_documents(path, text_field, encoding_errors)
        elif path.suffix == ".parquet" and path.is_file():
            yield from _parquet_documents(path, text_field, encoding_errors)
        elif path.is_file():
            yield from _file_documents([path], None, encoding_errors)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                raise PrepareError(f"{item}: no such file, folder or matching glob")
            yield from _file_documents(files, None, encoding_errors)
