import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from freetf.config import Config, ConfigError, load_config
from freetf.data.datasets import (
    SYNTHETIC_SEQ_LEN,
    BlockDataset,
    ByteTokenizer,
    CharTokenizer,
    RowsDataset,
    build_data,
    check_vocabulary,
    max_token_id,
    parse_synthetic,
    synthetic_sequences,
    write_token_file,
)
from freetf.data.stream import BatchStream, epoch_permutation

pytestmark = pytest.mark.timeout(60)

CHARS = CharTokenizer()


def _decode_rows(rows: np.ndarray) -> list[str]:
    return [CHARS.decode(row) for row in rows]


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_shape_prompt_and_target_letter():
    rows = synthetic_sequences(2000, seed=3)
    assert rows.shape == (2000, SYNTHETIC_SEQ_LEN) == (2000, 66)
    for text in _decode_rows(rows):
        letter, body = text[0], text[2:]
        assert letter.isupper() and text[1] == ">"
        assert set(body) <= {"_", "!", letter}  # the only letter is the prompt's
        first = next(i for i, ch in enumerate(body) if ch == letter)
        last = max(i for i, ch in enumerate(body) if ch == letter)
        assert last - first < 8
        assert last < 64


def test_synthetic_statistics():
    rows = synthetic_sequences(20000, seed=0)
    body = rows[:, 2:]
    noise_rate = (body == CHARS.encode("!")[0]).mean()
    assert abs(noise_rate - 1 / 16) < 0.002
    letters = rows[:, 0] - CHARS.encode("A")[0]
    counts = np.bincount(letters, minlength=26)
    assert counts.min() > 0.8 * 20000 / 26 and counts.max() < 1.2 * 20000 / 26
    parses = [parse_synthetic(t) for t in _decode_rows(rows[:4000])]
    starts = [p.target_start for p in parses if p.target_start is not None]
    assert min(starts) == 0 and max(starts) == 56
    assert all(p.valid for p in parses)  # noise on the target is part of the task


def test_parse_synthetic_reads_the_generators_start_and_validity():
    """On the task's own rows: every row valid (one definition with the Figure 4 reader),
    and the target's start is the one the generator drew, noise on its ends included."""
    from freetf.evaluation.synthetic_eval import read_sequence

    n, seed = 4000, 5
    rng = np.random.default_rng(seed)  # replays synthetic_sequences' draws
    rng.integers(0, 26, size=n)
    true_starts = rng.integers(0, 64 - 8 + 1, size=n)
    texts = _decode_rows(synthetic_sequences(n, seed))
    parses = [parse_synthetic(t) for t in texts]
    assert all(p.valid for p in parses)
    assert all(read_sequence(t).valid for t in texts)
    read = np.array([p.target_start for p in parses])
    assert np.mean(read == true_starts) > 0.98  # exact unless both run ends are ambiguous
    assert np.abs(read - true_starts).max() <= 1.0


def test_synthetic_determinism_and_speed():
    start = time.perf_counter()
    a = synthetic_sequences(20000, seed=7)
    assert time.perf_counter() - start < 1.0
    assert np.array_equal(a, synthetic_sequences(20000, seed=7))
    assert not np.array_equal(a, synthetic_sequences(20000, seed=8))


def test_parse_synthetic():
    clean = "K>" + "_" * 10 + "K" * 8 + "_" * 46
    parsed = parse_synthetic(clean)
    assert (parsed.letter, parsed.target_start, parsed.valid) == ("K", 10, True)
    assert parsed.noise_positions == ()
    noisy = "K>!" + "_" * 9 + "K" * 8 + "_" * 45 + "!"
    parsed = parse_synthetic(noisy)
    assert parsed.valid and parsed.target_start == 10 and parsed.noise_positions == (0, 63)
    assert not parse_synthetic(clean[:-1]).valid  # length 65
    assert not parse_synthetic(clean.replace("_", "J", 1)).valid  # another letter
    assert not parse_synthetic("K>" + "_" * 10 + "K" * 9 + "_" * 45).valid  # 9 in a row
    wrong = parse_synthetic("J>" + "_" * 10 + "K" * 8 + "_" * 46)
    assert not wrong.valid and wrong.target_start is None
    assert parse_synthetic("__" + "_" * 64).letter is None
    for head in ("_>", "k>"):  # not a capital letter before ">"
        assert parse_synthetic(head + "_" * 10 + "K" * 8 + "_" * 46).letter is None


