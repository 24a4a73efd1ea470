"""[math] Optimizers (SGD, AdamW and Muon), learning-rate schedules and gradient clipping.

Everything works on two dicts with the same keys, ``params`` and ``grads``
(name -> array), like ``LanguageModel.params`` / ``LanguageModel.grads``. There every
array is a view into one flat array (``.flat``, as in llm.c), and a step is then a few
passes over that one array; plain dicts of separate arrays work too (one pass per array).
The moments live in flat arrays of their own, one view per parameter.
Updates are in place: moment buffers are allocated once, and every step is a
fixed sequence of ``out=`` ufuncs over cache-sized blocks, so a step allocates
nothing and reads each large array only once from memory. The blocks are shared
out to a few threads (ufuncs release the GIL); each element's update is
independent, so results do not depend on the number of threads. On the GPU (and
inside device.whole_array_mode()) the same passes run over whole arrays instead.

    from optimizer import AdamW, LRSchedule, clip_grad_norm
    opt = AdamW(model.params, weight_decay=0.01)
    schedule = LRSchedule(base_lr=3e-4, warmup_steps=500, max_steps=5000, min_lr=3e-5)
    for step in range(5000):
        model.zero_grad()
        loss_sum, n_correct = model.forward_backward(x, y, n_targets)   # the gradients of loss_sum / n_targets
        grad_norm = clip_grad_norm(model.grads, max_norm=1.0)
        opt.step(model.grads, lr=schedule(step))

The updates, for the parameters that decay (decay_mask: matrices) and the others (no decay step):
  decay: p *= 1 - lr * weight_decay        (decoupled: the gradient is not changed)
  SGD:   buf = momentum * buf + g;  p -= lr * buf
  AdamW: m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
         p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
AdamW is PyTorch's torch.optim.AdamW; with weight_decay 0 it is Adam (train.py --optimizer adam).
SGD's weight decay is decoupled as AdamW's is, unlike PyTorch's SGD, which adds weight_decay * p to
the gradient (that is, before the momentum): with momentum the two differ.
  Muon:  buf = mu buf + g;  p -= lr * 0.2 sqrt(max(rows, cols)) * newton_schulz(g + mu buf)
         for the blocks' weight matrices (AdamW for the rest): see Muon.
"""
import math

import numpy as np

from config import name_mismatch
from device import BLOCK, get_array_module, to_device, to_host, whole_arrays
from parallel import ShardRunner, cores, slices

def default_threads():
    """Cores this process may use (at most 8): NumPy ufuncs release the GIL, so the
    element-wise update of disjoint slices runs in parallel."""
    return max(1, min(8, cores()))


def _flat(a):
    """A flat view of a (never a copy: updates must land in the original)."""
    if not a.flags.c_contiguous:
        raise ValueError("optimizer needs contiguous arrays (reshape would copy)")
    return a.reshape(-1)


# ----------------------------------------------------------------------------
# Learning-rate schedules

WSD_COOLDOWN = 0.3  # wsd's share of the steps after warmup spent decaying (train.py --cooldown)


