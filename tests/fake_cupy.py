"""A stand-in for CuPy made of NumPy, to test the GPU path where there is no GPU. It fails where CuPy
fails (each rule below is CuPy's, from its source at v13.6.0 and v14.2.0):

- device arrays (DeviceArray, the stand-in's cupy.ndarray) are not NumPy arrays: isinstance(x,
  np.ndarray) is False, and np.asarray(x) raises TypeError, as CuPy's __array__ does. Copies are
  explicit: xp.asarray to the device, xp.asnumpy (or .get()) back;
- a host NumPy array in a device computation is a TypeError (CuPy refuses implicit copies), and so
  is a numpy.* function other than a ufunc called on a device array (CuPy would dispatch it to its
  own; the GPU path promises not to need that);
- the module has only names that CuPy 13.6 and 14.2 both have (CUPY_NAMES), NumPy's functions
  behind them; any other name is an AttributeError, as in CuPy (there is no cupy.errstate);
- matmul is CuPy 13's by default: an `out` of fewer than two dimensions raises ValueError ("axes
  don't match array"), because its gufunc transposes `out` over two axes. cupy_version=14 accepts
  it (CuPy 14 takes a fast path to dot);
- scatter_add adds its contributions in a shuffled order, as CuPy's atomicAdd kernel gives no order:
  a test cannot count on results bit for bit equal to NumPy's (shuffle_scatter=False: NumPy's order);
- it has `gpus` GPUs (1 by default), all of this process's memory: cupy.cuda.Device(i).use() makes
  one current and refuses an index CUDA would refuse.

It counts, in `counts`, what costs time on a GPU:
- syncs: reads of device values on the host (float(), int(), bool(), .item(), .tolist()); on a GPU
  each one waits for the device;
- host_copies: copies back to the host (xp.asnumpy, .get());
- batched_matmuls: N-D matmuls with an operand broadcast over the batch, e.g. (B, T, C) @ (C, K):
  CuPy runs them as a pointer-batched GEMM of B small products (plus 3 kernels to build the
  pointers) where (B*T, C) @ (C, K) is one GEMM;
- operand_copies: the shapes of N-D matmul operands that are not C-contiguous, which CuPy copies
  before the product (a transposed weight, a strided view).

Its arithmetic is NumPy's: it checks the GPU path's plumbing, not CuPy's numbers.

    with fake_cupy.installed() as cupy: ...   # sys.modules["cupy"] / ["cupyx"] are the stand-ins inside

In other processes (mpiexec's ranks, scripts/gpu_check.sh's rehearsal), tests/stand_in on PYTHONPATH
has `import cupy` install it, with the options of install() in $FAKE_CUPY ("gpus=2 shuffle_scatter=0").
"""
import contextlib
import sys
import types

import numpy as np

