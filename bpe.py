"""[data & text] Our byte-level BPE: the model and its file, the trainers (fast and reference) and
the reference encoder.

Train a model (the command line is tokenizer.py's; this module is what it calls):

    python3 tokenizer.py --train_bpe --vocab_size 4096 data/tinystories_train_sample.txt --model_file bpe4096.json

From Python:

    import bpe
    model = bpe.train_bpe(text, 4096)                   # or bpe.train_bpe_file(path, 4096, workers=4)
    open("bpe4096.json", "w").write(model.to_json())
    model = bpe.BPEModel.from_json(open("bpe4096.json").read())
    ids = bpe.encode_reference(model, "Once upon a time")

tokenizer.py wraps a model in tiktoken's engine (BPETokenizer) to encode fast; `encode_reference`
is the plain Python version that tests compare it with. The pieces BPE works inside, and counting
them in a large file, are in pretokens.py; GPT-2's spelling of a BPE (vocab.json + merges.txt) is in
gpt2_files.py.

The BPE model file (JSON, "format": "numpy-gpt byte-level BPE", "version": 1):
    pattern         the pre-tokenisation regex (GPT-2's); BPE never merges across its pieces
    vocab_size      number of token ids, special tokens included
    merges          [[a, b], ...] in training order; merge i joins tokens a and b into token 256 + i
    vocab           [[byte, ...], ...]: the bytes of every non-special token, by id (ids 0-255: one byte each)
    special_tokens  {"<|endoftext|>": id}: ids after the merges; matched as whole strings, never merged
    training        how it was made (input, sizes, tie-break rule), for the record
Encoding applies the merges in order of rank (lowest first) inside each pre-token piece.
"""
import heapq
import json
import sys
from collections import Counter

import regex

from errors import TokenizerError, say
from pretokens import ENDOFTEXT, GPT2_PATTERN, check_pattern, count_pretokens, count_pretokens_file, split_on_specials
from untrusted import parse_json

BPE_FORMAT = "numpy-gpt byte-level BPE"
BPE_VERSION = 1
MAX_MODEL_BYTES = 1 << 28  # GPT-2's vocab.json is 1 MB; our file for its 50,257 tokens about 2 MB
TIE_BREAK = "highest count; ties: the pair whose (bytes of left, bytes of right) sorts first"


# ----------------------------------------------------------------------------------------------
# The model and its file

def ints_below(values, below):
    """True when values is a list of ints (bools excluded) in [0, below)."""
    return isinstance(values, list) and all(type(x) is int and 0 <= x < below for x in values)


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
                "about": "byte-level BPE; see the docstring of bpe.py for the fields",
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
            d = parse_json(text, "its text")
        except ValueError as e:
            raise bad(str(e)) from None
        if not isinstance(d, dict) or d.get("format") != BPE_FORMAT:
            raise bad(f"format is {d.get('format') if isinstance(d, dict) else type(d).__name__!r}, "
                      f"expected {BPE_FORMAT!r}")
        if d.get("version") != BPE_VERSION:
            raise TokenizerError(f"{source}: BPE model version {d.get('version')} but this tokenizer.py reads "
                                 f"version {BPE_VERSION}; update tokenizer.py or retrain the model")
        # Check every value's type and range before anything is built from it: bytes(10**10) would
        # allocate 10 GB, and True passes for 1.
        missing = [k for k in ("vocab", "merges", "special_tokens") if k not in d]
        if missing:
            raise bad(f"no {', '.join(missing)}")
        vocab, merges, specials = d["vocab"], d["merges"], d["special_tokens"]
        pattern, merge_ids, training = d.get("pattern", GPT2_PATTERN), d.get("merge_ids"), d.get("training")
        if not (isinstance(vocab, list) and all(v is None or ints_below(v, 256) for v in vocab)):
            raise bad("vocab must be a list of null or [byte, ...] with bytes 0-255")
        n = len(vocab)
        if not (isinstance(merges, list) and all(ints_below(m, n) and len(m) == 2 for m in merges)):
            raise bad(f"merges must be a list of [a, b] ids below the {n} of the vocabulary")
        if not (isinstance(specials, dict) and ints_below(list(specials.values()), n)):
            raise bad(f"special_tokens must map strings to ids below {n}")
        if merge_ids is not None and not (ints_below(merge_ids, n) and len(merge_ids) == len(merges)):
            raise bad("merge_ids must be one id below the vocabulary size per merge")
        if d.get("vocab_size", n) != n:
            raise bad(f"vocab_size is {d.get('vocab_size')!r} but the vocab lists {n} ids")
        if not isinstance(pattern, str) or not isinstance(training, (dict, type(None))):
            raise bad("pattern must be a string and training an object")
        check_pattern(pattern, source)
        model = cls([None if v is None else bytes(v) for v in vocab], merges, specials, pattern, merge_ids,
                    training)
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


