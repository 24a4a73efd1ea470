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

tests/test_faults.py runs a reduced form of the same functions in CI and asserts on what they return.
"""
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
for folder in (ROOT, ROOT / "tests"):  # the toy data and the optimizer hook are the tests' (tests/helpers.py)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from helpers import V, after_each_update, write_data  # noqa: E402
from flag_types import COUNT_OR_ZERO, SEED, Parser  # noqa: E402

KILLS = ("step", "checkpoint", "eval", "timer")


class Failed(Exception):
    """What a fault test checks does not hold (raised, not asserted: it must hold under python -O too)."""


def expect(ok, message):
    if not ok:
        raise Failed(message)


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
        after_each_update(lambda opt: due() and die())
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


def differences(dir_a, dir_b):
    """How two runs' final checkpoints differ in weights, optimizer state and batch position ([]: they are
    bit-identical)."""
    import numpy as np

    from checkpoint import load_checkpoint
    a, b = (load_checkpoint(os.path.join(d, "checkpoint_final.npz")) for d in (dir_a, dir_b))
    found = [] if a.meta["step"] == b.meta["step"] and a.meta["data"] == b.meta["data"] else ["batch position"]
    found += [f"weights {name}" for name in a.params if not np.array_equal(a.params[name], b.params[name])]
    found += [f"optimizer state {name}" for name in a.arrays if not np.array_equal(a.arrays[name], b.arrays[name])]
    return found


def reference_run(work, data):
    ref = os.path.join(work, "reference")
    if not os.path.exists(os.path.join(ref, "checkpoint_final.npz")):
        rc, _, err = run_child("none", 0, train_flags(data, ref))
        expect(rc == 0, err)
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
        expect(rc == -signal.SIGKILL, f"{kind} at {at}: the run was not killed (exit {rc}): {err[-2000:]}")
        newest = newest_is_loadable(d)
        history.append((kind, at, newest[1] if newest else None))
        say(f"  kill -9 {kind:10} at {at:3}: newest checkpoint {newest[0] if newest else '(none yet)'}")
    rc, out, err = run_child("none", 0, train_flags(data, d, resume=bool(newest_is_loadable(d))))
    expect(rc == 0, err)
    expect(not differences(ref, d), f"the resumed run ends otherwise: {differences(ref, d)}")
    with open(os.path.join(d, "metrics.jsonl")) as f:
        logged = [json.loads(line)["step"] for line in f if '"type": "train"' in line]
    expect(logged == list(range(10, 301, 10)), "metrics.jsonl does not read as one run")
    return history


def full_disk(work, data, at=3):
    """The at-th checkpoint write finds the disk full, then the run is resumed: what happened, as
    {"exit", "stderr": the run's exit code and its stderr, "previous": the checkpoint before, "previous_step":
    the step it loads with, "temp_files": what the write left, "written": whether the checkpoint it was
    writing exists, "resumed_exit", "resumed_stderr", "differences": the resumed run's from an uninterrupted
    one}. It should be: one line saying the disk is full and naming the previous checkpoint, which is intact,
    nothing left behind, and a resume that ends as the uninterrupted run."""
    from checkpoint import load_checkpoint
    ref = reference_run(work, data)
    d = os.path.join(work, "disk-full")
    rc, _, err = run_child("disk_full", at, train_flags(data, d))
    previous = os.path.join(d, f"checkpoint_step_{10 * (at - 1)}.npz")
    facts = {"exit": rc, "stderr": err, "previous": previous, "previous_step": load_checkpoint(previous).meta["step"],
             "temp_files": glob.glob(os.path.join(d, "*.tmp")),
             "written": os.path.exists(os.path.join(d, f"checkpoint_step_{10 * at}.npz"))}
    rc, _, err = run_child("none", 0, train_flags(data, d, resume=True))
    return dict(facts, resumed_exit=rc, resumed_stderr=err, differences=differences(ref, d) if rc == 0 else None)


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
    expect("\n" not in message.strip() and str(path) in message, message)


def damaged_checkpoints(work, rng, variants=200):
    """Load a damaged copy of a checkpoint `variants` times: the original arrays, or a CheckpointError
    naming the file."""
    import numpy as np

    from checkpoint import load_checkpoint
    from errors import CheckpointError
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
            raise Failed(f"checkpoint {how}: {type(e).__name__}: {e}") from None
        for name, arr in good.params.items():  # loaded: then it must be what was saved
            expect(np.array_equal(ck.params[name], arr), f"checkpoint {how}: {name} loaded with other values")
        for name, arr in good.arrays.items():
            expect(np.array_equal(ck.arrays[name], arr), f"checkpoint {how}: {name} loaded with other values")
        expect(ck.meta == good.meta, f"checkpoint {how}: meta loaded with other values")
    return errors


def damaged_data(work, rng, variants=100):
    """Load tokenized data with one of its files damaged: the same tokens (the cache is rebuilt), or a
    DataError naming the damaged file (the .jsonl or its sidecar, which cannot be rebuilt)."""
    import numpy as np

    from data_loader import cache_paths, load_dataset
    from errors import DataError
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
            expect(names[i % len(names)] in ("t.jsonl", "t.jsonl.meta.json"), f"{target} {how}: {e}")
            one_line_naming(str(e), target)
            errors += 1
            continue
        except Exception as e:
            raise Failed(f"{target} {how}: {type(e).__name__}: {e}") from None
        if not target.endswith(".jsonl"):  # a damaged .jsonl may still be valid, with other numbers
            expect(np.array_equal(np.asarray(ds.tokens), tokens), f"{target} {how}: other tokens loaded")
    return errors


def damaged_on_the_command_line(work, rng, variants=3):
    """train.py --resume, generate.py --checkpoint and checkpoint.py on a damaged checkpoint, and train.py
    on a damaged .jsonl: [{"command", "damage", "file", "exit", "stderr"}] of every run. Each should exit 1
    with one line, "error: ...", naming the file, and no traceback."""
    from checkpoint import load_checkpoint
    from errors import CheckpointError
    data = make_data(os.path.join(work, "data"))
    ref = reference_run(work, data)
    blob = open(os.path.join(ref, "checkpoint_step_20.npz"), "rb").read()
    runs = []

    def run(cmd, damage, file):
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
        runs.append({"command": cmd[0], "damage": damage, "file": file, "exit": proc.returncode,
                     "stderr": proc.stderr})

    for i in range(variants):
        d = os.path.join(work, f"cli-{i}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "checkpoint_step_20.npz")
        while True:  # a damage that the loader must notice (a changed timestamp field would load fine)
            bad, how = damage(blob, rng)
            with open(path, "wb") as f:
                f.write(bad)
            try:
                load_checkpoint(path)
            except CheckpointError:
                break
        for cmd in (["train.py", *train_flags(data, d, resume=True)], ["generate.py", "--checkpoint", path],
                    ["checkpoint.py", path]):
            run(cmd, f"checkpoint {how}", path)
    # a .jsonl cut in the middle of a line
    d = os.path.join(work, "cli-data")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    cut = os.path.join(d, "train.jsonl")
    text = open(data[0], "rb").read()
    with open(cut, "wb") as f:
        f.write(text[:text.index(b"\n", len(text) // 2) - 3])
    shutil.copy(data[0] + ".meta.json", cut + ".meta.json")
    run(["train.py", *train_flags((cut, data[1]), os.path.join(d, "ck"))], "a .jsonl cut in a line", cut)
    return runs


def problems_after_full_disk(facts):
    """What full_disk's facts show to be wrong ([]: nothing)."""
    err = facts["stderr"]
    wrong = [] if facts["exit"] == 1 else [f"exit {facts['exit']}: {err[-2000:]}"]
    if "Traceback" in err or err.count("\n") != 1 or not err.startswith("error: cannot write ") or \
            "the disk is full" not in err or facts["previous"] not in err:
        wrong.append(f"not one line saying the disk is full and naming {facts['previous']}: {err}")
    if facts["temp_files"] or facts["written"]:
        wrong.append(f"left behind: {facts['temp_files'] or 'the checkpoint it was writing'}")
    if facts["resumed_exit"] != 0 or facts["differences"]:
        wrong.append(f"the resumed run: exit {facts['resumed_exit']}, differs in {facts['differences']}")
    return wrong