class LRSchedule:
    """Linear warmup from 0 to base_lr over warmup_steps, then decay to min_lr.

    kind="cosine": half a cosine from base_lr at the end of warmup to min_lr at max_steps.
    kind="linear": a straight line from base_lr to min_lr over the same range.
    kind="constant": base_lr after warmup.
    kind="wsd" (warmup-stable-decay): base_lr after warmup, then a straight line to min_lr over the last
    `cooldown` share of the steps after warmup (cooldown 1: the linear schedule).
    After max_steps the rate stays at min_lr (cosine/linear/wsd). max_steps None: the horizon is not
    known yet (train.py --time_budget measures the speed first), and the rate after warmup stays at
    base_lr until max_steps is set. refit(step, max_steps) moves the horizon part way (--time_budget
    fits it again as the machine's speed changes): the decay goes on from where it is at step, the
    rate unbroken, and ends at the new max_steps (bend: that step and the decay's progress there).
    For wsd the horizon matters only once the cooldown has begun: a refit in the stable phase moves the
    cooldown with the end (the rate stays base_lr), unless the new end's cooldown would have begun
    already, when it begins at that step; a refit in the cooldown bends it as for the other kinds.
    ``schedule(step)`` is the rate for the update that follows step `step` (0-based),
    so the first update uses base_lr / warmup_steps, never 0.
    """

    KINDS = ("cosine", "linear", "constant", "wsd")

    def __init__(self, base_lr, warmup_steps=0, max_steps=1, min_lr=0.0, kind="cosine", cooldown=WSD_COOLDOWN):
        if kind not in self.KINDS:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(self.KINDS)}")
        if not 0 < cooldown <= 1:
            raise ValueError(f"need 0 < cooldown <= 1 (got {cooldown})")
        if base_lr <= 0 or min_lr < 0 or min_lr > base_lr:
            raise ValueError(f"need 0 <= min_lr <= base_lr and base_lr > 0 (got base_lr={base_lr}, min_lr={min_lr})")
        if warmup_steps < 0 or (max_steps is not None and max_steps < 1):
            raise ValueError(f"need warmup_steps >= 0 and max_steps >= 1 (got {warmup_steps}, {max_steps})")
        self.base_lr, self.min_lr = float(base_lr), float(min_lr)
        self.warmup_steps, self.kind, self.cooldown = int(warmup_steps), kind, float(cooldown)
        self.max_steps = None if max_steps is None else int(max_steps)
        self.bend = None  # (step, progress) where refit last moved the horizon; None: never moved

    def decay_start(self):
        """The step the decay begins at, unbent: the end of warmup; for wsd, where the cooldown begins
        (infinity while max_steps is None: the stable phase lasts until the horizon is known)."""
        if self.kind != "wsd":
            return self.warmup_steps
        if self.max_steps is None:
            return math.inf
        stable = (1.0 - self.cooldown) * (self.max_steps - self.warmup_steps)
        return self.warmup_steps + stable

    def progress(self, step):
        """How far the decay is at step (>= warmup_steps): 0 at its start, 1 at max_steps and after."""
        if self.max_steps is None:
            return 0.0
        start, done = self.bend or (self.decay_start(), 0.0)
        if step >= self.max_steps or self.max_steps <= start:
            return 1.0
        return min(1.0, done + (1.0 - done) * max(step - start, 0) / (self.max_steps - start))

    def refit(self, step, max_steps):
        """End the decay at max_steps instead, going on from where it is at step (the rate unbroken)."""
        if max_steps == self.max_steps:  # the same end: the same rates, to the last bit
            return
        if self.kind == "wsd" and self.bend is None and step <= self.decay_start():
            self._refit_stable(step, max_steps)
            return
        if step > self.warmup_steps:
            self.bend = (step, self.progress(step))
        self.max_steps = int(max_steps)

    def _refit_stable(self, step, max_steps):
        """wsd in its stable phase (rate base_lr): the cooldown moves with the end; should the new end's
        cooldown have begun before step, it begins at step instead, from base_lr (the rate unbroken)."""
        self.max_steps = int(max_steps)
        if self.decay_start() < step:
            self.bend = (step, 0.0)

    def __call__(self, step):
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant" or self.max_steps is None:
            return self.base_lr
        progress = self.progress(step)  # 0 -> 1
        if self.kind == "cosine":
            weight = 0.5 * (1.0 + math.cos(math.pi * progress))        # 1 -> 0
        elif self.kind == "wsd" and progress == 0.0:
            return self.base_lr  # the stable phase: base_lr itself (min_lr + 1.0 * (base_lr - min_lr) may round)
        else:  # linear, and wsd's cooldown
            weight = 1.0 - progress
        return self.min_lr + weight * (self.base_lr - self.min_lr)


