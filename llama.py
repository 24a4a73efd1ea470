"""[math] The Llama block: RMSNorm, rotary positions, SwiGLU (or a ReLU^2 MLP), and the block built from them.

Shapes: B batch, T sequence length (of the queries), S length of the keys (T, or more with a
key/value cache), C model width, H query heads, Hkv key/value heads (H for plain multi-head
attention; fewer, dividing H, for grouped-query attention), G = H // Hkv query heads per
key/value head, hs = C // H head size, F feed-forward width (d_ff), N = B*T rows.

What differs from GPT-2's block (transformer.py), as in Llama, llama2.c and CS336:
- RMSNorm instead of layer norm: x / rms(x) * w, no mean subtracted, no bias;
- no position table: rotary position embedding (RoPE) turns each head's q and k by angles
  proportional to their absolute positions, so the scores depend on relative positions only;
- SwiGLU feed-forward with three matrices, silu(x @ w_gate) * (x @ w_up) @ w_down, whose F of
  about 8C/3 (swiglu_hidden) keeps the parameters of GPT-2's 4C-wide two-matrix MLP; or, with
  activation "relu2", that two-matrix MLP without biases, relu(x @ w_fc)^2 @ w_proj, F = 4C
  (modded-nanogpt's; transformers' Llama cannot express it, so it is not exported);
- no biases anywhere; optionally fewer key/value heads than query heads (grouped-query).
The residual stream, pre-norm order, causal softmax, KV cache and parameter names are GPT-2's.

Conventions, fixed here so that the export to Hugging Face's LlamaForCausalLM needs no
permutation: RoPE pairs dimension i of each head with dimension i + hs/2 (HF's rotate_half,
not the interleaved pairs of Meta's original code), frequencies theta^(-2i/hs); attn.c_attn's
columns are [q heads | k heads | v heads], head-major as HF's q_proj/k_proj/v_proj rows, and
mlp.c_fc's are [gate | up]. Weights are (in, out), x @ w, as everywhere in this repository.
Inside a pass (not in the weights) each q and k head's dimensions are laid out pair by pair, i next to
i + hs/2 (pair_order): a pair is then one complex number, and its rotation one complex product.
Each layer is a forward/backward pair as in transformer.py: backward adds into the gradient
arrays it is given. Dropout, in training only, goes where GPT-2's block has it: on the attention
weights after the softmax and on each branch's output before its residual add (dropout.py's
DropoutMask and BlockMasks; the attention weights' mask is (B, H, T, S), query head j = kv head
j // G, group member j % G, as the weights themselves are laid out). From GPT-2's block this
takes only the attention core (the causal softmax, optional QK-norm); the shapes of the parameters and the
defaults (RMS_EPS, ROPE_THETA, swiglu_hidden) are the model's record, config.py's.
"""
import math
from typing import Callable, NamedTuple

import numpy as np

from config import RMS_EPS, ROPE_THETA, llama_block_shapes
from device import (blocks, column_sum, get_array_module, matmul_rows, row_dot_mean, to_device,
                    whole_arrays)
from dropout import NO_DROPOUT, BlockMasks, DropoutMask, dropout_backward, dropout_forward, residual_add_inplace
from transformer import (causal_scores_into, causal_softmax_inplace, causal_weights_matmul_into,
                         causal_weights_t_matmul_into, qk_rms_norm_backward_inplace, qk_rms_norm_inplace,
                         relu2_backward_inplace, relu2_forward, softmax_backward_inplace)

# ----------------------------------------------------------------------------- RMSNorm

class RMSNormCache(NamedTuple):
    xhat: np.ndarray  # (..., C) the normalised input, x * rstd
    w: np.ndarray  # (C,) gain
    rstd: np.ndarray  # (..., 1) = 1 / sqrt(mean(x^2) + eps)


def rmsnorm_forward(x, w, eps=RMS_EPS):
    """(..., C) -> (..., C): each row divided by its root mean square, then scaled by the gain."""
    rstd = 1.0 / get_array_module(x).sqrt(row_dot_mean(x, x) + eps)  # (..., 1)
    xhat = x * rstd
    return xhat * w, RMSNormCache(xhat, w, rstd)


