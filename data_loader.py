"""[data & text] Token datasets for training: tokenized .jsonl -> memory-mapped binary -> batches.

The tokenizer writes `X.jsonl` (one JSON array of token ids per line) and, with it,
a sidecar `X.jsonl.meta.json` naming the tokenizer. Parsing JSON every run would be
slow for the full dataset, so the first load converts the file once, streaming,
into a flat binary token file next to it, and later loads memory-map that:

    X.jsonl.tokens.bin    all token ids back to back (uint16 if vocab <= 65535, else uint32)
    X.jsonl.tokens.json   {"format": "numpy-gpt token cache", "version": 1, "dtype", "vocab_size",
                           "num_tokens", "num_documents", "tokenizer", "num_bytes", "source": {size, mtime},
                           "crc32": of the .bin and this record}

The cache is rebuilt whenever the .jsonl changes (size or modification time differ), and
when it is damaged (its CRC-32 checked at every load: about 0.25 s per GB).
Stories are joined with the end-of-text token, so every window of seq_len + 1
consecutive tokens is a training example and nothing is padded. A tokenizer sidecar
says the last chunk of each story already ends with end-of-text; a plain .jsonl
(the guide's format, no sidecar) gets end-of-text appended after every line.

    from data_loader import load_dataset, RandomBatches, eval_batches
    train = load_dataset("data/train_tokenized.jsonl", vocab_size=50257)
    batches = RandomBatches(train, batch_size=32, seq_len=128, seed=0)
    x, y = batches.next()                      # (B, T) int64 each, y = x shifted by one
    for x, y in eval_batches(val, batch_size=32, seq_len=128):   # every token once
        ...

Command line (convert ahead of time and print what is in a file):
    python3 data_loader.py data/train_tokenized.jsonl
"""
import contextlib
import json
import os
import sys
import zlib

import numpy as np

from atomic import atomic_write, refuse_inputs
from config import FIELD_RANGES, GPT2_EOT_ID, GPT2_VOCAB_SIZE
from errors import DataError, UserError
from flag_types import Number, Parser
from tokenizer import read_sidecar, same_tokenizer, sidecar_path
from untrusted import open_regular, parse_json, read_json, regular_file

CACHE_FORMAT = "numpy-gpt token cache"
CACHE_VERSION = 1
CHUNK_TOKENS = 1 << 20  # tokens buffered in memory while converting
MAX_LINE_BYTES = 1 << 26  # a line of ids: 512 of them take ~3 KB; a 64 MB line holds ~10 million
SCAN_TOKENS = 1 << 24  # tokens compared at a time when finding the story starts (a 16 MB mask)


def cache_paths(jsonl_path):
    return str(jsonl_path) + ".tokens.bin", str(jsonl_path) + ".tokens.json"


