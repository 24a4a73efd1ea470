"""Inputs for the test that the optimizer still gives, bit for bit, what it gave before the flat
buffers: tests/test_optimizer.py compares with digests taken from the earlier optimizer.py."""
import hashlib

import numpy as np

SHAPES = {"wte": (1100, 64), "h.0.ln_1.weight": (64,), "h.0.attn.c_attn.weight": (64, 192),
          "h.0.attn.c_attn.bias": (192,), "h.0.mlp.c_fc.weight": (64, 256), "h.0.mlp.c_fc.bias": (256,),
          "ln_f.weight": (64,), "ln_f.bias": (64,)}  # wte is larger than one block of the update (2**16)


def inputs(dtype=np.float32):
    rng = np.random.default_rng(1234)
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    grads = [{k: (rng.standard_normal(s) * 10.0 ** rng.integers(-3, 2)).astype(dtype) for k, s in SHAPES.items()}
             for _ in range(3)]
    return params, grads


def run(make, params, grads, lrs=(1e-2, 3e-3, 5e-4)):
    """Three steps; the digest of every parameter and every state_dict entry afterwards."""
    opt = make(params)
    for g, lr in zip(grads, lrs):
        opt.step(g, lr=lr)
    h = hashlib.sha256()
    for k in params:
        h.update(k.encode() + np.ascontiguousarray(params[k]).tobytes())
    state = opt.state_dict()
    for k in sorted(state):
        h.update(k.encode() + np.ascontiguousarray(state[k]).tobytes())
    return h.hexdigest()
