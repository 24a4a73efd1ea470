"""[math] GPT-2's Transformer block: layer norm, causal self-attention, feed-forward, residuals; and the
attention core both blocks use (the causal softmax, the key/value cache, the optional QK-norm).

Shapes: B batch, T sequence length (of the queries), S length of the keys (T, or more with a
key/value cache), C model width, H heads, hs = C // H head size, F feed-forward width (d_ff).

Each layer is a pair of plain functions side by side: `*_forward(...) -> out, cache` and
`*_backward(dout, cache, grads) -> dx`. Backward *adds* into the gradient arrays it is given
(zeroed once per step by the caller), so a weight used twice collects both contributions.
Parameter layouts follow GPT-2: a linear layer is `x @ weight + bias`, weight (in, out).

The same functions run on NumPy and CuPy arrays (`xp = get_array_module(x)`, device.py). The
CPU's speedups (einsum row sums, cache-sized blocks, products written into strided views: device.py's
array kit) give way on the whole-array path (the GPU's) to plain whole-array operations.

Dropout, in training only, as GPT-2 has it: on the attention weights after the softmax, and on
each branch's output before its residual add. Its masks are drawn and applied by dropout.py and
given to the block as a BlockMasks; the caches keep them for backward. Without masks nothing is
dropped.

The block's pair `block_forward(x, p, cfg, ...)` / `block_backward(dout, cache, p, g)` and the final
norm's pair have the signatures every block shares (language_model.BLOCKS picks one row).
"""
import math
from typing import NamedTuple

import numpy as np

from config import LN_EPS
from device import (block_rows, blocks, column_sum, get_array_module, matmul_into, matmul_rows, row_dot_mean,
                    row_mean, row_sum, whole_arrays)
from dropout import NO_DROPOUT, BlockMasks, DropoutMask, dropout_backward, dropout_forward, residual_add_inplace
from loss import SHIFT_FREE

GELU_K = math.sqrt(2.0 / math.pi)  # GELU's tanh approximation, as in GPT-2

# ----------------------------------------------------------------------------- layer norm

class LayerNormCache(NamedTuple):
    xhat: np.ndarray  # (..., C) the normalised input, (x - mean) * rstd
    w: np.ndarray  # (C,) gain
    rstd: np.ndarray  # (..., 1) = 1 / sqrt(var + eps)



def layernorm_forward(x, w, b):
    """(..., C) -> (..., C): each row to zero mean and unit variance, then scaled and shifted."""
    xhat = x - row_mean(x)
    rstd = 1.0 / get_array_module(x).sqrt(row_dot_mean(xhat, xhat) + LN_EPS)
    xhat *= rstd
    out = xhat * w
    out += b
    return out, LayerNormCache(xhat, w, rstd)


def layernorm_backward(dout, cache, dw, db):
    """Forward was out = xhat * w + b, xhat = (x - mean) * rstd. Returns dx."""
    xhat, w, rstd = cache
    C = dout.shape[-1]
    dw += column_sum(dout.reshape(-1, C), xhat.reshape(-1, C))  # summed over all rows
    db += column_sum(dout.reshape(-1, C))
    dxhat = dout * w
    # xhat depends on x directly and through mean and rstd; together:
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    c = row_dot_mean(dxhat, xhat)
    dxhat -= row_mean(dxhat)
    dxhat -= xhat * c
    dxhat *= rstd
    return dxhat


# ----------------------------------------------------------------------------- attention

class KVCache:
    """Keys and values of the positions seen so far, per layer, for incremental decoding.

    k[i], v[i]: (B, H, T_max, hs) preallocated; positions [0, length) are filled.
    The model advances `length` once all layers have seen the new positions.
    """

    def __init__(self, n_layers, B, H, T_max, hs, dtype, xp=np):
        self.k = [xp.zeros((B, H, T_max, hs), dtype) for _ in range(n_layers)]  # xp: numpy, or cupy on the GPU
        self.v = [xp.zeros((B, H, T_max, hs), dtype) for _ in range(n_layers)]
        self.length = 0
        self.max_length = T_max


