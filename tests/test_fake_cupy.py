"""The stand-in for CuPy (fake_cupy.py) must fail where CuPy fails, or the GPU path's tests prove little."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fake_cupy


def test_device_arrays_are_not_numpy_arrays_and_copy_nothing_implicitly():
    with fake_cupy.installed() as cupy:
        a = cupy.asarray(np.arange(6.0).reshape(2, 3))
        assert isinstance(a, cupy.ndarray) and not isinstance(a, np.ndarray)
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
            np.asarray(a)
        for mix in (lambda: a + np.ones(3), lambda: np.ones(3) * a, lambda: cupy.exp(np.ones(3)),
                    lambda: cupy.where(np.ones(3, bool), a, 0)):
            with pytest.raises(TypeError, match="host NumPy array"):
                mix()
        with pytest.raises(TypeError, match="host NumPy array"):
            a[0] = np.ones(3)
        with pytest.raises(TypeError, match="numpy.einsum called on a device array"):
            np.einsum("ij->i", a)
        with pytest.raises(TypeError):  # no __index__ on a CuPy array
            [1, 2, 3][a[0, 1].astype(np.int64)]
        assert type(np.exp(a)) is cupy.ndarray  # NumPy's ufuncs run on the device, as CuPy's do
        total = a.sum()
        assert isinstance(total, cupy.ndarray) and total.ndim == 0 and fake_cupy.counts.syncs == 0
        assert float(total) == 15.0 and fake_cupy.counts.syncs == 1
        back = cupy.asnumpy(a)
        assert type(back) is np.ndarray and fake_cupy.counts.host_copies == 1
        back[0, 0] = 7  # a copy: the device array is untouched
        assert float(a[0, 0]) == 0.0


def test_the_module_has_only_names_that_cupy_has():
    with fake_cupy.installed() as cupy:
        for name in ("errstate", "seterr", "geterr", "nditer"):  # NumPy's, not CuPy's
            assert name not in fake_cupy.CUPY_NAMES and hasattr(np, name)
            with pytest.raises(AttributeError, match=f"module 'cupy' has no attribute '{name}'"):
                getattr(cupy, name)
        for name in ("exp", "matmul", "where", "count_nonzero", "triu", "float32", "ndarray", "asnumpy"):
            assert name in fake_cupy.CUPY_NAMES and hasattr(cupy, name)
        import cupyx
        assert callable(cupyx.scatter_add)
        with pytest.raises(AttributeError):
            cupyx.errstate  # CuPy's exists for linalg only: the stand-in has none


def test_matmul_with_a_1d_out_fails_as_on_cupy_13_and_not_14():
    a, v = np.arange(12.0).reshape(4, 3), np.ones(3)
    with fake_cupy.installed(cupy_version=13) as cupy:
        with pytest.raises(ValueError, match="axes don't match array"):
            cupy.matmul(cupy.asarray(a), cupy.asarray(v), out=cupy.empty(4))
        out = cupy.empty((4, 1))  # a 2-D out works on both
        cupy.matmul(cupy.asarray(a), cupy.asarray(v[:, None]), out=out)
        np.testing.assert_array_equal(cupy.asnumpy(out)[:, 0], a @ v)
    with fake_cupy.installed(cupy_version=14) as cupy:
        out = cupy.empty(4)
        cupy.matmul(cupy.asarray(a), cupy.asarray(v), out=out)
        np.testing.assert_array_equal(cupy.asnumpy(out), a @ v)


def test_nd_matmuls_count_batched_gemms_and_operand_copies():
    rng = np.random.default_rng(0)
    x, w, w_t = rng.random((2, 3, 4)), rng.random((4, 5)), rng.random((5, 4))
    with fake_cupy.installed() as cupy:
        x, w, w_t = (cupy.asarray(a) for a in (x, w, w_t))
        x.reshape(-1, 4) @ w_t.T  # 2-D: one GEMM, the transpose a flag
        assert (fake_cupy.counts.batched_matmuls, fake_cupy.counts.operand_copies) == (0, [])
        x @ w  # (2, 3, 4) @ (4, 5): a batch of 2 GEMMs through pointers
        assert (fake_cupy.counts.batched_matmuls, fake_cupy.counts.operand_copies) == (1, [])
        x @ w_t.T  # ... and w.T copied first
        assert (fake_cupy.counts.batched_matmuls, fake_cupy.counts.operand_copies) == (2, [(4, 5)])
        q = cupy.asarray(rng.random((2, 3, 4, 2)))
        q @ q.transpose(0, 1, 3, 2)  # same batch shapes: strided-batched, but the transposed view copied
        assert (fake_cupy.counts.batched_matmuls, fake_cupy.counts.operand_copies) == (2, [(4, 5), (2, 3, 2, 4)])


def test_scatter_add_adds_in_no_fixed_order():
    rng = np.random.default_rng(1)
    idx, values = rng.integers(0, 3, 3000), rng.standard_normal((3000, 4), dtype=np.float32)
    expected = np.zeros((3, 4), np.float32)
    np.add.at(expected, idx, values)
    results = []
    for seed, shuffle in ((0, True), (1, True), (0, False)):
        with fake_cupy.installed(shuffle_scatter=shuffle, seed=seed) as cupy:
            import cupyx
            table = cupy.zeros((3, 4), np.float32)
            cupyx.scatter_add(table, cupy.asarray(idx), cupy.asarray(values))
            results.append(cupy.asnumpy(table))
    for r in results:
        np.testing.assert_allclose(r, expected, rtol=1e-4, atol=1e-4)
    assert not np.array_equal(results[0], expected) and not np.array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[2], expected)  # NumPy's order


def test_copies_through_host_buffers_and_gpus_by_index_as_cupy_has_them():
    with fake_cupy.installed(gpus=2) as cupy:
        import cupyx
        a = cupy.asarray(np.arange(4, dtype=np.float32))
        host = cupyx.empty_pinned(a.shape, a.dtype)
        assert type(host) is np.ndarray
        assert a.get(out=host) is host and fake_cupy.counts.host_copies == 1
        np.testing.assert_array_equal(host, np.arange(4))
        host *= 2
        a.set(host)
        np.testing.assert_array_equal(cupy.asnumpy(a), 2 * np.arange(4))
        with pytest.raises(TypeError, match="float64 array cannot be set to float32"):
            a.set(host.astype(np.float64))
        with pytest.raises(ValueError, match="Shape mismatch"):
            a.get(out=np.empty(3, np.float32))
        assert cupy.cuda.runtime.getDeviceCount() == 2 and cupy.cuda.Device().id == 0
        cupy.cuda.Device(1).use()
        assert cupy.cuda.Device().id == 1 == cupy.cuda.runtime.getDevice()
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            cupy.cuda.Device(2).use()
    with fake_cupy.installed() as cupy:
        assert cupy.cuda.Device().id == 0 and cupy.cuda.runtime.getDeviceCount() == 1


def test_other_processes_get_the_stand_in_from_tests_stand_in(tmp_path):
    """tests/stand_in on PYTHONPATH: `import cupy` (or cupyx first) installs it, with the options in $FAKE_CUPY."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent / "stand_in"), FAKE_CUPY="gpus=3 cupy_version=14")
    code = ("import cupyx, cupy, fake_cupy\n"
            "print(cupy.__version__, cupy.cuda.runtime.getDeviceCount(), cupyx.scatter_add is fake_cupy.scatter_add)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["14.2.0", "3", "True"], out.stderr