def _source_stamp(path):
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def convert_jsonl(jsonl_path, eot_id=None):
    """Stream jsonl_path into its binary cache; return the cache's meta dict.

    Memory stays bounded by CHUNK_TOKENS whatever the file size. eot_id is appended
    after every line for a plain .jsonl (no sidecar); ignored when a sidecar exists.
    """
    jsonl_path = str(jsonl_path)
    bin_path, meta_path = cache_paths(jsonl_path)
    for path in (bin_path, meta_path):
        if os.path.lexists(path) and not os.path.isfile(path):  # a folder, a FIFO, a device: not ours to replace
            raise DataError(f"{path} is not a regular file, and the token cache of {jsonl_path} goes there: "
                            "remove it")
    sidecar = read_sidecar(jsonl_path)
    stamp = _source_stamp(jsonl_path)
    if sidecar is not None:
        tokenizer = sidecar.get("tokenizer")
        vocab = int(tokenizer["n_vocab"]) if tokenizer and tokenizer.get("n_vocab") else None
        append_eot = not sidecar.get("eot_appended", False)
        eot_id = tokenizer.get("eot_id") if tokenizer else eot_id
    else:
        tokenizer, vocab, append_eot = None, None, True
    if append_eot and eot_id is None:
        raise DataError(f"{jsonl_path}: no tokenizer sidecar, so the end-of-text id is unknown; pass eot_id")

    # One streaming pass parses the JSON. With a sidecar the vocabulary, hence the dtype,
    # is known up front; without one, ids are written as uint32 and narrowed afterwards
    # in place by a cheap binary pass if they all fit in uint16. Memory stays bounded either way.
    wide = np.uint16 if (vocab is not None and vocab <= 65535) else np.uint32
    max_id, max_line, num_tokens, num_lines = -1, 0, 0, 0
    with contextlib.ExitStack() as stack:
        try:
            out = stack.enter_context(atomic_write(bin_path, "w+b"))  # w+b: the narrowing pass reads back
        except OSError as e:
            raise DataError(f"cannot write the binary token cache next to {jsonl_path} ({e}); "
                            "copy the .jsonl into a writable directory") from None
        buf = []
        for lineno, ids in _iter_jsonl(jsonl_path):
            num_lines += 1
            if ids:
                top = max(ids)
                if top > max_id:
                    max_id, max_line = top, lineno
                    if top > np.iinfo(wide).max:
                        raise DataError(f"{jsonl_path}:{lineno}: token id {top} does not fit the tokenizer's "
                                        f"vocabulary of {vocab} (sidecar {sidecar_path(jsonl_path)}); "
                                        "re-tokenize the data")
            buf.extend(ids)
            if append_eot:
                buf.append(eot_id)
            if len(buf) >= CHUNK_TOKENS:
                out.write(np.asarray(buf, dtype=wide).tobytes())
                num_tokens += len(buf)
                buf = []
        out.write(np.asarray(buf, dtype=wide).tobytes())
        num_tokens += len(buf)
        if num_tokens == 0:
            raise DataError(f"{jsonl_path} is empty: no token ids in it. Tokenize some text first (tokenizer.py).")
        if sidecar is not None and sidecar.get("num_tokens") not in (None, num_tokens):
            raise DataError(f"{jsonl_path} holds {num_tokens:,} tokens but its sidecar {sidecar_path(jsonl_path)} "
                            f"says {sidecar['num_tokens']:,}: the file was cut short or changed since it was "
                            "tokenized; re-run tokenizer.py")
        if append_eot and eot_id > max_id:
            max_id, max_line = eot_id, 0
        v = vocab if vocab is not None else max_id + 1
        dtype = np.uint16 if max(v, max_id + 1) <= 65535 else np.uint32
        if dtype != wide:
            _narrow_in_place(out, num_tokens, wide, dtype)
    if sidecar is not None and sidecar.get("num_documents") is not None:
        num_docs = int(sidecar["num_documents"])
    else:
        num_docs = num_lines
    meta = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION,
        "dtype": np.dtype(dtype).name, "vocab_size": v, "num_tokens": num_tokens,
        "num_documents": num_docs, "num_lines": num_lines, "max_id": max_id, "max_id_line": max_line,
        "eot_id": eot_id, "eot_appended_here": append_eot, "tokenizer": tokenizer,
        "num_bytes": sidecar.get("num_bytes") if sidecar else None,
        "source": stamp, "sidecar": _source_stamp(sidecar_path(jsonl_path)) if sidecar else None,
    }
    meta["crc32"] = _checksum(bin_path, meta)
    with atomic_write(meta_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=1))
    return meta


def _checksum(bin_path, meta):
    """CRC-32 of the token file's bytes followed by the meta record's (without its "crc32")."""
    crc = 0
    with open_regular(bin_path, "rb", "token cache") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    record = json.dumps({k: v for k, v in meta.items() if k != "crc32"}, sort_keys=True)
    return zlib.crc32(record.encode("utf-8"), crc)


def _narrow_in_place(f, n, wide, dtype):
    """Rewrite the n ids of dtype `wide` in file f as the narrower dtype, chunk by chunk.

    Front to back is safe: chunk i is read in full before its narrow copy is written, and
    that copy ends at or before the end of chunk i, so it only overwrites ids already read.
    """
    w, d = np.dtype(wide).itemsize, np.dtype(dtype).itemsize
    for lo in range(0, n, CHUNK_TOKENS):
        f.seek(lo * w)
        chunk = np.frombuffer(f.read(min(CHUNK_TOKENS, n - lo) * w), dtype=wide)
        f.seek(lo * d)
        f.write(chunk.astype(dtype).tobytes())
    f.truncate(n * d)