class AttentionCache(NamedTuple):
    x: np.ndarray  # (B, T, C) input
    q: np.ndarray  # (B, H, T, hs) the queries (with QK-norm normalised) already divided by sqrt(hs)
    k: np.ndarray  # (B, H, S, hs) (with QK-norm normalised)
    v: np.ndarray  # (B, H, S, hs)
    att: np.ndarray  # (B, H, T, S) softmax probabilities
    y: np.ndarray  # (B, T, C) heads re-assembled, input of the output projection
    att_mask: DropoutMask | None  # (B, H, T, S) dropout on att, None: none
    qk_rstd: np.ndarray | None  # (B, T, 2, H, 1) QK-norm's 1 / rms of each q and k head, None: no QK-norm


_masks = {}


def causal_mask(T, S, dtype, xp=np):
    """(T, S) additive mask: -inf where query t (the last T of S positions) would see a later key, else 0."""
    key = (T, S, np.dtype(dtype).str, xp)  # the module itself: numpy or cupy (or a test's stand-in)
    if key not in _masks:
        _masks[key] = xp.triu(xp.full((T, S), -np.inf, dtype), k=S - T + 1)
    return _masks[key]


def _shift_free(att):
    """Whether the masked scores (..., T, S) need no shift before exp (see causal_softmax_inplace)."""
    T, S = att.shape[-2:]
    own = np.diagonal(att, offset=S - T, axis1=-2, axis2=-1)  # (..., T) a view: each query's own key
    return own.min() >= SHIFT_FREE[0] and att.max() <= SHIFT_FREE[1]


def causal_softmax_inplace(att):
    """Scores (..., T, S) -> attention weights, in place: softmax over the keys of each query,
    the causal mask applied (query t, the last T of S positions, sees keys up to its own).

    Softmax usually subtracts each row's max first so that exp cannot overflow; here that max,
    a reduction over short rows, would be the costliest pass. Every row's max is at least the
    score of the query's own key (never masked) and at most the largest score of all, so when
    those lie in SHIFT_FREE exp can neither overflow nor underflow a whole row, and the shift
    is skipped (loss.py explains the bounds). Otherwise the rows are shifted as usual. On the
    whole-array path they always are: there the test would be a wait for the GPU.
    """
    xp = get_array_module(att)
    T, S = att.shape[-2:]
    att += causal_mask(T, S, att.dtype, xp)  # -inf where a query would see a later key
    if whole_arrays(att) or not _shift_free(att):
        att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att *= 1.0 / row_sum(att)


def softmax_backward_inplace(da, a):
    """da (upstream gradient of a = softmax(pre)) becomes dpre = a * (da - sum(a * da)), in place."""
    da -= row_sum(da, a)
    da *= a


# The attention weights of a causal (T, T) pass are zero right of the diagonal: query t reads keys up to t.
# On the CPU the products that make or read them therefore go by blocks of CAUSAL_BLOCK queries, each with
# only the keys up to its last query (or, for the keys' gradients, each block of keys with only the queries
# from its first one on): 3/8 of the attention core's arithmetic left out at T = 256, a quarter at 128.
# Measured with scripts/compare_trees.py (2026-12-05): a step 1.8% faster at T = 256 (Medium), 3.7% at 512,
# the same at 128. Each function computes what the plain product it falls back to would, leaving out only
# zeros (with OpenBLAS the very same sums, bit for bit); it falls back where blocks do not apply: on the
# whole-array path, with a key/value cache (more keys than queries), with grouped heads (G*T rows), or
# under two blocks.
CAUSAL_BLOCK = 64  # queries per block: at 32, OpenBLAS changes kernels and the sums their order


def causal_blocks(T, S, out):
    """The blocks [(start, end)] of the T queries (or keys) of a causal (T, S) product written into `out`, or
    None: make it whole."""
    if T != S or T < 2 * CAUSAL_BLOCK or whole_arrays(out):
        return None
    return [(i, min(i + CAUSAL_BLOCK, T)) for i in range(0, T, CAUSAL_BLOCK)]