def problems_on_the_command_line(runs):
    """The runs of damaged_on_the_command_line that did not end with one line naming the file."""
    return [f"{r['command']}, {r['damage']}: exit {r['exit']}: {r['stderr']}" for r in runs
            if r["exit"] != 1 or "Traceback" in r["stderr"] or not r["stderr"].startswith("error: ")
            or "\n" in r["stderr"].strip() or r["file"] not in r["stderr"]]


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "child":
        fault, at = sys.argv[2], int(sys.argv[3])
        return child(fault, at, sys.argv[5:])
    p = Parser(description="Fault tests for train.py: kills, a full disk, damaged files.")
    p.add_argument("--only", choices=("kills", "disk_full", "damage"), default=None, help="run one group only")
    p.add_argument("--trials", type=COUNT_OR_ZERO, default=3,
                   help=f"sequences of five kills (each against one reference run), {COUNT_OR_ZERO} (default 3)")
    p.add_argument("--variants", type=COUNT_OR_ZERO, default=500,
                   help=f"damaged copies of each kind of file to load, {COUNT_OR_ZERO} (default 500)")
    p.add_argument("--seed", type=SEED, default=None, help=f"random seed, {SEED} (default: a fresh one, printed)")
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
            facts = full_disk(work, data, at=rng.randint(2, 5))
            print(f"  {facts['stderr'].strip()}")
            expect(not problems_after_full_disk(facts), "; ".join(problems_after_full_disk(facts)))
            print("  resumed afterwards: bit-identical to the uninterrupted run")
        if args.only in (None, "damage"):
            n = damaged_checkpoints(work, rng, args.variants)
            print(f"damaged checkpoints: {args.variants} loads, {n} refused with one line, the rest loaded intact")
            n = damaged_data(work, rng, args.variants)
            print(f"damaged data files: {args.variants} loads, {n} refused with one line, the rest loaded intact")
            wrong = problems_on_the_command_line(damaged_on_the_command_line(work, rng))
            expect(not wrong, "\n".join(wrong))
            print("damaged files on the command line: one line each, no traceback")
    except Failed as e:
        print(f"FAILED (seed {seed}): {e}")
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("all fault tests passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
