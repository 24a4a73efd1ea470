"""Softmax cross-entropy for next-token prediction, and the metrics derived from it.

Shapes: N rows (B*T token positions), V vocabulary size.
A target equal to IGNORE_INDEX contributes neither loss nor gradient nor accuracy.
"""
import numpy as np

IGNORE_INDEX = -100  # as in PyTorch's cross_entropy


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

    Returns (sum of the counted rows' losses as a float, number of rows whose target has the
    highest logit, row_scale (N,)), such that

        dloss/dlogits = row_scale[:, None] * e

    with dloss/dlogits = grad_scale * (softmax(logits) - onehot(targets)), zero on ignored rows:
    the caller passes grad_scale = 1 / (number of counted tokens in the whole batch). The
    row scaling is left to the caller because it is cheaper applied to the (N, C) operands
    of the matrix products that follow (lm_head.py) than to the (N, V) array here; that saves
    a pass over the logits. e = exp(logits - rowmax) - rowsum * onehot(targets), unnormalised.
    Without grad_scale (evaluation) row_scale is None. No (N, V) temporary is made, so a block
    of rows that fits in cache stays there for all passes.
    """
    rows = np.arange(logits.shape[0])
    valid = targets != ignore_index
    tgt = np.where(valid, targets, 0)
    target_logit = logits[rows, tgt]  # (N,) a copy, taken before logits is overwritten
    m = logits.max(axis=1)  # (N,)
    # a tie for the maximum counts as correct; argmax would cost another pass over the row
    n_correct = int((valid & (target_logit >= m)).sum())
    np.subtract(logits, m[:, None], out=logits)
    np.exp(logits, out=logits)  # unnormalised probabilities, each in (0, 1]
    # row sums as a matrix-vector product: twice as fast as np.sum's pairwise summation, and
    # accurate enough in float32 (BLAS keeps many partial sums; every term is in (0, 1])
    s = logits @ np.ones(logits.shape[1], logits.dtype)  # (N,)
    losses = np.log(s.astype(np.float64)) + m - target_logit  # -log softmax at the target = logsumexp - target logit
    row_scale = None
    if grad_scale is not None:
        logits[rows[valid], tgt[valid]] -= s[valid]  # so that e / rowsum = softmax - onehot
        row_scale = (grad_scale * valid / s).astype(logits.dtype)
    return float(losses[valid].sum()), n_correct, row_scale


def perplexity(mean_loss):
    """exp of the mean loss over all tokens (not a mean of per-batch perplexities)."""
    return float(np.exp(min(mean_loss, 700.0)))


def bits_per_byte(loss_sum, n_bytes):
    """Total nats over the text's UTF-8 bytes, in bits: comparable across tokenizers."""
    return float(loss_sum / np.log(2) / n_bytes)
