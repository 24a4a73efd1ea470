"""data_loader: jsonl -> binary cache -> random and evaluation batches."""
import json
import os

import numpy as np
import pytest

import data_loader
from data_loader import RandomBatches, cache_paths, check_same_tokenizer, eval_batches, load_dataset
from errors import DataError

IDENTITY = {"type": "tiktoken", "name": "gpt2", "n_vocab": 50257, "eot_id": 50256,
            "sha256": None, "model_file": None}


def write_jsonl(path, lines, identity=None, num_bytes=None):
    """A tokenized file like tokenizer.py writes; with identity, also its sidecar."""
    with open(path, "w") as f:
        for ids in lines:
            f.write(json.dumps(ids) + "\n")
    if identity is not None:
        meta = {"format": "numpy-gpt tokenized jsonl", "version": 1, "tokenizer": identity,
                "num_documents": sum(1 for ids in lines if ids and ids[-1] == identity["eot_id"]),
                "num_lines": len(lines), "num_tokens": sum(map(len, lines)), "num_bytes": num_bytes,
                "eot_appended": True, "max_length": 512, "source": "stories.txt"}
        with open(str(path) + ".meta.json", "w") as f:
            json.dump(meta, f)
    return str(path)


def test_sidecar_file_is_concatenated_as_is_into_uint16(tmp_path):
    lines = [[5, 6, 7], [8, 50256], [9, 10, 50256]]  # story 1 spans two lines (chunks)
    path = write_jsonl(tmp_path / "t.jsonl", lines, IDENTITY, num_bytes=123)
    ds = load_dataset(path, vocab_size=50257)
    assert isinstance(ds.tokens, np.memmap) and ds.tokens.dtype == np.uint16
    np.testing.assert_array_equal(ds.tokens, [5, 6, 7, 8, 50256, 9, 10, 50256])
    assert ds.num_bytes == 123 + 2  # + the newline that ends each story
    assert ds.num_documents == 2 and ds.tokenizer == IDENTITY
    assert os.path.getsize(cache_paths(path)[0]) == 8 * 2


