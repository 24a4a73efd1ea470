"""[training run] The validation metrics: loss, perplexity, accuracy and bits per byte over the
validation windows, the same numbers on one process or many.

    res = evaluate(model, val_ds, batch_size=32, seq_len=128)   # {"val_loss": ..., "val_bpb": ...}

Bits per byte (the loss in bits over the UTF-8 bytes of the text) does not depend on the tokenizer,
so runs with different vocabularies compare; train.py logs them, metrics.py writes them down.
"""
import math

import numpy as np

from data_loader import eval_batches
from distributed import Solo
from loss import count_targets


def evaluate(model, val, batch_size, seq_len, max_batches=None, world=None, stop=None):
    """Loss, perplexity, accuracy and bits per byte over the validation windows.

    Each rank evaluates its rows of every batch (as one process's workers would); one small sum a
    batch adds up the parts, so no rank waits longer than a batch for another (--rank_timeout holds),
    and a signal (stop.interrupted) on any rank ends the evaluation on all: it returns None. On the GPU
    each rank's sums stay there until the end, read once and added up over the ranks then; a batch's
    sum carries only the vote. Perplexity is exp(total loss / total tokens), not a mean of
    per-batch values; bits per byte divides the total loss in bits by the UTF-8 bytes those tokens
    stand for (val.num_bytes, separators included) times the fraction of the set evaluated.
    world: the run's distributed.World, None: this process alone.
    """
    world = world or Solo()
    loss_sum, n_correct, n_tokens = 0.0, 0, 0
    on_device = model.xp is not np
    for x, y in eval_batches(val, batch_size, seq_len, max_batches):
        a, b = world.rows(len(x))
        s, c = model.evaluate(x[a:b], y[a:b]) if b > a else (0.0, 0)
        vote = stop is not None and stop.interrupted
        if on_device:
            (interrupted,) = world.sum([vote])
        else:
            s, c, interrupted = world.sum([s, c, vote])
        if interrupted:
            return None
        loss_sum, n_correct, n_tokens = loss_sum + s, n_correct + c, n_tokens + count_targets(y)
    if on_device:
        loss_sum, n_correct = world.sum([loss_sum, n_correct])
    loss_sum, n_correct = float(loss_sum), int(n_correct)  # one process on the GPU: read now, once
    mean = loss_sum / n_tokens
    out = {"val_loss": mean, "val_perplexity": math.exp(min(mean, 700.0)), "val_accuracy": n_correct / n_tokens,
           "val_bpb": None, "val_tokens": n_tokens}
    if val.num_bytes:
        bytes_seen = val.num_bytes * n_tokens / len(val.tokens)  # bytes per token x tokens evaluated
        out["val_bpb"] = loss_sum / math.log(2) / bytes_seen
    return out
