"""The batch split over the cores (parallel.py) computes what one pass over the whole batch does."""
import platform
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from config import ModelConfig
from language_model import LanguageModel
from loss import IGNORE_INDEX, count_targets
from parallel import ShardRunner, blas_threads, split_rows, sum_into, zero

ROOT = Path(__file__).resolve().parent.parent
CFG = ModelConfig(vocab_size=13, d_model=8, n_heads=2, d_ff=12, n_layers=2, max_seq_len=6)


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_shards_give_the_loss_and_gradients_of_the_whole_batch(workers):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (5, 7))  # 5 sequences: shards of unequal size
    idx, targets = tokens[:, :-1], tokens[:, 1:].copy()
    targets[4, :4] = IGNORE_INDEX  # the last shard counts fewer targets than the others
    n = count_targets(targets)
    one = LanguageModel(CFG, seed=1, dtype=np.float64, workers=1)
    split = LanguageModel(CFG, seed=1, dtype=np.float64, workers=workers)
    loss_one, correct_one = one.forward_backward(idx, targets, n)
    for _ in range(2):  # the second step must not see the first one's gradients
        split.zero_grad()
        loss_split, correct_split = split.forward_backward(idx, targets, n)
    assert split.workers == workers
    assert loss_split == pytest.approx(loss_one, rel=1e-13)
    assert correct_split == correct_one
    for name in one.grads:
        np.testing.assert_allclose(split.grads[name], one.grads[name], rtol=1e-11, atol=1e-15, err_msg=name)
    loss_sum, n_correct = split.evaluate(idx, targets)
    assert n_correct == one.evaluate(idx, targets)[1] == correct_one and n == 5 * 6 - 4
    assert loss_sum == pytest.approx(loss_one, rel=1e-13)


def test_rows_are_cut_in_order_into_parts_that_differ_by_one_row_at_most():
    for n_rows in range(12):
        for parts in range(1, 6):
            rows = split_rows(n_rows, parts)
            sizes = [b - a for a, b in rows]
            assert len(rows) == parts and rows[0][0] == 0 and rows[-1][1] == n_rows
            assert all(rows[i][1] == rows[i + 1][0] for i in range(parts - 1))
            assert max(sizes) - min(sizes) <= 1
    assert split_rows(7, 2) == [(0, 3), (3, 7)]  # np.linspace's cut: the one the digests were recorded with


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_zero_clears_every_element_whatever_the_number_of_threads(threads):
    arrays = [np.arange(1, 5000, dtype=np.float32) for _ in range(3)]
    zero(arrays, ShardRunner(threads))
    assert not any(a.any() for a in arrays)


@pytest.mark.parametrize("workers", [1, 3])
def test_gradients_add_up_over_passes_until_zero_grad(workers):
    """Two passes over the halves of a batch give the gradients of one pass over all of it (the
    other workers' buffers hold one pass's gradients each time: zeroed by zero_grad, or before the
    pass that follows); an evaluation in between changes nothing."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, CFG.vocab_size, (6, 7))
    idx, targets = tokens[:, :-1], tokens[:, 1:]
    whole = LanguageModel(CFG, seed=1, dtype=np.float64, workers=workers)
    whole.zero_grad()
    whole.forward_backward(idx, targets, 36)
    parts = LanguageModel(CFG, seed=1, dtype=np.float64, workers=workers)
    for _ in range(2):  # the second step must not see the first one's gradients
        parts.zero_grad()
        parts.forward_backward(idx[:3], targets[:3], 36)
        parts.evaluate(idx, targets)
        parts.forward_backward(idx[3:], targets[3:], 36)
    for name, g in whole.grads.items():
        np.testing.assert_allclose(parts.grads[name], g, rtol=1e-11, atol=1e-15, err_msg=name)


def test_shards_run_at_the_same_time():
    both_started = threading.Barrier(2)

    def work(shard):
        both_started.wait(timeout=10)  # run one after the other, the first shard would fail here
        return shard

    assert ShardRunner(2).map(work, ["a", "b"]) == ["a", "b"]


@pytest.fixture
def two_blas_threads():
    with threadpool_limits(2, user_api="blas"):
        if blas_threads() != 2:
            pytest.skip("no BLAS library that threadpoolctl can limit")
        yield


def test_blas_gets_one_thread_per_shard_and_its_threads_back_after(two_blas_threads):
    assert ShardRunner(2).map(lambda s: blas_threads(), [0, 1]) == [1, 1]
    assert blas_threads() == 2
    assert ShardRunner(2).map(lambda s: blas_threads(), [0]) == [2]  # a single shard: BLAS keeps every core


def test_an_error_in_a_shard_reaches_the_caller_after_every_shard_stopped(two_blas_threads):
    finished = []

    def work(shard):
        if shard == 0:
            raise ValueError("shard 0 failed")
        threading.Event().wait(0.2)  # still running when shard 0 fails
        finished.append(shard)

    with pytest.raises(ValueError, match="shard 0 failed"):
        ShardRunner(2).map(work, [0, 1])
    assert finished == [1]
    assert blas_threads() == 2


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory() tunes glibc's malloc")
def test_worker_threads_reuse_freed_memory():
    """glibc gives each thread its own arena, and frees whole heaps of them back to the kernel:
    every step then page-faults on fresh memory again (2,500 faults a step here, before the fix)."""
    code = """
