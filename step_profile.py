"""[engine] Where a training step's time goes: the time of each kind of layer, forward and backward.

The layers hold no timing code. While a StepProfiler is entered (a `with` block), the functions
named in its table are replaced by timed stand-ins, found where the layer code looks them up (a
module's global, a class's method, the model's block); on exit the originals are put back, so
the model computes exactly what it computes without the profiler. benchmark.py --profile runs
it over training steps and prints the table (docs/performance.md explains how to read it).

Each row gets its *self time*: a timed call's time less the timed calls inside it. The
attention functions call the causal softmax, so the softmax is a row of its own and the
attention row holds what is left (its matrix products, bias adds, reshapes); the block
functions call all their layers, so the block row holds only the residual adds and dropout.
The final norm runs the blocks' norm function inside it: that time stays the final norm's
(an "opaque" row). What no row holds (Python between the calls, token checks, a thread
waiting for the slower one) is the step's time less the rows' sum.

Threads. A step splits the batch over the cores (parallel.py): every thread runs the whole
forward and backward pass of its shard of sequences at the same time as the others. Each
thread keeps its own clock stack; the rows timed inside a shard's pass add up every thread's
seconds (thread-seconds), and divided by the number of threads they are the wall-clock share
of the step they stand for when the threads run evenly. The rows outside the shards (the batch,
zeroing, adding up the threads' gradients, clipping, the optimizer) run from the main thread
and are plain wall-clock time (inside, some of them share their work over the threads too).

On the GPU each timer waits for the GPU before it reads the clock (else it would time the
queueing of work, not the work); that removes the overlap of launching and computing, so a
profiled GPU step is slower than a plain one.

A new row is a label in LABELS and a line in targets() naming the function (a table of forward and
backward pairs the layer code picks from, as llama.FEED_FORWARDS, is a line in PAIR_TABLES). Attention's QKV
product, its core (scores, softmax, weighted sum) and its output projection share one row (less
the softmax, a function of its own): attention_forward and _backward compute them inline, so
there is no call to time apart; were they three pairs of functions, each would be a line here.

    with StepProfiler(model, optimizer) as prof:
        training_step(model, optimizer, batches)
    prof.rows(steps=1)   # [{row, direction, seconds, calls, sharded}], seconds per step
"""
import sys
import threading
import time
from typing import NamedTuple

import numpy as np

import language_model
import llama
import parallel
import transformer
from data_loader import RandomBatches
from device import synchronize
from loss import count_targets
from optimizer import clip_grad_norm

FORWARD, BACKWARD, BOTH = "forward", "backward", "fwd + bwd"

LABELS = {  # row -> what a learner reads, in the order of a step
    "batch": "get the batch (random windows of the tokens)",
    "zero_grad": "zero the gradients",
    "embedding": "token + position embedding",
    "norms": "norms in the blocks (ln_1, ln_2)",
    "attention": "attention: QKV, scores, weighted sum, out proj",
    "softmax": "attention: causal softmax",
    "rope": "attention: rotary positions (RoPE)",
    "feed_forward": "feed-forward (MLP or SwiGLU)",
    "block": "block: residual adds, dropout",
    "final_norm": "final norm (ln_f)",
    "head": "output layer + loss (fused: logits, softmax, cross-entropy)",
    "model": "model pass: the rest (reshapes, dropout masks)",
    "grad_sum": "add up the threads' gradients",
    "clip": "gradient clipping (global norm)",
    "optimizer": "optimizer step",
}
SHARD_ROOT = "model"  # the row whose calls are one thread's shard of the batch: rows inside are per thread


class Target(NamedTuple):
    """A function the layer code calls as owner.name (a module global or a class's method), timed as a row."""
    owner: object
    name: str
    row: str  # a key of LABELS
    direction: str | None  # FORWARD, BACKWARD, BOTH, or None: the direction of the timed call it runs in
    opaque: bool = False  # the timed calls inside it count as its own time


def targets(optimizer):
    """The table: every function a training step of either block calls that is a row (or part of one)."""
    t = [Target(RandomBatches, "next", "batch", ""),
         Target(parallel, "zero", "zero_grad", ""),
         Target(language_model, "embedding_forward", "embedding", FORWARD),
         Target(language_model, "embedding_backward", "embedding", BACKWARD),
         Target(language_model, "lm_head_loss", "head", BOTH),
         Target(language_model.LanguageModel, "_loss_and_backward", SHARD_ROOT, BOTH),
         Target(parallel, "sum_into", "grad_sum", ""),
         Target(sys.modules[__name__], "clip_grad_norm", "clip", ""),
         Target(type(optimizer), "step", "optimizer", "")]
    for module, pairs in (
            (transformer, [("layernorm", "norms"), ("attention", "attention"), ("mlp", "feed_forward")]),
            (llama, [("rmsnorm", "norms"), ("llama_attention", "attention")])):
        for function, row in pairs:
            t.append(Target(module, f"{function}_forward", row, FORWARD))
            t.append(Target(module, f"{function}_backward", row, BACKWARD))
        t.append(Target(module, "causal_softmax_inplace", "softmax", FORWARD))
        t.append(Target(module, "softmax_backward_inplace", "softmax", BACKWARD))
    t.append(Target(llama, "rope_rotate_pairs_inplace", "rope", None))  # forward turns q, k; backward turns back
    return t


PAIR_TABLES = [(llama.FEED_FORWARDS, "feed_forward")]  # tables of (forward, backward) pairs the layer code picks from

