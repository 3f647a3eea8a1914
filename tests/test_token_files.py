"""A damaged prepared folder is one line naming the file, before any MLflow run or Ray
worker starts: meta.json's schema, each file against its token count, ids against the
vocabulary."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from freetf import ConfigError, load_config, tracking
from freetf.cli import main
from freetf.data.datasets import build_data, check_data
from freetf.data.prepare import PrepareSpec, prepare
from freetf.data.token_files import check_token_ids, max_token_id, read_meta
from freetf.training import ray_train

pytestmark = pytest.mark.timeout(120)

BLOCK = 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A byte-level folder: 30 small modules, a quarter of them held out, in shards of 4
    whose largest ids differ (the first modules hold "~", "}", "|", "{")."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "c").mkdir()
    for i in range(30):
        (root / "c" / f"m{i:02d}.py").write_text(f"# {chr(max(126 - i, 97))}\n"
                                                 + f"def f{i}(x):\n    return x + {i}\n" * 4)
    prepare(PrepareSpec((str(root / "c"),), "byte", val_fraction=0.25, shard_docs=4),
            root / "data", progress=False)
    return root / "data"


@pytest.fixture
def folder(prepared, tmp_path):
    return shutil.copytree(prepared, tmp_path / "data")


def edit_meta(folder, change) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def set_token(folder, split, index, value) -> None:
    ids = np.fromfile(folder / f"{split}.bin", dtype="<u2")
    ids[index] = value
    ids.tofile(folder / f"{split}.bin")


def cut(folder, name, keep_bytes) -> None:
    (folder / name).write_bytes((folder / name).read_bytes()[:keep_bytes])


DAMAGE = {  # name -> (how, what the one line says)
    "no meta.json": (lambda f: (f / "meta.json").unlink(), r"has no meta.json: prepare it"),
    "truncated meta.json": (lambda f: cut(f, "meta.json", 40),
                            r"meta.json cannot be read \(Unterminated string|Expecting"),
    "garbage meta.json": (lambda f: (f / "meta.json").write_bytes(b"\x89\x00garbage\xff"),
                          r"meta.json cannot be read"),
    "a list, not an object": (lambda f: (f / "meta.json").write_text("[1, 2]"),
                              r"meta.json holds a list, not an object"),
    "other format": (lambda f: edit_meta(f, lambda m: m.update(format="other/2")),
                     r"meta.json's format is 'other/2', expected 'freetf-tokens/1'"),
    "no vocab_size": (lambda f: edit_meta(f, lambda m: m.pop("vocab_size")),
                      r"meta.json's vocab_size is missing, expected an integer"),
    "vocab_size not an integer": (lambda f: edit_meta(f, lambda m: m.update(vocab_size=100.5)),
                                  r"meta.json's vocab_size is 100.5 \(a number\), expected an "
                                  r"integer"),
    "unknown dtype": (lambda f: edit_meta(f, lambda m: m.update(dtype="float16")),
                      r"meta.json's dtype 'float16' is not one of uint16, uint32"),
    "wrong dtype": (lambda f: edit_meta(f, lambda m: m.update(dtype="uint32")),
                    r"train.bin holds \d+ bytes, but meta.json records \d+ uint32 tokens"),
    "missing split": (lambda f: edit_meta(f, lambda m: m["splits"].pop("val")),
                      r"meta.json has no val split \(splits.val\)"),
    "tokens not a number": (lambda f: edit_meta(f, lambda m: m["splits"]["train"].update(
        tokens="lots")), r"splits.train.tokens is 'lots' \(a string\), expected an integer"),
    "token count edited": (lambda f: edit_meta(f, lambda m: m["splits"]["train"].update(
        tokens=1024)), r"train.bin holds \d+ bytes, but meta.json records 1024 uint16 tokens "
                       r"\(2048 bytes\)"),
    "a file outside the folder": (lambda f: edit_meta(f, lambda m: m["splits"]["val"].update(
        file="../val.bin")), r"splits.val.file is '../val.bin', expected the name of a file"),
    "missing .bin": (lambda f: (f / "train.bin").unlink(), r"train.bin \(the train split\) "
                                                          r"is missing"),
    "truncated .bin": (lambda f: cut(f, "train.bin", 1000),
                       r"train.bin holds 1000 bytes, but meta.json records \d+ uint16 tokens"),
    "odd-length .bin": (lambda f: (f / "val.bin").write_bytes((f / "val.bin").read_bytes()
                                                              + b"\x01"),
                        r"val.bin holds \d*[13579] bytes, but meta.json records"),
    "empty val.bin": (lambda f: (f / "val.bin").write_bytes(b""),
                      r"val.bin holds 0 bytes, but meta.json records \d+ uint16 tokens"),
    "empty val split": (lambda f: ((f / "val.bin").write_bytes(b""), edit_meta(
        f, lambda m: m["splits"]["val"].update(tokens=0))),
                        r"meta.json's splits.val.tokens is 0, expected >= 1"),
    "id at the vocabulary size": (lambda f: set_token(f, "train", 5, 256),
                                  r"train.bin holds token id 256, outside the vocabulary of "
                                  r"256 \(meta.json\)"),
    "id far above it": (lambda f: set_token(f, "val", -1, 65535),
                        r"val.bin holds token id 65535, outside the vocabulary of 256"),
    "an id changed within it": (lambda f: set_token(f, "train", 0, 255),
                                r"the largest token id in train.bin is 255, but meta.json "
                                r"records 126"),
    "max_id out of range": (lambda f: edit_meta(f, lambda m: m["splits"]["val"].update(
        max_id=300)), r"splits.val.max_id is 300, expected in \[0, 256\)"),
    "missing tokenizer": (lambda f: edit_meta(f, lambda m: m["tokenizer"].update(
        file="tokenizer.json")), r"tokenizer.json \(the tokenizer meta.json names\) is missing"),
}


def tokens_cfg(folder, *extra):
    return load_config(overrides=[
        "data.dataset_name=tokens", f"data.path={folder}", f"data.max_seq_len={BLOCK}",
        f"model.max_seq_len={BLOCK}", *extra])


def test_the_prepared_folder_records_its_largest_ids(prepared):
    meta = read_meta(prepared)
    for split in ("train", "val"):
        ids = np.fromfile(prepared / f"{split}.bin", dtype="<u2")
        assert meta["splits"][split]["max_id"] == ids.max()
    assert meta["splits"]["train"]["max_id"] == ord("~")
    check_data(tokens_cfg(prepared))


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_one_error_naming_the_file(case, folder):
    damage, needle = DAMAGE[case]
    damage(folder)
    with pytest.raises(ConfigError, match=needle) as err:
        build_data(tokens_cfg(folder))  # the path of freetf eval and of every worker
    assert str(err.value).startswith(f"data.path {folder}")
    with pytest.raises(ConfigError, match=needle):
        check_data(tokens_cfg(folder))


@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if the run starts Ray, a worker or an MLflow run."""
    def refuse(*args, **kwargs):
        raise AssertionError("the run started before the data check")

    for name in ("init_ray", "train_loop", "build_trainer"):
        monkeypatch.setattr(ray_train, name, refuse)
    monkeypatch.setattr(tracking, "make_tracker", refuse)