def causal_scores_into(a, b, out, fill):
    """out (..., T, T) = a (..., T, n) @ b (..., n, T) where only the causal entries are wanted (key <= query):
    the entries after each block's last query are set to `fill` instead (-inf for the scores, which the mask
    would make -inf; 0 for the weights' gradient, which the softmax's backward would multiply by 0)."""
    query_blocks = causal_blocks(a.shape[-2], b.shape[-1], out)
    if query_blocks is None:
        return matmul_into(a, b, out)
    for start, end in query_blocks:
        np.matmul(a[..., start:end, :], b[..., :end], out=out[..., start:end, :end])
        out[..., start:end, end:] = fill


def causal_weights_matmul_into(w, b, out):
    """out (..., T, n) = w (..., T, T) @ b (..., T, n) for causal weights w (zero after each query's own key):
    each block of queries reads only the keys up to its last."""
    query_blocks = causal_blocks(w.shape[-2], w.shape[-1], out)
    if query_blocks is None:
        return matmul_into(w, b, out)
    for start, end in query_blocks:
        np.matmul(w[..., start:end, :end], b[..., :end, :], out=out[..., start:end, :])


def causal_weights_t_matmul_into(w, b, out):
    """out (..., T, n) = w.T (..., T, T) @ b (..., T, n) for causal weights w: each block of keys is read only by
    the queries from its first one on."""
    key_blocks = causal_blocks(w.shape[-2], w.shape[-1], out)
    if key_blocks is None:
        return matmul_into(w.swapaxes(-1, -2), b, out)
    for start, end in key_blocks:
        np.matmul(w[..., start:, start:end].swapaxes(-1, -2), b[..., start:, :], out=out[..., start:end, :])


def qk_rms_norm_inplace(x, eps):
    """QK-norm (as in OLMo 2, nanochat, modded-nanogpt): x (..., hs), the query and key heads (a view into
    qkv), each head's vector divided by its root mean square, in place, with no gain: an RMSNorm over the
    head dimension. The scores q . k then stay within hs in size however large the weights grow.
    Returns rstd (..., 1) = 1 / sqrt(mean(x^2) + eps), which backward needs."""
    rstd = 1.0 / get_array_module(x).sqrt(row_dot_mean(x, x) + eps)  # (..., 1)
    x *= rstd
    return rstd


def qk_rms_norm_backward_inplace(dx, xhat, rstd):
    """Forward was xhat = x * rstd, rstd = (mean(x^2) + eps)^(-1/2), each head's vector on its own. dx, the
    gradient of xhat (a view into dqkv), becomes the gradient of x, in place:
    dx = rstd * (dxhat - xhat * mean(dxhat * xhat))   (RMSNorm's, llama.rmsnorm_backward, without the gain)."""
    dx -= xhat * row_dot_mean(dx, xhat)
    dx *= rstd


def attention_forward(x, w_attn, b_attn, w_proj, b_proj, n_heads, kv=None, layer=0, att_mask=None, qk_norm=False,
                      eps=LN_EPS):
    """Multi-head causal self-attention, (B, T, C) -> (B, T, C).

    With `kv` (a KVCache), x holds the positions after the kv.length cached ones: their keys
    and values are written into the cache and the queries attend to all cached positions.
    With `att_mask` (a DropoutMask (B, H, T, S), training only) the attention weights are dropped
    out before they weigh the values. With `qk_norm` each head's query and key are first divided by
    their root mean square (qk_rms_norm_inplace, with `eps`): the key/value cache keeps normalised keys.
    """
    B, T, C = x.shape
    H = n_heads
    hs = C // H
    qkv = matmul_rows(x, w_attn)  # (B, T, C) -> (B, T, 3C)
    qkv += b_attn
    qk_rstd = None
    if qk_norm:
        qk_heads = qkv.reshape(B, T, 3, H, hs)[:, :, :2]  # (B, T, 2, H, hs): the q and k heads, a view
        qk_rstd = qk_rms_norm_inplace(qk_heads, eps)  # (B, T, 2, H, 1)
    qkv[..., :C] *= 1.0 / math.sqrt(hs)  # the scores' scale, applied to q: (B, T, C), not (B, H, T, S)
    qkv = qkv.reshape(B, T, 3, H, hs).transpose(2, 0, 3, 1, 4)  # -> (3, B, H, T, hs), a view
    q, k, v = qkv[0], qkv[1], qkv[2]
    if kv is not None:
        start = kv.length
        kv.k[layer][:, :, start : start + T] = k
        kv.v[layer][:, :, start : start + T] = v
        k = kv.k[layer][:, :, : start + T]  # (B, H, S, hs)
        v = kv.v[layer][:, :, : start + T]
    xp = get_array_module(x)
    att = xp.empty((B, H, T, k.shape[2]), x.dtype)
    causal_scores_into(q, k.transpose(0, 1, 3, 2), att, -np.inf)  # (B, H, T, hs) @ (B, H, hs, S) -> (B, H, T, S)
    causal_softmax_inplace(att)
    weights = att if att_mask is None else dropout_forward(att, att_mask)  # dropout(att), a new array
    y = xp.empty((B, T, H, hs), x.dtype)
    # (B, H, T, S) @ (B, H, S, hs) -> (B, H, T, hs), written as the heads side by side
    causal_weights_matmul_into(weights, v, y.transpose(0, 2, 1, 3))
    y = y.reshape(B, T, C)
    out = matmul_rows(y, w_proj)  # (B, T, C)
    out += b_proj
    return out, AttentionCache(x, q, k, v, att, y, att_mask, qk_rstd)


