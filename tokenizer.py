"""[command; data & text] Tokenizers for numpy-gpt: GPT-2's BPE through tiktoken (works offline) and our own byte-level BPE.

Tokenize a text file:

    python3 tokenizer.py data/tinystories_train_sample.txt data/train_tokenized.jsonl \\
        --tokenizer tiktoken --encoding gpt2 --max_length 512

Two layouts are read, told apart by looking for <|endoftext|> lines in the first MB (no flag):
one story per line (what prepare_tinystories.py writes), or the raw TinyStories layout where a
story spans several lines and stories are separated by lines holding only <|endoftext|> (the
official .txt downloads, data/sample/TinyStoriesV2-GPT4-train.sample.txt). A raw story keeps its
paragraph breaks; its end-of-text id is appended once, after its last paragraph.

Train our own byte-level BPE, then tokenize with it:

    python3 tokenizer.py --train_bpe --vocab_size 4096 data/tinystories_train_sample.txt --model_file bpe4096.json
    python3 tokenizer.py data/tinystories_train_sample.txt data/train_tokenized.jsonl \\
        --tokenizer bpe --model_file bpe4096.json --max_length 512

`--tokenizer lecture2_bpe`, the guide's name for it, is the same as `--tokenizer bpe`. A GPT-2 style
pair (`--model_file vocab.json`, with `merges.txt` beside it or `--merges_file`) loads as bpe too.

Output `X.jsonl`: one JSON array of token ids per line. Every story gets the end-of-text id
appended; a story longer than --max_length is split into consecutive chunks (never truncated),
so only its last chunk ends with end-of-text. The sidecar `X.jsonl.meta.json` records which
tokenizer made the file (its identity: train.py refuses train/val data from different tokenizers).

From Python:

    from tokenizer import get_tokenizer, tokenizer_from_identity
    tok = get_tokenizer("tiktoken", encoding="gpt2")
    tok = get_tokenizer("bpe", model_file="bpe4096.json")
    ids = tok.encode("Once upon a time"); text = tok.decode(ids)

Our BPE itself (the model file, training, the reference encoder) is in bpe.py, the pre-token
counting it trains on in pretokens.py, GPT-2's files in gpt2_files.py; here a model runs in
tiktoken's engine built from its ranks (BPETokenizer).
"""
import argparse
import errno
import hashlib
import json
import os
import sys
import time

import regex
import tiktoken

from atomic import atomic_write, refuse_inputs
from bpe import BPE_FORMAT, MAX_MODEL_BYTES, BPEModel, ReferenceEncoding, check_vocab_size, train_bpe_file
from config import FIELD_RANGES
from errors import DataError, TokenizerError, UserError, say
from flag_types import COUNT, COUNT_OR_ZERO, Number, Parser
from gpt2_files import BUNDLED_R50K, R50K_SHA256, gpt2_encoding, in_tiktoken_cache, model_from_vocab_merges
from parallel import cores, start_workers
from pretokens import ENDOFTEXT, MAX_UNCUT_BYTES, PATTERN_PROBE, last_cut
from untrusted import open_regular, parse_json, read_json, regular_file

# The kinds of tokenizer, as flags and identities name them: "lecture2_bpe" is the guide's name for
# our BPE, and the type that files written before it was renamed "bpe" record.
KINDS = {"tiktoken": "tiktoken", "bpe": "bpe", "lecture2_bpe": "bpe"}
SIDECAR_FORMAT = "numpy-gpt tokenized jsonl"
SIDECAR_VERSION = 1
LAYOUTS = {"lines": "one story per line", "raw": "stories separated by <|endoftext|> lines"}
_SEP = ENDOFTEXT.encode()
_SEP_LINE = regex.compile(rb"(?m)^[ \t\r\x0b\x0c]*<\|endoftext\|>[ \t\r\x0b\x0c]*\n")  # strip() == _SEP
_SEP_LINE_LAST = regex.compile(rb"(?r)(?m)^[ \t\r\x0b\x0c]*<\|endoftext\|>[ \t\r\x0b\x0c]*\n")
BOM = b"\xef\xbb\xbf"


