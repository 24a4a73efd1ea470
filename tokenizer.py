"""Tokenizers for numpy-gpt: GPT-2's BPE through tiktoken (works offline) and our own byte-level BPE.

Tokenize a text file (one story per line, as prepare_tinystories.py writes it):

    python3 tokenizer.py data/tinystories_train_sample.txt data/train_tokenized.jsonl \\
        --tokenizer tiktoken --encoding gpt2 --max_length 512

Train our own byte-level BPE, then tokenize with it:

    python3 tokenizer.py --train_bpe --vocab_size 4096 data/tinystories_train_sample.txt --model_file bpe4096.json
    python3 tokenizer.py data/tinystories_train_sample.txt data/train_tokenized.jsonl \\
        --tokenizer lecture2_bpe --model_file bpe4096.json --max_length 512

A GPT-2 style pair (`--model_file vocab.json`, with `merges.txt` beside it or `--merges_file`)
loads as lecture2_bpe too.

Output `X.jsonl`: one JSON array of token ids per line. Every story gets the end-of-text id
appended; a story longer than --max_length is split into consecutive chunks (never truncated),
so only its last chunk ends with end-of-text. The sidecar `X.jsonl.meta.json` records which
tokenizer made the file (train.py refuses train/val data from different tokenizers).

From Python:

    from tokenizer import get_tokenizer, tokenizer_from_identity
    tok = get_tokenizer("tiktoken", encoding="gpt2")
    tok = get_tokenizer("lecture2_bpe", model_file="bpe4096.json")
    ids = tok.encode("Once upon a time"); text = tok.decode(ids)

The BPE model file (JSON, "format": "numpy-gpt byte-level BPE", "version": 1):
    pattern         the pre-tokenisation regex (GPT-2's); BPE never merges across its pieces
    vocab_size      number of token ids, special tokens included
    merges          [[a, b], ...] in training order; merge i joins tokens a and b into token 256 + i
    vocab           [[byte, ...], ...]: the bytes of every non-special token, by id (ids 0-255: one byte each)
    special_tokens  {"<|endoftext|>": id}: ids after the merges; matched as whole strings, never merged
    training        how it was made (input, sizes, tie-break rule), for the record
Encoding applies the merges in order of rank (lowest first) inside each pre-token piece; it runs in
tiktoken's engine built from these ranks, and `encode_reference` is the plain Python version that
tests compare it with.
"""
import argparse
import hashlib
import heapq
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import regex
import tiktoken

from atomic import atomic_write

ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern, exactly as tiktoken 0.14 spells it for r50k_base / gpt2.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
BUNDLED_R50K = Path(__file__).resolve().parent / "data" / "sample" / "r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# Where tiktoken keeps the two files it downloads for get_encoding("gpt2") (cache name = sha1(url)).
GPT2_CACHE_KEYS = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
BPE_FORMAT = "numpy-gpt byte-level BPE"
BPE_VERSION = 1
SIDECAR_FORMAT = "numpy-gpt tokenized jsonl"
SIDECAR_VERSION = 1
TIE_BREAK = "highest count; ties: the pair whose (bytes of left, bytes of right) sorts first"


class TokenizerError(Exception):
    """A problem the user can fix (bad file, bad flag); the CLI prints it without a traceback."""


def _say(msg):
    print(msg, file=sys.stderr, flush=True)


def _sha256_text(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_on_specials(text, specials):
    """Yield (piece, is_special) with every occurrence of a special-token string cut out whole."""
    if not specials:
        if text:
            yield text, False
        return
    pat = regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)))
    pos = 0
    for m in pat.finditer(text):
        if m.start() > pos:
            yield text[pos:m.start()], False
        yield m.group(), True
        pos = m.end()
    if pos < len(text):
        yield text[pos:], False


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
        return {"type": self.type, "name": self.name, "n_vocab": self.n_vocab, "eot_id": self.eot_id,
                "sha256": self.sha256, "model_file": self.model_file}

    def model_json(self):
        return None

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, n_vocab={self.n_vocab}, eot_id={self.eot_id})"


class TiktokenTokenizer(Tokenizer):
    type = "tiktoken"


def _gpt2_in_tiktoken_cache():
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return cache_dir != "" and all(os.path.exists(os.path.join(cache_dir, k)) for k in GPT2_CACHE_KEYS)


