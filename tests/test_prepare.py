"""freetf prepare: document split, resumption, uint32 ids, BPE round trip, training reads it."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tqdm import tqdm

from freetf import ConfigError, load_config
from freetf.data import documents
from freetf.data import prepare as prep
from freetf.data.datasets import build_data, build_tokenizer
from freetf.data.prepare import PrepareError, PrepareSpec, prepare, token_dtype
from freetf.data.tokenization import END_OF_DOCUMENT, BPETokenizer, train_bpe

pytestmark = pytest.mark.timeout(120)

# prepare's progress bars take tqdm's lock, by default one shared by forked processes (a
# multiprocessing RLock) beside a thread lock that tqdm's monitor thread takes every 10 s.
# A process forked from this one (mutmut forks one a mutant) while that thread holds it
# waits forever, and one killed holding the shared lock stops every later one: no monitor
# thread, and a lock of this process's own.
tqdm.monitor_interval = 0
tqdm.set_lock(threading.RLock())

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # é{'ü' * (i % 3)}\n" * (1 + i % 4)
         for i in range(40)]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    for i, text in enumerate(TEXTS):
        sub = folder / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i:02d}.py").write_text(text, encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG not text")  # not a text suffix: skipped
    return folder


def split_documents(folder, split, meta) -> list[str]:
    """Decode a split back into its documents (byte tokenizer: NUL-terminated)."""
    ids = np.fromfile(folder / f"{split}.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
    raw = bytes(ids.astype(np.uint8))
    assert raw.endswith(b"\x00")
    return [d.decode("utf-8") for d in raw[:-1].split(b"\x00")]


def test_split_is_by_document_and_round_trips(corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare(PrepareSpec((str(corpus),), "byte", val_fraction=0.25, shard_docs=3), out,
                   progress=False)
    train, val = split_documents(out, "train", meta), split_documents(out, "val", meta)
    assert sorted(train + val) == sorted(TEXTS)  # every document once, whole
    assert val and train and not set(train) & set(val)
    assert meta["splits"]["val"]["documents"] == len(val)
    assert meta["splits"]["train"]["bytes"] == sum(len(t.encode()) for t in train)
    assert meta["splits"]["train"]["tokens"] == meta["splits"]["train"]["bytes"] + len(train)
    assert meta["vocab_size"] == 256 and meta["dtype"] == "uint16"
    assert not (out / "shards").exists()
    # The split depends on the document's id and the seed only.
    again = prepare(PrepareSpec((str(corpus),), "byte", val_fraction=0.25, seed=1), tmp_path / "s1",
                    progress=False)
    assert sorted(split_documents(tmp_path / "s1", "val", again)) != sorted(val)


def test_a_split_shorter_than_one_block_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    meta = prepare(PrepareSpec((str(corpus),), "byte", val_fraction=0.25), out, progress=False)
    val_tokens = meta["splits"]["val"]["tokens"]
    block = val_tokens + 1
    cfg = load_config(overrides=["data.dataset_name=tokens", f"data.path={out}",
                                 f"data.max_seq_len={block}", f"model.max_seq_len={block}"])
    with pytest.raises(ValueError, match=f"the val split holds {val_tokens} tokens, less than "
                                         f"one block of data.max_seq_len={block}"):
        build_data(cfg)


def test_an_interrupted_run_resumes_and_skips_finished_shards(corpus, tmp_path, monkeypatch):
    spec = PrepareSpec((str(corpus),), "byte", val_fraction=0.2, shard_docs=4)
    prepare(spec, tmp_path / "ref", progress=False)
    real, calls = prep._encode_shard, []

    def failing(job):
        calls.append(job[0].name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(prep, "_encode_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare(spec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing that looks prepared
    done = {p.name for p in (tmp_path / "out.partial" / "shards").glob("*.bin")}
    assert len(done) == 3
    calls.clear()
    monkeypatch.setattr(prep, "_encode_shard", lambda job: (calls.append(job[0].name),
                                                            real(job))[1])
    prepare(spec, tmp_path / "out", progress=False)
    assert not done & set(calls)  # finished shards were not encoded again
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out", "ref"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin",
                                                                    "val.bin"]
    with pytest.raises(PrepareError, match="other settings"):
        prepare(PrepareSpec((str(corpus),), "byte", val_fraction=0.5), tmp_path / "out",
                progress=False)


def test_bpe_round_trip_and_training_reads_its_meta(corpus, tmp_path):
    tok = train_bpe(iter(TEXTS), vocab_size=300)
    assert 257 <= tok.vocab_size <= 300 and tok.end_of_document is not None
    text = "x = 'naïve 東京'\n\treturn x  # ünïcode"
    assert tok.decode(tok.encode(text)) == text  # byte-level: every string, exactly
    assert len(tok.encode(TEXTS[5])) < len(TEXTS[5].encode())  # merges were learned

    out = tmp_path / "bpe"
    meta = prepare(PrepareSpec((str(corpus),), "bpe", vocab_size=300, val_fraction=0.25),
                   out, progress=False)
    saved = BPETokenizer.from_file(out / "tokenizer.json")
    ids = np.fromfile(out / "val.bin", dtype="<u2")
    docs = saved.decode(ids.tolist()).split(END_OF_DOCUMENT)
    assert docs[-1] == "" and all(d in TEXTS for d in docs[:-1])
    cfg = load_config(overrides=["data.dataset_name=tokens", f"data.path={out}",
                                 "data.max_seq_len=16", f"model.vocab_size={meta['vocab_size']}"])
    data = build_data(cfg)
    val_info = meta["splits"]["val"]
    assert data.bytes_per_token == pytest.approx(val_info["bytes"] / val_info["tokens"])
    assert data.bytes_per_token > 1.5
    assert len(data.val) == val_info["tokens"] // 16
    assert data.val[0].tolist() == ids[:16].tolist()
    assert isinstance(build_tokenizer(cfg), BPETokenizer)
    small = cfg.replace(["model.vocab_size=256"])
    with pytest.raises(ConfigError, match=f"model.vocab_size={meta['vocab_size']}"):
        build_data(small)


def test_ids_past_uint16_are_stored_as_uint32(tmp_path):
    tk = pytest.importorskip("tokenizers")
    assert token_dtype(2**16) == "uint16" and token_dtype(2**16 + 1) == "uint32"
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab[END_OF_DOCUMENT] = 70_000
    tokenizer = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([END_OF_DOCUMENT])
    path = tmp_path / "wordlevel.json"
    tokenizer.save(str(path))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("w3 w69999 w65536 w7")
    (tmp_path / "c" / "b.txt").write_text("w1 w2")
    meta = prepare(PrepareSpec((str(tmp_path / "c"),), str(path), val_fraction=0.5, seed=1),
                   tmp_path / "out", progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001
    ids = np.concatenate([np.fromfile(tmp_path / "out" / f"{s}.bin", dtype="<u4")
                          for s in ("train", "val")])
    assert {69_999, 65_536, 70_000} <= set(ids.tolist())
    cfg = load_config(overrides=["data.dataset_name=tokens", f"data.path={tmp_path / 'out'}",
                                 "data.max_seq_len=2", "model.vocab_size=70001"])
    data = build_data(cfg)
    rows = [data.train[i].tolist() for i in range(len(data.train))] + \
        [data.val[i].tolist() for i in range(len(data.val))]
    assert any(69_999 in r or 65_536 in r for r in rows)


def test_jsonl_and_parquet_inputs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS[:10])]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n\n")
    pq.write_table(pa.table({"content": TEXTS[10:20]}), tmp_path / "docs.parquet")
    meta = prepare(PrepareSpec((str(tmp_path / "docs.jsonl"),), "byte", val_fraction=0.3),
                   tmp_path / "j", progress=False)
    docs = split_documents(tmp_path / "j", "train", meta) + \
        split_documents(tmp_path / "j", "val", meta)
    assert sorted(docs) == sorted(TEXTS[:10])
    with pytest.raises(PrepareError, match="--text-field"):
        prepare(PrepareSpec((str(tmp_path / "docs.parquet"),), "byte"), tmp_path / "p",
                progress=False)
    meta = prepare(PrepareSpec((str(tmp_path / "docs.parquet"),), "byte", val_fraction=0.3,
                               text_field="content"), tmp_path / "p2", progress=False)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 10


def test_files_that_are_not_utf8_text_are_skipped_counted_and_named(corpus, tmp_path, caplog):
    (corpus / "blob.py").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" * 50)
    (corpus / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))
    with caplog.at_level("WARNING", logger="freetf.data.prepare"):
        meta = prepare(PrepareSpec((str(corpus),), "byte", val_fraction=0.25), tmp_path / "s",
                       progress=False)
    docs = split_documents(tmp_path / "s", "train", meta) + \
        split_documents(tmp_path / "s", "val", meta)
    assert sorted(docs) == sorted(TEXTS)  # no U+FFFD, no NUL turned into extra documents
    assert meta["decoding"] == {
        "errors": "strict", "skipped": 2, "replaced": 0,
        "problems": [f"{name} ({why})" for name, why in sorted(
            [("blob.py", "binary: a NUL byte at offset 7"),
             ("latin1.txt", "not UTF-8: byte 0xe9 at offset 3")],
            key=lambda doc: prep.is_validation(doc[0], 0.25, 0))]}
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("skipped 2 documents that are not UTF-8 text: ")
    assert "blob.py (binary" in warning and "latin1.txt (not UTF-8" in warning
    assert warning.endswith("--encoding-errors replace keeps text that is not UTF-8")

    meta = prepare(PrepareSpec((str(corpus),), "byte", val_fraction=0.25,
                               encoding_errors="replace"), tmp_path / "r", progress=False)
    docs = split_documents(tmp_path / "r", "train", meta) + \
        split_documents(tmp_path / "r", "val", meta)
    assert sorted(docs) == sorted(TEXTS + ["caf\ufffd cr\ufffdme\n"])  # binary still skipped
    assert (meta["decoding"]["skipped"], meta["decoding"]["replaced"]) == (1, 1)


def test_nothing_left_after_skipping_is_an_error(tmp_path):
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01" * 10)
    with pytest.raises(PrepareError, match=r"no text to prepare: skipped 1 document that is "
                                           r"not UTF-8 text: .*/blob.txt \(binary: a NUL byte "
                                           r"at offset 0\)"):
        prepare(PrepareSpec((str(tmp_path / "blob.txt"),), "byte"), tmp_path / "o",
                progress=False)


def test_stdlib_is_a_real_code_corpus():
    files = documents.stdlib_files()
    assert len(files) > 200
    assert sum(f.stat().st_size for f in files) > 3_000_000  # several MB of real code
    assert not any("test" in f.parts[-2:-1] for f in files)


def _jsonl(tmp_path, second: bytes) -> list[str]:
    (tmp_path / "docs.jsonl").write_bytes(b'{"text": "fine"}\n' + second + b"\n")
    return [str(tmp_path / "docs.jsonl")]


def _out_under_a_file(tmp_path) -> list[str]:
    (tmp_path / "afile").write_text("a file, not a folder")
    return _texts(tmp_path) + ["--out", str(tmp_path / "afile" / "sub")]


def _out_is_a_file(tmp_path) -> list[str]:
    (tmp_path / "afile").write_text("a file, not a folder")
    return _texts(tmp_path) + ["--out", str(tmp_path / "afile")]


def _only_a_binary_file(tmp_path) -> list[str]:
    (tmp_path / "b.py").write_bytes(b"\x00\x01")
    return [str(tmp_path / "b.py")]


def _unreadable(tmp_path, monkeypatch) -> list[str]:
    """A file the OS refuses to read (planted: permissions do not bind root)."""
    real = type(tmp_path).read_bytes

    def read_bytes(path):
        if path.name == "m0.py":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(type(tmp_path), "read_bytes", read_bytes)
    return _texts(tmp_path)


def _other_unfinished(tmp_path) -> list[str]:
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "prepare.json").write_text('{"seed": 99}')
    return _texts(tmp_path)


def _texts(tmp_path) -> list[str]:
    (tmp_path / "c").mkdir(exist_ok=True)
    for i in range(4):
        (tmp_path / "c" / f"m{i}.py").write_text(f"x = {i}\n")
    return [str(tmp_path / "c")]


def _out_holds(tmp_path, name: str, text: str) -> list[str]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / name).write_text(text)
    return _texts(tmp_path)


PREPARE_FAILURES = {  # argv built in tmp_path -> what the one line says
    "out under a file": (_out_under_a_file, r"afile is a file, not a folder, so \S*sub "
                                            r"cannot be created"),
    "out is a file": (_out_is_a_file, r"afile is a file, not a folder$"),
    "jsonl null": (lambda t: _jsonl(t, b'{"text": null}'),
                   r"docs.jsonl:2: the text field is null, not a string"),
    "jsonl number": (lambda t: _jsonl(t, b'{"text": 12345}'),
                     r"docs.jsonl:2: the text field is a number \(12345\), not a string"),
    "jsonl object": (lambda t: _jsonl(t, b'{"text": {"nested": 1}}'),
                     r"docs.jsonl:2: the text field is an object, not a string"),
    "jsonl not utf-8": (lambda t: _jsonl(t, b'{"text": "caf\xe9"}'),
                        r"docs.jsonl:2: not UTF-8: byte 0xe9 at column 14"),
    "jsonl not json": (lambda t: _jsonl(t, b'{"text": '), r"docs.jsonl:2: not valid JSON"),
    "only a binary file": (_only_a_binary_file,
                           r"no text to prepare: skipped 1 document .*b.py \(binary"),
    "missing input": (lambda t: [str(t / "missing")], r"missing: no such file"),
    "unreadable input": (_unreadable, r"m0.py: cannot read it \(Permission denied\)"),
    "broken tokenizer": (lambda t: _texts(t) + ["--tokenizer", str(t / "c" / "m0.py")],
                         r"--tokenizer \S*m0.py: not a tokenizer.json"),
    "no validation document": (lambda t: _texts(t) + ["--val-fraction", "1e-9"],
                               r"no document fell in the val split"),
    "out holds other files": (lambda t: _out_holds(t, "notes.txt", "mine"),
                              r"out is a folder that holds no prepared data \(no meta.json\)"),
    "out holds a broken meta.json": (lambda t: _out_holds(t, "meta.json", '{"format": '),
                                     r"out: its meta.json cannot be read"),
    "an unfinished run with other settings": (
        _other_unfinished, r"out.partial holds an unfinished preparation with other settings"),
    "out in folders that do not exist yet": (  # made for the run, removed with it
        lambda t: [str(t / "missing"), "--out", str(t / "new" / "deeper" / "out")],
        r"missing: no such file"),
}


@pytest.mark.parametrize("case", list(PREPARE_FAILURES))
def test_prepare_failures_are_one_line_and_leave_no_output(case, tmp_path, monkeypatch, capsys):
    from freetf.cli import main

    build, needle = PREPARE_FAILURES[case]
    args = build(tmp_path, monkeypatch) if build is _unreadable else build(tmp_path)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["prepare", *args, "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("freetf prepare: error: ")
    assert re.search(needle, err), err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing left behind


def test_the_output_takes_the_place_of_an_empty_folder_or_new_ones(corpus, tmp_path):
    spec = PrepareSpec((str(corpus),), "byte", val_fraction=0.25)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper" / "out"):
        prepare(spec, out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
        assert not out.with_name(out.name + ".partial").exists()
    assert prepare(spec, tmp_path / "empty", progress=False)["spec"]["seed"] == 0  # done: kept


def test_argparse_errors(tmp_path):
    from freetf.cli import main

    for flag, value in (("--vocab-size", "0"), ("--encoding-errors", "ignore")):
        with pytest.raises(SystemExit) as exc:
            main(["prepare", "x", "--out", str(tmp_path / "o"), flag, value])
        assert exc.value.code == 2


def test_a_system_error_keeps_the_finished_shards_and_says_where(corpus, tmp_path,
                                                                 monkeypatch, capsys):
    from freetf.cli import main

    real, calls = prep._encode_shard, []

    def disk_full(job):
        calls.append(job)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(job[0]))
        return real(job)

    monkeypatch.setattr(prep, "_encode_shard", disk_full)
    out = tmp_path / "out"
    argv = ["prepare", str(corpus), "--out", str(out), "--shard-docs", "4", "--val-fraction",
            "0.25", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"No space left on device; the finished shards are kept in {out}.partial" in err
    assert not out.exists() and len(list((tmp_path / "out.partial/shards").glob("*.bin"))) == 2
    monkeypatch.setattr(prep, "_encode_shard", real)
    assert main(argv) == 0  # the same command resumes and finishes
    assert (out / "meta.json").is_file() and not (tmp_path / "out.partial").exists()


def test_bits_per_byte():
    from freetf.training.evaluate import bits_per_byte

    out = bits_per_byte({"eval/ce_prior_nats": 2 * math.log(2),
                         "eval/ce_posterior_nats": math.log(2)}, bytes_per_token=4.0)
    assert out == {"eval/bpb_prior": pytest.approx(0.5), "eval/bpb_posterior": pytest.approx(0.25)}
    assert bits_per_byte({"eval/ce_prior_nats": math.log(2)}, 1.0) == {"eval/bpb_prior": 1.0}


def test_code_config_trains_on_prepared_data(corpus, tmp_path):
    """freetf/configs/code.yaml on a prepared folder: training runs and reports bits per byte."""
    from freetf.training.loop import train_loop

    out = tmp_path / "bpe"
    prepare(PrepareSpec((str(corpus),), "bpe", vocab_size=300, val_fraction=0.3), out,
            progress=False)
    cfg = load_config("freetf/configs/code.yaml", [  # model.vocab_size follows meta.json
        f"data.path={out}", "data.max_seq_len=32", "model.max_seq_len=32",
        "model.hidden_dim=32", "model.num_layers=2", "model.num_heads=2",
        "training.batch_size=2", "training.max_steps=3", "training.eval_batches=1",
        "tracking.mlflow.enabled=false", "scaling.use_ray=false",
        f"checkpoint.dir={tmp_path / 'ckpt'}"])
    metrics = train_loop(cfg).metrics
    ratio = metrics["eval/bpb_prior"] / metrics["eval/ce_prior_nats"]
    assert ratio == pytest.approx(1 / math.log(2) / build_data(cfg).bytes_per_token)
    assert cfg.model.vocab_size == BPETokenizer.from_file(out / "tokenizer.json").vocab_size


DOC_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                   max_size=12)


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(DOC_TEXT, max_size=30), shard_docs=st.integers(1, 6),
       val_fraction=st.floats(0.05, 0.95), seed=st.integers(0, 3))
def test_shards_hold_every_document_once_in_input_order(texts, shard_docs, val_fraction, seed):
    """Each split's shards are runs of ``shard_docs`` documents (the last one shorter) that
    together hold that split's documents in input order; assembled, the split's file holds
    them in the same order."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts),
                                     encoding="utf-8")
        spec = PrepareSpec((str(tmp / "d.jsonl"),), "byte", val_fraction=val_fraction,
                           seed=seed, shard_docs=shard_docs)
        expected = {"train": [], "val": []}
        for i, text in enumerate(texts):
            val = prep.is_validation(f"d.jsonl#{i}", val_fraction, seed)
            expected["val" if val else "train"].append(text)
        (tmp / "shards").mkdir()
        jobs = list(prep._shard_jobs(spec, tmp / "shards", "uint16", progress=False))
        for split in ("train", "val"):
            mine = [job for job in jobs if job[0].name.startswith(split)]
            assert [job[0].name for job in mine] == [f"{split}-{k:06d}.bin"
                                                     for k in range(len(mine))]
            sizes = [len(job[1]) for job in mine]
            assert all(size == shard_docs for size in sizes[:-1])
            assert 0 < (sizes or [1])[-1] <= shard_docs
            assert [t for job in mine for t in job[1]] == expected[split]
        if expected["train"] and expected["val"]:
            meta = prepare(spec, tmp / "out", progress=False)
            for split in ("train", "val"):
                assert split_documents(tmp / "out", split, meta) == expected[split]
                assert meta["splits"][split]["documents"] == len(expected[split])


