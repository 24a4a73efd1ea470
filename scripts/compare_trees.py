"""The training step of two checkouts of this repository, timed in turn in one run: has a change made the
step faster? Each speed change is measured against the code before it, on the same machine at the same time.

    git worktree add /tmp/before HEAD~1                       # the code before the change
    python3 scripts/compare_trees.py /tmp/before              # against this checkout: the guide's Small model
    python3 scripts/compare_trees.py /tmp/before --preset laptop --rounds 9   # with the preset's dropout 0.1
    python3 scripts/compare_trees.py /tmp/before --preset medium

Two versions of the code cannot share a process, so each checkout runs in a process of its own, started
once and kept for the whole run. Each builds the model (seed 0) and its step on one fixed batch of random
tokens with its own benchmark.fixed_batch_step (forward, backward, clipping at 1.0, AdamW), then the two take
turns, round after round: each runs --steps timed steps after an untimed one of its own (the other's steps
have just had the cores, the caches and BLAS's threads). Prints the median step of each round, the medians
over the rounds and after / before. The checkouts need benchmark.fixed_batch_step (2026-12-05 on).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmark import add_model_flags  # noqa: E402
from errors import UserError  # noqa: E402
from flag_types import COUNT, PROBABILITY, Parser  # noqa: E402
from train_flags import PRESETS, config_from_flags, take_preset  # noqa: E402

# What each checkout's process runs (its directory first on the path): argv the model's fields that differ
# from their defaults and (B, T, dropout) as JSON; then one line "n" on stdin -> n step times on stdout.
WORKER = r"""
import json, sys, time
import parallel
parallel.keep_freed_memory()
from benchmark import fixed_batch_step
from config import ModelConfig
cfg = ModelConfig(**json.loads(sys.argv[1]))
B, T, dropout = json.loads(sys.argv[2])
model, step, _ = fixed_batch_step(cfg, B, T, dropout=dropout)
step(dropout > 0)
print("ready", flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        t0 = time.perf_counter()
        step(dropout > 0)
        times.append(time.perf_counter() - t0)
    print(json.dumps(times), flush=True)
"""


def commit(tree):
    """The checkout's commit, short, with '+' where its files differ from it; '?' outside git."""
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("+" if dirty else "")


class Checkout:
    """One checkout's process, its model built and one step run, waiting for steps to time."""

    def __init__(self, tree, cfg, B, T, dropout):
        if not (tree / "benchmark.py").is_file():
            raise UserError(f"{tree}: not a checkout of this repository (no benchmark.py there)")
        changed = {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != f.default}
        self.tree = tree
        self.errors = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the step runs
        command = [sys.executable, "-c", WORKER, json.dumps(changed), json.dumps([B, T, dropout])]
        self.process = subprocess.Popen(command, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.errors, text=True)
        if self.read() != "ready":
            raise UserError(f"{self.tree}: its step did not start as expected")

    def read(self):
        line = self.process.stdout.readline()
        if not line:  # it stopped: an older checkout without fixed_batch_step, a model it cannot build, ...
            self.process.wait()
            self.errors.seek(0)
            lines = self.errors.read().strip().splitlines() or ["it printed nothing"]
            raise UserError(f"{self.tree}: its step did not run: {lines[-1]} (its last line of errors; a checkout "
                            "needs benchmark.fixed_batch_step, of 2026-12-05 on)")
        return line.strip()

    def steps(self, n):
        """The seconds of n steps, timed one by one, after an untimed one."""
        self.process.stdin.write(f"{n + 1}\n")
        self.process.stdin.flush()
        return json.loads(self.read())[1:]

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()
        self.errors.close()


def compare(before, after, cfg, B, T, dropout=0.0, rounds=5, steps=3):
    """{"before": [median step of each round], "after": [...]}: the two checkouts' steps, timed in turn."""
    checkouts = {}
    try:
        checkouts["before"] = Checkout(before, cfg, B, T, dropout)
        checkouts["after"] = Checkout(after, cfg, B, T, dropout)
        times = {name: [] for name in checkouts}
        for _ in range(rounds):
            for name, checkout in checkouts.items():
                times[name].append(statistics.median(checkout.steps(steps)))
        return times
    finally:
        for checkout in checkouts.values():
            checkout.close()


def report(before, after, cfg, B, T, dropout, times, out=None):
    out = out or sys.stdout
    print(f"before: {before} ({commit(before)}); after: {after} ({commit(after)})", file=out)
    drop = f", dropout {dropout:g}" if dropout else ""
    print(f"model: {cfg.describe()}; batch {B} x {T} tokens, vocabulary {cfg.vocab_size}{drop}", file=out)
    print("| round | before | after |", file=out)
    print("|---|---|---|", file=out)
    for i, (b, a) in enumerate(zip(times["before"], times["after"]), 1):
        print(f"| {i} | {b:.3f} s | {a:.3f} s |", file=out)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"| median | {median['before']:.3f} s | {median['after']:.3f} s |", file=out)
    ratio = median["after"] / median["before"]
    print(f"after / before: {ratio:.3f} ({100 * (ratio - 1):+.1f}% step time)", file=out)


def parse_args(argv):
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path, help="the checkout to compare with (a directory: a clone or a git worktree)")
    ap.add_argument("--after", type=Path, default=ROOT,
                    help="the checkout compared with it (default: this one, the script's own)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="a guide's model and its batch (train.py's --preset); model flags given win")
    add_model_flags(ap)
    ap.add_argument("--dropout", type=PROBABILITY, default=0.0, metavar="P",
                    help=f"the step with dropout P, masks drawn anew each step (train.py --dropout): {PROBABILITY} "
                         "(default 0: none, or the preset's: laptop's is 0.1)")
    ap.add_argument("--rounds", type=COUNT, default=5, help=f"rounds, each checkout in turn: {COUNT} (default 5)")
    ap.add_argument("--steps", type=COUNT, default=3,
                    help=f"timed steps of each checkout a round, whose median the round reports: {COUNT} (default 3)")
    return take_preset(ap, argv, ap.parse_args(argv))  # the preset's model and batch, under the flags given


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = config_from_flags(vars(args))
    except ValueError as e:
        raise SystemExit(f"error: the model flags: {e}") from None
    before, after = args.before.resolve(), args.after.resolve()
    try:
        times = compare(before, after, cfg, args.batch_size, args.seq_len, args.dropout, args.rounds, args.steps)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    report(before, after, cfg, args.batch_size, args.seq_len, args.dropout, times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
