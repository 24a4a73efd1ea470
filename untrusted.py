"""[engine] Reading files we did not write: every input must be a regular file of a plausible size, and its JSON
is parsed within limits; anything else is one error naming the file (the reading side of atomic.py).

A path can name a FIFO (opening it waits for a writer, forever), a device (/dev/zero never ends), a
folder, or a file far larger than what it claims to be. open_regular opens without blocking
(O_NONBLOCK), then checks what it opened with fstat, so nothing slips in between a check and the open;
parse_json turns what json.loads raises on hostile text (nesting deeper than Python's recursion limit,
an integer of more than Python's 4,300 digits, NaN or Infinity, bad UTF-8) into the same one error.

    from untrusted import open_regular, read_json
    with open_regular(path, "rb", what="checkpoint", error=CheckpointError) as f: ...
    config = read_json(path, "config.json", error=HFError)
"""
import json
import os
import stat

MAX_JSON_BYTES = 1 << 24  # a config.json, run.json, sidecar or cache record: a few KB in practice
_KINDS = {stat.S_IFIFO: "a FIFO (named pipe): reading it could wait forever",
          stat.S_IFCHR: "a character device (such as /dev/zero)", stat.S_IFBLK: "a block device",
          stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket"}


def check_regular(path, st, what="file", max_bytes=None, error=ValueError):
    """error(...) unless the stat result st of path is a regular file of at most max_bytes."""
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise error(f"{path} is {kind}, not a {what}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{path} is {st.st_size / 1e6:,.1f} MB, more than a {what} can be (at most "
                    f"{max_bytes / 1e6:,.0f} MB): is it the right file?")
    return st


def regular_file(path, what="file", max_bytes=None, error=ValueError):
    """The os.stat of path (a link is followed), refused as check_regular says; OSError as os.stat raises it."""
    return check_regular(path, os.stat(path), what, max_bytes, error)


def open_regular(path, mode="rb", what="file", max_bytes=None, error=ValueError, **open_kwargs):
    """open(path, mode) for reading, refused with error(...) unless it is a regular file of at most
    max_bytes; OSError (not found, no permission) as open() raises it."""
    if any(c in mode for c in "wax+"):
        raise ValueError(f"open_regular reads; got mode {mode!r}")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        check_regular(path, os.fstat(fd), what, max_bytes, error)
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **open_kwargs)
    except BaseException:
        os.close(fd)
        raise


def parse_json(text, source, error=ValueError, hint=""):
    """json.loads(text) for untrusted text (str or bytes); error(f"{source}: malformed JSON (why){hint}") for
    anything it cannot take: bad syntax or UTF-8, NaN/Infinity (not JSON), an integer over Python's digit
    limit, nesting deeper than the recursion limit."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except RecursionError:
        raise error(f"{source}: malformed JSON (nested too deeply){hint}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise error(f"{source}: malformed JSON ({e}){hint}") from None


def _not_json(name):
    raise ValueError(f"{name} is not a JSON value")


def read_json(path, what="JSON file", max_bytes=MAX_JSON_BYTES, error=ValueError, hint=""):
    """parse_json of a whole file that must be a regular file of at most max_bytes (OSError as open raises it)."""
    with open_regular(path, "rb", what, max_bytes, error) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew since fstat
        raise error(f"{path} is more than {max_bytes / 1e6:,.0f} MB, more than a {what} can be")
    return parse_json(data, path, error, hint)
