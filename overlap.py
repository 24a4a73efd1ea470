"""[data & text] Held-out text that is held out: remove from a validation text every paragraph that also occurs in
the training text, so that a score on the rest does not reward memorizing.

    python3 overlap.py --valid valid.txt --train train_a.txt train_b.txt --out valid.held_out.txt
    removed 80 of 2,106 paragraphs that overlap the training text -> valid.held_out.txt

A paragraph is a line of text (TinyStories' layouts put each paragraph on a line, with blank lines or
<|endoftext|> lines between; one story per line makes the story the paragraph). It overlaps the
training text when, comparing words (lowercased runs of letters and digits, so that spacing, quotes
and punctuation do not hide a repeat):
- its first 150 characters (the words that end within them, at least 8) occur there in a row, or
- at least 80% of its word 8-grams occur there.
Paragraphs of fewer than 8 words are kept: too short to tell a repeat from a common phrase.

Why not less (--prefix_chars 80 --share 0.5, which issue 29 suggested): TinyStories is formulaic. Of
the 2,114 paragraphs of ../shared/data/TinyStories-valid.sample.txt, 80 begin with 80 characters found
verbatim in the two training samples, but 71 of those share less than half of their 8-grams with
them: "Once upon a time, there was a little girl named Lily. She loved to play outside in ..." openings,
not repeated stories. No paragraph there shares more than 67% of its 8-grams, and none shares its
first 150 characters: those samples hold no repeat. Removing the formula would take the easiest
paragraphs out of the score, not the memorized ones.

The validation text is small and held in memory; the training text is streamed in blocks cut between words,
its word n-grams hashed (64 bits) a chunk at a time with NumPy and looked up among the validation
text's, so memory does not grow with the training text (measured: about 105 MB peak for a 35 MB and
for a 70 MB training text, at about 2.3 MB/s on one core). The output keeps the layout: a removed
paragraph takes the blank lines after it along, and a story left empty its <|endoftext|> line.
"""
import hashlib
import os
import re
import sys

import numpy as np

from atomic import atomic_write, refuse_inputs
from errors import DataError, UserError
from flag_types import COUNT, Number, Parser

NGRAM, PREFIX_CHARS, SHARE = 8, 150, 0.8
SHARE_RANGE = Number(float, 0, 1, low_open=True)  # --share
EOT = "<|endoftext|>"
CHUNK_CHARS = 1 << 20              # training text read 1M characters at a time
M = np.uint64(0x9E3779B97F4A7C15)  # the n-gram hash: h = h * M + word hash (mod 2**64)
MASK = (1 << 64) - 1
WORD = re.compile(r"\w+")
NOT_WORD = re.compile(r"\W")


def words(text):
    return WORD.findall(text.lower())


def word_hashes(ws):
    """(len(ws),) uint64: one hash a word (Python's, the same for both texts within this process)."""
    return np.array([hash(w) & MASK for w in ws], dtype=np.uint64)


def runs(h, n):
    """The hashes of every run of n words in h (word hashes): h[i] * M**(n-1) + ... + h[i+n-1] (mod 2**64)."""
    out = h.copy()
    with np.errstate(over="ignore"):
        for k in range(2, n + 1):
            out = out[:-1] * M + h[k - 1:]
    return out


def is_paragraph(line):
    return line.strip() not in ("", EOT)


class Wanted:
    """The distinct hashes of one length of word run that the validation text asks about, and which of
    them the training text has shown."""

    def __init__(self, hashes):
        self.hashes = np.unique(np.array(hashes, dtype=np.uint64))
        self.seen = np.zeros(len(self.hashes), dtype=bool)

    def look(self, found):
        """Mark the wanted hashes among found (an array of hashes of the training text)."""
        if len(self.hashes) == 0 or len(found) == 0:
            return
        i = np.minimum(np.searchsorted(self.hashes, found), len(self.hashes) - 1)
        self.seen[i[self.hashes[i] == found]] = True

    def has(self, hashes):
        """[whether the training text has shown each of hashes] (each one of the wanted)."""
        if len(hashes) == 0:
            return np.zeros(0, dtype=bool)
        i = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return self.seen[i] & (self.hashes[i] == hashes)


def training_words(paths):
    """The training texts' words, a chunk (a list: the words of about CHUNK_CHARS characters) at a time,
    each chunk cut after a character that is not part of a word, so that no word is cut in two."""
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                rest = ""
                while True:
                    block = f.read(CHUNK_CHARS)
                    if not block:
                        break
                    text = rest + block
                    ends = [m.end() for m in NOT_WORD.finditer(text, max(len(text) - 256, 0))]
                    cut = ends[-1] if ends else (len(text) if len(text) > 4 * CHUNK_CHARS else 0)  # no break: carry
                    yield words(text[:cut])
                    rest = text[cut:]
                yield words(rest)
        except OSError as e:
            raise DataError(f"cannot read the training text {path}: {e.strerror}") from None