def gpt2_encoding_from_bundle(path=BUNDLED_R50K):
    """tiktoken's gpt2 encoding built from the bundled r50k_base ranks (sha256 verified); no network."""
    from tiktoken.load import load_tiktoken_bpe
    if not os.path.exists(path):
        raise TokenizerError(f"bundled GPT-2 ranks not found at {path}; restore data/sample/ from the repository")
    try:
        ranks = load_tiktoken_bpe(str(path), expected_hash=R50K_SHA256)
    except ValueError as e:
        raise TokenizerError(f"{path}: {e}; restore data/sample/r50k_base.tiktoken from the repository") from None
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


def load_tiktoken(encoding="gpt2", allow_download=False, verbose=True):
    """A TiktokenTokenizer. For gpt2: tiktoken's own loader when its cache holds the files (or
    allow_download), else the bundled ranks, so the common offline path never waits on the network."""
    say = _say if verbose else (lambda m: None)
    if encoding == "gpt2":
        enc, source = None, None
        if "gpt2" in getattr(tiktoken.registry, "ENCODINGS", {}):
            enc, source = tiktoken.get_encoding("gpt2"), "tiktoken (already loaded)"
        elif allow_download or _gpt2_in_tiktoken_cache():
            try:
                enc, source = tiktoken.get_encoding("gpt2"), "tiktoken's cache or download"
            except Exception as e:  # network down, proxy, bad cache: the bundle is the same encoding
                say(f"tokenizer: tiktoken could not load gpt2 ({type(e).__name__}: {e}); using the bundled ranks")
        if enc is None:
            enc, source = gpt2_encoding_from_bundle(), f"bundled {BUNDLED_R50K.name} (sha256 verified)"
        say(f"tokenizer: tiktoken gpt2 from {source}")
        return TiktokenTokenizer(enc, "gpt2", enc.eot_token, R50K_SHA256)
    try:
        enc = tiktoken.get_encoding(encoding)
    except ValueError as e:
        raise TokenizerError(f"unknown tiktoken encoding {encoding!r} ({e}); gpt2 works offline") from None
    except Exception as e:
        raise TokenizerError(f"could not load tiktoken encoding {encoding!r} ({type(e).__name__}: {e}). "
                             "Only gpt2 is bundled for offline use; connect to the network or use --encoding gpt2") from None
    say(f"tokenizer: tiktoken {encoding}")
    eot = enc._special_tokens.get(ENDOFTEXT)
    if eot is None:
        raise TokenizerError(f"tiktoken encoding {encoding!r} has no {ENDOFTEXT} token")
    return TiktokenTokenizer(enc, encoding, eot, None)


# ----------------------------------------------------------------------------------------------
# Our byte-level BPE: the model, training (fast and reference), encoding (tiktoken and reference)

