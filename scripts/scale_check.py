"""The full data path at scale: time and peak memory of each stage, on a large file made from the bundled sample.

    python3 scripts/scale_check.py --mb 52                     # about a minute on 2 cores
    python3 scripts/scale_check.py --mb 500                    # the README's second figure
    python3 scripts/scale_check.py --mb 52 --stages bpe --compare_hf   # + HuggingFace tokenizers on the same file
    python3 scripts/scale_check.py --mb 52 --distinct 1000000  # + a million made-up words (see below)

The input: the bundled train and validation samples, one story per line as prepare_tinystories.py
writes them (2,143 stories, 1.8 MB), repeated up to --mb MB. Each stage is the command a user runs,
in a subprocess of its own:

    bpe       tokenizer.py --train_bpe --vocab_size 10000 big.txt --model_file bpe.json
    hf        HuggingFace tokenizers' byte-level BPE trainer, same file and vocabulary (--compare_hf)
    tokenize  tokenizer.py big.txt big.jsonl --tokenizer bpe --model_file bpe.json
              (tiktoken gpt2 when the bpe stage is not run)
    convert   data_loader.py big.jsonl              the .jsonl -> binary token file
    train     train.py on big.jsonl, the guide's small model, a few steps

For each: wall time; "largest process", the peak resident size of the biggest single process of the
stage (VmHWM); and "whole stage", the peak of the stage's processes added up (proportional set
size, so pages that forked workers share count once). The second is what must fit in the machine's
memory. Both are read from /proc every 20 ms (Linux; elsewhere only getrusage's biggest child).

Repeating the sample keeps its ~5,700 distinct pre-tokens, while real text keeps adding names and
typos; the memory of BPE training grows with the distinct pre-tokens, not with the file size.
--distinct N adds N made-up words (each used twice) to show that growth.
"""
import importlib.util
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from atomic import atomic_write  # noqa: E402
from config import GPT2_VOCAB_SIZE  # noqa: E402
from flag_types import COUNT, COUNT_OR_ZERO, HelpFormatter, Number, Parser  # noqa: E402
from tokenizer import BPE_VOCAB_SIZE  # noqa: E402

MEGABYTES = Number(int, 1, 1 << 16)  # the input text's size: up to 64 GB

STAGES = ("bpe", "hf", "tokenize", "convert", "train")
HF_SCRIPT = """
import sys
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
trainer = trainers.BpeTrainer(vocab_size=int(sys.argv[2]), special_tokens=["<|endoftext|>"], show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train([sys.argv[1]], trainer)
print(f"HuggingFace tokenizers: {tok.get_vocab_size()} tokens", file=sys.stderr)
"""