RELATIVE_PATH = st.lists(st.sampled_from(["a", "b", "src", "pkg"]), min_size=0, max_size=2
                         ).flatmap(lambda parts: st.sampled_from(["x.py", "y.txt", "z.md"]).map(
                             lambda name: "/".join([*parts, name])))


@settings(max_examples=25, deadline=None)
@given(files=st.lists(RELATIVE_PATH, min_size=1, max_size=12, unique=True),
       seed=st.integers(0, 3),
       moved=st.sampled_from(["elsewhere/corpus", "renamed", "a/b/c/d"]))
def test_the_split_does_not_change_when_the_corpus_moves_or_is_renamed(files, seed, moved):
    """A file's id is its path under the input folder: moved or renamed, the corpus
    prepares into the same token files (or fails the same way)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "corpus"
        for k, name in enumerate(files):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(f"document {k}: {name}\n", encoding="utf-8")

        def outcome(folder, out):
            spec = PrepareSpec((str(folder),), "byte", val_fraction=0.5, seed=seed,
                               shard_docs=2)
            try:
                meta = prepare(spec, out, progress=False)
            except PrepareError as err:
                return str(err)
            return [(out / f"{split}.bin").read_bytes() for split in ("train", "val")], \
                meta["splits"]

        before = outcome(root, tmp / "out1")
        (tmp / moved).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(root, tmp / moved)
        assert outcome(tmp / moved, tmp / "out2") == before


def test_each_bad_setting_is_refused_by_name_and_the_edges_are_taken(tmp_path):
    def refusal(workers=1, **fields) -> str:
        with pytest.raises(PrepareError) as err:
            prep._validate(PrepareSpec(("x",), **{"tokenizer": "byte", **fields}), workers)
        return str(err.value)

    assert refusal(val_fraction=0.0) == "--val-fraction 0.0: must be in (0, 1)"
    assert refusal(val_fraction=1.0) == "--val-fraction 1.0: must be in (0, 1)"
    assert refusal(shard_docs=0) == "--shard-docs 0: must be >= 1"
    assert refusal(encoding_errors="ignore") == ("--encoding-errors 'ignore': expected one of "
                                                 "strict, replace")
    assert refusal(workers=0) == "--workers 0: must be >= 1"
    missing = tmp_path / "tok.json"
    assert refusal(tokenizer=str(missing)) == (f"--tokenizer {missing}: expected 'byte', 'bpe' "
                                               f"or the path of a tokenizer.json file")
    assert refusal(tokenizer="bpe", vocab_size=256) == ("--vocab-size 256: a byte-level BPE "
                                                        "needs >= 257")
    prep._validate(PrepareSpec(("x",), "byte", val_fraction=0.999, shard_docs=1,
                               vocab_size=2), workers=1)
    prep._validate(PrepareSpec(("x",), "bpe", vocab_size=257), workers=1)


def test_a_document_whose_hash_equals_the_fraction_is_in_train():
    digest = hashlib.blake2b(b"3:doc", digest_size=8).digest()
    fraction = int.from_bytes(digest, "little") / 2**64
    assert not prep.is_validation("doc", fraction, 3)
    assert prep.is_validation("doc", math.nextafter(fraction, 1.0), 3)


def test_a_shard_is_finished_only_with_its_statistics_and_counts_each_skip(tmp_path):
    lines = [{"text": "a"}, {"text": "b\u0000"}, {"text": "c\u0000"}, {"text": "d"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    spec = PrepareSpec((str(tmp_path / "d.jsonl"),), "byte", val_fraction=1e-9, shard_docs=8)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-000000.bin").write_bytes(b"")  # written, but not its .json: unfinished
    [(path, texts, dtype, decoding)] = prep._shard_jobs(spec, shards, "uint16", False)
    assert (path.name, texts, dtype) == ("train-000000.bin", ["a", "d"], "uint16")
    assert decoding == {"skipped": 2, "replaced": 0,
                        "problems": ["d.jsonl#1 (binary: a NUL character at offset 1)",
                                     "d.jsonl#2 (binary: a NUL character at offset 1)"]}
    (shards / "train-000000.json").write_text("{}")
    assert list(prep._shard_jobs(spec, shards, "uint16", False)) == []


@pytest.mark.timeout(10)
def test_the_decoding_summary_counts_names_and_hints_in_one_line():
    def summary(skipped, replaced, problems, errors="strict", **kw) -> str:
        return prep.decoding_summary({"errors": errors, "skipped": skipped,
                                      "replaced": replaced, "problems": problems}, **kw)

    hint = "; --encoding-errors replace keeps text that is not UTF-8"
    assert summary(1, 0, ["a.py (binary)"]) == \
        f"skipped 1 document that is not UTF-8 text: a.py (binary){hint}"
    assert summary(2, 0, ["a", "b"]) == f"skipped 2 documents that are not UTF-8 text: a, b{hint}"
    assert summary(0, 1, ["c"], "replace") == \
        "replaced what does not decode as UTF-8 by U+FFFD in 1 document: c"
    assert summary(0, 2, ["c", "d"], "replace") == \
        "replaced what does not decode as UTF-8 by U+FFFD in 2 documents: c, d"
    names = [f"d{i}" for i in range(7)]
    assert summary(3, 4, names, "replace") == (
        "skipped 3 documents that are not UTF-8 text and replaced what does not decode as "
        "UTF-8 by U+FFFD in 4 documents: d0, d1, d2, d3, d4 and 2 more (meta.json: decoding)")
    assert summary(1, 4, names[:5], "replace") == (
        "skipped 1 document that is not UTF-8 text and replaced what does not decode as "
        "UTF-8 by U+FFFD in 4 documents: d0, d1, d2, d3, d4")
    # meta.json keeps the first MAX_PROBLEMS_KEPT names; the count says how many in all
    assert summary(150, 0, names, shown=2) == (
        f"skipped 150 documents that are not UTF-8 text: d0, d1 and 148 more "
        f"(meta.json: decoding){hint}")


@pytest.mark.timeout(10)
def test_the_settings_recorded_are_the_specs_fields_with_the_vocabulary_only_for_bpe(tmp_path):
    fields = {"inputs": ["a", "b"], "val_fraction": 0.1, "seed": 3, "text_field": "t",
              "shard_docs": 7, "encoding_errors": "replace"}
    for tokenizer in ("byte", str(tmp_path / "tok.json")):
        spec = PrepareSpec(("a", "b"), tokenizer, vocab_size=500, val_fraction=0.1, seed=3,
                           text_field="t", shard_docs=7, encoding_errors="replace")
        assert prep._spec_dict(spec) == {**fields, "tokenizer": tokenizer}
    spec = PrepareSpec(("a", "b"), "bpe", vocab_size=500, val_fraction=0.1, seed=3,
                       text_field="t", shard_docs=7, encoding_errors="replace")
    assert prep._spec_dict(spec) == {**fields, "tokenizer": "bpe", "vocab_size": 500}


@pytest.mark.timeout(30)
def test_a_shard_holds_its_documents_ids_each_ended_and_its_statistics(tmp_path):
    def shard(name, texts, dtype, decoding):
        path = prep._encode_shard((tmp_path / name, texts, dtype, decoding))
        return path.read_bytes(), json.loads(path.with_suffix(".json").read_text())

    clean = {"skipped": 0, "replaced": 0, "problems": []}
    try:
        prep._init_worker(None)
        data, stats = shard("train-000000.bin", ["ab", "é", ""], "uint16",
                            {"skipped": 1, "replaced": 0, "problems": ["x (binary)"]})
        assert np.frombuffer(data, "<u2").tolist() == [97, 98, 0, 0xC3, 0xA9, 0, 0]
        assert stats == {"documents": 3, "tokens": 7, "bytes": 4, "max_id": 0xC3,
                         "skipped": 1, "replaced": 0, "problems": ["x (binary)"]}
        # every document of the shard skipped on reading: no tokens, no largest id
        data, stats = shard("val-000003.bin", [], "uint16",
                            {"skipped": 2, "replaced": 0, "problems": ["a", "b"]})
        assert data == b"" and stats == {"documents": 0, "tokens": 0, "bytes": 0,
                                         "max_id": -1, "skipped": 2, "replaced": 0,
                                         "problems": ["a", "b"]}
        tok = train_bpe(iter(TEXTS), vocab_size=300)
        prep._init_worker(tok.to_str())
        data, stats = shard("train-000001.bin", ["x = 1", ""], "uint32", clean)
        eod = tok.end_of_document
        expected = [*tok.encode("x = 1"), eod, eod]
        assert np.frombuffer(data, "<u4").tolist() == expected
        assert stats == {"documents": 2, "tokens": len(expected), "bytes": 5,
                         "max_id": max(expected), **clean}
    finally:
        prep._init_worker(None)


@pytest.mark.timeout(120)
def test_a_split_of_empty_documents_has_largest_id_zero_and_repairs_add_up(tmp_path):
    """Shards of one document: an empty document is its separator alone (id 0), a
    shard whose document was skipped holds nothing, and the documents repaired on reading
    are counted over every shard."""
    lines = [b'{"text": ""}', b'{"text": "\\u0000"}', b'{"text": ""}',
             b'{"text": "caf\xe9"}', b'{"text": "na\xefve"}', b'{"text": "ok"}',
             b'{"text": "\xff"}']
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    in_val = [False, False, False, True, True, True, True]
    seed = next(s for s in range(5000)
                if [prep.is_validation(f"d.jsonl#{i}", 0.5, s) for i in range(7)] == in_val)
    spec = PrepareSpec((str(tmp_path / "d.jsonl"),), "byte", val_fraction=0.5, seed=seed,
                       shard_docs=1, encoding_errors="replace")
    meta = prepare(spec, tmp_path / "out", progress=False)
    assert split_documents(tmp_path / "out", "train", meta) == ["", ""]
    val = ["caf\ufffd", "na\ufffdve", "ok", "\ufffd"]
    assert split_documents(tmp_path / "out", "val", meta) == val
    val_bytes = sum(len(t.encode()) for t in val)
    assert meta["splits"] == {
        "train": {"file": "train.bin", "documents": 2, "tokens": 2, "bytes": 0, "max_id": 0},
        "val": {"file": "val.bin", "documents": 4, "tokens": 4 + val_bytes,
                "bytes": val_bytes,
                "max_id": 0xEF}}
    assert (meta["decoding"]["skipped"], meta["decoding"]["replaced"]) == (1, 3)
    assert [p.split(" ")[0] for p in meta["decoding"]["problems"]] == [
        "d.jsonl#1", "d.jsonl#3", "d.jsonl#4", "d.jsonl#6"]


@pytest.mark.timeout(120)
def test_an_interrupted_run_records_its_settings_and_resumes_with_its_tokenizer(
        corpus, tmp_path, monkeypatch):
    spec = PrepareSpec((str(corpus),), "bpe", vocab_size=300, val_fraction=0.25, shard_docs=8)
    real = prep._encode_shard

    def interrupted(job):
        real(job)
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_encode_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(spec, tmp_path / "out", progress=False)
    partial = tmp_path / "out.partial"
    assert json.loads((partial / "prepare.json").read_text()) == prep._spec_dict(spec)
    saved = (partial / "tokenizer.json").read_bytes()
    monkeypatch.setattr(prep, "_encode_shard", real)
    with pytest.raises(PrepareError, match=f"{partial} holds an unfinished preparation with "
                                           f"other settings"):
        prepare(PrepareSpec((str(corpus),), "bpe", vocab_size=300, val_fraction=0.25,
                            shard_docs=8, seed=1), tmp_path / "out", progress=False)

    def retrained(*args):
        raise AssertionError("the saved tokenizer was not reused")

    monkeypatch.setattr(prep, "train_bpe", retrained)
    prepare(spec, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


@pytest.mark.timeout(120)
def test_progress_bars_count_the_documents_read_and_only_when_asked(corpus, tmp_path, capsys):
    spec = PrepareSpec((str(corpus),), "bpe", vocab_size=300, val_fraction=0.25)
    prepare(spec, tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""
    prepare(spec, tmp_path / "shown")  # shown by default
    err = capsys.readouterr().err
    assert re.search(rf"training BPE: {len(TEXTS)}doc \[[^\]]*doc/s\]", err), err
    assert re.search(rf"encoding: {len(TEXTS)}doc \[[^\]]*doc/s\]", err), err


class _InlinePool:
    """multiprocessing's Pool, in this process: the initializer runs once, the shards are
    encoded last first (a pool returns them in any order)."""

    made: list = []

    def __init__(self, processes, initializer, initargs):
        self.made.append((processes, initializer, initargs))
        initializer(*initargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, jobs):
        return map(fn, reversed(list(jobs)))


@pytest.mark.timeout(120)
def test_workers_encode_in_a_spawned_pool_and_the_order_they_finish_does_not_matter(
        corpus, tmp_path, monkeypatch):
    spec = PrepareSpec((str(corpus),), "bpe", vocab_size=300, val_fraction=0.25, shard_docs=3)
    methods = []
    monkeypatch.setattr(prep, "get_context", lambda method: (
        methods.append(method), type("Context", (), {"Pool": _InlinePool}))[1])
    monkeypatch.setattr(_InlinePool, "made", [])
    one = prepare(spec, tmp_path / "one", progress=False)  # in this process
    assert methods == []
    for workers, out in ((2, "two"), (3, "three")):
        assert prepare(spec, tmp_path / out, workers=workers, progress=False) == one
        for name in ("train.bin", "val.bin", "tokenizer.json"):
            assert (tmp_path / out / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    byte = PrepareSpec((str(corpus),), "byte", val_fraction=0.25, shard_docs=3)
    assert prepare(byte, tmp_path / "byte2", workers=2, progress=False) == \
        prepare(byte, tmp_path / "byte1", progress=False)
    assert methods == ["spawn"] * 3
    assert [(n, init) for n, init, _ in _InlinePool.made] == [(2, prep._init_worker),
                                                              (3, prep._init_worker),
                                                              (2, prep._init_worker)]
    saved = BPETokenizer.from_file(tmp_path / "one" / "tokenizer.json")
    for _, _, (tokenizer_json,) in _InlinePool.made[:2]:
        assert BPETokenizer.from_str(tokenizer_json).encode(TEXTS[7]) == saved.encode(TEXTS[7])
    assert _InlinePool.made[2][2] == (None,)  # bytes: no tokenizer to load
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "byte2" / name).read_bytes() == (tmp_path / "byte1" / name).read_bytes()


@pytest.mark.timeout(120)
def test_the_error_for_an_empty_split_counts_the_documents_and_the_skipped_ones(tmp_path):
    def refusal(lines: list[bytes], name: str) -> str:
        (tmp_path / name).write_bytes(b"\n".join(lines) + b"\n")
        with pytest.raises(PrepareError) as err:
            prepare(PrepareSpec((str(tmp_path / name),), "byte", val_fraction=1e-9),
                    tmp_path / "out", progress=False)
        return str(err.value)

    fine = [b'{"text": "a"}', b'{"text": "b"}', b'{"text": "c"}']
    assert refusal(fine, "clean.jsonl") == (
        "no document fell in the val split (3 documents, --val-fraction 1e-09): add "
        "documents or change --val-fraction")
    assert refusal([*fine, b'{"text": "\\u0000"}', b'{"text": "\\u0000"}'],
                   "skips.jsonl") == (
        "no document fell in the val split (3 documents, 2 skipped, --val-fraction 1e-09): "
        "add documents or change --val-fraction")


@pytest.mark.timeout(120)
def test_meta_json_names_the_tokenizer_its_file_and_its_end_of_document_id(corpus, tmp_path):
    tk = pytest.importorskip("tokenizers")
    vocab = {"a": 0, "b": 1, "c": 2, "unk": 3, END_OF_DOCUMENT: 4}
    tokenizer = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="unk"))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([END_OF_DOCUMENT])
    path = tmp_path / "wordlevel.json"
    tokenizer.save(str(path))
    spec = PrepareSpec((str(corpus),), str(path), val_fraction=0.25)
    meta = prepare(spec, tmp_path / "f", progress=False)
    assert meta["tokenizer"] == {"kind": "file", "vocab_size": 5, "file": "tokenizer.json",
                                 "end_of_document": 4}
    assert (tmp_path / "f" / "tokenizer.json").read_bytes() == path.read_bytes()
    assert json.loads((tmp_path / "f" / "meta.json").read_text()) == meta
    meta = prepare(PrepareSpec((str(corpus),), "byte", val_fraction=0.25), tmp_path / "b",
                   progress=False)
    assert meta["tokenizer"] == {"kind": "byte", "vocab_size": 256, "file": None,
                                 "end_of_document": 0}
    assert json.loads((tmp_path / "b" / "meta.json").read_text()) == meta


@pytest.fixture
def rmtree_cannot_unlink(monkeypatch):
    """Files removed relative to a folder's descriptor (as shutil.rmtree does) are refused."""
    import os

    real = os.unlink

    def unlink(path, *, dir_fd=None):
        if dir_fd is not None:
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "unlink", unlink)


