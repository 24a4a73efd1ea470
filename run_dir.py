"""[training run] A training run's folder (--save_dir): which run trains there, its checkpoints, one writer at a time.

    run_dir = RunDir("checkpoints_small")
    with run_dir.lock():                        # a second train.py on the folder is refused
        run_dir.clean_temp()                    # what a kill in the middle of a checkpoint write left
        path = run_dir.choose_resume()          # what a bare --resume continues
        run_dir.write_run_id(run_id)            # this run trains here now

The folder holds checkpoint_step_N.npz and checkpoint_final.npz (the format: checkpoint.py),
metrics.jsonl (metrics.py), run.json (the id of the run that last trained there, so that a
bare --resume continues that run, never a newer checkpoint an earlier run left in the folder)
and train.lock (held by the train.py writing there). Only checkpoint metas are read here,
never the weights.
"""
import glob
import json
import math
import os
import re
import secrets
import socket
import time
from typing import NamedTuple

from atomic import atomic_write, refuse_inputs
from checkpoint import read_meta
from errors import CheckpointError
from untrusted import read_json

try:
    import fcntl
except ImportError:  # not a POSIX system: save_dir locks are skipped
    fcntl = None

_STEP_RE = re.compile(r"checkpoint_step_(\d+)\.npz$")
FINAL = "checkpoint_final.npz"
RUN_FILE = "run.json"        # the id of the run that last trained in the folder
LOCK_FILE = "train.lock"     # held (flock) by the train.py writing to the folder; holds its pid
METRICS_FILE = "metrics.jsonl"


def step_name(step):
    return f"checkpoint_step_{step}.npz"


