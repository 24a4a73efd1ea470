"""Data-parallel training under mpiexec (distributed.py): N ranks train what one process with N workers
trains, bit for bit for N = 2; a dead rank stops the job with a message naming it and the checkpoint.

The runs need mpi4py and the mpiexec of the MPI it was built with (scripts/test.sh installs
`mpi4py mpich`); without them those tests skip. Tiny model, a few dozen steps: seconds each."""
import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

import distributed
import fake_cupy
import train
from checkpoint import load_checkpoint
from config import ModelConfig
from helpers import (MPI_ENV, MPIEXEC, REPO, metrics, mpi_flavour, needs_mpi, newest_checkpoint_resumes, numbers,
                     same_arrays, tiny_flags, wait_for_rank_pid, wait_for_steps, write_data)
from helpers import data  # noqa: F401  (a fixture)
from language_model import LanguageModel
from evaluation import evaluate


def mpirun(n, argv, launcher_flags=(), env=MPI_ENV, **kw):
    return subprocess.run([MPIEXEC, *launcher_flags, "-n", str(n), sys.executable, "train.py", *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120, **kw)


def stand_in_env(options=""):
    """The environment of ranks that each put the stand-in for CuPy (tests/fake_cupy.py) in CuPy's place,
    with fake_cupy.install()'s options, e.g. "gpus=2"."""
    return dict(MPI_ENV, PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "stand_in"),
                                                     *filter(None, [os.environ.get("PYTHONPATH")])]),
                FAKE_CUPY=options)


# ---------------------------------------------------------------------------- without MPI


def test_rank_rows_are_cut_as_the_workers_cut_a_batch():
    """The rows each rank takes (world.rows) are the rows each worker of one process computes."""
    cfg = ModelConfig(vocab_size=11, d_model=4, n_heads=2, d_ff=8, n_layers=1, max_seq_len=3)
    for n_ranks in (2, 3, 4):
        model = LanguageModel(cfg, workers=n_ranks)
        for rows in range(n_ranks, 12):
            idx = np.arange(rows)[:, None].repeat(3, axis=1) % 11
            workers = model.shards.run(lambda i, t, g, ws, row: (int(i[0, 0]), row, len(i)), idx, idx)
            ranks = [distributed.World.rows(SimpleNamespace(size=n_ranks, rank=r), rows) for r in range(n_ranks)]
            assert [(a, a, b - a) for a, b in ranks] == workers  # each worker told where its rows start
            assert ranks[0][0] == 0 and ranks[-1][1] == rows
            assert all(ranks[i][1] == ranks[i + 1][0] for i in range(n_ranks - 1))


@pytest.mark.parametrize("dropout", [0.0, 0.3])  # with dropout each rank draws the masks of its global rows
def test_ranks_rows_with_the_whole_batch_count_add_up_to_the_whole_batch_bit_for_bit(dropout):
    """forward_backward(..., n) on each rank's rows, the sums added: what one process with as many
    workers computes (the Allreduce done here by hand), bit for bit, ignored targets included."""
    from dropout import DropoutKey
    from loss import IGNORE_INDEX, count_targets
    cfg = ModelConfig(vocab_size=13, d_model=8, n_heads=2, d_ff=12, n_layers=1, max_seq_len=6, dropout=dropout)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (5, 7))
    x, y = tokens[:, :-1], tokens[:, 1:].copy()
    y[4, :3] = IGNORE_INDEX
    n, key = count_targets(y), DropoutKey(seed=2, step=9)
    whole = LanguageModel(cfg, seed=1, workers=2)
    loss_sum, n_correct = whole.forward_backward(x, y, n, key)
    rank_models = [LanguageModel(cfg, seed=1, workers=1) for _ in range(2)]
    sums, grads = [], []
    for r, model in enumerate(rank_models):
        a, b = distributed.World.rows(SimpleNamespace(size=2, rank=r), len(x))
        sums.append(model.forward_backward(x[a:b], y[a:b], n, key.offset(a)))
        grads.append(model.grads)
    assert sums[0][0] + sums[1][0] == loss_sum and sums[0][1] + sums[1][1] == n_correct
    for name, g in whole.grads.items():
        np.testing.assert_array_equal(grads[0][name] + grads[1][name], g, err_msg=name)


