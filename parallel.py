"""Every core busy: the batch split into shards, one thread per core.

NumPy's matrix products (BLAS) use all the cores, but its element-wise work (exp, softmax,
layer norm, additions) runs on one. On a 2-core machine that leaves a core idle for a
third of a training step. Instead, `ShardRunner` splits the batch into one shard per core
and runs each shard's whole forward and backward pass in its own thread, with BLAS held to
one thread so that the shards do not fight over the cores. NumPy releases Python's GIL
inside its loops and products, so the threads do run at the same time. Each shard adds
into its own flat gradient array; `sum_into` then adds them up, every thread its own slice
of the arrays over all shards in a fixed order, so the result does not depend on which
thread finished first, nor on how many threads share the sum.

optimizer.py shares its element-wise update out over the same kind of runner.

threadpoolctl finds the BLAS library NumPy loaded (OpenBLAS, MKL, BLIS) and sets its thread
count. Where it finds none it cannot limit, everything runs in the calling thread as before.
"""
from concurrent.futures import ThreadPoolExecutor, wait

from threadpoolctl import ThreadpoolController

_controller = None


def blas_controller():
    global _controller
    if _controller is None:  # inspecting the loaded libraries takes a few ms: once is enough
        _controller = ThreadpoolController()
    return _controller


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