def rmsnorm_backward(dout, cache, dw):
    """Forward was out = xhat * w, xhat = x * rstd. Returns dx."""
    xhat, w, rstd = cache
    C = dout.shape[-1]
    dw += column_sum(dout.reshape(-1, C), xhat.reshape(-1, C))  # summed over all rows
    dxhat = dout * w
    # xhat depends on x directly and through rstd = (mean(x^2) + eps)^(-1/2); together:
    # dx = rstd * (dxhat - xhat * mean(dxhat * xhat))   (layer norm's, less the mean terms)
    dxhat -= xhat * row_dot_mean(dxhat, xhat)
    dxhat *= rstd
    return dxhat


# ----------------------------------------------------------------------------- rotary positions

_rope_tables = {}


def rope_angles(start, T, hs, theta=ROPE_THETA, dtype=np.float32, xp=np):
    """cos, sin (T, hs/2) of the angles (start + t) * theta^(-2i/hs) of positions start .. start+T-1,
    pair i < hs/2. As the causal mask is, the table is made once (on the host in float64, then cast
    and copied) per head size, theta, dtype and array module, for all positions asked for so far, and
    sliced: a cached decoding step reads the very numbers of the full pass."""
    if hs % 2:
        raise ValueError(f"rotary positions need an even head size, got {hs}")
    key = (hs, float(theta), np.dtype(dtype).str, xp)
    table = _rope_tables.get(key)
    if table is None or len(table[0]) < start + T:
        n = max(start + T, 2 * len(table[0]) if table else 0)  # grown by doubling while decoding
        angle = np.arange(n, dtype=np.float64)[:, None] * theta ** (-np.arange(0, hs, 2) / hs)  # (n, hs/2)
        table = _rope_tables[key] = (to_device(np.cos(angle).astype(dtype), xp),
                                     to_device(np.sin(angle).astype(dtype), xp))
    cos, sin = table
    return cos[start : start + T], sin[start : start + T]


def pair_order(hs):
    """The order in which attention lays out each q and k head's hs dimensions during a pass: each rotary pair
    (i, i + hs/2) side by side, 0, hs/2, 1, hs/2 + 1, ..., so that a pair is one complex number x1 + i x2 and
    its rotation one complex product. The weights keep HF's order (attention multiplies x by w_attn's columns
    in this order, and adds the gradients back in it); the scores q . k do not depend on it."""
    half = hs // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)


_qk_pair_columns = {}


def qk_pair_columns(H, Hkv, hs, xp=np):
    """The columns of w_attn (C, (H + 2Hkv) hs) with each q and k head's in pair_order and the v heads' as
    they are (made once per shape and array module)."""
    key = (H, Hkv, hs, xp)
    if key not in _qk_pair_columns:
        heads = [j * hs + pair_order(hs) for j in range(H + Hkv)]
        columns = np.concatenate(heads + [np.arange((H + Hkv) * hs, (H + 2 * Hkv) * hs)])
        _qk_pair_columns[key] = to_device(columns, xp)
    return _qk_pair_columns[key]


def rope_rotate_pairs_inplace(x, cos, sin):
    """x (B, T, n, hs), n heads of q or k in pair_order (a view into qkv), rotated in place: the pair i of
    each head at position t, the complex number x1 + i x2, times e^(i angle) = cos[t, i] + i sin[t, i]:

        x1' = x1 cos - x2 sin,   x2' = x2 cos + x1 sin

    One pass of complex products over a complex view of x (hs/2 numbers a head). On the CPU a sequence at a
    time, against the angles tiled over the heads, so that NumPy runs it along whole rows of heads."""
    xp = get_array_module(x)
    B, T, n, hs = x.shape
    pairs = x.view(np.result_type(x.dtype, np.complex64))  # (B, T, n, hs/2): the last axis is contiguous
    turn = (cos + 1j * sin).astype(pairs.dtype)[:, None]  # (T, 1, hs/2)
    if whole_arrays(x):
        pairs *= turn  # broadcast over batch and heads
        return
    turn = xp.tile(turn, (1, n, 1))  # (T, n, hs/2), each head's row side by side
    for b in range(B):
        pairs[b] *= turn


class RopeCache(NamedTuple):
    cos: np.ndarray  # (T, hs/2)
    sin: np.ndarray  # (T, hs/2)


