"""[math] The language-model head: projection to the vocabulary, the optional soft cap, and the loss.

Shapes: N rows (B*T), C model width, V vocabulary size, R rows per chunk.

    logits = h @ w_out.T          h (N, C): the final norm's output; w_out (V, C): the token embedding wte when tied
    logits = c tanh(logits / c)   only with a soft cap c > 0 (ModelConfig.logit_softcap; 0: none)

The final norm before it is the block's own (transformer.final_norm_forward, llama's RMSNorm), which
the model applies (language_model.BLOCKS). With GPT-2's vocabulary this is over 90% of a small
model's arithmetic, and the (N, V) logits are the largest array by far (800 MB for N = 4096 in
float32). So training never holds them all: `lm_head_loss` goes through the rows in chunks of R,
and for each chunk computes the logits into one preallocated (R, V) buffer, turns them in place into
dloss/dlogits (up to a scale per row, applied to the small operands), and immediately multiplies
them back into dh and dw_out. `lm_head_forward` is the plain unchunked version (used for generation
and as the tests' reference). On the whole-array path (the GPU's) one chunk holds every row: a GPU
has the memory, and each chunk costs kernel launches.

The soft cap (Gemma 2's, modded-nanogpt's) keeps every logit inside (-c, c), smoothly, so that no
logit can run away while the model memorises; both heads apply it, so training, evaluation and
generation see the same logits. Training with it keeps a second (R, V) buffer, its slope.
"""
import numpy as np

from device import get_array_module, matmul_rows, whole_arrays
from loss import IGNORE_INDEX, softmax_cross_entropy_inplace

ROWS_PER_CHUNK = 512  # rows of logits per matrix product: big enough for BLAS to run at full speed


def softcap_inplace(logits, cap, slope=None):
    """Logit soft-capping, in place: logits z become cap * tanh(z / cap), inside (-cap, cap), about z
    where |z| is small next to cap. With `slope` (an array shaped as logits) also writes there what
    backward needs, d/dz cap tanh(z / cap) = 1 - tanh(z / cap)^2."""
    xp = get_array_module(logits)
    logits *= 1.0 / cap
    xp.tanh(logits, out=logits)
    if slope is not None:
        xp.multiply(logits, logits, out=slope)
        xp.subtract(1.0, slope, out=slope)
    logits *= cap


def softcap_backward_inplace(dlogits, slope):
    """Forward was: capped = cap * tanh(z / cap), whose slope softcap_inplace kept. dlogits, the
    gradient of the capped logits, becomes the gradient of z: times 1 - tanh(z / cap)^2, in place."""
    dlogits *= slope


def lm_head_forward(h, w_out, softcap=0.0):
    """(..., C) -> logits (..., V), soft-capped at `softcap` (0: not capped)."""
    logits = matmul_rows(h, w_out.T)  # (B, T, C) @ (C, V) -> (B, T, V): one GEMM, no copy of the table
    if softcap:
        softcap_inplace(logits, softcap)
    return logits


class HeadWorkspace:
    """Buffers reused from step to step: fresh 100s-of-MB temporaries cost page faults each time."""

    def __init__(self):
        self.arrays = {}

    def get(self, name, shape, dtype, xp=np):
        a = self.arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype or get_array_module(a) is not xp:
            a = self.arrays[name] = xp.empty(shape, dtype)
        return a


def lm_head_loss(h, w_out, targets, dw_out=None, workspace=None, rows_per_chunk=ROWS_PER_CHUNK,
                 ignore_index=IGNORE_INDEX, mean_over=None, softcap=0.0):
    """Cross-entropy of the head's logits against targets, chunked over rows.

    h (N, C) the final norm's output, targets (N,). `dw_out`: None for evaluation, or the output
    layer's gradient array, into which the gradient of the mean loss is added: the mean over
    `mean_over` targets, by default the counted ones in `targets` (a shard of a batch passes the
    whole batch's count). `softcap`: the logits' soft cap, as lm_head_forward's (0: none). Returns
    (loss_sum, n_correct, n_counted, dh): the loss summed over the counted (not ignored) targets, how
    many of them had the highest logit, how many there were, and dh (N, C), None for evaluation.
    """
    xp = get_array_module(h)
    N, C = h.shape
    V = w_out.shape[0]
    ws = workspace or HeadWorkspace()
    training = dw_out is not None
    n_counted = xp.count_nonzero(targets != ignore_index)  # an int; on the GPU a 0-d array, read only if needed
    grad_scale = None  # evaluation: nothing to scale, nothing read back
    if training:
        grad_scale = 1.0 / max(int(n_counted) if mean_over is None else mean_over, 1)
    R = N if whole_arrays(h) else min(rows_per_chunk, N)
    buf = ws.get("logits", (R, V), h.dtype, xp)
    dh = slope_buf = None
    if training:
        dh = xp.empty_like(h)  # (N, C)
        dw_sum = ws.get("dw_out_t", (C, V), h.dtype, xp)  # the transpose of dw_out's part: the chunks' added up
        dw_chunk = ws.get("dw_out_t_chunk", (C, V), h.dtype, xp) if N > R else None
        h_scaled = ws.get("h_scaled", (R, C), h.dtype, xp)
        if softcap:
            slope_buf = ws.get("softcap_slope", (R, V), h.dtype, xp)
    loss_sum, n_correct = 0.0, 0  # sums of the chunks' values: on the GPU they stay there
    for r0 in range(0, N, R):
        r1 = min(N, r0 + R)
        logits = buf[: r1 - r0]
        xp.matmul(h[r0:r1], w_out.T, out=logits)  # (R, C) @ (C, V) -> (R, V)
        slope = None if slope_buf is None else slope_buf[: r1 - r0]
        if softcap:
            softcap_inplace(logits, softcap, slope)
        s, c, row_scale = softmax_cross_entropy_inplace(logits, targets[r0:r1], grad_scale, ignore_index)
        loss_sum += s
        n_correct += c
        if training:  # dlogits = row_scale[:, None] * logits: scale the (R, C) operands instead
            if softcap:  # the gradient of the capped logits -> of the logits themselves
                softcap_backward_inplace(logits, slope)
            xp.matmul(logits, w_out, out=dh[r0:r1])  # (R, V) @ (V, C) -> (R, C)
            dh[r0:r1] *= row_scale[:, None]
            xp.multiply(h[r0:r1], row_scale[:, None], out=h_scaled[: r1 - r0])
            # dw_out += logits.T @ h_scaled, made as its transpose: BLAS runs (C, R) @ (R, V), R rows summed into
            # a short wide result, about a tenth faster than (V, R) @ (R, C) (2-3% of the guide's steps)
            first = r0 == 0
            xp.matmul(h_scaled[: r1 - r0].T, logits, out=dw_sum if first else dw_chunk)  # (C, R) @ (R, V) -> (C, V)
            if not first:
                dw_sum += dw_chunk
    if training:
        dw_out += dw_sum.T  # (C, V) -> (V, C), once a pass
    return loss_sum, n_correct, n_counted, dh
