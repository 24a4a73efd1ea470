"""Our byte-level BPE: the model file, training (streaming, all cores), the reference encoder, vocab.json import.

Train a model (the command line is tokenizer.py's; this module is what it calls):

    python3 tokenizer.py --train_bpe --vocab_size 4096 data/tinystories_train_sample.txt --model_file bpe4096.json

From Python:

    import bpe
    model = bpe.train_bpe(text, 4096)                   # or bpe.train_bpe_file(path, 4096, workers=4)
    open("bpe4096.json", "w").write(model.to_json())
    model, json_text = bpe.read_model_file("bpe4096.json")
    ids = bpe.encode_reference(model, "Once upon a time")

tokenizer.py wraps a model in tiktoken's engine (BPETokenizer) to encode fast; `encode_reference`
is the plain Python version that tests compare it with.

The BPE model file (JSON, "format": "numpy-gpt byte-level BPE", "version": 1):
    pattern         the pre-tokenisation regex (GPT-2's); BPE never merges across its pieces
    vocab_size      number of token ids, special tokens included
    merges          [[a, b], ...] in training order; merge i joins tokens a and b into token 256 + i
    vocab           [[byte, ...], ...]: the bytes of every non-special token, by id (ids 0-255: one byte each)
    special_tokens  {"<|endoftext|>": id}: ids after the merges; matched as whole strings, never merged
    training        how it was made (input, sizes, tie-break rule), for the record
Encoding applies the merges in order of rank (lowest first) inside each pre-token piece.
A GPT-2 style pair (vocab.json + merges.txt) converts to the same model (`model_from_vocab_merges`).
"""
import heapq
import json
import multiprocessing
import os
import sys
import threading
from collections import Counter

import regex

from atomic import atomic_write
from untrusted import open_regular, parse_json, read_json, regular_file

ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern, exactly as tiktoken 0.14 spells it for r50k_base / gpt2.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
BPE_FORMAT = "numpy-gpt byte-level BPE"
BPE_VERSION = 1
MAX_MODEL_BYTES = 1 << 28  # GPT-2's vocab.json is 1 MB; our file for its 50,257 tokens about 2 MB
TIE_BREAK = "highest count; ties: the pair whose (bytes of left, bytes of right) sorts first"


class TokenizerError(Exception):
    """A problem the user can fix (bad file, bad flag); the CLI prints it without a traceback."""


def _say(msg):
    print(msg, file=sys.stderr, flush=True)


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
# The model and its file

def _is_ints(values, below):
    """True when values is a list of ints (bools excluded) in [0, below)."""
    return isinstance(values, list) and all(type(x) is int and 0 <= x < below for x in values)


# A model's pattern must cut text into pieces that cover it (BPE drops what no piece matches) and must do so
# in bounded time: it is run on this probe (words, digits, punctuation, whitespace runs, non-ASCII, and
# runs of one character, where catastrophic backtracking shows) with regex's timeout. A pattern that
# backtracks badly only on other text is not caught.
PATTERN_PROBE = ("Once upon a time, Tom's dog (named Max) ran 12.5 km! They'll see.\n\n\t  Ünïcödé café "
                 "日本語 🐶 end  \r\n" + "a" * 32 + "!" + " " * 32 + "x" + "1" * 32 + "." * 32 + "\n")
PATTERN_SECONDS = 1.0


def check_pattern(pattern, source):
    """TokenizerError unless pattern is a regular expression whose pieces cover PATTERN_PROBE, found in
    under PATTERN_SECONDS."""
    if not isinstance(pattern, str) or not pattern:
        raise TokenizerError(f"{source}: the pre-tokenisation pattern is empty or not a string")
    try:
        pieces = regex.compile(pattern).findall(PATTERN_PROBE, timeout=PATTERN_SECONDS)
    except regex.error as e:
        raise TokenizerError(f"{source}: the pattern is not a regular expression: {e}") from None
    except TimeoutError:
        raise TokenizerError(f"{source}: the pattern takes over {PATTERN_SECONDS:g} s to split a short probe "
                             "text (catastrophic backtracking): use GPT-2's") from None
    if not all(isinstance(p, str) for p in pieces) or "".join(pieces) != PATTERN_PROBE:
        raise TokenizerError(f"{source}: the pattern does not cover text (its pieces of a probe text leave "
                             "characters out, which BPE would drop, or it has groups): use GPT-2's")


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
        if not (isinstance(vocab, list) and all(v is None or _is_ints(v, 256) for v in vocab)):
            raise bad("vocab must be a list of null or [byte, ...] with bytes 0-255")
        n = len(vocab)
        if not (isinstance(merges, list) and all(_is_ints(m, n) and len(m) == 2 for m in merges)):
            raise bad(f"merges must be a list of [a, b] ids below the {n} of the vocabulary")
        if not (isinstance(specials, dict) and _is_ints(list(specials.values()), n)):
            raise bad(f"special_tokens must map strings to ids below {n}")
        if merge_ids is not None and not (_is_ints(merge_ids, n) and len(merge_ids) == len(merges)):
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


