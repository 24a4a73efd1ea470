"""The Llama block's layers against float64 finite differences and against HF Llama's formulas,
RoPE's properties, the key/value cache, and a small Llama trunk checked end to end."""
import math

import numpy as np
import pytest

import fake_cupy
from device import to_device, to_host, whole_array_mode
from embeddings import embedding_backward
from gradcheck import array_path  # noqa: F401  (autouse: every test here runs on both array paths)
from gradcheck import causal_blocks  # noqa: F401  (a fixture: attention's products whole and by blocks)
from gradcheck import block_masks, check_layer, fixed_mask, numerical_gradient, rel_error, zeros_like
from config import LLAMA_FEED_FORWARDS, RMS_EPS, ModelConfig, llama_block_shapes, swiglu_hidden
from device import blocks
from dropout import DropoutMask
from llama import (FEED_FORWARDS, block_parameters, init_llama_block, llama_attention_backward, llama_attention_forward,
                   llama_block_backward, llama_block_forward, relu2_mlp_backward, relu2_mlp_forward, rmsnorm_backward,
                   rmsnorm_forward, rope_backward, rope_forward, rope_reference, swiglu_backward, swiglu_forward)
from loss import IGNORE_INDEX, cross_entropy_reference
from transformer import KVCache


@pytest.fixture
def rng():
    return np.random.default_rng(4321)


# ----------------------------------------------------------------------------- RMSNorm

def test_rmsnorm(rng):
    p = {"x": rng.standard_normal((2, 3, 4)), "w": rng.standard_normal(4)}

    def backward(dout, cache):
        g = zeros_like(p, ["w"])
        g["x"] = rmsnorm_backward(dout, cache, g["w"])
        return g

    check_layer(lambda: rmsnorm_forward(p["x"], p["w"]), backward, p, ["x", "w"], rng)


@pytest.mark.parametrize("eps", [RMS_EPS, 1e-6, 0.5])
def test_rmsnorm_is_hf_llamas_formula(rng, eps):
    x, w = rng.standard_normal((5, 16)) * 3 + 1, rng.standard_normal(16)
    expected = w * (x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps))  # LlamaRMSNorm
    np.testing.assert_allclose(rmsnorm_forward(x, w, eps)[0], expected, rtol=1e-13)


# ----------------------------------------------------------------------------- rotary positions

@pytest.mark.parametrize("start", [0, 5])
def test_rope(rng, start):
    p = {"x": rng.standard_normal((2, 3, 2, 6))}
    check_layer(lambda: rope_forward(p["x"], start), lambda dout, cache: {"x": rope_backward(dout, cache)},
                p, ["x"], rng)


@pytest.mark.parametrize("shape", [(2, 3, 2, 6), (2, 2500, 2, 32)])  # 2nd: blocks of 1024 positions, the last partial
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_hf_rotate_half(rng, shape, theta):
    x = rng.standard_normal(shape)
    out, _ = rope_forward(x, start=7, theta=theta)
    np.testing.assert_allclose(out, rope_reference(x, start=7, theta=theta), rtol=1e-10, atol=1e-12)


def test_rope_pairs_dimension_i_with_i_plus_half():
    """HF's convention, pinned by hand: head size 4, position 1, theta 10000: dimensions (0, 2) turn
    by 1 radian, (1, 3) by 10000^(-1/2) = 0.01."""
    e = np.eye(4)
    rotated, _ = rope_forward(np.stack([e, e])[None])  # (1, T=2, n=4, 4): head j holds e_j, at positions 0 and 1
    np.testing.assert_array_equal(rotated[0, 0], e)  # position 0: no rotation
    c1, s1, c2, s2 = math.cos(1), math.sin(1), math.cos(0.01), math.sin(0.01)
    expected = np.array([[c1, 0, s1, 0], [0, c2, 0, s2], [-s1, 0, c1, 0], [0, -s2, 0, c2]])  # row j: e_j rotated
    np.testing.assert_allclose(rotated[0, 1], expected, rtol=1e-14, atol=1e-16)


