"""The documents of ``freetf prepare``'s inputs: folders, files, globs, JSONL, Parquet,
Hugging Face datasets and the standard library, each as (document id, text loader).

A file's text is loaded only when its shard is encoded, so a resumed run reads only
the documents of the shards it has still to write.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java",
                 ".js", ".ts", ".go", ".rs", ".rb", ".sh", ".tex", ".json", ".yaml", ".yml",
                 ".toml", ".html", ".css")
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__",
                        "lib2to3", "turtledemo"}


class PrepareError(ValueError):
    """Bad arguments or inputs to ``freetf prepare`` (the CLI prints one line)."""


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (tests, IDLE and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not _SKIPPED_STDLIB_DIRS & set(p.relative_to(root).parts[:-1]))


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _file_documents(paths: list[Path], root: Path | None
                    ) -> Iterator[tuple[str, Callable[[], str]]]:
    """A file's id is its path relative to the input folder: the split does not change
    when the corpus moves."""
    for path in paths:
        yield str(path.relative_to(root) if root else path), (lambda p=path: _read_text(p))


def _jsonl_documents(path: Path, field: str) -> Iterator[tuple[str, Callable[[], str]]]:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PrepareError(f"{path}:{i + 1}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise PrepareError(f"{path}:{i + 1}: no {field!r} field (set --text-field)")
            text = str(record[field])
            yield f"{path.name}#{i}", (lambda t=text: t)


def _parquet_documents(path: Path, field: str) -> Iterator[tuple[str, Callable[[], str]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if field not in table.column_names:
        raise PrepareError(f"{path}: no column {field!r} (columns: {table.column_names}; "
                           f"set --text-field)")
    for i, text in enumerate(table.column(field).to_pylist()):
        yield f"{path.name}#{i}", (lambda t=str(text): t)


def _hf_documents(spec: str, field: str) -> Iterator[tuple[str, Callable[[], str]]]:
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
        yield f"{spec}#{i}", (lambda t=str(text): t)


def iter_documents(inputs: tuple[str, ...], text_field: str = "text"
                   ) -> Iterator[tuple[str, Callable[[], str]]]:
    """(document id, text loader) for every document of every input, in a fixed order."""
    if not inputs:
        raise PrepareError("no inputs: give folders, files, globs, 'stdlib' or hf:NAME")
    for item in inputs:
        path = Path(item)
        if item == "stdlib":
            yield from _file_documents(stdlib_files(), Path(sysconfig.get_paths()["stdlib"]))
        elif item.startswith("hf:"):
            yield from _hf_documents(item, text_field)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise PrepareError(f"{item}: a folder with no text or code files "
                                   f"({', '.join(TEXT_SUFFIXES[:6])}, ...)")
            yield from _file_documents(files, path)
        elif path.suffix == ".jsonl" and path.is_file():
            yield from _jsonl_documents(path, text_field)
        elif path.suffix == ".parquet" and path.is_file():
            yield from _parquet_documents(path, text_field)
        elif path.is_file():
            yield from _file_documents([path], None)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                raise PrepareError(f"{item}: no such file, folder or matching glob")
            yield from _file_documents(files, None)
