"""The batch split over the cores (parallel.py) computes what one pass over the whole batch does."""
import platform
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from language_model import LanguageModel, ModelConfig
from loss import IGNORE_INDEX
from parallel import ShardRunner, blas_threads

ROOT = Path(__file__).resolve().parent.parent
CFG = ModelConfig(vocab_size=13, d_model=8, n_heads=2, d_ff=12, n_layers=2, max_seq_len=6)


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_shards_give_the_loss_and_gradients_of_the_whole_batch(workers):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (5, 7))  # 5 sequences: shards of unequal size
    idx, targets = tokens[:, :-1], tokens[:, 1:].copy()
    targets[4, :4] = IGNORE_INDEX  # the last shard counts fewer targets than the others
    one = LanguageModel(CFG, seed=1, dtype=np.float64, workers=1)
    split = LanguageModel(CFG, seed=1, dtype=np.float64, workers=workers)
    loss_one, acc_one = one.forward_backward(idx, targets)
    for _ in range(2):  # the second step must not see the first one's gradients
        loss_split, acc_split = split.forward_backward(idx, targets)
    assert len(split.shards) == min(workers, 5)
    assert loss_split == pytest.approx(loss_one, rel=1e-13)
    assert acc_split == acc_one
    for name in one.grads:
        np.testing.assert_allclose(split.grads[name], one.grads[name], rtol=1e-11, atol=1e-15, err_msg=name)
    loss_sum, n_correct, n = split.evaluate(idx, targets)
    assert (n_correct, n) == one.evaluate(idx, targets)[1:] and n == 5 * 6 - 4
    assert loss_sum / n == pytest.approx(loss_one, rel=1e-13)


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
from language_model import LanguageModel, ModelConfig
model = LanguageModel(ModelConfig(vocab_size=4096, d_model=128, n_heads=4, d_ff=512, n_layers=2), workers=2)
tokens = np.random.default_rng(0).integers(0, 4096, (32, 129))
for _ in range(2):
    model.forward_backward(tokens[:, :-1], tokens[:, 1:])
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model.forward_backward(tokens[:, :-1], tokens[:, 1:])
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[2])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    # the median step: now and then the heap still grows by a MB or two as the threads' timing varies
    assert int(out.stdout) < 100, f"{int(out.stdout)} page faults a step"
