"""What several test files (and scripts/fault_test.py) share: toy data and a tiny model's flags, the
metrics log, an optimizer hook, the MPI launcher and what runs under it compare. A test file imports
from here, never from another test file."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex

import train
from checkpoint import load_checkpoint
from pretokens import ENDOFTEXT, GPT2_PATTERN, split_on_specials
from tokenizer import SIDECAR_FORMAT, SIDECAR_VERSION, sidecar_path

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- toy data, a tiny run

V, EOT = 64, 63
# as an identity reads that a sidecar written before "lecture2_bpe" was renamed "bpe" holds
IDENTITY = {"type": "lecture2_bpe", "name": "toy", "n_vocab": V, "eot_id": EOT, "sha256": "0" * 64,
            "model_file": None}


def write_data(path, n_docs, seed, identity=IDENTITY, bytes_per_token=4):
    """Counting stories: a random start, then +1 (mod 60) each token, then end-of-text, with the sidecar
    tokenizer.py would write for them (identity None: none, a plain .jsonl). Easy to learn, so a few hundred
    tiny steps show the loss falling."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_docs):
        start, length = rng.integers(0, 60), rng.integers(10, 40)
        lines.append([int((start + i) % 60) for i in range(length)] + [EOT])
    with open(path, "w") as f:
        f.writelines(json.dumps(ids) + "\n" for ids in lines)
    n_tokens = sum(map(len, lines))
    if identity is not None:
        # as tokenizer.py counts them: the stories' bytes, not the newline between them
        meta = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "tokenizer": identity,
                "num_documents": n_docs, "num_lines": n_docs, "num_tokens": n_tokens,
                "num_bytes": bytes_per_token * (n_tokens - n_docs), "eot_appended": True, "max_length": 512,
                "source": "toy"}
        with open(sidecar_path(path), "w") as f:
            json.dump(meta, f)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(train, valid) .jsonl of counting stories with their sidecars, made once per test file that imports
    this fixture."""
    d = tmp_path_factory.mktemp("data")
    return write_data(d / "train.jsonl", 400, seed=1), write_data(d / "valid.jsonl", 60, seed=2)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """(train, valid) .jsonl of 100 and 30 counting stories: enough for runs of a few steps."""
    d = tmp_path_factory.mktemp("small_data")
    return write_data(d / "train.jsonl", 100, seed=1), write_data(d / "valid.jsonl", 30, seed=2)


def few_steps(data, save_dir, **over):
    """train.py's argv for a run of 4 steps of the tiny model on data, no evaluation (keyword arguments win)."""
    return tiny_flags(data, str(save_dir), **dict(dict(max_steps=4, eval_interval=0, log_interval=2), **over))


def tiny_flags(data, save_dir, **over):
    """train.py's argv for a tiny model on data (train, valid), flags given as keyword arguments
    (True: the flag alone; None or False: left out)."""
    flags = {"train_data": data[0], "val_data": data[1], "vocab_size": V, "d_model": 16, "n_heads": 2,
             "d_ff": 32, "n_layers": 1, "batch_size": 8, "seq_len": 16, "max_steps": 150,
             "learning_rate": 1e-2, "min_lr": 1e-3, "warmup_steps": 10, "save_dir": save_dir,
             "log_interval": 10, "eval_interval": 50, "save_interval": 50}
    flags.update(over)
    argv = []
    for k, v in flags.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not None and v is not False:
            argv += [f"--{k}", str(v)]
    return argv + ["--no_progress"]


def metrics(save_dir):
    """The records of save_dir/metrics.jsonl."""
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def after_each_update(then, setattr=setattr):
    """Make the optimizers train.py builds call then(optimizer) right after each of their updates (setattr:
    how train.make_optimizer is replaced, e.g. pytest's monkeypatch.setattr)."""
    real = train.make_optimizer

    def make_optimizer(*args, **kwargs):
        opt = real(*args, **kwargs)
        update = opt.step

        def update_then(grads, lr):
            update(grads, lr)
            then(opt)
        opt.step = update_then
        return opt
    setattr(train, "make_optimizer", make_optimizer)


def stop_at(step, monkeypatch):
    """Make the next train.main() get a Ctrl-C right after update `step` (it saves there and exits 130)."""
    after_each_update(lambda opt: opt.t == step and os.kill(os.getpid(), signal.SIGINT), monkeypatch.setattr)


def wait_until(predicate, timeout=60, what="the condition", poll=0.005):
    """Poll predicate() every poll seconds until it is true; an AssertionError after timeout seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"{what} did not happen within {timeout} s"
        time.sleep(poll)


def plain_counts(text):
    """The pre-token pieces of text the obvious way: what pretokens' counters must give."""
    pat = regex.compile(GPT2_PATTERN)
    return Counter(p for piece, special in split_on_specials(text, [ENDOFTEXT]) if not special
                   for p in pat.findall(piece))


# ---------------------------------------------------------------------------- MPI


def find_mpiexec():
    """The mpiexec next to this Python (the pip wheels put it there), else the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


MPIEXEC = find_mpiexec()
needs_mpi = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
                               reason="needs mpi4py and mpiexec: pip install mpi4py mpich")
# Open MPI refuses to start as root without these; MPICH ignores them. NUMPY_GPT_MPI_GRACE: rank 0's pause
# before it ends a job on an error, short here (distributed.MPI_GRACE)
MPI_ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
               NUMPY_GPT_MPI_GRACE="0.1")


def mpi_flavour():
    out = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
    return "openmpi" if "Open MPI" in out or "OpenRTE" in out or "prterun" in out else "mpich"


def same_arrays(path_a, path_b):
    """Assert that two checkpoints hold the same weights and optimizer state, bit for bit."""
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a.params.keys() == b.params.keys() and a.arrays.keys() == b.arrays.keys()
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)


def numbers(save_dir):
    """Every logged loss, accuracy and gradient norm, in order, full precision."""
    keys = ("loss", "accuracy", "grad_norm", "val_loss", "val_accuracy", "val_bpb", "val_tokens")
    return [(r["type"], r["step"], [r[k] for k in keys if k in r]) for r in metrics(save_dir)
            if r["type"] in ("train", "eval")]


def wait_for_rank_pid(save_dir, rank, timeout=60):
    """The pid of a rank, from the "ranks" record rank 0 writes at the start."""
    found = []

    def started():
        try:
            found.append(next(r["where"][rank][1] for r in metrics(save_dir) if r["type"] == "ranks"))
        except (OSError, StopIteration, ValueError):  # not written yet, or half of it
            return False
        return True
    wait_until(started, timeout, "the ranks' start", poll=0.1)
    return found[0]


def wait_for_steps(save_dir, steps, timeout=60):
    wait_until(lambda: any(r["type"] == "train" and r["step"] >= steps for r in metrics(save_dir)), timeout,
               f"step {steps}", poll=0.1)


def newest_checkpoint_resumes(data, save_dir):
    """The newest checkpoint is complete, and --resume goes on from it (a rank 0 killed in the middle of a
    write leaves only a .tmp file, never a truncated .npz; the next run deletes it)."""
    newest = max((f for f in os.listdir(save_dir) if f.endswith(".npz")), key=lambda f: int(f.split("_")[-1][:-4]))
    step = load_checkpoint(os.path.join(save_dir, newest)).meta["step"]
    assert step >= 100
    assert train.main(tiny_flags(data, save_dir, resume=True, max_steps=step + 2, log_interval=1)) == 0
    assert metrics(save_dir)[-1]["step"] == step + 2
    assert not [f for f in os.listdir(save_dir) if f.endswith(".tmp")]
    return os.path.join(save_dir, newest)
