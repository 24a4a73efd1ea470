"""Optimizers, schedules and clipping against values worked out by hand."""
import math
import tracemalloc

import numpy as np
import pytest

import optimizer
from optimizer import SGD, AdamW, LRSchedule, clip_grad_norm, decay_mask, global_grad_norm


def test_cosine_schedule_warmup_then_decay_to_min():
    s = LRSchedule(base_lr=3e-4, warmup_steps=10, max_steps=110, min_lr=3e-5)
    assert s(0) == pytest.approx(3e-5)              # 1/10 of base: the first update is never lr 0
    assert s(4) == pytest.approx(1.5e-4)
    assert s(9) == pytest.approx(3e-4)              # warmup ends at the base rate
    assert s(10) == pytest.approx(3e-4)             # cos(0) = 1
    assert s(60) == pytest.approx((3e-4 + 3e-5) / 2)  # halfway: cos(pi/2) = 0
    assert s(35) == pytest.approx(3e-5 + 0.5 * (1 + math.cos(math.pi / 4)) * 2.7e-4)
    assert s(110) == pytest.approx(3e-5)
    assert s(500) == pytest.approx(3e-5)            # stays at the minimum afterwards
    lrs = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_linear_and_constant_schedules():
    lin = LRSchedule(base_lr=1.0, warmup_steps=2, max_steps=12, min_lr=0.1, kind="linear")
    assert [lin(i) for i in (0, 1, 2, 7, 12, 20)] == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1, 0.1])
    const = LRSchedule(base_lr=0.2, warmup_steps=4, max_steps=10, kind="constant")
    assert [const(i) for i in (0, 3, 4, 9, 100)] == pytest.approx([0.05, 0.2, 0.2, 0.2, 0.2])
    no_warmup = LRSchedule(base_lr=0.2, warmup_steps=0, max_steps=10, min_lr=0.0)
    assert no_warmup(0) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="schedule"):
        LRSchedule(1.0, kind="step")
    with pytest.raises(ValueError, match="min_lr"):
        LRSchedule(1e-4, min_lr=1e-3)


def test_linear_to_zero_ends_at_zero():
    s = LRSchedule(base_lr=1.0, warmup_steps=0, max_steps=10, min_lr=0.0, kind="linear")
    assert [s(i) for i in (0, 5, 9, 10, 50)] == pytest.approx([1.0, 0.5, 0.1, 0.0, 0.0])
    assert s(10) == 0.0


def test_wsd_schedule_warms_up_holds_then_decays_linearly_to_min_at_max_steps():
    # 100 steps after warmup, the last 30 of them the cooldown: it begins at step 80
    s = LRSchedule(base_lr=1.0, warmup_steps=10, max_steps=110, min_lr=0.1, kind="wsd", cooldown=0.3)
    assert s.decay_start() == pytest.approx(80)
    assert [s(i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])   # the warmup of the other kinds
    assert all(s(i) == 1.0 for i in range(10, 81))                         # stable, exactly the base rate
    assert [s(i) for i in (95, 109, 110, 500)] == pytest.approx([0.55, 0.13, 0.1, 0.1])
    steps = np.diff([s(i) for i in range(80, 111)])
    assert np.allclose(steps, -0.9 / 30)                                   # one straight line down
    # cooldown 1: the whole of the steps after warmup, the linear schedule (to the last bit once it decays)
    whole = LRSchedule(1.0, 10, 110, 0.1, "wsd", cooldown=1.0)
    linear = LRSchedule(1.0, 10, 110, 0.1, "linear")
    assert [whole(i) for i in range(130)] == pytest.approx([linear(i) for i in range(130)])
    assert [whole(i) for i in range(11, 130)] == [linear(i) for i in range(11, 130)]
    # the stable rate is base_lr itself, not min_lr + (base_lr - min_lr), which may round
    assert LRSchedule(1e-2, 5, 102, 1e-3, "wsd")(5) == 1e-2 != 1e-3 + (1e-2 - 1e-3)
    # the horizon not known yet (--time_budget measuring): the stable phase goes on
    unknown = LRSchedule(1.0, 10, None, 0.1, "wsd")
    assert unknown.decay_start() == math.inf and unknown(10**6) == 1.0
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="cooldown"):
            LRSchedule(1.0, 10, 110, 0.1, "wsd", cooldown=bad)