class BPEModel:
    """Merges and vocabulary of a byte-level BPE.

    vocab: list of bytes by id (None at special-token ids); merges: list of (a, b) id pairs in
    rank order; merge_ids[i]: the id of the token merge i makes; specials: {string: id}.
    """

    def __init__(self, vocab, merges, specials, pattern=GPT2_PATTERN, merge_ids=None, training=None):
        self.vocab = list(vocab)
        self.merges = [tuple(m) for m in merges]
        self.specials = dict(specials)
        self.pattern = pattern
        self.merge_ids = list(merge_ids) if merge_ids is not None else [256 + i for i in range(len(self.merges))]
        self.training = training or {}

    @property
    def vocab_size(self):
        return len(self.vocab)

    def ranks(self):
        """{(a, b): (rank, new_id)} for the reference encoder."""
        return {p: (r, t) for r, (p, t) in enumerate(zip(self.merges, self.merge_ids))}

    def to_json(self):
        """The documented model file text (deterministic: same model, same text)."""
        head = {"format": BPE_FORMAT, "version": BPE_VERSION,
                "about": "byte-level BPE; see the docstring of tokenizer.py for the fields",
                "pattern": self.pattern, "vocab_size": self.vocab_size, "special_tokens": self.specials,
                "training": self.training}
        parts = [json.dumps(head, ensure_ascii=False, indent=1)[:-2]]
        if self.merge_ids != [256 + i for i in range(len(self.merges))]:
            parts.append(',\n "merge_ids": ' + json.dumps(self.merge_ids))
        parts.append(',\n "merges": [\n  ' + ",\n  ".join(f"[{a}, {b}]" for a, b in self.merges) + "\n ]")
        parts.append(',\n "vocab": [\n  ' + ",\n  ".join("null" if v is None else json.dumps(list(v))
                                                         for v in self.vocab) + "\n ]\n}\n")
        return "".join(parts)

    @classmethod
    def from_json(cls, text, source="<model json>"):
        def bad(why):
            return TokenizerError(f"{source} is not a numpy-gpt BPE model ({why}). Train one with "
                                  "`tokenizer.py --train_bpe --vocab_size N input.txt --model_file out.json`, "
                                  "or pass a vocab.json with its merges.txt")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise bad(f"not JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != BPE_FORMAT:
            raise bad(f"format is {d.get('format') if isinstance(d, dict) else type(d).__name__!r}, "
                      f"expected {BPE_FORMAT!r}")
        if d.get("version") != BPE_VERSION:
            raise TokenizerError(f"{source}: BPE model version {d.get('version')} but this tokenizer.py reads "
                                 f"version {BPE_VERSION}; update tokenizer.py or retrain the model")
        try:
            vocab = [None if v is None else bytes(v) for v in d["vocab"]]
            merges = [(int(a), int(b)) for a, b in d["merges"]]
            specials = {str(k): int(v) for k, v in d["special_tokens"].items()}
            model = cls(vocab, merges, specials, d.get("pattern", GPT2_PATTERN), d.get("merge_ids"),
                        d.get("training"))
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"missing or malformed field: {e}") from None
        model.check(source)
        return model

    def check(self, source):
        """Raise TokenizerError unless vocab, merges and specials agree."""
        n = len(self.vocab)
        if sorted(v for v in self.vocab if v is not None and len(v) == 1) != [bytes([i]) for i in range(256)]:
            raise TokenizerError(f"{source}: the vocabulary must hold each of the 256 single bytes exactly once")
        for (a, b), t in zip(self.merges, self.merge_ids):
            if not (0 <= a < n and 0 <= b < n and 0 <= t < n) or None in (self.vocab[a], self.vocab[b]) \
                    or self.vocab[t] != self.vocab[a] + self.vocab[b]:
                raise TokenizerError(f"{source}: merge ({a}, {b}) -> {t} does not match the vocabulary")
        for s, i in self.specials.items():
            if not (0 <= i < n) or self.vocab[i] is not None:
                raise TokenizerError(f"{source}: special token {s!r} has id {i}, which is not a free slot")
        if self.vocab.count(None) != len(self.specials):
            raise TokenizerError(f"{source}: vocabulary has empty ids not claimed by any special token")

    def tiktoken_ranks(self):
        """{bytes: id} usable as tiktoken ranks, or None when tiktoken's rule would differ from the merges.

        tiktoken merges the adjacent pair whose joined bytes have the lowest rank; that is the
        merge order exactly when every multi-byte token comes from one merge and ids grow with it.
        """
        ranks = {v: i for i, v in enumerate(self.vocab) if v is not None}
        if len(ranks) != len(self.vocab) - len(self.specials):
            return None  # two ids with the same bytes
        if any(t2 <= t1 for t1, t2 in zip(self.merge_ids, self.merge_ids[1:])):
            return None
        first_merge = self.merge_ids[0] if self.merge_ids else len(self.vocab)
        if any(i >= first_merge for i, v in enumerate(self.vocab) if v is not None and len(v) == 1):
            return None  # a single byte ranked after a merge
        if sum(1 for v in self.vocab if v is not None and len(v) > 1) != len(self.merges):
            return None
        return ranks


def count_pretokens(text, specials=(ENDOFTEXT,), pattern=GPT2_PATTERN):
    """Counter {piece: count} of the pre-token pieces of text; special-token strings are cut out."""
    pat = regex.compile(pattern)
    counts = Counter()
    for piece, is_special in split_on_specials(text, specials):
        if not is_special:
            counts.update(pat.findall(piece))
    return counts