# ----------------------------------------------------------------------------------------------
# Training

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


def check_vocab_size(vocab_size, specials):
    """Raise TokenizerError unless vocab_size holds the 256 bytes and the special tokens."""
    if vocab_size < 256 + len(specials):
        raise TokenizerError(f"--vocab_size {vocab_size} is too small: a byte-level BPE needs 256 byte tokens "
                             f"+ {len(specials)} special token(s) = {256 + len(specials)} at least; "
                             "use e.g. --vocab_size 4096")


def train_bpe(text, vocab_size, specials=(ENDOFTEXT,), pattern=GPT2_PATTERN, progress=False, training=None):
    """Train a byte-level BPE of vocab_size ids (256 bytes + merges + specials) on text."""
    return train_bpe_counts(count_pretokens(text, specials, pattern), vocab_size, specials, pattern, progress,
                            training)


def train_bpe_file(path, vocab_size, specials=(ENDOFTEXT,), pattern=GPT2_PATTERN, workers=1, progress=False,
                   training=None):
    """train_bpe on the text of a file, streamed: the same merges, in memory that does not grow with the file."""
    counts = count_pretokens_file(path, specials, pattern, workers, progress=progress)
    if not any(piece.strip() for piece in counts):
        raise TokenizerError(f"{path} is empty: nothing to train a BPE on")
    return train_bpe_counts(counts, vocab_size, specials, pattern, progress, training)


def train_bpe_counts(counts, vocab_size, specials=(ENDOFTEXT,), pattern=GPT2_PATTERN, progress=False,
                     training=None):
    """Train on {pre-token piece: count}, as count_pretokens gives them; counts is emptied once read
    (with a million distinct pieces it holds ~160 MB that training does not need).

    Works on the unique pre-token pieces with their counts. Pair counts are updated incrementally:
    a merge only revisits the pieces that contain the merged pair (an index pair -> pieces), and
    the most frequent pair comes from a lazy max-heap (stale entries are re-checked when popped).
    Tie-break: see TIE_BREAK; train_bpe_reference gives the same merges the slow, obvious way.
    """
    specials = list(specials)
    check_vocab_size(vocab_size, specials)
    num_merges = vocab_size - 256 - len(specials)
    words = [list(w.encode("utf-8")) for w in counts]
    freqs = list(counts.values())
    counts.clear()
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
        say(f"note: the text only supports {len(merges)} merges; vocabulary is {256 + len(merges) + len(specials)}")
    specials_ids = {s: len(vocab) + k for k, s in enumerate(specials)}
    vocab = vocab + [None] * len(specials)
    info = dict(training or {})
    info.update({"num_merges": len(merges), "tie_break": TIE_BREAK,
                 "num_pieces": sum(freqs), "num_unique_pieces": len(words)})
    return BPEModel(vocab, merges, specials_ids, pattern, training=info)


def train_bpe_reference(text, vocab_size, specials=(ENDOFTEXT,), pattern=GPT2_PATTERN):
    """The obvious BPE trainer (recount every pair for every merge); slow, for tests only."""
    specials = list(specials)
    check_vocab_size(vocab_size, specials)
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


class ReferenceEncoding:
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
