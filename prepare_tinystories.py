"""[command] Download TinyStories and write it one story per line, ready for tokenizer.py.

    python3 prepare_tinystories.py --data_dir data --sample_size 10000   # first 10K train stories, streamed
    python3 prepare_tinystories.py --data_dir data --full                # whole dataset (about 2.2 GB)
    python3 prepare_tinystories.py --data_dir data --offline             # bundled sample, no network

Outputs (in --data_dir):
    tinystories_train_sample.txt, tinystories_valid_sample.txt    (sample mode and --offline)
    tinystories_train.txt, tinystories_valid.txt                  (--full; the raw downloads stay in raw/)
one story per line, whitespace inside a story collapsed to single spaces, empty stories dropped.
Stories are split on the dataset's `<|endoftext|>` lines. Text with no such marker at all (the
bundled validation sample, exported by the dataset viewer, separates stories *and* paragraphs by
blank lines) is split heuristically: a blank-line paragraph that opens like a story ("Once upon a
time", "Once there was", "There once was", ...) starts a new story, any other paragraph continues the
current one. That finds 416 stories in the bundled sample; a story that opens differently is
merged into the one before it, which costs nothing for language modelling.

Downloads (requests) stream to disk with a progress bar, retry with exponential backoff, resume
a partial file with an HTTP Range request (or start over when the server ignores Range), check
the size the server announced (and a sha256 where one is known), and only rename the finished,
checked file into place, so an interrupted run never leaves a file that looks complete: the next
run resumes `NAME.part`. `--sample_size N` streams the train file and stops after N stories.
With no network, `--offline` uses data/sample/; in sample mode a failed download also falls back
to it, with a clear message (`--no_fallback` turns that off).
"""
import argparse
import codecs
import errno
import hashlib
import os
import re
import sys
import time
from pathlib import Path

import requests

from atomic import atomic_write, refuse_inputs
from errors import DownloadError, UserError, say
from flag_types import COUNT, SECONDS, SECONDS_OR_ZERO, Number, Parser
from pretokens import ENDOFTEXT

HF_BASE_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
FILES = {"V2": ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"),
         "V1": ("TinyStories-train.txt", "TinyStories-valid.txt")}
# sha256 / size of remote files where known (none are published for the official files; the
# downloader then checks the size the server announces). Tests add entries for their local server.
KNOWN_SHA256 = {}
SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "sample"
BUNDLED_TRAIN = SAMPLE_DIR / "TinyStoriesV2-GPT4-train.sample.txt"
BUNDLED_VALID = SAMPLE_DIR / "TinyStories-valid.sample.txt"
# Paragraph openings that start a new story in text without <|endoftext|> markers.
STORY_START = re.compile(r"^(Once upon a time|Once there (was|were|lived)|There once (was|were|lived)|"
                         r"Once,? (a|an|the|in|on|there)\b|Long ago|A long time ago)")


RETRIES = Number(int, 0, 100)  # failed requests in a row before giving up
MAX_DELAY = 3600.0  # the longest wait before a retry, however many came before


class _Retry(Exception):
    """A transient problem: retry (resuming where possible)."""


# ----------------------------------------------------------------------------------------------
# Turning raw text into one story per line

def normalize_story(text):
    """One line: runs of whitespace (newlines included) become one space; ends trimmed."""
    return " ".join(text.split())


class StorySplitter:
    """Incremental splitter on <|endoftext|>: feed text pieces, get complete stories back."""

    def __init__(self):
        self.buf = ""
        self.saw_marker = False

    def feed(self, text):
        self.buf += text
        parts = self.buf.split(ENDOFTEXT)
        self.buf = parts.pop()  # the unfinished tail (a marker may be cut in two: kept for the next piece)
        if parts:
            self.saw_marker = True
        return [s for s in map(normalize_story, parts) if s]

    def finish(self):
        """The stories left at the end of the text (heuristic paragraph split if there was no marker)."""
        tail, self.buf = self.buf, ""
        if not self.saw_marker:
            return split_unmarked(tail)
        s = normalize_story(tail)
        return [s] if s else []


def split_unmarked(text):
    """Stories from text without <|endoftext|>: blank-line paragraphs, grouped at story openings."""
    stories, current = [], []
    for para in re.split(r"\n\s*\n", text):
        para = normalize_story(para)
        if not para:
            continue
        if current and STORY_START.match(para):
            stories.append(" ".join(current))
            current = []
        current.append(para)
    if current:
        stories.append(" ".join(current))
    return stories


