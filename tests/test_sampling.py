"""Sampling: temperature, top-k, top-p and greedy, against a plain full-sort reference."""
import numpy as np
import pytest

from sampling import draw, next_token_probs, nucleus_threshold, sample_next


def reference_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """The obvious version: full sort, keep a prefix, renormalise (inputs without ties)."""
    z = np.asarray(logits, np.float64)
    if temperature == 0 or top_k == 1:
        p = np.zeros(z.size)
        p[np.argmax(z)] = 1.0
        return p
    p = np.exp(z / temperature - np.max(z / temperature))
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(z.size, bool)
    keep[order[: top_k or z.size]] = True
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    if top_p is not None:
        order = np.argsort(-p, kind="stable")
        total, nucleus = 0.0, []
        for i in order:  # the smallest prefix whose mass reaches top_p
            nucleus.append(i)
            total += p[i]
            if total >= top_p:
                break
        keep = np.zeros(z.size, bool)
        keep[nucleus] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.9),
    dict(temperature=1.0, top_k=50, top_p=0.5),
    dict(temperature=0.1, top_k=1),
    dict(temperature=0.0),
    dict(temperature=2.0, top_p=0.05),  # the most likely token alone exceeds p
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_probs_match_the_full_sort_reference(setting):
    rng = np.random.default_rng(0)
    for V in (7, 300, 5000):  # 5000 > the 256 values nucleus_threshold sorts first: it must widen
        logits = rng.normal(0, 3, V)
        np.testing.assert_allclose(next_token_probs(logits, **setting), reference_probs(logits, **setting),
                                   rtol=1e-12, atol=1e-15)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert np.count_nonzero(next_token_probs(logits, top_p=0.49)) == 1   # 0.5 reaches 0.49
    assert np.count_nonzero(next_token_probs(logits, top_p=0.51)) == 2
    assert np.count_nonzero(next_token_probs(logits, top_p=0.79)) == 2   # 0.5 + 0.3 reaches 0.79
    assert np.count_nonzero(next_token_probs(logits, top_p=0.81)) == 3
    assert np.count_nonzero(next_token_probs(logits, top_p=1.0)) == 4
    # the most likely token is kept even when it alone is more than p
    np.testing.assert_array_equal(next_token_probs(logits, top_p=0.01), [1, 0, 0, 0])
    # a tiny top_p with a flat distribution still keeps a token
    assert np.count_nonzero(next_token_probs(np.zeros(100), top_p=1e-9)) >= 1


def test_nucleus_threshold_widens_past_the_first_partial_sort():
    p = np.full(10_000, 1e-4)  # uniform: p = 0.5 needs 5000 tokens, far more than the first 256
    p[0] = 0  # not uniform everywhere: one token below the rest
    p /= p.sum()
    thr = nucleus_threshold(p, 0.5)
    assert thr == p[1]
    assert 5000 <= np.count_nonzero(next_token_probs(np.log(p + 1e-300), top_p=0.5)) <= 9999


def test_top_k_keeps_exactly_k_without_ties_and_all_ties_with_them():
    logits = np.array([3.0, 1.0, 2.0, 5.0, 4.0])
    probs = next_token_probs(logits, top_k=2)
    assert set(np.flatnonzero(probs)) == {3, 4}
    probs = next_token_probs(np.array([1.0, 2.0, 2.0, 0.0]), top_k=2)
    assert set(np.flatnonzero(probs)) == {1, 2}
    probs = next_token_probs(np.array([2.0, 2.0, 2.0, 0.0]), top_k=2)  # three tied for 2nd: all kept
    assert set(np.flatnonzero(probs)) == {0, 1, 2}
    assert np.count_nonzero(next_token_probs(logits, top_k=10**6)) == 5  # k > V: everything


def test_greedy_is_argmax_and_ignores_the_rng():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000)
    best = int(np.argmax(logits))
    for kw in (dict(temperature=0), dict(temperature=0.1, top_k=1), dict(temperature=5.0, top_k=1, top_p=0.5)):
        assert all(sample_next(logits, rng, **kw) == best for _ in range(20))
    # very low temperature is greedy in effect, and must not overflow
    assert sample_next(logits, rng, temperature=1e-6) == best
    assert sample_next(np.array([0.0, 1e30, -1e30]), rng, temperature=1e-30) == 1
    assert sample_next(np.array([0.0, 1e4, 2.0]), rng, temperature=1e-300, top_p=0.9) == 1


