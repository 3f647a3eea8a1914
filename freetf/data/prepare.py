"""``freetf prepare``: a corpus of documents -> memory-mapped token shards + metadata.

Inputs (any mix): a folder (its text and code files, recursively), a glob, a single file,
a ``.jsonl`` file (one document per line, its ``text_field``), a ``.parquet`` file (one
document per row), ``hf:NAME[:SPLIT]`` (a Hugging Face dataset through ``datasets``: local
or cached files here, the hub where the network allows), or ``stdlib`` (the ``.py`` files
of the running interpreter's standard library: real code on every machine, no download).

Output folder::

    meta.json        tokenizer, vocabulary size, dtype, tokens / bytes / documents and the
                     largest id per split, the documents skipped on reading (decoding)
    train.bin        token ids, little-endian uint16 (uint32 when the vocabulary needs it)
    val.bin          the validation split: whole documents, none of them in train.bin
    tokenizer.json   the BPE tokenizer (bpe or a tokenizer file), used by training and
                     generation

The split is by document (a hash of the document's id and the seed), so no file is in
both.  Documents are encoded in shards of ``shard_docs`` documents, each written
atomically under ``<out>.partial/shards/``: an interrupted run started again with the
same arguments skips the shards it finished.  ``meta.json`` is written last and the
folder is then renamed to ``<out>``: a folder without ``meta.json`` is never left at
``<out>``.  Training reads ``meta.json`` and checks the token files against it (sizes,
largest id) and ``model.vocab_size`` against the data before the first step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from freetf.data.documents import ENCODING_ERRORS, Loader, PrepareError, iter_documents
from freetf.data.token_files import META_FORMAT
from freetf.data.tokenization import BPETokenizer, train_bpe

logger = logging.getLogger(__name__)

BYTE_END_OF_DOCUMENT = 0  # NUL: the byte tokenizer's document separator
MAX_PROBLEMS_KEPT = 100  # documents named in meta.json's decoding.problems


@dataclass(frozen=True)
class PrepareSpec:
    """Everything that decides the output: a resumed run must match it."""

    inputs: tuple[str, ...]
    tokenizer: str  # "byte", "bpe", or the path of a tokenizer.json
    vocab_size: int = 8192  # bpe only
    val_fraction: float = 0.05
    seed: int = 0
    text_field: str = "text"
    shard_docs: int = 256
    # "strict": a file that is not UTF-8 is skipped; "replace": kept, U+FFFD for what
    # does not decode.  Binary files (NUL bytes) are skipped either way.
    encoding_errors: str = "strict"


def is_validation(doc_id: str, val_fraction: float, seed: int) -> bool:
    """A document's split, decided by a hash of its id and the seed (stable across runs)."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


# ----------------------------------------------------------------------------- encoding

_WORKER_TOKENIZER: BPETokenizer | None = None


def _init_worker(tokenizer_json: str | None) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = BPETokenizer.from_str(tokenizer_json) if tokenizer_json else None


