"""SHA-256 of the final weights of a few fixed CPU training runs, to check that a change of structure
changes no result: record the digests before the change, compare after.

    python3 scripts/fixed_runs.py --save digests.json      # before
    python3 scripts/fixed_runs.py --check digests.json     # after: exits 1 on any difference

Each run trains a small model on the bundled sample (GPT-2's tokenizer, or our BPE of 512 tokens
trained on the same text) for a few dozen steps with evaluation and checkpoints, then hashes the
final checkpoint's weights and optimizer state (the arrays, not the file: the file also holds the
run's id) and, separately, the numbers logged in metrics.jsonl (losses, accuracies, norms: not the
times). Runs that must agree with another say so: 2 MPI ranks train what --workers 2 trains, and a
run resumed from a checkpoint ends where the uninterrupted run ends.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from atomic import atomic_write, refuse_inputs  # noqa: E402
from config import GPT2_VOCAB_SIZE  # noqa: E402
from errors import UserError  # noqa: E402
from flag_types import Parser  # noqa: E402
from metrics import Records  # noqa: E402
from untrusted import read_json  # noqa: E402
SAMPLE = REPO / "data" / "sample"
PY = sys.executable
SMALL = ["--d_model", "32", "--n_heads", "2", "--d_ff", "64", "--n_layers", "2", "--batch_size", "8",
         "--seq_len", "32", "--max_steps", "40", "--warmup_steps", "5", "--learning_rate", "3e-3",
         "--log_interval", "5", "--eval_interval", "20", "--eval_batches", "4", "--save_interval", "20",
         "--no_progress"]
LLAMA = ["--arch", "llama", "--n_kv_heads", "1", "--rope_theta", "500"]  # grouped-query: 2 query heads, 1 key/value
# name: (data, extra flags, launcher ranks, the run it must equal)
RUNS = {
    "gpt2_workers2": ("gpt2", ["--workers", "2"], 1, None),
    "gpt2_mpi2": ("gpt2", ["--workers", "1"], 2, "gpt2_workers2"),
    "gpt2_resumed": ("gpt2", ["--workers", "2", "--resume", "{gpt2_workers2}/checkpoint_step_20.npz"], 1,
                     "gpt2_workers2"),
    "gpt2_learned_untied_relu": ("gpt2", ["--workers", "1", "--use_learned_pos", "--no_tie_embeddings",
                                          "--activation", "relu", "--optimizer", "adam"], 1, None),
    "bpe_workers3_sgd": ("bpe", ["--workers", "3", "--optimizer", "sgd", "--weight_decay", "0.1",
                                 "--grad_clip", "0.05", "--lr_schedule", "linear"], 1, None),
    "bpe_learned_workers2": ("bpe", ["--workers", "2", "--use_learned_pos", "--decay_embeddings",
                                     "--beta2", "0.95"], 1, None),
    "llama_workers2": ("gpt2", ["--workers", "2", *LLAMA], 1, None),
    "llama_mpi2": ("gpt2", ["--workers", "1", *LLAMA], 2, "llama_workers2"),
    "llama_resumed": ("gpt2", ["--workers", "2", *LLAMA, "--resume", "{llama_workers2}/checkpoint_step_20.npz"], 1,
                      "llama_workers2"),
    "llama_dropout_workers2": ("gpt2", ["--workers", "2", *LLAMA, "--dropout", "0.1", "--weight_decay", "0.2"], 1,
                               None),
}


def sh(cmd, **kw):
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kw)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def prepare(tmp):
    """Tokenized train/valid files of the bundled sample for each tokenizer: {name: (train, valid, vocab)}."""
    train_txt, valid_txt = SAMPLE / "TinyStoriesV2-GPT4-train.sample.txt", SAMPLE / "TinyStories-valid.sample.txt"
    bpe = tmp / "bpe512.json"
    sh([PY, "tokenizer.py", "--train_bpe", "--vocab_size", "512", str(train_txt), "--model_file", str(bpe)])
    out = {}
    for name, flags, vocab in (("gpt2", ["--tokenizer", "tiktoken", "--encoding", "gpt2"], GPT2_VOCAB_SIZE),
                               ("bpe", ["--tokenizer", "lecture2_bpe", "--model_file", str(bpe)], 512)):
        files = []
        for split, txt in (("train", train_txt), ("valid", valid_txt)):
            path = tmp / f"{name}_{split}.jsonl"
            sh([PY, "tokenizer.py", str(txt), str(path), *flags, "--max_length", "512"])
            files.append(str(path))
        out[name] = (*files, vocab)
    return out


def digest_arrays(checkpoint):
    h = hashlib.sha256()
    with np.load(checkpoint, allow_pickle=False) as z:
        for key in sorted(k for k in z.files if k != "meta"):
            a = z[key]
            h.update(f"{key} {a.dtype} {a.shape}\n".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def digest_metrics(save_dir):
    numbers = []
    for r in Records(os.path.join(save_dir, "metrics.jsonl")):  # checked records, one at a time
        if r["type"] in ("train", "eval"):
            numbers.append({k: v for k, v in r.items() if k not in ("time", "steps_per_s", "tokens_per_s")})
    return hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()


def mpiexec():
    exe = Path(PY).parent / "mpiexec"
    try:
        subprocess.run([PY, "-c", "import mpi4py"], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        return None
    return str(exe) if exe.exists() else shutil.which("mpiexec")


def run_all(tmp):
    data = prepare(tmp)
    results, dirs = {}, {}
    for name, (which, extra, ranks, _) in RUNS.items():
        train, valid, vocab = data[which]
        save_dir = tmp / name
        dirs[name] = save_dir
        extra = [e.format(**{k: str(v) for k, v in dirs.items()}) for e in extra]
        cmd = [PY, "train.py", "--train_data", train, "--val_data", valid, "--vocab_size", str(vocab),
               "--save_dir", str(save_dir), *SMALL, *extra]
        if ranks > 1:
            launcher = mpiexec()
            if launcher is None:
                print(f"{name}: skipped (no mpi4py/mpiexec)", file=sys.stderr)
                continue
            cmd = [launcher, "-n", str(ranks), *cmd]
        sh(cmd, env=dict(os.environ, OMP_NUM_THREADS="1") if ranks > 1 else None)
        results[name] = {"weights": digest_arrays(save_dir / "checkpoint_final.npz"),
                         "metrics": digest_metrics(save_dir)}
        print(f"{name}: weights {results[name]['weights'][:16]} metrics {results[name]['metrics'][:16]}",
              file=sys.stderr)
    return results


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save", metavar="JSON", help="write the digests to this file")
    p.add_argument("--check", metavar="JSON", help="compare with the digests in this file; exit 1 on a difference")
    args = p.parse_args(argv)
    before = None
    try:  # before the runs: the digests to compare with are read, and --save may not replace them
        refuse_inputs([args.save], [("--check file", args.check)], error=UserError)
        if args.check:
            before = read_json(args.check, "digests file", error=UserError)
    except (UserError, OSError) as e:
        p.exit(1, f"error: {e}\n")
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(Path(tmp))
    failed = []
    for name, (_, _, _, same_as) in RUNS.items():  # a resumed run keeps its own metrics (it logs half the steps)
        if same_as and name in results and results[name]["weights"] != results[same_as]["weights"]:
            failed.append(f"{name} ends with other weights than {same_as}")
    if args.save:
        with atomic_write(args.save, "w") as f:
            json.dump(results, f, indent=1)
    if before is not None:
        for name, now in results.items():
            for what in ("weights", "metrics"):
                if name in before and before[name][what] != now[what]:
                    failed.append(f"{name}: {what} differ ({before[name][what][:16]} before, {now[what][:16]} now)")
    print(json.dumps(results, indent=1))
    for line in failed:
        print("DIFFERENT:", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
