"""[model] A GPT-style language model composed of the hand-written layers.

Shapes: B batch, T sequence length, C d_model, V vocab_size, L n_layers, H n_heads,
F d_ff, T_max max_seq_len, P the number of parameters (params.flat and grads.flat are (P,)).

    x = wte[idx] + pos[:T]                      embeddings.py
    x = block_i(x) for i in range(L)            transformer.py (pre-norm)
    loss = cross_entropy(ln_f(x) @ wte.T, targets)   lm_head.py + loss.py

Which block, and its final norm, the model picks once from BLOCKS by config.arch: GPT-2's
(transformer.py) or Llama's (llama.py: RMSNorm, rotary positions, SwiGLU or relu2, no biases), whose
embedding adds no position table (config.positions "rotary") and whose ln_f is an RMSNorm. A
new kind of block is a row here and one in config.ARCHS. Two options serve either block:
config.qk_norm (each head's q and k normalised inside attention, transformer.qk_rms_norm_inplace) and
config.logit_softcap (the logits capped by c tanh(z / c) in the head, lm_head.softcap_inplace).

Training with config.dropout > 0 drops out the embeddings' output and, in each block, the
attention weights and both branches' outputs, with masks drawn per global row of the step's
batch (dropout.py); evaluation and generation never drop.

Parameters are a flat dict named as in GPT-2 (wte, wpe, h.{i}.ln_1.weight, ...
h.{i}.attn.c_attn.weight (C, 3C), ..., ln_f.bias), so with learned positions, GELU and
tied embeddings this computes exactly GPT-2's function (config.py holds the names and shapes).
`grads` has the same keys. As in llm.c, every parameter is a view into one flat array,
`params.flat`, and every gradient a view into `grads.flat` (in param_shapes order): the
optimizer then updates one array, the gradient norm is one reduction, and summing gradients
is one addition.
All computation happens in the parameters' dtype: float32 to train, float64 to check.

With device="cuda" the arrays live on the GPU (CuPy, see device.py); token ids always come
from the host, where they are checked before the copy.
"""
import math
from typing import Callable, NamedTuple

import numpy as np

import llama
import transformer
from config import name_mismatch, param_shapes
from device import array_module, to_device, to_host
from dropout import draw_masks, dropout_backward, dropout_forward
from embeddings import embedding_backward, embedding_forward, sinusoidal_positions
from lm_head import HeadWorkspace, lm_head_forward, lm_head_loss
from loss import IGNORE_INDEX
from parallel import Shards
from transformer import KVCache


class Block(NamedTuple):
    """One kind of block's math, in the signatures every kind shares."""
    forward: Callable  # (x, p, cfg, kv, layer, dropout) -> out, cache
    backward: Callable  # (dout, cache, p, g) -> dx, adding into g
    final_norm_forward: Callable  # (x, params, cfg) -> h, cache: ln_f
    final_norm_backward: Callable  # (dh, cache, grads) -> dx


BLOCKS = {  # config.arch -> its block (config.ARCHS holds the same kinds' shapes and defaults)
    "gpt2": Block(transformer.block_forward, transformer.block_backward,
                  transformer.final_norm_forward, transformer.final_norm_backward),
    "llama": Block(llama.llama_block_forward, llama.llama_block_backward,
                   llama.llama_final_norm_forward, llama.llama_final_norm_backward),
}