def test_each_rank_trains_on_its_own_gpu_where_there_are_enough():
    """The local rank modulo the GPUs CUDA shows, unless CUDA_VISIBLE_DEVICES already gives each rank on the
    machine GPUs of its own (a launcher that binds ranks to GPUs): then the first of them."""
    def gpu(local_rank, visible_devices, n_visible):
        return distributed.World.gpu(SimpleNamespace(local_rank=local_rank, visible_devices=visible_devices),
                                     n_visible)
    unset = [None] * 4
    assert [gpu(r, unset, 4) for r in range(4)] == [0, 1, 2, 3]
    assert [gpu(r, unset, 2) for r in range(4)] == [0, 1, 0, 1]  # more ranks than GPUs: they share
    assert [gpu(r, unset[:2], 1) for r in range(2)] == [0, 0]
    assert [gpu(r, ["0,1,2,3"] * 4, 4) for r in range(4)] == [0, 1, 2, 3]  # the same GPUs for all
    assert [gpu(r, ["3", "2", "1", "0"], 1) for r in range(4)] == [0, 0, 0, 0]  # one GPU given to each
    assert [gpu(r, ["0,1", "2,3"], 2) for r in range(2)] == [0, 0]  # two of its own each: the first
    assert [gpu(r, ["0,1", "1,2"], 2) for r in range(2)] == [0, 1]  # sharing GPU 1: not their own
    assert [gpu(r, ["0", None], 2) for r in range(2)] == [0, 1]
    assert gpu(0, [None], 3) == gpu(0, ["2"], 1) == 0  # alone (Solo)
    assert distributed.Solo().gpu(2) == 0


class TwinComm:
    """mpi4py's COMM_WORLD as rank 0 of 2 sees it, where rank 1 holds what rank 0 holds: a sum doubles. Like
    mpi4py's it takes host buffers only (the stand-in's device arrays have no buffer interface; a real CuPy
    array would reach an MPI that is not CUDA-aware as a device pointer, and crash it)."""
    COMM_TYPE_SHARED, IN_PLACE, SUM, MAX = "shared", "in place", "sum", "max"
    Exception = RuntimeError

    def __init__(self):
        self.buffers = []  # what each Allreduce was given

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def Split_type(self, kind):
        return self  # both ranks on this machine

    def allgather(self, obj):
        return [obj, obj]

    def Get_processor_name(self):
        return "here"

    def bcast(self, obj, root=0):
        return obj

    def Barrier(self):
        pass

    def Allreduce(self, in_place, buf, op):
        assert in_place == self.IN_PLACE and isinstance(buf, np.ndarray), type(buf)
        self.buffers.append(buf)
        if op == self.SUM:
            buf *= 2


@contextlib.contextmanager
def twin_ranks():
    comm = TwinComm()
    ranks = distributed.MPIRanks(comm, comm)
    try:
        yield ranks, comm
    finally:
        ranks.watchdog.stop()


def test_on_the_gpu_gradients_and_sums_cross_to_the_host_in_one_copy_each():
    """The flat gradients: one copy into a host buffer made once, the Allreduce there, one copy back. The few
    sums (0-d arrays on the GPU, and the stop vote on the host): one copy for all, no other read."""
    with twin_ranks() as (ranks, comm), fake_cupy.installed() as cupy:
        grads = cupy.asarray(np.arange(6, dtype=np.float32))
        for _ in range(2):
            copies = fake_cupy.counts.host_copies
            ranks.allreduce_(grads)
            assert fake_cupy.counts.host_copies - copies == 1
        np.testing.assert_array_equal(cupy.asnumpy(grads), 4 * np.arange(6))
        assert comm.buffers[0] is comm.buffers[1] and comm.buffers[0].dtype == np.float32
        loss_sum, n_correct = cupy.asarray(np.float32(1.5)), cupy.asarray(np.int64(3))
        copies, syncs = fake_cupy.counts.host_copies, fake_cupy.counts.syncs
        summed = ranks.sum([loss_sum, n_correct, True])
        assert (fake_cupy.counts.host_copies - copies, fake_cupy.counts.syncs - syncs) == (1, 0)
        assert type(summed) is np.ndarray and summed.dtype == np.float64
        np.testing.assert_array_equal(summed, [3.0, 6.0, 2.0])
        cfg = ModelConfig(vocab_size=11, d_model=4, n_heads=2, d_ff=8, n_layers=1, max_seq_len=3)
        gpu = LanguageModel(cfg, seed=3, device="cuda")
        assert distributed.params_checksum(gpu.params) == distributed.params_checksum(LanguageModel(cfg, seed=3).params)


