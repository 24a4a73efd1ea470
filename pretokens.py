"""[data & text] Pre-tokenisation: the pieces BPE works inside, and counting them in a file of any size on all cores.

GPT-2's pattern cuts text into pieces (a word with its leading space, a run of digits, of
punctuation, of whitespace); BPE never merges across a piece, and special tokens such as
<|endoftext|> are cut out whole first. Training a BPE needs only how often each distinct piece
occurs, so a file is read in blocks, cut only where no piece spans, counted on several
processes, and only the counts are kept: memory grows with the distinct pieces, not the file.

    import pretokens
    counts = pretokens.count_pretokens("Once upon a time")      # Counter {"Once": 1, " upon": 1, ...}
    counts = pretokens.count_pretokens_file("stories.txt", workers=2)

bpe.py trains on such counts; tokenizer.py cuts a long story where last_cut allows.
"""
import os
import sys
from collections import Counter

import regex

from errors import TokenizerError
from parallel import start_workers
from untrusted import open_regular, regular_file

ENDOFTEXT = "<|endoftext|>"  # the special token that ends every story
# GPT-2's pre-tokenisation pattern, exactly as tiktoken 0.14 spells it for r50k_base / gpt2.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


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
# spaces, read_blocks and _count_block (and tokenizer.py, a long story) at last_cut's; tests/test_bpe.py
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


def last_cut(block, lo=0, hi=None):
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
    """Yield (bytes, number of its first line) of about block_bytes each, cut only where last_cut allows."""
    lineno, parts = 1, []
    with open_regular(path, "rb", "text file", error=TokenizerError) as f:
        while True:
            data = f.read(block_bytes)
            if not data:
                if parts:
                    yield b"".join(parts), lineno
                return
            cut = last_cut(data)
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
        end = last_cut(raw, start, start + (1 << 17)) if start + (1 << 17) < len(raw) else 0
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