BLOCK_TARGETS = {  # language_model.Block's fields (the model's block, picked from BLOCKS) -> row, direction, opaque
    "forward": ("block", FORWARD, False),
    "backward": ("block", BACKWARD, False),
    "final_norm_forward": ("final_norm", FORWARD, True),
    "final_norm_backward": ("final_norm", BACKWARD, True),
}


def training_step(model, optimizer, batches, lr=3e-4, max_norm=1.0, dropout=None):
    """What train.py does each step, less the logging: a batch, zero_grad, forward and backward, gradient
    clipping, the update. dropout: the step's dropout.DropoutKey, None: no dropout."""
    x, y = batches.next()
    model.zero_grad()
    model.forward_backward(x, y, count_targets(y), dropout)
    clip_grad_norm(model.grads, max_norm)
    optimizer.step(model.grads, lr)


def random_batches(vocab_size, batch_size, seq_len, n_tokens=1 << 20, seed=0):
    """data_loader.RandomBatches over n_tokens random token ids in memory, as the training data would be."""
    n_tokens = max(n_tokens, 4 * batch_size * (seq_len + 1))
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32  # as prepared data files hold them
    tokens = np.random.default_rng(seed).integers(0, vocab_size, n_tokens).astype(dtype)
    data = type("RandomTokens", (), {"tokens": tokens, "path": "random tokens"})()
    return RandomBatches(data, batch_size, seq_len, seed=seed)


class _Frame:
    """One timed call in progress in one thread."""

    def __init__(self, key, opaque):
        self.key, self.opaque, self.inner = key, opaque, 0.0
        self.start = time.perf_counter()


class StepProfiler:
    """A context manager: while entered, the table's functions (targets(optimizer), and the model's
    block) are timed; `seconds` and `shards` add up over all the times it is entered."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.xp = model.xp
        self.seconds = {}  # (row, direction) -> [seconds outside shards, thread-seconds inside, calls]
        self.shards = 0  # shard passes run: per step, the number of threads the batch was split over
        self.shard_seconds = 0.0  # their total time, thread-seconds
        self._local = threading.local()
        self._lock = threading.Lock()
        self._saved = None

    # ------------------------------------------------------------------ patching
    def __enter__(self):
        if self._saved is not None:
            raise RuntimeError("this StepProfiler is already entered")
        self._saved, self._saved_block = [], self.model.block
        try:
            for t in targets(self.optimizer):
                own = t.name in vars(t.owner)  # an inherited method: put back by deleting the stand-in
                original = getattr(t.owner, t.name)
                setattr(t.owner, t.name, self._timed(original, t.row, t.direction, t.opaque))
                self._saved.append((t.owner, t.name, original, own))
            for table, row in PAIR_TABLES:
                for key, pair in list(table.items()):
                    table[key] = pair._replace(forward=self._timed(pair.forward, row, FORWARD, False),
                                               backward=self._timed(pair.backward, row, BACKWARD, False))
                    self._saved.append((table, key, pair, None))
            block = self.model.block
            self.model.block = block._replace(**{field: self._timed(getattr(block, field), *spec)
                                                 for field, spec in BLOCK_TARGETS.items()})
        except BaseException:  # a name the table has and the code no longer does: leave nothing patched
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info):
        for owner, name, original, own in reversed(self._saved):
            if own is None:  # an entry of a PAIR_TABLES table
                owner[name] = original
            elif own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self.model.block = self._saved_block
        self._saved = None
        return False

    # ------------------------------------------------------------------ timing
    def _stack(self):
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _timed(self, fn, row, direction, opaque):
        """fn with its self time added to the row, each call in the direction of the call it runs in
        when direction is None."""
        profiler = self

        def timed(*args, **kwargs):
            stack = profiler._stack()
            if stack and stack[-1].opaque:  # inside an opaque row: its own time
                return fn(*args, **kwargs)
            within = direction if direction is not None else next(
                (f.key[1] for f in reversed(stack) if f.key[1] in (FORWARD, BACKWARD)), "")
            synchronize(profiler.xp)
            frame = _Frame((row, within), opaque)
            stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(profiler.xp)
                elapsed = time.perf_counter() - frame.start
                stack.pop()
                if stack:
                    stack[-1].inner += elapsed
                profiler._add(frame.key, elapsed - frame.inner, elapsed,
                              in_shard=row == SHARD_ROOT or any(f.key[0] == SHARD_ROOT for f in stack))

        timed.__wrapped__ = fn
        return timed

    def _add(self, key, self_time, elapsed, in_shard):
        with self._lock:
            entry = self.seconds.setdefault(key, [0.0, 0.0, 0])
            entry[1 if in_shard else 0] += self_time
            entry[2] += 1
            if key[0] == SHARD_ROOT:
                self.shards += 1
                self.shard_seconds += elapsed

    # ------------------------------------------------------------------ results
    def rows(self, steps):
        """[{row, direction, seconds, calls, sharded}] per step, in a step's order: what comes before the
        pass, its forward rows, the head, its backward rows (in reverse), what comes after. A shard's rows
        (sharded) are the threads' total divided by the number of threads (see the module's docstring)."""
        threads = self.shards / steps if self.shards else 1
        out = []
        for (row, direction), (outside, inside, calls) in self.seconds.items():
            out.append(dict(row=row, direction=direction, seconds=(outside + inside / threads) / steps,
                            calls=calls / steps, sharded=inside > 0))
        order = {row: i for i, row in enumerate(LABELS)}

        def place(r):
            i = order[r["row"]]
            if r["direction"] == FORWARD:
                return 1, i
            if r["direction"] == BOTH and r["row"] != SHARD_ROOT:
                return 2, i
            if r["direction"] == BACKWARD:
                return 3, -i
            return (0 if i < order["embedding"] else 4), i
        return sorted(out, key=place)
