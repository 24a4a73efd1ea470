"""The language-model head: final norm, projection to the vocabulary, and the loss.

Shapes: B batch, T sequence length, N = B*T rows, C model width, V vocabulary size,
R rows per chunk.

    logits = layernorm(x) @ w_out.T          w_out (V, C): the token embedding wte when tied
    logits = rmsnorm(x) @ w_out.T            the Llama block's model: b_ln None, RMSNorm has no bias

With GPT-2's vocabulary this is over 90% of a small model's arithmetic, and the (N, V)
logits are the largest array by far (800 MB for N = 4096 in float32). So training never
holds them all: `lm_head_loss` goes through the rows in chunks of R, and for each chunk
computes the logits into one preallocated (R, V) buffer, turns them in place into
dloss/dlogits (up to a scale per row, applied to the small operands), and immediately
multiplies them back into dx and dw_out. `lm_head_forward` is the plain unchunked version
(used for generation and as the tests' reference). On the whole-array path (the GPU's) one
chunk holds every row: a GPU has the memory, and each chunk costs kernel launches.
"""
import numpy as np

from device import get_array_module, whole_arrays
from llama import RMS_EPS, rmsnorm_backward, rmsnorm_forward
from loss import IGNORE_INDEX, softmax_cross_entropy_inplace
from transformer import layernorm_backward, layernorm_forward, matmul_rows

ROWS_PER_CHUNK = 512  # rows of logits per matrix product: big enough for BLAS to run at full speed


def final_norm_forward(x, w_ln, b_ln, eps=RMS_EPS):
    """GPT-2's final layer norm (gain and bias), or Llama's RMSNorm with eps when b_ln is None."""
    return rmsnorm_forward(x, w_ln, eps) if b_ln is None else layernorm_forward(x, w_ln, b_ln)


def final_norm_backward(dh, cache, dw_ln, db_ln):
    """Reverse of final_norm_forward (db_ln None for RMSNorm). Returns dx."""
    return rmsnorm_backward(dh, cache, dw_ln) if db_ln is None else layernorm_backward(dh, cache, dw_ln, db_ln)


def lm_head_forward(x, w_ln, b_ln, w_out, eps=RMS_EPS):
    """(B, T, C) -> logits (B, T, V). b_ln None: the final norm is RMSNorm (with eps)."""
    h, _ = final_norm_forward(x, w_ln, b_ln, eps)
    return matmul_rows(h, w_out.T)  # (B, T, C) @ (C, V) -> (B, T, V): one GEMM, no copy of the table


class HeadWorkspace:
    """Buffers reused from step to step: fresh 100s-of-MB temporaries cost page faults each time."""

    def __init__(self):
        self.arrays = {}

    def get(self, name, shape, dtype, xp=np):
        a = self.arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype or get_array_module(a) is not xp:
            a = self.arrays[name] = xp.empty(shape, dtype)
        return a


def lm_head_loss(x, w_ln, b_ln, w_out, targets, grads=None, workspace=None,
                 rows_per_chunk=ROWS_PER_CHUNK, ignore_index=IGNORE_INDEX, mean_over=None, eps=RMS_EPS):
    """Cross-entropy of the head's logits against targets, chunked over rows.

    x (B, T, C), targets (B, T); b_ln None: the final norm is RMSNorm (with eps), not layer norm.
    `grads`: None for evaluation, or (dw_ln, db_ln, dw_out) (db_ln None with RMSNorm), into
    which the gradients of the mean loss are added: the mean over `mean_over` targets, by
    default the counted ones in `targets` (a shard of a batch passes the whole batch's count). Returns
    (loss_sum, n_correct, n_counted, dx): the loss summed over the counted (not ignored)
    targets, how many of them had the highest logit, how many there were, and dx (B, T, C) or None.
    """
    xp = get_array_module(x)
    B, T, C = x.shape
    V = w_out.shape[0]
    N = B * T
    ws = workspace or HeadWorkspace()
    h, ln_cache = final_norm_forward(x.reshape(N, C), w_ln, b_ln, eps)  # (N, C)
    t = targets.reshape(N)
    n_counted = xp.count_nonzero(t != ignore_index)  # an int; on the GPU a 0-d array, read only if needed
    grad_scale = None  # evaluation: nothing to scale, nothing read back
    if grads is not None:
        grad_scale = 1.0 / max(int(n_counted) if mean_over is None else mean_over, 1)
    R = N if whole_arrays(x) else min(rows_per_chunk, N)
    buf = ws.get("logits", (R, V), x.dtype, xp)
    if grads is not None:
        dw_ln, db_ln, dw_out = grads
        dh = xp.empty_like(h)  # (N, C)
        dw_chunk = ws.get("dw_out", (V, C), x.dtype, xp)
        h_scaled = ws.get("h_scaled", (R, C), x.dtype, xp)
    loss_sum, n_correct = 0.0, 0  # sums of the chunks' values: on the GPU they stay there
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        logits = buf[: r1 - r0]
        xp.matmul(h[r0:r1], w_out.T, out=logits)  # (R, C) @ (C, V) -> (R, V)
        s, c, row_scale = softmax_cross_entropy_inplace(logits, t[r0:r1], grad_scale, ignore_index)
        loss_sum += s
        n_correct += c
        if grads is not None:  # dlogits = row_scale[:, None] * logits: scale the (R, C) operands instead
            xp.matmul(logits, w_out, out=dh[r0:r1])  # (R, V) @ (V, C) -> (R, C)
            dh[r0:r1] *= row_scale[:, None]
            xp.multiply(h[r0:r1], row_scale[:, None], out=h_scaled[: r1 - r0])
            xp.matmul(logits.T, h_scaled[: r1 - r0], out=dw_chunk)  # (V, R) @ (R, C) -> (V, C)
            dw_out += dw_chunk
    if grads is None:
        return loss_sum, n_correct, n_counted, None
    dx = final_norm_backward(dh, ln_cache, dw_ln, db_ln)
    return loss_sum, n_correct, n_counted, dx.reshape(B, T, C)