def test_a_gpu_training_step_under_mpi_copies_to_the_host_twice_and_reads_once(data, tmp_path, monkeypatch):
    """train.py's loop, twin ranks: each step copies the gradients and the two sums to the host (and the
    gradients back) and reads one value (the gradient norm), as one process on a GPU does."""
    def run(steps):
        with twin_ranks() as (ranks, comm), fake_cupy.installed():
            monkeypatch.setattr(distributed, "world", lambda *args, **kwargs: ranks)
            monkeypatch.setattr(ranks, "limit_threads", lambda: 1)  # BLAS in this process left alone
            assert train.main(tiny_flags(data, str(tmp_path / str(steps)), max_steps=steps, log_interval=100,
                                         eval_interval=0, save_interval=0, device="cuda")) == 0
            return fake_cupy.counts.host_copies, fake_cupy.counts.syncs, len(comm.buffers)
    (copies_3, syncs_3, reduced_3), (copies_5, syncs_5, reduced_5) = run(3), run(5)
    assert (copies_5 - copies_3, syncs_5 - syncs_3) == (2 * 2, 2 * 1)
    assert reduced_5 - reduced_3 == 2 * 3  # the gradients, the sums, the stop vote


def test_gpu_evaluation_under_mpi_sums_only_the_vote_batch_by_batch(tmp_path):
    """Each rank's loss and correct count stay on its GPU over the batches and cross once at the end (one
    copy, one Allreduce); a batch's Allreduce carries only the stop vote. The result is the CPU's."""
    from data_loader import eval_batches, load_dataset
    from device import whole_array_mode
    val = load_dataset(write_data(tmp_path / "valid.jsonl", 60, seed=2), vocab_size=64)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_heads=2, d_ff=32, n_layers=1, max_seq_len=16)
    n_batches = len(list(eval_batches(val, 4, 16)))
    with twin_ranks() as (ranks, comm):
        with whole_array_mode():
            expected = evaluate(LanguageModel(cfg, seed=1), val, 4, 16, world=ranks)
        assert len(comm.buffers) == n_batches  # on the CPU: the sums and the vote, batch by batch
        comm.buffers.clear()
        with fake_cupy.installed():
            gpu = LanguageModel(cfg, seed=1, device="cuda", for_training=False)
            copies, syncs = fake_cupy.counts.host_copies, fake_cupy.counts.syncs
            res = evaluate(gpu, val, 4, 16, world=ranks)
            assert (fake_cupy.counts.host_copies - copies, fake_cupy.counts.syncs - syncs) == (1, 0)
    assert [len(b) for b in comm.buffers] == [1] * n_batches + [2]
    assert res.keys() == expected.keys() and res["val_tokens"] == expected["val_tokens"] > 0
    for k in res:
        assert res[k] == pytest.approx(expected[k], rel=1e-6), k


def test_outside_mpiexec_nothing_changes_and_mpi4py_is_not_imported():
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_VARS}
    code = "import sys, distributed; print(type(distributed.world()).__name__, 'mpi4py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["Solo", "False"], out.stderr


def fake_exit(exits):
    """os._exit for a test: records the exit code, then ends only the calling thread (SystemExit)."""
    def _exit(code):
        exits.append(code)
        raise SystemExit(code)
    return _exit


