"""[engine] Crash-safe file writes: the target is always either the old complete file or the new one.

Checkpoints, token caches, tokenized data, prepared stories and BPE models are written through
atomic_write, so an interrupted run never leaves a truncated file that looks valid.

    from atomic import atomic_write
    with atomic_write("data/out.txt", "w", encoding="utf-8") as f:   # or "wb", "w+b"
        f.write(text)
"""
import contextlib
import os
import secrets


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
