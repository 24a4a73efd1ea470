"""Float64 central finite differences, the oracle every backward pass is checked against, on both
array paths (a test file of layers imports array_path: its autouse fixture runs every test twice)."""
import numpy as np
import pytest

from device import whole_array_mode
from dropout import BlockMasks, DropoutMask


@pytest.fixture(autouse=True, params=["blocked", "whole arrays"])
def array_path(request):
    """Every test of a file that imports this runs on both paths: the CPU's blocks and the GPU's whole
    arrays (with NumPy)."""
    with whole_array_mode(request.param == "whole arrays"):
        yield request.param


@pytest.fixture(params=["whole", "by blocks of one query"])
def causal_blocks(request, monkeypatch):
    """Attention's causal products made whole, or by blocks (transformer.CAUSAL_BLOCK) of one query, so that the
    block path runs at the tests' few positions (at least two blocks: T >= 2)."""
    if request.param != "whole":
        import transformer
        monkeypatch.setattr(transformer, "CAUSAL_BLOCK", 1)
    return request.param


def zeros_like(d, names):
    """{name: zeros shaped as d[name]} for the names: gradient buffers to add into."""
    return {k: np.zeros_like(d[k]) for k in names}


def fixed_mask(rng, shape, p=0.3):
    """A dropout mask drawn once (the layers take it as given), with kept and dropped elements both."""
    keep = rng.random(shape) >= p
    assert keep.any() and not keep.all()
    return DropoutMask(keep, 1 / (1 - p))


def block_masks(rng, B=2, T=3, C=8, H=2):
    """A block's fixed dropout masks: the attention weights (B, H, T, T) and both branches (B, T, C)."""
    return BlockMasks(fixed_mask(rng, (B, H, T, T)), fixed_mask(rng, (B, T, C)), fixed_mask(rng, (B, T, C)))


def numerical_gradient(f, x, h=1e-6):
    """d f() / d x for a scalar function f of the array x (perturbed in place and restored)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return grad


def rel_error(a, b):
    """max |a - b| / max(|a| + |b|): scale-free, and 0 only when they agree."""
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a) + np.abs(b)), 1e-30))


def check_layer(forward, backward, inputs, grads, rng, tol=1e-6):
    """Check backward against finite differences of sum(forward(**inputs) * dout).

    forward() -> out, cache; backward(dout, cache) -> {name: analytic gradient} for the names
    of `grads` (a subset of `inputs`), with a random upstream gradient dout.
    """
    out, cache = forward()
    dout = rng.standard_normal(out.shape)
    analytic = backward(dout, cache)
    for name in grads:
        numeric = numerical_gradient(lambda: float(np.sum(forward()[0] * dout)), inputs[name])
        err = rel_error(analytic[name], numeric)
        assert err < tol, f"gradient of {name}: relative error {err:.2e} >= {tol}"
        assert np.abs(numeric).max() > 0, f"gradient of {name} is zero: the check would prove nothing"
