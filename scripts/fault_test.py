"""Fault tests for training: kill -9 at random moments, a full disk, damaged files.

Each fault hits a real train.py process (a tiny model on generated counting stories):

  kills      kill -9 five times at random moments (right after an update, halfway through writing
             a checkpoint, in the middle of an evaluation, or from a timer at any instant),
             resuming after each: every kill leaves a loadable newest checkpoint, and the final
             weights, optimizer state and batch position are bit-identical to an uninterrupted run
  disk_full  a checkpoint write fails for lack of space (a file size limit, RLIMIT_FSIZE, makes
             write() raise EFBIG): one line says the disk is full, the previous checkpoint is
             intact, and resuming afterwards still ends bit-identical to the uninterrupted run
  damage     checkpoints and tokenized data files (.jsonl, its sidecar, the .tokens.bin cache and
             its record) cut at random offsets or with random bytes flipped: loading gives the
             original data or one error naming the file, never a traceback; the command lines
             (train.py --resume, generate.py --checkpoint, checkpoint.py) print one line

    python3 scripts/fault_test.py                       # all of it, about a minute on 2 cores
    python3 scripts/fault_test.py --trials 10 --seed 7  # more random kill sequences
    python3 scripts/fault_test.py --only damage --variants 2000

tests/test_faults.py runs a reduced form of the same functions in CI.
"""
import argparse
import glob
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

V, EOT = 64, 63
IDENTITY = {"type": "lecture2_bpe", "name": "counting", "n_vocab": V, "eot_id": EOT, "sha256": "0" * 64,
            "model_file": None}
KILLS = ("step", "checkpoint", "eval", "timer")


