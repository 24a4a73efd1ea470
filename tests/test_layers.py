"""Every layer's backward pass against float64 central finite differences (B=2, T=3, C=4-ish)."""
import numpy as np
import pytest

from embeddings import embedding_backward, embedding_forward, sinusoidal_positions
from gradcheck import array_path  # noqa: F401  (autouse: every test here runs on both array paths)
from gradcheck import causal_blocks  # noqa: F401  (a fixture: attention's products whole and by blocks)
from gradcheck import block_masks, check_layer, fixed_mask, numerical_gradient, rel_error, zeros_like
from config import ModelConfig, gpt2_block_shapes
from dropout import dropout_backward, dropout_forward, residual_add_inplace
from language_model import BLOCKS
from lm_head import lm_head_forward, lm_head_loss, softcap_backward_inplace, softcap_inplace
from loss import IGNORE_INDEX, cross_entropy_reference, softmax_cross_entropy_inplace
from transformer import (attention_backward, attention_forward, block_backward, block_forward,
                         causal_softmax_inplace, layernorm_backward, layernorm_forward, mlp_backward, mlp_forward,
                         qk_rms_norm_backward_inplace, qk_rms_norm_inplace)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_dropout(rng):
    p = {"x": rng.standard_normal((2, 3, 4))}
    mask = fixed_mask(rng, (2, 3, 4))
    check_layer(lambda: (dropout_forward(p["x"], mask), mask), lambda dout, m: {"x": dropout_backward(dout, m)},
                p, ["x"], rng)
    out = dropout_forward(p["x"], mask)
    np.testing.assert_array_equal(out, np.where(mask.keep, p["x"] * mask.scale, 0))
    x = p["x"].copy()
    assert dropout_forward(x, mask, out=x) is x
    np.testing.assert_array_equal(x, out)  # in place, the same numbers


@pytest.mark.parametrize("F", [4, 70000])  # a row of several blocks' rows, and a row longer than a block
def test_residual_add_with_dropout_in_blocks(rng, F):
    branch, x = rng.standard_normal((3, 2, F)), rng.standard_normal((3, 2, F))
    mask = fixed_mask(rng, branch.shape)
    expected = x + np.where(mask.keep, branch * mask.scale, 0)
    residual_add_inplace(branch, x, mask)
    np.testing.assert_allclose(branch, expected, rtol=1e-15)


def test_layernorm(rng):
    p = {"x": rng.standard_normal((2, 3, 4)), "w": rng.standard_normal(4), "b": rng.standard_normal(4)}

    def backward(dout, cache):
        g = zeros_like(p, ["w", "b"])
        g["x"] = layernorm_backward(dout, cache, g["w"], g["b"])
        return g

    check_layer(lambda: layernorm_forward(p["x"], p["w"], p["b"]), backward, p, ["x", "w", "b"], rng)


def test_layernorm_output_is_normalised(rng):
    x = rng.standard_normal((5, 16)) * 3 + 7
    out, _ = layernorm_forward(x, np.ones(16), np.zeros(16))
    np.testing.assert_allclose(out.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(-1), 1 / (1 + 1e-5 / x.var(-1)), rtol=1e-10)  # eps = 1e-5


def attention_params(rng, C=8):
    return {"x": rng.standard_normal((2, 3, C)),
            "w_attn": rng.standard_normal((C, 3 * C)) * 0.5, "b_attn": rng.standard_normal(3 * C) * 0.1,
            "w_proj": rng.standard_normal((C, C)) * 0.5, "b_proj": rng.standard_normal(C) * 0.1}


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("dropout", [False, True])  # True: a fixed dropout mask on the attention weights
@pytest.mark.parametrize("scale", [1, 8])  # 8: scores in the hundreds, past what exp takes unshifted
def test_attention(rng, scale, dropout, qk_norm, causal_blocks):
    p = attention_params(rng)
    p["w_attn"] *= scale
    mask = fixed_mask(rng, (2, 2, 3, 3)) if dropout else None

    def forward():
        return attention_forward(p["x"], p["w_attn"], p["b_attn"], p["w_proj"], p["b_proj"], n_heads=2, att_mask=mask,
                                 qk_norm=qk_norm)

    def backward(dout, cache):
        g = zeros_like(p, ["w_attn", "b_attn", "w_proj", "b_proj"])
        g["x"] = attention_backward(dout, cache, p["w_attn"], p["w_proj"],
                                    g["w_attn"], g["b_attn"], g["w_proj"], g["b_proj"])
        return g

    check_layer(forward, backward, p, list(p), rng)