# ----------------------------------------------------------------------------
# Gradient clipping


def _sum_of_squares(a):
    """sum(a**2) of a 1-D array, without overflow: float32 squares overflow above 1.8e19.

    On the CPU a BLAS dot product per block of BLOCK elements, in the array's dtype (fast, and
    accurate over a block), the blocks summed in float64; a block whose dot overflows (mean
    square above 5e33) is done again in float64. Converting every block to float64 instead
    costs 5 to 40 times as long. On whole arrays one float64 product, left on the device.
    """
    if whole_arrays(a):
        a64 = a.astype(np.float64)
        return a64 @ a64  # a 0-d array: on the GPU it stays there until read
    total = 0.0
    with np.errstate(over="ignore"):  # an overflowing block is redone below
        for lo in range(0, a.size, BLOCK):
            block = a[lo : lo + BLOCK]
            part = float(np.dot(block, block))  # BLAS dot: no temporary array
            if math.isinf(part):
                block = block.astype(np.float64)
                part = float(np.dot(block, block))
            total += part
    return total


def global_grad_norm(grads):
    """sqrt(sum of squares of every gradient entry), accumulated in float64; a float.

    One reduction over the flat buffer when the gradients are views into one (`grads.flat`,
    LanguageModel.grads). On the GPU, reading it is the step's one wait for the device.
    """
    flat = getattr(grads, "flat", None)
    arrays = [flat] if flat is not None else [_flat(g) for g in grads.values()]
    return math.sqrt(float(sum(_sum_of_squares(a) for a in arrays)))