def attention_backward(dout, cache, w_attn, w_proj, dw_attn, db_attn, dw_proj, db_proj):
    """Reverse of attention_forward (training only, no key/value cache). Returns dx."""
    x, q, k, v, att, y, att_mask, qk_rstd = cache
    B, T, C = x.shape
    H, hs = q.shape[1], q.shape[3]
    # forward was: out = y @ w_proj + b_proj
    dw_proj += y.reshape(-1, C).T @ dout.reshape(-1, C)  # (C, B*T) @ (B*T, C) -> (C, C)
    db_proj += dout.sum(axis=(0, 1))
    dy = matmul_rows(dout, w_proj.T).reshape(B, T, H, hs).transpose(0, 2, 1, 3)  # -> (B, H, T, hs), a view
    dqkv = get_array_module(x).empty((B, T, 3, H, hs), x.dtype)  # written through its (3, B, H, T, hs) view below
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)
    # forward was: y = weights @ v, weights = dropout(att) (recomputed: cheaper than keeping it) or att
    weights = att if att_mask is None else dropout_forward(att, att_mask)
    datt = get_array_module(x).empty_like(att)
    causal_scores_into(dy, v.transpose(0, 1, 3, 2), datt, 0.0)  # (B, H, T, S) dweights
    causal_weights_t_matmul_into(weights, dy, dv)  # (B, H, S, hs)
    if att_mask is not None:
        dropout_backward(datt, att_mask, out=datt)  # dweights -> datt
    # forward was: att = softmax(pre); masked entries have att = 0, so they get no gradient
    softmax_backward_inplace(datt, att)
    # forward was: pre = qs @ k.T with qs = q / sqrt(hs), the q that the cache holds
    causal_weights_matmul_into(datt, k, dq)  # (B, H, T, hs) dqs
    causal_weights_t_matmul_into(datt, q, dk)  # (B, H, S, hs)
    dqkv = dqkv.reshape(B, T, 3 * C)
    dqkv[..., :C] *= 1.0 / math.sqrt(hs)  # dqs -> dq
    if qk_rstd is not None:  # forward was: each head's q and k divided by its rms, before q's scale
        rstd = qk_rstd.transpose(2, 0, 3, 1, 4)  # (B, T, 2, H, 1) -> (2, B, H, T, 1), laid out as dq and dk
        qk_rms_norm_backward_inplace(dq, q * math.sqrt(hs), rstd[0])  # into dqkv through the view
        qk_rms_norm_backward_inplace(dk, k, rstd[1])
    # forward was: qkv = x @ w_attn + b_attn
    dw_attn += x.reshape(-1, C).T @ dqkv.reshape(-1, 3 * C)  # (C, 3C)
    db_attn += dqkv.sum(axis=(0, 1))
    return matmul_rows(dqkv, w_attn.T)  # (B, T, 3C) -> (B, T, C)