def count_pretokens(text, specials=(ENDOFTEXT,), pattern=GPT2_PATTERN):
    """Counter {piece: count} of the pre-token pieces of text; special-token strings are cut out.

    The plain version is Counter(regex.findall(pattern, piece)) for each piece between specials;
    PieceCounter gives the same counts, faster with GPT-2's pattern.
    """
    counter = PieceCounter(pattern)
    counter.add(text, specials)
    return counter.counts()


# No piece of GPT2_PATTERN spans a place where a non-whitespace character is followed by a whitespace
# one: letter, number and punctuation runs (after at most one leading space) hold no whitespace, the
# whitespace alternatives nothing else, and the pattern never looks behind. So the pieces of text[:i]
# and of text[i:], found apart, are the pieces of text. PieceCounter cuts at such places before
# spaces, read_blocks and _count_block (and tokenizer.py, a long story) at _last_cut's; tests/test_bpe.py
# checks both on random text.
_SPACE_AFTER_WHITESPACE = regex.compile(r"(?<=\s) ")
_ENDS_WITH_WHITESPACE = regex.compile(r"\s\Z")
_KEEP = "\x00"  # stands for a space that must not be cut at


class PieceCounter:
    """Counts the pre-token pieces of many texts. With GPT-2's pattern, each text is cut before every
    space that follows a non-space, the words are counted at C speed, and counts() runs the regex
    once per distinct word: about twice as fast as findall over the text, for the same counts."""

    def __init__(self, pattern=GPT2_PATTERN):
        self.pat = regex.compile(pattern)
        self.by_words = pattern == GPT2_PATTERN
        self.pieces = Counter()
        self.spaced = Counter()  # words that had a space before them (the space is part of their first piece)
        self.first = Counter()  # words that had none: the start of a text

    def add(self, text, specials=(ENDOFTEXT,)):
        for piece, is_special in split_on_specials(text, specials):
            if is_special:
                continue
            if not self.by_words or _KEEP in piece:  # (_KEEP is never in stories: the marker would be ambiguous)
                self.pieces.update(self.pat.findall(piece))
                continue
            parts = piece.split(" ")
            words = Counter(parts)
            if "" in words or any(_ENDS_WITH_WHITESPACE.search(w) for w in words):
                # a space after whitespace is no place to cut: mark those spaces, cut at the others
                parts = _SPACE_AFTER_WHITESPACE.sub(_KEEP, piece).split(" ")
                words = Counter(parts)
            words[parts[0]] -= 1
            self.first[parts[0]] += 1
            self.spaced.update(words)

    def counts(self):
        """The Counter {piece: count} of everything added."""
        for words, space in ((self.spaced, " "), (self.first, "")):
            for w, n in words.items():
                if n > 0:
                    for piece in self.pat.findall(space + w.replace(_KEEP, " ")):
                        self.pieces[piece] += n
            words.clear()
        return self.pieces


# ----------------------------------------------------------------------------------------------
# Counting a file in blocks on all cores: memory grows with the distinct pieces, not the file

_BEFORE_WHITESPACE = regex.compile(rb"(?r)[\x21-\x7e\x80-\xff](?=[ \t\n\r\x0b\x0c])")  # searched from the end
MAX_UNCUT_BYTES = 1 << 26  # text with no place to cut for this long is not text: refused, not read whole


def _last_cut(block, lo=0, hi=None):
    """Index in block[lo:hi] (UTF-8 bytes) of the last ASCII whitespace byte that follows a character
    which is not whitespace, 0 if none: the last newline after printable ASCII if there is one (blocks then
    end with whole lines), else any such place (lines that end in a space or a non-ASCII character, one
    long line).

    No pre-token of GPT2_PATTERN spans such a cut (see above), so the pieces of text[:cut] and
    text[cut:], counted apart, are exactly the pieces of the whole text (the tests check this against
    random text cut at every such place).
    """
    hi = len(block) if hi is None else hi
    i = hi
    while True:
        i = block.rfind(b"\n", lo, i)
        if i <= lo:
            break
        if 0x21 <= block[i - 1] <= 0x7E:
            return i
    for m in _BEFORE_WHITESPACE.finditer(block, lo, hi):
        i = m.end()
        if i - 1 <= lo:
            return 0
        if block[i - 1] < 0x80:
            return i
        j = i - 1  # a multi-byte character ends here: whitespace (U+00A0, U+3000, ...) or not?
        while j > lo and 0x80 <= block[j] < 0xC0 and i - j < 4:
            j -= 1
        try:
            char = block[j:i].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not char.isspace() and not regex.match(r"\s", char):
            return i
    return 0