def _iter_jsonl(path):
    """Yield (line number, list of ids) for each non-blank line; clear errors for bad lines."""
    with open_regular(path, "rb", "tokenized .jsonl", error=DataError) as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):  # a file without newlines is never read whole
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{lineno}: a line of more than {MAX_LINE_BYTES >> 20} MB, more than a line "
                                "of token ids can be; tokenizer.py --max_length 512 splits a story over lines")
            if not raw.strip():
                continue
            ids = parse_json(raw, f"{path}:{lineno}", DataError,
                             "; each line must be a JSON array of token ids, e.g. [256, 345, 123]")
            if not isinstance(ids, list) or not all(type(i) is int for i in ids):
                raise DataError(f"{path}:{lineno}: expected a JSON array of integer token ids, "
                                f"got {raw[:60].decode('utf-8', 'replace')!r}")
            if ids and min(ids) < 0:
                raise DataError(f"{path}:{lineno}: negative token id {min(ids)}")
            yield lineno, ids


def _cache_is_fresh(jsonl_path, eot_id, log=None):
    """The cache's meta if the cache is there, up to date and undamaged, else None (convert again)."""
    bin_path, meta_path = cache_paths(jsonl_path)
    if not os.path.exists(meta_path):
        return None  # never converted: nothing damaged to report
    try:
        meta = read_json(meta_path, "token cache record")
        side = sidecar_path(jsonl_path)
        if (meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION
                or meta.get("source") != _source_stamp(jsonl_path)
                or meta.get("sidecar") != (_source_stamp(side) if os.path.exists(side) else None)
                or (meta.get("eot_appended_here") and meta.get("eot_id") != eot_id)
                or not os.path.exists(bin_path)):
            return None
        damaged = (meta.get("dtype") not in ("uint16", "uint32") or type(meta.get("num_tokens")) is not int
                   or os.path.getsize(bin_path) != meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize
                   or type(meta.get("crc32")) is not int or meta["crc32"] != _checksum(bin_path, meta))
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        damaged = True  # ValueError: not a regular file, bad JSON; the others: a record of the wrong shape
    if damaged and log:
        log(f"{bin_path} or {os.path.basename(meta_path)}: the token cache is damaged (cut short or changed); "
            "converting again")
    return None if damaged else meta


class TokenDataset:
    """A memory-mapped flat array of token ids plus what is known about it.

    tokens: np.memmap (uint16/uint32) of num_tokens ids; meta: the cache meta dict;
    tokenizer: identity dict or None; num_bytes: UTF-8 bytes the tokens stand for, or None: the
    sidecar's bytes of story text plus one byte per story for the newline that ends it in the text
    file, which the end-of-text token after each story stands for (bits per byte includes the loss
    of predicting that token, so it must count its byte too).
    """

    def __init__(self, path, tokens, meta):
        self.path, self.tokens, self.meta = path, tokens, meta
        self.tokenizer = meta.get("tokenizer")
        self.num_documents = meta.get("num_documents")
        self.num_bytes = meta.get("num_bytes")
        if self.num_bytes is not None:
            self.num_bytes += self.num_documents or 0

    def __len__(self):
        return len(self.tokens)

    def __repr__(self):
        return (f"TokenDataset({self.path!r}: {len(self):,} tokens, {self.num_documents} documents, "
                f"{self.tokens.dtype}, tokenizer={(self.tokenizer or {}).get('name')})")


def load_dataset(path, vocab_size=None, eot_id=None, rebuild=False, log=None):
    """Open a tokenized .jsonl as a TokenDataset, converting it to the binary cache if needed.

    vocab_size: the model's vocabulary; every id must be below it (checked from the
    cache meta, so no pass over the data). eot_id: end-of-text id to append after each
    line of a plain .jsonl; defaults to GPT-2's 50256 when vocab_size is 50257, else
    vocab_size - 1 (pass it explicitly for other tokenizers). log: callable for messages.
    """
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path}. Tokenize your text first (see tokenizer.py / the guide).")
    if os.path.isdir(path):
        raise DataError(f"{path} is a directory; pass the tokenized .jsonl file")
    if regular_file(path, "tokenized .jsonl", error=DataError).st_size == 0:
        raise DataError(f"{path} is empty: no token ids in it. Tokenize some text first (tokenizer.py).")
    if eot_id is None and read_sidecar(path) is None:
        if vocab_size is None:
            raise DataError(f"{path} has no tokenizer sidecar; pass vocab_size or eot_id")
        eot_id = GPT2_EOT_ID if vocab_size == GPT2_VOCAB_SIZE else vocab_size - 1
        if log:
            log(f"{path}: no tokenizer sidecar ({os.path.basename(sidecar_path(path))}); "
                f"joining lines with end-of-text id {eot_id}")
    meta = None if rebuild else _cache_is_fresh(path, eot_id, log)
    if meta is None:
        if log:
            log(f"converting {path} to a binary token file (once; reused while the .jsonl is unchanged)")
        meta = convert_jsonl(path, eot_id=eot_id)
    bin_path, _ = cache_paths(path)
    tokens = np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["num_tokens"],))
    if vocab_size is not None and meta["max_id"] >= vocab_size:
        where = f" (line {meta['max_id_line']})" if meta.get("max_id_line") else " (the end-of-text id)"
        tok = meta.get("tokenizer") or {}
        hint = f"; its tokenizer {tok.get('name')!r} has {tok['n_vocab']} tokens" if tok.get("n_vocab") else ""
        raise DataError(f"{path} contains token id {meta['max_id']}{where}, but --vocab_size is {vocab_size}"
                        f"{hint}. Use --vocab_size {max(meta['max_id'] + 1, tok.get('n_vocab') or 0)} "
                        "(or re-tokenize with the tokenizer you meant).")
    return TokenDataset(path, tokens, meta)