def _sha256_text(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Tokenizer objects (the shared interface: name, n_vocab, eot_id, encode, decode, identity, model_json)

class Tokenizer:
    """A tiktoken.Encoding plus what numpy-gpt needs to record about it."""

    type = None

    def __init__(self, enc, name, eot_id, sha256, model_file=None):
        self._enc = enc
        self.name = name
        self.n_vocab = enc.n_vocab
        self.eot_id = eot_id
        self.sha256 = sha256
        self.model_file = model_file

    def encode(self, text):
        """Ids of text; a literal "<|endoftext|>" becomes the end-of-text id."""
        return self._enc.encode(text, allowed_special="all")

    def encode_ordinary(self, text):
        """Ids of text, special-token strings treated as plain text."""
        return self._enc.encode_ordinary(text)

    def decode(self, ids):
        """Text of ids (exact for any ids that came from encode; a cut UTF-8 sequence shows as U+FFFD)."""
        return self._enc.decode(list(ids))

    def decode_bytes(self, ids):
        return self._enc.decode_bytes(list(ids))

    def identity(self):
        """What names this tokenizer in a sidecar and a checkpoint (tokenizer_from_identity rebuilds it)."""
        return {"type": self.type, "name": self.name, "n_vocab": self.n_vocab, "eot_id": self.eot_id,
                "sha256": self.sha256, "model_file": self.model_file}

    def model_json(self):
        return None

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, n_vocab={self.n_vocab}, eot_id={self.eot_id})"


class TiktokenTokenizer(Tokenizer):
    type = "tiktoken"


def load_tiktoken(encoding="gpt2", allow_download=False, verbose=True):
    """A TiktokenTokenizer. For gpt2: tiktoken's own loader when its cache holds the files (or
    allow_download), else the bundled ranks, so the common offline path never waits on the network."""
    note = say if verbose else (lambda m: None)
    if encoding == "gpt2":
        enc, source = None, None
        if "gpt2" in getattr(tiktoken.registry, "ENCODINGS", {}):
            enc, source = tiktoken.get_encoding("gpt2"), "tiktoken (already loaded)"
        elif allow_download or in_tiktoken_cache():
            try:
                enc, source = tiktoken.get_encoding("gpt2"), "tiktoken's cache or download"
            except Exception as e:  # network down, proxy, bad cache: the bundle is the same encoding
                note(f"tokenizer: tiktoken could not load gpt2 ({type(e).__name__}: {e}); using the bundled ranks")
        if enc is None:
            enc, source = gpt2_encoding(), f"bundled {BUNDLED_R50K.name} (sha256 verified)"
        note(f"tokenizer: tiktoken gpt2 from {source}")
        return TiktokenTokenizer(enc, "gpt2", enc.eot_token, R50K_SHA256)
    try:
        enc = tiktoken.get_encoding(encoding)
    except ValueError as e:
        raise TokenizerError(f"unknown tiktoken encoding {encoding!r} ({e}); gpt2 works offline") from None
    except Exception as e:
        raise TokenizerError(f"could not load tiktoken encoding {encoding!r} ({type(e).__name__}: {e}). "
                             "Only gpt2 is bundled for offline use; connect to the network or use --encoding gpt2") from None
    note(f"tokenizer: tiktoken {encoding}")
    eot = enc._special_tokens.get(ENDOFTEXT)
    if eot is None:
        raise TokenizerError(f"tiktoken encoding {encoding!r} has no {ENDOFTEXT} token")
    return TiktokenTokenizer(enc, encoding, eot, None)