def clip_grad_norm(grads, max_norm=1.0):
    """Scale all gradients in place so their global L2 norm is at most max_norm.

    Returns the norm before clipping (inf/nan when a gradient is not finite; the
    gradients are then left alone so the caller can stop). max_norm <= 0 or None
    means no clipping (the norm is still returned, for logging).
    """
    norm = global_grad_norm(grads)
    if max_norm and max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        flat = getattr(grads, "flat", None)
        for g in [flat] if flat is not None else grads.values():
            g *= g.dtype.type(scale)
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
    """Base class: holds references to the parameter arrays, flat state buffers and a step counter.

    Every element has an index in the flat parameter vector: the parameters back to back in
    the order of `params` (LanguageModel's params.flat has exactly this layout). The moments
    are flat arrays in that layout, `state[kind][name]` a view into them.

    threads: how many threads share the element-wise work of a step (default: the
    cores available, at most 8). Every element's update is independent of the others,
    so the result is bit-for-bit the same whatever the number of threads.
    """

    def __init__(self, params, threads=None):
        if not params:
            raise ValueError("optimizer got no parameters")
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1:
            raise ValueError(f"optimizer needs parameters of one dtype, got {sorted(map(str, dtypes))}")
        self.params = params
        self.t = 0  # number of completed steps (bumped once per step, not per parameter)
        self.state = {}  # buffer name -> dict(param name -> view into self.flat_state[buffer name])
        self.flat_state = {}
        first = next(iter(params.values()))
        self.xp, self.dtype = get_array_module(first), first.dtype
        self.offsets, self.size = {}, 0  # name -> (lo, hi) in the flat parameter vector
        for name, p in params.items():
            self.offsets[name] = (self.size, self.size + p.size)
            self.size += p.size
        self.threads = int(threads or default_threads())
        self._plan = slices(self.size, self.threads)  # each thread one contiguous range of the flat vector
        self._runner = ShardRunner(len(self._plan))
        # one scratch block per thread, reused by every update (whole arrays: one of the full size)
        self._scratch = [self.xp.empty(min(BLOCK, self.size), self.dtype) for _ in self._plan]
        self._whole_scratch = None
        self.decay_ranges = []  # (lo, hi) of the decayed parameters (set by subclasses)

    def _set_decay(self, decay_embeddings):
        """Weight decay for the matrices (decay_mask), as merged ranges of the flat vector."""
        mask = decay_mask(self.params, decay_embeddings)
        ranges = []
        for name, (lo, hi) in self.offsets.items():
            if mask[name] and hi > lo:
                if ranges and ranges[-1][1] == lo:
                    ranges[-1] = (ranges[-1][0], hi)
                else:
                    ranges.append((lo, hi))
        self.decay_ranges = ranges

    def _apply_decay(self, pb, lo, hi, factor):
        """pb, the block [lo, hi) of the flat parameters: the decayed parts times factor, in place."""
        for a, b in self.decay_ranges:
            if b <= lo:
                continue
            if a >= hi:
                break
            part = pb[max(a, lo) - lo : min(b, hi) - lo]
            self.xp.multiply(part, factor, out=part)

    def _segments(self, grads):
        """[(lo, p, g)]: 1-D parameters and gradients that hold [lo, lo + p.size) of the flat vector.
        One pair when both dicts are views into flat buffers (LanguageModel's), else one per array."""
        pf, gf = getattr(self.params, "flat", None), getattr(grads, "flat", None)
        if pf is not None and gf is not None and pf.size == gf.size == self.size and list(grads) == list(self.params):
            return [(0, pf, gf)]
        return [(lo, _flat(self.params[name]), _flat(grads[name])) for name, (lo, _) in self.offsets.items()]

    def _run(self, kernel, grads):
        """Call kernel(pb, gb, lo, hi, tmp) on blocks covering the flat vector: pb, gb the parameters
        and gradients of [lo, hi), tmp a scratch array of that size. Blocks of BLOCK over the threads
        of the plan on the CPU; whole segments in the calling thread on the whole-array path."""
        segments = self._segments(grads)
        if whole_arrays(segments[0][1]):
            if self._whole_scratch is None:
                self._whole_scratch = self.xp.empty(self.size, self.dtype)
            plan, block, scratch = [(0, self.size)], self.size, [self._whole_scratch]
        else:
            plan, block, scratch = self._plan, BLOCK, self._scratch

        def work(i):
            lo, hi = plan[i]
            for start, p, g in segments:
                for a in range(max(lo, start), min(hi, start + p.size), block):
                    b = min(a + block, hi, start + p.size)
                    kernel(p[a - start : b - start], g[a - start : b - start], a, b, scratch[i][: b - a])

        if len(plan) == 1:
            work(0)
        else:
            self._runner.map(work, range(len(plan)))  # re-raises a worker's exception here

    def _buffer(self, kind):
        flat = self.flat_state[kind] = self.xp.zeros(self.size, self.dtype)
        self.state[kind] = {k: flat[lo:hi].reshape(self.params[k].shape) for k, (lo, hi) in self.offsets.items()}
        return self.state[kind]

    def _check(self, grads):
        mismatch = name_mismatch(self.params, grads)
        if mismatch:
            raise ValueError(f"grads and params have different keys: {mismatch}")

    def step(self, grads, lr):
        raise NotImplementedError

    def state_dict(self):
        """Flat dict of host arrays: "t" plus "<buffer>/<param name>" (for the npz checkpoint)."""
        out = {"t": np.array(self.t, dtype=np.int64)}
        for kind, flat in self.flat_state.items():
            host = to_host(flat)  # one copy from the GPU; on the CPU the buffer itself
            for name, (lo, hi) in self.offsets.items():
                out[f"{kind}/{name}"] = host[lo:hi].reshape(self.params[name].shape)
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
                buf[...] = to_device(src, self.xp)
        t = np.asarray(state["t"])
        if t.shape != () or t.dtype.kind not in "iu" or not 0 <= t <= 2**53:
            raise ValueError(f"optimizer step t = {t} is not a count of steps")
        self.t = int(t)