def _merge_word(w, a, b, new_id):
    out, i, n = [], 0, len(w)
    while i < n:
        if i < n - 1 and w[i] == a and w[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(w[i])
            i += 1
    return out


def _check_vocab_size(vocab_size, specials):
    if vocab_size < 256 + len(specials):
        raise TokenizerError(f"--vocab_size {vocab_size} is too small: a byte-level BPE needs 256 byte tokens "
                             f"+ {len(specials)} special token(s) = {256 + len(specials)} at least; "
                             "use e.g. --vocab_size 4096")


def train_bpe(text, vocab_size, specials=(ENDOFTEXT,), pattern=GPT2_PATTERN, progress=False, training=None):
    """Train a byte-level BPE of vocab_size ids (256 bytes + merges + specials) on text.

    Works on the unique pre-token pieces with their counts. Pair counts are updated incrementally:
    a merge only revisits the pieces that contain the merged pair (an index pair -> pieces), and
    the most frequent pair comes from a lazy max-heap (stale entries are re-checked when popped).
    Tie-break: see TIE_BREAK; train_bpe_reference gives the same merges the slow, obvious way.
    """
    specials = list(specials)
    _check_vocab_size(vocab_size, specials)
    num_merges = vocab_size - 256 - len(specials)
    counts = count_pretokens(text, specials, pattern)
    words = [list(w.encode("utf-8")) for w in counts]
    freqs = list(counts.values())
    vocab = [bytes([i]) for i in range(256)]
    merges = []

    pair_counts, where = {}, {}
    for i, (w, n) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            pair_counts[p] = pair_counts.get(p, 0) + n
            where.setdefault(p, set()).add(i)
    # min-heap on (-count, left bytes, right bytes): the top is the most frequent pair, ties as TIE_BREAK
    heap = [(-c, vocab[a], vocab[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_merges, desc="BPE merges", unit="merge", file=sys.stderr)
    for _ in range(num_merges):
        while heap:
            negc, _, _, a, b = heap[0]
            c = pair_counts.get((a, b), 0)
            if c == -negc and c > 0:
                break
            heapq.heappop(heap)
            if c > 0:  # count went down since this entry was pushed: re-insert with the true count
                heapq.heappush(heap, (-c, vocab[a], vocab[b], a, b))
        if not heap:
            break  # every piece is a single token: the text cannot give more merges
        new_id = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        merges.append((a, b))
        grown = set()
        for i in where.pop((a, b)):
            w, n = words[i], freqs[i]
            new = _merge_word(w, a, b, new_id)
            old_pairs = list(zip(w, w[1:]))
            new_pairs = list(zip(new, new[1:]))
            for p in old_pairs:
                pair_counts[p] -= n
            for p in new_pairs:
                pair_counts[p] = pair_counts.get(p, 0) + n
            old_set, new_set = set(old_pairs), set(new_pairs)
            for p in old_set - new_set:
                s = where.get(p)
                if s is not None:
                    s.discard(i)
            for p in new_set - old_set:
                where.setdefault(p, set()).add(i)
                grown.add(p)  # only pairs with the new token can grow; push fresh heap entries for them
            words[i] = new
        pair_counts.pop((a, b), None)
        for p in grown:
            c = pair_counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, vocab[p[0]], vocab[p[1]], p[0], p[1]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if len(merges) < num_merges and progress:
        _say(f"note: the text only supports {len(merges)} merges; vocabulary is {256 + len(merges) + len(specials)}")
    specials_ids = {s: len(vocab) + k for k, s in enumerate(specials)}
    vocab = vocab + [None] * len(specials)
    info = dict(training or {})
    info.update({"num_merges": len(merges), "tie_break": TIE_BREAK,
                 "num_pieces": sum(freqs), "num_unique_pieces": len(words)})
    return BPEModel(vocab, merges, specials_ids, pattern, training=info)


def train_bpe_reference(text, vocab_size, specials=(ENDOFTEXT,), pattern=GPT2_PATTERN):
    """The obvious BPE trainer (recount every pair for every merge); slow, for tests only."""
    specials = list(specials)
    _check_vocab_size(vocab_size, specials)
    words = {tuple(w.encode("utf-8")): n for w, n in count_pretokens(text, specials, pattern).items()}
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    for _ in range(vocab_size - 256 - len(specials)):
        pc = Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pc[p] += n
        if not pc:
            break
        best = min(pc, key=lambda p: (-pc[p], vocab[p[0]], vocab[p[1]]))
        new_id = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merges.append(best)
        words = {tuple(_merge_word(list(w), best[0], best[1], new_id)): n for w, n in words.items()}
    specials_ids = {s: len(vocab) + k for k, s in enumerate(specials)}
    return BPEModel(vocab + [None] * len(specials), merges, specials_ids, pattern)


def encode_reference(model, text, allow_special=True):
    """The plain merge algorithm: in each pre-token piece, apply the lowest-rank merge present, repeat."""
    ranks = model.ranks()
    pat = regex.compile(model.pattern)
    byte_id = {v: i for i, v in enumerate(model.vocab) if v is not None and len(v) == 1}
    ids = []
    for piece, is_special in split_on_specials(text, model.specials if allow_special else ()):
        if is_special:
            ids.append(model.specials[piece])
            continue
        for word in pat.findall(piece):
            w = [byte_id[bytes([c])] for c in word.encode("utf-8")]
            while len(w) > 1:
                best = min(zip(w, w[1:]), key=lambda p: ranks.get(p, (float("inf"),))[0])
                if best not in ranks:
                    break
                w = _merge_word(w, best[0], best[1], ranks[best][1])
            ids.extend(w)
    return ids


class _ReferenceEncoding:
    """Stands in for tiktoken.Encoding when a model's ranks cannot run in tiktoken (slow but exact)."""

    def __init__(self, model):
        self.model = model
        self.n_vocab = model.vocab_size

    def encode(self, text, allowed_special="all"):
        return encode_reference(self.model, text, allow_special=True)

    def encode_ordinary(self, text):
        return encode_reference(self.model, text, allow_special=False)

    def decode_bytes(self, ids):
        inv = {i: s.encode("utf-8") for s, i in self.model.specials.items()}
        return b"".join(inv[i] if i in inv else self.model.vocab[i] for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    type = "lecture2_bpe"

    def __init__(self, model, json_text, model_file=None, verbose=False):
        self.model = model
        self._json = json_text
        sha = _sha256_text(json_text)
        if ENDOFTEXT not in model.specials:
            raise TokenizerError(f"{model_file or 'BPE model'}: no {ENDOFTEXT} special token; numpy-gpt needs one "
                                 "to separate stories")
        ranks = model.tiktoken_ranks()
        if ranks is not None:
            enc = tiktoken.Encoding(name=f"lecture2_bpe-{sha[:12]}", pat_str=model.pattern, mergeable_ranks=ranks,
                                    special_tokens=model.specials, explicit_n_vocab=model.vocab_size)
        else:
            if verbose:
                _say(f"note: {model_file}: merges cannot run in tiktoken's engine; using the (slower) reference encoder")
            enc = _ReferenceEncoding(model)
        super().__init__(enc, f"bpe{model.vocab_size}-{sha[:12]}", model.specials[ENDOFTEXT], sha,
                         os.path.abspath(model_file) if model_file else None)
        self.n_vocab = model.vocab_size

    def model_json(self):
        return self._json


def bytes_to_unicode():
    """GPT-2's map from bytes to printable characters, used by vocab.json / merges.txt."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def model_from_vocab_merges(vocab_path, merges_path):
    """A BPEModel from GPT-2 style vocab.json ({token string: id}) + merges.txt ("a b" per line, by rank)."""
    dec = {c: b for b, c in bytes_to_unicode().items()}
    try:
        with open(vocab_path, encoding="utf-8") as f:
            tok2id = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            lines = [ln.rstrip("\n") for ln in f]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {vocab_path} / {merges_path}: {e}") from None
    if not isinstance(tok2id, dict) or not all(isinstance(v, int) for v in tok2id.values()):
        raise TokenizerError(f"{vocab_path} is not a vocab.json ({{token: id}}) file")
    n = max(tok2id.values()) + 1
    vocab, specials = [None] * n, {}
    for s, i in tok2id.items():
        if all(c in dec for c in s) and not (s.startswith("<|") and s.endswith("|>")):
            vocab[i] = bytes(dec[c] for c in s)
        else:
            specials[s] = i
    merges, merge_ids = [], []
    for lineno, ln in enumerate(lines, 1):
        if not ln.strip() or (lineno == 1 and ln.startswith("#version")):
            continue
        parts = ln.split(" ")
        if len(parts) != 2 or parts[0] not in tok2id or parts[1] not in tok2id or parts[0] + parts[1] not in tok2id:
            raise TokenizerError(f"{merges_path} line {lineno}: {ln!r} is not a merge of two tokens of {vocab_path}")
        merges.append((tok2id[parts[0]], tok2id[parts[1]]))
        merge_ids.append(tok2id[parts[0] + parts[1]])
    if ENDOFTEXT not in specials:  # GPT-2 style models end with it; add one if missing
        specials[ENDOFTEXT] = n
        vocab.append(None)
    model = BPEModel(vocab, merges, specials, GPT2_PATTERN, merge_ids,
                     {"converted_from": [os.path.basename(vocab_path), os.path.basename(merges_path)]})
    model.check(f"{vocab_path} + {merges_path}")
    return model


def write_vocab_merges(model, vocab_path, merges_path):
    """Write a BPEModel as GPT-2 style vocab.json + merges.txt: the inverse of model_from_vocab_merges.

    A token is spelled with bytes_to_unicode (a space is "Ġ"), a special token as its own string;
    merges.txt lists the merges in rank order, "left right" per line. The pair has no field for a
    pre-tokenisation pattern, so only models that split text with GPT-2's pattern can be written.
    """
    from atomic import atomic_write  # here, so the function moves between modules as it is

    def cannot(why):
        return TokenizerError(f"cannot write this BPE model as vocab.json + merges.txt: {why}")
    if model.pattern != GPT2_PATTERN:
        raise cannot("it splits text with another pattern than GPT-2's, which the pair implies")
    enc = bytes_to_unicode()
    spelled = [None if v is None else "".join(enc[b] for b in v) for v in model.vocab]
    tok2id = {}
    for i, s in enumerate(spelled):
        if s is None:
            continue
        if s.startswith("<|") and s.endswith("|>"):  # would read back as a special token
            raise cannot(f"token {i} spells {s!r}, which reads as a special token")
        if s in tok2id:
            raise cannot(f"tokens {tok2id[s]} and {i} have the same bytes")
        tok2id[s] = i
    for s, i in model.specials.items():
        if s in tok2id or not (0 <= i < len(spelled)) or spelled[i] is not None:
            raise cannot(f"special token {s!r} (id {i}) collides with another token")
        tok2id[s] = i
    lines = ["#version: 0.2"]
    for (a, b), t in zip(model.merges, model.merge_ids):
        if spelled[t] != spelled[a] + spelled[b]:
            raise cannot(f"merge ({a}, {b}) does not make token {t}")
        lines.append(f"{spelled[a]} {spelled[b]}")
    with atomic_write(vocab_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(dict(sorted(tok2id.items(), key=lambda kv: kv[1])), ensure_ascii=False) + "\n")
    with atomic_write(merges_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def load_bpe(model_file, merges_file=None, verbose=True):
    """A BPETokenizer from our JSON model, or from a vocab.json (+ merges.txt beside it or merges_file)."""
    if not model_file:
        raise TokenizerError("--tokenizer lecture2_bpe needs --model_file (train one with --train_bpe)")
    if os.path.isdir(model_file):
        model_file = os.path.join(model_file, "vocab.json")
    try:
        with open(model_file, "rb") as f:
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
            is_vocab = all(isinstance(v, int) for v in json.loads(text).values())
        except (json.JSONDecodeError, AttributeError):
            is_vocab = False
        if is_vocab:
            model = model_from_vocab_merges(model_file, pair)
            if verbose:
                _say(f"tokenizer: lecture2_bpe from {model_file} + {pair} ({model.vocab_size} tokens)")
            return BPETokenizer(model, model.to_json(), model_file, verbose)
    model = BPEModel.from_json(text, model_file)
    if verbose:
        _say(f"tokenizer: lecture2_bpe from {model_file} ({model.vocab_size} tokens)")
    return BPETokenizer(model, text, model_file, verbose)


def get_tokenizer(kind="tiktoken", encoding="gpt2", model_file=None, merges_file=None, allow_download=False,
                  verbose=True):
    """The shared entry point: kind "tiktoken" (encoding=...) or "lecture2_bpe" (model_file=...)."""
    if kind == "tiktoken":
        return load_tiktoken(encoding, allow_download, verbose)
    if kind in ("lecture2_bpe", "bpe"):
        return load_bpe(model_file, merges_file, verbose)
    raise TokenizerError(f"unknown tokenizer {kind!r}: use tiktoken or lecture2_bpe")


def tokenizer_from_identity(identity, model_json=None, verbose=False):
    """Rebuild the tokenizer an identity dict names (from model_json when given; sha256 checked)."""
    if not identity or "type" not in identity:
        raise TokenizerError(f"not a tokenizer identity: {identity!r}")
    if identity["type"] == "tiktoken":
        tok = load_tiktoken(identity.get("name", "gpt2"), verbose=verbose)
    elif identity["type"] == "lecture2_bpe":
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


# ----------------------------------------------------------------------------------------------
# Tokenizing a file (all cores) and training from the CLI

_WORKER = {}


def _worker_init(identity, model_json):
    _WORKER["tok"] = tokenizer_from_identity(identity, model_json)


def _encode_batch(job):
    """(raw bytes of whole lines, first line number, path, max_length) -> (jsonl text, stories, chunks, tokens,
    story bytes, raw bytes). Runs in the worker processes, so decoding and formatting are parallel too."""
    raw, first_line, path, max_length = job
    tok = _WORKER["tok"]
    eot = tok.eot_id
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = first_line + raw.count(b"\n", 0, e.start)
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise TokenizerError(f"{path} line {lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at byte {col} of "
                             "the line); fix that line or re-create the file with prepare_tinystories.py") from None
    out, n_docs, n_chunks, n_tokens, n_bytes = [], 0, 0, 0, 0
    for line in text.split("\n"):
        line = line.strip()
        if not line or line == ENDOFTEXT:  # blank lines, or the separators of a raw TinyStories file
            continue
        ids = tok.encode_ordinary(line)
        ids.append(eot)
        n_docs += 1
        n_tokens += len(ids)
        n_bytes += len(line.encode("utf-8"))
        step = max_length if max_length > 0 else len(ids)
        for s in range(0, len(ids), step):
            out.append("[" + ",".join(map(str, ids[s:s + step])) + "]\n")
            n_chunks += 1
    return "".join(out), n_docs, n_chunks, n_tokens, n_bytes, len(raw)


def _read_raw_batches(path, max_length, batch_bytes):
    """Yield jobs for _encode_batch: about batch_bytes of whole lines each, with the first line's number."""
    lineno = 1
    with open(path, "rb") as f:
        while True:
            raw = f.read(batch_bytes)
            if not raw:
                return
            if not raw.endswith(b"\n"):
                raw += f.readline()
            yield raw, lineno, str(path), max_length
            lineno += raw.count(b"\n")


def tokenize_file(tok, input_path, output_path, max_length=512, workers=None, batch_bytes=1 << 18, progress=True):
    """Tokenize input_path (one story per line) into output_path (jsonl) + its sidecar; return the sidecar."""
    if not os.path.isfile(input_path):
        raise TokenizerError(f"input file not found: {input_path}. Make it with prepare_tinystories.py "
                             "(e.g. --data_dir data --offline)")
    total = os.path.getsize(input_path)
    if total == 0:
        raise TokenizerError(f"{input_path} is empty: no stories to tokenize")
    workers = max(1, workers or os.cpu_count() or 1)
    identity, model_json = tok.identity(), tok.model_json()
    out_path = os.path.abspath(output_path)
    stats = dict(docs=0, lines=0, tokens=0, bytes=0)
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {os.path.basename(input_path)}",
               file=sys.stderr, disable=not progress)
    t0 = time.perf_counter()
    pool = None
    try:
        _WORKER["tok"] = tok
        jobs = _read_raw_batches(input_path, max_length, batch_bytes)
        if workers > 1 and total > batch_bytes:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            init = None if ctx.get_start_method() == "fork" else _worker_init  # fork: workers inherit tok
            pool = ctx.Pool(workers, initializer=init, initargs=(identity, model_json) if init else ())
            results = pool.imap(_encode_batch, jobs)
        else:
            results = map(_encode_batch, jobs)
        side = out_path + ".meta.json"
        with atomic_write(out_path, "w", encoding="utf-8") as f:
            for text, d, c, n, b, in_bytes in results:
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
                raise TokenizerError(f"{input_path} has no stories (only blank lines); nothing to tokenize")
            if os.path.exists(side):
                os.unlink(side)  # never leave an old sidecar describing the new jsonl
        sidecar = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "tokenizer": identity,
                   "num_documents": stats["docs"], "num_lines": stats["lines"], "num_tokens": stats["tokens"],
                   "num_bytes": stats["bytes"], "eot_appended": True, "max_length": max_length,
                   "source": str(input_path)}
        with atomic_write(side, "w", encoding="utf-8") as f:
            f.write(json.dumps(sidecar, indent=1) + "\n")
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
    secs = time.perf_counter() - t0
    sidecar_stats = dict(stats, seconds=secs, mb_per_s=total / 1e6 / max(secs, 1e-9), workers=workers)
    return sidecar, sidecar_stats


def read_text(path):
    """Whole file as str; bad UTF-8 is reported with its line number."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise TokenizerError(f"{path} line {line}: not valid UTF-8 (byte {raw[e.start]:#04x}); fix that line or "
                             "re-create the file with prepare_tinystories.py") from None


def build_parser():
    p = argparse.ArgumentParser(
        description="Tokenize a one-story-per-line text file into JSONL token ids (plus a .meta.json sidecar), "
                    "or train our own byte-level BPE with --train_bpe.",
        epilog="Examples:\n"
               "  python3 tokenizer.py data/tinystories_train_sample.txt data/train_tokenized.jsonl "
               "--tokenizer tiktoken --encoding gpt2 --max_length 512\n"
               "  python3 tokenizer.py --train_bpe --vocab_size 4096 data/tinystories_train_sample.txt "
               "--model_file bpe4096.json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", help="text file, one story per line (the BPE training text with --train_bpe)")
    p.add_argument("output", nargs="?", help="output .jsonl of token ids (a sidecar OUTPUT.meta.json is written too)")
    p.add_argument("--tokenizer", default="tiktoken", choices=["tiktoken", "lecture2_bpe"],
                   help="tiktoken (a named tiktoken encoding) or lecture2_bpe (our BPE model from --model_file)")
    p.add_argument("--encoding", default="gpt2",
                   help="tiktoken encoding name; gpt2 works offline from the bundled ranks (default: gpt2)")
    p.add_argument("--model_file", help="BPE model JSON to read (lecture2_bpe; or a vocab.json with merges.txt "
                                        "beside it), or to write with --train_bpe")
    p.add_argument("--merges_file", help="merges.txt to pair with a vocab.json --model_file (default: beside it)")
    p.add_argument("--max_length", type=int, default=512,
                   help="most token ids per output line: a longer story is split into consecutive chunks of at "
                        "most this many ids, never truncated (0: no limit). The end-of-text id is appended to "
                        "every story, so it ends the story's last chunk (default: 512)")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help=f"processes used to tokenize (default: all {os.cpu_count()} cores)")
    p.add_argument("--allow_download", action="store_true",
                   help="let tiktoken download the gpt2 files when its cache lacks them (default: use the "
                        "bundled data/sample/r50k_base.tiktoken, no network wait)")
    p.add_argument("--train_bpe", action="store_true",
                   help="train a byte-level BPE on INPUT and write it to --model_file instead of tokenizing")
    p.add_argument("--vocab_size", type=int, default=4096,
                   help="with --train_bpe: total ids, i.e. 256 bytes + merges + the <|endoftext|> token (default: 4096)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.train_bpe:
            if not args.input or not args.model_file:
                raise TokenizerError("--train_bpe needs an input text file and --model_file OUT.json")
            if args.output:
                raise TokenizerError(f"--train_bpe takes one input file; got an extra argument {args.output!r} "
                                     "(the model goes to --model_file)")
            _check_vocab_size(args.vocab_size, [ENDOFTEXT])
            text = read_text(args.input)
            if not text.strip():
                raise TokenizerError(f"{args.input} is empty: nothing to train a BPE on")
            t0 = time.perf_counter()
            model = train_bpe(text, args.vocab_size, progress=not args.quiet,
                              training={"input": os.path.basename(args.input),
                                        "input_bytes": len(text.encode("utf-8"))})
            secs = time.perf_counter() - t0
            with atomic_write(args.model_file, "w", encoding="utf-8") as f:
                f.write(model.to_json())
            _say(f"trained BPE: {model.vocab_size} tokens ({len(model.merges)} merges) on "
                 f"{len(text.encode('utf-8')) / 1e6:.2f} MB in {secs:.1f} s -> {args.model_file}")
            return 0
        if not args.input or not args.output:
            raise TokenizerError("give an input text file and an output .jsonl (or --train_bpe); see --help")
        if args.max_length < 0:
            raise TokenizerError("--max_length must be >= 0 (0 means no limit)")
        tok = get_tokenizer(args.tokenizer, args.encoding, args.model_file, args.merges_file, args.allow_download)
        sidecar, st = tokenize_file(tok, args.input, args.output, args.max_length, args.workers,
                                    progress=not args.quiet)
        _say(f"{args.output}: {st['docs']} stories, {st['lines']} lines, {st['tokens']} tokens "
             f"({st['tokens'] / max(st['bytes'], 1):.3f} per byte) in {st['seconds']:.1f} s, "
             f"{st['mb_per_s']:.1f} MB/s on {st['workers']} worker(s); tokenizer {tok.name}")
        return 0
    except TokenizerError as e:
        _say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted; no output written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