def _encode_shard(job: tuple[Path, list[str], str, dict]) -> Path:
    """Encode one shard's documents (each followed by the separator) and write it with
    its statistics (``decoding``: the documents skipped or repaired on reading)."""
    path, texts, dtype, decoding = job
    if _WORKER_TOKENIZER is None:
        pieces = [np.append(np.frombuffer(t.encode("utf-8"), np.uint8), BYTE_END_OF_DOCUMENT)
                  for t in texts]
    else:
        eod = _WORKER_TOKENIZER.end_of_document
        pieces = [np.append(np.asarray(ids, np.int64), eod)
                  for ids in _WORKER_TOKENIZER.encode_batch(texts)]
    ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    stats = {"documents": len(texts), "tokens": int(ids.size),
             "bytes": sum(len(t.encode("utf-8")) for t in texts),
             "max_id": int(ids.max()) if ids.size else -1, **decoding}
    _atomic_write(path.with_suffix(".json"), json.dumps(stats).encode())
    _atomic_write(path, ids.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def token_dtype(vocab_size: int) -> str:
    """uint16 while every id fits, else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


# ----------------------------------------------------------------------------- prepare


def prepare(spec: PrepareSpec, out_dir: str | Path, workers: int = 1,
            progress: bool = True) -> dict:
    """Tokenize ``spec.inputs`` into ``out_dir``; returns the metadata (also meta.json).

    The work is done in the sibling ``<out_dir>.partial``, renamed to ``out_dir`` once
    complete, so a failed run leaves no folder that looks prepared.  An interrupted run
    (or one stopped by the system: a full disk) keeps its finished shards there and the
    same command resumes from them; a run stopped by its input (:class:`PrepareError`)
    removes it, since the input has to change.
    """
    _validate(spec, workers)
    out = Path(os.path.abspath(out_dir))
    if (meta := _already_prepared(out, spec)) is not None:
        logger.info("%s is already prepared", out)
        return meta
    partial = out.with_name(out.name + ".partial")
    _check_unfinished(partial, spec)
    created = partial  # and the missing folders above it, removed with it on an error
    while not created.parent.exists():
        created = created.parent
    try:
        meta = _prepare_into(partial, spec, workers, progress)
    except PrepareError:
        shutil.rmtree(created, ignore_errors=True)
        raise
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        kept = (f"; the finished shards are kept in {partial}: the same command resumes from "
                f"them" if (partial / "shards").is_dir() else "")
        raise PrepareError(f"{where}{err.strerror or err}{kept}") from err
    except BaseException:
        if partial.is_dir():
            logger.warning("stopped: the finished shards are kept in %s; the same command "
                           "resumes from them (delete it to start over)", partial)
        raise
    os.replace(partial, out)  # also in the place of an empty folder (POSIX rename)
    return meta


def _already_prepared(out: Path, spec: PrepareSpec) -> dict | None:
    """The metadata of ``out`` if it holds this preparation; None if ``out`` is missing or
    an empty folder; else why it cannot be the output (:class:`PrepareError`)."""
    from freetf.files import unwritable  # the run's own output check

    why = unwritable(out) or unwritable(out.parent)
    if why:
        raise PrepareError(f"--out {out}: {why}")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    try:
        meta = json.loads((out / "meta.json").read_text())
    except FileNotFoundError:
        raise PrepareError(f"--out {out} is a folder that holds no prepared data (no "
                           f"meta.json): choose another --out or delete it") from None
    except (OSError, ValueError) as err:
        raise PrepareError(f"--out {out}: its meta.json cannot be read ({err}): choose "
                           f"another --out or delete it") from None
    if not isinstance(meta, dict) or meta.get("spec") != _spec_dict(spec):
        raise PrepareError(f"--out {out} already holds data prepared with other "
                           f"settings; choose another --out")
    return meta


def _check_unfinished(partial: Path, spec: PrepareSpec) -> None:
    """An unfinished preparation in ``partial`` must be this one to be resumed."""
    try:
        saved = json.loads((partial / "prepare.json").read_text())
    except (OSError, ValueError):
        return  # none, or one stopped before it wrote its settings: nothing to reuse
    if saved != _spec_dict(spec):
        raise PrepareError(f"{partial} holds an unfinished preparation with other settings: "
                           f"delete it, or finish it with the command that started it")


def _prepare_into(folder: Path, spec: PrepareSpec, workers: int, progress: bool) -> dict:
    """Shards under ``folder/shards`` (those already there are kept), then the token
    files and ``meta.json``; the shards are removed once assembled."""
    shards = folder / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "prepare.json"
    _atomic_write(spec_path, json.dumps(_spec_dict(spec), indent=2).encode())

    tokenizer = _tokenizer(spec, folder, progress)
    vocab_size = 256 if tokenizer is None else tokenizer.vocab_size
    dtype = token_dtype(vocab_size)
    jobs = _shard_jobs(spec, shards, dtype, progress)
    if workers > 1:
        ctx = get_context("spawn")  # no fork of a process that may hold threads
        with ctx.Pool(workers, _init_worker,
                      (tokenizer.to_str() if tokenizer else None,)) as pool:
            for _ in pool.imap_unordered(_encode_shard, jobs):
                pass
    else:
        _init_worker(tokenizer.to_str() if tokenizer else None)
        for job in jobs:
            _encode_shard(job)

    decoding = {"errors": spec.encoding_errors, "skipped": 0, "replaced": 0, "problems": []}
    splits = {split: _assemble(shards, split, folder / f"{split}.bin", decoding)
              for split in ("train", "val")}
    if decoding["skipped"] and not any(stats["documents"] for stats in splits.values()):
        raise PrepareError(f"no text to prepare: {decoding_summary(decoding)}")
    if decoding["skipped"] or decoding["replaced"]:
        logger.warning("%s", decoding_summary(decoding))
    for split, stats in splits.items():
        if stats["documents"] == 0:
            skipped = f", {decoding['skipped']} skipped" if decoding["skipped"] else ""
            raise PrepareError(f"no document fell in the {split} split "
                               f"({sum(s['documents'] for s in splits.values())} documents"
                               f"{skipped}, --val-fraction {spec.val_fraction}): add documents "
                               f"or change --val-fraction")
    meta = {
        "format": META_FORMAT,
        "tokenizer": {"kind": _tokenizer_kind(spec), "vocab_size": vocab_size,
                      "file": None if tokenizer is None else "tokenizer.json",
                      "end_of_document": (BYTE_END_OF_DOCUMENT if tokenizer is None
                                          else tokenizer.end_of_document)},
        "vocab_size": vocab_size,
        "dtype": dtype,
        "splits": splits,
        "decoding": decoding,
        "spec": _spec_dict(spec),
    }
    _atomic_write(folder / "meta.json", json.dumps(meta, indent=2).encode())
    shutil.rmtree(shards, ignore_errors=True)
    spec_path.unlink(missing_ok=True)
    return meta


def _validate(spec: PrepareSpec, workers: int) -> None:
    if not 0.0 < spec.val_fraction < 1.0:
        raise PrepareError(f"--val-fraction {spec.val_fraction}: must be in (0, 1)")
    if spec.shard_docs < 1:
        raise PrepareError(f"--shard-docs {spec.shard_docs}: must be >= 1")
    if spec.encoding_errors not in ENCODING_ERRORS:
        raise PrepareError(f"--encoding-errors {spec.encoding_errors!r}: expected one of "
                           f"{', '.join(ENCODING_ERRORS)}")
    if workers < 1:
        raise PrepareError(f"--workers {workers}: must be >= 1")
    if _tokenizer_kind(spec) == "file" and not Path(spec.tokenizer).is_file():
        raise PrepareError(f"--tokenizer {spec.tokenizer}: expected 'byte', 'bpe' or the "
                           f"path of a tokenizer.json file")
    if spec.tokenizer == "bpe" and spec.vocab_size < 257:
        raise PrepareError(f"--vocab-size {spec.vocab_size}: a byte-level BPE needs >= 257")


def _tokenizer_kind(spec: PrepareSpec) -> str:
    return spec.tokenizer if spec.tokenizer in ("byte", "bpe") else "file"


def _spec_dict(spec: PrepareSpec) -> dict:
    data = asdict(spec)
    data["inputs"] = list(spec.inputs)
    if _tokenizer_kind(spec) != "bpe":
        data.pop("vocab_size")
    return data


def _tokenizer(spec: PrepareSpec, out: Path, progress: bool) -> BPETokenizer | None:
    """None for bytes; else the BPE (trained on the train split) or the given file,
    saved as ``out/tokenizer.json`` (reused when a run is resumed)."""
    kind = _tokenizer_kind(spec)
    if kind == "byte":
        return None
    saved = out / "tokenizer.json"
    if saved.exists():
        return BPETokenizer.from_file(saved)
    if kind == "file":
        try:
            tokenizer = BPETokenizer.from_file(spec.tokenizer)
        except Exception as err:  # tokenizers raises a bare Exception
            raise PrepareError(f"--tokenizer {spec.tokenizer}: not a tokenizer.json that "
                               f"Hugging Face tokenizers reads ({err})") from None
        shutil.copyfile(spec.tokenizer, saved)
        return tokenizer
    docs = tqdm(iter_documents(spec.inputs, spec.text_field, spec.encoding_errors),
                desc="training BPE", unit="doc", disable=not progress)
    loaded = (load() for doc_id, load in docs
              if not is_validation(doc_id, spec.val_fraction, spec.seed))
    texts = (doc.text for doc in loaded if doc.text is not None)
    tokenizer = train_bpe(texts, spec.vocab_size)
    tmp = out / "tokenizer.json.tmp"
    tokenizer.save(tmp)
    os.replace(tmp, saved)
    return tokenizer


def _shard_jobs(spec: PrepareSpec, shards: Path, dtype: str, progress: bool
                ) -> Iterator[tuple[Path, list[str], str, dict]]:
    """Shards of ``shard_docs`` documents per split; finished shards are skipped unread."""
    buffers: dict[str, list[tuple[str, Loader]]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}

    def flush(split: str):
        docs, buffers[split] = buffers[split], []
        path = shards / f"{split}-{counts[split]:06d}.bin"
        counts[split] += 1
        if path.exists() and path.with_suffix(".json").exists():
            return None  # finished by an earlier run
        texts, decoding = [], {"skipped": 0, "replaced": 0, "problems": []}
        for doc_id, load in docs:
            doc = load()
            if doc.text is not None:
                texts.append(doc.text)
            if doc.problem is not None:
                decoding["skipped" if doc.text is None else "replaced"] += 1
                decoding["problems"].append(f"{doc_id} ({doc.problem})")
        return path, texts, dtype, decoding

    docs = tqdm(iter_documents(spec.inputs, spec.text_field, spec.encoding_errors),
                desc="encoding", unit="doc", disable=not progress)
    for doc_id, load in docs:
        split = "val" if is_validation(doc_id, spec.val_fraction, spec.seed) else "train"
        buffers[split].append((doc_id, load))
        if len(buffers[split]) == spec.shard_docs and (job := flush(split)) is not None:
            yield job
    for split in ("train", "val"):
        if buffers[split] and (job := flush(split)) is not None:
            yield job


def _assemble(shards: Path, split: str, target: Path, decoding: dict) -> dict:
    """Concatenate a split's shards in order into ``target``; their summed statistics
    (what was skipped or replaced on reading is added to ``decoding``)."""
    stats = {"file": target.name, "documents": 0, "tokens": 0, "bytes": 0, "max_id": -1}
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as dst:
        for shard in sorted(shards.glob(f"{split}-*.bin")):
            with shard.open("rb") as src:
                shutil.copyfileobj(src, dst)
            shard_stats = json.loads(shard.with_suffix(".json").read_text())
            for key in ("documents", "tokens", "bytes"):
                stats[key] += shard_stats[key]
            stats["max_id"] = max(stats["max_id"], shard_stats["max_id"])
            decoding["skipped"] += shard_stats["skipped"]
            decoding["replaced"] += shard_stats["replaced"]
            decoding["problems"] = (decoding["problems"] + shard_stats["problems"]
                                    )[:MAX_PROBLEMS_KEPT]
    os.replace(tmp, target)
    return stats


def decoding_summary(decoding: dict, shown: int = 5) -> str:
    """One line: how many documents were skipped or repaired on reading, and which."""
    def documents(n: int) -> str:
        return f"{n} document{'s' if n != 1 else ''}"

    counts = []
    if decoding["skipped"]:
        verb = "is" if decoding["skipped"] == 1 else "are"
        counts.append(f"skipped {documents(decoding['skipped'])} that {verb} not UTF-8 text")
    if decoding["replaced"]:
        counts.append(f"replaced what does not decode as UTF-8 by U+FFFD in "
                      f"{documents(decoding['replaced'])}")
    problems = decoding["problems"]
    more = decoding["skipped"] + decoding["replaced"] - min(len(problems), shown)
    names = ", ".join(problems[:shown]) + (f" and {more} more (meta.json: decoding)"
                                           if more else "")
    hint = ("; --encoding-errors replace keeps text that is not UTF-8"
            if decoding["errors"] == "strict" else "")
    return f"{' and '.join(counts)}: {names}{hint}"