# The public names of the cupy module in both v13.6.0 and v14.2.0: every name bound at the top level
# of cupy/__init__.py at those tags (imports, assignments, definitions; github.com/cupy/cupy), less
# the ones bound only for some NumPy versions. The stand-in provides those NumPy also has, but not
# the submodules (fft, linalg, random, ...), which the GPU path does not use.
CUPY_NAMES = frozenset("""
    AxisError ComplexWarning ElementwiseKernel Inf Infinity ModuleDeprecationWarning NAN NINF
    NZERO NaN PINF PZERO RankWarning RawKernel RawModule ReductionKernel TooHardError
    VisibleDeprecationWarning abs absolute add all allclose alltrue amax amin angle any append
    apply_along_axis arange arccos arccosh arcsin arcsinh arctan arctan2 arctanh argmax argmin
    argpartition argsort argwhere around array array2string array_equal array_equiv array_repr
    array_split array_str asanyarray asarray asarray_chkfinite ascontiguousarray asfarray
    asfortranarray asnumpy atleast_1d atleast_2d atleast_3d average bartlett base_repr
    binary_repr bincount bitwise_and bitwise_not bitwise_or bitwise_xor blackman bool_ broadcast
    broadcast_arrays broadcast_to byte byte_bounds c_ can_cast cbrt cdouble ceil cfloat choose
    clear_memo clip column_stack common_type complex128 complex64 complex_ complexfloating
    compress concatenate conj conjugate convolve copy copysign copyto corrcoef correlate cos
    cosh count_nonzero cov cross csingle cuda cumprod cumproduct cumsum deg2rad degrees delete
    diag diag_indices diag_indices_from diagflat diagonal diff digitize
    disable_experimental_feature_warning divide divmod dot double dsplit dstack dtype e ediff1d
    einsum empty empty_like equal euler_gamma exp exp2 expand_dims expm1 extract eye fabs fft
    fill_diagonal finfo fix flatiter flatnonzero flip fliplr flipud float16 float32 float64
    float_ float_power floating floor floor_divide fmax fmin fmod format_float_positional
    format_float_scientific frexp fromDlpack from_dlpack frombuffer fromfile fromfunction
    fromiter fromstring full full_like fuse gcd generic genfromtxt get_array_module
    get_default_memory_pool get_default_pinned_memory_pool get_printoptions gradient greater
    greater_equal half hamming hanning heaviside histogram histogram2d histogramdd hsplit hstack
    hypot i0 identity iinfo imag in1d index_exp indices inexact inf infty inner int16 int32
    int64 int8 int_ intc integer interp intersect1d intp invert is_available isclose iscomplex
    iscomplexobj isfinite isfortran isin isinf isnan isneginf isposinf isreal isrealobj isscalar
    issctype issubclass_ issubdtype issubsctype iterable ix_ kaiser kron lcm ldexp left_shift
    less less_equal lexsort linalg linspace load loadtxt log log10 log1p log2 logaddexp
    logaddexp2 logical_and logical_not logical_or logical_xor logspace longlong mask_indices
    matmul max maximum may_share_memory mean median memoize meshgrid mgrid min min_scalar_type
    minimum mintypecode mod modf moveaxis msort multiply nan nan_to_num nanargmax nanargmin
    nancumprod nancumsum nanmax nanmean nanmedian nanmin nanprod nanstd nansum nanvar ndarray
    ndim ndindex negative newaxis nextafter nonzero not_equal number obj2sctype ogrid ones
    ones_like outer packbits pad partition percentile pi piecewise place poly poly1d polyadd
    polyfit polymul polynomial polysub polyval positive power printoptions prod product
    promote_types ptp put putmask quantile r_ rad2deg radians random ravel ravel_multi_index
    real real_if_close reciprocal remainder repeat require reshape resize result_type
    right_shift rint roll rollaxis roots rot90 round round_ row_stack s_ save savetxt savez
    savez_compressed sctype2char searchsorted select set_printoptions setdiff1d setxor1d shape
    shares_memory short show_config sign signbit signedinteger sin sinc single singlecomplex
    sinh size sometrue sort sort_complex split sqrt square squeeze stack std subtract sum
    swapaxes take take_along_axis tan tanh tensordot testing tile trace transpose trapz tri tril
    tril_indices tril_indices_from trim_zeros triu triu_indices triu_indices_from true_divide
    trunc typename ubyte ufunc uint uint16 uint32 uint64 uint8 uintc uintp ulonglong union1d
    unique unpackbits unravel_index unsignedinteger unwrap ushort vander var vdot vectorize
    vsplit vstack where who zeros zeros_like
""".split())

# The methods of cupy.ndarray (cupy/_core/core.pyx, _ndarray_base) that NumPy's ndarray has too.
NDARRAY_METHODS = ("all any argmax argmin argpartition argsort astype clip conj conjugate copy cumprod cumsum "
                   "diagonal dot fill flatten max mean min nonzero partition prod put ravel repeat reshape round "
                   "searchsorted sort squeeze std sum swapaxes take trace transpose var view").split()