def test_plain_jsonl_gets_end_of_text_after_each_line_and_big_vocab_uses_uint32(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", [[1, 2], [3], [4, 5, 6]])
    ds = load_dataset(path, vocab_size=50257)
    np.testing.assert_array_equal(ds.tokens, [1, 2, 50256, 3, 50256, 4, 5, 6, 50256])
    assert ds.tokens.dtype == np.uint16   # written wide, then narrowed: no sidecar said the vocabulary
    assert ds.tokenizer is None and ds.num_bytes is None
    ds = load_dataset(path, vocab_size=64)  # eot defaults to the last id for other vocabularies
    np.testing.assert_array_equal(ds.tokens, [1, 2, 63, 3, 63, 4, 5, 6, 63])
    big = write_jsonl(tmp_path / "big.jsonl", [[70000, 1], [2]])
    ds = load_dataset(big, eot_id=0)
    assert ds.tokens.dtype == np.uint32
    np.testing.assert_array_equal(ds.tokens, [70000, 1, 0, 2, 0])


def test_cache_is_reused_and_rebuilt_when_the_jsonl_changes(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [[1, 2, 3]], dict(IDENTITY, eot_id=3, n_vocab=10))
    messages = []
    load_dataset(path, vocab_size=10, log=messages.append)
    assert any("converting" in m for m in messages)
    assert not any("damaged" in m for m in messages)  # a first conversion: there was no cache to damage
    messages.clear()
    ds = load_dataset(path, vocab_size=10, log=messages.append)
    assert not any("converting" in m for m in messages)   # reused, JSON not read again
    assert list(ds.tokens) == [1, 2, 3]
    write_jsonl(tmp_path / "t.jsonl", [[4, 5, 3], [6, 3]], dict(IDENTITY, eot_id=3, n_vocab=10))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    ds = load_dataset(path, vocab_size=10, log=messages.append)
    assert any("converting" in m for m in messages)
    assert list(ds.tokens) == [4, 5, 3, 6, 3]


def test_conversion_streams_in_chunks(tmp_path, monkeypatch):
    # memory stays flat: with a tiny chunk the output is written in many pieces, same result
    monkeypatch.setattr(data_loader, "CHUNK_TOKENS", 4)
    lines = [list(range(i, i + 7)) for i in range(30)]
    path = write_jsonl(tmp_path / "t.jsonl", lines)
    ds = load_dataset(path, eot_id=99)
    expected = [t for ids in lines for t in ids + [99]]
    np.testing.assert_array_equal(ds.tokens, expected)
    assert ds.tokens.dtype == np.uint16
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # a sidecar vocabulary that fits uint16 but an id that does not: an error, never a silent wrap
    bad = write_jsonl(tmp_path / "bad.jsonl", [[1, 2, 3], [70000, 3]], dict(IDENTITY, n_vocab=4, eot_id=3))
    with pytest.raises(DataError, match=r"bad\.jsonl:2: token id 70000"):
        load_dataset(bad)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "missing.jsonl", vocab_size=10)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path / "empty.jsonl", vocab_size=10)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path / "blank.jsonl", vocab_size=10)
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n[3, 4\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load_dataset(tmp_path / "bad.jsonl", vocab_size=10)
    (tmp_path / "strings.jsonl").write_text('[1, 2]\n[3]\n["a"]\n')
    with pytest.raises(DataError, match=r"strings\.jsonl:3: expected a JSON array of integer"):
        load_dataset(tmp_path / "strings.jsonl", vocab_size=10)


def test_token_ids_beyond_vocab_name_the_id_and_the_right_vocab_size(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [[1, 2, 50256], [7, 50256]], IDENTITY)
    with pytest.raises(DataError, match=r"token id 50256 \(line 1\).*--vocab_size is 1000.*--vocab_size 50257"):
        load_dataset(path, vocab_size=1000)


def test_random_batches_are_shifted_windows_and_reproducible(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [list(range(100))])
    ds = load_dataset(path, eot_id=100)  # tokens 0..100: token value == its position
    a = RandomBatches(ds, batch_size=4, seq_len=8, seed=3)
    x, y = a.next()
    assert x.shape == y.shape == (4, 8) and x.dtype == np.int64
    np.testing.assert_array_equal(y, x + 1)
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(8))   # contiguous windows
    assert x.min() >= 0 and y.max() <= 100
    # same seed, same batches; restoring the state continues the sequence exactly
    b = RandomBatches(ds, batch_size=4, seq_len=8, seed=3)
    np.testing.assert_array_equal(b.next()[0], x)
    saved = json.loads(json.dumps(b.state()))   # must survive JSON (it goes in the checkpoint meta)
    expected = [b.next()[0] for _ in range(3)]
    c = RandomBatches(ds, batch_size=4, seq_len=8, seed=999)
    c.set_state(saved)
    assert c.batches_drawn == 1
    for e in expected:
        np.testing.assert_array_equal(c.next()[0], e)
    # every window start is reachable, including the very last one
    starts = np.concatenate([a.next()[0][:, 0] for _ in range(400)])
    assert starts.min() == 0 and starts.max() == 100 - 8


def position_stories(tmp_path, n_stories=60, seed=0):
    """A plain .jsonl of short stories whose every token is its position + 1 (end-of-text: 0), loaded; and
    the positions where stories start."""
    rng = np.random.default_rng(seed)
    lines, starts, pos = [], [], 0
    for _ in range(n_stories):
        length = int(rng.integers(1, 30))
        starts.append(pos)
        lines.append(list(range(pos + 1, pos + length + 1)))
        pos += length + 1  # the story, then its end-of-text
    return load_dataset(write_jsonl(tmp_path / "stories.jsonl", lines), eot_id=0), starts


def test_story_starts_windows_start_right_after_end_of_text_and_resume_exactly(tmp_path, monkeypatch):
    ds, story_starts = position_stories(tmp_path)
    seq_len = 8
    fits = [p for p in story_starts if p < len(ds) - seq_len]  # the last stories leave no whole window
    monkeypatch.setattr(data_loader, "SCAN_TOKENS", 7)  # chunks whose edges fall anywhere, on a story's end too
    table = data_loader.find_story_starts(ds, seq_len)
    assert table.dtype == np.uint32 and table.tolist() == fits
    assert data_loader.find_story_starts_plain(ds, seq_len).tolist() == fits
    a = RandomBatches(ds, batch_size=16, seq_len=seq_len, seed=3, story_starts=True)
    assert a.num_windows == len(fits)
    xs = [a.next()[0] for _ in range(200)]
    drawn = np.concatenate([x[:, 0] for x in xs]) - 1  # a window's first token is its position + 1
    assert set(drawn.tolist()) == set(fits)  # every story start, and nothing else
    assert any((x[:, 1:] == 0).any() for x in xs)  # a window may run on into the next story
    # the state continues the sequence exactly, as without the flag
    b = RandomBatches(ds, batch_size=16, seq_len=seq_len, seed=3, story_starts=True)
    np.testing.assert_array_equal(b.next()[0], xs[0])
    saved = json.loads(json.dumps(b.state()))
    expected = [b.next()[0] for _ in range(3)]
    c = RandomBatches(ds, batch_size=16, seq_len=seq_len, seed=999, story_starts=True)
    c.set_state(saved)
    for e in expected:
        np.testing.assert_array_equal(c.next()[0], e)
    # without the flag: the windows of before, anywhere (the same draws from the same generator)
    plain = RandomBatches(ds, batch_size=16, seq_len=seq_len, seed=3)
    starts = np.random.Generator(np.random.PCG64(3)).integers(0, len(ds) - seq_len, size=16)
    np.testing.assert_array_equal(plain.next()[0], np.asarray(ds.tokens)[starts[:, None] + np.arange(seq_len)])


