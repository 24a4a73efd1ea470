"""tokenizer.py: GPT-2 offline, our byte-level BPE in tiktoken's engine against bpe.py's reference encoder,
the file tokenizer's output and sidecar, and clear CLI errors. (Training and the model file: test_bpe.py.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bpe as B
import gpt2_files as G
import pretokens as P
import tokenizer as T
from errors import TokenizerError

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
TRAIN_TEXT = (SAMPLE / "TinyStoriesV2-GPT4-train.sample.txt").read_text(encoding="utf-8")
VALID_TEXT = (SAMPLE / "TinyStories-valid.sample.txt").read_text(encoding="utf-8")
TRICKY = ["héllo wörld, naïve café", "emoji 🎉🙂‍↔️ and 👩‍👩‍👧 family", "日本語のテキスト", "tabs\tand\r\nCRLF\n\n\n",
          "   leading and trailing   ", "numbers 12345 3.14159 and 1,000,000", "it's we'll they've I'd you're",
          "a<|endoftext|>b", "<|endoftext|><|endoftext|>", "x" * 300, "", "e\u0301 combining", "\x00\x01 control"]


@pytest.fixture(scope="module")
def bpe_model():
    return B.train_bpe(TRAIN_TEXT[:300_000], 1000)


@pytest.fixture(scope="module")
def bpe(bpe_model):
    return T.BPETokenizer(bpe_model, bpe_model.to_json())


# ---------------------------------------------------------------- tiktoken gpt2, offline

def test_gpt2_from_the_bundled_ranks_matches_tiktoken_gpt2(capsys):
    tok = T.get_tokenizer("tiktoken", encoding="gpt2")
    assert "tiktoken gpt2 from" in capsys.readouterr().err
    assert tok.n_vocab == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Once upon a time") == [4874, 2402, 257, 640]
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.encode_ordinary("<|endoftext|>") != [50256]
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    ident = tok.identity()
    assert ident == {"type": "tiktoken", "name": "gpt2", "n_vocab": 50257, "eot_id": 50256,
                     "sha256": T.R50K_SHA256, "model_file": None}
    assert tok.model_json() is None
    assert T.tokenizer_from_identity(ident).encode("Hello world") == [15496, 995]


def test_gpt2_bundle_with_a_wrong_hash_is_refused(tmp_path):
    bad = tmp_path / "r50k_base.tiktoken"
    data = bytearray((SAMPLE / "r50k_base.tiktoken").read_bytes())
    data[10] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(TokenizerError, match="restore"):
        G.r50k_ranks(bad)


# ---------------------------------------------------------------- BPE encoding

def test_tiktoken_engine_gives_the_reference_ids(bpe, bpe_model):
    assert isinstance(bpe._enc, T.tiktoken.Encoding)
    text = VALID_TEXT[:120_000]
    assert bpe.encode(text) == B.encode_reference(bpe_model, text)
    for t in TRICKY:
        assert bpe.encode(t) == B.encode_reference(bpe_model, t), t
        assert bpe.encode_ordinary(t) == B.encode_reference(bpe_model, t, allow_special=False), t


def test_decode_round_trips_any_text(bpe):
    for t in TRICKY + [VALID_TEXT[:20_000]]:
        assert bpe.decode(bpe.encode(t)) == t
        assert bpe.decode(bpe.encode_ordinary(t)) == t
    assert len(bpe.encode(" the")) == 1  # a merged token, not bytes


def test_identity_and_rebuilding_from_the_embedded_json(bpe, tmp_path):
    path = tmp_path / "bpe.json"
    path.write_text(bpe.model_json(), encoding="utf-8")
    tok = T.get_tokenizer("lecture2_bpe", model_file=str(path), verbose=False)
    ident = tok.identity()
    assert ident["type"] == "bpe" and ident["n_vocab"] == 1000 and ident["eot_id"] == 999
    assert ident["model_file"] == str(path) and len(ident["sha256"]) == 64
    assert tok.model_json() == path.read_text(encoding="utf-8")
    # files written before "lecture2_bpe" became "bpe" name the same tokenizer
    old = dict(ident, type="lecture2_bpe")
    assert T.same_tokenizer(old, ident) and not T.same_tokenizer(dict(ident, type="tiktoken"), ident)
    assert T.tokenizer_from_identity(old, tok.model_json()).identity() == ident
    os.unlink(path)  # the checkpoint's embedded copy is enough
    again = T.tokenizer_from_identity(ident, tok.model_json())
    assert again.encode("Once upon a time") == tok.encode("Once upon a time")
    with pytest.raises(TokenizerError, match="sha256"):
        T.tokenizer_from_identity(ident, tok.model_json().replace('"version": 1', '"version":  1'))
    with pytest.raises(TokenizerError, match="cannot read BPE model"):
        T.tokenizer_from_identity(ident)


def test_vocab_json_and_merges_txt_load_as_the_same_tokenizer(bpe, bpe_model, tmp_path):
    b2u = G.bytes_to_unicode()
    s = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {s(v): i for i, v in enumerate(bpe_model.vocab) if v is not None}
    vocab["<|endoftext|>"] = bpe.eot_id
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(
        f"{s(bpe_model.vocab[a])} {s(bpe_model.vocab[b])}\n" for a, b in bpe_model.merges), encoding="utf-8")
    tok = T.get_tokenizer("lecture2_bpe", model_file=str(tmp_path / "vocab.json"), verbose=False)
    assert tok.n_vocab == bpe.n_vocab and tok.eot_id == bpe.eot_id
    text = VALID_TEXT[:30_000] + TRICKY[1]
    assert tok.encode(text) == bpe.encode(text)


def test_ranks_that_tiktoken_cannot_follow_use_the_reference_encoder():
    # merges in an order where ids do not grow with rank: b+c (id 257) is applied before a+b (id 256)
    vocab = [bytes([i]) for i in range(256)] + [b"ab", b"bc", None]
    model = B.BPEModel(vocab, [(98, 99), (97, 98)], {"<|endoftext|>": 258}, merge_ids=[257, 256])
    assert model.tiktoken_ranks() is None
    tok = T.BPETokenizer(model, model.to_json())
    assert tok.encode("abc") == B.encode_reference(model, "abc") == [97, 257]
    assert tok.decode(tok.encode("abc<|endoftext|>")) == "abc<|endoftext|>"


# ---------------------------------------------------------------- tokenizing files

def _stories(n=300):
    return [" ".join(s.split()) for s in TRAIN_TEXT.split("<|endoftext|>") if s.strip()][:n]


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_cli_tokenizes_one_story_per_line_with_chunks_and_sidecar(tmp_path, capsys):
    stories = _stories()
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(stories) + "\n\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert T.main([str(inp), str(out), "--tokenizer", "tiktoken", "--encoding", "gpt2", "--max_length", "64",
                   "--quiet"]) == 0
    assert "MB/s" in capsys.readouterr().err
    rows = _read_jsonl(out)
    assert all(1 <= len(r) <= 64 for r in rows)
    tok = T.get_tokenizer("tiktoken", verbose=False)
    # chunks concatenate back to each story + end-of-text; only a story's last chunk ends with it
    flat = [i for r in rows for i in r]
    docs = tok.decode(flat).split("<|endoftext|>")
    assert docs[:-1] == stories and docs[-1] == ""
    assert sum(r[-1] == 50256 for r in rows) == len(stories) == flat.count(50256)
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert meta["format"] == "numpy-gpt tokenized jsonl" and meta["version"] == 1
    assert meta["tokenizer"] == tok.identity()
    assert meta["num_documents"] == len(stories) and meta["num_lines"] == len(rows)
    assert meta["num_tokens"] == len(flat) and meta["eot_appended"] is True and meta["max_length"] == 64
    assert meta["num_bytes"] == sum(len(s.encode()) for s in stories)
    mask = os.umask(0)
    os.umask(mask)
    for p in (out, tmp_path / "out.jsonl.meta.json"):  # not mkstemp's 0600
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~mask


def test_all_cores_give_the_same_file_as_one(tmp_path, bpe):
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(_stories(400)) + "\n", encoding="utf-8")
    T.tokenize_file(bpe, str(inp), str(tmp_path / "one.jsonl"), 128, workers=1, batch_bytes=10_000, progress=False)
    _, st = T.tokenize_file(bpe, str(inp), str(tmp_path / "many.jsonl"), 128, workers=2, batch_bytes=10_000,
                            progress=False)
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "many.jsonl").read_bytes()
    assert st["workers"] == 2 and st["docs"] == 400


def test_raw_layout_appends_end_of_text_once_per_story_not_per_paragraph(tmp_path):
    raw = (SAMPLE / "TinyStoriesV2-GPT4-train.sample.txt").read_bytes()
    cut = raw.index(b"<|endoftext|>\n") + len(b"<|endoftext|>\n")
    first = raw[:cut - len(b"<|endoftext|>\n")].decode().strip()  # five paragraphs, one story
    tok = T.get_tokenizer("tiktoken", verbose=False)
    for size, docs in [(cut, [first]), (1200, [first, raw[cut:1200].decode().strip()])]:
        # the first 1,200 bytes: the first story, its separator, the cut start of the second (8 lines)
        inp = tmp_path / f"raw{size}.txt"
        inp.write_bytes(raw[:size])
        assert T.detect_layout(inp) == "raw"
        out = tmp_path / f"raw{size}.jsonl"
        assert T.main([str(inp), str(out), "--max_length", "0", "--quiet"]) == 0
        rows = _read_jsonl(out)
        assert [tok.decode(r) for r in rows] == [d + "<|endoftext|>" for d in docs]
        assert sum(r.count(tok.eot_id) for r in rows) == len(docs)
        assert json.loads((tmp_path / f"raw{size}.jsonl.meta.json").read_text())["num_documents"] == len(docs)
    assert "\n" in first  # the paragraphs stay inside the story


def test_raw_layout_over_many_batches_and_workers_gives_every_story_once(tmp_path, bpe):
    path = SAMPLE / "TinyStoriesV2-GPT4-train.sample.txt"
    stories = [s.strip() for s in TRAIN_TEXT.split("<|endoftext|>") if s.strip()]
    T.tokenize_file(bpe, path, str(tmp_path / "one.jsonl"), 0, workers=1, progress=False)
    _, st = T.tokenize_file(bpe, path, str(tmp_path / "many.jsonl"), 0, workers=2, batch_bytes=5_000,
                            progress=False)
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "many.jsonl").read_bytes()
    assert st["layout"] == "raw" and st["docs"] == len(stories) > 1000
    assert [bpe.decode(r[:-1]) for r in _read_jsonl(tmp_path / "many.jsonl")] == stories


def test_one_story_per_line_is_detected_and_a_late_separator_is_an_error(tmp_path, capsys, bpe):
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(_stories(20)) + "\n", encoding="utf-8")
    assert T.detect_layout(inp) == "lines"
    inp.write_text("\n".join(_stories(20)) + "\n<|endoftext|>\nOne more.\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="line 21: an <\\|endoftext\\|> separator line"):
        T.tokenize_file(bpe, inp, str(tmp_path / "o.jsonl"), layout="lines", progress=False)
    assert not (tmp_path / "o.jsonl").exists()


def test_workers_are_forked_only_while_no_other_thread_runs(tmp_path):
    # fork with a running thread can deadlock (Python 3.12 warns). The pool starts before the bar (whose
    # tqdm monitor thread lives on), and a later call, with that thread running, starts fresh workers.
    # In a subprocess: the test process has threads of its own.
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(_stories(400)) + "\n", encoding="utf-8")
    script = f"""