def rope_forward(x, start=0, theta=ROPE_THETA):
    """(B, T, n, hs) -> (B, T, n, hs): x rotated at positions start .. start+T-1, into a new array, the
    dimensions in HF's order (attention rotates its q and k in place instead, in pair order)."""
    xp = get_array_module(x)
    cos, sin = rope_angles(start, x.shape[1], x.shape[-1], theta, x.dtype, xp)
    return _rotate_in_pair_order(x, cos, sin), RopeCache(cos, sin)


def _rotate_in_pair_order(x, cos, sin):
    """x (B, T, n, hs) in HF's order rotated into a new array: put in pair order, turned, put back."""
    xp = get_array_module(x)
    order = to_device(pair_order(x.shape[-1]), xp)
    pairs = xp.take(x, order, axis=-1)  # a C-contiguous copy
    rope_rotate_pairs_inplace(pairs, cos, sin)
    out = xp.empty_like(x)
    out[..., order] = pairs
    return out


def rope_backward(dout, cache):
    """Forward was out = R(angle) x, a rotation: R is orthogonal, so dx = R^T dout = R(-angle) dout,
    the inverse rotation (cos(-a) = cos a, sin(-a) = -sin a). Returns dx."""
    return _rotate_in_pair_order(dout, cache.cos, -cache.sin)


def rotate_half(x):
    """HF Llama's (..., hs) -> (-x2, x1), with x1, x2 the two halves of the last axis."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_reference(x, start=0, theta=ROPE_THETA):
    """The plain version, for tests, written as HF's apply_rotary_pos_emb: x (B, T, n, hs) ->
    x * cos + rotate_half(x) * sin, with cos, sin (T, hs) the half-width angles repeated twice."""
    T, hs = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, hs, 2) / hs)
    angle = np.arange(start, start + T)[:, None] * inv_freq  # (T, hs/2)
    emb = np.concatenate([angle, angle], axis=-1)[:, None]  # (T, 1, hs)
    return x * np.cos(emb) + rotate_half(x) * np.sin(emb)


# ----------------------------------------------------------------------------- attention

class LlamaAttentionCache(NamedTuple):
    x: np.ndarray  # (B, T, C) input
    q: np.ndarray  # (B, Hkv, G*T, hs) queries rotated (QK-norm: normalised), / sqrt(hs), in pair_order (stack_groups)
    k: np.ndarray  # (B, Hkv, S, hs) rotated, QK-norm: normalised too; in pair_order, as the key/value cache keeps them
    v: np.ndarray  # (B, Hkv, S, hs)
    att: np.ndarray  # (B, Hkv, G*T, S) softmax probabilities
    y: np.ndarray  # (B, T, C) heads re-assembled, input of the output projection
    cos: np.ndarray  # (T, hs/2) the rotation's angles, for the inverse in backward
    sin: np.ndarray  # (T, hs/2)
    att_mask: DropoutMask | None  # (B, Hkv, G*T, S) dropout on att, None: none
    qk_rstd: np.ndarray | None  # (B, T, H + Hkv, 1) QK-norm's 1 / rms of each q and k head, None: no QK-norm


def stack_groups(a):
    """(B, Hkv, G, T, n) -> (B, Hkv, G*T, n): the rows of the G query heads that share a key/value
    head one after the other, so that each product with that head's keys or values is one matrix
    product (a plain batch, where a key/value head broadcast over its G query heads would make CuPy
    run a batch of pointers). A view when G = 1; with grouped-query attention a copy."""
    B, Hkv, G, T, n = a.shape
    return a.reshape(B, Hkv, G * T, n)


def unstack_groups(a, T):
    """The reverse of stack_groups and of the transpose before it: (B, Hkv, G*T, n) -> (B, T, H, n), query
    head j = G * (j // G) + j % G, as the heads lie side by side in qkv. A copy."""
    B, Hkv, GT, n = a.shape
    G = GT // T
    return a.reshape(B, Hkv, G, T, n).transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * G, n)


