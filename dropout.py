"""[math] Dropout: applying a mask, and which elements a training pass drops (masks drawn from a
random stream of their own).

Shapes: B rows (sequences) of a pass, T sequence length, C d_model, H heads, L n_layers.

Dropout (Srivastava et al. 2014) zeroes each element of an activation with probability p while
training and scales the others by 1 / (1 - p), so that on average nothing changes; evaluation
and generation use the whole network. GPT-2 drops with one p (0.1) in three kinds of place, and
so does this model (ModelConfig.dropout, train.py --dropout; Hugging Face's embd_pdrop, attn_pdrop
and resid_pdrop):

    x = dropout(wte[idx] + pos)                                        the embeddings, (B, T, C)
    att = dropout(softmax(q @ k.T / sqrt(hs)))                         each block, (B, H, T, T)
    x = x + dropout(attn(ln_1(x))),  x = x + dropout(mlp(ln_2(x)))     each block, (B, T, C) twice

This module holds the whole idea: applying a mask (dropout_forward/backward, residual_add_inplace,
which both blocks call) and drawing the masks of a training pass (draw_masks).

Which masks: a function of (seed, step, global row) alone. Every row of a step's whole batch has a
generator of its own, seeded from (seed, DROPOUT_STREAM, step, row), and draws all its masks from
it in one fixed order (the embeddings', then block by block the attention weights', the attention
output's, the feed-forward output's). So a row gets the same masks whichever MPI rank, worker
thread or micro-batch computes it, and a resumed run draws what the uninterrupted one drew: exact
resume, "2 ranks train what 2 workers train" and "--grad_accum N trains what one pass trains" hold
with dropout as without. A pass names its rows with a DropoutKey: the step's (seed, step) and the
global row of its first row (the loop, accumulate_gradients and parallel.Shards offset it).

How: one uint16 per element, the element kept where it is >= round(p * 65536). The drop probability
is then within 1/131072 of p, and scale = 65536 / (65536 - threshold) is exact for it. Half the
random bytes of float32 draws and no conversion; bytes would be coarser (p = 0.1 would drop 10.2%).
Each row's numbers come from one call, compared into the masks in a pass each (bool: the caches
keep a byte per element, a quarter of the activation they mask).

On the GPU the masks are drawn on the host and copied to the device once per pass, as one array:
CuPy's generators are seeded per generator, not per row, so drawing there would either make the
masks depend on how the batch is cut (and on the device) or cost a generator and a kernel launch
per row. Where the host draws, a run's masks are the same numbers on either device.
"""
import math
import sys
from typing import NamedTuple

import numpy as np

from device import blocks, get_array_module, to_device

DROPOUT_STREAM = 2  # the initial weights draw from the seed itself, the batch order from (seed, 1)
LEVELS = 1 << 16  # one uint16 per element


# ----------------------------------------------------------------------------- applying a mask

class DropoutMask(NamedTuple):
    keep: np.ndarray  # (..., F) bool, the shape of the array it drops from: True where an element stays
    scale: float  # 1 / (1 - p), p the drop probability: the kept elements scaled so that E[out] = x


def dropout_forward(x, mask, out=None):
    """(..., F) -> (..., F): x * keep * scale, into `out` (x itself: in place; default: a new array), in
    cache-sized blocks on the CPU. x must be C-contiguous (every array dropped here is fresh)."""
    xp = get_array_module(x)
    out = xp.empty_like(x) if out is None else out
    for xb, kb, ob in blocks(x, mask.keep, out):
        xp.multiply(xb, kb, out=ob)
        ob *= mask.scale
    return out


def dropout_backward(dout, mask, out=None):
    """Forward was out = x * keep * scale, a fixed diagonal linear map: dx = dout * keep * scale."""
    return dropout_forward(dout, mask, out)


def residual_add_inplace(branch, x, mask=None):
    """branch becomes x + dropout(branch), in place, in one blocked pass (x + branch without a mask):
    a block's residual add, the branch's output dropped out before it joins the residual stream."""
    if mask is None:
        branch += x
        return
    for bb, kb, xb in blocks(branch, mask.keep, x):
        bb *= kb
        bb *= mask.scale
        bb += xb


class BlockMasks(NamedTuple):
    """One block's dropout masks for one training pass (dropout.draw_masks), in either block."""
    att: DropoutMask  # (B, H, T, T) the attention weights, after the softmax
    attn_out: DropoutMask  # (B, T, C) the attention branch's output, before its residual add
    mlp_out: DropoutMask  # (B, T, C) the feed-forward branch's output, before its residual add


NO_DROPOUT = BlockMasks(None, None, None)


# ----------------------------------------------------------------------------- drawing the masks

class DropoutKey(NamedTuple):
    """The masks of a training pass: those of step `step` of the run of seed `seed`, for the rows of the
    step's whole batch that start at global row `row`."""
    seed: int
    step: int
    row: int = 0

    def offset(self, rows):
        """The key of the rows that start `rows` after this key's first row."""
        return self._replace(row=self.row + rows)


class ModelMasks(NamedTuple):
    embedding: DropoutMask  # (B, T, C) the embeddings' output
    layers: list  # [BlockMasks], one per block


def drop_threshold(p):
    """The uint16 below which an element is dropped: p * 65536 rounded (at most 65535: one level kept)."""
    return min(round(p * LEVELS), LEVELS - 1)


def mask_shapes(T, C, H, n_layers):
    """The shapes of one row's masks, in the order a row draws them."""
    return [(T, C)] + [(H, T, T), (T, C), (T, C)] * n_layers


def row_numbers(seed, n):
    """n uint16 numbers of the random stream of `seed`: default_rng(seed).integers(0, LEVELS, n, dtype=np.uint16),
    the numbers a row's masks are drawn from, in half the time. For the full uint16 range NumPy takes each of its
    generator's 64-bit outputs as four uint16s, lowest bits first; on a little-endian machine that is the
    outputs' own bytes, which a view reads without a pass over them."""
    if sys.byteorder != "little":
        return np.random.default_rng(seed).integers(0, LEVELS, n, dtype=np.uint16)
    raw = np.random.PCG64(seed).random_raw(-(-n // 4))  # ceil(n / 4) 64-bit outputs, as default_rng's generator
    return raw.view(np.uint16)[:n]


def draw_masks(key, config, B, T, xp=np):
    """The masks of config's model (drop probability config.dropout) for the B rows of length T of
    `key`, drawn on the host and copied to xp's device as one array."""
    shapes = mask_shapes(T, config.d_model, config.n_heads, config.n_layers)
    sizes = [math.prod(s) for s in shapes]
    starts = np.cumsum([0] + sizes).tolist()  # where each mask's numbers start in a row's draw
    threshold = drop_threshold(config.dropout)
    keep = np.empty(B * starts[-1], bool)  # mask after mask, each one's (B, ...) contiguous
    for r in range(B):
        numbers = row_numbers([key.seed, DROPOUT_STREAM, key.step, key.row + r], starts[-1])  # all of row r's masks
        for start, n in zip(starts, sizes):
            first = B * start + r * n  # row r of this mask
            np.greater_equal(numbers[start : start + n], threshold, out=keep[first : first + n])
    keep = to_device(keep, xp)  # one copy to the GPU; nothing on the CPU
    scale = LEVELS / (LEVELS - threshold)
    masks = [DropoutMask(keep[B * start : B * (start + n)].reshape(B, *shape), scale)
             for start, n, shape in zip(starts, sizes, shapes)]
    return ModelMasks(masks[0], [BlockMasks(*masks[i : i + 3]) for i in range(1, len(masks), 3)])