# ----------------------------------------------------------------------------- feed-forward

def gelu_forward(x, bias=None):
    """GELU, GPT-2's tanh form: out = 0.5 x (1 + tanh(u)), u = k (x + 0.044715 x^3).

    Computed as x * sigmoid(2u), the same function (0.5 (1 + tanh(u)) = sigmoid(2u)) with
    one exp instead of a tanh, which NumPy evaluates several times slower. Returns out and
    s = sigmoid(2u), which backward needs. With `bias` (F,), x (..., F) first becomes x + bias,
    in place, block by block while the block is in cache.
    """
    xp = get_array_module(x)
    out, s = xp.empty_like(x), xp.empty_like(x)
    for xb, sb, ob in blocks(x, s, out):
        if bias is not None:
            xb += bias
        xp.multiply(xb, xb, out=sb)
        sb *= -2 * GELU_K * 0.044715
        sb -= 2 * GELU_K
        sb *= xb  # -2u
        with np.errstate(over="ignore"):  # exp(-2u) = inf for very negative x gives s = 0, the right limit
            xp.exp(sb, out=sb)
        sb += 1.0
        xp.reciprocal(sb, out=sb)  # sigmoid(2u)
        xp.multiply(xb, sb, out=ob)
    return out, s


def gelu_backward_inplace(dout, x, s):
    """dout becomes dout * d/dx (x s), s = sigmoid(2u):
    d/dx (x s) = s + x * 2 s (1 - s) du/dx = s (1 + x 2du/dx (1 - s)), du/dx = k (1 + 3 * 0.044715 x^2)."""
    xp = get_array_module(x)
    scratch = xp.empty((2, block_rows(x), x.shape[-1]), x.dtype)  # two blocks' worth
    for gb, xb, sb in blocks(dout, x, s):
        d, t = scratch[:, : len(xb)]
        xp.multiply(xb, xb, out=d)
        d *= 3 * 0.044715 * 2 * GELU_K
        d += 2 * GELU_K  # 2 du/dx
        d *= xb
        xp.subtract(1.0, sb, out=t)
        d *= t
        d += 1.0
        d *= sb  # d/dx (x s)
        gb *= d


def relu2_forward(h):
    """relu(h)^2, modded-nanogpt's feed-forward activation, a new array (..., F). Both blocks' MLPs use it."""
    a = get_array_module(h).maximum(h, 0)
    a *= a
    return a


def relu2_backward_inplace(da, h):
    """da (..., F), the gradient of a = relu(h)^2, becomes dh = da * 2 relu(h), in place."""
    da *= 2 * get_array_module(h).maximum(h, 0)


class MLPCache(NamedTuple):
    x: np.ndarray  # (B, T, C) input
    h: np.ndarray  # (B, T, F) pre-activation
    a: np.ndarray  # (B, T, F) activation
    s: np.ndarray | None  # (B, T, F) GELU's sigmoid(2u), None for ReLU and ReLU^2
    activation: str


def mlp_forward(x, w_fc, b_fc, w_proj, b_proj, activation="gelu"):
    """Position-wise feed-forward, (B, T, C) -> (B, T, F) -> (B, T, C). activation: "gelu", "relu",
    or "relu2", relu(h)^2 (modded-nanogpt's)."""
    h = matmul_rows(x, w_fc)  # (B, T, C) -> (B, T, F)
    if activation == "gelu":
        a, s = gelu_forward(h, bias=b_fc)  # adds the bias to h in the same pass
    else:
        h += b_fc
        a = relu2_forward(h) if activation == "relu2" else get_array_module(h).maximum(h, 0)
        s = None
    out = matmul_rows(a, w_proj)  # (B, T, F) -> (B, T, C)
    out += b_proj
    return out, MLPCache(x, h, a, s, activation)