def matmul_groups_into(a, b, out):
    """out (B, Hkv, G, T, n), a strided view, = a (B, Hkv, G*T, S) @ b (B, Hkv, S, n), the stacked
    rows put back under their query heads; a: the causal attention weights or their gradient. With one
    query head per key/value head (G = 1) they are each head's plain (T, S) weights, which
    transformer.causal_weights_matmul_into multiplies by blocks of queries."""
    if out.shape[2] == 1:
        causal_weights_matmul_into(a, b, out[:, :, 0])
    elif whole_arrays(out):
        out[...] = (a @ b).reshape(out.shape)
    else:  # NumPy writes straight into the view, b broadcast over the group
        B, Hkv, G, T, n = out.shape
        np.matmul(a.reshape(B, Hkv, G, T, a.shape[-1]), b[:, :, None], out=out)


def llama_attention_forward(x, w_attn, w_proj, n_heads, n_kv_heads=None, rope_theta=ROPE_THETA, kv=None, layer=0,
                            att_mask=None, qk_norm=False, eps=RMS_EPS):
    """Causal self-attention with rotary positions, (B, T, C) -> (B, T, C); no biases.

    With `kv` (transformer.KVCache holding Hkv heads), x holds the positions after the kv.length
    cached ones: they are rotated at those positions, and their keys stored rotated, so a key
    is turned once, at its own position. Query head j uses key/value head j // G (HF's repeat_kv):
    the G query heads of a key/value head are stacked as G*T rows against its S keys. With `att_mask`
    (a DropoutMask (B, H, T, S), training only) the attention weights are dropped out before they
    weigh the values. With `qk_norm` each query and key head, once rotated, is divided by its root
    mean square (transformer.qk_rms_norm_inplace, with `eps`): nanochat's order, rotate then norm.
    A rotation keeps a head's rms, so the other order would give the same numbers up to rounding.
    """
    xp = get_array_module(x)
    B, T, C = x.shape
    H = n_heads
    Hkv = n_kv_heads or H
    hs, G = C // H, H // Hkv
    columns = qk_pair_columns(H, Hkv, hs, xp)  # w_attn's columns with the q and k heads in pair order
    qkv = matmul_rows(x, w_attn[:, columns])  # (B, T, C) -> (B, T, (H + 2Hkv) hs)
    start = kv.length if kv is not None else 0
    cos, sin = rope_angles(start, T, hs, rope_theta, x.dtype, xp)
    heads = qkv.reshape(B, T, H + 2 * Hkv, hs)  # a view
    qk_heads = heads[:, :, : H + Hkv]  # (B, T, H + Hkv, hs) the q and k heads, a view
    qk_rstd = None
    if qk_norm:  # rotated, normalised, then q scaled
        rope_rotate_pairs_inplace(qk_heads, cos, sin)  # at positions start .. start+T-1
        qk_rstd = qk_rms_norm_inplace(qk_heads, eps)  # (B, T, H + Hkv, 1)
        qkv[..., :C] *= 1.0 / math.sqrt(hs)  # the scores' scale, applied to q
    else:  # q scaled, then rotated
        qkv[..., :C] *= 1.0 / math.sqrt(hs)
        rope_rotate_pairs_inplace(qk_heads, cos, sin)
    q = stack_groups(heads[:, :, :H].reshape(B, T, Hkv, G, hs).transpose(0, 2, 3, 1, 4))  # (B, Hkv, G*T, hs)
    k = heads[:, :, H : H + Hkv].transpose(0, 2, 1, 3)  # (B, Hkv, T, hs)
    v = heads[:, :, H + Hkv :].transpose(0, 2, 1, 3)
    if kv is not None:
        kv.k[layer][:, :, start : start + T] = k
        kv.v[layer][:, :, start : start + T] = v
        k = kv.k[layer][:, :, : start + T]  # (B, Hkv, S, hs)
        v = kv.v[layer][:, :, : start + T]
    att = xp.empty((B, Hkv, G * T, k.shape[2]), x.dtype)
    causal_scores_into(q, k.transpose(0, 1, 3, 2), att, -np.inf)  # (B, Hkv, G*T, hs) @ (B, Hkv, hs, S) -> (.., G*T, S)
    causal_softmax_inplace(att.reshape(B, Hkv, G, T, -1))  # each query head's (T, S) scores, a view
    if att_mask is not None:  # (B, H, T, S) -> (B, Hkv, G*T, S), a view: head j = G * (j // G) + j % G
        att_mask = att_mask._replace(keep=att_mask.keep.reshape(att.shape))
    weights = att if att_mask is None else dropout_forward(att, att_mask)  # dropout(att), a new array
    y = xp.empty((B, T, H, hs), x.dtype)
    y_heads = y.reshape(B, T, Hkv, G, hs).transpose(0, 2, 3, 1, 4)  # (B, Hkv, G, T, hs), a view
    matmul_groups_into(weights, v, y_heads)  # (B, Hkv, G*T, S) @ (B, Hkv, S, hs), heads side by side
    y = y.reshape(B, T, C)
    cache = LlamaAttentionCache(x, q, k, v, att, y, cos, sin, att_mask, qk_rstd)
    return matmul_rows(y, w_proj), cache  # (B, T, C)