class BPETokenizer(Tokenizer):
    type = "bpe"

    def __init__(self, model, json_text, model_file=None, verbose=False):
        self.model = model
        self._json = json_text
        sha = _sha256_text(json_text)
        if ENDOFTEXT not in model.specials:
            raise TokenizerError(f"{model_file or 'BPE model'}: no {ENDOFTEXT} special token; numpy-gpt needs one "
                                 "to separate stories")
        ranks = model.tiktoken_ranks()
        if ranks is not None:
            try:
                enc = tiktoken.Encoding(name=f"bpe-{sha[:12]}", pat_str=model.pattern,
                                        mergeable_ranks=ranks, special_tokens=model.specials,
                                        explicit_n_vocab=model.vocab_size)
            except ValueError as e:  # e.g. a pattern Python's regex accepts and tiktoken's engine does not
                raise TokenizerError(f"{model_file or 'BPE model'}: tiktoken cannot use this model ({e})") from None
            try:  # its engine gives up on heavy backtracking, dropping text: the probe must come back whole
                same = enc.decode(enc.encode_ordinary(PATTERN_PROBE)) == PATTERN_PROBE
            except BaseException as e:  # a Rust panic is a BaseException
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                same = False
            if not same:
                raise TokenizerError(f"{model_file or 'BPE model'}: tiktoken's engine does not give a probe text "
                                     "back whole with this model's pattern: use GPT-2's")
        else:
            if verbose:
                say(f"note: {model_file}: merges cannot run in tiktoken's engine; using the (slower) reference encoder")
            enc = ReferenceEncoding(model)
        super().__init__(enc, f"bpe{model.vocab_size}-{sha[:12]}", model.specials[ENDOFTEXT], sha,
                         os.path.abspath(model_file) if model_file else None)
        self.n_vocab = model.vocab_size

    def model_json(self):
        return self._json


def read_model_file(model_file, merges_file=None):
    """(BPEModel, its JSON text) from our JSON model file, or from a vocab.json with its merges.txt
    (merges_file, or merges.txt beside it); the text is what a checkpoint embeds and the sha256 covers."""
    try:
        with open_regular(model_file, "rb", "BPE model file", MAX_MODEL_BYTES, TokenizerError) as f:
            raw = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read BPE model {model_file}: {e.strerror}. Train one with "
                             "`tokenizer.py --train_bpe --vocab_size 4096 input.txt --model_file FILE`") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(f"{model_file} is not a BPE model (not UTF-8 JSON text)") from None
    pair = merges_file or os.path.join(os.path.dirname(model_file) or ".", "merges.txt")
    looks_like_vocab = text.lstrip().startswith("{") and f'"format": "{BPE_FORMAT}"' not in text[:2000]
    if looks_like_vocab and os.path.exists(pair):
        try:
            is_vocab = all(isinstance(v, int) for v in parse_json(text, model_file).values())
        except (ValueError, AttributeError):
            is_vocab = False
        if is_vocab:
            model = model_from_vocab_merges(model_file, pair)
            return model, model.to_json()
    return BPEModel.from_json(text, model_file), text


def load_bpe(model_file, merges_file=None, verbose=True):
    """A BPETokenizer from our JSON model, or from a vocab.json (+ merges.txt beside it or merges_file)."""
    if not model_file:
        raise TokenizerError("--tokenizer bpe needs --model_file (train one with --train_bpe)")
    if os.path.isdir(model_file):
        model_file = os.path.join(model_file, "vocab.json")
    model, text = read_model_file(model_file, merges_file)
    tok = BPETokenizer(model, text, model_file, verbose)
    if verbose:
        say(f"tokenizer: bpe from {model_file} ({model.vocab_size} tokens)")
    return tok


def tokenizer_kind(name):
    """"tiktoken" or "bpe" for a --tokenizer flag or an identity's type, None for anything else."""
    return KINDS.get(name)


def get_tokenizer(kind="tiktoken", encoding="gpt2", model_file=None, merges_file=None, allow_download=False,
                  verbose=True):
    """The shared entry point: kind "tiktoken" (encoding=...) or "bpe" (model_file=...)."""
    if tokenizer_kind(kind) == "tiktoken":
        return load_tiktoken(encoding, allow_download, verbose)
    if tokenizer_kind(kind) == "bpe":
        return load_bpe(model_file, merges_file, verbose)
    raise TokenizerError(f"unknown tokenizer {kind!r}: use tiktoken or bpe")