import resource, numpy as np
from config import ModelConfig
from language_model import LanguageModel
from parallel import keep_freed_memory
keep_freed_memory()  # as train.py and benchmark.py do first
model = LanguageModel(ModelConfig(vocab_size=4096, d_model=128, n_heads=4, d_ff=512, n_layers=2), workers=2)
tokens = np.random.default_rng(0).integers(0, 4096, (32, 129))
for _ in range(2):
    model.zero_grad()
    model.forward_backward(tokens[:, :-1], tokens[:, 1:], 32 * 128)
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model.zero_grad()
    model.forward_backward(tokens[:, :-1], tokens[:, 1:], 32 * 128)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[2])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    # the median step: now and then the heap still grows by a MB or two as the threads' timing varies
    assert int(out.stdout) < 100, f"{int(out.stdout)} page faults a step"


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_shard_sum_is_the_same_to_the_bit_whatever_the_number_of_threads(threads):
    rng = np.random.default_rng(4)
    shards = [rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-4, 4, 10_000) for _ in range(4)]
    expected = shards[0].copy()
    for s in shards[1:]:  # one element at a time: ((a0 + a1) + a2) + a3
        expected += s
    arrays = [s.copy() for s in shards]
    sum_into(arrays, ShardRunner(threads))
    assert np.array_equal(arrays[0], expected)
    assert all(np.array_equal(a, s) for a, s in zip(arrays[1:], shards[1:]))  # the others are left alone


def test_parameters_and_gradients_are_views_into_flat_buffers():
    model = LanguageModel(CFG, seed=1, workers=2)
    for tree in (model.params, model.grads):
        flat = tree.flat
        assert flat.ndim == 1 and flat.size == sum(v.size for v in tree.values())
        offset = 0
        for name, v in tree.items():  # back to back, in param_shapes order
            assert np.shares_memory(v, flat[offset : offset + v.size]), name
            offset += v.size
        for i, layer in enumerate(tree.layers):  # each block's views, without their "h.{i}." prefix
            assert layer.keys() == {k[len(f"h.{i}."):] for k in tree if k.startswith(f"h.{i}.")}
            assert all(v is tree[f"h.{i}.{k}"] for k, v in layer.items())
    assert len(model.params.layers) == CFG.n_layers
    model.params.flat[:] = 0.5
    assert (model.params["wte"] == 0.5).all()
    with pytest.raises(TypeError, match="in place"):
        model.params["wte"] = np.zeros_like(model.params["wte"])
    model.params["wte"] += 1.0  # in place: allowed
    assert (model.params.flat[: model.params["wte"].size] == 1.5).all()
    # the first worker adds into the model's own gradients, the second into a buffer of its own
    assert model.shards.grads[0] is model.grads
    other = model.shards.grads[1]
    assert other.flat is not model.grads.flat and np.shares_memory(other["wte"], other.flat)


def test_a_model_copies_given_parameters_and_checks_them():
    params = LanguageModel(CFG, seed=2, dtype=np.float64).params
    model = LanguageModel(CFG, params=dict(params))
    assert model.dtype == np.float64 and not np.shares_memory(model.params["wte"], params["wte"])
    assert all(np.array_equal(model.params[k], params[k]) for k in params)
    with pytest.raises(ValueError, match="missing"):
        LanguageModel(CFG, params={k: v for k, v in params.items() if k != "wte"})
    with pytest.raises(ValueError, match="shape"):
        LanguageModel(CFG, params={**params, "wte": np.zeros((3, 3))})
