"""[generation] Decoding: the next token's logits for a growing text, one token's work at a time (a key/value cache).

    decoder = Decoder(model)
    logits = decoder.feed(prompt_ids)           # (V,) on the host: the prefill
    logits = decoder.feed([token])              # each next token: one position's work
    for token in generate(model, prompt_ids, 100, rng, temperature=0.8, top_k=50): ...

The prompt is run through the model once (prefill), filling a per-layer key/value cache; each new
token then costs one position's work: its query attends to the cached keys and values. Positions
are absolute (position 0 is the first token of the window), so once the context is longer than the
model's max_seq_len, sliding the window by one token moves every token to a new position and
invalidates every cached key and value. We then rebuild the cache from the last max_seq_len tokens
(one prefill) - exactly what an uncached forward over that window computes, so the model always sees
the last max_seq_len tokens, as in nanoGPT. (Once the window slides, every step is such a prefill;
keeping a shorter window after a slide would be cheaper but would change what the model sees.)

On the GPU the weights and the key/value cache live there; each token copies its row of logits
(V,) back to the host, where sampling happens (sampling.py).
"""
import numpy as np

from device import to_host
from sampling import check_sampling, sample_next


class Decoder:
    """The logits of the next token for a growing sequence, fed to the model incrementally.

    With use_cache (the default) a token costs one position's work until the context fills
    the model's max_seq_len; then the window slides and the cache is rebuilt from the last
    max_seq_len tokens (see the module docstring). Without the cache every call runs the
    model over the whole window: the reference the cached path must match.
    """

    def __init__(self, model, use_cache=True):
        self.model = model
        self.use_cache = use_cache
        self.max_len = model.config.max_seq_len
        self.tokens = []  # the last max_len tokens fed: what the model sees
        self.cache = None
        self.rebuilds = 0  # how many times the cache was (re)filled from scratch

    def feed(self, ids):
        """Append token ids (at least one) to the context; returns the next token's logits (V,),
        a NumPy array (on the GPU, the one row copied to the host)."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("feed needs at least one token id")
        self.tokens.extend(ids)
        del self.tokens[:-self.max_len]  # memory bounded however long the text grows
        window = np.array([self.tokens])  # (1, T)
        if not self.use_cache:
            return to_host(self.model.forward(window, last_only=True)[0, -1])
        if self.cache is not None and self.cache.length + len(ids) <= self.max_len:
            # only the new positions
            return to_host(self.model.forward(np.array([ids]), kv_cache=self.cache, last_only=True)[0, -1])
        # first call, or the window slid: every position changed, so start the cache afresh
        self.cache = self.model.new_kv_cache(1)
        self.rebuilds += 1
        return to_host(self.model.forward(window, kv_cache=self.cache, last_only=True)[0, -1])


def generate(model, prompt_ids, max_new_tokens, rng=None, temperature=1.0, top_k=None, top_p=None,
             eot_id=None, use_cache=True, n_valid=None):
    """Yield up to max_new_tokens new token ids after prompt_ids (non-empty); stops before eot_id.

    n_valid: sample only ids below it (a model vocabulary padded beyond its tokenizer's).
    """
    check_sampling(temperature, top_k, top_p)
    if rng is None:
        rng = np.random.default_rng()
    decoder = Decoder(model, use_cache)
    logits = decoder.feed(prompt_ids)
    for i in range(max_new_tokens):
        token = sample_next(logits[:n_valid], rng, temperature, top_k, top_p)
        if token == eot_id:
            return
        yield token
        if i + 1 < max_new_tokens:
            logits = decoder.feed([token])
