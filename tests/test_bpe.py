"""bpe.py and pretokens.py: the fast trainer against the plain reference trainer, streaming counts against
counting the whole text, the model file, and its checks."""
import json
import random
from collections import Counter
from pathlib import Path

import pytest

import bpe as B
import gpt2_files as G
import pretokens as P
import tokenizer as T
from errors import TokenizerError
from helpers import plain_counts

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
TRAIN_TEXT = (SAMPLE / "TinyStoriesV2-GPT4-train.sample.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe_model():
    return B.train_bpe(TRAIN_TEXT[:300_000], 1000)


# ---------------------------------------------------------------- BPE training

def test_fast_trainer_gives_the_reference_merges():
    text = TRAIN_TEXT[:40_000] + "\nzz zz zz yy yy yy ab ab ba ba\n"  # adds exact count ties
    fast = B.train_bpe(text, 420)
    ref = B.train_bpe_reference(text, 420)
    assert fast.merges == ref.merges and fast.vocab == ref.vocab and fast.specials == ref.specials
    assert fast.vocab_size == 420 and fast.specials == {"<|endoftext|>": 419}


def test_training_is_deterministic_and_the_json_round_trips(bpe_model):
    again = B.train_bpe(TRAIN_TEXT[:300_000], 1000)
    assert again.to_json() == bpe_model.to_json()
    loaded = B.BPEModel.from_json(bpe_model.to_json(), "x.json")
    assert loaded.merges == bpe_model.merges and loaded.vocab == bpe_model.vocab
    d = json.loads(bpe_model.to_json())
    assert d["format"] == B.BPE_FORMAT and d["version"] == 1 and d["vocab_size"] == 1000
    assert len(d["merges"]) == 1000 - 256 - 1 and d["vocab"][999] is None
    assert bytes(d["vocab"][256]) == bytes(d["vocab"][d["merges"][0][0]]) + bytes(d["vocab"][d["merges"][0][1]])


def test_pieces_never_span_a_block_cut():
    # the claim read_blocks rests on: cut before a newline that follows printable ASCII, count the two
    # sides apart, and the counts are those of the whole text (whitespace runs, specials, contractions)
    alphabet = [" ", "\n", "\n\n", "\t", "\r", "  ", "a", "Z", "1", ".", "'", "s", "ll", "'s", "é", "\xa0",
                "\u3000", "\u2028", "\x0b", "\x85", "<|endoftext|>", "🎉", '"', "”"]
    rng = random.Random(0)
    cuts = 0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        raw, whole = text.encode(), plain_counts(text)
        for i in range(1, len(raw)):
            if P.last_cut(raw[:i + 1]) == i:
                cuts += 1
                assert P.count_pretokens(raw[:i].decode()) + P.count_pretokens(raw[i:].decode()) == whole, text
    assert cuts > 1000


def test_counting_distinct_words_first_gives_the_counts_of_findall():
    alphabet = [" ", "  ", "\n", " \n", "\t", "\r", "a", "Z", "1", ".", "'", "s", "'ll", "é", "\xa0", "\u3000",
                "\x0b", "\x1c", "\x85", "🎉", "”", "\x00", "<|endoftext|>"]
    rng = random.Random(1)
    for _ in range(2000):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(3)]
        counter = P.PieceCounter()
        for text in texts:
            counter.add(text)
        assert counter.counts() == sum((plain_counts(t) for t in texts), Counter()), texts
    text = TRAIN_TEXT[:200_000]  # trailing spaces before newlines: the marked-space path
    assert P.count_pretokens(text) == plain_counts(text)


@pytest.mark.parametrize("layout", ["raw", "lines"])
def test_counting_a_file_in_blocks_on_two_workers_gives_the_whole_text_counts(tmp_path, layout):
    text = TRAIN_TEXT if layout == "raw" else "\n".join(" ".join(s.split()) for s in TRAIN_TEXT.split("<|endoftext|>"))
    path = tmp_path / "in.txt"
    path.write_text(text, encoding="utf-8")
    blocks = list(P.read_blocks(path, 10_000))
    assert len(blocks) > 100 and b"".join(b for b, _ in blocks) == path.read_bytes()
    assert P.count_pretokens_file(path, workers=2, block_bytes=10_000) == plain_counts(text)
    assert P.count_pretokens_file(path, workers=1, block_bytes=400_000) == plain_counts(text)  # 128 KB slices