import os, sys, threading
sys.path.insert(0, {str(Path(T.__file__).parent)!r})
import pretokens, tokenizer
seen, real_fork = [], os.fork
def fork():
    seen.append(threading.active_count())
    return real_fork()
os.fork = fork
if __name__ == "__main__":
    tok = tokenizer.get_tokenizer("tiktoken", verbose=False)
    for out in ("a.jsonl", "b.jsonl"):
        tokenizer.tokenize_file(tok, "in.txt", out, workers=2, batch_bytes=10_000, progress=True)
    print(seen, pretokens.count_pretokens_file("in.txt", workers=2, block_bytes=10_000, progress=True)[" the"])
"""
    (tmp_path / "run.py").write_text(script)
    r = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[1,", "1]", str(P.count_pretokens(inp.read_text())[" the"])]
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_cli_trains_a_bpe_and_tokenizes_with_it(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(_stories(200)) + "\n", encoding="utf-8")
    model = tmp_path / "bpe.json"
    assert T.main(["--train_bpe", "--vocab_size", "600", str(inp), "--model_file", str(model), "--quiet"]) == 0
    out = tmp_path / "o.jsonl"
    assert T.main([str(inp), str(out), "--tokenizer", "lecture2_bpe", "--model_file", str(model),
                   "--max_length", "512", "--quiet"]) == 0
    meta = json.loads((tmp_path / "o.jsonl.meta.json").read_text())
    assert meta["tokenizer"]["type"] == "bpe" and meta["tokenizer"]["n_vocab"] == 600
    assert max(i for r in _read_jsonl(out) for i in r) == 599  # the end-of-text id


def test_loader_reads_the_output(tmp_path):
    data_loader = pytest.importorskip("data_loader")
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(_stories(50)) + "\n", encoding="utf-8")
    assert T.main([str(inp), str(tmp_path / "t.jsonl"), "--quiet"]) == 0
    ds = data_loader.load_dataset(str(tmp_path / "t.jsonl"))
    assert ds.tokenizer["name"] == "gpt2"


# ---------------------------------------------------------------- bad input: clear errors, no traceback

@pytest.mark.parametrize("case", ["empty", "blank", "utf8", "utf8_train", "empty_train", "not_bpe", "small_vocab",
                                  "missing", "no_model"])
def test_bad_input_gives_a_clear_error(tmp_path, capsys, case):
    inp = tmp_path / "in.txt"
    inp.write_text("Once upon a time.\nThe end.\n", encoding="utf-8")
    out = str(tmp_path / "o.jsonl")
    if case == "empty":
        inp.write_bytes(b"")
        args, want = [str(inp), out], "is empty"
    elif case == "blank":
        inp.write_text("\n  \n\n")
        args, want = [str(inp), out], "no stories"
    elif case == "utf8":
        inp.write_bytes(b"good line\nanother\nbad \xff byte\n")
        args, want = [str(inp), out], "line 3: not valid UTF-8"
    elif case == "utf8_train":
        inp.write_bytes(b"good line\nanother\nbad \xff byte\n")
        args, want = ["--train_bpe", "--vocab_size", "300", str(inp), "--model_file", out], "line 3: not valid UTF-8"
    elif case == "empty_train":
        inp.write_text("\n  \n\n")
        args, want = ["--train_bpe", "--vocab_size", "300", str(inp), "--model_file", out], "is empty: nothing to train"
    elif case == "not_bpe":
        bad = tmp_path / "m.json"
        bad.write_text('{"hello": "world"}')
        args, want = [str(inp), out, "--tokenizer", "lecture2_bpe", "--model_file", str(bad)], "is not a numpy-gpt BPE"
    elif case == "small_vocab":
        args, want = ["--train_bpe", "--vocab_size", "200", str(inp), "--model_file", str(tmp_path / "m.json")], \
            "an integer from 257 to"
    elif case == "missing":
        args, want = [str(tmp_path / "nope.txt"), out], "input file not found"
    else:
        args, want = [str(inp), out, "--tokenizer", "lecture2_bpe", "--model_file", str(tmp_path / "x.json")], \
            "cannot read BPE model"
    assert T.main(args + ["--quiet"]) == 1
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err
    assert not os.path.exists(out) and not os.path.exists(out + ".meta.json")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_gpt2_never_waits_on_the_network_when_tiktoken_has_no_cache(tmp_path, monkeypatch, capsys):
    import requests

    def no_network(*a, **k):
        raise requests.ConnectionError("tried to download")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(T.tiktoken.registry, "ENCODINGS", {})
    tok = T.load_tiktoken("gpt2")
    err = capsys.readouterr().err
    assert "bundled r50k_base.tiktoken" in err and "tried to download" not in err
    assert tok.encode("Hello world") == [15496, 995]
    monkeypatch.setattr(T.tiktoken.registry, "ENCODINGS", {})
    tok = T.load_tiktoken("gpt2", allow_download=True)  # asked to try: the failure falls back too
    assert "tried to download" in capsys.readouterr().err and tok.n_vocab == 50257


@pytest.mark.parametrize("layout", ["json", "vocab_merges"])
def test_truncated_or_corrupted_model_files_give_a_one_line_error(tmp_path, capsys, bpe_model, layout):
    inp = tmp_path / "in.txt"
    inp.write_text("Once upon a time, a cat sat.\nThe end.\n", encoding="utf-8")
    b2u = G.bytes_to_unicode()
    s = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    if layout == "json":
        files = {"m.json": bpe_model.to_json().encode()}
    else:
        vocab = {s(v): i for i, v in enumerate(bpe_model.vocab) if v is not None}
        vocab["<|endoftext|>"] = 999
        files = {"vocab.json": json.dumps(vocab).encode(), "merges.txt": ("#version: 0.2\n" + "".join(
            f"{s(bpe_model.vocab[a])} {s(bpe_model.vocab[b])}\n" for a, b in bpe_model.merges)).encode()}
    model_file = str(tmp_path / next(iter(files)))
    rng = __import__("random").Random(0)
    failed = 0
    for trial in range(120):
        for name, good in files.items():
            (tmp_path / name).write_bytes(good)
        name = rng.choice(sorted(files))
        data = bytearray(files[name])
        if trial % 3 == 0:
            data = data[:rng.randrange(len(data))]  # cut at a random byte
        else:
            for _ in range(rng.randint(1, 4)):  # random bytes flipped
                data[rng.randrange(len(data))] = rng.randrange(256)
        (tmp_path / name).write_bytes(bytes(data))
        rc = T.main([str(inp), str(tmp_path / "o.jsonl"), "--tokenizer", "lecture2_bpe", "--model_file", model_file,
                     "--workers", "1", "--quiet"])
        err = capsys.readouterr().err
        if rc != 0:  # some changes leave a valid model (a digit in the training notes): those may load
            failed += 1
            assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
            assert str(tmp_path / name) in err or (name == "merges.txt" and model_file in err), err
    assert failed > 100


def test_a_pattern_that_only_tiktoken_refuses_is_a_clear_error(tmp_path, capsys, bpe_model):
    d = json.loads(bpe_model.to_json())
    d["pattern"] = r"\X|\s"  # Python's regex takes \X (a grapheme), tiktoken's engine does not
    path = tmp_path / "m.json"
    path.write_text(json.dumps(d))
    inp = tmp_path / "in.txt"
    inp.write_text("Once upon a time.\n")
    assert T.main([str(inp), str(tmp_path / "o.jsonl"), "--tokenizer", "lecture2_bpe", "--model_file", str(path),
                   "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: tiktoken cannot use this model (") and err.count("\n") == 1, err