def test_build_data_synthetic_seeds():
    bundle = build_data(Config())
    assert len(bundle.train) == 20000 and len(bundle.val) == 512
    assert bundle.train[0].dtype == torch.long and bundle.train[0].shape == (66,)
    assert not torch.equal(bundle.train.rows[:512], bundle.val.rows)
    again = build_data(Config())
    assert torch.equal(bundle.train.rows, again.train.rows)
    assert torch.equal(bundle.val.rows, again.val.rows)
    # the validation rows of a seed stay the same from version to version
    val_seed = int(np.random.SeedSequence([0, 1]).generate_state(1)[0])
    assert torch.equal(bundle.val.rows, torch.from_numpy(synthetic_sequences(512, val_seed)))
    assert bundle.bytes_per_token == 1.0 and isinstance(bundle.tokenizer, CharTokenizer)
    with pytest.raises(ConfigError, match="data.max_seq_len=64: synthetic sequences have "
                                          "length 66"):
        build_data(load_config(overrides=["data.max_seq_len=64", "model.max_seq_len=64"]))
    other = build_data(load_config(overrides=["data.seed=1"]))
    assert not torch.equal(bundle.train.rows, other.train.rows)
    assert not torch.equal(bundle.val.rows, other.val.rows)


# ----------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trip_and_error():
    text = "K>!__KKKKKKKK_"
    assert CHARS.decode(CHARS.encode(text)) == text
    assert CHARS.vocab_size == 29
    with pytest.raises(ValueError, match=r"'a'.*'z'|'z'.*'a'"):
        CHARS.encode("K>za")
    for bad in (29, -1):  # the ids run from 0 to 28: no wrap-around, no IndexError
        with pytest.raises(ValueError, match=rf"token ids \[{bad}\] are outside \[0, 29\)"):
            CHARS.decode([3, bad])


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and max(ids) < 256 and len(ids) > len(text)
    assert tok.decode(ids) == text
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"


# ----------------------------------------------------------------------------- text / tokens


def _text_cfg(path, **extra) -> Config:
    overrides = {"data.dataset_name": "text", "data.path": str(path), "data.max_seq_len": 8,
                 "model.max_seq_len": 8, **extra}
    return load_config(overrides=overrides)


def test_text_folder_packing(tmp_path):
    (tmp_path / "b.txt").write_text("BBBBBBBBBBBBBBBBBBBB")  # 20 bytes
    (tmp_path / "a.txt").write_text("aaaaaaaaaaaaaaaaaaa")  # 19 bytes
    (tmp_path / "skip.md").write_text("not read")
    bundle = build_data(_text_cfg(tmp_path, **{"data.val_fraction": 0.2}))
    corpus = "a" * 19 + "\n" + "B" * 20  # sorted, "\n"-joined: 40 bytes = 5 blocks
    assert len(bundle.train) == 4 and len(bundle.val) == 1
    rows = [bundle.train[i] for i in range(4)] + [bundle.val[0]]
    assert all(r.dtype == torch.long and r.shape == (8,) for r in rows)
    assert bundle.tokenizer.decode(torch.cat(rows).tolist()) == corpus
    assert bundle.tokenizer.decode(bundle.val[0].tolist()) == "B" * 8  # last block is val


def test_alphabet_with_a_repeated_character_is_refused():
    with pytest.raises(ValueError, match="alphabet 'abca' has repeated characters"):
        CharTokenizer("abca")


@pytest.mark.parametrize("extra,dropped", [(0, None), (3, 3)])
def test_text_blocks_report_only_a_real_remainder(tmp_path, caplog, extra, dropped):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x" * (40 + extra))  # 5 blocks of 8 bytes, and extra bytes
    with caplog.at_level("INFO", logger="freetf.data.datasets"):
        build_data(_text_cfg(corpus))
    assert ("dropping" in caplog.text) == (dropped is not None)
    if dropped:
        assert f"dropping the last {dropped} tokens" in caplog.text


