"""MPI ranks against threads in one process: the training step of the same model and global batch.

One run times both, alternating launches so that a busy machine slows both alike:

    python3 scripts/bench_mpi.py --compare 2         # 2 ranks x 1 worker vs 1 process x 2 workers
    python3 scripts/bench_mpi.py --compare 4 --rounds 5

It prints each one's median step time, tokens/s and peak memory (resident set) per process. One
measurement on its own (what --compare launches):

    mpiexec -n 2 python3 scripts/bench_mpi.py        # each rank takes its share of the cores
    python3 scripts/bench_mpi.py --workers 2

The step is train.py's: forward and backward (the rows shared out over the ranks, one Allreduce),
gradient clipping and an AdamW update, on random tokens, the guide's Small model by default.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import distributed  # noqa: E402  (after the path is set)
from config import FIELD_RANGES, GPT2_VOCAB_SIZE, ModelConfig  # noqa: E402
from errors import UserError  # noqa: E402
from flag_types import COUNT, COUNT_OR_ZERO, Number, Parser  # noqa: E402
from language_model import LanguageModel  # noqa: E402
from loss import count_targets  # noqa: E402
from optimizer import AdamW, clip_grad_norm  # noqa: E402
from parallel import keep_freed_memory  # noqa: E402


def measure(args):
    """Time args.steps training steps here (one rank of an MPI job, or one process); print one JSON line."""
    world = distributed.world()
    threads = world.limit_threads()
    keep_freed_memory()
    try:
        cfg = ModelConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_heads=args.n_heads, d_ff=args.d_ff,
                          n_layers=args.n_layers, max_seq_len=args.seq_len)
    except ValueError as e:  # --d_model not divisible by --n_heads
        raise UserError(str(e)) from None
    model = LanguageModel(cfg, seed=0, workers=args.workers or threads)
    optimizer = AdamW(model.params, threads=threads)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():  # train.py's step: this rank's rows, the sums over the ranks, clipping, the update
        n, (a, b) = count_targets(y), world.rows(len(x))
        model.zero_grad()
        loss_sum, n_correct = model.forward_backward(x[a:b], y[a:b], n)
        world.allreduce_(model.grads.flat)
        world.sum([loss_sum, n_correct])
        clip_grad_norm(model.grads, 1.0)
        optimizer.step(model.grads, lr=3e-4)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        world.barrier()  # every rank starts the step together: the time is the job's
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peaks = world.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    slowest = np.max(world.gather(times), axis=0)  # a step takes as long as its slowest rank
    if world.is_root:
        print(json.dumps({"processes": world.size, "workers": model.workers,
                          "step_s": float(np.median(slowest)), "tokens_per_s": x.size / float(np.median(slowest)),
                          "peak_mb_per_process": peaks}), flush=True)


def compare(args, model_flags):
    """Alternate launches of N ranks x 1 worker and 1 process x N workers; print the medians."""
    n = args.compare
    here = [sys.executable, os.path.abspath(__file__), *model_flags]
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    if not os.path.exists(mpiexec):
        mpiexec = "mpiexec"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    runs = {f"{n} ranks x 1 worker": [mpiexec, "-n", str(n), *here],
            f"1 process x {n} workers": [*here, "--workers", str(n)]}
    results = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, cmd in runs.items():
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            results[name].append(res)
            print(f"round {r + 1}: {name}: step {res['step_s']:.3f} s, peak memory per process "
                  f"{', '.join(f'{m:.0f}' for m in res['peak_mb_per_process'])} MB", flush=True)
    medians = {name: float(np.median([r["step_s"] for r in rs])) for name, rs in results.items()}
    for name, t in medians.items():
        print(f"{name}: median step {t:.3f} s, {args.batch_size * args.seq_len / t:,.0f} tokens/s")
    (a, ta), (b, tb) = medians.items()
    print(f"{a} takes {ta / tb:.2f}x the time of {b}")


def main(argv=None):
    size, ranks = FIELD_RANGES, Number(int, 2)
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab_size", type=size["vocab_size"], default=GPT2_VOCAB_SIZE,
                    help=f"vocabulary size, {size['vocab_size']} (default {GPT2_VOCAB_SIZE}, GPT-2's)")
    ap.add_argument("--d_model", type=size["d_model"], default=128,
                    help=f"model width, {size['d_model']} (default 128: the guide's Small)")
    ap.add_argument("--n_heads", type=size["n_heads"], default=4,
                    help=f"attention heads, {size['n_heads']}, dividing --d_model (default 4)")
    ap.add_argument("--d_ff", type=size["d_ff"], default=None,
                    help=f"feed-forward width, {size['d_ff']} (default: the block's own, 4 d_model)")
    ap.add_argument("--n_layers", type=size["n_layers"], default=2,
                    help=f"Transformer blocks, {size['n_layers']} (default 2)")
    ap.add_argument("--batch_size", type=COUNT, default=32,
                    help=f"global batch: rows per step over all ranks, {COUNT}, at least one per rank (32)")
    ap.add_argument("--seq_len", type=size["max_seq_len"], default=128,
                    help=f"tokens per row, {size['max_seq_len']} (default 128)")
    ap.add_argument("--steps", type=COUNT, default=10, help=f"timed steps; the median is reported, {COUNT} (default 10)")
    ap.add_argument("--warmup", type=COUNT_OR_ZERO, default=2, help=f"untimed steps first, {COUNT_OR_ZERO} (default 2)")
    ap.add_argument("--workers", type=COUNT, default=None,
                    help=f"threads per process, {COUNT} (default: its share of the cores, as train.py)")
    ap.add_argument("--compare", type=ranks, default=None, metavar="N",
                    help=f"launch N ranks x 1 worker and 1 process x N workers in turn and compare them, N {ranks}")
    ap.add_argument("--rounds", type=COUNT, default=3, help=f"with --compare: launches of each, {COUNT} (default 3)")
    args = ap.parse_args(argv)
    try:
        if args.compare:
            keep = ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "batch_size", "seq_len", "steps", "warmup")
            compare(args, [f"--{k}={getattr(args, k)}" for k in keep if getattr(args, k) is not None])
        else:
            measure(args)
    except UserError as e:  # mpi4py missing under mpiexec, ranks that disagree
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