@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_qk_rms_norm(rng, eps):
    """The pair on the q and k heads of a (B, T, 3, H, hs) qkv, a strided view as attention gives it: against
    finite differences of the whole qkv, against the plain formula, and the v heads left as they were."""
    p = {"qkv": rng.standard_normal((2, 3, 3, 2, 4)) * 2}

    def forward():
        qkv = p["qkv"].copy()
        qk_heads = qkv[:, :, :2]  # (B, T, 2, H, hs) a view
        rstd = qk_rms_norm_inplace(qk_heads, eps)
        return qkv, (qk_heads, rstd)

    def backward(dout, cache):
        qk_heads, rstd = cache
        dqkv = dout.copy()
        qk_rms_norm_backward_inplace(dqkv[:, :, :2], qk_heads, rstd)
        return {"qkv": dqkv}

    check_layer(forward, backward, p, ["qkv"], rng)
    out, _ = forward()
    qk = p["qkv"][:, :, :2]
    np.testing.assert_allclose(out[:, :, :2], qk / np.sqrt(np.mean(qk * qk, axis=-1, keepdims=True) + eps),
                               rtol=1e-13)
    np.testing.assert_array_equal(out[:, :, 2], p["qkv"][:, :, 2])


def attention_reference(x, w_attn, b_attn, w_proj, b_proj, H, qk_norm_eps=None):
    """The plain formula, per head: softmax(q k^T / sqrt(hs) + causal mask) v, with QK-norm (qk_norm_eps given)
    each head's q and k first divided by their rms."""
    B, T, C = x.shape
    hs = C // H
    q, k, v = (a.reshape(B, T, H, hs).transpose(0, 2, 1, 3) for a in np.split(x @ w_attn + b_attn, 3, axis=-1))
    if qk_norm_eps is not None:
        q = q / np.sqrt(np.mean(q * q, axis=-1, keepdims=True) + qk_norm_eps)
        k = k / np.sqrt(np.mean(k * k, axis=-1, keepdims=True) + qk_norm_eps)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs) + np.triu(np.full((T, T), -np.inf), 1)
    att = np.exp(scores - scores.max(-1, keepdims=True))
    y = (att / att.sum(-1, keepdims=True)) @ v  # (B, H, T, hs)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C) @ w_proj + b_proj


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_matches_the_plain_formula(rng, qk_norm, causal_blocks):
    p = attention_params(rng)
    p["x"] = rng.standard_normal((2, 5, 8))
    args = (p["x"], p["w_attn"], p["b_attn"], p["w_proj"], p["b_proj"])
    out, _ = attention_forward(*args, n_heads=2, qk_norm=qk_norm, eps=1e-5)
    np.testing.assert_allclose(out, attention_reference(*args, H=2, qk_norm_eps=1e-5 if qk_norm else None),
                               rtol=1e-12, atol=1e-13)