@pytest.mark.timeout(120)
def test_shards_that_cannot_be_removed_do_not_fail_a_finished_run(corpus, tmp_path,
                                                                   rmtree_cannot_unlink):
    meta = prepare(PrepareSpec((str(corpus),), "byte", val_fraction=0.25), tmp_path / "out",
                   progress=False)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    assert (tmp_path / "out" / "meta.json").is_file()
    assert list((tmp_path / "out" / "shards").glob("*.bin"))  # left behind, not an error


@pytest.mark.timeout(120)
def test_bpe_learns_from_the_train_split_read_with_the_field_and_decoding_asked(tmp_path):
    """60 bytes that are not UTF-8, read with --encoding-errors replace: U+FFFD sixty
    times, which a BPE of a few merges learns as one token (a JSON line that is not UTF-8
    is an error under strict); a document in the validation split is not learned from."""
    (tmp_path / "d.jsonl").write_bytes(b'{"content": "' + b"\xff" * 60 + b'"}\n'
                                       b'{"content": "plain text"}\n')
    spec = PrepareSpec((str(tmp_path / "d.jsonl"),), "bpe", vocab_size=262, val_fraction=1e-9,
                       text_field="content", encoding_errors="replace")
    tok = prep._tokenizer(spec, tmp_path, progress=False)
    assert tok.decode(tok.encode("\ufffd")) == "\ufffd" and len(tok.encode("\ufffd")) == 1
    assert BPETokenizer.from_file(tmp_path / "tokenizer.json").encode("\ufffd x") == \
        tok.encode("\ufffd x")
    (tmp_path / "strict").mkdir()
    with pytest.raises(PrepareError, match=r"d.jsonl:1: not UTF-8: byte 0xff"):
        prep._tokenizer(PrepareSpec((str(tmp_path / "d.jsonl"),), "bpe", vocab_size=262,
                                    val_fraction=1e-9, text_field="content"),
                        tmp_path / "strict", progress=False)
    # the same line in the validation split, beside a train line of its own: not learned
    (tmp_path / "e.jsonl").write_bytes(b'{"content": "' + b"\xff" * 60 + b'"}\n'
                                       b'{"content": "' + b"xyz " * 30 + b'"}\n')

    def in_val(seed):
        return [prep.is_validation(f"e.jsonl#{i}", 0.5, seed) for i in (0, 1)]

    seed = next(s for s in range(100) if in_val(s) == [True, False] != in_val(None))
    spec = PrepareSpec((str(tmp_path / "e.jsonl"),), "bpe", vocab_size=262, val_fraction=0.5,
                       seed=seed, text_field="content", encoding_errors="replace")
    (tmp_path / "split").mkdir()
    tok = prep._tokenizer(spec, tmp_path / "split", False)
    assert len(tok.encode("\ufffd")) == 3 and len(tok.encode("xyz")) < 3