def split_stories(text):
    """All stories of a whole text (the non-streaming form of StorySplitter)."""
    sp = StorySplitter()
    return sp.feed(text) + sp.finish()


def _atomic_lines(path, stories):
    """Write stories (an iterable of one-line strings) to path atomically; return (count, bytes)."""
    n = size = 0
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        for s in stories:
            f.write(s + "\n")
            n += 1
            size += len(s.encode("utf-8")) + 1
    return n, size


def _limited(stories, limit):
    if limit is None:
        yield from stories
        return
    for i, s in enumerate(stories):
        if i >= limit:
            return
        yield s


def stories_from_file(path, chunk_size=1 << 20):
    """Stream the stories of a local raw file (memory stays bounded for the 2.2 GB train file)."""
    sp = StorySplitter()
    dec = codecs.getincrementaldecoder("utf-8-sig")("replace")  # -sig: a byte-order mark is not text
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_size)
            if not raw:
                break
            yield from sp.feed(dec.decode(raw))
    yield from sp.feed(dec.decode(b"", final=True))
    yield from sp.finish()


# ----------------------------------------------------------------------------------------------
# HTTP: retries, backoff, Range resume, size and checksum checks

def _check_status(r, url):
    if r.status_code in (200, 206):
        return
    if r.status_code == 429 or r.status_code >= 500:
        raise _Retry(f"server error {r.status_code} {r.reason}")
    raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}. Check --base_url and the file name, "
                        "or use --offline for the bundled sample")


def _range_start_total(r):
    """(start, total) from a 206's Content-Range 'bytes a-b/N' (total None when '*')."""
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", ""))
    if not m:
        raise _Retry(f"bad Content-Range {r.headers.get('Content-Range')!r}")
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def _no_network(err):
    """A host name that does not resolve: retrying will not help (we are offline)."""
    return isinstance(err, requests.ConnectionError) and ("NameResolution" in str(err) or "resolve" in str(err))


def _retry_or_give_up(url, err, attempt, retries, backoff, kept=""):
    """After failed attempt number `attempt` in a row: wait (doubling each time) or raise DownloadError."""
    if _no_network(err):
        raise DownloadError(f"cannot reach {url}: no network ({err}). Use --offline") from None
    if attempt > retries:
        raise DownloadError(f"could not download {url} after {retries + 1} attempts in a row "
                            f"(last error: {err}){kept}. Try again later, or use --offline") from None
    delay = min(backoff * 2.0 ** min(attempt - 1, 64), MAX_DELAY)
    say(f"download: {url}: {err}; retry {attempt}/{retries} in {delay:.3g} s")
    time.sleep(delay)


def stream_url(url, retries=5, backoff=1.0, timeout=30, chunk_size=1 << 16, session=None, bar=None):
    """Yield the body of url in chunks. A dropped or truncated connection is resumed with a Range
    request from the byte reached (a server that ignores Range is re-read from the start, skipping
    what was already yielded). Closing the generator early stops the download."""
    session = session or requests.Session()
    pos, total, attempt = 0, None, 0
    while True:
        try:
            headers = {"Range": f"bytes={pos}-"} if pos else {}
            with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
                _check_status(r, url)
                skip = 0
                if r.status_code == 206:
                    start, total = _range_start_total(r)
                    if start != pos:
                        raise _Retry(f"asked for byte {pos}, server sent from {start}")
                else:
                    skip = pos  # a 200 is the whole file again
                    if r.headers.get("Content-Length") is not None:
                        total = int(r.headers["Content-Length"])
                for chunk in r.iter_content(chunk_size):
                    if skip:
                        drop = min(skip, len(chunk))
                        chunk, skip = chunk[drop:], skip - drop
                        if not chunk:
                            continue
                    pos += len(chunk)
                    attempt = 0  # progress was made: the retry budget is for failures in a row
                    if bar is not None:
                        bar.update(len(chunk))
                    yield chunk
            if total is not None and pos < total:
                raise _Retry(f"connection closed after {pos} of {total} bytes")
            return
        except (requests.RequestException, _Retry) as e:
            attempt += 1
            _retry_or_give_up(url, e, attempt, retries, backoff)


