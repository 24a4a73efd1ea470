"""Looking inside a model: its attention weights and its residual stream after every block.

Shapes: T tokens, V vocab_size, C d_model, L n_layers, H query heads, D = L + 1 depths (after the
embeddings, then after each block).

    views = look_inside(model, ids)          # ids: a list of T token ids
    views.logits      (T, V)    the model's own output, as LanguageModel.forward gives it
    views.attention   (L, H, T, T) each head's causal attention weights, query head order
    views.residual    (D, T, C) the residual stream after the embeddings and after each block
    lens = logit_lens(model, views.residual)   # (D, T, V): each depth through ln_f and the output layer

This is the one place explore.py reaches into the model's internals, so that it follows the model's
code when that changes. It runs the model's own embedding, block and head functions one block at a time,
as LanguageModel._trunk_forward does, keeping what each block's cache holds (the attention weights,
`cache.attn.att`) and the residual stream between blocks; nothing in the layers changes, and training
never runs this. A test checks that the logits here equal LanguageModel.forward's, so a change to the
model that this copy of its loop misses fails there.

Internal names used: LanguageModel.params (.layers), .positions(), .head_weight(), .config (n_heads,
n_layers), .block (its row of language_model.BLOCKS: forward, final_norm_forward) with the block caches'
.attn.att (GPT-2's (B, H, T, S); Llama's (B, Hkv, G*T, S), query head j = key/value head j // G, member
j % G); embeddings.embedding_forward; lm_head.lm_head_forward.
"""
from typing import NamedTuple

import numpy as np

from device import to_device, to_host
from embeddings import embedding_forward
from lm_head import lm_head_forward


class Views(NamedTuple):
    logits: np.ndarray  # (T, V) in the model's dtype, on the host
    attention: np.ndarray  # (L, H, T, T) rows sum to 1, zero above the diagonal
    residual: np.ndarray  # (L + 1, T, C) in the model's dtype, on the host


def kv_head_of(config):
    """For each query head, the key/value head it reads (grouped-query attention: G query heads share one)."""
    n_kv = config.n_kv_heads or config.n_heads
    group = config.n_heads // n_kv
    return [j // group for j in range(config.n_heads)]


def run_block(model, i, x):
    """Block i of the model on x (1, T, C), no key/value cache, no dropout: (output, attention (H, T, T))."""
    cfg = model.config
    out, cache = model.block.forward(x, model.params.layers[i], cfg)
    att = cache.attn.att  # GPT-2: (1, H, T, T); Llama: (1, Hkv, G*T, T), the G heads of a kv head stacked
    T = x.shape[1]
    return out, att.reshape(cfg.n_heads, T, T)  # (B=1, Hkv, G, T, T) in query head order -> (H, T, T)


def look_inside(model, ids):
    """Run the model over ids (a list of T token ids, T <= max_seq_len) and keep what it computes
    on the way: logits, every head's attention weights and the residual stream (see Views)."""
    idx = np.array([ids], dtype=np.int64)  # (1, T)
    model.check_tokens(idx)
    p = model.params
    x = embedding_forward(to_device(idx, model.xp), p["wte"], model.positions(), 0)  # (1, T, C)
    residual, attention = [to_host(x[0]).copy()], []
    for i in range(model.config.n_layers):
        x, att = run_block(model, i, x)
        attention.append(to_host(att))
        residual.append(to_host(x[0]).copy())
    logits = head(model, x)[0]  # (T, V)
    return Views(logits, np.stack(attention), np.stack(residual))


def head(model, x):
    """The final norm and the output layer: (..., T, C) -> (..., T, V) logits, on the host."""
    x = to_device(np.asarray(x), model.xp)
    h, _ = model.block.final_norm_forward(x, model.params, model.config)
    return to_host(lm_head_forward(h, model.head_weight(model.params), model.config.logit_softcap))


def logit_lens(model, residual):
    """(..., T, C) residual stream (one depth or several) -> (..., T, V) logits: what the model would predict
    if the stream went straight to the final norm and the output layer there. The last depth's are the model's
    own output."""
    return head(model, residual)