def llama_attention_backward(dout, cache, w_attn, w_proj, dw_attn, dw_proj):
    """Reverse of llama_attention_forward (training only, no key/value cache). Returns dx."""
    x, q, k, v, att, y, cos, sin, att_mask, qk_rstd = cache
    xp = get_array_module(x)
    B, T, C = x.shape
    Hkv, hs = k.shape[1], k.shape[3]
    G = q.shape[2] // T
    H = Hkv * G
    # forward was: out = y @ w_proj
    dw_proj += y.reshape(-1, C).T @ dout.reshape(-1, C)  # (C, B*T) @ (B*T, C) -> (C, C)
    dy = matmul_rows(dout, w_proj.T).reshape(B, T, Hkv, G, hs).transpose(0, 2, 3, 1, 4)  # -> (B, Hkv, G, T, hs)
    dy = stack_groups(dy)  # (B, Hkv, G*T, hs)
    dheads = xp.empty((B, T, H + 2 * Hkv, hs), x.dtype)  # written through the views below
    dq = dheads[:, :, :H].reshape(B, T, Hkv, G, hs).transpose(0, 2, 3, 1, 4)  # (B, Hkv, G, T, hs)
    dk = dheads[:, :, H : H + Hkv].transpose(0, 2, 1, 3)  # (B, Hkv, S, hs)
    dv = dheads[:, :, H + Hkv :].transpose(0, 2, 1, 3)
    # forward was: y = weights @ v, each key/value head read by the G*T rows of its query heads, whose
    # gradients the product over those rows adds up; weights = dropout(att) (recomputed: cheaper than
    # keeping it) or att
    weights = att if att_mask is None else dropout_forward(att, att_mask)
    datt = xp.empty_like(att)
    causal_scores_into(dy, v.transpose(0, 1, 3, 2), datt, 0.0)  # (B, Hkv, G*T, S) dweights
    causal_weights_t_matmul_into(weights, dy, dv)  # (S, G*T) @ (G*T, hs)
    if att_mask is not None:
        dropout_backward(datt, att_mask, out=datt)  # dweights -> datt
    # forward was: att = softmax(pre); masked entries have att = 0, so they get no gradient
    softmax_backward_inplace(datt, att)
    # forward was: pre = q @ k.T, both rotated, q already divided by sqrt(hs)
    matmul_groups_into(datt, k, dq)  # (B, Hkv, G*T, S) @ (B, Hkv, S, hs)
    causal_weights_t_matmul_into(datt, q, dk)  # (S, G*T) @ (G*T, hs)
    dqk_heads = dheads[:, :, : H + Hkv]  # (B, T, H + Hkv, hs) the q and k heads' gradients, a view
    dqkv = dheads.reshape(B, T, (H + 2 * Hkv) * hs)
    if qk_rstd is None:
        # forward was: q scaled by 1 / sqrt(hs), then q, k = R(angle) q, R(angle) k; the inverse rotation
        # takes their gradients back
        rope_rotate_pairs_inplace(dqk_heads, cos, -sin)
        dqkv[..., :C] *= 1.0 / math.sqrt(hs)
    else:
        # forward was: q, k rotated, each head divided by its rms, then q scaled by 1 / sqrt(hs)
        dqkv[..., :C] *= 1.0 / math.sqrt(hs)
        q_hat = unstack_groups(q, T) * math.sqrt(hs)  # (B, T, H, hs) the normalised queries, as k is
        k_hat = k.transpose(0, 2, 1, 3)  # (B, T, Hkv, hs)
        qk_rms_norm_backward_inplace(dheads[:, :, :H], q_hat, qk_rstd[:, :, :H])
        qk_rms_norm_backward_inplace(dheads[:, :, H : H + Hkv], k_hat, qk_rstd[:, :, H:])
        rope_rotate_pairs_inplace(dqk_heads, cos, -sin)
    # forward was: qkv = x @ w_attn[:, columns], the q and k heads in pair order
    columns = qk_pair_columns(H, Hkv, hs, xp)
    dw_attn[:, columns] += x.reshape(-1, C).T @ dqkv.reshape(B * T, -1)  # (C, (H + 2Hkv) hs), each into its column
    # (columns is a permutation: no column repeats, so the += through the index adds every one)
    return matmul_rows(dqkv, w_attn[:, columns].T)  # (B, T, (H + 2Hkv) hs) -> (B, T, C)