class Counts:
    """What the stand-in saw since the last reset (installed() resets it)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.syncs = 0
        self.host_copies = 0
        self.batched_matmuls = 0
        self.operand_copies = []


counts = Counts()
_settings = {"cupy_version": 13, "rng": None, "gpus": 1, "device": 0}


def _host(x):
    """The NumPy array inside a device array; tuples and lists element by element; the rest as is."""
    if isinstance(x, DeviceArray):
        return x._a
    if isinstance(x, (tuple, list)):
        return type(x)(_host(v) for v in x)
    return x


def _refuse_host(name, values):
    for v in values:
        if isinstance(v, np.ndarray):
            raise TypeError(f"{name}: a host NumPy array {v.shape} in a device computation "
                            "(CuPy copies nothing implicitly: use xp.asarray)")
        if isinstance(v, (tuple, list)):
            _refuse_host(name, v)


def _device(x):
    """A result as CuPy gives it: arrays on the device, reductions as 0-d device arrays (never scalars)."""
    if isinstance(x, np.ndarray):
        return DeviceArray(x)
    if isinstance(x, (np.generic, bool, int, float)):
        return DeviceArray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_device(v) for v in x)
    return x


def _call(name, func, args, kwargs):
    """func (NumPy's) on device arguments: host arrays refused, the result on the device; with out=,
    the out array itself."""
    _refuse_host(name, list(args) + list(kwargs.values()))
    out = kwargs.get("out")
    result = func(*_host(args), **{k: _host(v) for k, v in kwargs.items()})
    return out if out is not None else _device(result)


def _function(name, func):
    def call(*args, **kwargs):
        return _call(name, func, args, kwargs)
    call.__name__ = call.__qualname__ = name
    return call


class _Ufunc:
    """cupy.exp, cupy.add, ...: NumPy's ufunc on device arrays only."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__
        self.nin, self.nout = ufunc.nin, ufunc.nout

    def __call__(self, *args, **kwargs):
        return _call(self.__name__, self._ufunc, args, kwargs)

    def __repr__(self):
        return f"<ufunc '{self.__name__}'>"


def matmul(a, b, out=None):
    """cupy.matmul and `@`, with the costs and the CuPy 13 failure of CuPy's own (see the docstring)."""
    _refuse_host("matmul", [a, b, out])
    A, B = _host(a), _host(b)
    if A.ndim > 2 or B.ndim > 2:  # CuPy's N-D path, _core/_routines_linalg.pyx matmul
        for op in (A, B):
            if op.ndim >= 2 and not op.flags.c_contiguous:
                counts.operand_copies.append(op.shape)  # ascontiguousarray before the product
        nd = max(A.ndim, B.ndim)
        batch_a = (1,) * (nd - max(A.ndim, 2)) + A.shape[:-2]
        batch_b = (1,) * (nd - max(B.ndim, 2)) + B.shape[:-2]
        if batch_a != batch_b:  # a size-1 batch dimension broadcast: sgemmBatched over pointers
            counts.batched_matmuls += 1
    if out is not None and out.ndim < 2 and _settings["cupy_version"] < 14:
        # CuPy 13's matmul is a _GUFunc (linalg/_product.py) whose _get_args_transposed transposes
        # out over the axes (-2, -1) of the signature (n?,k),(k,m?)->(n?,m?)
        raise ValueError("axes don't match array")
    result = np.matmul(A, B, out=None if out is None else out._a)
    return out if out is not None else _device(result)


class DeviceArray:
    """cupy.ndarray: a NumPy array (._a, never copied: a view stays a view) held "on the device"."""

    __slots__ = ("_a",)
    __hash__ = None

    def __init__(self, a):
        self._a = a

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: DeviceArray(self._a.T))
    real = property(lambda self: DeviceArray(self._a.real))
    imag = property(lambda self: DeviceArray(self._a.imag))

    # NumPy meeting a device array: ufuncs run on the device (as CuPy's __array_ufunc__ does); any
    # other numpy function, and any implicit conversion to a host array, is refused
    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if method != "__call__":
            return NotImplemented
        if out is not None:
            kwargs["out"] = out[0] if isinstance(out, tuple) and len(out) == 1 else out
        if ufunc is np.matmul:
            return matmul(*inputs, **kwargs)
        return _call(ufunc.__name__, ufunc, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} called on a device array: use the array's own module (xp)")

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")  # CuPy's words

    def __getitem__(self, key):
        return _device(self._a[_host(key)])  # host index arrays are allowed: CuPy copies them over

    def __setitem__(self, key, value):
        _refuse_host("setitem", [value])
        self._a[_host(key)] = _host(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    # reads on the host: each one a wait for the GPU
    def _read(self):
        counts.syncs += 1
        return self._a

    def __float__(self):
        return float(self._read())

    def __int__(self):
        return int(self._read())

    def __bool__(self):
        return bool(self._read())

    def item(self, *args):
        return self._read().item(*args)

    def tolist(self):
        return self._read().tolist()

    def get(self, stream=None, order="C", out=None, blocking=True):
        counts.host_copies += 1
        if out is None:
            return self._a.copy()
        if not isinstance(out, np.ndarray):
            raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
        _same_layout(out, self)
        out[...] = self._a
        return out

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        _same_layout(arr, self)
        self._a[...] = arr

    def __repr__(self):
        return f"array({np.array2string(self._a, separator=', ')}, dtype={self.dtype})"

    __str__ = __repr__

    def __format__(self, spec):  # stricter than CuPy, which formats (and waits for the GPU)
        raise TypeError("formatting a device array: read it with float() first")

    def __matmul__(self, other):
        return matmul(self, other)

    def __rmatmul__(self, other):
        return matmul(other, self)


def _same_layout(host, dev):
    """CuPy's checks of the host array in get(out=) and set() (_core/core.pyx)."""
    if host.dtype != dev.dtype:
        raise TypeError(f"{host.dtype} array cannot be set to {dev.dtype} array")
    if host.shape != dev.shape:
        raise ValueError(f"Shape mismatch: {host.shape} and {dev.shape}")
    if not host.flags.c_contiguous:
        raise RuntimeError("Non-contiguous array is not supported yet")


def _binary(ufunc):
    return (lambda self, other: _call(ufunc.__name__, ufunc, (self, other), {}),
            lambda self, other: _call(ufunc.__name__, ufunc, (other, self), {}),
            lambda self, other: _call(ufunc.__name__, ufunc, (self, other), {"out": self}))


for _name, _ufunc in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply), ("truediv", np.true_divide),
                      ("floordiv", np.floor_divide), ("mod", np.remainder), ("pow", np.power),
                      ("and", np.bitwise_and), ("or", np.bitwise_or), ("xor", np.bitwise_xor),
                      ("lshift", np.left_shift), ("rshift", np.right_shift)):
    for _prefix, _op in zip(("", "r", "i"), _binary(_ufunc)):
        setattr(DeviceArray, f"__{_prefix}{_name}__", _op)
