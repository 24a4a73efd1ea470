"""A GPT-style language model composed of the hand-written layers.

Shapes: B batch, T sequence length, C d_model, V vocab_size, L n_layers, H n_heads,
F d_ff, T_max max_seq_len, P the number of parameters (flat_params and flat_grads are (P,)).

    x = wte[idx] + pos[:T]                      embeddings.py
    x = block_i(x) for i in range(L)            transformer.py (pre-norm)
    loss = cross_entropy(ln_f(x) @ wte.T, targets)   lm_head.py + loss.py

Parameters are a flat dict named as in GPT-2 (wte, wpe, h.{i}.ln_1.weight, ...
h.{i}.attn.c_attn.weight (C, 3C), ..., ln_f.bias), so with learned positions, GELU and
tied embeddings this computes exactly GPT-2's function. `grads` has the same keys.
As in llm.c, every parameter is a view into one flat array, `flat_params`, and every
gradient a view into `flat_grads` (in param_shapes order): the optimizer then updates one
array, the gradient norm is one reduction, and summing gradients is one addition.
All computation happens in the parameters' dtype: float32 to train, float64 to check.

With device="cuda" the arrays live on the GPU (CuPy, see device.py); token ids always come
from the host, where they are checked before the copy.
"""
import ctypes
import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np

from device import require, to_device, to_host, whole_arrays
from embeddings import embedding_backward, embedding_forward, sinusoidal_positions
from lm_head import HeadWorkspace, lm_head_forward, lm_head_loss
from loss import IGNORE_INDEX
from parallel import ShardRunner, sum_into
from transformer import KVCache, block_backward, block_forward


# The longest context (max_seq_len) this code builds a model for, whether from flags, a checkpoint or a
# Hugging Face folder: the sinusoidal table and generation's key/value cache are sized by it, not by any
# array in a file, so an untrusted number must not choose it freely.
MAX_SEQ_LEN = 1 << 17


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    n_layers: int = 2
    max_seq_len: int = 128  # length of the positional table: the longest context
    use_learned_pos: bool = False  # learned wpe (GPT-2) instead of the fixed sinusoidal table
    tie_embeddings: bool = True  # the head projects with wte instead of its own lm_head.weight
    activation: str = "gelu"  # "gelu" (tanh form, as GPT-2) or "relu"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.max_seq_len > MAX_SEQ_LEN:
            raise ValueError(f"ModelConfig.max_seq_len {self.max_seq_len} is above the {MAX_SEQ_LEN} this code "
                             "supports")
        for name in ("use_learned_pos", "tie_embeddings"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {self.activation!r}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}: written by a newer version?")
        return cls(**d)


def param_shapes(cfg):
    """{name: shape} of every parameter, in GPT-2's names and layouts."""
    C, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    shapes = {"wte": (V, C)}
    if cfg.use_learned_pos:
        shapes["wpe"] = (cfg.max_seq_len, C)
    for i in range(cfg.n_layers):
        shapes.update({
            f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
            f"h.{i}.attn.c_attn.weight": (C, 3 * C), f"h.{i}.attn.c_attn.bias": (3 * C,),
            f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
            f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
            f"h.{i}.mlp.c_fc.weight": (C, F), f"h.{i}.mlp.c_fc.bias": (F,),
            f"h.{i}.mlp.c_proj.weight": (F, C), f"h.{i}.mlp.c_proj.bias": (C,),
        })
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)  # same layout as wte
    return shapes