def overlapping(paragraphs, train_paths, prefix_chars=PREFIX_CHARS, share=SHARE):
    """[True where the paragraph (a string) overlaps the training texts]: its first prefix_chars characters'
    words in a row there, or at least `share` of its word 8-grams (the module's docstring)."""
    grams, prefixes = [], []  # each paragraph's 8-gram hashes; (number of words, hash) of its first ~80 characters
    for p in paragraphs:
        h = word_hashes(words(p))
        grams.append(runs(h, NGRAM))
        n = sum(1 for m in WORD.finditer(p.lower()) if m.end() <= prefix_chars)
        prefixes.append((n, runs(h[:n], n)[:1]) if len(p) >= prefix_chars and n >= NGRAM else None)
    wanted = {NGRAM: Wanted(np.concatenate([np.zeros(0, dtype=np.uint64), *grams]))}
    for n in {n for n, _ in filter(None, prefixes)} - {NGRAM}:  # a prefix of 8 words is an 8-gram: in that table
        wanted[n] = Wanted(np.concatenate([h for k, h in filter(None, prefixes) if k == n]))
    longest = max(wanted)
    carry = np.zeros(0, dtype=np.uint64)  # the last words of the previous chunk: runs that cross chunks
    for chunk in training_words(train_paths):
        h = np.concatenate([carry, word_hashes(chunk)])
        found = h.copy()  # found[i]: the hash of the n words from i, for n = 1, 2, ... (as runs() does)
        with np.errstate(over="ignore"):
            for n in range(2, longest + 1):
                found = found[:-1] * M + h[n - 1:]
                if n in wanted:
                    wanted[n].look(found)
        carry = h[max(len(h) - longest + 1, 0):]
    out = []
    for g, prefix in zip(grams, prefixes):
        shared = prefix is not None and bool(wanted[prefix[0]].has(prefix[1])[0])
        out.append(shared or (len(g) > 0 and bool(wanted[NGRAM].has(g).sum() >= share * len(g))))
    return out


def remove_overlap(text, train_paths, prefix_chars=PREFIX_CHARS, share=SHARE):
    """(text without the paragraphs that overlap the training texts, paragraphs removed, paragraphs in all)."""
    lines = text.splitlines(keepends=True)
    paragraphs = [line for line in lines if is_paragraph(line)]
    drop = iter(overlapping([line.strip() for line in paragraphs], train_paths, prefix_chars, share))
    kept, removing, since_eot = [], False, 0  # since_eot: paragraphs kept since the last <|endoftext|> kept
    for line in lines:
        if is_paragraph(line):
            removing = next(drop)
            if not removing:
                kept.append(line)
                since_eot += 1
        elif line.strip() == EOT:
            removing = False
            if since_eot:
                kept.append(line)
            since_eot = 0
        elif not removing:  # a blank line: it goes with the paragraph before it
            kept.append(line)
    removed = len(paragraphs) - sum(1 for line in kept if is_paragraph(line))
    return "".join(kept), removed, len(paragraphs)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def held_out(valid_path, train_paths, folder, say=print):
    """The path of valid_path without its overlap with train_paths, made in folder once (the name keyed by
    the texts' SHA-256) and said; returns (path, {"removed": n, "paragraphs": m})."""
    key = hashlib.sha256(" ".join(sha256_of(p) for p in (valid_path, *train_paths)).encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(valid_path))[0]
    out = os.path.join(folder, f"{stem}-held-out-{key}.txt")
    counts_path = out + ".counts"
    if os.path.exists(out) and os.path.exists(counts_path):
        with open(counts_path, encoding="utf-8") as f:
            removed, total = map(int, f.read().split())
    else:
        with open(valid_path, encoding="utf-8", errors="replace") as f:
            text, removed, total = remove_overlap(f.read(), train_paths)
        with atomic_write(out, "w", encoding="utf-8") as f:
            f.write(text)
        with atomic_write(counts_path, "w", encoding="utf-8") as f:  # written last: marks a complete pair
            f.write(f"{removed} {total}\n")
    say(f"removed {removed:,} of {total:,} paragraphs that overlap the training text -> {out}")
    return out, {"removed": removed, "paragraphs": total}


def main(argv=None):
    p = Parser(description="Remove from a validation text the paragraphs that occur in the training text (a shared "
                       f"first {PREFIX_CHARS} characters, or {SHARE:.0%} of its word 8-grams).")
    p.add_argument("--valid", required=True, help="the validation text (.txt)")
    p.add_argument("--train", required=True, nargs="+", help="the training text(s) (.txt), read as a stream")
    p.add_argument("--out", required=True, help="where the validation text without the overlap goes (a new "
                                                "file: never one of the inputs)")
    p.add_argument("--prefix_chars", type=COUNT, default=PREFIX_CHARS,
                   help="a paragraph whose first this many characters (their words) occur in the training text in "
                        f"a row is removed: {COUNT} (default {PREFIX_CHARS})")
    p.add_argument("--share", type=SHARE_RANGE, default=SHARE,
                   help="a paragraph with at least this share of its word 8-grams in the training text is removed: "
                        f"{SHARE_RANGE} (default {SHARE})")
    args = p.parse_args(argv)
    try:
        for path in (args.valid, *args.train):
            if not os.path.isfile(path):
                raise UserError(f"{path} is not a text file")
        refuse_inputs([args.out], [("validation text", args.valid)] + [("training text", t) for t in args.train],
                      error=UserError)
        with open(args.valid, encoding="utf-8", errors="replace") as f:
            text, removed, total = remove_overlap(f.read(), args.train, args.prefix_chars, args.share)
        with atomic_write(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"removed {removed:,} of {total:,} paragraphs that overlap the training text -> {args.out}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