def mlp_backward(dout, cache, w_fc, w_proj, dw_fc, db_fc, dw_proj, db_proj):
    """Reverse of mlp_forward. Returns dx."""
    x, h, a, s, activation = cache
    C, F = w_fc.shape
    dw_proj += a.reshape(-1, F).T @ dout.reshape(-1, C)  # (F, C)
    db_proj += dout.sum(axis=(0, 1))
    da = matmul_rows(dout, w_proj.T)  # (B, T, C) -> (B, T, F)
    if activation == "gelu":
        gelu_backward_inplace(da, h, s)
    elif activation == "relu2":
        relu2_backward_inplace(da, h)
    else:
        da *= h > 0
    dh = da
    dw_fc += x.reshape(-1, C).T @ dh.reshape(-1, F)  # (C, F)
    db_fc += dh.sum(axis=(0, 1))
    return matmul_rows(dh, w_fc.T)  # (B, T, F) -> (B, T, C)


# ----------------------------------------------------------------------------- block

class BlockCache(NamedTuple):
    ln_1: LayerNormCache
    attn: AttentionCache
    ln_2: LayerNormCache
    mlp: MLPCache
    dropout: BlockMasks  # NO_DROPOUT: none


def block_forward(x, p, cfg, kv=None, layer=0, dropout=None):
    """Pre-norm block: x + dropout(attn(ln_1(x))), then + dropout(mlp(ln_2(.))). `p` maps 'ln_1.weight'...
    to arrays; cfg: the ModelConfig (n_heads, activation, qk_norm, norm_eps); `dropout`: the block's BlockMasks
    when training with dropout, None: no dropout."""
    dropout = dropout or NO_DROPOUT
    h, c_ln1 = layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"])
    a, c_attn = attention_forward(h, p["attn.c_attn.weight"], p["attn.c_attn.bias"],
                                  p["attn.c_proj.weight"], p["attn.c_proj.bias"], cfg.n_heads, kv, layer,
                                  dropout.att, cfg.qk_norm, cfg.norm_eps)
    residual_add_inplace(a, x, dropout.attn_out)  # x + dropout(attn(ln_1(x))), over attn's output (a fresh array)
    x = a
    h, c_ln2 = layernorm_forward(x, p["ln_2.weight"], p["ln_2.bias"])
    m, c_mlp = mlp_forward(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"],
                           p["mlp.c_proj.weight"], p["mlp.c_proj.bias"], cfg.activation)
    residual_add_inplace(m, x, dropout.mlp_out)  # the residual, over the MLP's output
    return m, BlockCache(c_ln1, c_attn, c_ln2, c_mlp, dropout)


def block_backward(dout, cache, p, g):
    """Reverse of block_forward; `g` holds the gradient arrays under the same names as `p`."""
    attn_mask, mlp_mask = cache.dropout.attn_out, cache.dropout.mlp_out
    # forward was: out = x1 + dropout(mlp(ln_2(x1))), so dx1 = dout + the path through the MLP
    dm = dout if mlp_mask is None else dropout_backward(dout, mlp_mask)  # (B, T, C) a new array: dout is needed below
    dh = mlp_backward(dm, cache.mlp, p["mlp.c_fc.weight"], p["mlp.c_proj.weight"],
                      g["mlp.c_fc.weight"], g["mlp.c_fc.bias"], g["mlp.c_proj.weight"], g["mlp.c_proj.bias"])
    dx1 = layernorm_backward(dh, cache.ln_2, g["ln_2.weight"], g["ln_2.bias"])
    dx1 += dout
    # forward was: x1 = x + dropout(attn(ln_1(x)))
    da = dx1 if attn_mask is None else dropout_backward(dx1, attn_mask)
    dh = attention_backward(da, cache.attn, p["attn.c_attn.weight"], p["attn.c_proj.weight"],
                            g["attn.c_attn.weight"], g["attn.c_attn.bias"],
                            g["attn.c_proj.weight"], g["attn.c_proj.bias"])
    dx = layernorm_backward(dh, cache.ln_1, g["ln_1.weight"], g["ln_1.bias"])
    dx += dx1
    return dx


def final_norm_forward(x, p, cfg):
    """The model's last layer norm, ln_f, before the output layer; p: the model's parameters."""
    return layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])


def final_norm_backward(dh, cache, g):
    """Reverse of final_norm_forward; g: the model's gradients. Returns dx."""
    return layernorm_backward(dh, cache, g["ln_f.weight"], g["ln_f.bias"])
