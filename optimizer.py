"""Optimizers (SGD, Adam, AdamW), learning-rate schedules and gradient clipping.

Everything works on two dicts with the same keys, ``params`` and ``grads``
(name -> np.ndarray), like ``LanguageModel.params`` / ``LanguageModel.grads``.
Updates are in place: moment buffers are allocated once, and every step is a
fixed sequence of ``out=`` ufuncs over cache-sized blocks, so a step allocates
nothing and reads each large array only once from memory. The blocks are shared
out to a few threads (ufuncs release the GIL); each element's update is
independent, so results do not depend on the number of threads.

    from optimizer import AdamW, LRSchedule, clip_grad_norm
    opt = AdamW(model.params, weight_decay=0.01)
    schedule = LRSchedule(base_lr=3e-4, warmup_steps=500, max_steps=5000, min_lr=3e-5)
    for step in range(5000):
        loss, acc = model.forward_backward(x, y)
        grad_norm = clip_grad_norm(model.grads, max_norm=1.0)
        opt.step(model.grads, lr=schedule(step))

Conventions follow PyTorch so numbers can be compared with it:
  SGD:   buf = momentum * buf + g;            p -= lr * buf
  Adam:  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
         p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
  AdamW: p *= 1 - lr * weight_decay (decoupled, only for decayed params), then Adam.
"""
import math
import os

import numpy as np

from parallel import ShardRunner

# Elements per block in the blocked update loops: 4 float32 arrays of this size
# (param, grad, m, v) plus one scratch block stay within a typical L2 cache, so
# the ~10 ufunc passes of an Adam step hit cache instead of main memory.
BLOCK = 1 << 16


def _blocks(lo, hi):
    """Yield slices covering range(lo, hi) in BLOCK-sized pieces."""
    for start in range(lo, hi, BLOCK):
        yield slice(start, min(start + BLOCK, hi))


