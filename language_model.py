"""A GPT-style language model composed of the hand-written layers.

Shapes: B batch, T sequence length, C d_model, V vocab_size, L n_layers, H n_heads,
F d_ff, T_max max_seq_len.

    x = wte[idx] + pos[:T]                      embeddings.py
    x = block_i(x) for i in range(L)            transformer.py (pre-norm)
    loss = cross_entropy(ln_f(x) @ wte.T, targets)   lm_head.py + loss.py

Parameters are a flat dict named as in GPT-2 (wte, wpe, h.{i}.ln_1.weight, ...
h.{i}.attn.c_attn.weight (C, 3C), ..., ln_f.bias), so with learned positions, GELU and
tied embeddings this computes exactly GPT-2's function. `grads` has the same keys.
All computation happens in the parameters' dtype: float32 to train, float64 to check.
"""
import ctypes
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np

from embeddings import embedding_backward, embedding_forward, sinusoidal_positions
from lm_head import HeadWorkspace, lm_head_forward, lm_head_loss
from loss import IGNORE_INDEX
from parallel import ShardRunner
from transformer import KVCache, block_backward, block_forward


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
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
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


class Shard(NamedTuple):
    """What one worker of forward_backward and evaluate owns: its gradients and head buffers."""
    grads: dict
    workspace: HeadWorkspace


class LanguageModel:
    """Parameters, their gradients, and the forward/backward passes of the whole model.

    Training and evaluation split the batch into one shard of sequences per core (workers,
    by default as many as NumPy's BLAS has threads) and run them in parallel: parallel.py.
    """

    def __init__(self, config, seed=0, dtype=np.float32, params=None, workers=None):
        keep_freed_memory()
        self.config = config
        if params is None:
            params = init_params(config, np.random.default_rng(seed), dtype)
        self.params = params
        self.grads = {k: np.zeros_like(v) for k, v in params.items()}
        self.runner = ShardRunner(workers)
        self.shards = [Shard(self.grads, HeadWorkspace())]  # more are added when first needed
        self._pos_table = None

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self):
        return self.params["wte"].dtype

    def positions(self):
        """(T_max, C): the learned wpe, or the sinusoidal table in the parameters' dtype."""
        if self.config.use_learned_pos:
            return self.params["wpe"]
        if self._pos_table is None or self._pos_table.dtype != self.dtype:
            self._pos_table = sinusoidal_positions(self.config.max_seq_len, self.config.d_model, self.dtype)
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
        return KVCache(cfg.n_layers, batch_size, cfg.n_heads, cfg.max_seq_len, hs, self.dtype)

    def check_tokens(self, idx, name="idx", start=0, allow_ignore=False):
        """A clear ValueError for what would otherwise fail deep inside NumPy (or silently wrap)."""
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
        x, _ = self._trunk_forward(idx, kv_cache)
        if last_only:
            x = x[:, -1:]  # (B, T, C) -> (B, 1, C): the head is most of the cost
        return lm_head_forward(x, self.params["ln_f.weight"], self.params["ln_f.bias"], self.head_weight())

    def _split(self, idx, targets):
        """The batch's rows in up to one contiguous slice per worker, each with its Shard."""
        n = min(self.runner.n_workers, len(idx))
        while len(self.shards) < n:
            self.shards.append(Shard({k: np.zeros_like(v) for k, v in self.params.items()}, HeadWorkspace()))
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

    def forward_backward(self, idx, targets, count=None):
        """One training pass: returns (mean loss, token accuracy) and leaves the gradients in self.grads.

        count: when this batch is one slice of a larger one (one MPI rank's share, distributed.py), the
        number of counted targets of the whole batch. The gradients are then those of the whole batch's
        mean loss, and the return is this slice's (loss sum, number correct), for the caller to add up
        over the slices and divide by count.
        """
        self.check_tokens(idx)
        self.check_tokens(targets, "targets", allow_ignore=True)
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {targets.shape} differs from idx shape {idx.shape}")
        self.positions()  # made once here, not by racing threads
        n = max(int(np.count_nonzero(targets != IGNORE_INDEX)), 1) if count is None else count

        def run(part):
            idx_part, targets_part, shard = part
            for v in shard.grads.values():
                v.fill(0)
            return self._shard_pass(idx_part, targets_part, shard, mean_over=n)

        parts = self._split(idx, targets)
        results = self.runner.map(run, parts)
        for _, _, shard in parts[1:]:  # in a fixed order: the sum does not depend on thread timing
            for k, v in self.grads.items():
                v += shard.grads[k]
        loss_sum, n_correct = sum(r[0] for r in results), sum(r[1] for r in results)
        return (loss_sum / n, n_correct / n) if count is None else (loss_sum, n_correct)

    def evaluate(self, idx, targets):
        """No gradients: returns (loss summed over tokens, number correct, number of tokens)."""
        self.check_tokens(idx)
        self.check_tokens(targets, "targets", allow_ignore=True)
        self.positions()
        results = self.runner.map(lambda part: self._shard_pass(*part), self._split(idx, targets))
        return tuple(sum(r[i] for r in results) for i in range(3))