def download(url, dest, sha256=None, retries=5, backoff=1.0, timeout=30, chunk_size=1 << 16, progress=True,
             session=None):
    """Download url to dest: resumes dest.part, checks size (and sha256 when given), renames when whole.

    An existing dest is trusted as complete (only a checked file is ever renamed to that name).
    """
    if os.path.exists(dest):
        say(f"download: {dest} already there, not downloading again")
        return dest
    from tqdm import tqdm
    session = session or requests.Session()
    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    attempt, total, bar = 0, None, None
    try:
        while True:
            pos = os.path.getsize(part) if os.path.exists(part) else 0
            try:
                headers = {"Range": f"bytes={pos}-"} if pos else {}
                with session.get(url, headers=headers, stream=True, timeout=timeout) as r:
                    if r.status_code == 416 and pos:  # nothing after pos: whole already, or the file changed
                        m = re.match(r"bytes \*/(\d+)", r.headers.get("Content-Range", ""))
                        if m and int(m.group(1)) == pos:
                            total = pos
                            break
                        os.unlink(part)
                        raise _Retry("the partial file does not fit the server's file; starting over")
                    _check_status(r, url)
                    if r.status_code == 206:
                        start, total = _range_start_total(r)
                        if start != pos:
                            raise _Retry(f"asked for byte {pos}, server sent from {start}")
                        mode = "ab"
                    else:
                        if pos:
                            say(f"download: {url}: server ignores Range; starting over from byte 0")
                        pos, mode = 0, "wb"
                        total = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
                    if bar is None:
                        bar = tqdm(total=total, initial=pos, unit="B", unit_scale=True, file=sys.stderr,
                                   desc=os.path.basename(dest), disable=not progress)
                    else:
                        bar.reset(total=total)
                        bar.update(pos)
                    with open(part, mode) as f:
                        for chunk in r.iter_content(chunk_size):
                            f.write(chunk)
                            pos += len(chunk)
                            bar.update(len(chunk))
                            attempt = 0
                        f.flush()
                        os.fsync(f.fileno())
                if total is not None and pos < total:
                    raise _Retry(f"body truncated: {pos} of {total} bytes")
                if total is not None and pos > total:
                    os.unlink(part)
                    raise _Retry(f"got {pos} bytes, more than the {total} announced; starting over")
                break
            except (requests.RequestException, _Retry) as e:
                attempt += 1
                kept = f"; {part} is kept and the next run resumes it" if os.path.exists(part) else ""
                _retry_or_give_up(url, e, attempt, retries, backoff, kept)
    finally:
        if bar is not None:
            bar.close()
    if sha256:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != sha256:
            os.unlink(part)
            raise DownloadError(f"{url}: sha256 {h.hexdigest()} is not the expected {sha256}; the download was "
                                "deleted, run again to fetch it afresh")
    os.replace(part, dest)
    return dest


def stream_stories(url, limit=None, **kw):
    """The first `limit` stories of a remote raw file (all if None), stopping the download early."""
    sp = StorySplitter()
    dec = codecs.getincrementaldecoder("utf-8-sig")("replace")  # -sig: a byte-order mark is not text
    n = 0
    chunks = stream_url(url, **kw)
    try:
        for chunk in chunks:
            for s in sp.feed(dec.decode(chunk)):
                yield s
                n += 1
                if limit is not None and n >= limit:
                    return
        for s in sp.feed(dec.decode(b"", final=True)) + sp.finish():
            yield s
            n += 1
            if limit is not None and n >= limit:
                return
    finally:
        chunks.close()  # closes the connection when we stop early


# ----------------------------------------------------------------------------------------------
# The three modes

def prepare_offline(data_dir, sample_size=None, valid_size=None):
    """Write the sample outputs from the bundled data/sample/ files."""
    say(f"offline: using the bundled sample in {SAMPLE_DIR} ({BUNDLED_TRAIN.name}: 1,727 stories; "
        f"{BUNDLED_VALID.name}: split into stories by paragraph heuristics)")
    out = {}
    for split, src, limit in (("train", BUNDLED_TRAIN, sample_size), ("valid", BUNDLED_VALID, valid_size)):
        if not src.exists():
            raise DownloadError(f"bundled sample {src} is missing; restore data/sample/ from the repository")
        path = os.path.join(data_dir, f"tinystories_{split}_sample.txt")
        refuse_inputs([path], [("bundled sample", BUNDLED_TRAIN), ("bundled sample", BUNDLED_VALID)], UserError)
        out[split] = (path,) + _atomic_lines(path, _limited(stories_from_file(src), limit))
    if sample_size and out["train"][1] < sample_size:
        say(f"note: the bundled sample has only {out['train'][1]} train stories (asked for {sample_size})")
    return out