class SGD(Optimizer):
    """Plain SGD, optionally with (heavy-ball) momentum: buf = mu*buf + g; p -= lr*buf; weight decay
    decoupled (p *= 1 - lr * weight_decay first, the gradient left as it is)."""

    def __init__(self, params, momentum=0.0, weight_decay=0.0, decay_embeddings=False, threads=None):
        super().__init__(params, threads)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self._set_decay(decay_embeddings)
        self.buf = self._buffer("momentum") if self.momentum else None

    def step(self, grads, lr):
        """One update with learning rate lr, in place."""
        self._check(grads)
        xp, ty = self.xp, self.dtype.type
        lr_, mu = ty(lr), ty(self.momentum)
        decay = ty(1.0 - lr * self.weight_decay) if self.weight_decay else None
        bf = self.flat_state.get("momentum")

        def kernel(pb, gb, lo, hi, tmp):
            if decay is not None:
                self._apply_decay(pb, lo, hi, decay)
            if bf is None:
                xp.multiply(gb, lr_, out=tmp)
            else:                                        # buf = mu * buf + g
                b = bf[lo:hi]
                xp.multiply(b, mu, out=b)
                xp.add(b, gb, out=b)
                xp.multiply(b, lr_, out=tmp)
            xp.subtract(pb, tmp, out=pb)                 # p -= lr * buf
        self._run(kernel, grads)
        self.t += 1


class AdamW(Optimizer):
    """Adam (Kingma & Ba) with bias correction and decoupled weight decay (Loshchilov & Hutter), default
    0.01 as in the guide; weight_decay=0 is plain Adam.

    Decay applies to matrices only: never to biases or layer-norm parameters, and to
    the embedding tables only when decay_embeddings=True.
    """

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, decay_embeddings=False,
                 threads=None):
        super().__init__(params, threads)
        self.beta1, self.beta2 = (float(b) for b in betas)
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self._set_decay(decay_embeddings)
        self.m = self._buffer("m")
        self.v = self._buffer("v")

    def step(self, grads, lr):
        """One update with learning rate lr, in place."""
        self._check(grads)
        self.t += 1
        bc1 = 1.0 - self.beta1 ** self.t
        bc2 = 1.0 - self.beta2 ** self.t
        xp, ty = self.xp, self.dtype.type
        b1, b2, eps = ty(self.beta1), ty(self.beta2), ty(self.eps)
        lr_t, inv_bc2 = ty(lr / bc1), ty(1.0 / math.sqrt(bc2))
        decay = ty(1.0 - lr * self.weight_decay) if self.weight_decay else None
        mf, vf = self.flat_state["m"], self.flat_state["v"]

        def kernel(pb, gb, lo, hi, tmp):
            mb, vb = mf[lo:hi], vf[lo:hi]
            if decay is not None:
                self._apply_decay(pb, lo, hi, decay)     # decoupled weight decay
            xp.subtract(mb, gb, out=mb)                  # m = b1*(m - g) + g = b1*m + (1-b1)*g
            xp.multiply(mb, b1, out=mb)
            xp.add(mb, gb, out=mb)
            xp.multiply(gb, gb, out=tmp)                 # v = b2*(v - g^2) + g^2
            xp.subtract(vb, tmp, out=vb)
            xp.multiply(vb, b2, out=vb)
            xp.add(vb, tmp, out=vb)
            xp.sqrt(vb, out=tmp)                         # denom = sqrt(v) / sqrt(bc2) + eps
            xp.multiply(tmp, inv_bc2, out=tmp)
            xp.add(tmp, eps, out=tmp)
            xp.divide(mb, tmp, out=tmp)                  # p -= lr/bc1 * m / denom
            xp.multiply(tmp, lr_t, out=tmp)
            xp.subtract(pb, tmp, out=pb)
        self._run(kernel, grads)


# ----------------------------------------------------------------------------
# Muon: momentum, orthogonalized, for the blocks' weight matrices