def test_qk_norm_makes_attention_blind_to_the_size_of_q_and_k(rng):
    """Queries and keys 10 times larger: with QK-norm the same output (up to eps), without it another."""
    p = attention_params(rng)
    larger_w, larger_b = p["w_attn"].copy(), p["b_attn"].copy()
    larger_w[:, :16] *= 10  # C = 8: columns [q | k | v], 8 each
    larger_b[:16] *= 10

    def out(w_attn, b_attn, qk_norm):
        return attention_forward(p["x"], w_attn, b_attn, p["w_proj"], p["b_proj"], n_heads=2, qk_norm=qk_norm,
                                 eps=1e-12)[0]

    np.testing.assert_allclose(out(larger_w, larger_b, True), out(p["w_attn"], p["b_attn"], True), rtol=1e-9)
    assert not np.allclose(out(larger_w, larger_b, False), out(p["w_attn"], p["b_attn"], False), rtol=1e-3)


@pytest.mark.parametrize("offset", [0, 100, -100, -1e4])
@pytest.mark.parametrize("T, S", [(5, 5), (2, 6)])  # queries T, keys S: with a key/value cache S > T
def test_causal_softmax_matches_the_plain_formula(rng, offset, T, S):
    scores = rng.standard_normal((2, 3, T, S)) * 4 + offset
    keep = np.tril(np.ones((T, S), bool), k=S - T)  # query t sees keys up to its own, S - T + t
    z = np.where(keep, scores, -np.inf)
    expected = np.exp(z - z.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    att = scores.copy()
    causal_softmax_inplace(att)
    np.testing.assert_allclose(att, expected, rtol=1e-12, atol=1e-300)
    assert np.all(att[..., ~keep] == 0)


def test_attention_is_causal(rng):
    """No gradient flows from a position to an earlier one, and the future never changes the past."""
    p = attention_params(rng)
    p["x"] = rng.standard_normal((2, 5, 8))
    args = (p["w_attn"], p["b_attn"], p["w_proj"], p["b_proj"])
    out, cache = attention_forward(p["x"], *args, n_heads=2)
    for t in range(5):
        dout = np.zeros_like(out)
        dout[:, t] = rng.standard_normal((2, 8))
        g = zeros_like(p, ["w_attn", "b_attn", "w_proj", "b_proj"])
        dx = attention_backward(dout, cache, p["w_attn"], p["w_proj"], g["w_attn"], g["b_attn"], g["w_proj"], g["b_proj"])
        assert np.all(dx[:, t + 1:] == 0), f"output {t} has gradient from a later input"
        assert np.all(np.abs(dx[:, : t + 1]).sum(-1) > 0), f"output {t} ignores an earlier input"
    x2 = p["x"].copy()
    x2[:, 3:] = rng.standard_normal((2, 2, 8))  # change the future
    out2, _ = attention_forward(x2, *args, n_heads=2)
    np.testing.assert_array_equal(out2[:, :3], out[:, :3])
    assert not np.allclose(out2[:, 3:], out[:, 3:])


@pytest.mark.parametrize("activation", ["gelu", "relu", "relu2"])
def test_mlp(rng, activation):
    C, F = 4, 6
    p = {"x": rng.standard_normal((2, 3, C)),
         "w_fc": rng.standard_normal((C, F)), "b_fc": rng.standard_normal(F),
         "w_proj": rng.standard_normal((F, C)), "b_proj": rng.standard_normal(C)}

    def forward():
        return mlp_forward(p["x"], p["w_fc"], p["b_fc"], p["w_proj"], p["b_proj"], activation)

    def backward(dout, cache):
        g = zeros_like(p, ["w_fc", "b_fc", "w_proj", "b_proj"])
        g["x"] = mlp_backward(dout, cache, p["w_fc"], p["w_proj"], g["w_fc"], g["b_fc"], g["w_proj"], g["b_proj"])
        return g

    check_layer(forward, backward, p, list(p), rng)


def test_gelu_is_gpt2s_tanh_form():
    from transformer import gelu_forward
    x = np.linspace(-4, 4, 81)
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(gelu_forward(x)[0], expected, rtol=1e-14, atol=1e-15)
    out, _ = gelu_forward(np.array([-1e4, 1e4], np.float32))  # exp overflows: the limit 0 comes out, no NaN
    np.testing.assert_array_equal(out, [0, 1e4])


@pytest.mark.parametrize("F", [130, 70000])  # rows per block: 504 (the last one partial), and 1 (a row > a block)
def test_gelu_in_blocks_matches_the_whole_array_formulas(rng, F):
    from transformer import gelu_backward_inplace, gelu_forward
    x = rng.standard_normal((3, 700 if F == 130 else 2, F)) * 3
    bias = rng.standard_normal(F)
    z = x + bias
    u = np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)
    du = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * z ** 2)
    dout = rng.standard_normal(x.shape)
    out, s = gelu_forward(x, bias=bias)
    np.testing.assert_allclose(x, z, rtol=1e-15)  # the bias was added in place
    np.testing.assert_allclose(out, 0.5 * z * (1 + np.tanh(u)), rtol=1e-12, atol=1e-15)
    expected = dout * (0.5 * (1 + np.tanh(u)) + 0.5 * z * (1 - np.tanh(u) ** 2) * du)
    gelu_backward_inplace(dout, x, s)
    np.testing.assert_allclose(dout, expected, rtol=1e-10, atol=1e-13)


