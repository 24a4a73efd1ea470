"""[math] Token embedding plus positional encoding: the model's first layer.

Shapes: B batch, T sequence length, C model width (d_model), V vocabulary size,
T_max the longest sequence the positional table covers (max_seq_len).

    x[b, t] = wte[idx[b, t]] + pos[start + t]

`pos` is either the learned table `wpe` (T_max, C), as in GPT-2, or a fixed sinusoidal
table of the same shape (Vaswani et al. 2017) that has no parameters and gets no gradient,
or none at all (the Llama block: its attention turns q and k by their positions, llama.py).

The sinusoids are scaled to the size of the token embeddings (initialised with std 0.02):
at their natural amplitude of 1 the position signal is 50 times stronger than the token
identity, and a model trained on real text stays stuck at the unigram loss. (Vaswani et
al. instead multiply the embeddings by sqrt(C); with GPT-2's initialisation that still
leaves the positions several times stronger.)
"""
import numpy as np

from device import scatter_add

SINUSOID_SCALE = 0.02  # the token embeddings' initial std


def sinusoidal_positions(T_max, C, dtype=np.float32, scale=SINUSOID_SCALE):
    """The fixed (T_max, C) table: scale * sin on even channels, scale * cos on odd ones,
    wavelengths 2pi .. 10000 * 2pi."""
    pos = np.arange(T_max, dtype=np.float64)[:, None]  # (T_max, 1)
    freq = 10000.0 ** (-np.arange(0, C, 2, dtype=np.float64) / C)  # (ceil(C/2),)
    angle = pos * freq  # (T_max, ceil(C/2))
    table = np.empty((T_max, C))
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : C // 2])
    return (scale * table).astype(dtype)


def embedding_forward(idx, wte, pos_table, start=0):
    """idx (B, T) int, wte (V, C), pos_table (T_max, C) or None (no position table) -> x (B, T, C).

    `start` is the position of idx[:, 0]; it is non-zero only when decoding with a key/value cache.
    """
    if pos_table is None:
        return wte[idx]  # (B, T, C), a new array (the blocks write their residual sums over their own outputs)
    T = idx.shape[1]
    return wte[idx] + pos_table[start : start + T]  # (B, T, C)


def embedding_backward(dx, idx, dwte, dwpe=None):
    """Accumulate the gradient of x into the rows of dwte that were looked up (and into dwpe).

    Forward was x[b, t] = wte[idx[b, t]] + pos[t], so every use of a token adds dx[b, t] to its row.
    """
    C = dx.shape[-1]
    scatter_add(dwte, idx.ravel(), dx.reshape(-1, C))  # (B*T, C) scattered into (V, C), repeats counted
    if dwpe is not None:
        T = idx.shape[1]
        dwpe[:T] += dx.sum(axis=0)  # (B, T, C) -> (T, C)