def test_clip_grad_norm_scales_to_max_norm_and_reports_the_old_norm():
    grads = {"a": np.array([3.0, 0.0], dtype=np.float32), "b": np.array([[4.0]], dtype=np.float32)}
    a_buf = grads["a"]
    norm = clip_grad_norm(grads, max_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert grads["a"] is a_buf                       # in place
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-5)
    np.testing.assert_allclose(grads["b"], [[0.8]], rtol=1e-5)
    assert global_grad_norm(grads) == pytest.approx(1.0, rel=1e-5)
    # below the threshold (or clipping off): untouched
    small = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(small, max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(small["a"], [0.3, 0.4])
    assert clip_grad_norm({"a": np.array([30.0, 40.0])}, max_norm=0) == pytest.approx(50.0)
    bad = {"a": np.array([np.nan, 1.0])}
    assert math.isnan(clip_grad_norm(bad, 1.0))


def test_huge_but_finite_float32_gradients_are_clipped_not_reported_as_inf():
    # 3e19 squared is past float32's range: a float32 sum of squares says inf, the norm is 5e19
    big = np.zeros(200_000, np.float32)  # longer than one block of the float64 pass
    big[[7, 150_001]] = [3e19, 4e19]
    grads = {"a": big, "b": np.full((2, 2), 1.0, np.float32)}
    norm = clip_grad_norm(grads, max_norm=1.0)
    assert norm == pytest.approx(5e19, rel=1e-6)
    assert big[7] == pytest.approx(0.6, rel=1e-5) and big[150_001] == pytest.approx(0.8, rel=1e-5)
    assert np.isfinite(global_grad_norm(grads))
    # a gradient that really holds inf still stops the run
    assert global_grad_norm({"a": np.array([np.inf, 1.0], np.float32)}) == math.inf

def test_sgd_plain_and_with_momentum_three_steps_by_hand():
    p = {"w": np.array([1.0, -2.0])}
    opt = SGD(p)
    opt.step({"w": np.array([0.5, 1.0])}, lr=0.1)
    np.testing.assert_allclose(p["w"], [0.95, -2.1])

    p = {"w": np.array([1.0])}
    opt = SGD(p, momentum=0.9)
    # buf: 1 -> 0.9*1 + 2 = 2.9 -> 0.9*2.9 - 1 = 1.61 ; p: 1 - 0.1 - 0.29 - 0.161
    for g in (1.0, 2.0, -1.0):
        opt.step({"w": np.array([g])}, lr=0.1)
    np.testing.assert_allclose(p["w"], [1 - 0.1 - 0.29 - 0.161])
    assert opt.t == 3


def test_sgd_weight_decay_is_decoupled_not_added_to_the_gradient():
    # decoupled: p *= 1 - lr * wd, then the momentum step on the gradient alone (PyTorch's SGD would put
    # wd * p into the gradient, and so into the momentum buffer)
    lr, wd, mu, gs = 0.1, 0.5, 0.9, (1.0, 2.0, -1.0)
    p, buf = 1.0, 0.0
    for g in gs:
        p *= 1 - lr * wd
        buf = mu * buf + g
        p -= lr * buf
    params = {"w": np.array([[1.0]]), "b": np.array([1.0])}  # a matrix decays, a bias does not
    opt = SGD(params, momentum=mu, weight_decay=wd)
    for g in gs:
        opt.step({"w": np.array([[g]]), "b": np.array([g])}, lr=lr)
    assert params["w"][0, 0] == pytest.approx(p, rel=1e-12)
    assert params["b"][0] == pytest.approx(1 - lr * (1 + (mu + 2) + (mu * (mu + 2) - 1)), rel=1e-12)
    np.testing.assert_allclose(opt.state["momentum"]["w"], [[mu * (mu + 2) - 1]])  # the gradients' alone


def adam_by_hand(p, grads, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    """Scalar Adam(W) in plain Python floats, straight from the paper's formulas."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


def test_adam_first_step_moves_each_weight_by_lr():
    # with bias correction the first step is lr * g/|g| (up to eps), whatever |g|
    p = {"w": np.array([[1.0, 2.0], [3.0, 4.0]])}
    AdamW(p, weight_decay=0).step({"w": np.array([[0.1, -5.0], [1e-3, 2.0]])}, lr=0.01)
    np.testing.assert_allclose(p["w"], [[0.99, 2.01], [2.99, 3.99]], rtol=1e-6)


def test_adam_three_steps_match_hand_computation():
    gs = [0.5, -1.0, 2.0]
    p = {"w": np.array([[1.0]]), "b": np.array([0.2])}
    opt = AdamW(p, betas=(0.8, 0.9), eps=1e-6, weight_decay=0)
    for g in gs:
        opt.step({"w": np.array([[g]]), "b": np.array([-g])}, lr=0.1)
    assert p["w"][0, 0] == pytest.approx(adam_by_hand(1.0, gs, 0.1, 0.8, 0.9, 1e-6), rel=1e-12)
    assert p["b"][0] == pytest.approx(adam_by_hand(0.2, [-g for g in gs], 0.1, 0.8, 0.9, 1e-6), rel=1e-12)
    # the second moment uses (1 - b2) * g^2: check the buffer itself
    assert opt.v["w"][0, 0] == pytest.approx(0.9 * (0.9 * 0.1 * 0.25 + 0.1 * 1.0) + 0.1 * 4.0)
    assert opt.m["w"][0, 0] == pytest.approx(0.8 * (0.8 * 0.2 * 0.5 + 0.2 * -1.0) + 0.2 * 2.0)
    assert opt.t == 3  # once per step, not once per parameter


def test_adamw_decays_matrices_only():
    params = {
        "wte": np.full((3, 2), 1.0), "wpe": np.full((4, 2), 1.0),
        "h.0.attn.c_attn.weight": np.full((2, 6), 1.0), "h.0.attn.c_attn.bias": np.full(6, 1.0),
        "h.0.ln_1.weight": np.full(2, 1.0), "ln_f.bias": np.full(2, 1.0),
        "lm_head.weight": np.full((3, 2), 1.0),
    }
    mask = decay_mask(params)
    assert {k for k, v in mask.items() if v} == {"h.0.attn.c_attn.weight", "lm_head.weight"}
    assert decay_mask(params, decay_embeddings=True)["wte"] and decay_mask(params, True)["wpe"]

    gs = [0.5, -1.0, 2.0]
    opt = AdamW(params, weight_decay=0.1)
    for g in gs:
        opt.step({k: np.full_like(v, g) for k, v in params.items()}, lr=0.05)
    decayed = adam_by_hand(1.0, gs, 0.05, wd=0.1)
    plain = adam_by_hand(1.0, gs, 0.05)
    assert decayed != pytest.approx(plain, rel=1e-6)
    for name, p in params.items():
        np.testing.assert_allclose(p, decayed if mask[name] else plain, rtol=1e-12, err_msg=name)


def test_blocked_update_equals_the_obvious_formula_in_float32():
    # arrays larger than one block, float32, the shape of a real embedding table
    rng = np.random.default_rng(0)
    shape = (optimizer.BLOCK // 64 + 37, 128)
    p0 = rng.standard_normal(shape).astype(np.float32)
    params = {"h.0.mlp.c_fc.weight": p0.copy()}
    opt = AdamW(params, weight_decay=0.01)
    m = np.zeros_like(p0, dtype=np.float64)
    v = np.zeros_like(m)
    p = p0.astype(np.float64)
    for t in range(1, 4):
        g = rng.standard_normal(shape).astype(np.float32)
        opt.step({"h.0.mlp.c_fc.weight": g}, lr=1e-2)
        p *= 1 - 1e-2 * 0.01
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g.astype(np.float64) ** 2
        p -= 1e-2 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    assert params["h.0.mlp.c_fc.weight"].dtype == np.float32
    np.testing.assert_allclose(params["h.0.mlp.c_fc.weight"], p, rtol=1e-5, atol=1e-5)


def test_step_is_in_place_and_allocates_nothing_big():
    rng = np.random.default_rng(1)
    params = {"wte": rng.standard_normal((2000, 64)).astype(np.float32),
              "h.0.ln_1.weight": np.ones(64, dtype=np.float32)}
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    for opt in (AdamW(params), SGD(params, momentum=0.9)):
        ids = {k: id(v) for k, v in params.items()}
        opt.step(grads, lr=1e-3)  # warm up
        tracemalloc.start()
        opt.step(grads, lr=1e-3)
        clip_grad_norm(grads, 1.0)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 0.05 * params["wte"].nbytes, f"{type(opt).__name__} allocated {peak} bytes"
        assert {k: id(v) for k, v in params.items()} == ids


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(2)
    init = {"w": rng.standard_normal((5, 3)), "b": rng.standard_normal(3)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in init.items()} for _ in range(4)]

    a = {k: v.copy() for k, v in init.items()}
    opt_a = AdamW(a, weight_decay=0.1)
    for g in grads:
        opt_a.step(g, lr=0.01)

    b = {k: v.copy() for k, v in init.items()}
    opt_b = AdamW(b, weight_decay=0.1)
    for g in grads[:2]:
        opt_b.step(g, lr=0.01)
    saved = {k: np.array(v) for k, v in opt_b.state_dict().items()}
    c = {k: v.copy() for k, v in b.items()}
    opt_c = AdamW(c, weight_decay=0.1)
    opt_c.load_state_dict(saved)
    assert opt_c.t == 2
    for g in grads[2:]:
        opt_c.step(g, lr=0.01)
    for k in init:
        np.testing.assert_array_equal(a[k], c[k])
    with pytest.raises(ValueError, match="m/w"):
        AdamW({"w": np.zeros((5, 3))}).load_state_dict({"t": 1})


def test_mismatched_grads_are_an_error():
    opt = AdamW({"w": np.zeros(2)}, weight_decay=0)
    with pytest.raises(ValueError, match="different keys"):
        opt.step({"v": np.zeros(2)}, lr=0.1)


@pytest.mark.parametrize("make", [lambda p, th: AdamW(p, threads=th), lambda p, th: SGD(p, 0.9, 0.1, threads=th)])
def test_threads_split_the_work_without_changing_a_bit(make):
    rng = np.random.default_rng(3)
    init = {"wte": rng.standard_normal((3 * optimizer.BLOCK // 16 + 5, 16)).astype(np.float32),
            "h.0.mlp.c_fc.weight": rng.standard_normal((16, 64)).astype(np.float32),
            "h.0.mlp.c_fc.bias": rng.standard_normal(64).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in init.items()} for _ in range(3)]
    results = []
    for threads in (1, 3):
        params = {k: v.copy() for k, v in init.items()}
        opt = make(params, threads)
        ranges = opt._plan  # the plan covers every element of the flat vector exactly once, in order
        assert ranges[0][0] == 0 and ranges[-1][1] == sum(p.size for p in params.values())
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        for g in grads:
            opt.step(g, lr=1e-2)
        results.append(params)
    assert len(make({k: v.copy() for k, v in init.items()}, 3)._plan) == 3
    for k in init:
        assert np.array_equal(results[0][k], results[1][k]), k


# Digests of the parameters and state_dict after three steps, taken with optimizer.py as it was
# before the flat buffers (one update per parameter array): the flat update must not change a bit.
REFERENCE = {
    ("adamw", "float32"): "25ca7e775231b68fcd0a09c62d47fd8a76ff72d9431c1227127f3ef63e6a75fa",
    ("adamw_embeddings_3threads", "float32"): "79883ef6823cd3b22b81a8e7e02566077f2ad49185c3c10c3b39bf6d06a7d091",
    ("adam", "float32"): "a1b5de8db749588809371b8a085ca9deb58038e63d4c5c637a5c3056e310654e",
    ("sgd_momentum", "float32"): "f7006d8e88f5b5fb01d297e070a7fdf70fe23c950b8aff8473f65b8a2a2f1d5c",
    ("sgd", "float32"): "6270e37c3f52b4fcebdc135ace1746a2cc00f34d9df1d9b9ad4faa89194b6b5b",
    ("adamw", "float64"): "2e92fce54d6bd28b5c23434d2125455c712f0942b5c6d71fe7e2587a6624dc90",
    ("adamw_embeddings_3threads", "float64"): "15fbc687b9e986e973fbdcf8f957d33fbfb1b70bb9c1a2070f9b2faf06f8a769",
    ("adam", "float64"): "6eb2b317d3563f18040f61d1e7ff28856b9f1b1cb893387619218e2fdc6af400",
    ("sgd_momentum", "float64"): "c39c2bd77146a0cf970abad8ca6752e975b1e21800fa3ce6a235d85b05c87002",
    ("sgd", "float64"): "88e878aebf63291e5e093683d6b2675c8a1f194f30238c6db50c4e142941a61b",
}
MAKERS = {
    "adamw": lambda p: AdamW(p, weight_decay=0.1),
    "adamw_embeddings_3threads": lambda p: AdamW(p, weight_decay=0.1, decay_embeddings=True, threads=3),
    "adam": lambda p: AdamW(p, betas=(0.8, 0.99), eps=1e-6, weight_decay=0),
    "sgd_momentum": lambda p: SGD(p, momentum=0.9, weight_decay=0.1),
    "sgd": lambda p: SGD(p),
}


def flat_dict(tree):
    """tree copied into views of one flat array, as LanguageModel lays out its parameters."""
    from language_model import FlatDict
    first = next(iter(tree.values()))
    out = FlatDict(np.empty(sum(v.size for v in tree.values()), first.dtype), {k: v.shape for k, v in tree.items()})
    for k, v in tree.items():
        out[k][...] = v
    return out


@pytest.mark.parametrize("layout", ["separate arrays", "flat buffers", "whole arrays"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_update_is_bit_identical_to_the_optimizer_before_flat_buffers(name, dtype, layout):
    from device import whole_array_mode
    from optimizer_reference import inputs, run
    params, grads = inputs(np.dtype(dtype))
    if layout != "separate arrays":
        params, grads = flat_dict(params), [flat_dict(g) for g in grads]
    with whole_array_mode(layout == "whole arrays"):
        assert run(MAKERS[name], params, grads) == REFERENCE[name, dtype]


def test_flat_state_dict_keeps_the_names_and_shapes_of_checkpoints():
    params = flat_dict({"wte": np.ones((4, 3), np.float32), "ln_f.bias": np.zeros(3, np.float32)})
    opt = AdamW(params)
    opt.step(flat_dict({"wte": np.full((4, 3), 0.5, np.float32), "ln_f.bias": np.ones(3, np.float32)}), lr=0.1)
    state = opt.state_dict()
    assert sorted(state) == ["m/ln_f.bias", "m/wte", "t", "v/ln_f.bias", "v/wte"]
    assert state["m/wte"].shape == (4, 3) and state["v/ln_f.bias"].shape == (3,) and int(state["t"]) == 1
    np.testing.assert_allclose(state["m/wte"], 0.05, rtol=1e-6)
    assert np.shares_memory(opt.m["wte"], opt.flat_state["m"])  # views into one flat moment buffer


def test_grad_norm_is_summed_in_float64_and_cannot_overflow():
    big = np.full(1000, 1e20, np.float32)  # squares overflow float32 (max 3.4e38)
    assert global_grad_norm({"a": big}) == pytest.approx(1e20 * math.sqrt(1000), rel=1e-6)
    flat = flat_dict({"a": big, "b": np.full(3, 2e20, np.float32)})
    expected = math.sqrt(1000 * 1e40 + 3 * 4e40)
    assert global_grad_norm(flat) == pytest.approx(expected, rel=1e-6)
    from device import whole_array_mode
    with whole_array_mode():
        assert global_grad_norm(flat) == pytest.approx(expected, rel=1e-6)
    assert clip_grad_norm(flat, 1.0) == pytest.approx(expected, rel=1e-6)
    assert global_grad_norm(flat) == pytest.approx(1.0, rel=1e-5)  # the flat buffer itself was scaled


def test_build_optimizer_names_the_three_rules():
    from optimizer import build_optimizer
    params = {"w": np.ones((2, 3), np.float32)}
    assert build_optimizer("adamw", params, weight_decay=0.1).weight_decay == 0.1
    assert build_optimizer("adam", params, weight_decay=0.1).weight_decay == 0.0  # Adam: AdamW without decay
    sgd = build_optimizer("sgd", params, momentum=0.9)
    assert type(sgd).__name__ == "SGD" and sgd.momentum == 0.9
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        build_optimizer("lion", params)