def block_params(rng, C=8, F=12):
    return {k: rng.standard_normal(s) * 0.5 for k, s in gpt2_block_shapes(C, F).items()}


@pytest.mark.parametrize("dropout", [False, True])  # True: fixed masks on the attention weights and both branches
@pytest.mark.parametrize("qk_norm", [False, True])
def test_block(rng, dropout, qk_norm):
    p = block_params(rng)
    p["x"] = rng.standard_normal((2, 3, 8))
    masks = block_masks(rng) if dropout else None

    def backward(dout, cache):
        g = zeros_like(p, [k for k in p if k != "x"])
        g["x"] = block_backward(dout, cache, p, g)
        return g

    cfg = ModelConfig(d_model=8, n_heads=2, qk_norm=qk_norm)
    check_layer(lambda: block_forward(p["x"], p, cfg, dropout=masks), backward, p, list(p), rng)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_final_norm(rng, arch):
    """Each block's ln_f pair in the model's table: GPT-2's layer norm with its bias, Llama's RMSNorm."""
    block, cfg = BLOCKS[arch], ModelConfig(d_model=4, n_heads=2, arch=arch)
    names = ["ln_f.weight", "ln_f.bias"] if arch == "gpt2" else ["ln_f.weight"]
    p = {"x": rng.standard_normal((2, 3, 4)), **{name: rng.standard_normal(4) for name in names}}

    def backward(dout, cache):
        g = zeros_like(p, names)
        g["x"] = block.final_norm_backward(dout, cache, g)
        return g

    check_layer(lambda: block.final_norm_forward(p["x"], p, cfg), backward, p, list(p), rng)


def test_embedding_learned_positions(rng):
    idx = np.array([[1, 4, 1], [0, 4, 2]])  # token 1 and 4 used twice: their gradients must add up
    p = {"wte": rng.standard_normal((5, 4)), "wpe": rng.standard_normal((6, 4))}

    def backward(dout, cache):
        g = zeros_like(p, ["wte", "wpe"])
        embedding_backward(dout, idx, g["wte"], g["wpe"])
        return g

    check_layer(lambda: (embedding_forward(idx, p["wte"], p["wpe"]), None), backward, p, ["wte", "wpe"], rng)


def test_sinusoidal_table_matches_the_formula():
    table = sinusoidal_positions(7, 6, np.float64, scale=1.0)
    for pos in range(7):
        for i in range(3):
            assert table[pos, 2 * i] == pytest.approx(np.sin(pos / 10000 ** (2 * i / 6)), abs=1e-15)
            assert table[pos, 2 * i + 1] == pytest.approx(np.cos(pos / 10000 ** (2 * i / 6)), abs=1e-15)
    assert sinusoidal_positions(4, 5).shape == (4, 5)  # odd widths work too
    np.testing.assert_allclose(sinusoidal_positions(7, 6, np.float64), 0.02 * table)  # the model's scale