def prepare_sample(data_dir, sample_size, valid_size, base_url, dataset="V2", **kw):
    """Stream the first sample_size train stories and valid_size validation stories (None: all)."""
    train_name, valid_name = FILES[dataset]
    out = {}
    from tqdm import tqdm
    progress = kw.pop("progress", True)
    for split, name, limit in (("train", train_name, sample_size), ("valid", valid_name, valid_size)):
        url = f"{base_url.rstrip('/')}/{name}"
        path = os.path.join(data_dir, f"tinystories_{split}_sample.txt")
        say(f"streaming {url} ({'all' if limit is None else f'first {limit}'} stories)")
        with tqdm(unit="B", unit_scale=True, desc=name, file=sys.stderr, disable=not progress) as bar:
            out[split] = (path,) + _atomic_lines(path, stream_stories(url, limit, bar=bar, **kw))
    return out


def prepare_full(data_dir, base_url, dataset="V2", retries=5, backoff=1.0, timeout=30, progress=True):
    """Download both raw files to data_dir/raw/ (resumable) and convert them."""
    out = {}
    for split, name in zip(("train", "valid"), FILES[dataset]):
        raw = os.path.join(data_dir, "raw", name)
        download(f"{base_url.rstrip('/')}/{name}", raw, KNOWN_SHA256.get(name), retries, backoff, timeout,
                 progress=progress)
        path = os.path.join(data_dir, f"tinystories_{split}.txt")
        refuse_inputs([path], [("raw download", raw)], UserError)
        say(f"converting {raw} -> {path}")
        out[split] = (path,) + _atomic_lines(path, stories_from_file(raw))
    return out


def build_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data", help="folder for the outputs (default: data)")
    p.add_argument("--sample_size", type=COUNT, default=10000,
                   help=f"train stories to keep in sample mode, {COUNT}; the download stops once it has them "
                        "(default: 10000)")
    p.add_argument("--valid_size", type=COUNT, default=None,
                   help=f"validation stories to keep in sample mode, {COUNT} (default: the whole validation split)")
    p.add_argument("--full", action="store_true",
                   help="download the whole dataset (about 2.2 GB) and write tinystories_{train,valid}.txt")
    p.add_argument("--offline", action="store_true", help="no network: use the bundled sample in data/sample/")
    p.add_argument("--no_fallback", action="store_true",
                   help="fail instead of falling back to the bundled sample when the download fails")
    p.add_argument("--base_url", default=HF_BASE_URL, help=f"where the raw files are (default: {HF_BASE_URL})")
    p.add_argument("--dataset", default="V2", choices=sorted(FILES),
                   help="V2 = TinyStoriesV2-GPT4-*.txt (GPT-4 stories, default), V1 = TinyStories-*.txt")
    p.add_argument("--retries", type=RETRIES, default=5,
                   help=f"retries in a row after a failed request, {RETRIES} (default: 5)")
    p.add_argument("--backoff", type=SECONDS_OR_ZERO, default=1.0,
                   help=f"seconds before the first retry, doubled for each further one (up to an hour), "
                        f"{SECONDS_OR_ZERO} (default: 1.0)")
    p.add_argument("--timeout", type=SECONDS, default=30.0,
                   help=f"seconds to wait for the server, {SECONDS} (default: 30)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        say(f"error: --data_dir {args.data_dir} is a file, not a folder: name a folder to write the stories to")
        return 1
    net = dict(retries=args.retries, backoff=args.backoff, timeout=args.timeout, progress=not args.quiet)
    try:
        if args.offline:
            if args.full:
                raise DownloadError("--full needs the network; --offline only has the bundled sample")
            out = prepare_offline(args.data_dir, args.sample_size, args.valid_size)
        elif args.full:
            out = prepare_full(args.data_dir, args.base_url, args.dataset, **net)
        else:
            try:
                out = prepare_sample(args.data_dir, args.sample_size, args.valid_size, args.base_url, args.dataset,
                                     **net)
            except DownloadError as e:
                if args.no_fallback:
                    raise
                say(f"\n*** download failed: {e}\n*** FALLING BACK to the bundled offline sample "
                    f"(use --no_fallback to fail instead)\n")
                out = prepare_offline(args.data_dir, args.sample_size, args.valid_size)
    except UserError as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        say("interrupted; a partial download is kept as NAME.part and resumed next time")
        return 130
    except OSError as e:  # a full disk, a folder that cannot be written; a finished file is never left half-written
        why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else e.strerror
        say(f"error: {e.filename2 or e.filename or args.data_dir}: {why}")
        return 1
    for split, (path, n, size) in out.items():
        say(f"{split}: {n} stories, {size / 1e6:.2f} MB -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