def test_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_data(_text_cfg(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        build_data(_text_cfg(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match=r"data.path \S*short.txt holds 9 tokens: too short"):
        build_data(_text_cfg(tmp_path / "short.txt"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("not a .txt file")
    with pytest.raises(ValueError, match=r"notes is a folder with no \*\.txt files"):
        build_data(_text_cfg(tmp_path / "notes"))


def test_token_file_memmap_round_trip(tmp_path):
    tokens = np.arange(1000) * 61 % 65536
    path = write_token_file(tmp_path / "toks.bin", tokens)
    assert path.stat().st_size == 2000
    assert np.array_equal(np.fromfile(path, dtype="<u2"), tokens)
    cfg = _text_cfg(path, **{"data.dataset_name": "tokens", "data.val_fraction": 0.1,
                             "model.vocab_size": 65536})
    bundle = build_data(cfg)
    assert len(bundle.train) + len(bundle.val) == 125 and len(bundle.val) == 13
    assert isinstance(bundle.train._array(), np.memmap)  # read lazily from disk
    assert torch.equal(bundle.train[3], torch.from_numpy(tokens[24:32]))
    assert torch.equal(bundle.val[0], torch.from_numpy(tokens[112 * 8:113 * 8]))
    with pytest.raises(IndexError, match=r"block 13 out of range \[0, 13\)"):
        bundle.val[13]
    with pytest.raises(ValueError, match="65535"):
        write_token_file(tmp_path / "bad.bin", [70000])
    top = write_token_file(tmp_path / "top.bin", [65535, 0])  # the largest uint16 id
    assert np.fromfile(top, dtype="<u2").tolist() == [65535, 0]
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        build_data(_text_cfg(tmp_path / "nope.bin", **{"data.dataset_name": "tokens"}))
    assert bundle.bytes_per_token == 1.0 and isinstance(bundle.tokenizer, ByteTokenizer)
    tokens_cfg = {"data.dataset_name": "tokens", "model.vocab_size": 65536}
    for name, ids, needle in [("empty.bin", [], r"empty.bin: the token file is empty"),
                              ("one.bin", [4], r"one.bin holds 1 tokens: too short"),
                              ("short.bin", [1, 2, 3], r"short.bin holds 3 tokens: too short")]:
        path = write_token_file(tmp_path / name, ids)
        with pytest.raises(ValueError, match=rf"data.path \S*{needle}"):
            build_data(_text_cfg(path, **tokens_cfg))


# ----------------------------------------------------------------------------- vocabulary


def test_vocab_size_defaults_to_the_datas_vocabulary(tmp_path):
    assert load_config().model.vocab_size == CHARS.vocab_size == 29
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello")
    assert _text_cfg(corpus).model.vocab_size == 256
    assert load_config(overrides=["model.vocab_size=40"]).model.vocab_size == 40  # explicit wins


@pytest.mark.parametrize("vocab,needle", [
    (256, "model.vocab_size=256 does not match the synthetic task's 29 symbols of "
          "data.dataset_name='synthetic': the model would sample ids that nothing decodes"),
    (28, "model.vocab_size=28 does not match .* the model cannot represent every id"),
])
def test_synthetic_vocab_mismatch_fails_before_training(vocab, needle):
    cfg = load_config(overrides=[f"model.vocab_size={vocab}"])
    with pytest.raises(ConfigError, match=needle):
        check_vocabulary(cfg)
    with pytest.raises(ConfigError, match=needle):
        build_data(cfg)


def test_text_vocab_must_be_bytes(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, hello world")
    with pytest.raises(ConfigError, match="does not match the 256 byte values .* Set "
                                          "model.vocab_size=256"):
        check_vocabulary(_text_cfg(corpus, **{"model.vocab_size": 300}))


def test_token_ids_must_fit_the_vocabulary(tmp_path):
    path = write_token_file(tmp_path / "toks.bin", [1, 5, 300, 7] * 8)
    cfg = _text_cfg(path, **{"data.dataset_name": "tokens"})
    with pytest.raises(ConfigError, match="holds token id 300: set model.vocab_size=301"):
        build_data(cfg)
    assert max_token_id(path, chunk_tokens=3) == 300  # chunks cover the whole file
    check_vocabulary(cfg.replace(["model.vocab_size=301"]))
    with pytest.raises(ConfigError, match="holds token id 300"):  # ids run from 0 to V - 1
        check_vocabulary(cfg.replace(["model.vocab_size=300"]))


def test_max_token_id_reads_every_token_of_any_file_read_only(tmp_path, monkeypatch):
    def ids(name, tokens, **kwargs):
        return max_token_id(write_token_file(tmp_path / name, tokens), **kwargs)

    assert ids("empty.bin", []) == -1  # no token at all
    assert ids("one.bin", [7]) == 7  # a 2-byte file
    assert ids("zeros.bin", [0, 0, 0]) == 0
    assert ids("first.bin", [300, 1, 2, 3, 4], chunk_tokens=2) == 300  # the first chunk too
    with pytest.raises(FileNotFoundError, match=r"data.path \S*nope.bin does not exist"):
        max_token_id(tmp_path / "nope.bin")
    modes, memmap = [], np.memmap
    monkeypatch.setattr(np, "memmap",
                        lambda *a, **k: modes.append(k.get("mode")) or memmap(*a, **k))
    assert ids("read.bin", [5, 9]) == 9 and modes == ["r"]  # never opened for writing
    assert BlockDataset(tmp_path / "read.bin", 1, 0, 2)[1].tolist() == [9]
    assert modes == ["r", "r"]


# ----------------------------------------------------------------------------- batch stream


def _indexed_dataset(n: int) -> RowsDataset:
    return RowsDataset(torch.arange(n).repeat_interleave(4).view(n, 4))  # row i = [i]*4


def test_epoch_permutation_seeded():
    assert torch.equal(epoch_permutation(50, 1, 0), epoch_permutation(50, 1, 0))
    assert not torch.equal(epoch_permutation(50, 1, 0), epoch_permutation(50, 1, 1))
    assert not torch.equal(epoch_permutation(50, 1, 0), epoch_permutation(50, 2, 0))
    # the order of a (seed, epoch) stays the same from version to version (a resume
    # continues an older run's order): 62 bits drawn from SeedSequence([seed mod 2^63, e])
    for seed, epoch in [(0, 0), (2, 0), (7, 5), (-3, 1), (2 ** 64 + 9, 2)]:
        words = np.random.SeedSequence([seed % 2 ** 63, epoch]).generate_state(2)
        generator = torch.Generator().manual_seed(int(words[0]) << 31 | int(words[1]) >> 1)
        assert torch.equal(epoch_permutation(50, seed, epoch),
                           torch.randperm(50, generator=generator)), (seed, epoch)


def test_sharding_union_matches_one_big_worker():
    data = _indexed_dataset(103)
    big = BatchStream(data, batch_size=8, seed=5)
    shards = [BatchStream(data, batch_size=4, rank=r, world_size=2, seed=5) for r in range(2)]
    assert big.steps_per_epoch == shards[0].steps_per_epoch == 12
    seen_epoch0 = set()
    for _ in range(30):  # crosses two epoch boundaries
        rows_big = next(big)[:, 0].tolist()
        rows_split = [next(s)[:, 0].tolist() for s in shards]
        assert all(len(r) == 4 for r in rows_split)
        assert not set(rows_split[0]) & set(rows_split[1])
        assert sorted(rows_big) == sorted(rows_split[0] + rows_split[1])
        if big.epoch == 0:
            seen_epoch0.update(rows_big)
    assert len(seen_epoch0) == 96  # no repeats within an epoch, 7 rows dropped


def test_stream_epochs_differ_and_drop_last_false_covers_all():
    data = _indexed_dataset(10)
    stream = BatchStream(data, batch_size=4, seed=0, drop_last=False)
    assert stream.steps_per_epoch == 3
    epoch0 = torch.cat([next(stream) for _ in range(3)])[:, 0]
    epoch1 = torch.cat([next(stream) for _ in range(3)])[:, 0]
    assert set(epoch0.tolist()) == set(range(10)) and stream.epoch == 1
    assert not torch.equal(epoch0, epoch1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_next_batch(num_workers):
    data = _indexed_dataset(40)
    reference = BatchStream(data, batch_size=4, rank=1, world_size=2, seed=3)
    expected = [next(reference) for _ in range(12)]  # 5 steps per epoch
    stream = BatchStream(data, batch_size=4, rank=1, world_size=2, seed=3,
                         num_workers=num_workers)
    for i in range(7):
        assert torch.equal(next(stream), expected[i])
    state = stream.state_dict()
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)
    resumed = BatchStream(data, batch_size=4, rank=1, world_size=2, seed=3,
                          num_workers=num_workers)
    resumed.load_state_dict(state)
    for i in range(7, 11):
        assert torch.equal(next(resumed), expected[i])
    resumed.close()  # the workers stop; the next batch starts new ones
    assert torch.equal(next(resumed), expected[11])
    resumed.close()
    stream.close()


def test_stream_too_small_dataset():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchStream(_indexed_dataset(7), batch_size=4, world_size=2)


@pytest.mark.parametrize("batch_size,rank,world_size", [(0, 0, 1), (4, 2, 2), (4, -1, 2),
                                                        (4, 0, 0)])
def test_stream_refuses_a_bad_shape(batch_size, rank, world_size):
    with pytest.raises(ValueError, match="need batch_size > 0 and 0 <= rank < world_size"):
        BatchStream(_indexed_dataset(16), batch_size, rank, world_size)


def test_stream_default_seed_is_0():
    data = _indexed_dataset(16)
    assert torch.equal(next(BatchStream(data, 4)), next(BatchStream(data, 4, seed=0)))


def test_block_dataset_pickles_without_data(tmp_path):
    import pickle

    path = write_token_file(tmp_path / "t.bin", np.arange(64))
    ds = BlockDataset(path, 8, 0, 8)
    assert ds[1].tolist() == list(range(8, 16))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._tokens is None and torch.equal(clone[7], ds[7])
    in_memory = BlockDataset(np.arange(64), 8, 0, 8)  # an array pickles with its data
    assert torch.equal(pickle.loads(pickle.dumps(in_memory))[7], ds[7])


# ----------------------------------------------------------------------------- properties


@st.composite
def _shards(draw):
    world = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 5))
    rows = draw(st.integers(world * batch, 60))
    return rows, batch, world, draw(st.booleans()), draw(st.integers(0, 2 ** 31))


@settings(max_examples=60, deadline=None)
@given(_shards())
def test_shards_partition_each_global_batch_like_one_big_worker(case):
    """For any N, b, w: the w ranks' batches at each step are disjoint and together are
    the batch of one worker of batch w*b; an epoch (drop_last) visits each row once."""
    rows, batch, world, drop_last, seed = case
    data = _indexed_dataset(rows)
    big = BatchStream(data, world * batch, seed=seed, drop_last=drop_last)
    shards = [BatchStream(data, batch, rank=r, world_size=world, seed=seed,
                          drop_last=drop_last) for r in range(world)]
    steps = big.steps_per_epoch
    assert steps == shards[0].steps_per_epoch
    assert steps == (rows // (world * batch) if drop_last else -(-rows // (world * batch)))
    seen = []
    for _ in range(steps + 1):  # into the next epoch
        parts = [next(s)[:, 0].tolist() for s in shards]
        assert all(len(p) == batch for p in parts)
        flat = [i for p in parts for i in p]
        assert len(set(flat)) == len(flat)  # disjoint across ranks
        assert sorted(flat) == sorted(next(big)[:, 0].tolist())
        seen.extend(flat)
    epoch0 = seen[:steps * world * batch]
    if drop_last:
        assert len(set(epoch0)) == len(epoch0)
    else:
        assert set(epoch0) == set(range(rows))  # every row, the last batch wrapping


@settings(max_examples=40, deadline=None)
@given(_shards(), st.integers(0, 12))
def test_a_stream_resumed_at_any_batch_yields_the_same_batches(case, consumed):
    rows, batch, world, drop_last, seed = case
    data = _indexed_dataset(rows)
    rank = seed % world
    make = lambda: BatchStream(data, batch, rank=rank, world_size=world, seed=seed,
                               drop_last=drop_last)
    stream = make()
    for _ in range(consumed):
        next(stream)
    resumed = make()
    resumed.load_state_dict(stream.state_dict())
    for _ in range(4):
        assert torch.equal(next(resumed), next(stream))


@settings(max_examples=100, deadline=None)
@given(letter=st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), start=st.integers(0, 56),
       noise=st.sets(st.integers(0, 63), max_size=12))
def test_parse_synthetic_of_any_generator_output(letter, start, noise):
    """Whatever the noise, a generator output is valid and its start is recovered (exactly
    unless "!" sits on both ends of the run, then within the possible starts)."""
    body = ["!" if i in noise else (letter if start <= i < start + 8 else "_")
            for i in range(64)]
    if letter not in body:
        return  # every target letter replaced by noise: nothing to read
    parsed = parse_synthetic(f"{letter}>" + "".join(body))
    assert parsed.valid and parsed.letter == letter
    assert parsed.noise_positions == tuple(sorted(noise))
    spots = [i for i, ch in enumerate(body) if ch == letter]
    possible = [s for s in range(max(0, spots[-1] - 7), min(spots[0], 56) + 1)
                if "_" not in body[s:s + 8]]
    assert start in possible
    assert parsed.target_start == sum(possible) / len(possible)
    if len(possible) == 1:
        assert parsed.target_start == start
    broken = body.copy()
    broken[next(i for i, ch in enumerate(body) if ch == "_")] = "Q" if letter != "Q" else "R"
    assert not parse_synthetic(f"{letter}>" + "".join(broken)).valid  # another letter


def test_resume_with_another_global_batch_continues_after_the_rows_consumed(caplog):
    data = _indexed_dataset(48)
    old = BatchStream(data, batch_size=4, seed=9)  # global batch 4
    for _ in range(5):  # 20 rows of epoch 0
        next(old)
    new = BatchStream(data, batch_size=4, rank=0, world_size=2, seed=9)  # global batch 8
    with caplog.at_level("WARNING", logger="freetf.data.datasets"):
        new.load_state_dict(old.state_dict())
    assert (new.epoch, new.batch_in_epoch) == (0, 20 // 8)
    assert "global batch 4 at 8" in caplog.text
    reference = BatchStream(data, batch_size=4, rank=0, world_size=2, seed=9)
    for _ in range(2):
        next(reference)
    assert torch.equal(next(new), next(reference))
    other = BatchStream(data, batch_size=4, seed=10)
    with caplog.at_level("WARNING", logger="freetf.data.datasets"):
        other.load_state_dict(old.state_dict())
    assert "seed=9, now 10" in caplog.text
    caplog.clear()
    fewer = BatchStream(_indexed_dataset(40), batch_size=4, seed=9)
    with caplog.at_level("WARNING", logger="freetf.data.datasets"):
        fewer.load_state_dict(old.state_dict())
    assert "num_rows=48, now 40" in caplog.text


def test_resume_from_a_state_of_epoch_and_batch_only():
    """An older stream state: no global batch, seed or row count saved."""
    data = _indexed_dataset(40)
    reference = BatchStream(data, batch_size=4, seed=3)
    expected = [next(reference) for _ in range(4)]
    resumed = BatchStream(data, batch_size=4, seed=3)
    resumed.load_state_dict({"epoch": 0, "batch_in_epoch": 3})
    assert torch.equal(next(resumed), expected[3])


class _WorkerFlags(torch.utils.data.Dataset):
    """Row i: [1] when read in a DataLoader worker process, [0] in the main process."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([torch.utils.data.get_worker_info() is not None])


def test_stream_workers_load_the_batches():
    stream = BatchStream(_WorkerFlags(), batch_size=4, num_workers=1)
    assert bool(next(stream).all())
    stream.close()
    assert not bool(next(BatchStream(_WorkerFlags(), batch_size=4)).any())


@settings(max_examples=50, deadline=None)
@given(num_tokens=st.integers(16, 400), block=st.integers(1, 8),
       fraction=st.floats(0.0, 1.0))
def test_split_blocks_keeps_at_least_one_block_on_each_side(num_tokens, block, fraction):
    from freetf.data.datasets import _split_blocks

    tokens = np.arange(num_tokens) % 65536
    train, val = _split_blocks(tokens, num_tokens, block, fraction, "test")
    blocks = num_tokens // block
    expected_val = min(max(1, math.ceil(fraction * blocks)), blocks - 1)
    assert (len(train), len(val)) == (blocks - expected_val, expected_val)
    rows = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
    assert torch.equal(torch.cat(rows), torch.from_numpy(tokens[:blocks * block]))
    with pytest.raises(IndexError):
        val[len(val)]