def test_fused_cross_entropy_matches_reference(rng):
    logits = rng.standard_normal((6, 9)) * 3
    targets = np.array([0, 8, IGNORE_INDEX, 3, 3, 5])
    loss, acc, dlogits = cross_entropy_reference(logits, targets)
    buf = logits.copy()
    s, n_correct, row_scale = softmax_cross_entropy_inplace(buf, targets, grad_scale=1 / 5)
    assert s / 5 == pytest.approx(loss, rel=1e-12)
    assert n_correct / 5 == pytest.approx(acc)
    np.testing.assert_allclose(row_scale[:, None] * buf, dlogits, rtol=1e-12, atol=1e-15)
    assert row_scale[2] == 0  # an ignored row gets no gradient


@pytest.mark.parametrize("offsets", [(0, 0), (500, 500), (-500, -500), (-500, 70), (0, 1e4)])
def test_fused_cross_entropy_survives_logits_exp_cannot_take_as_they_are(rng, offsets):
    """Rows whose largest logit would overflow exp (or leave only underflowing terms) get shifted;
    here in blocks of several rows (30000 logits a row), the two halves offset differently."""
    logits = rng.standard_normal((20, 30000)).astype(np.float32) * 3
    logits[:10] += offsets[0]
    logits[10:] += offsets[1]
    targets = rng.integers(0, 30000, 20)
    targets[3] = IGNORE_INDEX
    loss, acc, dlogits = cross_entropy_reference(logits.astype(np.float64), targets)
    buf = logits.copy()
    s, n_correct, row_scale = softmax_cross_entropy_inplace(buf, targets, grad_scale=1 / 19)
    assert np.isfinite(s) and s / 19 == pytest.approx(loss, rel=1e-5)
    assert n_correct / 19 == pytest.approx(acc)
    np.testing.assert_allclose(row_scale[:, None] * buf, dlogits, rtol=1e-4, atol=1e-9)


def test_cross_entropy_reference_gradient(rng):
    logits = rng.standard_normal((4, 7))
    targets = np.array([1, IGNORE_INDEX, 6, 0])
    _, _, dlogits = cross_entropy_reference(logits, targets)
    numeric = numerical_gradient(lambda: cross_entropy_reference(logits, targets)[0], logits)
    assert rel_error(dlogits, numeric) < 1e-7


@pytest.mark.parametrize("cap", [0.5, 3.0, 30.0])
def test_softcap(rng, cap):
    p = {"z": rng.standard_normal((4, 7)) * 3}

    def forward():
        capped, slope = p["z"].copy(), np.empty_like(p["z"])
        softcap_inplace(capped, cap, slope)
        return capped, slope

    def backward(dout, slope):
        dz = dout.copy()
        softcap_backward_inplace(dz, slope)
        return {"z": dz}

    check_layer(forward, backward, p, ["z"], rng)
    capped, _ = forward()
    np.testing.assert_allclose(capped, cap * np.tanh(p["z"] / cap), rtol=1e-14)
    assert np.abs(capped).max() <= cap
    without_slope = p["z"].copy()
    softcap_inplace(without_slope, cap)  # generation's: no slope kept
    np.testing.assert_array_equal(without_slope, capped)


