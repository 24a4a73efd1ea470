"""A stand-in for CuPy made of NumPy, to test the GPU path's plumbing where there is no GPU.

It checks what CuPy enforces and what the GPU path promises, not CuPy's arithmetic:
- "device" arrays are a NumPy subclass, DeviceArray; functions of the stand-in module (xp.empty,
  xp.where, ...) return them, and reductions give 0-d DeviceArrays, as CuPy's do;
- mixing a host NumPy array into a device computation is a TypeError, as in CuPy (a copy must
  be explicit: xp.asarray to the device, xp.asnumpy back), and so is calling a numpy.* function
  other than a ufunc on a device array;
- every read of a device value on the host (float(), int(), bool(), .item()) is counted in
  DeviceArray.syncs: on a GPU each one waits for the device.

    with fake_cupy.installed(): ...   # sys.modules["cupy"] / ["cupyx"] are the stand-ins inside
"""
import contextlib
import sys
import types

import numpy as np


def _host(x):
    return x.view(np.ndarray) if isinstance(x, DeviceArray) else x


def _device(x):
    if isinstance(x, DeviceArray):
        return x
    if isinstance(x, np.ndarray):
        return x.view(DeviceArray)
    if isinstance(x, (np.generic, int, float, bool)):
        return np.asarray(x).view(DeviceArray)  # CuPy's reductions return 0-d arrays, never scalars
    if isinstance(x, tuple):
        return tuple(_device(v) for v in x)
    return x


def _check_no_host_arrays(name, values):
    for v in values:
        if isinstance(v, np.ndarray) and not isinstance(v, DeviceArray):
            raise TypeError(f"{name}: a host NumPy array {v.shape} mixed into a device computation")


class DeviceArray(np.ndarray):
    syncs = 0  # host reads of device values so far

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _check_no_host_arrays(ufunc.__name__, inputs + (out or ()))
        if out is not None:
            kwargs["out"] = tuple(_host(o) for o in out)
        result = getattr(ufunc, method)(*(_host(x) for x in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _device(result)

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} called on a device array: use the array's own module (xp)")

    def __array__(self, dtype=None, copy=None):
        raise TypeError("implicit conversion of a device array to NumPy: use xp.asnumpy")

    def __setitem__(self, key, value):
        _check_no_host_arrays("setitem", [value])
        super().__setitem__(key, value)

    def _read(self):
        DeviceArray.syncs += 1
        return self.view(np.ndarray)

    def __float__(self):
        return float(self._read())

    def __int__(self):
        return int(self._read())

    def __index__(self):
        return self._read().__index__()

    def __bool__(self):
        return bool(self._read())

    def item(self, *args):
        return self._read().item(*args)

    def tolist(self):
        return self._read().tolist()

    def __repr__(self):
        return f"DeviceArray({self.view(np.ndarray)!r})"

    __str__ = __repr__

    def __format__(self, spec):
        raise TypeError("formatting a device array: read it with float() first")


def _wrap(func):
    def call(*args, **kwargs):
        args = [_host(a) for a in args]
        kwargs = {k: tuple(_host(v) for v in val) if isinstance(val, tuple) else _host(val)
                  for k, val in kwargs.items()}
        return _device(func(*args, **kwargs))
    return call


def _module():
    cupy = types.ModuleType("cupy")
    cupy.__file__ = __file__

    def module_getattr(name):
        obj = getattr(np, name)
        if isinstance(obj, (np.ufunc, type)) or not callable(obj):
            return obj  # ufuncs dispatch through __array_ufunc__; dtypes and constants as they are
        return _wrap(obj)

    cupy.__getattr__ = module_getattr
    cupy.ndarray = DeviceArray
    cupy.get_array_module = lambda *arrays: cupy if any(isinstance(a, DeviceArray) for a in arrays) else np
    cupy.asarray = lambda a, dtype=None: a if isinstance(a, DeviceArray) and dtype is None else \
        np.array(_host(a), dtype=dtype).view(DeviceArray)  # a copy to the device
    cupy.asnumpy = lambda a: np.array(_host(a))  # a copy to the host
    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
        Device=lambda *a: types.SimpleNamespace(synchronize=lambda: None))
    pool = types.SimpleNamespace(used_bytes=lambda: 1 << 20, total_bytes=lambda: 2 << 20)
    cupy.get_default_memory_pool = lambda: pool
    cupyx = types.ModuleType("cupyx")

    def scatter_add(a, slices, value):
        _check_no_host_arrays("scatter_add", [slices, value])
        np.add.at(_host(a), _host(slices), _host(value))

    cupyx.scatter_add = scatter_add
    return cupy, cupyx


@contextlib.contextmanager
def installed():
    """sys.modules["cupy"] and ["cupyx"] are the stand-ins inside; `import cupy` gets them."""
    saved = {name: sys.modules.get(name) for name in ("cupy", "cupyx")}
    sys.modules["cupy"], sys.modules["cupyx"] = _module()
    try:
        yield sys.modules["cupy"]
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