QUINTIC = (3.4445, -4.7750, 2.0315)  # Keller Jordan's Muon: 5 steps put every singular value in about [0.7, 1.2]
CUBIC = (1.5, -0.5)                  # the classic Newton-Schulz iteration: slower, but converges to U V^T


def polar_factor(g):
    """The reference: U V^T from the SVD g = U S V^T (g every singular value set to 1), in NumPy on the host."""
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    return u @ vt


def newton_schulz(g, coefficients=QUINTIC, steps=5, eps=1e-7):
    """g (m, n) orthogonalized, about polar_factor(g) = U V^T, with matrix products only (no SVD: the GPU
    and BLAS do these fast, in g's dtype, on either array module).

    X starts as g / ||g|| (Frobenius), so every singular value is at most 1. Each step applies an odd
    polynomial to the singular values and keeps the singular vectors: with A = X X^T,
        X <- c0 X + c1 A X + c2 A^2 X      i.e. for each singular value s: s <- c0 s + c1 s^3 + c2 s^5
    CUBIC (c0, c1) = (1.5, -0.5) has the fixed point s = 1 and converges to U V^T (slowly for small s).
    QUINTIC grows small s about 3.4 times a step and gives up convergence for speed: 5 steps leave the
    singular values in a band around 1, which is all Muon needs. A wide g (m <= n) keeps A (m, m) small;
    a tall one is done transposed.
    """
    xp = get_array_module(g)
    transposed = g.shape[0] > g.shape[1]
    x = g.T if transposed else g                 # (m, n), m <= n
    x = x / (xp.sqrt((x * x).sum()) + eps)       # Frobenius norm 1: singular values in [0, 1]
    for _ in range(steps):
        a = x @ x.T                              # (m, n) @ (n, m) -> (m, m)
        power, b = a, coefficients[1] * a        # b = c1 A + c2 A^2 + ...
        for c in coefficients[2:]:
            power = power @ a
            b = b + c * power
        x = coefficients[0] * x + b @ x          # (m, m) @ (m, n) -> (m, n)
    return x.T if transposed else x


def muon_matrices(params):
    """{name: column widths} of the parameters Muon updates: the 2-D parameters of the blocks ("h.{i}.*":
    attention and feed-forward weights), each orthogonalized in the column blocks given. The attention's
    c_attn (C, C + 2 Hkv hs) holds q, k and v side by side (q's C columns first, then k's and v's, equal):
    they are three matrices, orthogonalized apart. Every other matrix is one, the Llama block's mlp.c_fc
    (C, 2F) too: its gate and up halves are orthogonalized together."""
    parts = {}
    for name, p in params.items():
        if not name.startswith("h.") or p.ndim != 2:
            continue
        rows, cols = p.shape
        if name.endswith("attn.c_attn.weight") and cols > rows and (cols - rows) % 2 == 0:
            kv = (cols - rows) // 2
            parts[name] = (rows, kv, kv)         # q | k | v
        else:
            parts[name] = (cols,)
    return parts