def test_the_watchdog_names_a_dead_rank_through_the_callback_it_was_built_with(monkeypatch, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # gone, and reaped: as a rank that was killed
    ranks = SimpleNamespace(rank=0, size=2, neighbours=[0, 1], where=[("here", os.getpid()), ("here", dead.pid)])
    exits, heard = [], []
    monkeypatch.setattr(distributed.os, "_exit", fake_exit(exits))
    dog = distributed.Watchdog(ranks, on_lost=lambda what: heard.append(what) or f"error: {what}. Resume from X")
    dog.stop()  # its thread looks only while a collective waits; here lost() is called directly
    with pytest.raises(SystemExit):
        dog.lost("a rank died")
    assert exits == [distributed.EXIT_RANK_LOST]
    assert heard == [f"rank 1 (pid {dead.pid} on here) is gone, so the MPI job stops (seen by rank 0)"]
    assert capsys.readouterr().err == f"error: {heard[0]}. Resume from X\n"


def test_the_watchdog_ends_a_wait_longer_than_its_limit(monkeypatch, capsys):
    """Rank 1 on another machine answers no more: after the limit the watchdog's thread speaks."""
    aborted, exits = [], []
    ranks = SimpleNamespace(rank=0, size=2, neighbours=[0], where=[("here", os.getpid()), ("there", 1)],
                            end_job=aborted.append)
    dog = distributed.Watchdog(ranks)  # no callback: the plain message
    # os._exit, in the watchdog's thread: recorded, and the thread stops watching
    monkeypatch.setattr(distributed.os, "_exit", lambda code: exits.append(code) or dog.stop())
    with dog.waiting(0.3):
        end = time.monotonic() + 10
        while not exits and time.monotonic() < end:
            time.sleep(0.05)
    assert exits == [distributed.EXIT_RANK_LOST]
    assert aborted == [distributed.EXIT_RANK_LOST]  # the whole job: mpiexec would wait for a hung rank there
    assert capsys.readouterr().err == ("error: no answer from the other ranks for 0 s: one of ranks 1, on other "
                                       "machines, died or hangs, so the MPI job stops (seen by rank 0)\n")


def test_mpiexec_without_mpi4py_is_a_clear_error(data, tmp_path):
    """Several processes started by mpiexec with no mpi4py would each train alone into the same files."""
    env = dict(os.environ, PMI_SIZE="2", PMI_RANK="0")
    code = ("import sys; sys.modules['mpi4py'] = None\n"  # an import of it now fails, as when not installed
            "import train; sys.exit(train.main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, *tiny_flags(data, str(tmp_path / "ck"), max_steps=2)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "mpi4py is not installed" in out.stderr and "pip install mpi4py" in out.stderr
    assert "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "ck" / "checkpoint_final.npz")


# ---------------------------------------------------------------------------- under mpiexec


@needs_mpi
@pytest.mark.parametrize("story_starts", [False, True])
def test_two_ranks_train_bit_for_bit_what_two_workers_train(data, tmp_path, story_starts):
    """Same losses, evaluations, weights and optimizer state; then a checkpoint of either resumed by the
    other finishes exactly as the uninterrupted run (and says nothing of the changed split: it changes nothing)."""
    flags = dict(max_steps=30, log_interval=5, eval_interval=10, save_interval=10, batch_size=7,  # 4 + 3 rows
                 story_starts=story_starts)
    ranks_dir, workers_dir = str(tmp_path / "ranks"), str(tmp_path / "workers")
    run = mpirun(2, tiny_flags(data, ranks_dir, **flags))
    assert run.returncode == 0, run.stderr
    assert "2 MPI ranks on 1 machine" in run.stdout and run.stdout.count("done: 30 steps") == 1  # rank 0 alone
    assert train.main(tiny_flags(data, workers_dir, workers=2, **flags)) == 0
    assert numbers(ranks_dir) == numbers(workers_dir)
    same_arrays(os.path.join(ranks_dir, "checkpoint_final.npz"), os.path.join(workers_dir, "checkpoint_final.npz"))

    for source, n_ranks in ((ranks_dir, 1), (workers_dir, 2)):
        resumed = str(tmp_path / f"resumed_by_{n_ranks}")
        shutil.copytree(source, resumed)
        for later in ("checkpoint_final.npz", "checkpoint_step_20.npz"):
            os.unlink(os.path.join(resumed, later))  # the newest left: step 10
        argv = tiny_flags(data, resumed, resume=True, **flags)
        if n_ranks == 1:
            out = subprocess.run([sys.executable, "train.py", *argv, "--workers", "2"], cwd=REPO,
                                 capture_output=True, text=True, timeout=120)
        else:
            out = mpirun(2, argv)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "in the last bits" not in out.stdout
        assert "resumed from" in out.stdout and "checkpoint_step_10.npz at step 10" in out.stdout
        same_arrays(os.path.join(resumed, "checkpoint_final.npz"), os.path.join(workers_dir, "checkpoint_final.npz"))


@needs_mpi
@pytest.mark.parametrize("features", [{}, dict(qk_norm=True, logit_softcap=5.0, activation="relu2", zero_init_proj=True)])
def test_two_ranks_train_a_llama_model_bit_for_bit_as_two_workers(data, tmp_path, features):
    """--arch llama (grouped-query attention, dropout; also with issue 29's model options): the same losses,
    evaluations, weights and optimizer state."""
    flags = dict(arch="llama", n_heads=4, n_kv_heads=2, max_steps=12, log_interval=3, eval_interval=6,
                 save_interval=0, batch_size=7, dropout=0.1, **features)
    ranks_dir, workers_dir = str(tmp_path / "ranks"), str(tmp_path / "workers")
    run = mpirun(2, tiny_flags(data, ranks_dir, **flags))
    assert run.returncode == 0, run.stderr
    assert "2 MPI ranks on 1 machine" in run.stdout
    assert train.main(tiny_flags(data, workers_dir, workers=2, **flags)) == 0
    assert numbers(ranks_dir) == numbers(workers_dir) and len(numbers(ranks_dir)) == 6
    final = [os.path.join(d, "checkpoint_final.npz") for d in (ranks_dir, workers_dir)]
    assert load_checkpoint(final[0]).config.arch == "llama"
    same_arrays(*final)


@needs_mpi
def test_two_ranks_train_bit_for_bit_what_two_workers_train_with_dropout(data, tmp_path):
    """Each rank draws the dropout masks of its rows' places in the global batch, as each worker does."""
    flags = dict(max_steps=20, log_interval=5, eval_interval=10, save_interval=10, batch_size=7, dropout=0.2)
    ranks_dir, workers_dir = str(tmp_path / "ranks"), str(tmp_path / "workers")
    run = mpirun(2, tiny_flags(data, ranks_dir, **flags))
    assert run.returncode == 0, run.stderr
    assert train.main(tiny_flags(data, workers_dir, workers=2, **flags)) == 0
    assert numbers(ranks_dir) == numbers(workers_dir)
    same_arrays(os.path.join(ranks_dir, "checkpoint_final.npz"), os.path.join(workers_dir, "checkpoint_final.npz"))
    assert load_checkpoint(os.path.join(ranks_dir, "checkpoint_final.npz")).config.dropout == 0.2


@needs_mpi
@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed: the ranks would train")
def test_ranks_on_the_gpu_without_cupy_stop_with_one_line(data, tmp_path):
    out = mpirun(2, tiny_flags(data, str(tmp_path / "ck"), max_steps=2) + ["--device", "cuda"])
    assert out.returncode != 0
    assert (out.stdout + out.stderr).count("error: --device cuda needs CuPy") == 1 and "Traceback" not in out.stderr


@needs_mpi
def test_two_ranks_on_one_gpu_train_what_one_process_on_it_trains(data, tmp_path):
    """Every rank with the stand-in for CuPy, its scatter-add in NumPy's order. 2 ranks sharing one "GPU"
    train what one process on it trains, to float32 rounding: the two halves of a batch add up otherwise
    than one whole-array pass over it. Resumed on two "GPUs", one each, they end exactly where they did."""
    flags = dict(max_steps=20, log_interval=5, eval_interval=10, save_interval=10, batch_size=7, device="cuda")
    ranks_dir, one_dir, resumed = str(tmp_path / "ranks"), str(tmp_path / "one"), str(tmp_path / "resumed")
    run = mpirun(2, tiny_flags(data, ranks_dir, **flags), env=stand_in_env("shuffle_scatter=0"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rank 0 on GPU 0 (0000:01:00.0), rank 1 on GPU 0 (0000:01:00.0)" in run.stdout
    with fake_cupy.installed(shuffle_scatter=False):
        assert train.main(tiny_flags(data, one_dir, **flags)) == 0
    ranks, one = numbers(ranks_dir), numbers(one_dir)
    assert [r[:2] for r in ranks] == [r[:2] for r in one]
    for (_, _, x), (_, _, y) in zip(ranks, one):
        np.testing.assert_allclose(x, y, rtol=1e-5)
    a, b = (load_checkpoint(os.path.join(d, "checkpoint_final.npz")) for d in (ranks_dir, one_dir))
    for name in a.params:
        np.testing.assert_allclose(a.params[name], b.params[name], rtol=0, atol=2e-4, err_msg=name)

    shutil.copytree(ranks_dir, resumed)
    os.unlink(os.path.join(resumed, "checkpoint_final.npz"))
    run = mpirun(2, tiny_flags(data, resumed, resume=True, **flags), env=stand_in_env("shuffle_scatter=0 gpus=2"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rank 0 on GPU 0 (0000:01:00.0), rank 1 on GPU 1 (0000:02:00.0)" in run.stdout
    assert "checkpoint_step_10.npz at step 10" in run.stdout
    same_arrays(os.path.join(resumed, "checkpoint_final.npz"), os.path.join(ranks_dir, "checkpoint_final.npz"))


@needs_mpi
@pytest.mark.slow
def test_evaluation_shared_unevenly_is_not_taken_for_a_hung_rank(data, tmp_path):
    """Rows split 1 and 2: the rank with one row finishes each batch first. Summed once at the end it
    waited the whole evaluation's difference, past --rank_timeout, and the job stopped before its final
    checkpoint; summed batch by batch, no rank waits longer than a batch."""
    val = write_data(tmp_path / "big_valid.jsonl", 12000, seed=3)
    flags = tiny_flags((data[0], val), str(tmp_path / "ck"), max_steps=1, batch_size=3, eval_interval=0,
                       save_interval=0, vocab_size=16384) + ["--rank_timeout", "1"]  # a wide head: rows cost
    out = mpirun(2, flags)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "eval step 1" in out.stdout and os.path.exists(tmp_path / "ck" / "checkpoint_final.npz")


@needs_mpi
def test_three_ranks_train_what_three_workers_train(data, tmp_path):
    """MPI may add three partial sums in another order than one process: equal to float32 rounding."""
    flags = dict(max_steps=10, log_interval=5, eval_interval=0, save_interval=0, batch_size=8)
    run = mpirun(3, tiny_flags(data, str(tmp_path / "ranks"), **flags))
    assert run.returncode == 0, run.stderr
    assert train.main(tiny_flags(data, str(tmp_path / "workers"), workers=3, **flags)) == 0
    a = load_checkpoint(str(tmp_path / "ranks" / "checkpoint_final.npz"))
    b = load_checkpoint(str(tmp_path / "workers" / "checkpoint_final.npz"))
    for name in a.params:
        np.testing.assert_allclose(a.params[name], b.params[name], rtol=1e-4, atol=1e-6, err_msg=name)
    for (_, _, x), (_, _, y) in zip(numbers(str(tmp_path / "ranks")), numbers(str(tmp_path / "workers"))):
        np.testing.assert_allclose(x, y, rtol=1e-5)


@needs_mpi
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(data, tmp_path):
    save_dir = str(tmp_path / "ck")
    argv = tiny_flags(data, save_dir, max_steps=1_000_000, log_interval=100, eval_interval=0, save_interval=0)
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "train.py", *argv], cwd=REPO, env=MPI_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for_rank_pid(save_dir, 1)
        wait_for_steps(save_dir, 100)
        os.kill(pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "terminated (SIGTERM) on another rank" in out, out + err
    stopped = [r for r in metrics(save_dir) if r["type"] == "stopped"]
    assert len(stopped) == 1
    ck = load_checkpoint(os.path.join(save_dir, f"checkpoint_step_{stopped[0]['step']}.npz"))
    assert ck.meta["step"] == stopped[0]["step"] and ck.meta["ranks"] == 2


def run_and_hurt_rank_1(save_dir, argv, sig):
    """Start 2 ranks, send sig to rank 1 once two checkpoints are written; (stdout + stderr, seconds the job
    took to end after that, rank 1's pid)."""
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "train.py", *argv], cwd=REPO, env=MPI_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for_rank_pid(save_dir, 1)
        wait_for_steps(save_dir, 120)  # checkpoints at steps 50 and 100 written, the run going on
        os.kill(pid, sig)
        t = time.monotonic()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        return out + err, time.monotonic() - t, pid  # MPICH sends the ranks' stderr to stdout
    finally:
        proc.kill()
        if sig == signal.SIGSTOP:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def the_error(output, save_dir):
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output  # one survivor speaks for all
    assert [r["message"] for r in metrics(save_dir) if r["type"] == "error"] == lines
    return lines[0]


@needs_mpi
def test_a_killed_rank_ends_the_job_naming_it_and_the_checkpoint_to_resume_from(data, tmp_path):
    """kill -9 of rank 1 mid-run. Open MPI's mpiexec sends the survivors a SIGTERM, then ends them: rank 0's
    watchdog speaks first. MPICH's kills them at once, with SIGKILL, and names the lost pid itself; rank 0's
    first log line maps pids to ranks. Either way the job ends at once and the newest checkpoint loads."""
    save_dir = str(tmp_path / "ck")
    argv = tiny_flags(data, save_dir, max_steps=1_000_000, log_interval=50, eval_interval=0, save_interval=50)
    output, ended_after, pid = run_and_hurt_rank_1(save_dir, argv, signal.SIGKILL)
    assert ended_after < 30
    message = the_error(output, save_dir) if mpi_flavour() == "openmpi" else None
    newest = newest_checkpoint_resumes(data, save_dir)
    if message is not None:
        assert f"rank 1 (pid {pid} on" in message and "is gone" in message
        assert f"Resume from {newest}: the same mpiexec command plus --resume" in message
    else:
        assert f"1={pid}" in output and f"PID {pid}" in output


@needs_mpi
def test_a_hung_rank_ends_the_job_after_rank_timeout_naming_it_and_the_checkpoint(data, tmp_path):
    """A rank that stops answering (here SIGSTOP; a machine that drops off the network looks the same)
    leaves the others waiting in Allreduce, and no launcher notices: the watchdog ends the job."""
    save_dir = str(tmp_path / "ck")
    argv = tiny_flags(data, save_dir, max_steps=1_000_000, log_interval=50, eval_interval=0, save_interval=50,
                      rank_timeout=3)
    output, ended_after, pid = run_and_hurt_rank_1(save_dir, argv, signal.SIGSTOP)
    assert 3 <= ended_after < 30
    message = the_error(output, save_dir)
    newest = newest_checkpoint_resumes(data, save_dir)
    assert "no answer from the other ranks for 3 s" in message
    assert f"rank 1 (pid {pid} on" in message and "is stopped" in message
    assert f"Resume from {newest}: the same mpiexec command plus --resume" in message


@needs_mpi
def test_errors_on_every_rank_end_the_job_with_one_clear_message(data, tmp_path):
    run = mpirun(2, tiny_flags(data, str(tmp_path / "ck"), batch_size=1))
    assert run.returncode != 0
    assert (run.stdout + run.stderr).count("error: --batch_size 1 is smaller than the 2 MPI ranks") == 1
    assert "Traceback" not in run.stderr


@needs_mpi
def test_ranks_that_start_from_different_flags_or_weights_stop_with_a_clear_error(data, tmp_path):
    argv = tiny_flags(data, str(tmp_path / "ck"), max_steps=3)
    run = subprocess.run([MPIEXEC, "-n", "1", sys.executable, "train.py", *argv, ":",  # rank 1: another seed
                          "-n", "1", sys.executable, "train.py", *argv, "--seed", "1"],
                         cwd=REPO, env=MPI_ENV, capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert output.count("error: the ranks disagree about the data, the flags and the weights") == 1, output
    assert "--seed: 0 on rank 0 but 1 on rank 1" in output and "Traceback" not in output
    assert not os.path.exists(tmp_path / "ck" / "checkpoint_final.npz")