def test_masked_logits_are_never_drawn_and_bad_logits_are_refused():
    rng = np.random.default_rng(1)
    logits = np.array([-np.inf, 0.0, -np.inf, 0.0])
    assert {sample_next(logits, rng) for _ in range(200)} == {1, 3}
    with pytest.raises(ValueError, match="NaN"):
        sample_next(np.array([0.0, np.nan]), rng)


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.get("temperature") and s.get("top_k") != 1])
def test_no_token_outside_the_kept_set_is_ever_drawn(setting):
    rng = np.random.default_rng(2)
    for _ in range(20):
        logits = rng.normal(0, 2, 64)
        kept = set(np.flatnonzero(reference_probs(logits, **setting)))
        drawn = {sample_next(logits, rng, **setting) for _ in range(100)}
        assert drawn <= kept


def test_draw_never_returns_a_zero_probability_token_even_at_the_edges():
    probs = np.array([0.0, 0.5, 0.0, 0.5, 0.0])

    class EdgeRng:  # the two ends of [0, 1), and exactly 1 (as if u * total had rounded up)
        def __init__(self, values):
            self.values = list(values)

        def random(self):
            return self.values.pop(0)

    edges = EdgeRng([0.0, np.nextafter(1.0, 0), 0.5, np.nextafter(0.5, 0), 1.0])
    assert [draw(probs, edges) for _ in range(5)] == [1, 3, 3, 1, 3]
    # kept tokens whose probability underflowed to 0 (a very low temperature) are not drawn either
    rng = np.random.default_rng(0)
    assert {sample_next(np.array([0.0, 5.0, 4.0]), rng, temperature=1e-3, top_k=2) for _ in range(50)} == {1}


def test_fixed_seed_reproduces_the_draws():
    logits = np.random.default_rng(3).normal(0, 2, 1000)
    draws = [[sample_next(logits, rng, temperature=0.9, top_k=40, top_p=0.95) for _ in range(50)]
             for rng in (np.random.default_rng(7), np.random.default_rng(7), np.random.default_rng(8))]
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]


@pytest.mark.parametrize("setting", [dict(temperature=1.0), dict(temperature=0.7, top_k=6),
                                     dict(temperature=1.5, top_p=0.8), dict(temperature=1.2, top_k=8, top_p=0.9)])
def test_draw_frequencies_match_the_renormalised_distribution(setting):
    """Chi-square goodness of fit. The seed is fixed, so this cannot flake; the bound (mean + 8
    standard deviations of the chi-square distribution) is one a correct sampler passes for
    essentially any seed, while a sampler that skips renormalising or the cut fails it by far."""
    logits = np.random.default_rng(4).normal(0, 1.5, 12)
    expected_p = reference_probs(logits, **setting)
    kept = np.flatnonzero(expected_p)
    n = 10_000
    rng = np.random.default_rng(5)
    counts = np.bincount([sample_next(logits, rng, **setting) for _ in range(n)], minlength=logits.size)
    assert counts.sum() == counts[kept].sum()  # nothing outside the kept set

    def chi2(p):
        return float(np.sum((counts[kept] - n * p[kept]) ** 2 / (n * p[kept])))

    df = kept.size - 1
    assert chi2(expected_p) < df + 8 * np.sqrt(2 * df)
    # the test has power: the kept tokens at 1.5x the temperature fail it by far
    wrong = np.where(expected_p > 0, np.exp(logits / (1.5 * setting["temperature"])), 0.0)
    assert chi2(wrong / wrong.sum()) > 5 * (df + 8 * np.sqrt(2 * df))


@pytest.mark.parametrize("kw, match", [(dict(temperature=-0.1), "temperature"), (dict(temperature=np.nan), "temperature"),
                                       (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
                                       (dict(top_p=1.5), "top_p"), (dict(top_p=-1), "top_p")])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        next_token_probs(np.zeros(5), **kw)
    with pytest.raises(ValueError, match=match):
        sample_next(np.zeros(5), np.random.default_rng(0), **kw)
