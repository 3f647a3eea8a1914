"""The files of a checkpoint directory and how they are written, for both formats: the
full one (:mod:`freetf.training.checkpoint`) and the sharded one
(:mod:`freetf.training.sharded_checkpoint`).

Everything here is written atomically: a directory is filled under a temporary name and
renamed into place (:func:`replace_dir`), the ``latest`` pointer of a root is replaced
in one rename (:func:`atomic_write_text`), and :func:`publish` does both for a new step.

``meta.json`` is written last and lists every other file with its size (``files``): a
checkpoint that was copied only in part (Ray Train copies a worker's checkpoint into
``scaling.storage_path`` file by file, in no set order) lacks it or disagrees with it,
and :func:`incomplete_reason` says so.  Checkpoints from before the list count as
complete when ``meta.json``, ``state.pt`` and ``config.yaml`` are there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from freetf.config import Config

STATE_FILE, CONFIG_FILE, META_FILE, LATEST_FILE = "state.pt", "config.yaml", "meta.json", "latest"
TOKENIZER_FILE, DATA_META_FILE = "tokenizer.json", "data_meta.json"
SHARDS_DIR = "shards"
FILES_KEY = "files"  # meta.json: every other file of the checkpoint, with its size


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written: a full disk, a lost mount, no permission.

    ``path``: where it was going; ``cause``: why, in a few words; ``last_good``: the
    newest whole checkpoint of the run (None: none was saved), which the runner fills
    in (under Ray, the persisted one).  The message is one line.
    """

    def __init__(self, path: str | Path, cause: str, last_good: str | Path | None = None,
                 ) -> None:
        self.path, self.cause = Path(path), cause
        self.last_good = Path(last_good) if last_good is not None else None
        super().__init__(str(self.path))

    def __reduce__(self):
        return type(self), (self.path, self.cause, self.last_good)

    def __str__(self) -> str:
        where = (f"the last good checkpoint is {self.last_good} (continue from it with "
                 f"--resume {self.last_good})" if self.last_good is not None else
                 "no checkpoint of this run was saved before")
        return f"cannot write the checkpoint {self.path}: {self.cause}; {where}"


def is_sharded(path: str | Path) -> bool:
    """Does the checkpoint directory ``path`` keep its weights in DCP shards?"""
    return (Path(path) / SHARDS_DIR).is_dir()


def write_files(directory: Path, state: dict[str, Any], config: Config,
               meta: dict[str, Any] | None, written: dict[str, int] | None = None) -> None:
    """``state.pt``, ``config.yaml``, the prepared data's tokenizer
    (:func:`_copy_tokenizer`) and, last, ``meta.json`` into an existing ``directory``.

    ``written``: files already in ``directory`` (relative path -> size, e.g. the DCP
    shards) to list in ``meta.json`` beside these.  ``state.pt`` is written through a
    Python file and synced before ``meta.json``: a full disk is an ``OSError`` naming
    its cause (``torch.save`` to a path says only ``unexpected pos``).
    """
    with open(directory / STATE_FILE, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    (directory / CONFIG_FILE).write_text(config.to_yaml())
    _copy_tokenizer(config, directory)
    files = dict(written or {})
    for path in directory.iterdir():
        if path.is_file() and path.name != META_FILE:
            files[path.name] = path.stat().st_size
    (directory / META_FILE).write_text(json.dumps({**(meta or {}), FILES_KEY: files},
                                                  indent=2, default=float))


def incomplete_reason(directory: Path) -> str | None:
    """Why the checkpoint ``directory`` is not whole, or None if it is."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        return f"it has no {META_FILE}, which is written last"
    try:
        files = json.loads(meta_path.read_text()).get(FILES_KEY)
    except (OSError, ValueError, AttributeError):
        return f"its {META_FILE} is damaged"
    if files is None:  # written before the list: the two files the loader needs
        missing = [name for name in (STATE_FILE, CONFIG_FILE) if not (directory / name).is_file()]
        return f"{' and '.join(missing)} missing" if missing else None
    for name, size in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} of its {size} bytes"
    return None


def write_failure(err: BaseException) -> str | None:
    """The OS error behind a failed write, in a few words (``No space left on device``),
    or None if ``err`` has none in its chain (a full disk under ``torch.save`` can surface
    as a RuntimeError whose context is the OSError)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            if isinstance(seen.errno, int):  # pyarrow's strerror is a paragraph
                return os.strerror(seen.errno)
            number = re.search(r"\[errno (\d+)\]", str(seen), re.IGNORECASE)
            return os.strerror(int(number[1])) if number else str(seen) or type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return None


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
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the complete directory ``src`` to ``dst``, replacing what was there."""
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def publish(root: Path, path: Path, keep: int) -> None:
    """Point ``root/latest`` at the checkpoint ``path`` and keep the newest ``keep``."""
    atomic_write_text(root / LATEST_FILE, path.name)
    for old in step_folders(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def step_folders(root: Path) -> list[Path]:
    """``root``'s ``step_<n>`` folders in step order (by number: ``step_1000000`` comes
    after ``step_999999``, which its name sorts before)."""
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def attempt(fn, *args, any_error: bool = False) -> str | None:
    """Run ``fn``: None if it worked, else the cause of its I/O failure in a few words
    (:func:`write_failure`).  Another error is raised, or with ``any_error`` turned into
    its first line too."""
    try:
        fn(*args)
    except Exception as err:
        cause = write_failure(err)
        if cause is not None:
            return cause
        if not any_error:
            raise
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return None
