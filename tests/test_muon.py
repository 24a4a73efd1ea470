"""Muon (optimizer.py): the Newton-Schulz iteration against the SVD's polar factor, the update against a
hand-written one, its state in checkpoints, the GPU path, exact resume, and 2 ranks = 2 workers."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fake_cupy
import train
from checkpoint import load_checkpoint
from config import ModelConfig, param_shapes
from device import to_host, whole_array_mode
from helpers import (MPI_ENV, MPIEXEC, REPO, metrics, needs_mpi, numbers, same_arrays, stop_at,
                     tiny_flags)
from helpers import data  # noqa: F401  (a fixture)
from language_model import LanguageModel
from loss import count_targets
from optimizer import (CUBIC, QUINTIC, AdamW, Muon, build_optimizer, clip_grad_norm, muon_matrices,
                       newton_schulz, polar_factor)

SHAPES = [(8, 20), (20, 8), (12, 12)]  # wide, tall (done transposed), square


def with_singular_values(rows, cols, low, high, seed):
    """A random (rows, cols) float64 matrix whose singular values are spread over [low, high], and its SVD."""
    rng = np.random.default_rng(seed)
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    s = np.geomspace(high, low, k)
    return (u * s) @ v.T, u, s, v


def scalar_iteration(s, coefficients, steps):
    """What newton_schulz does to each singular value s (already divided by the Frobenius norm)."""
    for _ in range(steps):
        s = sum(c * s ** (2 * i + 1) for i, c in enumerate(coefficients))
    return s


@pytest.mark.parametrize("shape", SHAPES)
def test_quintic_iteration_keeps_the_singular_vectors_and_puts_the_values_in_a_band(shape):
    g, u, s, v = with_singular_values(*shape, low=1.0, high=30.0, seed=1)
    o = newton_schulz(g)  # QUINTIC, 5 steps
    d = u.T @ o @ v  # diagonal exactly when o has g's singular vectors
    off = d - np.diag(np.diag(d))
    assert np.max(np.abs(off)) < 1e-10
    assert np.all((0.6 < np.diag(d)) & (np.diag(d) < 1.3)), np.diag(d)
    # each singular value went through the quintic polynomial 5 times, from s / ||g||_F
    want = scalar_iteration(s / (np.linalg.norm(g) + 1e-7), QUINTIC, 5)
    np.testing.assert_allclose(np.diag(d), want, rtol=1e-10)
    # and in float32 too, as training runs it
    o32 = newton_schulz(g.astype(np.float32))
    assert o32.dtype == np.float32
    np.testing.assert_allclose(o32, o, atol=1e-3)
    # far from the polar factor in places (the band), but never in direction
    assert np.sum(o * polar_factor(g)) / (np.linalg.norm(o) * np.linalg.norm(polar_factor(g))) > 0.95


@pytest.mark.parametrize("shape", SHAPES)
def test_cubic_iteration_converges_to_the_polar_factor(shape):
    g, u, s, v = with_singular_values(*shape, low=1.0, high=30.0, seed=2)
    np.testing.assert_allclose(polar_factor(g), u @ v.T, atol=1e-12)  # the reference itself
    o = newton_schulz(g, CUBIC, steps=40)
    assert np.max(np.abs(o - polar_factor(g))) < 1e-5
    assert np.linalg.norm(newton_schulz(g, CUBIC, steps=3) - polar_factor(g)) > 0.5  # it did need the steps


def test_a_tall_matrix_is_orthogonalized_as_its_transpose():
    g = np.random.default_rng(3).standard_normal((20, 8))
    np.testing.assert_allclose(newton_schulz(g), newton_schulz(np.ascontiguousarray(g.T)).T, atol=1e-13)


def test_the_blocks_matrices_go_to_muon_and_c_attn_as_q_k_v():
    gpt2 = ModelConfig(vocab_size=50, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=8)
    llama = ModelConfig(vocab_size=50, d_model=16, n_heads=4, n_kv_heads=2, d_ff=24, n_layers=1, max_seq_len=8,
                        arch="llama")
    shapes = {name: np.zeros(shape) for name, shape in param_shapes(gpt2).items()}
    assert muon_matrices(shapes) == {f"h.{i}.{name}": parts for i in range(2) for name, parts in [
        ("attn.c_attn.weight", (16, 16, 16)), ("attn.c_proj.weight", (16,)), ("mlp.c_fc.weight", (32,)),
        ("mlp.c_proj.weight", (16,))]}
    shapes = {name: np.zeros(shape) for name, shape in param_shapes(llama).items()}
    assert muon_matrices(shapes) == {"h.0.attn.c_attn.weight": (16, 8, 8), "h.0.attn.c_proj.weight": (16,),
                                     "h.0.mlp.c_fc.weight": (48,), "h.0.mlp.c_proj.weight": (16,)}


def small_params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    shapes = {"wte": (10, 4), "h.0.attn.c_attn.weight": (4, 12), "h.0.attn.c_attn.bias": (12,),
              "h.0.mlp.c_fc.weight": (4, 8), "h.0.mlp.c_proj.weight": (8, 4), "ln_f.weight": (4,)}
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def test_two_steps_match_the_update_written_out():
    params, lr, mu, wd = small_params(), 0.01, 0.9, 0.1
    grads = [small_params(seed) for seed in (1, 2)]
    want = {k: v.copy() for k, v in params.items()}
    rest = {k: want[k] for k in ("wte", "h.0.attn.c_attn.bias", "ln_f.weight")}
    adamw = AdamW(rest, betas=(0.8, 0.99), weight_decay=wd)
    bufs = {k: np.zeros_like(v) for k, v in want.items() if k not in rest}
    for g in grads:
        adamw.step({k: g[k] for k in rest}, lr)
        for name, buf in bufs.items():
            buf[...] = mu * buf + g[name]
            update = g[name] + mu * buf
            parts = [(0, 4), (4, 8), (8, 12)] if name == "h.0.attn.c_attn.weight" else [(0, update.shape[1])]
            want[name] *= 1 - lr * wd
            for lo, hi in parts:
                o = newton_schulz(update[:, lo:hi])
                want[name][:, lo:hi] -= lr * 0.2 * np.sqrt(max(o.shape)) * o

    got = {k: v.copy() for k, v in params.items()}
    opt = Muon(got, momentum=mu, weight_decay=wd, betas=(0.8, 0.99))
    for g in grads:
        opt.step(g, lr)
    assert opt.t == 2
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-14, err_msg=name)
    # the update's size: an RMS of about 0.2 lr, as AdamW's, for any shape
    first = {k: v.copy() for k, v in params.items()}
    Muon(first, weight_decay=0.0).step(grads[0], lr)
    for name in ("h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"):
        rms = np.sqrt(np.mean((first[name] - params[name]) ** 2)) / lr
        assert 0.13 < rms < 0.25, (name, rms)


def test_state_dict_has_the_momentum_and_adamws_moments_and_resumes_exactly():
    grads = [small_params(seed, np.float32) for seed in range(1, 5)]
    a = small_params(dtype=np.float32)
    opt_a = Muon(a)
    for g in grads:
        opt_a.step(g, lr=0.01)

    b = small_params(dtype=np.float32)
    opt_b = Muon(b)
    for g in grads[:2]:
        opt_b.step(g, lr=0.01)
    saved = {k: np.array(v) for k, v in opt_b.state_dict().items()}
    matrices, rest = ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"), ("wte", "h.0.attn.c_attn.bias", "ln_f.weight")
    assert sorted(saved) == sorted(["t"] + [f"momentum/h.0.{n}.weight" for n in matrices]
                                   + [f"{m}/{n}" for m in "mv" for n in rest])
    assert np.any(saved["momentum/h.0.mlp.c_fc.weight"] != 0)
    c = {k: v.copy() for k, v in b.items()}
    opt_c = Muon(c)
    opt_c.load_state_dict(saved)
    assert opt_c.t == 2 and opt_c.adamw.t == 2
    for g in grads[2:]:
        opt_c.step(g, lr=0.01)
    for k in a:
        np.testing.assert_array_equal(a[k], c[k], err_msg=k)
    without = {k: v for k, v in saved.items() if not k.startswith("momentum/")}  # e.g. an AdamW checkpoint's
    with pytest.raises(ValueError, match="momentum/h.0.attn.c_attn.weight"):
        Muon(small_params(dtype=np.float32)).load_state_dict(without)


def test_blocked_and_whole_array_updates_are_the_same():
    grads = [small_params(seed, np.float32) for seed in (1, 2)]
    results = []
    for whole in (False, True):
        params = small_params(dtype=np.float32)
        with whole_array_mode(whole):
            opt = Muon(params, weight_decay=0.1)
            for g in grads:
                opt.step(g, lr=0.01)
        results.append(params)
    for k in results[0]:
        np.testing.assert_array_equal(results[0][k], results[1][k], err_msg=k)


def test_build_optimizer_makes_muon_with_its_momentum():
    opt = build_optimizer("muon", small_params(), weight_decay=0.1, muon_momentum=0.9, betas=(0.8, 0.95))
    assert isinstance(opt, Muon) and opt.momentum == 0.9 and opt.weight_decay == 0.1
    assert opt.adamw.weight_decay == 0.1 and opt.adamw.beta1 == 0.8
    assert set(opt.params) == {"h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"}
    with pytest.raises(ValueError, match="momentum"):
        Muon(small_params(), momentum=1.0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_gpu_step_stays_on_the_device_and_moves_the_weights_as_numpy(arch):
    """With the stand-in for CuPy (tests/fake_cupy.py): the update reads nothing back and copies nothing to
    the host; its moves agree with NumPy's on the whole-array path (up to the stand-in's scatter-add order)."""
    cfg = ModelConfig(vocab_size=60, d_model=16, n_heads=4, n_kv_heads=2 if arch == "llama" else None, d_ff=32,
                      n_layers=2, max_seq_len=12, arch=arch)
    tokens = np.random.default_rng(0).integers(0, 60, (4, 13))
    idx, targets = tokens[:, :-1], tokens[:, 1:]
    moves = []
    for gpu in (False, True):
        with fake_cupy.installed() if gpu else whole_array_mode():
            model = LanguageModel(cfg, seed=3, device="cuda" if gpu else "cpu")
            opt = Muon(model.params, weight_decay=0.1)
            for _ in range(2):
                model.zero_grad()
                model.forward_backward(idx, targets, count_targets(targets))
                clip_grad_norm(model.grads, 1.0)
                syncs, copies = fake_cupy.counts.syncs, fake_cupy.counts.host_copies
                opt.step(model.grads, lr=1e-2)
                if gpu:
                    assert (fake_cupy.counts.syncs, fake_cupy.counts.host_copies) == (syncs, copies)
            state = opt.state_dict()
            assert all(type(v) is np.ndarray for v in state.values())
            moves.append(to_host(model.params.flat) - LanguageModel(cfg, seed=3).params.flat)
    assert np.max(np.abs(moves[1] - moves[0])) < 1e-3 * np.max(np.abs(moves[0]))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_train_with_muon_learns_and_resumes_bit_for_bit(data, tmp_path, capsys, arch):
    """train.py --optimizer muon: a Ctrl-C at step 17 resumed gives the uninterrupted run's weights and
    optimizer state (Muon's momentum and AdamW's moments) bit for bit."""
    common = dict(optimizer="muon", max_steps=30, save_interval=10, eval_interval=10, log_interval=5, workers=2,
                  learning_rate=2e-2, min_lr=2e-3)
    if arch == "llama":
        common.update(arch="llama", n_heads=4, n_kv_heads=2, d_ff=None)
    ref, d = str(tmp_path / "ref"), str(tmp_path / "ck")
    assert train.main(tiny_flags(data, ref, **common)) == 0
    with pytest.MonkeyPatch.context() as m:
        stop_at(17, m)
        assert train.main(tiny_flags(data, d, **common)) == 130
    assert train.main(tiny_flags(data, d, resume=True, **common)) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "changed flags" not in out
    same_arrays(os.path.join(d, "checkpoint_final.npz"), os.path.join(ref, "checkpoint_final.npz"))
    arrays = load_checkpoint(os.path.join(ref, "checkpoint_final.npz")).arrays
    assert any("momentum/h.0.attn.c_attn.weight" in k for k in arrays), sorted(arrays)
    losses = [r["loss"] for r in metrics(ref) if r["type"] == "train"]
    assert losses[-1] < losses[0] - 1.0, losses


def test_resuming_with_another_muon_momentum_says_so(data, tmp_path, capsys):
    d = str(tmp_path / "ck")
    assert train.main(tiny_flags(data, d, optimizer="muon", max_steps=4, eval_interval=0)) == 0
    assert train.main(tiny_flags(data, d, optimizer="muon", max_steps=6, eval_interval=0, muon_momentum=0.9,
                                 resume=True)) == 0
    assert "--muon_momentum 0.95 -> 0.9" in capsys.readouterr().out


@needs_mpi
def test_two_ranks_train_with_muon_bit_for_bit_what_two_workers_train(data, tmp_path):
    """Every rank runs the same Muon update on the same summed gradients: the same losses, weights and state."""
    flags = dict(optimizer="muon", max_steps=12, log_interval=3, eval_interval=6, save_interval=0, batch_size=7,
                 arch="llama", n_heads=4, n_kv_heads=2)
    ranks_dir, workers_dir = str(tmp_path / "ranks"), str(tmp_path / "workers")
    run = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "train.py", *tiny_flags(data, ranks_dir, **flags)],
                         cwd=REPO, env=MPI_ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "2 MPI ranks on 1 machine" in run.stdout
    assert train.main(tiny_flags(data, workers_dir, workers=2, **flags)) == 0
    assert numbers(ranks_dir) == numbers(workers_dir) and len(numbers(ranks_dir)) == 6
    same_arrays(os.path.join(ranks_dir, "checkpoint_final.npz"), os.path.join(workers_dir, "checkpoint_final.npz"))


def test_benchmark_times_the_step_with_muon(capsys):
    import benchmark
    benchmark.main(["--vocab_size", "64", "--d_model", "16", "--n_heads", "2", "--d_ff", "32", "--n_layers", "1",
                    "--batch_size", "2", "--seq_len", "8", "--steps", "1", "--min_seconds", "0", "--optimizer", "muon"])
    out = capsys.readouterr().out
    assert out.startswith("model with muon: arch=gpt2") and "ratio" in out
