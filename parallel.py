"""[engine] Every core busy: the batch split into shards, one thread per core.

NumPy's matrix products (BLAS) use all the cores, but its element-wise work (exp, softmax,
layer norm, additions) runs on one. On a 2-core machine that leaves a core idle for a
third of a training step. Instead, `Shards` splits the batch into one shard of rows per core
and runs each shard's whole forward and backward pass in its own thread (`ShardRunner`),
with BLAS held to one thread so that the shards do not fight over the cores. NumPy releases
Python's GIL inside its loops and products, so the threads do run at the same time. Each
shard adds into its own flat gradient array (the first into the model's own); `sum_into` then
adds them up, every thread its own slice of the arrays over all shards in a fixed order, so
the result does not depend on which thread finished first, nor on how many threads share the sum.

`split_rows` cuts a batch's rows for the workers here and for the MPI ranks (distributed.py)
alike: N ranks of one worker each then compute exactly the shards of one process with N workers.

optimizer.py shares its element-wise update out over the same kind of runner, and the
tokenizer's passes over a file share it out over processes (`start_workers`). `cores()` is how
many cores this process may run on, for every default that follows the machine.

threadpoolctl finds the BLAS library NumPy loaded (OpenBLAS, MKL, BLIS) and sets its thread
count. Where it finds none it cannot limit, everything runs in the calling thread as before.
"""
import ctypes
import multiprocessing
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
from threadpoolctl import ThreadpoolController

from device import whole_arrays

_controller = None


def blas_controller():
    global _controller
    if _controller is None:  # inspecting the loaded libraries takes a few ms: once is enough
        _controller = ThreadpoolController()
    return _controller


def available_cores():
    """The cores this process may run on (its CPU affinity: a launcher or taskset may allow fewer than
    the machine has)."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return frozenset(range(os.cpu_count() or 1))


def cores():
    """How many cores this process may run on."""
    return len(available_cores())


def blas_threads():
    """How many threads NumPy's BLAS uses (normally one per core), or 1 where there is no BLAS we can limit."""
    blas = blas_controller().select(user_api="blas")
    return max(1, min((lib.num_threads for lib in blas.lib_controllers), default=1))


class ShardRunner:
    """Runs fn(shard) for a list of shards, one per thread, the first in the calling thread."""

    def __init__(self, n_workers=None):
        self.n_workers = blas_threads() if n_workers is None else max(1, n_workers)
        self.pool = ThreadPoolExecutor(self.n_workers - 1) if self.n_workers > 1 else None

    def map(self, fn, shards):
        if len(shards) > self.n_workers:
            raise ValueError(f"{len(shards)} shards for {self.n_workers} workers")
        if len(shards) == 1:
            return [fn(shards[0])]
        with blas_controller().limit(limits=1, user_api="blas"):
            others = [self.pool.submit(fn, s) for s in shards[1:]]
            try:
                first = fn(shards[0])
            finally:
                wait(others)  # none may still run when BLAS gets its threads back
            return [first] + [f.result() for f in others]


ALIGN = 1024  # slices start at multiples of this many elements: no two threads write one cache line