for _name, _ufunc in (("eq", np.equal), ("ne", np.not_equal), ("lt", np.less), ("le", np.less_equal),
                      ("gt", np.greater), ("ge", np.greater_equal)):
    setattr(DeviceArray, f"__{_name}__", _binary(_ufunc)[0])
for _name, _ufunc in (("neg", np.negative), ("pos", np.positive), ("abs", np.absolute), ("invert", np.invert)):
    setattr(DeviceArray, f"__{_name}__", lambda self, _u=_ufunc: _call(_u.__name__, _u, (self,), {}))


def _method(name):
    def call(self, *args, **kwargs):
        return _call(name, getattr(self._a, name), args, kwargs)
    call.__name__ = name
    return call


for _name in NDARRAY_METHODS:
    setattr(DeviceArray, _name, _method(_name))


def asarray(a, dtype=None, order=None):
    """To the device: a copy of a host array; a device array as it is (or cast)."""
    if isinstance(a, DeviceArray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else DeviceArray(a._a.astype(dtype))
    return DeviceArray(np.array(a, dtype=dtype, order=order or "K"))


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if isinstance(a, DeviceArray) and not copy:
        return asarray(a, dtype)
    return DeviceArray(np.array(_host(a), dtype=dtype, order=order, ndmin=ndmin))


def ascontiguousarray(a, dtype=None):
    return DeviceArray(np.ascontiguousarray(_host(a), dtype=dtype)) if isinstance(a, DeviceArray) \
        else asarray(np.ascontiguousarray(a, dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None):
    """Back to the host: a copy (which waits for the GPU)."""
    if not isinstance(a, DeviceArray):
        return np.asarray(a, order=order)
    return a.get()


def scatter_add(a, slices, value):
    """cupyx.scatter_add: a[slices] += value, every repeated index counted, in no particular order."""
    if not isinstance(a, DeviceArray):
        raise TypeError("scatter_add: the target must be a device array")
    _refuse_host("scatter_add", [slices, value])
    idx, v = _host(slices), _host(value)
    rng = _settings["rng"]
    if rng is not None and isinstance(idx, np.ndarray) and idx.ndim == 1 and np.ndim(v) >= 1 and len(v) == len(idx):
        order = rng.permutation(len(idx))
        idx, v = idx[order], v[order]
    np.add.at(a._a, idx, v)


def empty_pinned(shape, dtype=float, order="C"):
    """cupyx.empty_pinned: a host NumPy array (in CuPy in page-locked memory)."""
    return np.empty(shape, dtype, order)


class Device:
    """cupy.cuda.Device: a GPU by its index, the current one by default; use() makes it current."""

    def __init__(self, device=None):
        self.id = _settings["device"] if device is None else int(device)

    def use(self):
        _set_device(self.id)

    def synchronize(self):
        pass


def _set_device(i):
    if not 0 <= i < _settings["gpus"]:
        raise RuntimeError("cudaErrorInvalidDevice: invalid device ordinal")  # CuPy's CUDARuntimeError
    _settings["device"] = i


def _missing(module):
    def module_getattr(name):
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return module_getattr


def _module(cupy_version):
    cupy = types.ModuleType("cupy")
    cupy.__file__ = __file__
    cupy.__version__ = {13: "13.6.0", 14: "14.2.0"}[cupy_version]
    for name in CUPY_NAMES:
        obj = getattr(np, name, None)
        if obj is None or isinstance(obj, types.ModuleType):
            continue
        if isinstance(obj, np.ufunc):
            setattr(cupy, name, _Ufunc(obj))
        elif isinstance(obj, type) or not callable(obj):
            setattr(cupy, name, obj)  # dtypes and constants: CuPy's are NumPy's
        else:
            setattr(cupy, name, _function(name, obj))
    cupy.newaxis = None
    cupy.ndarray = DeviceArray
    cupy.matmul, cupy.asarray, cupy.array, cupy.asnumpy = matmul, asarray, array, asnumpy
    cupy.ascontiguousarray = ascontiguousarray
    cupy.get_array_module = lambda *arrays: cupy if any(isinstance(a, DeviceArray) for a in arrays) else np
    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: _settings["gpus"], deviceSynchronize=lambda: None,
                                      getDevice=lambda: _settings["device"], setDevice=_set_device,
                                      deviceGetPCIBusId=lambda i: f"0000:{i + 1:02X}:00.0"),
        Device=Device)
    pool = types.SimpleNamespace(used_bytes=lambda: 1 << 20, total_bytes=lambda: 2 << 20)
    cupy.get_default_memory_pool = lambda: pool
    cupy.__getattr__ = _missing("cupy")
    cupyx = types.ModuleType("cupyx")
    cupyx.scatter_add, cupyx.empty_pinned = scatter_add, empty_pinned
    cupyx.__getattr__ = _missing("cupyx")
    return cupy, cupyx


