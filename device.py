"""[engine] The one seam between NumPy (CPU) and CuPy (NVIDIA GPU): everything that differs between them.

The layers are one copy of the math for both. A function that creates arrays starts with
`xp = get_array_module(x)`, numpy or cupy for the array at hand (as DeZero's dezero/cuda.py
does), and calls xp.empty, xp.exp, ... The rest of what differs is here:

- the scatter-add of the embedding gradient: np.add.at on the CPU, cupyx.scatter_add on the
  GPU (there `a[idx] += v` with a repeated index keeps one of the additions, not all),
- copies between host and device, waiting for the GPU before reading a clock, its memory pool,
  which GPU this process uses (chosen before CuPy touches one: one MPI rank per GPU),
- how the element-wise work runs: in cache-sized blocks shared over threads on the CPU, or on
  whole arrays on the GPU, where each block would be a kernel launch of its own. The whole-array
  path also runs with NumPy inside `whole_array_mode()`, so tests check it without a GPU.
- the array kit the layers of both blocks share (row and column sums, blocks of rows, products
  written into views), each in its CPU form and its whole-array form.

Worth knowing about CuPy: an out-of-range index wraps around instead of raising (token ids are
checked on the host, before the copy: language_model.check_tokens); a reduction returns a 0-d
device array, and float() of one waits for the GPU (a host sync); its random streams differ from
NumPy's (draw on the host, copy once). np.errstate needs no counterpart: CuPy never warns
about floating-point errors, and np.errstate around CuPy calls does nothing.

CuPy is optional: it is imported only for --device cuda (array_module), never on the CPU path.
"""
import contextlib
import sys

import numpy as np

from errors import DeviceError

INSTALL_HINT = "pip install cupy-cuda12x (CUDA 12 drivers) or cupy-cuda13x (CUDA 13)"


def array_module(device, gpu=None):
    """The array module for --device: numpy for "cpu", cupy for "cuda" once it has run a kernel there
    (DeviceError, saying what to install or check, where it cannot).

    gpu(n): which of the n GPUs that CUDA shows this process to use (under MPI the rank's own:
    distributed.World.gpu), made current before anything runs on one, so that no rank opens a
    context on another's; None: the current one (GPU 0 unless chosen before)."""
    if device == "cpu":
        return np
    if device != "cuda":
        raise DeviceError(f"unknown device {device!r}: choose cpu or cuda")
    try:
        import cupy
    except ModuleNotFoundError as e:
        if e.name != "cupy":
            raise DeviceError(f"--device cuda: CuPy is installed but cannot load ({e}); {INSTALL_HINT}") from None
        raise DeviceError(f"--device cuda needs CuPy, which is not installed: {INSTALL_HINT}") from None
    except Exception as e:  # an ImportError from its CUDA libraries, a wheel for other drivers
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DeviceError(f"--device cuda: CuPy is installed but cannot load ({reason}); {INSTALL_HINT}") from None
    try:
        n_visible = cupy.cuda.runtime.getDeviceCount()
        if n_visible < 1:
            raise RuntimeError("no GPU found")
        if gpu is not None:
            cupy.cuda.Device(gpu(n_visible)).use()
        int(cupy.arange(3).sum())  # compiles and runs a kernel: catches a wheel built for other drivers
    except Exception as e:  # CUDARuntimeError, CompileException, missing libraries: all mean the same here
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DeviceError(f"--device cuda: CuPy cannot use an NVIDIA GPU here ({reason}); check nvidia-smi "
                          f"and that the CuPy wheel matches the driver's CUDA: {INSTALL_HINT}") from None
    return cupy


def get_array_module(x):
    """numpy or cupy, whichever x belongs to. Without CuPy loaded no array can be a CuPy one."""
    cupy = sys.modules.get("cupy")
    return np if cupy is None else cupy.get_array_module(x)


def on_gpu(x):
    return get_array_module(x) is not np


def to_device(a, xp):
    """a (host or device) as an array of module xp: one copy between host and device, none if it
    is there already."""
    return to_host(a) if xp is np else xp.asarray(a)


def to_host(a):
    """a as a NumPy array: a copy from the GPU (which waits for it), the array itself on the CPU."""
    xp = get_array_module(a)
    return np.asarray(a) if xp is np else xp.asnumpy(a)


def copy_into(dst, src):
    """dst[...] = src between host and device, in place: one copy (from the GPU one that waits for it)."""
    if on_gpu(src) and not on_gpu(dst):
        src.get(out=dst)
    elif on_gpu(dst) and not on_gpu(src):
        dst.set(src)
    else:
        dst[...] = src


def pinned_like(a):
    """An empty host array shaped as the GPU array a, in pinned (page-locked) memory, which the GPU
    copies to and from at full speed."""
    import cupyx
    return cupyx.empty_pinned(a.shape, a.dtype)


def host_floats(values):
    """A few numbers (Python or NumPy ones, 0-d arrays on either device) as one float64 host array;
    the ones on the GPU come back together in one copy, one wait for it, however many they are."""
    out = np.array([0.0 if on_gpu(v) else float(v) for v in values])
    there = [i for i, v in enumerate(values) if on_gpu(v)]
    if there:
        xp = get_array_module(values[there[0]])
        out[there] = xp.stack([values[i].astype(np.float64) for i in there]).get()
    return out