def init_params(cfg, rng, dtype=np.float32):
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit layer-norm gains, and the
    projections back into the residual stream scaled by 1/sqrt(2L) so its variance stays put."""
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".bias"):
            params[name] = np.zeros(shape, dtype)
        elif ".ln_" in name or name.startswith("ln_"):
            params[name] = np.ones(shape, dtype)
        else:
            std = {"wpe": 0.01}.get(name, 0.02)
            if name.endswith("c_proj.weight"):
                std /= np.sqrt(2 * cfg.n_layers)
            params[name] = rng.normal(0.0, std, size=shape).astype(dtype)
    return params


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

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
        libc.mallopt(M_ARENA_MAX, 1)  # worker threads too (parallel.py): their own arenas give memory back
    except (OSError, AttributeError):
        pass


class FlatDict(dict):
    """{name: array}, each array a view into the one 1-D array `flat`, back to back in key order.

    Entries are never rebound (that would detach them from `flat`): copy into them in place,
    `d[name][...] = value`.
    """

    def __init__(self, flat, shapes):
        views, offset = {}, 0
        for name, shape in shapes.items():
            size = math.prod(shape)
            views[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        if offset != flat.size:
            raise ValueError(f"the shapes hold {offset} elements, the flat array {flat.size}")
        super().__init__(views)
        self.flat = flat

    def __setitem__(self, name, value):
        if value is self.get(name):  # `d[name] += x` adds in place, then stores the same view back
            return
        raise TypeError(f"{name!r} is a view into a flat buffer: copy into it in place, d[{name!r}][...] = value")


class Shard(NamedTuple):
    """What one worker of forward_backward and evaluate owns: its gradients and head buffers."""
    grads: FlatDict
    workspace: HeadWorkspace


class LanguageModel:
    """Parameters, their gradients, and the forward/backward passes of the whole model.

    Training and evaluation split the batch into one shard of sequences per core (workers,
    by default as many as NumPy's BLAS has threads) and run them in parallel: parallel.py.
    On the GPU (device="cuda") and inside device.whole_array_mode() one worker does the batch.
    `params` (given) are copied into the model's flat buffer; the initial weights are drawn on
    the host, so both devices start from the same ones.
    """

    def __init__(self, config, seed=0, dtype=np.float32, params=None, workers=None, device="cpu",
                 for_training=True):
        keep_freed_memory()
        self.config = config
        self.xp = xp = require(device)
        self.shapes = param_shapes(config)
        if params is None:
            params = init_params(config, np.random.default_rng(seed), dtype)
        self._check_params(params)
        dtype = next(iter(params.values())).dtype
        size = sum(math.prod(shape) for shape in self.shapes.values())
        self.flat_params = xp.empty(size, dtype)
        self.params = FlatDict(self.flat_params, self.shapes)
        for name, p in params.items():
            self.params[name][...] = to_device(p, xp)
        # for_training=False (generation, evaluation): no gradient arrays, forward_backward refuses
        self.flat_grads = xp.zeros(size, dtype) if for_training else None
        self.grads = FlatDict(self.flat_grads, self.shapes) if for_training else None
        self.runner = ShardRunner(1 if xp is not np else workers)
        self.shards = [Shard(self.grads, HeadWorkspace())]  # more are added when first needed
        self._pos_table = None

    def _check_params(self, params):
        if params.keys() != self.shapes.keys():
            missing, extra = sorted(set(self.shapes) - set(params)), sorted(set(params) - set(self.shapes))
            raise ValueError(f"parameters do not match the config: missing {missing[:4]}, unexpected {extra[:4]}")
        for name, p in params.items():
            if tuple(p.shape) != self.shapes[name]:
                raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)}, the config needs {self.shapes[name]}")
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1:
            raise ValueError(f"parameters of several dtypes {sorted(map(str, dtypes))}: give them all one")

    def host_params(self):
        """{name: NumPy array} of the weights: the parameters themselves on the CPU, copies from the
        GPU (one copy of the flat buffer) there. For checkpoints."""
        return FlatDict(to_host(self.flat_params), self.shapes)

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self):
        return self.params["wte"].dtype

    def positions(self):
        """(T_max, C): the learned wpe, or the sinusoidal table in the parameters' dtype."""
        if self.config.use_learned_pos:
            return self.params["wpe"]
        if self._pos_table is None or self._pos_table.dtype != self.dtype:
            table = sinusoidal_positions(self.config.max_seq_len, self.config.d_model, self.dtype)
            self._pos_table = to_device(table, self.xp)
        return self._pos_table

    def head_weight(self):
        return self.params["wte"] if self.config.tie_embeddings else self.params["lm_head.weight"]

    def layer(self, i, tree):
        """The parameters (or gradients) of block i, without their 'h.{i}.' prefix."""
        prefix = f"h.{i}."
        return {k[len(prefix):]: v for k, v in tree.items() if k.startswith(prefix)}

    def num_parameters(self, include_embeddings=True):
        """Number of scalars; without embeddings leaves out wte and wpe (an untied head counts)."""
        return sum(v.size for k, v in self.params.items()
                   if include_embeddings or k not in ("wte", "wpe"))

    def new_kv_cache(self, batch_size):
        cfg = self.config
        hs = cfg.d_model // cfg.n_heads
        return KVCache(cfg.n_layers, batch_size, cfg.n_heads, cfg.max_seq_len, hs, self.dtype, self.xp)

    def check_tokens(self, idx, name="idx", start=0, allow_ignore=False):
        """A clear ValueError for what would otherwise fail deep inside NumPy (or silently wrap, as
        CuPy's indexing does): on the host, before the ids are copied to the device."""
        cfg = self.config
        if not isinstance(idx, np.ndarray) or idx.dtype.kind not in "iu":
            kind = idx.dtype if isinstance(idx, np.ndarray) else type(idx).__name__
            raise ValueError(f"{name} must be a NumPy array of integer token ids, got {kind}")
        if idx.ndim != 2 or idx.shape[0] < 1 or idx.shape[1] < 1:
            raise ValueError(f"{name} must have shape (batch, seq_len) with both > 0, got {idx.shape}")
        if start + idx.shape[1] > cfg.max_seq_len:
            raise ValueError(f"sequence of {start + idx.shape[1]} positions is longer than the model's "
                             f"max_seq_len={cfg.max_seq_len} (the positional table)")
        ok = (idx >= 0) & (idx < cfg.vocab_size)
        if allow_ignore:
            ok |= idx == IGNORE_INDEX
        if not ok.all():
            bad = idx[~ok]
            raise ValueError(f"{name} holds token ids outside [0, {cfg.vocab_size}): e.g. {int(bad[0])} "
                             f"(min {int(idx.min())}, max {int(idx.max())}); is vocab_size right for this data?")

    # ------------------------------------------------------------------ passes
    def _trunk_forward(self, idx, kv=None):
        """Embeddings and blocks: idx (B, T) -> x (B, T, C) and the caches backward needs."""
        cfg = self.config
        start = kv.length if kv is not None else 0
        x = embedding_forward(idx, self.params["wte"], self.positions(), start)  # (B, T, C)
        caches = []
        for i in range(cfg.n_layers):
            x, cache = block_forward(x, self.layer(i, self.params), cfg.n_heads, cfg.activation, kv, i)
            caches.append(cache)
        if kv is not None:
            kv.length += idx.shape[1]
        return x, caches

    def forward(self, idx, kv_cache=None, last_only=False):
        """idx (B, T) -> logits (B, T, V), or (B, 1, V) for the last position only (generation).
        With kv_cache, idx continues the cached positions."""
        start = kv_cache.length if kv_cache is not None else 0
        self.check_tokens(idx, start=start)
        x, _ = self._trunk_forward(to_device(idx, self.xp), kv_cache)
        if last_only:
            x = x[:, -1:]  # (B, T, C) -> (B, 1, C): the head is most of the cost
        return lm_head_forward(x, self.params["ln_f.weight"], self.params["ln_f.bias"], self.head_weight())

    def _split(self, idx, targets):
        """The batch's rows in up to one contiguous slice per worker, each with its Shard."""
        n = 1 if whole_arrays(self.flat_params) else min(self.runner.n_workers, len(idx))
        while len(self.shards) < n:
            grads = None if self.grads is None else FlatDict(self.xp.zeros_like(self.flat_grads), self.shapes)
            self.shards.append(Shard(grads, HeadWorkspace()))
        bounds = np.linspace(0, len(idx), n + 1).astype(int)
        return [(idx[a:b], targets[a:b], self.shards[i]) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]

    def _shard_pass(self, idx, targets, shard, mean_over=None):
        """Forward, loss and (with mean_over, the batch's number of counted targets) backward of one
        shard, its gradients added into shard.grads. Returns (loss_sum, n_correct, n_counted)."""
        p, g = self.params, shard.grads
        x, caches = self._trunk_forward(idx)
        head = None
        if mean_over is not None:
            head = (g["ln_f.weight"], g["ln_f.bias"], g["wte"] if self.config.tie_embeddings else g["lm_head.weight"])
        loss_sum, n_correct, n, dx = lm_head_loss(x, p["ln_f.weight"], p["ln_f.bias"], self.head_weight(), targets,
                                                  grads=head, workspace=shard.workspace, mean_over=mean_over)
        if mean_over is not None:
            for i in reversed(range(self.config.n_layers)):
                dx = block_backward(dx, caches[i], self.layer(i, p), self.layer(i, g))
            embedding_backward(dx, idx, g["wte"], g.get("wpe"))
        return loss_sum, n_correct, n

    def _batch_to_device(self, idx, targets):
        """Check a batch on the host; returns it on the device and its number of counted targets."""
        self.check_tokens(idx)
        self.check_tokens(targets, "targets", allow_ignore=True)
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {targets.shape} differs from idx shape {idx.shape}")
        self.positions()  # made once here, not by racing threads
        n = int(np.count_nonzero(targets != IGNORE_INDEX))
        return to_device(idx, self.xp), to_device(targets, self.xp), n

    def forward_backward(self, idx, targets, count=None):
        """One training pass: returns (mean loss, token accuracy) and leaves the gradients in self.grads.

        On the CPU two floats; on the GPU two 0-d device arrays, so that the step need not wait
        for the GPU: float() of them waits (read them when they are logged).

        count: when this batch is one slice of a larger one (one MPI rank's share, distributed.py), the
        number of counted targets of the whole batch. The gradients are then those of the whole batch's
        mean loss, and the return is this slice's (loss sum, number correct), for the caller to add up
        over the slices and divide by count.
        """
        if self.grads is None:
            raise ValueError("this model was made with for_training=False: it has no gradients")
        idx, targets, n = self._batch_to_device(idx, targets)
        n = max(n, 1) if count is None else count

        def run(part):
            idx_part, targets_part, shard = part
            shard.grads.flat.fill(0)
            return self._shard_pass(idx_part, targets_part, shard, mean_over=n)

        parts = self._split(idx, targets)
        results = self.runner.map(run, parts)
        # each worker adds up its own slice of the shards' flat gradients, every element over the
        # shards in the same order: the sum does not depend on thread timing
        sum_into([shard.grads.flat for _, _, shard in parts], self.runner)
        loss_sum, n_correct = sum(r[0] for r in results), sum(r[1] for r in results)
        out = (loss_sum / n, n_correct / n) if count is None else (loss_sum, n_correct)
        return tuple(float(v) for v in out) if self.xp is np else out

    def evaluate(self, idx, targets):
        """No gradients: returns (loss summed over tokens, number correct, number of tokens);
        on the GPU the first two are 0-d device arrays."""
        idx, targets, n = self._batch_to_device(idx, targets)
        results = self.runner.map(lambda part: self._shard_pass(*part), self._split(idx, targets))
        loss_sum, n_correct = sum(r[0] for r in results), sum(r[1] for r in results)
        return (float(loss_sum), int(n_correct), n) if self.xp is np else (loss_sum, n_correct, n)