class Muon(Optimizer):
    """Muon (Keller Jordan, 2024) for the blocks' weight matrices (muon_matrices), AdamW for the rest (the
    token embedding, also the tied output layer; the position table; the norms' weights; the biases).

    For each matrix W with gradient G (each of c_attn's q, k, v apart):
        buf = momentum * buf + G                        (the momentum buffer, in the checkpoint)
        U = G + momentum * buf                          (Nesterov: look one step ahead)
        O = newton_schulz(U)                            (about U's polar factor: singular values near 1)
        W *= 1 - lr * weight_decay                      (decoupled weight decay, as AdamW's)
        W -= lr * 0.2 * sqrt(max(rows, cols)) * O
    An (m, n) matrix with singular values 1 has an RMS of 1 / sqrt(max(m, n)); the factor (Moonshot AI's
    "Muon is scalable", 2025) makes the update's RMS 0.2, about AdamW's, so lr and weight_decay mean what
    they mean for AdamW (the same --learning_rate, --weight_decay and schedule work for both parts).

    The other parameters get AdamW(betas, eps, weight_decay, decay_embeddings) with the same lr. State:
    "t", "momentum/<matrix>", and AdamW's "m/<name>", "v/<name>" for the rest. Everything runs in the
    parameters' array module (NumPy or CuPy) and dtype.
    """

    def __init__(self, params, momentum=0.95, weight_decay=0.01, decay_embeddings=False, betas=(0.9, 0.999),
                 eps=1e-8, coefficients=QUINTIC, ns_steps=5, threads=None):
        self.parts = muon_matrices(params)
        if not self.parts:
            raise ValueError("Muon found no block weight matrices (h.{i}.* of 2 dimensions) to update")
        super().__init__({name: params[name] for name in self.parts}, threads=1)  # its work: matrix products
        self.all_params = params
        self.adamw = AdamW({name: p for name, p in params.items() if name not in self.parts}, betas=betas, eps=eps,
                           weight_decay=weight_decay, decay_embeddings=decay_embeddings, threads=threads)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.coefficients, self.ns_steps = tuple(coefficients), int(ns_steps)
        self.buf = self._buffer("momentum")

    def step(self, grads, lr):
        """One update with learning rate lr, in place."""
        mismatch = name_mismatch(self.all_params, grads)
        if mismatch:
            raise ValueError(f"grads and params have different keys: {mismatch}")
        self.adamw.step({name: grads[name] for name in self.adamw.params}, lr)
        xp, ty = self.xp, self.dtype.type
        mu = ty(self.momentum)
        decay = ty(1.0 - lr * self.weight_decay)
        for name, p in self.params.items():
            g, buf = grads[name], self.buf[name]
            xp.multiply(buf, mu, out=buf)                # buf = mu * buf + g
            xp.add(buf, g, out=buf)
            update = g + mu * buf                        # Nesterov
            if self.weight_decay:
                xp.multiply(p, decay, out=p)
            lo = 0
            for width in self.parts[name]:
                cols = slice(lo, lo + width)
                o = newton_schulz(update[:, cols], self.coefficients, self.ns_steps)
                scale = ty(lr * 0.2 * math.sqrt(max(o.shape)))
                p[:, cols] -= scale * o
                lo += width
        self.t += 1

    def state_dict(self):
        """The step "t", "momentum/<matrix>" and AdamW's "m/<name>", "v/<name>" (host arrays, for the checkpoint)."""
        return {**self.adamw.state_dict(), **super().state_dict()}

    def load_state_dict(self, state):
        self.adamw.load_state_dict(state)
        super().load_state_dict(state)


OPTIMIZERS = ("adam", "adamw", "muon", "sgd")  # train.py --optimizer: adam is AdamW with weight_decay 0


def build_optimizer(name, params, weight_decay=0.0, decay_embeddings=False, momentum=0.0, betas=(0.9, 0.999),
                    threads=None, muon_momentum=0.95):
    """The optimizer named by train.py's --optimizer (OPTIMIZERS): "sgd", "adamw", "adam" (AdamW without
    weight decay), or "muon" (Muon with muon_momentum for the blocks' matrices, AdamW with betas for the rest,
    both with weight_decay)."""
    if name == "sgd":
        return SGD(params, momentum=momentum, weight_decay=weight_decay, decay_embeddings=decay_embeddings,
                   threads=threads)
    if name == "muon":
        return Muon(params, momentum=muon_momentum, weight_decay=weight_decay, decay_embeddings=decay_embeddings,
                    betas=betas, threads=threads)
    if name not in ("adamw", "adam"):
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return AdamW(params, betas=betas, weight_decay=weight_decay if name == "adamw" else 0.0,
                 decay_embeddings=decay_embeddings, threads=threads)
