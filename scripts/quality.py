"""The quality benchmark: what a recipe learns in a wall-clock budget, scored in bits per byte of held-out text.

    python3 scripts/quality.py --train_text data/tinystories_train_sample.txt \\
        --valid_text data/tinystories_valid_sample.txt --tokenizer bpe -- --preset laptop
    python3 scripts/quality.py --train_text T.txt --valid_text V.txt --tokenizer gpt2 --time_budget 12 \\
        -- --preset small --learning_rate 2e-3

The flags after `--` are the recipe: train.py's flags (a --preset and/or any others). One command:
1. tokenizes both texts (.txt, one story per line or the raw <|endoftext|> layout) with GPT-2's
   encoding (--tokenizer gpt2) or with our BPE of the recipe's --vocab_size tokens trained on the
   training text (--tokenizer bpe), cached in --work_dir under names keyed by the SHA-256 of the text
   and of the tokenizer, so that the next recipe on the same texts starts training at once;
2. trains with train.py --time_budget (the learning-rate schedule ends when the time is up), into
   a new folder under WORK_DIR/runs; the recipe's evaluations are left to it (none before the end by
   default);
3. scores the final weights on the whole validation text, less its paragraphs that also occur in the
   training text (overlap.py, cached in WORK_DIR/held_out; --keep_overlap: as given), with train.py's
   final evaluation (every window of --seq_len tokens, the tail shorter than one window aside): loss in
   nats per token, perplexity, and bits per byte, the summed loss in bits over the UTF-8 bytes the
   evaluated tokens stand for (one byte more per story, for the separator, whose token the model
   predicts too), which does not depend on the tokenizer;
4. generates --samples stories from "Once upon a time" (temperature 0.8, top-k 40, seed 0);
5. prints a markdown table row (with its header) and appends the whole record, as one JSON line, to
   --results (default WORK_DIR/results.jsonl).

Before training it checks what it will write (the work folder, the results file: a folder, never one of
its inputs, writable), so that a score is not lost to a mistake found only at the end; if the results
file cannot be written after all (a full disk), the record is still printed, and kept in the run's folder
as quality_record.json. Ctrl-C stops the run (train.py saves where it is) and records nothing.

The budget covers training only: tokenizing (once per text and tokenizer), the final evaluation (about
a second per 10,000 tokens of validation text for the laptop preset on 2 cores) and the samples come
on top. Run nothing else on the machine meanwhile: the budget's horizon follows the speed it measures.
"""
import datetime
import errno
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_flags  # noqa: E402
from atomic import append_line, atomic_write, refuse_inputs  # noqa: E402
from config import GPT2_VOCAB_SIZE  # noqa: E402
from errors import TrainError, UserError, say  # noqa: E402
from flag_types import COUNT, COUNT_OR_ZERO, HelpFormatter, Number, Parser  # noqa: E402
from metrics import Records  # noqa: E402
from overlap import held_out  # noqa: E402
from untrusted import read_json  # noqa: E402

MINUTES = Number(float, 0, low_open=True)  # --time_budget here; train.py checks the recipe's own further

PY = sys.executable
FINAL = "checkpoint_final.npz"  # run_dir.FINAL: the checkpoint of a run that reached its end
SAMPLING = {"prompt": "Once upon a time", "temperature": 0.8, "top_k": 40, "seed": 0}
OWNED = ("train_data", "val_data", "save_dir", "resume", "overwrite", "init_from", "eval_batches")  # the script's
HEADER = ("| date | recipe | tokenizer | budget | steps | s/step | tokens seen | val loss | bits/byte | "
          "perplexity | sample |\n|---|---|---|---|---|---|---|---|---|---|---|")