def write_data(path, n_docs, seed):
    """Counting stories (a random start, +1 mod 60 each token, then end-of-text) and the sidecar
    tokenizer.py would write for them."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_docs):
        start, length = rng.randrange(60), rng.randrange(10, 40)
        lines.append([(start + i) % 60 for i in range(length)] + [EOT])
    with open(path, "w") as f:
        f.writelines(json.dumps(ids) + "\n" for ids in lines)
    n_tokens = sum(map(len, lines))
    sidecar = {"format": "numpy-gpt tokenized jsonl", "version": 1, "tokenizer": IDENTITY,
               "num_documents": n_docs, "num_lines": n_docs, "num_tokens": n_tokens,
               "num_bytes": 3 * (n_tokens - n_docs), "eot_appended": True, "max_length": 512, "source": "generated"}
    with open(str(path) + ".meta.json", "w") as f:
        json.dump(sidecar, f)
    return str(path)


def make_data(folder):
    os.makedirs(folder, exist_ok=True)
    return (write_data(os.path.join(folder, "train.jsonl"), 300, seed=1),
            write_data(os.path.join(folder, "valid.jsonl"), 40, seed=2))


def train_flags(data, save_dir, resume=False, **over):
    flags = {"train_data": data[0], "val_data": data[1], "vocab_size": V, "d_model": 16, "n_heads": 2, "d_ff": 32,
             "n_layers": 1, "batch_size": 8, "seq_len": 16, "max_steps": 300, "learning_rate": 1e-2, "min_lr": 1e-3,
             "warmup_steps": 10, "save_dir": save_dir, "log_interval": 10, "eval_interval": 20, "eval_batches": 2,
             "save_interval": 10, "workers": 2}
    flags.update(over)
    argv = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    return argv + ["--no_progress"] + (["--resume"] if resume else [])


# ----------------------------------------------------------------------------------------------
# The child process: train.py with one fault injected


def child(fault, at, argv):
    """train.main(argv) in this process, with `fault` at its at-th occasion (see KILLS, "disk_full")."""
    import numpy as np

    import train
    from language_model import LanguageModel
    count = [0]

    def due():
        count[0] += 1
        return count[0] == at

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if fault == "step":  # the weights changed in memory, nothing saved yet
        real_make_optimizer = train.make_optimizer

        def make_optimizer(*args, **kwargs):
            opt = real_make_optimizer(*args, **kwargs)
            update = opt.step

            def update_then_die(grads, lr):
                update(grads, lr)
                if due():
                    die()
            opt.step = update_then_die
            return opt
        train.make_optimizer = make_optimizer
    elif fault == "checkpoint":  # half of a checkpoint's bytes written (and on disk)
        real_savez = np.savez

        def savez(file, **arrays):
            if not due():
                return real_savez(file, **arrays)
            buf = io.BytesIO()
            real_savez(buf, **arrays)
            file.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            file.flush()
            os.fsync(file.fileno())
            die()
        np.savez = savez
    elif fault == "eval":  # in the middle of an evaluation
        real_evaluate = LanguageModel.evaluate

        def evaluate(self, idx, targets):
            if due():
                die()
            return real_evaluate(self, idx, targets)
        LanguageModel.evaluate = evaluate
    elif fault == "timer":  # at any instant: `at` milliseconds after training starts
        real_loop = train.train_loop

        def train_loop(run):
            threading.Timer(at / 1000, die).start()
            return real_loop(run)
        train.train_loop = train_loop
    elif fault == "disk_full":  # the at-th checkpoint finds no room: writes past half its size fail
        import resource
        real_save = train.save

        def save(run, name):
            if due():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that write() fails with EFBIG instead
                limit = os.path.getsize(run.last_good) // 2
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            return real_save(run, name)
        train.save = save
    elif fault != "none":
        raise SystemExit(f"unknown fault {fault!r}")
    sys.exit(train.main(argv))


def run_child(fault, at, argv, timeout=300):
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "child", fault, str(at), "--", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


# ----------------------------------------------------------------------------------------------
# The checks


def same_run(dir_a, dir_b):
    """Assert that two runs ended with bit-identical weights, optimizer state and batch position."""
    import numpy as np

    from checkpoint import load_checkpoint
    a, b = (load_checkpoint(os.path.join(d, "checkpoint_final.npz")) for d in (dir_a, dir_b))
    assert a.meta["step"] == b.meta["step"] and a.meta["data"] == b.meta["data"], "batch position differs"
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), f"weights {name} differ"
    for name in a.arrays:
        assert np.array_equal(a.arrays[name], b.arrays[name]), f"optimizer state {name} differs"


def reference_run(work, data):
    ref = os.path.join(work, "reference")
    if not os.path.exists(os.path.join(ref, "checkpoint_final.npz")):
        rc, _, err = run_child("none", 0, train_flags(data, ref))
        assert rc == 0, err
    return ref


def newest_is_loadable(save_dir):
    """The checkpoint a bare --resume would take loads (None when no checkpoint was written yet)."""
    from checkpoint import load_checkpoint
    from run_dir import RunDir
    if not glob.glob(os.path.join(save_dir, "checkpoint_*.npz")):
        return None
    path = RunDir(save_dir).choose_resume()
    return path, load_checkpoint(path).meta["step"]


def kill_and_resume(work, data, rng, kinds=None, say=print):
    """kill -9 five times (or once per entry of kinds, from KILLS) at random moments, resuming each
    time; then finish the run and compare it with the uninterrupted one."""
    ref = reference_run(work, data)
    d = os.path.join(work, f"killed-{rng.randrange(10**9)}")
    history = []
    for kind in kinds or [rng.choice(KILLS) for _ in range(5)]:
        # bounded so that five kills come before the run's 300 steps are done
        at = {"step": rng.randint(1, 30), "checkpoint": rng.randint(1, 3), "eval": rng.randint(1, 4),
              "timer": rng.randint(1, 100)}[kind]
        resume = bool(glob.glob(os.path.join(d, "checkpoint_*.npz")))
        rc, out, err = run_child(kind, at, train_flags(data, d, resume=resume))
        assert rc == -signal.SIGKILL, f"{kind} at {at}: the run was not killed (exit {rc}): {err[-2000:]}"
        newest = newest_is_loadable(d)
        history.append((kind, at, newest[1] if newest else None))
        say(f"  kill -9 {kind:10} at {at:3}: newest checkpoint {newest[0] if newest else '(none yet)'}")
    rc, out, err = run_child("none", 0, train_flags(data, d, resume=bool(newest_is_loadable(d))))
    assert rc == 0, err
    same_run(ref, d)
    with open(os.path.join(d, "metrics.jsonl")) as f:
        logged = [json.loads(line)["step"] for line in f if '"type": "train"' in line]
    assert logged == list(range(10, 301, 10)), "metrics.jsonl does not read as one run"
    return history


def full_disk(work, data, at=3, say=print):
    """The at-th checkpoint write finds the disk full: one line, the previous checkpoint intact, and a
    resume afterwards ends as the uninterrupted run."""
    from checkpoint import load_checkpoint
    ref = reference_run(work, data)
    d = os.path.join(work, "disk-full")
    rc, out, err = run_child("disk_full", at, train_flags(data, d))
    previous = os.path.join(d, f"checkpoint_step_{10 * (at - 1)}.npz")
    assert rc == 1, f"exit {rc}: {err[-2000:]}"
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: cannot write "), err
    assert "the disk is full" in err and previous in err, err
    assert load_checkpoint(previous).meta["step"] == 10 * (at - 1)
    assert not glob.glob(os.path.join(d, "*.tmp")), "a temp file was left behind"
    assert not os.path.exists(os.path.join(d, f"checkpoint_step_{10 * at}.npz"))
    say(f"  {err.strip()}")
    rc, out, err = run_child("none", 0, train_flags(data, d, resume=True))
    assert rc == 0, err
    same_run(ref, d)


def damage(blob, rng):
    """blob cut at a random offset, or with 1 to 4 random bytes changed; and how."""
    if rng.random() < 0.5:
        cut = rng.randrange(len(blob))
        return blob[:cut], f"cut at byte {cut}"
    out = bytearray(blob)
    where = sorted(rng.randrange(len(blob)) for _ in range(rng.randint(1, 4)))
    for i in where:
        out[i] ^= rng.randrange(1, 256)
    return bytes(out), f"bytes {where} changed"


def one_line_naming(message, path):
    assert "\n" not in message.strip() and str(path) in message, message


def damaged_checkpoints(work, rng, variants=200):
    """Load a damaged copy of a checkpoint `variants` times: the original arrays, or a CheckpointError
    naming the file."""
    import numpy as np

    from checkpoint import CheckpointError, load_checkpoint
    ref = reference_run(work, make_data(os.path.join(work, "data")))
    good_path = os.path.join(ref, "checkpoint_step_20.npz")
    good = load_checkpoint(good_path)
    blob = open(good_path, "rb").read()
    path = os.path.join(work, "damaged.npz")
    errors = 0
    for _ in range(variants):
        bad, how = damage(blob, rng)
        with open(path, "wb") as f:
            f.write(bad)
        try:
            ck = load_checkpoint(path)
        except CheckpointError as e:
            one_line_naming(str(e), path)
            errors += 1
            continue
        except Exception as e:
            raise AssertionError(f"checkpoint {how}: {type(e).__name__}: {e}") from None
        for name, arr in good.params.items():  # loaded: then it must be what was saved
            assert np.array_equal(ck.params[name], arr), f"checkpoint {how}: {name} loaded with other values"
        for name, arr in good.arrays.items():
            assert np.array_equal(ck.arrays[name], arr), f"checkpoint {how}: {name} loaded with other values"
        assert ck.meta == good.meta, f"checkpoint {how}: meta loaded with other values"
    return errors


def damaged_data(work, rng, variants=100):
    """Load tokenized data with one of its files damaged: the same tokens (the cache is rebuilt), or a
    DataError naming the damaged file (the .jsonl or its sidecar, which cannot be rebuilt)."""
    import numpy as np

    from data_loader import DataError, cache_paths, load_dataset
    clean = os.path.join(work, "clean")
    os.makedirs(clean, exist_ok=True)
    jsonl = write_data(os.path.join(clean, "t.jsonl"), 40, seed=3)
    tokens = np.array(load_dataset(jsonl, vocab_size=V).tokens)
    names = [os.path.basename(p) for p in (jsonl, jsonl + ".meta.json", *cache_paths(jsonl))]
    errors = 0
    for i in range(variants):
        d = os.path.join(work, "damaged-data")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(clean, d)
        target = os.path.join(d, names[i % len(names)])
        bad, how = damage(open(target, "rb").read(), rng)
        with open(target, "wb") as f:
            f.write(bad)
        try:
            ds = load_dataset(os.path.join(d, "t.jsonl"), vocab_size=V)
        except DataError as e:
            assert names[i % len(names)] in ("t.jsonl", "t.jsonl.meta.json"), f"{target} {how}: {e}"
            one_line_naming(str(e), target)
            errors += 1
            continue
        except Exception as e:
            raise AssertionError(f"{target} {how}: {type(e).__name__}: {e}") from None
        if not target.endswith(".jsonl"):  # a damaged .jsonl may still be valid, with other numbers
            assert np.array_equal(np.asarray(ds.tokens), tokens), f"{target} {how}: other tokens loaded"
    return errors


def damaged_on_the_command_line(work, rng, variants=3):
    """train.py --resume, generate.py --checkpoint and checkpoint.py on a damaged checkpoint, and train.py
    on a damaged .jsonl: exit 1 with one line naming the file, no traceback."""
    data = make_data(os.path.join(work, "data"))
    ref = reference_run(work, data)
    blob = open(os.path.join(ref, "checkpoint_step_20.npz"), "rb").read()
    for i in range(variants):
        d = os.path.join(work, f"cli-{i}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "checkpoint_step_20.npz")
        while True:  # a damage that the loader must notice (a changed timestamp field would load fine)
            bad, how = damage(blob, rng)
            with open(path, "wb") as f:
                f.write(bad)
            try:
                from checkpoint import CheckpointError, load_checkpoint
                load_checkpoint(path)
            except CheckpointError:
                break
        for cmd in (["train.py", *train_flags(data, d, resume=True)], ["generate.py", "--checkpoint", path],
                    ["checkpoint.py", path]):
            proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, f"{cmd[0]}, checkpoint {how}: {proc.stderr}"
            assert proc.stderr.startswith("error: "), proc.stderr
            one_line_naming(proc.stderr, path)
    # a .jsonl cut in the middle of a line
    d = os.path.join(work, "cli-data")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    cut = os.path.join(d, "train.jsonl")
    text = open(data[0], "rb").read()
    with open(cut, "wb") as f:
        f.write(text[:text.index(b"\n", len(text) // 2) - 3])
    shutil.copy(data[0] + ".meta.json", cut + ".meta.json")
    proc = subprocess.run([sys.executable, "train.py", *train_flags((cut, data[1]), os.path.join(d, "ck"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    one_line_naming(proc.stderr, cut)


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "child":
        fault, at = sys.argv[2], int(sys.argv[3])
        return child(fault, at, sys.argv[5:])
    p = argparse.ArgumentParser(description="Fault tests for train.py: kills, a full disk, damaged files.")
    p.add_argument("--only", choices=("kills", "disk_full", "damage"), default=None, help="run one group only")
    p.add_argument("--trials", type=int, default=3, help="sequences of five kills (each against one reference run)")
    p.add_argument("--variants", type=int, default=500, help="damaged copies of each kind of file to load")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (its path is printed)")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    work = tempfile.mkdtemp(prefix="fault_test-")
    print(f"seed {seed}; work folder {work}")
    try:
        data = make_data(os.path.join(work, "data"))
        if args.only in (None, "kills"):
            for t in range(args.trials):
                print(f"kills, trial {t + 1}/{args.trials}:")
                kill_and_resume(work, data, rng)
                print("  final weights bit-identical to the uninterrupted run")
        if args.only in (None, "disk_full"):
            print("full disk:")
            full_disk(work, data, at=rng.randint(2, 5))
            print("  resumed afterwards: bit-identical to the uninterrupted run")
        if args.only in (None, "damage"):
            n = damaged_checkpoints(work, rng, args.variants)
            print(f"damaged checkpoints: {args.variants} loads, {n} refused with one line, the rest loaded intact")
            n = damaged_data(work, rng, args.variants)
            print(f"damaged data files: {args.variants} loads, {n} refused with one line, the rest loaded intact")
            damaged_on_the_command_line(work, rng)
            print("damaged files on the command line: one line each, no traceback")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("all fault tests passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