# ----------------------------------------------------------------------------- SwiGLU feed-forward

class SwiGLUCache(NamedTuple):
    x: np.ndarray  # (B, T, C) input
    h: np.ndarray  # (2F, N) [silu(gate); up]: (x @ w_fc).T, the gate's rows turned into silu(gate) in place
    s: np.ndarray  # (F, N) sigmoid(gate)
    a: np.ndarray  # (F, N) silu(gate) * up, (the transpose of) the input of the down projection


def swiglu_forward(x, w_fc, w_proj):
    """(B, T, C) -> (B, T, C): (silu(x @ w_gate) * (x @ w_up)) @ w_down, silu(g) = g sigmoid(g).

    w_fc (C, 2F) is [w_gate | w_up], so both come from one matrix product (as attention's c_attn
    fuses q, k, v); w_proj (F, C) is w_down. The hidden units are kept as rows, h = (x @ w_fc).T
    (2F, N), so that the gates h[:F] and the ups h[F:] are contiguous arrays: NumPy's element-wise
    passes over half rows of an (N, 2F) array take 2-3 times as long. The transposes are flags to
    BLAS (and cuBLAS), not copies. The element-wise chain runs in cache-sized blocks of rows on the
    CPU (device.blocks), on whole arrays on the whole-array path. Backward needs the gate only
    through sigmoid(gate) and silu(gate), so silu(gate) is written over it.
    """
    xp = get_array_module(x)
    C, F = x.shape[-1], w_proj.shape[0]
    h = w_fc.T @ x.reshape(-1, C).T  # (2F, C) @ (C, N) -> (2F, N)
    gate, up = h[:F], h[F:]
    s = xp.empty_like(gate)  # (F, N)
    a = xp.empty_like(gate)
    for gb, ub, sb, ab in blocks(gate, up, s, a):
        xp.negative(gb, out=sb)
        with np.errstate(over="ignore"):  # exp(-gate) = inf for very negative gates gives s = 0, the right limit
            xp.exp(sb, out=sb)
        sb += 1.0
        xp.reciprocal(sb, out=sb)  # sigmoid(gate)
        gb *= sb  # silu(gate), over the gate
        xp.multiply(gb, ub, out=ab)
    out = a.T @ w_proj  # (N, F) @ (F, C) -> (N, C)
    return out.reshape(x.shape), SwiGLUCache(x, h, s, a)


def swiglu_backward(dout, cache, w_fc, w_proj, dw_fc, dw_proj):
    """Reverse of swiglu_forward. Returns dx."""
    x, h, s, a = cache
    xp = get_array_module(x)
    F, C = w_proj.shape
    dout2 = dout.reshape(-1, C)  # (N, C)
    # forward was: out = a.T @ w_proj
    dw_proj += a @ dout2  # (F, N) @ (N, C) -> (F, C)
    da = w_proj @ dout2.T  # (F, C) @ (C, N) -> (F, N), the transpose of dout @ w_proj.T
    dh = xp.empty_like(h)  # (2F, N) [dgate; dup]
    for silu, up, sb, dab, dgate, dup in blocks(h[:F], h[F:], s, da, dh[:F], dh[F:]):
        # forward was: a = silu(gate) * up, silu(g) = g s, s = sigmoid(g),
        # silu'(g) = s + g s (1 - s) = s + silu(g) (1 - s)
        xp.multiply(silu, dab, out=dup)  # da * silu(gate)
        xp.subtract(1.0, sb, out=dgate)
        dgate *= silu
        dgate += sb  # silu'(gate)
        dgate *= up
        dgate *= dab  # da * up * silu'(gate)
    # forward was: h = (x @ w_fc).T
    dw_fc += x.reshape(-1, C).T @ dh.T  # (C, N) @ (N, 2F) -> (C, 2F)
    return (dh.T @ w_fc.T).reshape(x.shape)  # (N, 2F) @ (2F, C) -> (N, C)