def check_same_tokenizer(train, val):
    """Raise DataError if two datasets were tokenized by different tokenizers (per their sidecars)."""
    if not same_tokenizer(train.tokenizer, val.tokenizer):
        def name(t):
            return f"{t.get('type')}:{t.get('name')} (n_vocab {t.get('n_vocab')}, sha256 {str(t.get('sha256'))[:12]})"
        raise DataError(f"train and validation data were tokenized differently: {train.path} by "
                        f"{name(train.tokenizer)}, {val.path} by {name(val.tokenizer)}. "
                        "Re-tokenize both with the same tokenizer.")


def find_story_starts(dataset, seq_len):
    """The positions where a story starts and a whole window of seq_len + 1 tokens fits: 0 and each one
    right after an end-of-text token, below len - seq_len. Sorted, uint32 (int64 for files of 2^32
    tokens or more).

    One pass over the tokens, SCAN_TOKENS at a time, so that a memory-mapped file is never compared
    whole (its mask alone would be a byte a token: 500 MB for 500M tokens). Memory: the mask of a chunk,
    16 MB, and the table, 4 bytes a story (held twice while its pieces are joined): a 500M-token file
    of 200-token stories has 2.5M of them, 10 MB. find_story_starts_plain() is the obvious version.
    """
    eot = dataset.meta.get("eot_id")
    if eot is None:
        raise DataError(f"{dataset.path}: the end-of-text id is unknown (its tokenizer sidecar names none), so "
                        "--story_starts cannot find where stories start; leave the flag out")
    tokens, fits = dataset.tokens, len(dataset.tokens) - seq_len  # a window starting before `fits` fits
    dtype = np.uint32 if len(tokens) < 2**32 else np.int64
    parts = [np.zeros(1, dtype=dtype)]   # the first story starts at 0
    for lo in range(0, fits - 1, SCAN_TOKENS):
        hi = min(lo + SCAN_TOKENS, fits - 1)
        ends = np.flatnonzero(tokens[lo:hi] == eot)   # end-of-text at lo + i: a story starts at lo + i + 1
        parts.append((ends + (lo + 1)).astype(dtype))
    return np.concatenate(parts)


def find_story_starts_plain(dataset, seq_len):
    """find_story_starts() the obvious way, for tests to compare against (the whole file's mask at once)."""
    tokens = np.asarray(dataset.tokens)
    after_eot = np.flatnonzero(tokens[:-1] == dataset.meta["eot_id"]) + 1
    starts = np.concatenate([[0], after_eot])
    return starts[starts < len(tokens) - seq_len]