def init_params(cfg, rng, dtype=np.float32):
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit layer-norm gains, and the
    projections back into the residual stream scaled by 1/sqrt(2L) so its variance stays put.
    The Llama block's parameters follow the same rule by their names (llama.init_llama_block's)."""
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


# The two projections of each block that write into the residual stream (the same names in both blocks)
OUTPUT_PROJECTIONS = ("attn.c_proj.weight", "mlp.c_proj.weight")


def zero_output_projections(params):
    """train.py --zero_init_proj: every block's OUTPUT_PROJECTIONS set to zero, in place (params: a dict of
    arrays, FlatDict views included). Each block then starts as the identity, its branches adding nothing to
    the residual stream until training moves them: their gradients (input.T @ dout) are not zero. GPT-2's
    biases of these projections are zero already. Applied after init_params, so every other weight is
    the very one the same seed gives without it."""
    for name, p in params.items():
        if name.startswith("h.") and name.endswith(OUTPUT_PROJECTIONS):
            p[...] = 0


def memory_needed(cfg, batch_size, seq_len, workers=1):
    """Bytes a training step of cfg's model needs, roughly: weights, gradients and AdamW's two moments (and
    one more gradient copy per extra worker), plus the activations a step keeps for its backward pass (the
    feed-forward's: two (B, T, F) arrays, a two-matrix MLP's pre-activation and activation, in either block)."""
    P = sum(math.prod(s) for s in param_shapes(cfg).values())
    C, F, L, H, T = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.n_heads, seq_len
    return 4 * P * (4 + max(0, workers - 1)) + 4 * batch_size * T * L * (8 * C + 2 * F + H * T)


class FlatDict(dict):
    """{name: array}, each array a view into the one 1-D array `flat`, back to back in key order
    (llm.c's ParameterTensors over params_memory). `layers[i]` holds block i's views without their
    "h.{i}." prefix ({"ln_1.weight": ..., ...}), made once here.

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
        self.layers = []
        for name, view in views.items():
            if name.startswith("h."):
                i, rest = name[len("h."):].split(".", 1)
                while len(self.layers) <= int(i):
                    self.layers.append({})
                self.layers[int(i)][rest] = view

    def __setitem__(self, name, value):
        if value is self.get(name):  # `d[name] += x` adds in place, then stores the same view back
            return
        raise TypeError(f"{name!r} is a view into a flat buffer: copy into it in place, d[{name!r}][...] = value")


class LanguageModel:
    """Parameters, their gradients, and the forward/backward passes of the whole model.

    As llm.c's gpt2_zero_grad / gpt2_forward / gpt2_backward, a training step is

        model.zero_grad()
        loss_sum, n_correct = model.forward_backward(idx, targets, n_targets)   # adds into model.grads

    and the caller divides the sums by the number of targets. Training and evaluation split the
    batch into one shard of sequences per core (workers, by default as many as NumPy's BLAS has
    threads) and run them in parallel (parallel.Shards). On the GPU (device="cuda") and inside
    device.whole_array_mode() one worker does the batch. `params` (given) are copied into the
    model's flat buffer; the initial weights are drawn on the host, so both devices start from the
    same ones.
    """

    def __init__(self, config, seed=0, dtype=np.float32, params=None, workers=None, device="cpu",
                 for_training=True):
        self.config = config
        self.xp = xp = array_module(device)
        self.shapes = param_shapes(config)
        if params is None:
            params = init_params(config, np.random.default_rng(seed), dtype)
        self._check_params(params)
        dtype = next(iter(params.values())).dtype
        size = sum(math.prod(shape) for shape in self.shapes.values())
        self.params = FlatDict(xp.empty(size, dtype), self.shapes)
        for name, p in params.items():
            self.params[name][...] = to_device(p, xp)
        # for_training=False (generation, evaluation): no gradient arrays, forward_backward refuses
        self.grads = FlatDict(xp.zeros(size, dtype), self.shapes) if for_training else None
        self.shards = Shards(1 if xp is not np else workers, self.grads,
                             lambda: FlatDict(xp.zeros(size, dtype), self.shapes), HeadWorkspace)
        self.block = BLOCKS[config.arch]
        self._pos_table = None

    def _check_params(self, params):
        mismatch = name_mismatch(self.shapes, params)
        if mismatch:
            raise ValueError(f"parameters do not match the config: {mismatch}")
        for name, p in params.items():
            if tuple(p.shape) != self.shapes[name]:
                raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)}, the config needs {self.shapes[name]}")
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1:
            raise ValueError(f"parameters of several dtypes {sorted(map(str, dtypes))}: give them all one")

    def host_params(self):
        """{name: NumPy array} of the weights: the parameters themselves on the CPU, copies from the
        GPU (one copy of the flat buffer) there. For checkpoints."""
        return FlatDict(to_host(self.params.flat), self.shapes)

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self):
        return self.params.flat.dtype

    @property
    def workers(self):
        """How many threads a batch is split over."""
        return self.shards.n_workers

    def positions(self):
        """(T_max, C): the learned wpe, or the sinusoidal table in the parameters' dtype; None for
        rotary positions (rotations inside attention: the Llama block's)."""
        if self.config.positions == "rotary":
            return None
        if self.config.positions == "learned":
            return self.params["wpe"]
        if self._pos_table is None or self._pos_table.dtype != self.dtype:
            table = sinusoidal_positions(self.config.max_seq_len, self.config.d_model, self.dtype)
            self._pos_table = to_device(table, self.xp)
        return self._pos_table

    def head_weight(self, tree):
        """The output layer's weight in tree (the parameters or gradients): wte when tied."""
        return tree["wte"] if self.config.tie_embeddings else tree["lm_head.weight"]

    def num_parameters(self, include_embeddings=True):
        """Number of scalars; without embeddings leaves out wte and wpe (an untied head counts)."""
        return sum(v.size for k, v in self.params.items()
                   if include_embeddings or k not in ("wte", "wpe"))

    def new_kv_cache(self, batch_size):
        cfg = self.config
        hs = cfg.d_model // cfg.n_heads
        heads = cfg.n_kv_heads or cfg.n_heads  # Llama's key/value heads (fewer with grouped-query attention)
        return KVCache(cfg.n_layers, batch_size, heads, cfg.max_seq_len, hs, self.dtype, self.xp)

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
                             f"max_seq_len={cfg.max_seq_len} (its longest context)")
        ok = (idx >= 0) & (idx < cfg.vocab_size)
        if allow_ignore:
            ok |= idx == IGNORE_INDEX
        if not ok.all():
            bad = idx[~ok]
            raise ValueError(f"{name} holds token ids outside [0, {cfg.vocab_size}): e.g. {int(bad[0])} "
                             f"(min {int(idx.min())}, max {int(idx.max())}); is vocab_size right for this data?")

    # ------------------------------------------------------------------ passes
    def _trunk_forward(self, idx, kv=None, masks=None):
        """Embeddings and blocks: idx (B, T) -> x (B, T, C) and the caches backward needs. masks: the
        pass's dropout.ModelMasks, None: no dropout."""
        cfg, p = self.config, self.params
        start = kv.length if kv is not None else 0
        x = embedding_forward(idx, p["wte"], self.positions(), start)  # (B, T, C)
        if masks is not None:
            dropout_forward(x, masks.embedding, out=x)
        caches = []
        for i in range(cfg.n_layers):
            layer_masks = None if masks is None else masks.layers[i]
            x, cache = self.block.forward(x, p.layers[i], cfg, kv, i, layer_masks)
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
        h, _ = self.block.final_norm_forward(x, self.params, self.config)
        return lm_head_forward(h, self.head_weight(self.params), self.config.logit_softcap)

    def _dropout_masks(self, key, B, T):
        """The dropout masks of the B rows of `key` (dropout.DropoutKey), None without dropout."""
        if key is None or self.config.dropout == 0:
            return None
        return draw_masks(key, self.config, B, T, self.xp)

    def _loss_and_backward(self, idx, targets, n_targets, g, workspace, dropout):
        """One worker's rows: forward, loss and backward, the gradients of (loss sum / n_targets)
        added into g. Returns (loss sum, number correct) over these rows."""
        p, cfg = self.params, self.config
        masks = self._dropout_masks(dropout, *idx.shape)
        x, caches = self._trunk_forward(idx, masks=masks)
        B, T, C = x.shape
        h, norm_cache = self.block.final_norm_forward(x.reshape(B * T, C), p, cfg)
        loss_sum, n_correct, _, dh = lm_head_loss(h, self.head_weight(p), targets.reshape(B * T),
                                                  self.head_weight(g), workspace, mean_over=n_targets,
                                                  softcap=cfg.logit_softcap)
        dx = self.block.final_norm_backward(dh, norm_cache, g).reshape(B, T, C)
        for i in reversed(range(cfg.n_layers)):
            dx = self.block.backward(dx, caches[i], p.layers[i], g.layers[i])
        if masks is not None:
            dropout_backward(dx, masks.embedding, out=dx)  # forward was: x = dropout(wte[idx] + pos)
        embedding_backward(dx, idx, g["wte"], g.get("wpe"))
        return loss_sum, n_correct

    def _loss(self, idx, targets, workspace):
        """One worker's rows, no gradients: (loss sum, number correct)."""
        x, _ = self._trunk_forward(idx)
        B, T, C = x.shape
        h, _ = self.block.final_norm_forward(x.reshape(B * T, C), self.params, self.config)
        loss_sum, n_correct, _, _ = lm_head_loss(h, self.head_weight(self.params), targets.reshape(B * T),
                                                 workspace=workspace, softcap=self.config.logit_softcap)
        return loss_sum, n_correct

    def _to_device(self, idx, targets):
        """Check a batch on the host; returns it on the device."""
        self.check_tokens(idx)
        self.check_tokens(targets, "targets", allow_ignore=True)
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {targets.shape} differs from idx shape {idx.shape}")
        self.positions()  # made once here, not by racing threads
        return to_device(idx, self.xp), to_device(targets, self.xp)

    def _sums(self, results):
        """The workers' (loss sum, number correct) added up, as two 0-d arrays of the model's array
        module on either device: on the GPU they stay there (reading one waits for the GPU)."""
        loss_sum, n_correct = sum(r[0] for r in results), sum(r[1] for r in results)
        return self.xp.asarray(loss_sum), self.xp.asarray(n_correct)

    def zero_grad(self):
        """Set every gradient to 0, before the forward_backward calls of a step."""
        self.shards.zero_grad()

    def forward_backward(self, idx, targets, n_targets, dropout=None):
        """The gradients of the batch's summed loss / n_targets, added into self.grads; returns the
        batch's (loss sum, number of correct predictions) over its counted targets (see _sums).

        n_targets: the counted targets (loss.count_targets) of the whole batch the step averages over;
        this batch may be a part of it (one micro-batch of --grad_accum, one MPI rank's rows). The
        gradients add up (zero_grad clears them), so the parts' calls give the whole batch's.
        dropout: a dropout.DropoutKey naming the step and the global row of idx[0], to train with
        config.dropout (each worker offsets it by its first row); None: no dropout.
        """
        if self.grads is None:
            raise ValueError("this model was made with for_training=False: it has no gradients")
        idx, targets = self._to_device(idx, targets)
        return self._sums(self.shards.run(
            lambda i, t, g, ws, row: self._loss_and_backward(i, t, n_targets, g, ws,
                                                             None if dropout is None else dropout.offset(row)),
            idx, targets))

    def evaluate(self, idx, targets):
        """No gradients: (loss sum, number of correct predictions) over the counted targets (see _sums)."""
        idx, targets = self._to_device(idx, targets)
        return self._sums(self.shards.run(lambda i, t, g, ws, row: self._loss(i, t, ws), idx, targets,
                                          backward=False))