# ----------------------------------------------------------------------------- ReLU^2 feed-forward

class ReLU2MLPCache(NamedTuple):
    x: np.ndarray  # (B, T, C) input
    h: np.ndarray  # (B, T, F) pre-activation, x @ w_fc
    a: np.ndarray  # (B, T, F) relu(h)^2, the input of the output projection


def relu2_mlp_forward(x, w_fc, w_proj):
    """(B, T, C) -> (B, T, C): relu(x @ w_fc)^2 @ w_proj, GPT-2's two-matrix MLP with modded-nanogpt's
    activation and no biases. w_fc (C, F), w_proj (F, C). The activation is transformer.py's (GPT-2's
    relu2 MLP), only the biases differ."""
    h = matmul_rows(x, w_fc)  # (B, T, C) -> (B, T, F)
    a = relu2_forward(h)
    out = matmul_rows(a, w_proj)  # (B, T, F) -> (B, T, C)
    return out, ReLU2MLPCache(x, h, a)


def relu2_mlp_backward(dout, cache, w_fc, w_proj, dw_fc, dw_proj):
    """Reverse of relu2_mlp_forward. Returns dx."""
    x, h, a = cache
    C, F = w_fc.shape
    # forward was: out = a @ w_proj
    dw_proj += a.reshape(-1, F).T @ dout.reshape(-1, C)  # (F, N) @ (N, C) -> (F, C)
    da = matmul_rows(dout, w_proj.T)  # (B, T, C) -> (B, T, F)
    # forward was: a = relu(h)^2
    relu2_backward_inplace(da, h)  # da -> dh
    # forward was: h = x @ w_fc
    dw_fc += x.reshape(-1, C).T @ da.reshape(-1, F)  # (C, N) @ (N, F) -> (C, F)
    return matmul_rows(da, w_fc.T)  # (B, T, F) -> (B, T, C)


class FeedForwardPair(NamedTuple):
    """One feed-forward's math: forward(x, w_fc, w_proj) -> out, cache and
    backward(dout, cache, w_fc, w_proj, dw_fc, dw_proj) -> dx."""
    forward: Callable
    backward: Callable


# ModelConfig.activation -> the feed-forward of the block (config.LLAMA_FEED_FORWARDS holds their shapes)
FEED_FORWARDS = {"swiglu": FeedForwardPair(swiglu_forward, swiglu_backward),
                 "relu2": FeedForwardPair(relu2_mlp_forward, relu2_mlp_backward)}


# ----------------------------------------------------------------------------- block

class LlamaBlockCache(NamedTuple):
    ln_1: RMSNormCache
    attn: LlamaAttentionCache
    ln_2: RMSNormCache
    mlp: SwiGLUCache | ReLU2MLPCache
    dropout: BlockMasks  # NO_DROPOUT: none
    activation: str  # which feed-forward made mlp (FEED_FORWARDS)