class RandomBatches:
    """Random training windows from a seeded generator; its state can be saved and restored.

    Each call to next() draws batch_size start offsets uniformly from all
    len - seq_len possible windows and returns (x, y), both (B, T) int64, y = x shifted.
    With story_starts, the offsets are drawn uniformly from the stories' starts instead
    (find_story_starts(): computed once); a window may still run on into the next story.
    """

    def __init__(self, dataset, batch_size, seq_len, seed=0, story_starts=False):
        n = len(dataset.tokens)
        if n < seq_len + 1:
            raise DataError(f"{dataset.path} has {n} tokens, fewer than one window of seq_len + 1 = "
                            f"{seq_len + 1}; use a smaller --seq_len or more data")
        self.tokens, self.batch_size, self.seq_len = dataset.tokens, batch_size, seq_len
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.starts = None  # None: a window may start anywhere
        if story_starts:
            self.starts = find_story_starts(dataset, seq_len)
        self.num_windows = n - seq_len if self.starts is None else len(self.starts)
        self.batches_drawn = 0
        self._offsets = np.arange(seq_len + 1)
        self._idx = np.empty((batch_size, seq_len + 1), dtype=np.int64)

    def next(self):
        starts = self.rng.integers(0, self.num_windows, size=self.batch_size)
        if self.starts is not None:
            starts = self.starts[starts]                                # the stories' starts drawn
        np.add(starts[:, None], self._offsets, out=self._idx)          # (B, T+1) token positions
        window = self.tokens[self._idx].astype(np.int64)                # reads only these pages
        self.batches_drawn += 1
        return window[:, :-1], window[:, 1:]

    def state(self):
        """JSON-able position: the generator state and how many batches were drawn."""
        return {"bit_generator": self.rng.bit_generator.state, "batches_drawn": self.batches_drawn}

    def set_state(self, state):
        """Restore a state() (ValueError, TypeError or OverflowError for one that is not such a record)."""
        if type(state["batches_drawn"]) is not int or not 0 <= state["batches_drawn"] < 2**63:
            raise ValueError(f"batches_drawn {state['batches_drawn']!r} is not a count of batches")
        self.rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = state["batches_drawn"]


def num_eval_windows(dataset, seq_len):
    """How many non-overlapping windows of seq_len + 1 tokens the dataset holds."""
    return (len(dataset.tokens) - 1) // seq_len


def eval_batches(dataset, batch_size, seq_len, max_batches=None):
    """Deterministic pass over non-overlapping windows: window i is tokens[i*T : i*T + T + 1].

    Every token after the first is a target exactly once (except a tail shorter
    than a window). With max_batches, evenly spaced windows across the whole set
    are used instead of all of them, so a capped evaluation still sees all of it.
    """
    n_windows = num_eval_windows(dataset, seq_len)
    if n_windows < 1:
        raise DataError(f"{dataset.path} has {len(dataset.tokens)} tokens, fewer than one window of "
                        f"seq_len + 1 = {seq_len + 1}; use a smaller --seq_len or more validation data")
    windows = np.arange(n_windows)
    if max_batches is not None and max_batches * batch_size < n_windows:
        windows = np.linspace(0, n_windows - 1, max_batches * batch_size).round().astype(np.int64)
    offsets = np.arange(seq_len + 1)
    for i in range(0, len(windows), batch_size):
        idx = windows[i:i + batch_size, None] * seq_len + offsets       # (b, T+1)
        window = dataset.tokens[idx].astype(np.int64)
        yield window[:, :-1], window[:, 1:]


def main(argv=None):
    vocab, eot = FIELD_RANGES["vocab_size"], Number(int, 0, FIELD_RANGES["vocab_size"].high - 1)
    parser = Parser(description="Convert tokenized .jsonl files to the binary token cache "
                                "(train.py does this itself when needed) and print what is in them.")
    parser.add_argument("files", nargs="+", help="tokenized .jsonl files (one JSON array of ids per line)")
    parser.add_argument("--vocab_size", type=vocab, default=None, help=f"check every id is below this, {vocab}")
    parser.add_argument("--eot_id", type=eot, default=None,
                        help=f"end-of-text id to join lines of a plain .jsonl, {eot} (default: from the sidecar, "
                             f"else {GPT2_EOT_ID} for vocab {GPT2_VOCAB_SIZE}, else vocab_size - 1)")
    parser.add_argument("--rebuild", action="store_true", help="convert again even if the cache is fresh")
    args = parser.parse_args(argv)
    try:
        # each file's cache (X.tokens.bin, X.tokens.json) is written next to it: never onto another file given
        outputs = [p for path in args.files for p in cache_paths(path)]
        refuse_inputs(outputs, [("tokenized file", path) for path in args.files] +
                      [("tokenizer sidecar", sidecar_path(path)) for path in args.files], error=DataError)
        for path in args.files:
            ds = load_dataset(path, vocab_size=args.vocab_size, eot_id=args.eot_id, rebuild=args.rebuild,
                              log=lambda m: print(m, file=sys.stderr))
            print(ds)
    except UserError as e:
        parser.exit(1, f"error: {e}\n")
    except OSError as e:  # a folder that cannot be written to, a full disk
        parser.exit(1, f"error: {e.filename or args.files[0]}: {e.strerror}\n")
    except KeyboardInterrupt:  # a cache being written is removed (atomic_write): the next load converts again
        parser.exit(130, "interrupted; no partial token cache is left\n")
    return 0


if __name__ == "__main__":
    main()