def build_parser():
    p = Parser(
        description="Train a recipe for a wall-clock budget and score it in bits per byte of held-out text. "
                    "Flags after `--` are the recipe: train.py's flags (--preset laptop, --learning_rate 2e-3, ...).",
        formatter_class=HelpFormatter)
    p.add_argument("--train_text", required=True, help="training text (.txt, one story per line or the raw layout)")
    p.add_argument("--valid_text", required=True, help="held-out text to score on, the same layouts")
    p.add_argument("--tokenizer", choices=("gpt2", "bpe"), default="gpt2",
                   help=f"gpt2: GPT-2's encoding (--vocab_size {GPT2_VOCAB_SIZE}); bpe: our BPE of the recipe's --vocab_size "
                        "tokens, trained on --train_text")
    p.add_argument("--time_budget", type=MINUTES, default=None, metavar="MINUTES",
                   help=f"minutes of training: {MINUTES}, as train.py's --time_budget takes it (default: the recipe's "
                        "--time_budget, e.g. --preset laptop's 15)")
    p.add_argument("--work_dir", default="quality_work",
                   help="the tokenized texts (cached), one folder per run (runs/), results.jsonl")
    p.add_argument("--results", default=None, help="JSON-lines file the record is appended to "
                                                   "(default: WORK_DIR/results.jsonl)")
    p.add_argument("--keep_overlap", action="store_true",
                   help="score on --valid_text as given; by default its paragraphs that also occur in --train_text "
                        "are removed first (overlap.py), so that memorizing is not rewarded")
    p.add_argument("--samples", type=COUNT_OR_ZERO, default=3, help=f"stories to generate: {COUNT_OR_ZERO}")
    p.add_argument("--sample_tokens", type=COUNT, default=80, help=f"most tokens per story: {COUNT}")
    return p


