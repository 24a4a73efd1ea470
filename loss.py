"""[math] Softmax cross-entropy for next-token prediction.

Shapes: N rows (B*T token positions), V vocabulary size.
A target equal to IGNORE_INDEX contributes neither loss nor gradient nor accuracy.
"""
import numpy as np

from device import BLOCK, get_array_module, whole_arrays

IGNORE_INDEX = -100  # as in PyTorch's cross_entropy
BLOCK_ELEMENTS = 4 * BLOCK  # logits per block of rows: 1 MB of float32 (see device.BLOCK)
SHIFT_FREE = (-20.0, 60.0)  # row maxima for which exp needs no shift (see softmax_cross_entropy_inplace)


def cross_entropy_reference(logits, targets, ignore_index=IGNORE_INDEX):
    """The plain version, for tests: (N, V), (N,) -> mean loss, accuracy, dlogits (N, V).

    Makes full-size temporaries; the model uses softmax_cross_entropy_inplace instead.
    """
    valid = targets != ignore_index
    n = max(int(valid.sum()), 1)
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    rows = np.nonzero(valid)[0]
    loss = -np.log(probs[rows, targets[rows]]).sum() / n
    accuracy = (logits[rows].argmax(axis=1) == targets[rows]).sum() / n
    dlogits = probs.copy()
    dlogits[rows, targets[rows]] -= 1.0
    dlogits *= valid[:, None] / n
    return loss, accuracy, dlogits


def softmax_cross_entropy_inplace(logits, targets, grad_scale=None, ignore_index=IGNORE_INDEX):
    """Fused softmax + cross-entropy on logits (N, V), overwriting them with e (N, V).

    Returns (sum of the counted rows' losses, number of rows whose target has the highest logit,
    row_scale (N,)), such that

        dloss/dlogits = row_scale[:, None] * e

    with dloss/dlogits = grad_scale * (softmax(logits) - onehot(targets)), zero on ignored rows:
    the caller passes grad_scale = 1 / (number of counted tokens in the whole batch). The
    row scaling is left to the caller because it is cheaper applied to the (N, C) operands
    of the matrix products that follow (lm_head.py) than to the (N, V) array here; that saves
    a pass over the logits. e = exp(logits - shift) - rowsum * onehot(targets), unnormalised.
    Without grad_scale (evaluation) row_scale is None.

    With GPT-2's vocabulary this is the costliest element-wise work of a training step, so it
    makes as few passes as it can (max, exp, sum), and makes them a block of rows at a time
    (BLOCK_ELEMENTS) that stays in cache from the first pass to the last. On the whole-array
    path (the GPU's) one block holds every row, and nothing is read back to the host: there
    the two sums are 0-d arrays (on the CPU a float and an int).
    """
    xp = get_array_module(logits)
    N, V = logits.shape
    rows = xp.arange(N)
    valid = targets != ignore_index
    tgt = xp.where(valid, targets, 0)
    target_logit = logits[rows, tgt]  # (N,) a copy, taken before logits is overwritten
    row_max, shift, row_sum = xp.empty(N, logits.dtype), xp.zeros(N, logits.dtype), xp.empty(N, logits.dtype)
    ones = xp.ones(V, logits.dtype)
    whole = whole_arrays(logits)
    step = N if whole else max(1, BLOCK_ELEMENTS // V)
    for b in (slice(b0, b0 + step) for b0 in range(0, N, step)):
        block = logits[b]
        xp.max(block, axis=1, out=row_max[b])
        # Softmax is usually computed as exp(logits - max) so that exp cannot overflow. While
        # every row's max lies in SHIFT_FREE, exp(logits) cannot overflow either (even summed
        # over 10^12 terms), and its largest term is far from underflow: the subtraction, a
        # pass over the block, is skipped. Rows outside it (rare) are shifted as usual. On the
        # whole-array path every row is: there the test would be a wait for the GPU.
        if whole or row_max[b].min() < SHIFT_FREE[0] or row_max[b].max() > SHIFT_FREE[1]:
            shift[b] = row_max[b]
            block -= shift[b, None]
        xp.exp(block, out=block)
        # row sums as a matrix-vector product: twice as fast as np.sum's pairwise summation
        # and accurate enough in float32 (BLAS keeps many partial sums of positive terms). The
        # vector and the result as (V, 1) and (rows, 1) columns: CuPy 13's matmul refuses a 1-D
        # `out` (NumPy computes the same either way, bit for bit)
        xp.matmul(block, ones[:, None], out=row_sum[b, None])
    # a tie for the maximum counts as correct; argmax would cost another pass over the rows
    n_correct = (valid & (target_logit >= row_max)).sum()
    # -log softmax at the target = logsumexp - target logit
    losses = xp.log(row_sum.astype(np.float64)) + shift - target_logit
    loss_sum = xp.where(valid, losses, 0.0).sum()
    row_scale = None
    if grad_scale is not None:
        # so that e / rowsum = softmax - onehot; an ignored row (its target set to 0 above) is
        # changed too, but gets row_scale 0: no gradient
        logits[rows, tgt] -= row_sum
        row_scale = (grad_scale * valid / row_sum).astype(logits.dtype)
    if xp is np:
        return float(loss_sum), int(n_correct), row_scale
    return loss_sum, n_correct, row_scale


def count_targets(targets):
    """How many targets count (are not IGNORE_INDEX): a step's mean loss divides by this. On the host."""
    return int(np.count_nonzero(targets != IGNORE_INDEX))