def read_blocks(path, block_bytes=1 << 20):
    """Yield (bytes, number of its first line) of about block_bytes each, cut only where _last_cut allows."""
    lineno, parts = 1, []
    with open_regular(path, "rb", "text file", error=TokenizerError) as f:
        while True:
            data = f.read(block_bytes)
            if not data:
                if parts:
                    yield b"".join(parts), lineno
                return
            cut = _last_cut(data)
            if cut == 0:  # no place to cut in this block: read on
                parts.append(data)
                if len(parts) * block_bytes > MAX_UNCUT_BYTES:
                    raise TokenizerError(f"{path} line {lineno}: {MAX_UNCUT_BYTES >> 20} MB without whitespace "
                                         "after a character, so without a place to cut it: is it text?")
                continue
            block = b"".join(parts + [data[:cut]])
            parts = [data[cut:]]
            yield block, lineno
            lineno += block.count(b"\n")


def _count_block(job):
    """(block bytes, first line, path, specials, pattern) -> (Counter of its pieces, len of the block).

    Decodes and counts 128 KB at a time: one str of a whole block, 1-4 MB depending on its
    characters, left the heap of glibc's malloc fragmented, and a worker grew by ~50 MB per 100 MB."""
    raw, first_line, path, specials, pattern = job
    counter, start = PieceCounter(pattern), 0
    while start < len(raw):
        end = _last_cut(raw, start, start + (1 << 17)) if start + (1 << 17) < len(raw) else 0
        end = end or len(raw)
        try:
            counter.add(raw[start:end].decode("utf-8"), specials)
        except UnicodeDecodeError as e:
            bad = start + e.start
            line = first_line + raw.count(b"\n", 0, bad)
            raise TokenizerError(f"{path} line {line}: not valid UTF-8 (byte {raw[bad]:#04x}); fix that line or "
                                 "re-create the file with prepare_tinystories.py") from None
        start = end
    return counter.counts(), len(raw)


def start_workers(workers, initializer=None, initargs=()):
    """A pool of worker processes; callers start it before their progress bar (see below).

    Forked while this process runs no other thread: the workers inherit what it has loaded (tokenizing
    the 1.4 MB sample on the 2-core machine took 0.4-0.6 s forked, 0.7-1.5 s with forkserver or spawn).
    Forking a process that runs threads can deadlock (Python 3.12 warns), and a tqdm bar starts a
    monitor thread that outlives it; so with another thread running, or where fork is missing,
    forkserver or spawn start fresh workers, which run initializer(*initargs).
    """
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork").Pool(workers)
    method = "forkserver" if "forkserver" in methods else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer, initargs)


def count_pretokens_file(path, specials=(ENDOFTEXT,), pattern=GPT2_PATTERN, workers=1, block_bytes=1 << 20,
                         progress=False):
    """count_pretokens of a whole file, exactly, read in blocks and counted on `workers` processes.

    Only the counts are kept (the pieces of one block at a time, per worker), so memory grows with
    the number of distinct pieces, not with the size of the file.
    """
    total = regular_file(path, "text file", error=TokenizerError).st_size
    workers = min(workers, -(-total // block_bytes))  # no more processes than blocks
    pool = start_workers(workers) if workers > 1 else None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"counting {os.path.basename(path)}", file=sys.stderr)
    counts = Counter()
    try:
        jobs = ((raw, line, str(path), tuple(specials), pattern) for raw, line in read_blocks(path, block_bytes))
        for block_counts, n in (pool.imap(_count_block, jobs) if pool else map(_count_block, jobs)):
            counts.update(block_counts)
            if bar is not None:
                bar.update(n)
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if bar is not None:
            bar.close()
    return counts


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
        tok2id = read_json(vocab_path, "vocab.json", MAX_MODEL_BYTES, TokenizerError)
        if not isinstance(tok2id, dict) or not tok2id or not _is_ints(list(tok2id.values()), len(tok2id)) \
                or len(set(tok2id.values())) != len(tok2id):
            raise TokenizerError(f"{vocab_path} is not a vocab.json: a {{token: id}} object whose ids are 0 to "
                                 "its size - 1, each once")
        n = len(tok2id)
        lines = []
        with open_regular(merges_path, "r", "merges.txt", MAX_MODEL_BYTES, TokenizerError, encoding="utf-8") as f:
            for ln in f:  # each merge makes a token, so a vocabulary of n ids holds at most n - 256 of them
                lines.append(ln.rstrip("\n"))
                if len(lines) > n - 256 + 1:  # + 1: the "#version" line
                    raise TokenizerError(f"{merges_path} has more merges than the {n} tokens of {vocab_path} "
                                         f"allow (at most {n - 256}): are they a pair?")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {vocab_path} / {merges_path}: {e}") from None
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