def install(cupy_version=13, shuffle_scatter=True, seed=0, gpus=1):
    """Make the stand-ins sys.modules["cupy"] and ["cupyx"], for good (in other processes: see
    tests/stand_in). cupy_version: 13 (the stricter matmul) or 14; gpus: how many GPUs CUDA shows,
    GPU 0 current. The counts start from zero."""
    sys.modules["cupy"], sys.modules["cupyx"] = _module(cupy_version)
    _settings.update(cupy_version=cupy_version, rng=np.random.default_rng(seed) if shuffle_scatter else None,
                     gpus=gpus, device=0)
    counts.reset()
    return sys.modules["cupy"]


def install_from(options):
    """install() with the options of a string such as "gpus=2 shuffle_scatter=0" (empty: the defaults)."""
    return install(**{k: int(v) for k, v in (item.split("=", 1) for item in options.split())})


@contextlib.contextmanager
def installed(cupy_version=13, shuffle_scatter=True, seed=0, gpus=1):
    """install() for the duration of a with block: `import cupy` gets the stand-in inside."""
    saved = {name: sys.modules.get(name) for name in ("cupy", "cupyx")}
    before = dict(_settings)
    try:
        yield install(cupy_version, shuffle_scatter, seed, gpus)
    finally:
        _settings.update(before)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