def new_run_id():
    """A readable, unique id for a fresh training run: its start time and a random suffix."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class Found(NamedTuple):
    """A checkpoint file of the folder."""
    step: object       # the step in its meta; None if it has none, or is unreadable
    path: str
    run_id: object     # None for checkpoints written before runs had ids
    error: object      # why the file is unreadable, else None

    @property
    def newness(self):
        """Where it sorts among the folder's checkpoints, newest highest: its step; for an unreadable
        file the step in its name (an unreadable final checkpoint above all: it was written last)."""
        if self.error is None:
            return -1 if self.step is None else self.step
        m = _STEP_RE.search(self.path)
        return int(m.group(1)) if m else math.inf


class RunDir:
    def __init__(self, save_dir):
        self.save_dir = str(save_dir)
        self.metrics_path = self.path(METRICS_FILE)

    def path(self, name):
        return os.path.join(self.save_dir, name)

    def lock(self):
        """The folder's lock, held until the returned SaveDirLock is released (a context manager)."""
        return SaveDirLock(self.save_dir)

    def check_not_inputs(self, inputs):
        """CheckpointError when a file the run rewrites in the folder (metrics.jsonl, run.json, train.lock) is
        one of inputs ((what, path) pairs, None paths ignored): data kept under such a name would be lost."""
        refuse_inputs([self.path(name) for name in (METRICS_FILE, RUN_FILE, LOCK_FILE)], inputs,
                      error=CheckpointError)

    def clean_temp(self):
        """Delete the checkpoint_*.tmp files a crash in the middle of a checkpoint write left."""
        for stale in glob.glob(self.path("checkpoint_*.tmp")):
            try:
                os.unlink(stale)
            except FileNotFoundError:  # gone already
                pass
            except OSError as e:  # a folder we may not write to: the run could not save either
                raise CheckpointError(f"cannot remove {stale}, left by an interrupted checkpoint write: {e.strerror}; "
                                      f"give write permission to {self.save_dir}, or pass another --save_dir") from None

    def checkpoints(self):
        """Every checkpoint_step_N.npz and checkpoint_final.npz in the folder, newest first (a final
        checkpoint before a step file of the same step). Unreadable ones are listed with their error."""
        try:  # glob says nothing of a folder it may not list: it would look empty
            os.scandir(self.save_dir).close()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise CheckpointError(f"cannot list {self.save_dir}: {e.strerror}; give read permission to it, or pass "
                                  "another --save_dir") from None
        found = []
        for path in glob.glob(self.path("checkpoint_*.npz")):
            if not _STEP_RE.search(path) and os.path.basename(path) != FINAL:
                continue
            try:
                meta = read_meta(path)
                found.append(Found(meta.get("step"), path, meta.get("run_id"), None))
            except CheckpointError as e:
                found.append(Found(None, path, None, e))
        found.sort(key=lambda f: (f.newness, f.path.endswith(FINAL)), reverse=True)
        return found

    def latest(self, run_id=None):
        """Path of the readable checkpoint with the highest step, of run run_id if given (None if there
        is none). A final checkpoint wins over a step file of the same step."""
        for f in self.checkpoints():
            if f.error is None and (run_id is None or f.run_id == run_id):
                return f.path
        return None

    def earlier_run(self):
        """What the folder's checkpoints are, in words ("a finished run (PATH, step N)"), for a fresh run
        that would replace them; None when it holds none."""
        found = self.checkpoints()
        if not found:
            return None
        final = [f for f in found if os.path.basename(f.path) == FINAL]
        newest = (final or found)[0]
        state = f"step {newest.step}" if newest.error is None else f"unreadable: {newest.error}"
        return ("a finished run" if final else "checkpoints of an earlier run") + f" ({newest.path}, {state})"

    def write_run_id(self, run_id):
        with atomic_write(self.path(RUN_FILE), "w", encoding="utf-8") as f:
            f.write(json.dumps({"run_id": run_id, "pid": os.getpid(), "time": round(time.time(), 3)}) + "\n")

    def read_run_id(self):
        """The id of the run that last trained in the folder, or None (no record, or an unreadable one)."""
        try:
            run_id = read_json(self.path(RUN_FILE), RUN_FILE).get("run_id")
        except (OSError, ValueError, AttributeError):  # ValueError: not a regular file, or bad JSON
            return None
        return run_id if isinstance(run_id, str) else None

    def choose_resume(self):
        """The checkpoint a bare --resume continues: the newest of the run that last trained here.

        Never a newer checkpoint of an earlier run that happens to share the folder; a folder whose
        checkpoints cannot be told apart (several runs, no record of the last) is refused, saying what to do.
        """
        save_dir = self.save_dir
        found = self.checkpoints()
        if not found:
            raise CheckpointError(f"--resume: no checkpoint_*.npz in {save_dir}; pass --resume PATH or start "
                                  "without --resume")
        last = self.read_run_id()
        readable = [f for f in found if f.error is None]
        if not readable:
            raise CheckpointError(f"--resume: no readable checkpoint in {save_dir}: {found[0].error}")
        if last is not None:
            mine = [f for f in readable if f.run_id == last]
        elif len({f.run_id for f in readable}) == 1:
            mine = readable
        else:
            newest = {}
            for f in readable:
                newest.setdefault(f.run_id, f)
            runs = "; ".join(f"run {r or '(no id)'}: {f.path} (step {f.step})" for r, f in newest.items())
            raise CheckpointError(f"--resume: {save_dir} holds checkpoints of several runs and no {RUN_FILE} "
                                  f"saying which ran last ({runs}); name the one to continue with --resume PATH")
        if not mine:
            other = readable[0]
            raise CheckpointError(f"--resume: the last run in {save_dir} (run {last}) wrote no checkpoint; the "
                                  f"checkpoints there belong to an earlier run (newest: {other.path}, step {other.step}). "
                                  f"Start afresh without --resume, or continue that run with --resume {other.path}")
        chosen = mine[0]
        damaged = [f for f in found if f.error is not None and f.newness > chosen.newness]
        if damaged:
            raise CheckpointError(f"--resume: {damaged[0].path} cannot be read ({damaged[0].error}), so the newest "
                                  f"checkpoint of the run is unknown; move that file away, or name one with "
                                  f"--resume PATH (e.g. {chosen.path}, step {chosen.step})")
        return chosen.path


class SaveDirLock:
    """An exclusive lock on a save_dir, so that two train.py runs never write into one folder.

    fcntl.flock on save_dir/train.lock: the kernel drops it when the process ends, however it ends
    (kill -9 included), so a crashed run never leaves the folder locked. The file holds the pid of
    the process holding the lock, for the message a second writer gets.
    """

    def __init__(self, save_dir):
        self.path = os.path.join(str(save_dir), LOCK_FILE)
        try:
            os.makedirs(str(save_dir), exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise CheckpointError(f"cannot use {save_dir} as the checkpoint folder ({e.strerror}); pass another "
                                  "--save_dir") from None
        if fcntl is None:  # not a POSIX system: no lock
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another process
            holder = os.pread(self.fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise CheckpointError(f"{save_dir} is in use by another training run ({holder}); wait for it to end "
                                  "or stop it, or pass another --save_dir") from None
        except OSError:  # a file system without locks (some network mounts): go on unlocked
            return
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the file stays (deleting it would race)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
