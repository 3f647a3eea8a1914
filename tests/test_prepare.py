"""freetf prepare: document split, resumption, uint32 ids, BPE round trip, training reads it."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freetf import ConfigError, load_config
from freetf.data import documents
from freetf.data import prepare as prep
from freetf.data.datasets import build_data, build_tokenizer
from freetf.data.prepare import PrepareError, PrepareSpec, prepare, token_dtype
from freetf.data.tokenization import END_OF_DOCUMENT, BPETokenizer, train_bpe

pytestmark = pytest.mark.timeout(120)

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