def make_input(path, mb, distinct=0, seed=0):
    """Write the bundled samples, one story per line, repeated to about mb MB (+ distinct made-up words)."""
    from prepare_tinystories import BUNDLED_TRAIN, BUNDLED_VALID, split_stories
    stories = [s for p in (BUNDLED_TRAIN, BUNDLED_VALID) for s in split_stories(p.read_text(encoding="utf-8"))]
    block = ("\n".join(stories) + "\n").encode("utf-8")
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    made_up = ["".join(rng.choice(letters) for _ in range(rng.randint(5, 12))) for _ in range(distinct)]
    extra = [("Once upon a time, " + " ".join(made_up[i:i + 20]) + ".\n").encode() for i in range(0, distinct, 20)]
    extra = extra * 2
    rng.shuffle(extra)
    target, written, k = mb * 1_000_000, 0, 0
    per_block = -(-len(extra) // max(1, target // len(block)))  # spread the made-up lines over the blocks
    with open(path, "wb") as f:
        while written < target or k < len(extra):
            if written < target:
                f.write(block)
                written += len(block)
            for line in extra[k:k + per_block]:
                f.write(line)
                written += len(line)
            k += per_block
    return os.path.getsize(path)


def _tree(pid):
    """pid and all its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _memory_kb(pid):
    """(proportional set size, peak resident size) of one process in KB; PSS falls back to the resident
    size where smaps_rollup is missing; (0, 0) once it has gone."""
    fields = {}
    for name in (f"/proc/{pid}/smaps_rollup", f"/proc/{pid}/status"):
        try:
            with open(name) as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("Pss", "VmRSS", "VmHWM"):
                        fields[key] = int(rest.split()[0])
        except OSError:
            continue
    return fields.get("Pss", fields.get("VmRSS", 0)), fields.get("VmHWM", 0)


def run_stage(name, cmd, cwd):
    """Run cmd; return {stage, seconds, largest_mb, whole_mb, rc, last_line, output}."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    whole, largest, done = [0], [0], threading.Event()

    def sample():
        while not done.is_set():
            mem = [_memory_kb(p) for p in _tree(proc.pid)]
            whole[0] = max(whole[0], sum(pss for pss, _ in mem))
            largest[0] = max([largest[0]] + [hwm for _, hwm in mem])
            done.wait(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    on_linux = sys.platform.startswith("linux")
    if on_linux:
        sampler.start()
    output = proc.stdout.read().decode("utf-8", "replace")
    proc.wait()
    seconds = time.perf_counter() - t0
    done.set()
    if on_linux:
        sampler.join()
        largest_mb = largest[0] / 1024
    else:  # getrusage: the biggest child so far, this one or an earlier one (bytes on macOS)
        largest_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (1 << 20)
    last = [line for line in output.strip().splitlines() if line.strip()][-1:] or [""]
    return {"stage": name, "seconds": round(seconds, 2), "largest_mb": round(largest_mb, 1),
            "whole_mb": round(whole[0] / 1024, 1) if whole[0] else None, "rc": proc.returncode,
            "last_line": last[0][-200:], "output": output}


def main(argv=None):
    p = Parser(description="Time and peak memory of BPE training, tokenization, the .jsonl -> "
                                            "binary conversion and a training start on a large file made from "
                                            "the bundled sample.",
                                formatter_class=HelpFormatter)
    p.add_argument("--mb", type=MEGABYTES, default=52, help=f"size of the input text in MB (10^6 bytes), {MEGABYTES}")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=["bpe", "tokenize", "convert", "train"],
                   help="stages to run, in this order (hf: HuggingFace tokenizers, if installed)")
    p.add_argument("--compare_hf", action="store_true", help="also run the hf stage after bpe")
    p.add_argument("--vocab_size", type=BPE_VOCAB_SIZE, default=10000,
                   help=f"BPE vocabulary size (bpe and hf stages), {BPE_VOCAB_SIZE}")
    p.add_argument("--workers", type=COUNT, default=os.cpu_count(), help=f"worker processes of tokenizer.py, {COUNT}")
    p.add_argument("--train_steps", type=COUNT, default=5, help=f"optimizer steps of the train stage, {COUNT}")
    p.add_argument("--distinct", type=COUNT_OR_ZERO, default=0,
                   help=f"made-up words added to the text, each used twice, {COUNT_OR_ZERO}")
    p.add_argument("--work_dir", default=None, help="where the files go (default: a temporary folder, deleted)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    stages = [s for s in STAGES if s in args.stages or (s == "hf" and args.compare_hf)]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="scale_check_"))
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where the folder should be, no permission
        p.exit(1, f"error: --work_dir {work}: {e.strerror} ({e.filename}): name a folder to write to\n")
    py = sys.executable
    try:
        t0 = time.perf_counter()
        size = make_input(work / "big.txt", args.mb, args.distinct)
        print(f"input: {work / 'big.txt'}, {size / 1e6:.1f} MB ({args.distinct} made-up words) in "
              f"{time.perf_counter() - t0:.1f} s; {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
              f"Python {platform.python_version()}", flush=True)
        use_bpe = "bpe" in stages or (work / "bpe.json").exists()
        vocab = args.vocab_size if use_bpe else GPT2_VOCAB_SIZE
        tok_flags = ["--tokenizer", "bpe", "--model_file", "bpe.json"] if use_bpe else \
            ["--tokenizer", "tiktoken", "--encoding", "gpt2"]
        commands = {
            "bpe": [py, str(ROOT / "tokenizer.py"), "--train_bpe", "--vocab_size", str(args.vocab_size), "big.txt",
                    "--model_file", "bpe.json", "--workers", str(args.workers), "--quiet"],
            "hf": [py, "-c", HF_SCRIPT, "big.txt", str(args.vocab_size)],
            "tokenize": [py, str(ROOT / "tokenizer.py"), "big.txt", "big.jsonl", *tok_flags, "--max_length", "512",
                         "--workers", str(args.workers), "--quiet"],
            "convert": [py, str(ROOT / "data_loader.py"), "big.jsonl"],
            "train": [py, str(ROOT / "train.py"), "--train_data", "big.jsonl", "--vocab_size", str(vocab),
                      "--d_model", "128", "--n_heads", "4", "--d_ff", "512", "--n_layers", "2", "--batch_size", "32",
                      "--seq_len", "128", "--max_steps", str(args.train_steps), "--warmup_steps", "1",
                      "--save_dir", "checkpoints", "--log_interval", "1", "--no_progress"],
        }
        results = []
        print(f"{'stage':<10} {'seconds':>8} {'largest process MB':>19} {'whole stage MB':>15}  last line of output")
        for name in stages:
            if name == "hf" and importlib.util.find_spec("tokenizers") is None:
                print("hf: HuggingFace tokenizers is not installed (pip install tokenizers); skipped")
                continue
            r = run_stage(name, commands[name], work)
            results.append(r)
            whole = f"{r['whole_mb']:.0f}" if r["whole_mb"] else "n/a"
            print(f"{name:<10} {r['seconds']:>8.1f} {r['largest_mb']:>19.0f} {whole:>15}  {r['last_line']}",
                  flush=True)
            if r["rc"] != 0:
                print(f"{name} failed (exit code {r['rc']}):\n{r['output']}", file=sys.stderr)
                return 1
        if args.json:
            with atomic_write(args.json, "w") as f:
                json.dump({"mb": args.mb, "bytes": size, "distinct": args.distinct, "cores": os.cpu_count(),
                           "results": [{k: v for k, v in r.items() if k != "output"} for r in results]}, f, indent=1)
        return 0
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