def tokenizer_from_identity(identity, model_json=None, verbose=False):
    """Rebuild the tokenizer an identity dict names (from model_json when given; sha256 checked)."""
    if not identity or "type" not in identity:
        raise TokenizerError(f"not a tokenizer identity: {identity!r}")
    kind = tokenizer_kind(identity["type"])
    if kind == "tiktoken":
        tok = load_tiktoken(identity.get("name", "gpt2"), verbose=verbose)
    elif kind == "bpe":
        if model_json is not None:
            if identity.get("sha256") and _sha256_text(model_json) != identity["sha256"]:
                raise TokenizerError("the embedded BPE model does not match the tokenizer's sha256 (file corrupted?)")
            model = BPEModel.from_json(model_json, "embedded BPE model")
            tok = BPETokenizer(model, model_json, identity.get("model_file"))
        else:
            tok = load_bpe(identity.get("model_file"), verbose=verbose)
            if identity.get("sha256") and tok.sha256 != identity["sha256"]:
                raise TokenizerError(f"{identity.get('model_file')} has changed since the data was tokenized "
                                     f"(sha256 {tok.sha256[:12]} != {identity['sha256'][:12]}); use the original "
                                     "model file or re-tokenize")
    else:
        raise TokenizerError(f"unknown tokenizer type {identity['type']!r}")
    if identity.get("n_vocab") not in (None, tok.n_vocab):
        raise TokenizerError(f"tokenizer {tok.name} has {tok.n_vocab} tokens, the identity says {identity['n_vocab']}")
    return tok


def same_tokenizer(a, b):
    """True when two identity dicts name the same tokenizer (None = unknown = compatible)."""
    if a is None or b is None:
        return True
    return tokenizer_kind(a.get("type")) == tokenizer_kind(b.get("type")) and \
        all(a.get(k) == b.get(k) for k in ("name", "n_vocab", "eot_id", "sha256"))


# ----------------------------------------------------------------------------------------------
# The sidecar X.jsonl.meta.json: which tokenizer made X.jsonl, and what is in it

def sidecar_path(jsonl_path):
    return str(jsonl_path) + ".meta.json"


def read_sidecar(jsonl_path):
    """The sidecar dict of jsonl_path (its "tokenizer": the identity), or None for a plain .jsonl."""
    path = sidecar_path(jsonl_path)
    if not os.path.exists(path):
        return None
    try:
        meta = read_json(path, "tokenizer sidecar", error=DataError, hint="; re-run tokenizer.py or delete it")
    except OSError as e:
        raise DataError(f"{path}: cannot read tokenizer sidecar ({e.strerror}); re-run tokenizer.py or delete "
                        "it") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{path}: not a numpy-gpt tokenized-jsonl sidecar (format={found!r})")
    if meta.get("version") != SIDECAR_VERSION:
        raise DataError(f"{path}: tokenizer sidecar version {meta.get('version')!r}, but this code reads version "
                        f"{SIDECAR_VERSION}; update numpy-gpt (git pull) or re-run tokenizer.py")
    tok = meta.get("tokenizer")
    ok = tok is None or (isinstance(tok, dict) and all(
        tok.get(k) is None or (type(tok[k]) is int and 0 <= tok[k] < 2**32) for k in ("n_vocab", "eot_id")))
    for key in ("num_documents", "num_tokens", "num_bytes"):
        ok = ok and (meta.get(key) is None or (type(meta[key]) is int and meta[key] >= 0))
    if not ok:
        raise DataError(f"{path}: damaged tokenizer sidecar (a field has the wrong type or range); "
                        "re-run tokenizer.py to write it again")
    return meta