@pytest.mark.parametrize("use_ray", [True, False])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_training_on_damage_stops_before_any_run(case, use_ray, folder, tmp_path, no_run,
                                                 capsys):
    damage, needle = DAMAGE[case]
    damage(folder)
    argv = ["train", "--set", "data.dataset_name=tokens",  # model.vocab_size from meta.json
            "--set", f"data.path={folder}", "--set", f"data.max_seq_len={BLOCK}",
            "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
            "--set", f"scaling.storage_path={tmp_path / 'rr'}",
            "--set", f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(argv + ([] if use_ray else ["--no-ray"])) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("freetf train: error: data.path ") and re.search(needle, err), err
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_sweep_on_damage_stops_before_any_run(case, folder, tmp_path, no_run, capsys):
    """``freetf sweep`` runs train's data check before MLflow and Ray (it ran every trial
    into the damage, and ended with exit 0)."""
    damage, needle = DAMAGE[case]
    damage(folder)
    settings = ["data.dataset_name=tokens", f"data.path={folder}", f"data.max_seq_len={BLOCK}",
                f"model.max_seq_len={BLOCK}", "model.vocab_size=256",
                f"storage_path={tmp_path / 'rr'}", f"report_dir={tmp_path / 'reports'}",
                f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(["sweep", "--smoke", *(f"--set={s}" for s in settings)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("freetf sweep: error: data.path ") and re.search(needle, err), err
    assert not (tmp_path / "mlflow.db").exists()


def test_a_split_shorter_than_a_block_stops_before_any_run(folder, tmp_path, no_run, capsys):
    val_tokens = read_meta(folder)["splits"]["val"]["tokens"]
    block = val_tokens + 1
    assert main(["train", "--config", "freetf/configs/tiny.yaml", "--no-ray",
                 "--set", "data.dataset_name=tokens", "--set", f"data.path={folder}",
                 "--set", f"data.max_seq_len={block}", "--set", f"model.max_seq_len={block}",
                 "--set", "model.vocab_size=256", "--set", "tracking.mlflow.enabled=false",
                 "--set", f"checkpoint.dir={tmp_path / 'ckpt'}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"freetf train: error: data.path {folder}: the val split holds {val_tokens} "
                   f"tokens, less than one block of data.max_seq_len={block}\n")


def test_a_folder_from_before_max_id_is_scanned(folder):
    edit_meta(folder, lambda m: [info.pop("max_id") for info in m["splits"].values()])
    bundle = build_data(tokens_cfg(folder))  # still loads
    assert len(bundle.train) > 0
    set_token(folder, "val", 3, 300)
    with pytest.raises(ConfigError, match=r"val.bin holds token id 300"):
        check_data(tokens_cfg(folder))


def test_the_id_scan_reads_every_chunk(folder):
    meta = read_meta(folder)
    set_token(folder, "train", -1, 256)  # in the last chunk only
    for chunk in (1, 7, 1 << 24):
        with pytest.raises(ConfigError, match="token id 256"):
            check_token_ids(folder, meta, chunk_tokens=chunk)


def test_an_odd_length_token_file_is_refused(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ConfigError, match=r"odd.bin holds 3 bytes, not a whole number of "
                                          r"uint16 tokens"):
        max_token_id(tmp_path / "odd.bin")
    (tmp_path / "wide.bin").write_bytes(np.array([7, 70_000], "<u4").tobytes())
    assert max_token_id(tmp_path / "wide.bin", "uint32") == 70_000



def good_meta() -> dict:
    split = {"file": "train.bin", "tokens": 10, "bytes": 10, "documents": 1, "max_id": 9}
    return {"format": "freetf-tokens/1", "vocab_size": 256, "dtype": "uint16",
            "tokenizer": {"file": None},
            "splits": {"train": split, "val": dict(split, file="val.bin")}}


def read_meta_of(tmp_path, meta):
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return read_meta(tmp_path)


def changed(change):
    """An edit of a good meta: ``change`` applied to it in place."""
    return lambda meta: (change(meta), meta)[1]


def in_split(split, **values):
    return changed(lambda m: m["splits"][split].update(values))


META_DAMAGE = {  # name -> (the meta.json written, the reason after "data.path {folder}: ")
    "a number": (lambda m: 7, "meta.json holds a number, not an object"),
    "null": (lambda m: None, "meta.json holds null, not an object"),
    "vocab_size an object": (changed(lambda m: m.update(vocab_size={})),
                             "meta.json's vocab_size is {} (an object), expected an integer"),
    "vocab_size a boolean": (changed(lambda m: m.update(vocab_size=True)),
                             "meta.json's vocab_size is True (a boolean), expected an integer"),
    "vocab_size null": (changed(lambda m: m.update(vocab_size=None)),
                        "meta.json's vocab_size is None (null), expected an integer"),
    "vocab_size 0": (changed(lambda m: m.update(vocab_size=0)),
                     "meta.json's vocab_size is 0, expected >= 1"),
    "vocab_size past uint16": (changed(lambda m: m.update(vocab_size=65537)),
                               "meta.json's vocab_size 65537 does not fit its dtype uint16"),
    "tokenizer a list": (changed(lambda m: m.update(tokenizer=[])),
                         "meta.json's tokenizer is not an object naming its file (or null)"),
    "tokenizer file a number": (changed(lambda m: m.update(tokenizer={"file": 3})),
                                "meta.json's tokenizer is not an object naming its file "
                                "(or null)"),
    "splits a list": (changed(lambda m: m.update(splits=[])),
                      "meta.json has no train split (splits.train)"),
    "file empty": (in_split("train", file=""), "meta.json's splits.train.file is '', "
                                               "expected the name of a file in the folder"),
    "file ..": (in_split("val", file=".."), "meta.json's splits.val.file is '..', expected "
                                            "the name of a file in the folder"),
    "bytes -1": (in_split("val", bytes=-1), "meta.json's splits.val.bytes is -1, expected >= 0"),
    "documents a string": (in_split("train", documents="1"),
                           "meta.json's splits.train.documents is '1' (a string), expected an "
                           "integer"),
    "max_id at vocab_size": (in_split("train", max_id=256),
                             "meta.json's splits.train.max_id is 256, expected in [0, 256)"),
}


@pytest.mark.parametrize("case", list(META_DAMAGE))
def test_read_meta_names_each_damage_in_whole(case, tmp_path):
    edit, reason = META_DAMAGE[case]
    with pytest.raises(ConfigError) as err:
        read_meta_of(tmp_path, edit(good_meta()))
    assert str(err.value) == (f"data.path {tmp_path}: {reason}; the folder is damaged or was "
                              f"changed after `freetf prepare`: prepare it again")


def test_read_meta_takes_the_edges_of_its_ranges(tmp_path):
    meta = good_meta()
    meta.update(vocab_size=1)
    for split in ("train", "val"):
        meta["splits"][split].update(bytes=0, documents=0, max_id=0)
    assert read_meta_of(tmp_path, meta) == meta
    meta.update(vocab_size=65536)
    meta["splits"]["val"].update(max_id=65535)
    assert read_meta_of(tmp_path, meta)["vocab_size"] == 65536
    meta.update(vocab_size=65537, dtype="uint32")
    assert read_meta_of(tmp_path, meta)["dtype"] == "uint32"