@pytest.mark.timeout(30)
def test_a_tokenizer_file_that_does_not_load_is_named_with_the_reason(tmp_path):
    (tmp_path / "tok.json").write_text('{"not": "a tokenizer"}')
    spec = PrepareSpec(("x",), str(tmp_path / "tok.json"))
    with pytest.raises(PrepareError) as err:
        prep._tokenizer(spec, tmp_path, progress=False)
    assert re.fullmatch(rf"--tokenizer {re.escape(str(tmp_path / 'tok.json'))}: not a "
                        rf"tokenizer.json that Hugging Face tokenizers reads \(.+\)",
                        str(err.value)), str(err.value)
    assert not (tmp_path / "tokenizer.json").exists()


@pytest.mark.timeout(60)
def test_a_refused_input_is_reported_even_when_its_folder_cannot_be_removed(tmp_path,
                                                                            rmtree_cannot_unlink):
    """The input's error (no document in the val split) is what the user reads, not the
    failure to remove the unfinished folder after it."""
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(PrepareError, match=r"^no document fell in the val split \(2 documents"):
        prepare(PrepareSpec((str(tmp_path / "d.jsonl"),), "byte", val_fraction=1e-9),
                tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(30)
def test_a_system_error_names_its_file_and_whether_shards_are_kept(tmp_path, monkeypatch):
    """An OSError from the work is one line: its file when it has one, its reason (or the
    error itself without one), and the kept shards only when there are some."""
    def message(err: OSError, shards: bool, out: str) -> str:
        def fail(folder, spec, workers, progress):
            if shards:
                (folder / "shards").mkdir(parents=True)
            raise err

        monkeypatch.setattr(prep, "_prepare_into", fail)
        with pytest.raises(PrepareError) as exc:
            prepare(PrepareSpec(("x",), "byte"), tmp_path / out, progress=False)
        assert exc.value.__cause__ is err
        return str(exc.value)

    assert message(OSError(28, "No space left on device"), False, "a") == \
        "No space left on device"
    assert message(OSError("no reason given"), False, "b") == "no reason given"
    partial = tmp_path / "c.partial"
    assert message(OSError(28, "No space left on device", "/d/train-000003.bin"), True,
                   "c") == (f"/d/train-000003.bin: No space left on device; the finished "
                            f"shards are kept in {partial}: the same command resumes from them")