@pytest.mark.parametrize("softcap", [0.0, 2.0])  # 2: logits of a few units, many of them bent by the cap
@pytest.mark.parametrize("rows_per_chunk", [1, 4, 1024])
def test_chunked_head_loss(rng, rows_per_chunk, softcap):
    """The chunked head + loss against finite differences and against the plain unchunked version."""
    N, C, V = 6, 4, 11
    p = {"h": rng.standard_normal((N, C)), "w_out": rng.standard_normal((V, C))}
    targets = rng.integers(0, V, N)
    targets[5] = IGNORE_INDEX

    def mean_loss():
        s, _, n, _ = lm_head_loss(p["h"], p["w_out"], targets, rows_per_chunk=rows_per_chunk, softcap=softcap)
        return s / n

    g = zeros_like(p, ["w_out"])
    s, n_correct, n, g["h"] = lm_head_loss(p["h"], p["w_out"], targets, g["w_out"], rows_per_chunk=rows_per_chunk,
                                           softcap=softcap)
    assert n == 5
    for name in p:
        assert rel_error(g[name], numerical_gradient(mean_loss, p[name])) < 1e-6, name
    logits = lm_head_forward(p["h"], p["w_out"], softcap)
    if softcap:
        np.testing.assert_allclose(logits, softcap * np.tanh(p["h"] @ p["w_out"].T / softcap), rtol=1e-14)
    ref_loss, ref_acc, _ = cross_entropy_reference(logits, targets)
    assert s / n == pytest.approx(ref_loss, rel=1e-12)
    assert n_correct / n == pytest.approx(ref_acc)


def test_head_loss_accumulates_into_gradients(rng):
    """Backward adds: a gradient buffer holding something keeps it (the tied weight relies on this)."""
    h, w_out = rng.standard_normal((2, 4)), rng.standard_normal((5, 4))
    targets = np.array([1, 2])
    fresh = np.zeros((5, 4))
    lm_head_loss(h, w_out, targets, fresh)
    preset = np.ones((5, 4))
    lm_head_loss(h, w_out, targets, preset)
    np.testing.assert_allclose(preset, fresh + 1, rtol=1e-12)


@pytest.mark.parametrize("T", [128, 160])  # two blocks of 64 queries; three, the last of 32
def test_causal_products_by_blocks_are_the_whole_products(rng, T, array_path):
    """At the real block size, in float32 as training runs: transformer's causal products by blocks of queries
    against the plain products of the whole (T, T) weights (zero after each query's own key)."""
    import transformer
    B, H, hs = 2, 3, 32
    q, k, v = (rng.standard_normal((B, H, T, hs)).astype(np.float32) for _ in range(3))
    causal = np.tril(np.ones((T, T), bool))
    scores = np.empty((B, H, T, T), np.float32)
    transformer.causal_scores_into(q, k.swapaxes(-1, -2), scores, -np.inf)
    np.testing.assert_allclose(scores[..., causal], (q @ k.swapaxes(-1, -2))[..., causal], rtol=1e-5, atol=1e-6)
    att = scores.copy()
    causal_softmax_inplace(att)
    whole = q @ k.swapaxes(-1, -2)
    causal_softmax_inplace(whole)
    np.testing.assert_allclose(att, whole, rtol=1e-6, atol=1e-7)
    assert np.all(att[..., ~causal] == 0)
    out = np.empty((B, H, T, hs), np.float32)
    transformer.causal_weights_matmul_into(att, v, out)
    np.testing.assert_allclose(out, att @ v, rtol=1e-5, atol=1e-6)
    transformer.causal_weights_t_matmul_into(att, v, out)
    np.testing.assert_allclose(out, att.swapaxes(-1, -2) @ v, rtol=1e-5, atol=1e-6)
    grad = np.full((B, H, T, T), np.nan, np.float32)
    transformer.causal_scores_into(q, k.swapaxes(-1, -2), grad, 0.0)
    blocks = transformer.causal_blocks(T, T, grad)
    if array_path == "whole arrays":  # the GPU's path makes them whole
        assert blocks is None
        return
    assert len(blocks) == -(-T // 64)
    for start, end in blocks:  # every entry written: the products up to the block's last query, then the fill
        assert np.all(grad[..., start:end, end:] == 0) and np.isfinite(grad[..., start:end, :end]).all()