def test_story_starts_follow_end_of_text_not_lines_and_need_its_id(tmp_path):
    # tokenizer.py --max_length splits a story over lines; only its last line ends with end-of-text
    path = write_jsonl(tmp_path / "split.jsonl", [[5, 6], [7, 50256], [8, 50256]], IDENTITY)
    ds = load_dataset(path, vocab_size=50257)
    assert data_loader.find_story_starts(ds, seq_len=1).tolist() == [0, 4]
    assert data_loader.find_story_starts(ds, seq_len=2).tolist() == [0]  # from 4 no window of 3 tokens fits
    unknown = dict(IDENTITY, eot_id=None)
    ds = load_dataset(write_jsonl(tmp_path / "no_eot.jsonl", [[5, 6, 50256]], unknown), vocab_size=50257)
    with pytest.raises(DataError, match="end-of-text id is unknown.*--story_starts"):
        RandomBatches(ds, batch_size=2, seq_len=1, story_starts=True)


def test_eval_batches_cover_every_token_once(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [list(range(50))])
    ds = load_dataset(path, eot_id=50)   # 51 tokens: 0..50
    xs, ys = zip(*eval_batches(ds, batch_size=2, seq_len=5))
    assert [x.shape[0] for x in xs] == [2, 2, 2, 2, 2]   # (51 - 1) // 5 = 10 windows
    targets = np.concatenate([y.ravel() for y in ys])
    np.testing.assert_array_equal(targets, np.arange(1, 51))
    for x, y in zip(xs, ys):
        np.testing.assert_array_equal(y, x + 1)
    # capped: evenly spread windows from the start to the end of the set, still deterministic
    capped = [y for _, y in eval_batches(ds, batch_size=2, seq_len=5, max_batches=2)]
    assert len(capped) == 2
    firsts = np.concatenate([y[:, 0] for y in capped])
    assert firsts[0] == 1 and firsts[-1] == 46
    again = [y for _, y in eval_batches(ds, batch_size=2, seq_len=5, max_batches=2)]
    np.testing.assert_array_equal(np.concatenate(capped), np.concatenate(again))


def test_a_set_shorter_than_one_window_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [[1, 2, 3]])
    ds = load_dataset(path, eot_id=4)
    with pytest.raises(DataError, match="fewer than one window.*--seq_len"):
        list(eval_batches(ds, batch_size=2, seq_len=8))
    with pytest.raises(DataError, match="fewer than one window"):
        RandomBatches(ds, batch_size=2, seq_len=8)


def test_different_tokenizers_are_detected(tmp_path):
    a = load_dataset(write_jsonl(tmp_path / "a.jsonl", [[1, 50256]], IDENTITY), vocab_size=50257)
    bpe = {"type": "lecture2_bpe", "name": "bpe.json", "n_vocab": 50257, "eot_id": 50256,
           "sha256": "ab" * 32, "model_file": "bpe.json"}
    b = load_dataset(write_jsonl(tmp_path / "b.jsonl", [[1, 50256]], bpe), vocab_size=50257)
    plain = load_dataset(write_jsonl(tmp_path / "c.jsonl", [[1]]), vocab_size=50257)
    check_same_tokenizer(a, a)
    check_same_tokenizer(a, plain)   # unknown tokenizer: cannot tell, allowed
    with pytest.raises(DataError, match="tokenized differently"):
        check_same_tokenizer(a, b)


def test_command_line_converts_and_reports(tmp_path, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", [[1, 2, 50256]], IDENTITY)
    assert data_loader.main([path, "--vocab_size", "50257"]) == 0
    assert "3 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        data_loader.main([str(tmp_path / "nope.jsonl")])
    assert e.value.code == 1 and "not found" in capsys.readouterr().err