def slices(size, n):
    """range(size) cut into at most n contiguous (lo, hi) ranges of one size (a multiple of ALIGN, the
    last one shorter): one per thread for element-wise work on a flat array."""
    share = -(-size // n // ALIGN) * ALIGN or ALIGN
    return [(lo, min(lo + share, size)) for lo in range(0, size, share)]


def sum_into(arrays, runner):
    """arrays[0] += arrays[1] + arrays[2] + ..., in place, for same-size 1-D arrays.

    Each of the runner's threads adds up one contiguous slice, over the arrays in their order:
    every element is ((a0 + a1) + a2) + ..., the same sum whatever the number of threads.
    """
    if len(arrays) < 2:
        return
    total, rest = arrays[0], arrays[1:]

    def add(bounds):
        lo, hi = bounds
        part = total[lo:hi]
        for a in rest:
            part += a[lo:hi]

    runner.map(add, slices(total.size, runner.n_workers))


def zero(arrays, runner):
    """a[...] = 0 for same-size 1-D arrays, each of the runner's threads one slice of each."""
    def clear(bounds):
        lo, hi = bounds
        for a in arrays:
            a[lo:hi].fill(0)

    runner.map(clear, slices(arrays[0].size, runner.n_workers))


def split_rows(n_rows, parts):
    """[(a, b)]: rows range(n_rows) cut into `parts` contiguous slices whose sizes differ by at most
    one, in order (some empty when there are fewer rows than parts). The workers of a process cut a
    batch with it, the MPI ranks too: N ranks of one worker each compute what N workers compute."""
    bounds = np.linspace(0, n_rows, parts + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class Shards:
    """The workers of one process and what each owns: a thread, a gradient buffer (the first
    worker's are the model's own gradients, the others' are made here) and a workspace.

    run(fn, idx, targets) calls fn(rows of idx, rows of targets, grads, workspace, first row) for
    every worker's contiguous slice of the batch (first row: where the slice starts in idx, for what
    depends on a row's place in the batch, as dropout's masks do), all at once, then adds the other
    workers' gradients into the model's: fn adds its gradients into grads, and the model's gradients
    gain the whole batch's. With backward=False (evaluation) fn gets no buffer and nothing is added. Without
    gradients at all (a model for generation) only the workspaces are kept. On the whole-array
    path (the GPU's) one worker takes the whole batch.
    """

    def __init__(self, n_workers, grads, new_grads, new_workspace):
        self.runner = ShardRunner(n_workers)
        n = self.runner.n_workers
        self.grads = [grads] + [new_grads() for _ in range(n - 1)] if grads is not None else [None] * n
        self.workspaces = [new_workspace() for _ in range(n)]
        self.cleared = False  # the other workers' buffers zeroed by zero_grad() and not used since

    @property
    def n_workers(self):
        return self.runner.n_workers

    def zero_grad(self):
        """Zero the model's gradients and the other workers' buffers, each thread its slice of every
        buffer: no thread zeroes more than it would in a pass."""
        zero([g.flat for g in self.grads], self.runner)
        self.cleared = True

    def run(self, fn, idx, targets, backward=True):
        """[fn(...) of each worker's rows], in the rows' order (see the class)."""
        n = 1 if whole_arrays(idx) else min(self.n_workers, len(idx))
        rows = split_rows(len(idx), n)
        cleared, self.cleared = self.cleared, self.cleared and not backward

        def work(i):
            a, b = rows[i]
            if backward and i > 0 and not cleared:
                self.grads[i].flat.fill(0)  # this pass's gradients alone: they are added into the model's
            return fn(idx[a:b], targets[a:b], self.grads[i] if backward else None, self.workspaces[i], a)

        results = self.runner.map(work, range(n))
        if backward:
            # each thread adds up its own slice of the flat arrays, every element over the workers
            # in the same order: the sum does not depend on thread timing
            sum_into([g.flat for g in self.grads[:n]], self.runner)
        return results


def start_workers(workers, initializer=None, initargs=()):
    """A pool of worker processes; callers start it before their progress bar (see below).

    Forked while this process runs no other thread: the workers inherit what it has loaded (tokenizing
    the 1.4 MB sample on the 2-core machine took 0.4-0.6 s forked, 0.7-1.5 s with forkserver or spawn).
    Forking a process that runs threads can deadlock (Python 3.12 warns), and a tqdm bar starts a
    monitor thread that outlives it; so with another thread running, or where fork is missing,
    forkserver or spawn start fresh workers, which run initializer(*initargs).
    """
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork").Pool(workers)
    method = "forkserver" if "forkserver" in methods else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer, initargs)


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel (the
    scripts that train call it first thing: it sets how the whole process allocates).

    A training step allocates and frees the same few hundred MB of temporaries every time.
    By default glibc returns blocks over 32 MB (served by mmap) and the free top of its heap
    to the kernel, so the next step page-faults on every 4 KB page of them again. Measured on
    the guide's Medium model (2 cores): 37,000 page faults and 4.8-5.4 s a step before,
    none and 3.5-3.8 s after, same peak memory. Does nothing where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # from glibc's malloc.h
        libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap too, where they can be reused
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # never shrink the heap
        libc.mallopt(M_ARENA_MAX, 1)  # worker threads too: their own arenas give memory back
    except (OSError, AttributeError):
        pass
