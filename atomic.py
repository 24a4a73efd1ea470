"""[engine] Crash-safe file writes: the target is always either the old complete file or the new one.

Checkpoints, token caches, tokenized data, prepared stories and BPE models are written through
atomic_write, so an interrupted run never leaves a truncated file that looks valid. An output must
never be one of the command's inputs: every script checks its outputs with refuse_inputs before it
writes anything (a results file appended to is an output too: append_line).

    from atomic import atomic_write, append_line, refuse_inputs
    refuse_inputs(["data/out.txt"], [("input text", "data/in.txt")], error=UserError)
    with atomic_write("data/out.txt", "w", encoding="utf-8") as f:   # or "wb", "w+b"
        f.write(text)
    append_line("results.jsonl", json.dumps(record))                  # the old lines and the new, or the old
"""
import contextlib
import os
import secrets

from untrusted import open_regular

MAX_APPEND_BYTES = 1 << 28  # a results file appended to: a record per run, a few KB each


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """Open a temp file next to path for writing; on success it replaces path, on error it is removed.

    mode: a write mode ("w", "wb", "w+b", ...); open_kwargs (encoding, newline, ...) go to open().
    The parent folder is created. The temp file is PATH.<random>.tmp in the same folder, so the
    final os.replace is atomic; it gets the permissions a plain open() would (0666 & ~umask,
    applied by the kernel: the process's umask is never changed, which would race with other
    threads creating files), not mkstemp's private 0600. On a clean exit the file is flushed, fsynced, renamed over path
    and the folder fsynced (best effort). On any exception, KeyboardInterrupt included, the temp
    file is deleted and the exception re-raised. f.name is the temp file's path, for a writer
    that needs a path (a memmap, say) rather than the file object.
    """
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write needs a write mode ('w', 'wb', 'w+b', ...), got {mode!r}")
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = _create_temp(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _create_temp(path):
    """Create PATH.<random>.tmp, new (O_EXCL), with mode 0666 for the kernel to reduce by the umask."""
    for _ in range(100):
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)  # reopened by name, so that f.name is the temp path rather than a number
        return tmp
    raise FileExistsError(f"no free temporary name next to {path}")


def refuse_inputs(outputs, inputs, error=ValueError):
    """error(...) when an output is one of the inputs, before anything is written: the same file (a link
    to it, a hard link, another spelling of its path) would be replaced by, or appended with, what is made
    from it. outputs: paths; inputs: (what, path) pairs. An output that does not exist yet is no input."""
    for out in outputs:
        for what, path in inputs:
            if out is None or path is None:
                continue
            try:
                same = os.path.samefile(out, path)
            except (OSError, ValueError):  # one of them does not exist (yet), or cannot be looked at
                continue
            if same:
                raise error(f"{out} is the {what} {path}: writing it would replace the input; choose another "
                            "output")


def append_line(path, line, max_bytes=MAX_APPEND_BYTES):
    """Add one line to the text file path (created if missing), crash-safe: the file is rewritten through
    atomic_write, so that it holds either its old lines or those and the new one, never half a line; a
    full disk or a kill leaves it as it was. OSError as open() raises it (a folder there, no permission);
    ValueError for a path that is not a regular file or is over max_bytes (not a results file)."""
    path = os.path.realpath(path)  # a link to a results file: that file gets the line, the link stays
    old = b""
    if os.path.lexists(path):
        with open_regular(path, "rb", "results file (JSON lines)", max_bytes) as f:
            old = f.read(max_bytes + 1)
        if old and not old.endswith(b"\n"):
            old += b"\n"  # a last line cut short (by an editor, say) stays a line of its own
    with atomic_write(path, "wb") as f:
        f.write(old + line.rstrip("\n").encode("utf-8") + b"\n")
