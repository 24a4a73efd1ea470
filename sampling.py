"""[generation] Sampling the next token from the model's logits: temperature, top-k, top-p, then one draw.

    from sampling import sample_next
    token = sample_next(logits, rng, temperature=0.8, top_k=50)     # logits (V,), rng a NumPy Generator

In this order (as Hugging Face's samplers): logits / temperature, then top-k, then top-p on what is
left, then one draw. Temperature 0 or top_k 1 is greedy (argmax, ties to the lowest id). Tokens tied
with the k-th largest logit are all kept, and so are tokens tied with the last one of the nucleus,
so the kept set does not depend on how a sort breaks ties. Everything runs on the host, in float64,
on the kept candidates only: with top_k the softmax covers k values, not the vocabulary.
"""
import numpy as np


def check_sampling(temperature=1.0, top_k=None, top_p=None):
    """ValueError for sampling settings that mean nothing."""
    if not temperature >= 0:  # also catches NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (1 = greedy), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def is_greedy(temperature, top_k):
    return temperature == 0 or top_k == 1


def nucleus_threshold(probs, top_p):
    """The probability of the least likely token of the nucleus: the smallest set of most
    likely tokens whose total reaches top_p (always at least the most likely token).

    Only the largest m probabilities are sorted, m growing until they hold top_p of the mass,
    so with a 50K vocabulary this is a partial sort of a few hundred values, not a full one.
    """
    V = probs.size
    m = min(V, 256)
    while True:
        top = np.sort(np.partition(probs, V - m)[V - m:] if m < V else probs)[::-1]  # (m,) descending
        cum = np.cumsum(top)
        if cum[-1] >= top_p or m == V:
            n = int(np.searchsorted(cum, top_p, side="left")) + 1  # smallest n with cum[n-1] >= top_p
            return top[min(n, m) - 1]  # n > m only by rounding when top_p = 1: keep everything
        m = min(V, 8 * m)


def kept_tokens(logits, temperature=1.0, top_k=None, top_p=None):
    """The tokens the next one is drawn from and their probabilities: (ids ascending, probs summing to 1).

    Works on the kept candidates only, so with top_k the softmax covers k values, not the vocabulary.
    """
    check_sampling(temperature, top_k, top_p)
    z = np.asarray(logits)
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"logits must be a non-empty vector, got shape {z.shape}")
    if np.isnan(z).any() or np.isposinf(z).any():
        raise ValueError("logits contain NaN or +inf: the model's weights are broken")
    V = z.size
    if is_greedy(temperature, top_k):
        return np.array([np.argmax(z)]), np.ones(1)  # ties: the lowest id
    if top_k is not None and top_k < V:
        kth = np.partition(z, V - top_k)[V - top_k]  # the k-th largest logit
        ids = np.flatnonzero(z >= kth)  # ties with it are kept too
    else:
        ids = np.flatnonzero(z > -np.inf)
        if ids.size == 0:
            raise ValueError("every logit is -inf: no token can be sampled")
    zk = z[ids].astype(np.float64)
    with np.errstate(over="ignore"):  # shift first, so a tiny temperature gives -inf, never inf - inf
        probs = np.exp((zk - zk.max()) / temperature)
    probs /= probs.sum()
    if top_p is not None and top_p < 1:
        keep = probs >= nucleus_threshold(probs, top_p)
        ids, probs = ids[keep], probs[keep]
        probs /= probs.sum()
    return ids, probs


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution the next token is drawn from, (V,) float64: zero outside the kept set, sums to 1."""
    ids, p = kept_tokens(logits, temperature, top_k, top_p)
    probs = np.zeros(np.asarray(logits).size)
    probs[ids] = p
    return probs


def draw(probs, rng):
    """An index drawn from probs (n,); entries of probability 0 are never drawn."""
    cdf = np.cumsum(probs)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    i = min(i, probs.size - 1)  # u * total can round up to total
    while probs[i] == 0:  # only after that rounding: step back to the last token that can be drawn
        i -= 1
    return i


def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """The next token id: argmax when greedy, else one draw from the kept tokens."""
    ids, probs = kept_tokens(logits, temperature, top_k, top_p)
    return int(ids[0]) if ids.size == 1 else int(ids[draw(probs, rng)])