def default_threads():
    """Cores this process may use (at most 8): NumPy ufuncs release the GIL, so the
    element-wise update of disjoint slices runs in parallel."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _flat(a):
    """A flat view of a (never a copy: updates must land in the original)."""
    flat = a.reshape(-1)
    if not np.shares_memory(flat, a):
        raise ValueError("optimizer needs contiguous arrays (reshape would copy)")
    return flat


# ----------------------------------------------------------------------------
# Learning-rate schedules


class LRSchedule:
    """Linear warmup from 0 to base_lr over warmup_steps, then decay to min_lr.

    kind="cosine": half a cosine from base_lr at the end of warmup to min_lr at max_steps.
    kind="linear": a straight line from base_lr to min_lr over the same range.
    kind="constant": base_lr after warmup.
    After max_steps the rate stays at min_lr (cosine/linear).
    ``schedule(step)`` is the rate for the update that follows step `step` (0-based),
    so the first update uses base_lr / warmup_steps, never 0.
    """

    KINDS = ("cosine", "linear", "constant")

    def __init__(self, base_lr, warmup_steps=0, max_steps=1, min_lr=0.0, kind="cosine"):
        if kind not in self.KINDS:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(self.KINDS)}")
        if base_lr <= 0 or min_lr < 0 or min_lr > base_lr:
            raise ValueError(f"need 0 <= min_lr <= base_lr and base_lr > 0 (got base_lr={base_lr}, min_lr={min_lr})")
        if warmup_steps < 0 or max_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and max_steps >= 1 (got {warmup_steps}, {max_steps})")
        self.base_lr, self.min_lr = float(base_lr), float(min_lr)
        self.warmup_steps, self.max_steps, self.kind = int(warmup_steps), int(max_steps), kind

    def __call__(self, step):
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        decay_steps = self.max_steps - self.warmup_steps
        if decay_steps <= 0:
            return self.min_lr
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)  # 0 -> 1
        if self.kind == "cosine":
            weight = 0.5 * (1.0 + math.cos(math.pi * progress))        # 1 -> 0
        else:
            weight = 1.0 - progress
        return self.min_lr + weight * (self.base_lr - self.min_lr)


# ----------------------------------------------------------------------------
# Gradient clipping


def global_grad_norm(grads):
    """sqrt(sum of squares of every gradient entry): each array's sum by BLAS in its own dtype
    (float32: relative error about 1e-5, plenty for clipping), the sum over arrays in float64.

    Finite float32 gradients above about 1.8e19 have squares past float32's range, so that sum
    overflows to inf although the norm is finite; then it is done again in float64, a cache-sized
    block at a time (no full-size temporary). A gradient holding inf or nan still gives inf or nan.
    """
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is handled below
        for g in grads.values():
            flat = g.reshape(-1)
            total += float(np.dot(flat, flat))  # BLAS dot: no temporary array
    if not math.isfinite(total):
        total, buf = 0.0, np.empty(BLOCK, np.float64)
        for g in grads.values():
            flat = g.reshape(-1)
            for b in _blocks(0, flat.size):
                block = buf[:b.stop - b.start]
                np.copyto(block, flat[b])
                total += float(np.dot(block, block))
    return math.sqrt(total)


def clip_grad_norm(grads, max_norm=1.0):
    """Scale all gradients in place so their global L2 norm is at most max_norm.

    Returns the norm before clipping (inf/nan when a gradient is not finite; the
    gradients are then left alone so the caller can stop). max_norm <= 0 or None
    means no clipping (the norm is still returned, for logging).
    """
    norm = global_grad_norm(grads)
    if max_norm and max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            np.multiply(g, g.dtype.type(scale), out=g)
    return norm


# ----------------------------------------------------------------------------
# Optimizers


def decay_mask(params, decay_embeddings=False):
    """Which parameters get weight decay: matrices (ndim >= 2) only.

    Biases and layer-norm gains/biases (1-D) never decay. Embedding tables
    ("wte", "wpe", names ending in those) decay only when decay_embeddings is True;
    with tied embeddings "wte" is also the output matrix and follows the same flag.
    """
    mask = {}
    for name, p in params.items():
        is_embedding = name.split(".")[-1] in ("wte", "wpe") or name in ("wte", "wpe")
        mask[name] = p.ndim >= 2 and (decay_embeddings or not is_embedding)
    return mask


class Optimizer:
    """Base class: holds references to the parameter arrays and a step counter.

    threads: how many threads share the element-wise work of a step (default: the
    cores available, at most 8). Every element's update is independent of the others,
    so the result is bit-for-bit the same whatever the number of threads.
    """

    def __init__(self, params, threads=None):
        if not params:
            raise ValueError("optimizer got no parameters")
        self.params = params
        self.t = 0  # number of completed steps (bumped once per step, not per parameter)
        self.state = {}  # buffer name -> dict(param name -> array)
        self.threads = int(threads or default_threads())
        biggest = max(p.size for p in params.values())
        dtypes = {p.dtype for p in params.values()}
        # one scratch block per thread and dtype, reused by every update
        self._scratch = [{dt: np.empty(min(BLOCK, biggest), dtype=dt) for dt in dtypes}
                         for _ in range(self.threads)]
        self._plan = self._make_plan()
        self._runner = ShardRunner(len(self._plan))

    def _make_plan(self):
        """Split the parameters' elements into one task list per thread, balanced by size.

        A task is (name, lo, hi): a range of the flattened parameter. Large arrays are
        cut into BLOCK-aligned pieces so every thread gets about the same amount of work.
        """
        total = sum(p.size for p in self.params.values())
        share = max(BLOCK, -(-total // self.threads // BLOCK) * BLOCK)  # per-thread target, BLOCK multiple
        tasks = []
        for name, p in self.params.items():
            for lo in range(0, p.size, share):
                tasks.append((name, lo, min(lo + share, p.size)))
        plan, loads = [[] for _ in range(self.threads)], [0] * self.threads
        for task in sorted(tasks, key=lambda t: t[1] - t[2]):  # biggest first, to the least loaded
            i = loads.index(min(loads))
            plan[i].append(task)
            loads[i] += task[2] - task[1]
        return [tasks for tasks in plan if tasks]

    def _run(self, kernel):
        """Call kernel(name, lo, hi, scratch) on every task of the plan, one thread per task list."""
        def work(i):
            for name, lo, hi in self._plan[i]:
                kernel(name, lo, hi, self._scratch[i])
        self._runner.map(work, range(len(self._plan)))  # re-raises a worker's exception here

    def _buffer(self, kind):
        self.state[kind] = {k: np.zeros_like(p) for k, p in self.params.items()}
        return self.state[kind]

    def _check(self, grads):
        if grads.keys() != self.params.keys():
            missing = sorted(set(self.params) ^ set(grads))
            raise ValueError(f"grads and params have different keys: {missing[:5]}")

    def step(self, grads, lr):
        raise NotImplementedError

    def state_dict(self):
        """Flat dict of arrays: "t" plus "<buffer>/<param name>" (for the npz checkpoint)."""
        out = {"t": np.array(self.t, dtype=np.int64)}
        for kind, bufs in self.state.items():
            for name, buf in bufs.items():
                out[f"{kind}/{name}"] = buf
        return out

    def load_state_dict(self, state):
        """Copy a state_dict() into the existing buffers (in place, shapes checked)."""
        for kind, bufs in self.state.items():
            for name, buf in bufs.items():
                key = f"{kind}/{name}"
                if key not in state:
                    raise ValueError(f"optimizer state lacks {key!r} (saved by a different optimizer or model?)")
                src = np.asarray(state[key])
                if src.shape != buf.shape:
                    raise ValueError(f"optimizer state {key!r} has shape {src.shape}, expected {buf.shape}")
                buf[...] = src
        self.t = int(state["t"])


class SGD(Optimizer):
    """Plain SGD, optionally with (heavy-ball) momentum: buf = mu*buf + g; p -= lr*buf."""

    def __init__(self, params, momentum=0.0, weight_decay=0.0, decay_embeddings=False, threads=None):
        super().__init__(params, threads)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.decay = decay_mask(params, decay_embeddings)
        self.buf = self._buffer("momentum") if self.momentum else None

    def step(self, grads, lr):
        """One update with learning rate lr, in place."""
        self._check(grads)

        def kernel(name, lo, hi, scratch):
            p = self.params[name]
            ty = p.dtype.type
            lr_, mu = ty(lr), ty(self.momentum)
            decay = ty(1.0 - lr * self.weight_decay) if (self.weight_decay and self.decay[name]) else None
            pf, gf = _flat(p), _flat(grads[name])
            bf = _flat(self.buf[name]) if self.buf is not None else None
            for s in _blocks(lo, hi):
                pb, tmp = pf[s], scratch[p.dtype][: s.stop - s.start]
                if decay is not None:
                    np.multiply(pb, decay, out=pb)
                if bf is None:
                    np.multiply(gf[s], lr_, out=tmp)
                else:                                    # buf = mu * buf + g
                    b = bf[s]
                    np.multiply(b, mu, out=b)
                    np.add(b, gf[s], out=b)
                    np.multiply(b, lr_, out=tmp)
                np.subtract(pb, tmp, out=pb)             # p -= lr * buf
        self._run(kernel)
        self.t += 1


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; weight_decay here is decoupled (see AdamW)."""

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay_embeddings=False,
                 threads=None):
        super().__init__(params, threads)
        self.beta1, self.beta2 = (float(b) for b in betas)
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.decay = decay_mask(params, decay_embeddings)
        self.m = self._buffer("m")
        self.v = self._buffer("v")

    def step(self, grads, lr):
        """One update with learning rate lr, in place."""
        self._check(grads)
        self.t += 1
        bc1 = 1.0 - self.beta1 ** self.t
        bc2 = 1.0 - self.beta2 ** self.t
        step_size = lr / bc1
        inv_sqrt_bc2 = 1.0 / math.sqrt(bc2)

        def kernel(name, lo, hi, scratch):
            p = self.params[name]
            ty = p.dtype.type
            b1, b2, eps = ty(self.beta1), ty(self.beta2), ty(self.eps)
            lr_t, inv_bc2 = ty(step_size), ty(inv_sqrt_bc2)
            decay = ty(1.0 - lr * self.weight_decay) if (self.weight_decay and self.decay[name]) else None
            pf, gf, mf, vf = _flat(p), _flat(grads[name]), _flat(self.m[name]), _flat(self.v[name])
            for s in _blocks(lo, hi):
                pb, gb, mb, vb = pf[s], gf[s], mf[s], vf[s]
                tmp = scratch[p.dtype][: s.stop - s.start]
                if decay is not None:
                    np.multiply(pb, decay, out=pb)       # decoupled weight decay
                np.subtract(mb, gb, out=mb)              # m = b1*(m - g) + g = b1*m + (1-b1)*g
                np.multiply(mb, b1, out=mb)
                np.add(mb, gb, out=mb)
                np.multiply(gb, gb, out=tmp)             # v = b2*(v - g^2) + g^2
                np.subtract(vb, tmp, out=vb)
                np.multiply(vb, b2, out=vb)
                np.add(vb, tmp, out=vb)
                np.sqrt(vb, out=tmp)                     # denom = sqrt(v) / sqrt(bc2) + eps
                np.multiply(tmp, inv_bc2, out=tmp)
                np.add(tmp, eps, out=tmp)
                np.divide(mb, tmp, out=tmp)              # p -= lr/bc1 * m / denom
                np.multiply(tmp, lr_t, out=tmp)
                np.subtract(pb, tmp, out=pb)
        self._run(kernel)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), default 0.01 as in the guide.

    Decay applies to matrices only: never to biases or layer-norm parameters, and to
    the embedding tables only when decay_embeddings=True.
    """

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, decay_embeddings=False,
                 threads=None):
        super().__init__(params, betas=betas, eps=eps, weight_decay=weight_decay,
                         decay_embeddings=decay_embeddings, threads=threads)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