def llama_block_forward(x, p, cfg, kv=None, layer=0, dropout=None):
    """Pre-norm block: x + dropout(attn(rmsnorm_1(x))), then + dropout(ffn(rmsnorm_2(.))), ffn SwiGLU or relu2's
    MLP (FEED_FORWARDS). `p` maps the names of llama_block_shapes to arrays; cfg: the ModelConfig (n_heads,
    n_kv_heads, rope_theta, norm_eps, qk_norm, activation); `dropout`: the block's BlockMasks when training with
    dropout, None: no dropout."""
    dropout = dropout or NO_DROPOUT
    h, c_ln1 = rmsnorm_forward(x, p["ln_1.weight"], cfg.norm_eps)
    a, c_attn = llama_attention_forward(h, p["attn.c_attn.weight"], p["attn.c_proj.weight"],
                                        cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, kv, layer, dropout.att,
                                        cfg.qk_norm, cfg.norm_eps)
    residual_add_inplace(a, x, dropout.attn_out)  # x + dropout(attn(rmsnorm(x))), over attention's output (fresh)
    x = a
    h, c_ln2 = rmsnorm_forward(x, p["ln_2.weight"], cfg.norm_eps)
    m, c_mlp = FEED_FORWARDS[cfg.activation].forward(h, p["mlp.c_fc.weight"], p["mlp.c_proj.weight"])
    residual_add_inplace(m, x, dropout.mlp_out)  # the residual, over the feed-forward's output
    return m, LlamaBlockCache(c_ln1, c_attn, c_ln2, c_mlp, dropout, cfg.activation)


def llama_block_backward(dout, cache, p, g):
    """Reverse of llama_block_forward; `g` holds the gradient arrays under the same names as `p`."""
    attn_mask, mlp_mask = cache.dropout.attn_out, cache.dropout.mlp_out
    # forward was: out = x1 + dropout(ffn(rmsnorm_2(x1))), so dx1 = dout + the path through the feed-forward
    dm = dout if mlp_mask is None else dropout_backward(dout, mlp_mask)  # (B, T, C) a new array: dout is needed below
    ffn = FEED_FORWARDS[cache.activation]
    dh = ffn.backward(dm, cache.mlp, p["mlp.c_fc.weight"], p["mlp.c_proj.weight"],
                      g["mlp.c_fc.weight"], g["mlp.c_proj.weight"])
    dx1 = rmsnorm_backward(dh, cache.ln_2, g["ln_2.weight"])
    dx1 += dout
    # forward was: x1 = x + dropout(attn(rmsnorm_1(x)))
    da = dx1 if attn_mask is None else dropout_backward(dx1, attn_mask)
    dh = llama_attention_backward(da, cache.attn, p["attn.c_attn.weight"], p["attn.c_proj.weight"],
                                  g["attn.c_attn.weight"], g["attn.c_proj.weight"])
    dx = rmsnorm_backward(dh, cache.ln_1, g["ln_1.weight"])
    dx += dx1
    return dx


def llama_final_norm_forward(x, p, cfg):
    """The model's last RMSNorm, ln_f, before the output layer; p: the model's parameters."""
    return rmsnorm_forward(x, p["ln_f.weight"], cfg.norm_eps)


def llama_final_norm_backward(dh, cache, g):
    """Reverse of llama_final_norm_forward; g: the model's gradients. Returns dx."""
    return rmsnorm_backward(dh, cache, g["ln_f.weight"])


# ----------------------------------------------------------------------------- for tests

def init_llama_block(shapes, n_layers, rng, dtype=np.float32):
    """GPT-2's initialisation, the rule language_model.init_params applies to these names too: gains 1,
    weights N(0, 0.02), the projections back into the residual stream (c_proj) N(0, 0.02 / sqrt(2L))."""
    params = {}
    for name, shape in shapes.items():
        if name.startswith("ln_"):
            params[name] = np.ones(shape, dtype)
        else:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith("c_proj.weight") else 0.02
            params[name] = rng.normal(0.0, std, size=shape).astype(dtype)
    return params


def block_parameters(d_model, n_heads, n_kv_heads=None, d_ff=None, gpt2_d_ff=None):
    """Parameters of one block of each kind at the same width C: {"gpt2": ..., "llama": ...}.
    GPT-2's: c_attn, c_proj, c_fc (gpt2_d_ff, default 4C), c_proj with their biases, two layer
    norms. Llama's: llama_block_shapes (d_ff default swiglu_hidden(C)). At the defaults both are
    about 12 C^2: three matrices of F = 8C/3 hold what two of 4C do."""
    C = d_model
    Fg = gpt2_d_ff or 4 * C
    gpt2 = (C * 3 * C + 3 * C) + (C * C + C) + (C * Fg + Fg) + (Fg * C + C) + 2 * 2 * C
    llama = sum(math.prod(s) for s in llama_block_shapes(C, n_heads, n_kv_heads, d_ff).values())
    return {"gpt2": gpt2, "llama": llama}