def test_training_on_a_file_gives_the_model_of_training_on_its_text(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text(TRAIN_TEXT[:300_000], encoding="utf-8")
    model = B.train_bpe_file(path, 1000, workers=2)
    assert model.to_json() == B.train_bpe(TRAIN_TEXT[:300_000], 1000).to_json()


def test_special_token_is_never_merged_across():
    text = "<|endoftext|>".join(["the cat sat on the mat"] * 200) + "<|endoftext|>"
    model = B.train_bpe(text, 300)
    assert all(b"<|" not in v and b"|>" not in v for v in model.vocab if v is not None)
    ids = B.encode_reference(model, "the cat<|endoftext|>the mat")
    assert ids.count(model.specials["<|endoftext|>"]) == 1
    assert B.ReferenceEncoding(model).decode(ids) == "the cat<|endoftext|>the mat"


def test_train_4096_on_the_v2_sample_revisits_only_the_pieces_a_merge_changes(monkeypatch):
    # what makes it fast, counted rather than timed: each merge rewrites only the distinct pieces that
    # hold its pair (the naive trainer rewrites every piece for every merge: 3,839 x 5,322 here)
    rewrites, merge_word = [0], B._merge_word

    def counted(*args):
        rewrites[0] += 1
        return merge_word(*args)
    monkeypatch.setattr(B, "_merge_word", counted)
    model = B.train_bpe(TRAIN_TEXT, 4096)
    assert model.vocab_size == 4096 and len(model.merges) == 4096 - 257
    naive = len(model.merges) * model.training["num_unique_pieces"]
    assert rewrites[0] < naive / 100, f"{rewrites[0]} pieces rewritten for {len(model.merges)} merges"


def test_inconsistent_or_newer_model_files_are_refused(bpe_model):
    d = json.loads(bpe_model.to_json())
    d["merges"][5] = [1, 2]
    with pytest.raises(TokenizerError, match=r"m.json: merge \(1, 2\) -> 261 does not match"):
        B.BPEModel.from_json(json.dumps(d), "m.json")
    d = json.loads(bpe_model.to_json())
    d["version"] = 2
    with pytest.raises(TokenizerError, match="version 2.*update tokenizer.py"):
        B.BPEModel.from_json(json.dumps(d), "m.json")
    d = json.loads(bpe_model.to_json())
    d["vocab"][65] = [66]
    with pytest.raises(TokenizerError, match="256 single bytes"):
        B.BPEModel.from_json(json.dumps(d), "m.json")


@pytest.mark.parametrize("case", ["huge_byte_list", "bool_byte", "infinity", "specials_list", "deep", "vocab_size",
                                  "pattern", "huge_vocab_json_id", "bool_vocab_json_id", "too_big_file"])
def test_untrusted_values_are_checked_before_anything_is_allocated(tmp_path, bpe_model, case):
    # before the checks: bytes(10**13) or [None] * 10**13 raised MemoryError (10**10 allocated 10 GB)
    d = json.loads(bpe_model.to_json())
    path = tmp_path / "m.json"
    want = "is not a numpy-gpt BPE model"
    if case == "huge_byte_list":
        d["vocab"][300] = 10**13
    elif case == "bool_byte":
        d["vocab"][300] = [True, 2]
    elif case == "infinity":
        d["merges"][3] = [float("inf"), 5]
    elif case == "specials_list":
        d["special_tokens"] = [["<|endoftext|>", 999]]
    elif case == "vocab_size":
        d["vocab_size"] = 10**13
    elif case == "pattern":
        d["pattern"] = "(unclosed"
        want = "the pattern is not a regular expression"
    text = json.dumps(d) if case != "deep" else "[" * 200_000
    if case.endswith("vocab_json_id"):
        path = tmp_path / "vocab.json"
        text = json.dumps({**{G.bytes_to_unicode()[i]: i for i in range(256)},
                           "<|endoftext|>": 10**13 if case.startswith("huge") else True})
        (tmp_path / "merges.txt").write_text("#version: 0.2\n")
        want = "is not a vocab.json"
    path.write_text(text)
    if case == "too_big_file":
        with open(path, "r+b") as f:
            f.truncate(B.MAX_MODEL_BYTES + 1)  # sparse: takes no disk
        want = "more than a BPE model file can be"
    with pytest.raises(TokenizerError, match=want) as e:
        T.read_model_file(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