def test_rope_scores_depend_only_on_relative_position_and_norms_are_kept(rng):
    q, k = rng.standard_normal((2, 16))

    def at(v, pos):
        return rope_forward(v[None, None, None], start=pos)[0][0, 0, 0]

    for d in (0, 1, 5, -3):
        scores = [at(q, m) @ at(k, m - d) for m in (10, 17, 40, 200)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-10)
    assert not np.isclose(at(q, 10) @ at(k, 9), at(q, 10) @ at(k, 8))  # but they do depend on it
    for pos in (0, 3, 1000):
        assert np.linalg.norm(at(q, pos)) == pytest.approx(np.linalg.norm(q), rel=1e-13)


def test_rope_backward_is_the_inverse_rotation(rng):
    x = rng.standard_normal((2, 9, 3, 8))
    out, cache = rope_forward(x, start=4)
    np.testing.assert_allclose(rope_backward(out, cache), x, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- SwiGLU

@pytest.mark.parametrize("activation", sorted(FEED_FORWARDS))
def test_feed_forward(rng, activation):
    """Each feed-forward of the Llama block (FEED_FORWARDS: SwiGLU, relu2's MLP) against finite differences;
    mlp.c_fc has config.LLAMA_FEED_FORWARDS' columns per hidden unit ([gate | up] for SwiGLU)."""
    C, F = 4, 6
    ffn, columns = FEED_FORWARDS[activation], LLAMA_FEED_FORWARDS[activation].fc_columns
    p = {"x": rng.standard_normal((2, 3, C)), "w_fc": rng.standard_normal((C, columns * F)),
         "w_proj": rng.standard_normal((F, C))}

    def backward(dout, cache):
        g = zeros_like(p, ["w_fc", "w_proj"])
        g["x"] = ffn.backward(dout, cache, p["w_fc"], p["w_proj"], g["w_fc"], g["w_proj"])
        return g

    check_layer(lambda: ffn.forward(p["x"], p["w_fc"], p["w_proj"]), backward, p, list(p), rng)


def silu(z):
    return z / (1 + np.exp(-z))


# the hidden units are rows of N = B*T: 31 rows of 2100 a block (the last one partial), and 1 (a row > a block)
@pytest.mark.parametrize("F, B, T", [(130, 3, 700), (3, 2, 40000)])
def test_swiglu_in_blocks_matches_the_whole_array_formulas(rng, F, B, T):
    """Forward as HF's LlamaMLP, down(silu(gate(x)) * up(x)); backward against the derivatives written out."""
    C = 8
    x = rng.standard_normal((B, T, C))
    w_gate, w_up, w_down = rng.standard_normal((C, F)), rng.standard_normal((C, F)), rng.standard_normal((F, C)) / 10
    out, cache = swiglu_forward(x, np.concatenate([w_gate, w_up], axis=1), w_down)
    gate, up = x @ w_gate, x @ w_up
    np.testing.assert_allclose(out, (silu(gate) * up) @ w_down, rtol=1e-10, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    dw_fc, dw_down = np.zeros((C, 2 * F)), np.zeros((F, C))
    dx = swiglu_backward(dout, cache, np.concatenate([w_gate, w_up], axis=1), w_down, dw_fc, dw_down)
    sig = 1 / (1 + np.exp(-gate))
    da = dout @ w_down.T
    dgate, dup = da * up * sig * (1 + gate * (1 - sig)), da * silu(gate)
    np.testing.assert_allclose(dx, dgate @ w_gate.T + dup @ w_up.T, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(dw_fc, np.concatenate([x.reshape(-1, C).T @ dgate.reshape(-1, F),
                                                      x.reshape(-1, C).T @ dup.reshape(-1, F)], axis=1),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw_down, (silu(gate) * up).reshape(-1, F).T @ dout.reshape(-1, C),
                               rtol=1e-10, atol=1e-10)


def test_blocks_pair_rows_of_arrays_of_different_widths(array_path):
    """Element-wise chains may walk arrays of different widths side by side, row for row."""
    wide, narrow = np.arange(3000 * 260.0).reshape(3000, 260), np.zeros((3000, 130))
    got = list(blocks(wide, narrow))
    assert len(got) == (1 if array_path == "whole arrays" else 12)  # 252 rows of the wider per block
    assert all(len(w) == len(n) for w, n in got)
    np.testing.assert_array_equal(np.concatenate([w for w, _ in got]), wide)
    with pytest.raises(ValueError, match="as many rows"):
        list(blocks(wide, np.zeros((2999, 130))))


def test_swiglu_survives_gates_exp_cannot_take():
    x = np.array([[[1.0]]], np.float32)
    out, _ = swiglu_forward(x, np.array([[-1e4, 1e4, 2.0, 3.0]], np.float32), np.ones((2, 1), np.float32))
    # gates [-1e4, 1e4], ups [2, 3]: silu(-1e4) = 0 (exp overflows to inf, no NaN), silu(1e4) = 1e4
    np.testing.assert_array_equal(out, [[[0 * 2 + 1e4 * 3]]])


def test_swiglu_hidden_width():
    assert swiglu_hidden(288) == 768  # llama2.c's stories15M
    assert swiglu_hidden(128) == 384  # 341.3 rounded up
    assert swiglu_hidden(4096, multiple_of=256) == 11008  # Llama 7B's published width
    assert all(swiglu_hidden(d) % 64 == 0 and swiglu_hidden(d) >= 8 * d / 3 - 1 for d in range(8, 1000, 8))


# ----------------------------------------------------------------------------- ReLU^2 feed-forward

def test_relu2_mlp_is_gpt2s_relu2_mlp_without_biases(rng):
    """Forward as written out, relu(x @ w_fc)^2 @ w_proj, with some hidden units negative (the relu cuts
    them); forward and backward what transformer.py's relu2 MLP gives with zero biases."""
    from transformer import mlp_backward, mlp_forward
    C, F = 8, 20
    x, w_fc, w_proj = rng.standard_normal((2, 5, C)), rng.standard_normal((C, F)), rng.standard_normal((F, C))
    out, cache = relu2_mlp_forward(x, w_fc, w_proj)
    h = x @ w_fc
    assert (h < 0).any() and (h > 0).any()
    np.testing.assert_allclose(out, np.maximum(h, 0) ** 2 @ w_proj, rtol=1e-12, atol=1e-12)
    zeros = np.zeros(F), np.zeros(C)
    gpt2_out, gpt2_cache = mlp_forward(x, w_fc, zeros[0], w_proj, zeros[1], "relu2")
    np.testing.assert_array_equal(out, gpt2_out)
    dout = rng.standard_normal(out.shape)
    ours, gpt2 = [np.zeros((C, F)), np.zeros((F, C))], [np.zeros((C, F)), np.zeros(F), np.zeros((F, C)), np.zeros(C)]
    dx = relu2_mlp_backward(dout, cache, w_fc, w_proj, *ours)
    gpt2_dx = mlp_backward(dout, gpt2_cache, w_fc, w_proj, *gpt2)
    np.testing.assert_array_equal(dx, gpt2_dx)
    np.testing.assert_array_equal(ours[0], gpt2[0])
    np.testing.assert_array_equal(ours[1], gpt2[2])


def test_relu2_chooses_the_blocks_shapes_and_default_width():
    """The activation chooses mlp.c_fc's shape and the width left out: relu2's (C, F) with F = 4C, SwiGLU's
    (C, 2F) with its own F; a width given is kept."""
    relu2 = ModelConfig(arch="llama", d_model=128, n_heads=4, activation="relu2")
    assert relu2.d_ff == 512 and ModelConfig(arch="llama", d_model=128, n_heads=4).d_ff == 384
    assert ModelConfig(arch="llama", d_model=128, n_heads=4, activation="relu2", d_ff=100).d_ff == 100
    shapes = llama_block_shapes(128, 4, 2, 512, "relu2")
    assert shapes["mlp.c_fc.weight"] == (128, 512) and shapes["mlp.c_proj.weight"] == (512, 128)
    assert llama_block_shapes(128, 4, 2, 384)["mlp.c_fc.weight"] == (128, 768)
    assert "relu2 MLP d_ff 512, no biases" in relu2.describe()
    with pytest.raises(ValueError, match="activation 'gelu': the llama block's feed-forward \\(SwiGLU\\) takes "
                                         "'swiglu' or 'relu2'"):
        ModelConfig(arch="llama", activation="gelu")


# ----------------------------------------------------------------------------- attention

def attention_params(rng, C=8, H=2, Hkv=2, T=3, scale=1.0):
    hs = C // H
    return {"x": rng.standard_normal((2, T, C)),
            "w_attn": rng.standard_normal((C, (H + 2 * Hkv) * hs)) * 0.5 * scale,
            "w_proj": rng.standard_normal((C, C)) * 0.5}


@pytest.mark.parametrize("dropout", [False, True])  # True: a fixed dropout mask (B, H, T, T) on the attention weights
@pytest.mark.parametrize("H, Hkv", [(2, 2), (4, 2), (4, 1)])  # multi-head, grouped-query (G = 2), one key/value head
@pytest.mark.parametrize("scale", [1, 8])  # 8: scores in the hundreds, past what exp takes unshifted
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention(rng, H, Hkv, scale, dropout, qk_norm, causal_blocks):
    p = attention_params(rng, H=H, Hkv=Hkv, scale=scale)
    mask = fixed_mask(rng, (2, H, 3, 3)) if dropout else None

    def backward(dout, cache):
        g = zeros_like(p, ["w_attn", "w_proj"])
        g["x"] = llama_attention_backward(dout, cache, p["w_attn"], p["w_proj"], g["w_attn"], g["w_proj"])
        return g

    def forward():
        return llama_attention_forward(p["x"], p["w_attn"], p["w_proj"], H, Hkv, att_mask=mask, qk_norm=qk_norm)

    check_layer(forward, backward, p, list(p), rng)


def test_attention_dropout_mask_is_laid_out_as_the_query_heads(rng):
    """Mask (B, H, T, S) entry [b, j] drops query head j's weights: dropping all of head j's zeroes
    exactly its slice of y (the heads side by side), in grouped-query attention too (H 4, Hkv 2)."""
    p = attention_params(rng, H=4, Hkv=2, T=3)
    keep = np.ones((2, 4, 3, 3), bool)
    keep[1, 2] = False  # row 1, query head 2 (key/value head 1, second of its group)
    _, cache = llama_attention_forward(p["x"], p["w_attn"], p["w_proj"], 4, 2, att_mask=DropoutMask(keep, 1.0))
    y = cache.y.reshape(2, 3, 4, 2)  # (B, T, H, hs)
    assert np.all(y[1, :, 2] == 0) and np.all(y[0] != 0) and np.all(np.delete(y[1], 2, axis=1) != 0)


def rms_normalised(a, eps):
    """Each vector along the last axis divided by its root mean square: QK-norm's formula."""
    return a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + eps)


def attention_reference(x, w_attn, w_proj, H, Hkv, theta=10000.0, qk_norm_eps=None):
    """An independent HF-style pass: q, k, v projections, RoPE by rotate_half, repeat_kv, per-head softmax.
    With qk_norm_eps, each q and k head normalised first, before RoPE: the other order than llama.py's."""
    B, T, C = x.shape
    hs = C // H
    q, k, v = np.split(x @ w_attn, [C, C + Hkv * hs], axis=-1)
    q, k = q.reshape(B, T, H, hs), k.reshape(B, T, Hkv, hs)
    if qk_norm_eps is not None:
        q, k = rms_normalised(q, qk_norm_eps), rms_normalised(k, qk_norm_eps)
    q = rope_reference(q, theta=theta)
    k = rope_reference(k, theta=theta)
    v = v.reshape(B, T, Hkv, hs)
    y = np.empty((B, T, H, hs))
    for j in range(H):
        kj, vj = k[:, :, j // (H // Hkv)], v[:, :, j // (H // Hkv)]  # repeat_kv
        scores = q[:, :, j] @ kj.transpose(0, 2, 1) / np.sqrt(hs) + np.triu(np.full((T, T), -np.inf), 1)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        y[:, :, j] = (att / att.sum(-1, keepdims=True)) @ vj
    return y.reshape(B, T, C) @ w_proj


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("H, Hkv", [(2, 2), (4, 1), (4, 2)])
def test_attention_matches_the_hf_formula(rng, H, Hkv, qk_norm, causal_blocks):
    p = attention_params(rng, C=16, H=H, Hkv=Hkv, T=6)
    out, _ = llama_attention_forward(p["x"], p["w_attn"], p["w_proj"], H, Hkv, rope_theta=100.0, qk_norm=qk_norm,
                                     eps=1e-5)
    expected = attention_reference(p["x"], p["w_attn"], p["w_proj"], H, Hkv, 100.0, 1e-5 if qk_norm else None)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("qk_norm", [False, True])  # True: the keys cached rotated and normalised
@pytest.mark.parametrize("H, Hkv", [(2, 2), (4, 2)])
def test_kv_cache_gives_the_same_attention_as_a_full_pass(rng, H, Hkv, qk_norm, causal_blocks):
    """Pieces at positions 0-2, 3, 4-5, 6: each rotated at its own positions, keys stored rotated."""
    C, T = 8, 7
    p = attention_params(rng, C=C, H=H, Hkv=Hkv, T=T)
    full, full_cache = llama_attention_forward(p["x"], p["w_attn"], p["w_proj"], H, Hkv, qk_norm=qk_norm)
    kv = KVCache(1, 2, Hkv, 9, C // H, np.float64)
    pieces = []
    for a, b in [(0, 3), (3, 4), (4, 6), (6, 7)]:
        out, _ = llama_attention_forward(p["x"][:, a:b], p["w_attn"], p["w_proj"], H, Hkv, kv=kv, qk_norm=qk_norm)
        kv.length += b - a  # the model does this once all layers have seen the new positions
        pieces.append(out)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(kv.k[0][:, :, :T], full_cache.k, rtol=1e-13, atol=1e-14)  # the rotated keys


def test_attention_is_causal(rng):
    p = attention_params(rng, H=4, Hkv=2, T=5)
    out, cache = llama_attention_forward(p["x"], p["w_attn"], p["w_proj"], 4, 2)
    for t in range(5):
        dout = np.zeros_like(out)
        dout[:, t] = rng.standard_normal((2, 8))
        g = zeros_like(p, ["w_attn", "w_proj"])
        dx = llama_attention_backward(dout, cache, p["w_attn"], p["w_proj"], g["w_attn"], g["w_proj"])
        assert np.all(dx[:, t + 1:] == 0), f"output {t} has gradient from a later input"
        assert np.all(np.abs(dx[:, : t + 1]).sum(-1) > 0), f"output {t} ignores an earlier input"


# ----------------------------------------------------------------------------- block and trunk

def llama_cfg(H, Hkv, C=8, **kw):
    """The ModelConfig a Llama block reads (heads, theta, eps) for width C."""
    return ModelConfig(arch="llama", d_model=C, n_heads=H, n_kv_heads=Hkv, **kw)


def block_params(rng, C=8, H=2, Hkv=2, F=12, activation="swiglu"):
    return {k: rng.standard_normal(s) * 0.5 for k, s in llama_block_shapes(C, H, Hkv, F, activation).items()}


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
@pytest.mark.parametrize("dropout", [False, True])  # True: fixed masks on the attention weights and both branches
@pytest.mark.parametrize("H, Hkv", [(2, 2), (2, 1)])
def test_block(rng, H, Hkv, dropout, activation):
    p = block_params(rng, H=H, Hkv=Hkv, activation=activation)
    p["x"] = rng.standard_normal((2, 3, 8))
    masks = block_masks(rng, H=H) if dropout else None
    cfg = llama_cfg(H, Hkv, activation=activation)

    def backward(dout, cache):
        g = zeros_like(p, [k for k in p if k != "x"])
        g["x"] = llama_block_backward(dout, cache, p, g)
        return g

    check_layer(lambda: llama_block_forward(p["x"], p, cfg, dropout=masks), backward, p, list(p), rng)


def test_block_with_the_kv_cache_gives_the_same_output(rng):
    p = block_params(rng, C=8, H=2, Hkv=1)
    x = rng.standard_normal((2, 6, 8))
    full, _ = llama_block_forward(x, p, llama_cfg(2, 1, rope_theta=50.0, norm_eps=1e-6))
    kv = KVCache(1, 2, 1, 6, 4, np.float64)
    pieces = []
    for a, b in [(0, 4), (4, 5), (5, 6)]:
        pieces.append(llama_block_forward(x[:, a:b], p, llama_cfg(2, 1, rope_theta=50.0, norm_eps=1e-6), kv=kv)[0])
        kv.length = b
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("activation, qk_norm", [("swiglu", False), ("relu2", False), ("swiglu", True)])
def test_block_on_device_arrays_computes_what_numpy_does_without_reading_back(rng, activation, qk_norm):
    """With fake_cupy's device arrays (which refuse host arrays and count host reads): the block's
    forward (with and without the cache) and backward give bit for bit the whole-array NumPy results."""
    p = block_params(rng, H=4, Hkv=2, activation=activation)
    x, dout = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
    cfg = llama_cfg(4, 2, activation=activation, qk_norm=qk_norm)

    def run(xp, p, x, dout):
        out, cache = llama_block_forward(x, p, cfg)
        g = {k: xp.zeros_like(v) for k, v in p.items()}
        dx = llama_block_backward(dout, cache, p, g)
        kv = KVCache(1, 2, 2, 5, 2, np.float64, xp)
        first, _ = llama_block_forward(x[:, :3], p, cfg, kv=kv)
        kv.length = 3
        rest, _ = llama_block_forward(x[:, 3:], p, cfg, kv=kv)
        return [out, dx, first, rest] + [g[k] for k in sorted(g)]

    with whole_array_mode():
        expected = run(np, p, x, dout)
    with fake_cupy.installed() as cupy:
        before = fake_cupy.counts.syncs
        on_device = run(cupy, {k: to_device(v, cupy) for k, v in p.items()}, to_device(x, cupy), to_device(dout, cupy))
        assert fake_cupy.counts.syncs == before
        assert all(isinstance(a, cupy.ndarray) for a in on_device)
        for a, b in zip(on_device, expected):
            np.testing.assert_array_equal(to_host(a), b)


TRUNK = dict(V=11, C=8, H=2, Hkv=1, F=12, L=2)


def trunk_params(rng, activation="swiglu"):
    V, C = TRUNK["V"], TRUNK["C"]
    p = {"wte": rng.standard_normal((V, C)) * 0.5, "ln_f.weight": 1 + 0.1 * rng.standard_normal(C)}
    for i in range(TRUNK["L"]):
        for k, v in block_params(rng, C, TRUNK["H"], TRUNK["Hkv"], TRUNK["F"], activation).items():
            p[f"h.{i}.{k}"] = v
    return p


def layer(tree, i):
    return {k[len(f"h.{i}."):]: v for k, v in tree.items() if k.startswith(f"h.{i}.")}


def trunk_loss(p, idx, targets, g=None, activation="swiglu"):
    """A small Llama model assembled from the layers: token embedding (no position table), 2 blocks,
    final RMSNorm, tied head, cross-entropy. With g, adds the gradients of the mean loss into it."""
    B, T = idx.shape
    V, C = p["wte"].shape
    x = p["wte"][idx]  # (B, T, C)
    caches = []
    for i in range(TRUNK["L"]):
        cfg = llama_cfg(TRUNK["H"], TRUNK["Hkv"], C=TRUNK["C"], rope_theta=100.0, activation=activation)
        x, cache = llama_block_forward(x, layer(p, i), cfg)
        caches.append(cache)
    h, c_f = rmsnorm_forward(x, p["ln_f.weight"])
    logits = h @ p["wte"].T  # (B, T, V)
    loss, _, dlogits = cross_entropy_reference(logits.reshape(-1, V), targets.reshape(-1))
    if g is not None:
        g["wte"] += dlogits.T @ h.reshape(-1, C)  # the head's share of the tied weight
        dx = rmsnorm_backward((dlogits @ p["wte"]).reshape(B, T, C), c_f, g["ln_f.weight"])
        for i in reversed(range(TRUNK["L"])):
            dx = llama_block_backward(dx, caches[i], layer(p, i), layer(g, i))
        embedding_backward(dx, idx, g["wte"])  # the embedding's share
    return loss


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_llama_trunk_gradients_end_to_end(rng, activation):
    p = trunk_params(rng, activation)
    idx = rng.integers(0, TRUNK["V"], (2, 4))
    idx[1, 2] = idx[1, 0]  # a token used twice
    targets = rng.integers(0, TRUNK["V"], (2, 4))
    targets[0, 1] = IGNORE_INDEX
    g = {k: np.zeros_like(v) for k, v in p.items()}
    trunk_loss(p, idx, targets, g, activation)
    for name in p:
        numeric = numerical_gradient(lambda: trunk_loss(p, idx, targets, activation=activation), p[name])
        err = rel_error(g[name], numeric)
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
        assert np.abs(numeric).max() > 0, f"gradient of {name} is zero: the check would prove nothing"


# ----------------------------------------------------------------------------- parameters

def test_block_shapes_and_parameter_counts():
    from config import ModelConfig, param_shapes
    shapes = llama_block_shapes(768, 12, 4, 2048)
    assert shapes["attn.c_attn.weight"] == (768, (12 + 2 * 4) * 64) and shapes["mlp.c_fc.weight"] == (768, 4096)
    assert shapes["mlp.c_proj.weight"] == (2048, 768) and not any(k.endswith(".bias") for k in shapes)
    # GPT-2's count here is the one the model's own parameter table gives for one block
    gpt2 = param_shapes(ModelConfig(vocab_size=5, d_model=768, n_heads=12, d_ff=3072, n_layers=1))
    counts = block_parameters(768, 12)
    assert counts["gpt2"] == sum(math.prod(s) for k, s in gpt2.items() if k.startswith("h.0.")) == 7_087_872
    assert counts["llama"] == 4 * 768 ** 2 + 3 * 768 * 2048 + 2 * 768  # d_ff 2048 = swiglu_hidden(768)
    assert block_parameters(768, 12, n_kv_heads=4)["llama"] == counts["llama"] - 2 * 768 * 8 * 64  # 8 fewer k, v heads
    with pytest.raises(ValueError, match="n_kv_heads"):
        llama_block_shapes(768, 12, 5)
    with pytest.raises(ValueError, match="even head size"):
        llama_block_shapes(12, 4)


def test_initialisation():
    shapes = llama_block_shapes(256, 4, None, 512)
    p = init_llama_block(shapes, n_layers=8, rng=np.random.default_rng(0))
    assert {k: v.shape for k, v in p.items()} == shapes and all(v.dtype == np.float32 for v in p.values())
    assert np.all(p["ln_1.weight"] == 1) and np.all(p["ln_2.weight"] == 1)
    assert p["attn.c_attn.weight"].std() == pytest.approx(0.02, rel=0.02)
    assert p["mlp.c_fc.weight"].std() == pytest.approx(0.02, rel=0.02)
    for name in ("attn.c_proj.weight", "mlp.c_proj.weight"):
        assert p[name].std() == pytest.approx(0.02 / 4, rel=0.03)  # 1 / sqrt(2 * 8 layers)