def parse(argv):
    """(the script's args, the recipe's train.py flags). Paths are made absolute: the tools run in the
    repository's folder, not the caller's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:cut])
    for name in ("train_text", "valid_text", "work_dir", "results"):
        if getattr(args, name) is not None:
            setattr(args, name, os.path.abspath(getattr(args, name)))
    return args, argv[cut + 1:]


def train(cmd):
    """Run train.py (its output shown as it goes); its exit code. Ctrl-C reaches it too (the same terminal):
    it saves where it is and stops, which is waited for; a second Ctrl-C stops it at once. A SIGTERM sent to
    this script alone is passed on to it, so that it never goes on training with no one to score it."""
    proc = subprocess.Popen([PY, *map(str, cmd)], cwd=REPO)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def resolve_recipe(recipe, args):
    """train.py's values for the recipe's flags (presets applied), and the flags train.py gets."""
    parser = train_flags.build_parser()
    full = ["--train_data", "-", *recipe]
    try:
        flags = parser.parse_args(full)
    except SystemExit:
        raise UserError(f"the recipe {' '.join(recipe)!r} is not a valid train.py command line (see the "
                        "message above and python3 train.py --help)") from None
    given = train_flags.given_flags(parser, full)
    owned = sorted(given & set(OWNED) - {"train_data"})
    owned += ["train_data"] if any(a.split("=")[0] == "--train_data" for a in recipe) else []
    if owned:
        raise UserError(f"the recipe sets --{', --'.join(owned)}: the benchmark chooses those itself (the data, "
                        "its own folder, from scratch, the whole validation text)")
    if args.time_budget is not None and "time_budget" in given:
        raise UserError("--time_budget is given twice: give it once, before the `--` or after it")
    extra = []
    if args.time_budget is not None:
        extra += ["--time_budget", str(args.time_budget)]
    if args.tokenizer == "gpt2":
        if "vocab_size" in given and flags.vocab_size != GPT2_VOCAB_SIZE:
            raise UserError(f"the recipe's --vocab_size {flags.vocab_size} is not GPT-2's {GPT2_VOCAB_SIZE}: use "
                            "--tokenizer bpe to train our BPE of that size")
        extra += ["--vocab_size", str(GPT2_VOCAB_SIZE)]  # over a preset's own vocabulary (laptop: our BPE's)
    elif "vocab_size" not in given and not (flags.preset and "vocab_size" in train_flags.PRESETS[flags.preset]):
        raise UserError("--tokenizer bpe trains our BPE of the recipe's --vocab_size tokens: give the recipe "
                        "one (e.g. -- --vocab_size 4096, or --preset laptop)")
    if "eval_interval" not in given:
        extra += ["--eval_interval", "0"]  # one evaluation, at the end: the whole validation text
    extra += ["--no_progress"]
    full += extra
    flags = parser.parse_args(full)
    train_flags.apply_defaults(flags, train_flags.given_flags(parser, full))
    if flags.time_budget is None:
        raise UserError("no time budget: give --time_budget MINUTES (or a recipe that sets one, --preset laptop)")
    try:
        train_flags.check_args(flags)
    except TrainError as e:
        raise UserError(f"the recipe: {e}") from None
    return flags, [*recipe, *extra]


def sha256_of(path):
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    return h.hexdigest()


def run(cmd, what):
    """Run one of the tools; its own one-line error when it fails."""
    proc = subprocess.run([PY, *map(str, cmd)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no message").splitlines()[-1]
        raise UserError(f"{what} failed: {last}")
    return proc.stdout


def tokenized(text, text_sha, tok_key, tok_flags, cache, say):
    """The cached tokenized .jsonl of text for the tokenizer tok_key, made with tokenizer.py when missing
    (its sidecar, written last, marks a complete file)."""
    out = cache / f"{Path(text).stem}-{text_sha[:16]}-{tok_key}.jsonl"
    if (cache / (out.name + ".meta.json")).exists():
        say(f"cached: {out}")
        return out
    run(["tokenizer.py", text, out, *tok_flags, "--quiet"], f"tokenizing {text}")
    say(f"tokenized {text} -> {out}")
    return out


def prepare_data(args, vocab_size, say=print):
    """(train .jsonl, valid .jsonl, tokenizer key), tokenized or taken from WORK_DIR/tokenized."""
    cache = Path(args.work_dir) / "tokenized"
    cache.mkdir(parents=True, exist_ok=True)
    train_sha, valid_sha = sha256_of(args.train_text), sha256_of(args.valid_text)
    if args.tokenizer == "gpt2":
        key, flags = "gpt2", ["--tokenizer", "tiktoken", "--encoding", "gpt2"]
    else:
        key = f"bpe{vocab_size}-{train_sha[:16]}"  # our BPE is a function of its training text and size
        model = cache / f"{key}.json"
        if not model.exists():
            run(["tokenizer.py", "--train_bpe", "--vocab_size", vocab_size, args.train_text, "--model_file", model,
                 "--quiet"], f"training our BPE of {vocab_size} tokens on {args.train_text}")
            say(f"trained our BPE of {vocab_size} tokens -> {model}")
        flags = ["--tokenizer", "lecture2_bpe", "--model_file", model]
    return (tokenized(args.train_text, train_sha, key, flags, cache, say),
            tokenized(args.valid_text, valid_sha, key, flags, cache, say), key)


def read_metrics(save_dir):
    """What scoring needs of the run's metrics.jsonl, read one record at a time (metrics.Records: checked,
    lines that are not records left out): the last record of each type, and the highest step."""
    last, top = {}, 0
    for r in Records(os.path.join(save_dir, "metrics.jsonl"), error=UserError):
        kind = r["type"]
        if kind == "checkpoint" and os.path.basename(str(r.get("path"))) == FINAL:
            kind = "final"
        last[kind], top = r, max(top, r["step"])  # a budget's last fit: where the run ended
    return last, top


def samples(checkpoint, n, max_tokens):
    """n stories generated from the checkpoint (SAMPLING's settings), as text."""
    s = SAMPLING
    out = run(["generate.py", "--checkpoint", checkpoint, "--prompt", s["prompt"], "--num_samples", n,
               "--max_length", max_tokens, "--temperature", s["temperature"], "--top_k", s["top_k"],
               "--seed", s["seed"]], "generating samples")
    parts = out.split("----- sample ")[1:]  # generate.py's "----- sample i/n -----" lines
    return [p.split("-----\n", 1)[1].strip() for p in parts]


def score(save_dir, flags):
    """The run's numbers from its metrics.jsonl: UserError unless the run reached its end (its final checkpoint
    written) and evaluated there. Its train lines are not needed (a recipe's --log_interval may leave none)."""
    last, top = read_metrics(save_dir)
    if "final" not in last:
        stopped = last.get("stopped") or last.get("error")
        why = f" ({stopped.get('reason') or stopped.get('message')})" if stopped else ""
        raise UserError(f"{save_dir}: the run stopped at step {stopped['step'] if stopped else top} before its "
                        f"end{why}, so there is no final score (see its output above)")
    steps = last["final"]["step"]
    final, config, budget = last.get("eval"), last.get("config"), last.get("budget", {})
    if final is None or final["step"] != steps or config is None:
        what = "evaluation" if final is None or final["step"] != steps else "config record"
        raise UserError(f"{save_dir}/metrics.jsonl has no {what} at the run's end (step {steps}); see the run's "
                        "output above")
    # training ends at the last train line, if it is of the last step, else (none logged there) at its evaluation
    train = last.get("train")
    end = train if train is not None and train["step"] == steps else final
    return {"steps": steps, "horizon": budget.get("horizon"), "seconds_per_step": budget.get("seconds_per_step"),
            "train_seconds": end.get("time", math.nan) - config.get("time", math.nan),
            "tokens_seen": steps * flags.batch_size * flags.seq_len,  # every window's seq_len targets, every step
            "num_parameters": config.get("num_parameters"), "config": config.get("config"),
            "val_loss": final["val_loss"], "val_perplexity": math.exp(final["val_loss"]),
            "val_bpb": final.get("val_bpb"), "val_accuracy": final.get("val_accuracy"),
            "val_tokens": final.get("val_tokens")}


def markdown_row(r):
    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", " / ")
    sample = r["samples"][0][:120] + ("..." if len(r["samples"][0]) > 120 else "") if r["samples"] else ""
    s_step = f"{r['seconds_per_step']:.3f}" if r["seconds_per_step"] is not None else "-"
    bpb = f"{r['val_bpb']:.4f}" if r["val_bpb"] is not None else "-"
    return (f"| {r['date'][:10]} | `{cell(' '.join(r['recipe']))}` | {r['tokenizer']['name']} | "
            f"{r['time_budget_minutes']:g} min | {r['steps']:,} | {s_step} | {r['tokens_seen']:,} | "
            f"{r['val_loss']:.4f} | {bpb} | {r['val_perplexity']:.2f} | {cell(sample)} |")


def check_outputs(args, inputs):
    """Before the long run, what it will write: WORK_DIR a folder, the results file a regular file (or none
    yet) in a folder it can write to, and neither one of the inputs ((what, path) pairs). UserError or
    OSError (the folder cannot be made) otherwise."""
    work = Path(args.work_dir)
    if work.exists() and not work.is_dir():
        raise UserError(f"--work_dir {work} is a file, not a folder: name a folder for the benchmark's files")
    results = results_path(args)
    refuse_inputs([results], inputs, error=UserError)
    if results.is_dir():
        raise UserError(f"--results {results} is a folder: name a JSON-lines file to append the record to")
    if results.exists() and not results.is_file():
        raise UserError(f"--results {results} is not a regular file: name a JSON-lines file to append the record to")
    if results.is_file() and not os.access(results, os.W_OK):  # appending replaces the file: it would go through
        raise UserError(f"--results {results} is read-only: make it writable, or name another file")
    if results.parent.exists() and not results.parent.is_dir():
        raise UserError(f"--results {results}: {results.parent} is a file, not a folder")
    results.parent.mkdir(parents=True, exist_ok=True)
    probe = results.parent / f".quality-probe-{os.getpid()}"
    with atomic_write(probe, "w") as f:  # what appending does, on an empty file: can a file be written there?
        f.write("\n")
    os.unlink(probe)


def results_path(args):
    return Path(args.results or Path(args.work_dir) / "results.jsonl")


def os_error_line(e):
    """One line for an OSError from the benchmark's own files."""
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else e.strerror
    return f"{e.filename or 'a file'}: {why}"


def main(argv=None):
    args, recipe = parse(argv)
    save_dir = None
    try:
        for path in (args.train_text, args.valid_text):
            if not os.path.isfile(path):
                raise UserError(f"{path} is not a text file")
        texts = [("training text", args.train_text), ("validation text", args.valid_text)]
        check_outputs(args, texts)
        flags, train_argv = resolve_recipe(recipe, args)
        overlap = None
        if not args.keep_overlap:  # the held-out copy (cached in WORK_DIR/held_out) is what gets scored
            args.valid_text, overlap = held_out(args.valid_text, [args.train_text], Path(args.work_dir) / "held_out")
        train_data, val_data, tok_key = prepare_data(args, flags.vocab_size)
        tokenized_files = [("tokenized text", p) for p in (train_data, val_data, f"{train_data}.meta.json",
                                                           f"{val_data}.meta.json")]
        refuse_inputs([results_path(args)], tokenized_files, error=UserError)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        save_dir = Path(args.work_dir) / "runs" / f"{stamp}-{tok_key.split('-')[0]}-{os.getpid()}"
        machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine(),
                   "python": platform.python_version(),
                   "load_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        cmd = ["train.py", "--train_data", train_data, "--val_data", val_data, "--save_dir", save_dir, *train_argv]
        print("+ python3 " + " ".join(map(str, cmd)), flush=True)
        t = time.time()
        code = train(cmd)
        if code in (130, 143):  # stopped by Ctrl-C or SIGTERM: it saved where it was
            say(f"{'interrupted' if code == 130 else 'terminated'}: no score recorded; the run's folder {save_dir} "
                "keeps what train.py saved")
            return code
        if code:
            raise UserError(f"train.py failed (exit {code}): its message is above")
        wall = time.time() - t
        side = read_json(str(val_data) + ".meta.json", "tokenizer sidecar", error=UserError)
        try:
            tokenizer_name, n_bytes = side["tokenizer"]["name"], side["num_bytes"] + side["num_documents"]
            val_tokens, val_stories = side["num_tokens"], side["num_documents"]
        except (KeyError, TypeError) as e:
            raise UserError(f"{val_data}.meta.json lacks the tokenizer sidecar's field {e}: delete it (and "
                            f"{val_data}) to tokenize again") from None
        record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine,
                  "recipe": recipe, "train_argv": [str(c) for c in cmd[1:]],
                  "tokenizer": {"kind": args.tokenizer, "name": tokenizer_name, "vocab_size": flags.vocab_size},
                  "train_text": {"path": str(args.train_text), "sha256": sha256_of(args.train_text)},
                  "valid_text": {"path": str(args.valid_text), "sha256": sha256_of(args.valid_text),
                                 "bytes": n_bytes,  # as train.py's evaluation: one byte more per story
                                 "tokens": val_tokens, "stories": val_stories,
                                 "overlap_removed": overlap},
                  "time_budget_minutes": flags.time_budget, "wall_seconds": wall,
                  **score(save_dir, flags), "sampling": dict(SAMPLING, max_length=args.sample_tokens),
                  "save_dir": str(save_dir)}
        final = save_dir / FINAL
        record["samples"] = samples(final, args.samples, args.sample_tokens) if args.samples else []
        row = markdown_row(record)
        record["markdown_row"] = row
        for i, text in enumerate(record["samples"]):
            print(f"----- sample {i + 1}/{len(record['samples'])} -----\n{text}")
        print(f"\n{HEADER}\n{row}\n", flush=True)  # the score, before anything more can fail
        line = json.dumps(record)
        with atomic_write(save_dir / "quality_record.json", "w", encoding="utf-8") as f:  # beside the run
            f.write(line + "\n")
        results = results_path(args)
        try:
            append_line(results, line)
        except (OSError, ValueError) as e:
            why = os_error_line(e) if isinstance(e, OSError) else str(e)
            raise UserError(f"the record was not appended to {results} ({why}); the score is printed above and "
                            f"the record kept in {save_dir / 'quality_record.json'}") from None
        print(f"record appended to {results}")
        return 0
    except UserError as e:
        say(f"error: {e}")
        return 1
    except OSError as e:  # the work folder or a file in it: a file where a folder should be, no space, no permission
        say(f"error: {os_error_line(e)}")
        return 1
    except KeyboardInterrupt:
        kept = f"; the run's folder {save_dir} keeps what train.py saved" if save_dir is not None else ""
        say(f"interrupted: no score recorded{kept}")
        return 130


if __name__ == "__main__":
    sys.exit(main())