def write_sidecar(jsonl_path, identity, **facts):
    """Write jsonl_path's sidecar (atomically): the tokenizer's identity and facts about the file."""
    record = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "tokenizer": identity, **facts}
    with atomic_write(sidecar_path(jsonl_path), "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=1) + "\n")
    return record


# ----------------------------------------------------------------------------------------------
# Tokenizing a file (all cores) and training from the CLI

_WORKER = {}


def _worker_init(identity, model_json):
    _WORKER["tok"] = tokenizer_from_identity(identity, model_json)


def detect_layout(path, probe_bytes=1 << 20):
    """The layout of a text file: "raw" when a line of its first MB is <|endoftext|> alone, else "lines".

    lines: one story per line (what prepare_tinystories.py writes); blank lines are skipped.
    raw:   a story spans several lines and stories are separated by <|endoftext|> lines (the official
           TinyStories .txt files and data/sample/TinyStoriesV2-GPT4-train.sample.txt).
    """
    with open_regular(path, "rb", "text file", error=TokenizerError) as f:
        head = f.read(probe_bytes).removeprefix(BOM)
    if len(head) == probe_bytes:
        head = head[:head.rfind(b"\n") + 1]  # whole lines only
    return "raw" if any(line.strip() == _SEP for line in head.split(b"\n")) else "lines"


def _stories(text, layout, path, first_line):
    """The stories of a batch of whole lines: each line (lines), or the lines between separators (raw)."""
    lines = text.split("\n")
    if layout == "lines":
        for k, line in enumerate(lines):
            line = line.strip()
            if line == ENDOFTEXT:
                raise TokenizerError(f"{path} line {first_line + k}: an {ENDOFTEXT} separator line, but the file's "
                                     "first MB has none, so it was read as one story per line. Put the stories "
                                     "one per line (prepare_tinystories.py) or separate all of them this way")
            if line:
                yield line
        return
    story = []
    for line in lines:
        if line.strip() == ENDOFTEXT:
            text = "\n".join(story).strip()  # a story keeps its paragraphs (newlines) inside
            if text:
                yield text
            story = []
        else:
            story.append(line)
    text = "\n".join(story).strip()
    if text:
        yield text


def _encode_batch(job):
    """(raw bytes, first line number, path, max_length, layout, part) -> (jsonl text, stories, chunks, tokens,
    story bytes, raw bytes). Runs in the worker processes, so decoding and formatting are parallel too.

    part None: raw holds whole stories. Else raw is a part of one long story ("first", "more", "last", the
    last one ending with the story: its separator line in the raw layout), and the first item returned is
    the part's ids, which the caller cuts into lines."""
    raw, first_line, path, max_length, layout, part = job
    tok = _WORKER["tok"]
    eot = tok.eot_id
    n_raw = len(raw)
    if part == "last" and layout == "raw" and (sep := _SEP_LINE.search(raw)):
        raw = raw[:sep.start()]
    try:  # a UTF-8 byte-order mark is not text; nor is the \r of a CRLF line end
        text = raw.removeprefix(BOM if first_line == 1 else b"").decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        lineno = first_line + raw.count(b"\n", 0, e.start)
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise TokenizerError(f"{path} line {lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at byte {col} of "
                             "the line); fix that line or re-create the file with prepare_tinystories.py") from None
    if part is not None:  # no whitespace around the cuts is stripped: the pieces are those of the whole story
        text = text.lstrip() if part == "first" else text.rstrip() if part == "last" else text
        ids = tok.encode_ordinary(text) + ([eot] if part == "last" else [])
        return ids, int(part == "last"), 0, len(ids), len(text.encode("utf-8")), n_raw
    out, n_docs, n_chunks, n_tokens, n_bytes = [], 0, 0, 0, 0
    for story in _stories(text, layout, path, first_line):
        ids = tok.encode_ordinary(story)
        ids.append(eot)  # once per story, after its last paragraph
        n_docs += 1
        n_tokens += len(ids)
        n_bytes += len(story.encode("utf-8"))
        step = max_length if max_length > 0 else len(ids)
        for s in range(0, len(ids), step):
            out.append("[" + ",".join(map(str, ids[s:s + step])) + "]\n")
            n_chunks += 1
    return "".join(out), n_docs, n_chunks, n_tokens, n_bytes, n_raw


def _story_ends(buf, layout):
    """(first, last): the offsets just after the first and the last story that ends in buf, 0 if none."""
    if layout == "lines":
        return buf.find(b"\n") + 1, buf.rfind(b"\n") + 1
    first, last = _SEP_LINE.search(buf), _SEP_LINE_LAST.search(buf)
    return (first.end(), last.end()) if first else (0, 0)


def _read_raw_batches(path, max_length, batch_bytes, layout):
    """Yield jobs for _encode_batch: about batch_bytes of whole stories each (whole lines; in the raw layout
    ending with a separator line), with the first line's number. A story longer than 4 * batch_bytes goes
    in parts instead, cut where no pre-token spans (pretokens.last_cut), so memory does not grow with it (one
    50 MB line took 1.1 GB)."""
    lineno, buf, part = 1, b"", None  # part: the kind of the last part sent while a long story is cut up
    with open_regular(path, "rb", "text file", error=TokenizerError) as f:
        while True:
            data = f.read(batch_bytes)
            buf += data
            first, last = _story_ends(buf, layout) if data else (len(buf), len(buf))
            end, kind = 0, None
            if part is not None and first:
                end, kind = first, "last"
            elif part is None and last:
                end = last
            elif len(buf) > 4 * batch_bytes:
                end, kind = last_cut(buf), "first" if part is None else "more"
                if not end and len(buf) > MAX_UNCUT_BYTES:
                    raise TokenizerError(f"{path} line {lineno}: {len(buf) >> 20} MB without whitespace after a "
                                         "character, so without a place to cut it: is it text?")
            if end:
                job, buf = buf[:end], buf[end:]
                yield job, lineno, str(path), max_length, layout, kind
                lineno += job.count(b"\n")
                part = kind if kind != "last" else None
            if not data:
                return


def _write_part(f, ids, last, max_length, carry):
    """Write the ids of a part of a long story as _encode_batch writes a whole one: the lines of max_length
    ids it completes (with max_length 0, the story's one line at its end), the rest kept in carry; returns
    how many lines it wrote."""
    carry.extend(ids)
    if not (last or max_length):
        return 0
    step = max_length or len(carry)
    lines = -(-len(carry) // step) if last else len(carry) // step
    for s in range(0, lines * step, step):
        f.write("[" + ",".join(map(str, carry[s:s + step])) + "]\n")
    del carry[:lines * step]
    return lines


def tokenize_file(tok, input_path, output_path, max_length=512, workers=None, batch_bytes=1 << 18, progress=True,
                  layout=None):
    """Tokenize input_path into output_path (jsonl) + its sidecar; return (sidecar, stats).

    layout: "lines" (one story per line) or "raw" (<|endoftext|> separator lines); None: detect_layout."""
    if not os.path.exists(input_path):
        raise TokenizerError(f"input file not found: {input_path}. Make it with prepare_tinystories.py "
                             "(e.g. --data_dir data --offline)")
    total = regular_file(input_path, "text file", error=TokenizerError).st_size
    if total == 0:
        raise TokenizerError(f"{input_path} is empty: no stories to tokenize")
    workers = max(1, min(workers or cores(), -(-total // batch_bytes)))  # no more than batches
    layout = layout or detect_layout(input_path)
    identity, model_json = tok.identity(), tok.model_json()
    out_path = os.path.abspath(output_path)
    stats = dict(docs=0, lines=0, tokens=0, bytes=0)
    from tqdm import tqdm
    t0 = time.perf_counter()
    _WORKER["tok"] = tok  # forked workers inherit it; spawned ones rebuild it from the identity
    pool = None
    if workers > 1 and total > batch_bytes:  # before the bar: its monitor thread must not run when the pool forks
        pool = start_workers(workers, _worker_init, (identity, model_json))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {os.path.basename(input_path)}",
               file=sys.stderr, disable=not progress)
    try:
        jobs = _read_raw_batches(input_path, max_length, batch_bytes, layout)
        results = pool.imap(_encode_batch, jobs) if pool is not None else map(_encode_batch, jobs)
        side = sidecar_path(out_path)
        carry = []  # the ids of a long story not written yet
        with atomic_write(out_path, "w", encoding="utf-8") as f:
            for text, d, c, n, b, in_bytes in results:
                if isinstance(text, list):  # a part of a long story: its ids
                    c = _write_part(f, text, d, max_length, carry)
                else:
                    f.write(text)
                stats["docs"] += d
                stats["lines"] += c
                stats["tokens"] += n
                stats["bytes"] += b
                bar.update(in_bytes)
            if pool is not None:
                pool.close()
                pool.join()
            if stats["docs"] == 0:
                raise TokenizerError(f"{input_path} has no stories (only blank or separator lines); "
                                     "nothing to tokenize")
            if os.path.exists(side):
                os.unlink(side)  # never leave an old sidecar describing the new jsonl
        sidecar = write_sidecar(out_path, identity, num_documents=stats["docs"], num_lines=stats["lines"],
                                num_tokens=stats["tokens"], num_bytes=stats["bytes"], eot_appended=True,
                                max_length=max_length, source=str(input_path))
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
    secs = time.perf_counter() - t0
    sidecar_stats = dict(stats, seconds=secs, mb_per_s=total / 1e6 / max(secs, 1e-9), workers=workers, layout=layout)
    return sidecar, sidecar_stats


# --train_bpe's --vocab_size: the 256 bytes and <|endoftext|> at least, and no more than a model may have
BPE_VOCAB_SIZE = Number(int, 256 + 1, FIELD_RANGES["vocab_size"].high)


def build_parser():
    p = Parser(
        description="Tokenize a text file of stories into JSONL token ids (plus a .meta.json sidecar),\n"
                    "or train our own byte-level BPE with --train_bpe.\n\n"
                    "Input layouts (detected from the file's first MB, no flag needed):\n"
                    "  one story per line   what prepare_tinystories.py writes; blank lines are skipped\n"
                    "  raw TinyStories      a story spans several lines; stories are separated by lines holding\n"
                    "                       only <|endoftext|> (the official .txt files, data/sample/...train...)\n"
                    "Either way each story gets one end-of-text id, after its last line.",
        epilog="Examples:\n"
               "  python3 tokenizer.py data/tinystories_train_sample.txt data/train_tokenized.jsonl "
               "--tokenizer tiktoken --encoding gpt2 --max_length 512\n"
               "  python3 tokenizer.py --train_bpe --vocab_size 4096 data/tinystories_train_sample.txt "
               "--model_file bpe4096.json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", help="text file of stories in either layout (the BPE training text with "
                                         "--train_bpe)")
    p.add_argument("output", nargs="?", help="output .jsonl of token ids (a sidecar OUTPUT.meta.json is written too)")
    p.add_argument("--tokenizer", default="tiktoken", choices=list(KINDS),
                   help="tiktoken (a named tiktoken encoding) or bpe (our BPE model from --model_file; "
                        "lecture2_bpe is the guide's name for it)")
    p.add_argument("--encoding", default="gpt2",
                   help="tiktoken encoding name; gpt2 works offline from the bundled ranks (default: gpt2)")
    p.add_argument("--model_file", help="BPE model JSON to read (bpe; or a vocab.json with merges.txt "
                                        "beside it), or to write with --train_bpe")
    p.add_argument("--merges_file", help="merges.txt to pair with a vocab.json --model_file (default: beside it)")
    p.add_argument("--max_length", type=COUNT_OR_ZERO, default=512,
                   help=f"most token ids per output line, {COUNT_OR_ZERO}: a longer story is split into consecutive "
                        "chunks of at most this many ids, never truncated (0: no limit). The end-of-text id is "
                        "appended to every story, so it ends the story's last chunk (default: 512)")
    p.add_argument("--workers", type=COUNT, default=cores(),
                   help=f"processes that tokenize, or count the text's pre-tokens with --train_bpe, {COUNT}; more "
                        f"than the cores are capped (default: all {cores()} cores)")
    p.add_argument("--allow_download", action="store_true",
                   help="let tiktoken download the gpt2 files when its cache lacks them (default: use the "
                        "bundled data/sample/r50k_base.tiktoken, no network wait)")
    p.add_argument("--train_bpe", action="store_true",
                   help="train a byte-level BPE on INPUT and write it to --model_file instead of tokenizing")
    p.add_argument("--vocab_size", type=BPE_VOCAB_SIZE, default=4096,
                   help=f"with --train_bpe: total ids, i.e. 256 bytes + merges + the <|endoftext|> token, "
                        f"{BPE_VOCAB_SIZE} (default: 4096)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def refuse_overwriting_inputs(outputs, inputs):
    """TokenizerError when an output is one of the inputs (atomic.refuse_inputs, the rule every script uses)."""
    refuse_inputs(outputs, inputs, error=TokenizerError)


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a mistake in the flags (its one line printed)
        return e.code
    n_cores = cores()
    if args.workers is not None and args.workers > n_cores:
        say(f"note: --workers {args.workers} is more than the {n_cores} cores here; using {n_cores}")
        args.workers = n_cores
    try:
        if args.train_bpe:
            if not args.input or not args.model_file:
                raise TokenizerError("--train_bpe needs an input text file and --model_file OUT.json")
            if args.output:
                raise TokenizerError(f"--train_bpe takes one input file; got an extra argument {args.output!r} "
                                     "(the model goes to --model_file)")
            refuse_overwriting_inputs([args.model_file], [("training text", args.input)])
            check_vocab_size(args.vocab_size, [ENDOFTEXT])
            size = regular_file(args.input, "text file", error=TokenizerError).st_size
            t0 = time.perf_counter()
            model = train_bpe_file(args.input, args.vocab_size, workers=max(1, args.workers or 1),
                                   progress=not args.quiet,
                                   training={"input": os.path.basename(args.input), "input_bytes": size})
            secs = time.perf_counter() - t0
            with atomic_write(args.model_file, "w", encoding="utf-8") as f:
                f.write(model.to_json())
            say(f"trained BPE: {model.vocab_size} tokens ({len(model.merges)} merges) on "
                f"{size / 1e6:.2f} MB in {secs:.1f} s on {max(1, args.workers or 1)} worker(s) -> {args.model_file}")
            return 0
        if not args.input or not args.output:
            raise TokenizerError("give an input text file and an output .jsonl (or --train_bpe); see --help")
        inputs = [("input text", args.input)]
        if tokenizer_kind(args.tokenizer) == "bpe" and args.model_file:
            model = os.path.join(args.model_file, "vocab.json") if os.path.isdir(args.model_file) else args.model_file
            inputs += [("BPE model", model),  # and the merges.txt a vocab.json is read with
                       ("merges file", args.merges_file or os.path.join(os.path.dirname(model), "merges.txt"))]
        refuse_overwriting_inputs([args.output, sidecar_path(args.output)], inputs)
        tok = get_tokenizer(args.tokenizer, args.encoding, args.model_file, args.merges_file, args.allow_download)
        sidecar, st = tokenize_file(tok, args.input, args.output, args.max_length, args.workers,
                                    progress=not args.quiet)
        say(f"{args.output}: {st['docs']} stories ({LAYOUTS[st['layout']]}), {st['lines']} lines, "
            f"{st['tokens']} tokens ({st['tokens'] / max(st['bytes'], 1):.3f} per byte) in {st['seconds']:.1f} s, "
            f"{st['mb_per_s']:.1f} MB/s on {st['workers']} worker(s); tokenizer {tok.name}")
        return 0
    except UserError as e:
        say(f"error: {e}")
        return 1
    except OSError as e:  # an input that cannot be read; an output that is a folder or under a file, a full disk
        why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else e.strerror
        say(f"error: {e.filename2 or e.filename or args.output or args.model_file}: {why}")
        return 1
    except KeyboardInterrupt:
        say("interrupted; no output written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