def gpu_name(xp):
    """Which GPU this process uses, "GPU i (PCI bus id)" with i its CUDA index here (CUDA_VISIBLE_DEVICES
    numbers them from 0; the bus id is the one nvidia-smi shows); None on the CPU."""
    if xp is np:
        return None
    i = xp.cuda.Device().id
    try:
        return f"GPU {i} ({xp.cuda.runtime.deviceGetPCIBusId(i)})"
    except Exception:  # a name for the log only: never worth stopping a run
        return f"GPU {i}"


def synchronize(xp):
    """Wait until the GPU has finished all work queued so far (before reading a clock)."""
    if xp is not np:
        xp.cuda.Device().synchronize()


def scatter_add(a, idx, values):
    """a[idx] += values, every repeated index counted (an embedding table's gradient)."""
    if on_gpu(a):
        import cupyx
        cupyx.scatter_add(a, idx, values)
    else:
        np.add.at(a, idx, values)


def gpu_memory(xp):
    """(bytes in use, bytes held) by CuPy's memory pool, or None on the CPU."""
    if xp is np:
        return None
    pool = xp.get_default_memory_pool()
    return pool.used_bytes(), pool.total_bytes()


# ---------------------------------------------------------------------------- blocks, or whole arrays

# On the CPU a chain of element-wise passes (GELU, the softmax, the optimizer's update) goes through
# its arrays a block at a time, so that the block is still in the core's L2 cache for the next pass
# and memory is read once. L2 holds 1 MB a core on the 2-core development machine (AMD EPYC), 256 KB
# to 2 MB on current x86 and ARM cores. BLOCK float32 elements are 256 KB: the layers' chains touch
# two or three such arrays at once, the optimizer's update five (parameters, gradients, two moments,
# a scratch block: 1.25 MB, a little over that L2), and the loss takes 4 * BLOCK logits a block
# (1 MB). The sizes are not tuned to a machine. Results do not depend on them, except the gradient
# norm's sum, which adds one float32 dot product per block (optimizer._sum_of_squares).
BLOCK = 1 << 16

_whole_arrays = False


def whole_arrays(x):
    """True where element-wise work runs on whole arrays in one thread: always on the GPU, and
    on the CPU inside whole_array_mode(). Otherwise it runs in cache-sized blocks over threads."""
    return _whole_arrays or on_gpu(x)


@contextlib.contextmanager
def whole_array_mode(on=True):
    """Run NumPy arrays the GPU's way: whole-array passes, one worker, no block loops (for tests)."""
    global _whole_arrays
    before, _whole_arrays = _whole_arrays, on
    try:
        yield
    finally:
        _whole_arrays = before


# ---------------------------------------------------------------------------- the array kit
# What the layers of both blocks share: row and column sums, blocks of rows, matrix products into
# views. Each has a CPU form (einsum, cache-sized blocks, products written straight into strided
# views) and the whole-array form the GPU needs; the layers call these and stay one copy.

def row_sum(a, b=None):
    """(..., C) [, (..., C)] -> (..., 1): the sum of each row of a (or of a * b). On the CPU einsum
    sums a short last axis (C = 64...1024) several times faster than a.sum(axis=-1), whose per-row
    reduction calls cost more than the adds, and needs no temporary a * b."""
    if whole_arrays(a):
        return (a if b is None else a * b).sum(axis=-1, keepdims=True)
    return (np.einsum("...c->...", a) if b is None else np.einsum("...c,...c->...", a, b))[..., None]


def column_sum(a, b=None):
    """(N, C) [, (N, C)] -> (C,): the sum over the rows of a (or of a * b)."""
    if whole_arrays(a):
        return (a if b is None else a * b).sum(axis=0)
    return np.einsum("nc->c", a) if b is None else np.einsum("nc,nc->c", a, b)


def row_mean(a):
    """(..., C) -> (..., 1): the mean of each row."""
    return row_sum(a) * (1.0 / a.shape[-1])


def row_dot_mean(a, b):
    """(..., C), (..., C) -> (..., 1): mean of a * b along each row."""
    return row_sum(a, b) * (1.0 / a.shape[-1])


def matmul_rows(x, w):
    """(..., K) @ (K, N) -> (..., N). On the whole-array path (the GPU's) as one 2-D product of all
    rows of x with w: CuPy does a 3-D @ 2-D product as B small GEMMs through an array of pointers,
    after copying a transposed w (w.T), which in a 2-D product is a flag to cuBLAS."""
    if not whole_arrays(x):
        return x @ w
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def matmul_into(a, b, out):
    """out[...] = a @ b, where out may be a strided view. NumPy's matmul writes straight into it;
    the whole-array path makes the product and copies it in, which any array library can."""
    if whole_arrays(out):
        out[...] = a @ b
    else:
        np.matmul(a, b, out=out)


def block_rows(a):
    """Rows (of length F = a.shape[-1]) per block: BLOCK elements' worth, or all of them on the
    whole-array path, where each block would be kernel launches of its own."""
    F = a.shape[-1]
    return max(1, a.size // F) if whole_arrays(a) else max(1, BLOCK // F)


def blocks(*arrays):
    """Matching blocks of rows of C-contiguous arrays (..., F) with the same number of rows (F may
    differ), for chains of in-place passes that then run in
    cache (about 1.6x faster than whole-array passes on (2048, 512)). Rows per block: the first's."""
    rows = []
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError("blocks() needs C-contiguous arrays (a view, never a copy)")
        rows.append(a.reshape(-1, a.shape[-1]))
        if len(rows[-1]) != len(rows[0]):
            raise ValueError(f"blocks() needs arrays of as many rows: {len(rows[0])} and {len(rows[-1])}")
    step = block_rows(arrays[0])
    for i in range(0, len(rows[0]), step):
        yield tuple(r[i : i + step] for r in rows)
