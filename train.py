"""Train the NumPy GPT on tokenized TinyStories: resumable, observable, robust.

Small model from the guide (about 1 s a step on 2 cores):
    python3 train.py \\
        --train_data data/train_tokenized.jsonl --val_data data/valid_tokenized.jsonl \\
        --vocab_size 50257 --d_model 128 --n_heads 4 --d_ff 512 --n_layers 2 \\
        --batch_size 32 --seq_len 128 --max_steps 5000 --learning_rate 3e-4 \\
        --warmup_steps 500 --save_dir checkpoints_small --log_interval 50 --eval_interval 500

Continue an interrupted run (same flags plus --resume: the newest checkpoint of that run in
--save_dir, or name one). The result is bit-for-bit what the uninterrupted run gives:
    python3 train.py <same flags as before> --resume
    python3 train.py <same flags as before> --resume checkpoints_small/checkpoint_step_1000.npz

A tiny smoke run that takes seconds, with a profile of where the time goes:
    python3 train.py --train_data data/train_tokenized.jsonl --val_data data/valid_tokenized.jsonl \\
        --d_model 32 --n_heads 2 --d_ff 64 --n_layers 1 --batch_size 8 --seq_len 32 \\
        --max_steps 200 --warmup_steps 20 --save_dir checkpoints_tiny --log_interval 20 \\
        --eval_interval 100 --eval_batches 10 --profile

Fine-tune from a Hugging Face GPT-2 folder (config.json + model.safetensors: export_hf.py's output,
or GPT-2's own files); the architecture comes from its config.json, so the model flags can be left out:
    python3 train.py --init_from hf_small --train_data data/train_tokenized.jsonl \\
        --val_data data/valid_tokenized.jsonl --max_steps 1000 --learning_rate 1e-4 --save_dir ck_tuned

Every logged number also goes to <save_dir>/metrics.jsonl; draw the curves with
    python3 plot_metrics.py checkpoints_small/metrics.jsonl      (needs matplotlib)

Ctrl-C finishes the current step, saves checkpoint_step_N.npz and exits; a NaN loss
stops the run without saving and names the last good checkpoint.

Data-parallel over processes, on one machine or several (needs mpi4py, see the README;
--batch_size stays the global batch, and 2 ranks give what --workers 2 gives, bit for bit):
    mpiexec -n 2 python3 train.py <the usual flags>
"""
import argparse
import contextlib
import errno
import glob
import json
import math
import os
import signal
import sys
import time

import numpy as np

import distributed
from atomic import atomic_write
from checkpoint import (CheckpointError, SaveDirLock, choose_resume, copy_params, find_latest, list_checkpoints,
                        load_checkpoint, new_run_id, save_checkpoint, write_run_id)
from data_loader import (DataError, RandomBatches, check_same_tokenizer, eval_batches, load_dataset,
                         num_eval_windows, same_tokenizer)
from device import DeviceError, require
from optimizer import OPTIMIZERS, LRSchedule, clip_grad_norm
from untrusted import open_regular, parse_json

try:
    from tqdm import tqdm
except ImportError:  # tqdm is in requirements.txt, but training must not depend on a progress bar
    tqdm = None

ARCH_FLAGS = ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "seq_len",
              "use_learned_pos", "no_tie_embeddings", "activation")
# flags that change the sequence of updates: resuming with other values is allowed but not exact
TRAJECTORY_FLAGS = ("batch_size", "learning_rate", "min_lr", "warmup_steps", "lr_schedule", "weight_decay",
                    "decay_embeddings", "grad_clip", "optimizer", "beta1", "beta2", "momentum", "seed",
                    "max_steps", "train_data")
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, file too large, over quota
MAX_METRICS_BYTES = 1 << 30  # metrics.jsonl read back on resume: a record per --log_interval steps, ~200 bytes
NAN_REMEDIES = ("lower --learning_rate (e.g. halve it), keep --grad_clip at 1.0 or lower it, use more "
                "--warmup_steps, and check the data for extreme or wrong token ids")


class TrainError(Exception):
    """Bad flags or state: the message says what to do."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default worth showing."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(
        description="Train a GPT-style language model in NumPy on tokenized .jsonl data.",
        formatter_class=HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--train_data", required=True, help="tokenized training .jsonl (one JSON array of ids per line)")
    d.add_argument("--val_data", default=None, help="tokenized validation .jsonl (no evaluation without it)")
    d.add_argument("--eot_id", type=int, default=None,
                   help="end-of-text id joining the lines of a plain .jsonl without tokenizer sidecar "
                        "(default: 50256 for vocab 50257, else vocab_size - 1)")
    m = p.add_argument_group("model")
    m.add_argument("--vocab_size", type=int, default=50257, help="vocabulary size (50257 for GPT-2's tiktoken)")
    m.add_argument("--d_model", type=int, default=128, help="width of the residual stream")
    m.add_argument("--n_heads", type=int, default=4, help="attention heads per layer (must divide d_model)")
    m.add_argument("--d_ff", type=int, default=512, help="hidden width of the feed-forward block")
    m.add_argument("--n_layers", type=int, default=2, help="number of transformer blocks")
    m.add_argument("--seq_len", type=int, default=128,
                   help="tokens per training window; also the model's max_seq_len (longest context)")
    m.add_argument("--use_learned_pos", action="store_true",
                   help="learned positional embeddings (GPT-2) instead of fixed sinusoidal ones")
    m.add_argument("--no_tie_embeddings", action="store_true",
                   help="give the output layer its own weight instead of reusing the token embedding")
    m.add_argument("--activation", choices=("gelu", "relu"), default="gelu", help="feed-forward nonlinearity")
    m.add_argument("--init_from", default=None, metavar="DIR",
                   help="start from the weights of a Hugging Face GPT-2 folder (config.json + model.safetensors, "
                        "e.g. written by export_hf.py). Its config.json gives the architecture: leave the model flags "
                        "out (any given must agree); --seq_len defaults to its n_positions and may be shorter")
    o = p.add_argument_group("optimization")
    o.add_argument("--batch_size", type=int, default=32, help="windows per step")
    o.add_argument("--max_steps", type=int, default=5000, help="total optimizer steps")
    o.add_argument("--learning_rate", type=float, default=3e-4, help="peak learning rate, reached after warmup")
    o.add_argument("--min_lr", type=float, default=3e-5, help="learning rate at the end of the decay")
    o.add_argument("--warmup_steps", type=int, default=500, help="steps of linear warmup from 0 to --learning_rate")
    o.add_argument("--lr_schedule", choices=LRSchedule.KINDS, default="cosine",
                   help="decay after warmup: cosine or linear to --min_lr, or constant")
    o.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw", help="update rule")
    o.add_argument("--weight_decay", type=float, default=0.01,
                   help="decoupled weight decay for adamw and sgd (plain adam has none) on weight matrices, "
                        "never on biases or layer norms")
    o.add_argument("--decay_embeddings", action="store_true", help="also apply weight decay to the embedding tables")
    o.add_argument("--beta1", type=float, default=0.9, help="Adam/AdamW first-moment decay")
    o.add_argument("--beta2", type=float, default=0.999, help="Adam/AdamW second-moment decay")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0 for plain SGD)")
    o.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
    o.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the batch order")
    o.add_argument("--workers", type=int, default=None,
                   help="threads each batch is split over, one per core (default: as many as NumPy's BLAS uses, "
                        "normally every core; 1: no split). Each adds a copy of the gradients and a logits buffer")
    o.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (NumPy), or cuda: an NVIDIA GPU through CuPy (pip install cupy-cuda12x, or cupy-cuda13x); "
                        "checkpoints are the same files either way, so a run resumes on either")
    r = p.add_argument_group("logging, evaluation, checkpoints")
    r.add_argument("--save_dir", default="checkpoints", help="directory for checkpoints and metrics.jsonl")
    r.add_argument("--log_interval", type=int, default=50, help="print training metrics every this many steps")
    r.add_argument("--eval_interval", type=int, default=500,
                   help="evaluate on --val_data every this many steps (0: only at the end)")
    r.add_argument("--eval_batches", type=int, default=None,
                   help="cap each evaluation at this many batches, spread evenly over the validation set "
                        "(default: the whole set)")
    r.add_argument("--save_interval", type=int, default=5000,
                   help="write checkpoint_step_N.npz every this many steps (0: only the final one)")
    r.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT, or alone: the newest checkpoint of the run that last trained "
                        "in --save_dir (pass the same flags as the interrupted run)")
    r.add_argument("--overwrite", action="store_true",
                   help="start a new run (no --resume) in a --save_dir that holds checkpoints of an earlier one, "
                        "which is refused without this flag: the new run's checkpoint_final.npz and "
                        "checkpoint_step_N.npz replace the earlier ones of the same names; the earlier metrics.jsonl "
                        "is kept as metrics.jsonl.old (.old.1, ... if taken)")
    r.add_argument("--max_time", type=float, default=None,
                   help="stop after this many minutes of training, saving a checkpoint to resume from")
    r.add_argument("--profile", action="store_true",
                   help="print where step time goes (model vs data, clipping, optimizer, logging)")
    r.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    r.add_argument("--rank_timeout", type=float, default=30.0,
                   help="under mpiexec: stop when the other ranks give no answer for this many seconds "
                        "(a rank died or hangs); a rank on the same machine that dies stops the others at once")
    return p


def check_args(args):
    positive = ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "seq_len", "batch_size",
                "max_steps", "log_interval")
    for name in positive:
        if getattr(args, name) < 1:
            raise TrainError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    for name in ("warmup_steps", "eval_interval", "save_interval", "grad_clip", "weight_decay", "min_lr", "seed"):
        if not getattr(args, name) >= 0:  # NaN too: --grad_clip nan would turn clipping off
            raise TrainError(f"--{name} must be a number >= 0 (got {getattr(args, name)})")
    for name in ("beta1", "beta2", "momentum"):
        if not 0 <= getattr(args, name) < 1:
            raise TrainError(f"--{name} must be in [0, 1) (got {getattr(args, name)})")
    if args.eot_id is not None and args.eot_id < 0:
        raise TrainError(f"--eot_id must be a token id >= 0 (got {args.eot_id})")
    from language_model import MAX_SEQ_LEN
    if args.seq_len > MAX_SEQ_LEN:
        raise TrainError(f"--seq_len {args.seq_len} is above the longest context this code supports, {MAX_SEQ_LEN}")
    if args.d_model % args.n_heads:
        raise TrainError(f"--d_model {args.d_model} is not divisible by --n_heads {args.n_heads}")
    if not 0 < args.learning_rate < math.inf:
        raise TrainError(f"--learning_rate must be a positive number (got {args.learning_rate})")
    if args.min_lr > args.learning_rate:
        raise TrainError(f"--min_lr {args.min_lr} is above --learning_rate {args.learning_rate}")
    for name in ("eval_batches", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TrainError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.max_time is not None and not args.max_time > 0:
        raise TrainError(f"--max_time must be a positive number of minutes (got {args.max_time})")
    if not args.rank_timeout > 0:
        raise TrainError(f"--rank_timeout must be a positive number of seconds (got {args.rank_timeout})")


def model_config(args):
    from language_model import ModelConfig
    try:
        return ModelConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_heads=args.n_heads,
                           d_ff=args.d_ff, n_layers=args.n_layers, max_seq_len=args.seq_len,
                           use_learned_pos=args.use_learned_pos, tie_embeddings=not args.no_tie_embeddings,
                           activation=args.activation)
    except ValueError as e:
        raise TrainError(str(e)) from None


def init_config(args):
    """(ModelConfig, config.json's dict) of --init_from's folder; the architecture flags must already
    agree with it."""
    from export_hf import read_hf_config
    config, hf = read_hf_config(args.init_from)
    wanted = init_flags(config)
    wrong = [f"--{k} {getattr(args, k)} (folder: {v})" for k, v in wanted.items() if getattr(args, k) != v]
    if args.seq_len > config.max_seq_len:
        wrong.append(f"--seq_len {args.seq_len} (folder's n_positions: {config.max_seq_len})")
    if wrong:
        raise TrainError(f"{args.init_from}/config.json describes another model than the flags: {', '.join(wrong)}. "
                         "Leave the model flags out with --init_from: its config.json carries them")
    return config, hf


def init_flags(config):
    """The values of the architecture flags that describe config (--seq_len aside)."""
    return {"vocab_size": config.vocab_size, "d_model": config.d_model, "n_heads": config.n_heads,
            "d_ff": config.d_ff, "n_layers": config.n_layers, "use_learned_pos": config.use_learned_pos,
            "no_tie_embeddings": not config.tie_embeddings, "activation": config.activation}


def apply_init_from(args, given):
    """--init_from: the architecture flags not given take the folder's values (--seq_len its n_positions)."""
    from export_hf import read_hf_config
    config, _ = read_hf_config(args.init_from)
    for name, value in init_flags(config).items():
        if name not in given:
            setattr(args, name, value)
    if "seq_len" not in given:
        args.seq_len = config.max_seq_len


def given_flags(parser, argv):
    """The dests of the options argv sets itself (an option left at its default is not among them)."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=ns)
    return {name for name, value in vars(ns).items() if value is not unset}


def make_optimizer(args, params, threads=None):
    if args.optimizer == "sgd":
        return OPTIMIZERS["sgd"](params, momentum=args.momentum, weight_decay=args.weight_decay,
                                 decay_embeddings=args.decay_embeddings, threads=threads)
    weight_decay = args.weight_decay if args.optimizer == "adamw" else 0.0
    return OPTIMIZERS[args.optimizer](params, betas=(args.beta1, args.beta2), weight_decay=weight_decay,
                                      decay_embeddings=args.decay_embeddings, threads=threads)


def tokenizer_model_json(identity, log):
    """The BPE model's JSON text for a lecture2_bpe tokenizer (embedded in checkpoints), else None."""
    if not identity or identity.get("type") != "lecture2_bpe":
        return None
    try:
        try:
            from tokenizer import tokenizer_from_identity
        except ImportError:  # no tokenizer.py here: embed the model file as it is
            with open(identity["model_file"], encoding="utf-8") as f:
                return f.read()
        return tokenizer_from_identity(identity).model_json()
    except Exception as e:  # missing file or module: training still works, generate.py needs the file then
        needs = f"--model_file {identity['model_file']}" if identity.get("model_file") else "its --model_file"
        log(f"warning: could not embed the BPE model in checkpoints ({e}); generate.py will need {needs}")
        return None


class MetricsLog:
    """Prints messages (through tqdm when a bar is showing) and appends records to metrics.jsonl."""

    def __init__(self, save_dir, resume_step=None):
        self.path = os.path.join(save_dir, "metrics.jsonl")
        self.bar = None
        if resume_step is not None and os.path.exists(self.path):
            # records past the checkpoint belong to the part of the run that was lost: drop them
            # (and a line cut short by a kill in the middle of writing it)
            with open_regular(self.path, "r", "metrics log", MAX_METRICS_BYTES, TrainError, encoding="utf-8") as f:
                keep = [line for line in f if self._record_step(line) <= resume_step]
            with atomic_write(self.path, "w", encoding="utf-8") as f:
                f.writelines(keep)
        elif resume_step is None and os.path.exists(self.path):  # an earlier run's: kept, never overwritten
            old, n = self.path + ".old", 0
            while os.path.lexists(old):
                n += 1
                old = f"{self.path}.old.{n}"
            os.replace(self.path, old)
        self.file = open(self.path, "a", encoding="utf-8")

    @staticmethod
    def _record_step(line):
        """The step of a metrics line; infinity for a line that is not a complete record."""
        try:
            step = parse_json(line, "metrics.jsonl").get("step")
            return step if isinstance(step, int) else 0
        except (ValueError, AttributeError):
            return math.inf

    def say(self, msg):
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def record(self, **fields):
        fields["time"] = round(time.time(), 3)
        self.file.write(json.dumps(fields) + "\n")
        self.file.flush()

    def close(self):
        with contextlib.suppress(OSError):  # a full disk was reported already
            self.file.close()


class QuietLog:
    """The log of an MPI rank other than 0: rank 0 alone prints and writes metrics.jsonl."""
    bar = None

    def say(self, msg):
        pass

    def record(self, **fields):
        pass

    def close(self):
        pass


class Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM sets a flag the loop checks between steps, so the run
    stops at a step boundary and saves; a second signal stops at once."""

    SIGNALS = {signal.SIGINT: ("interrupted (Ctrl-C)", 130), signal.SIGTERM: ("terminated (SIGTERM)", 143)}

    def __init__(self):
        self.requested = False
        self.reason, self.exit_code = None, 0
        self.previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, signals behave as usual
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.reason, self.exit_code = self.SIGNALS[signum]

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def evaluate(model, val, batch_size, seq_len, max_batches=None, interrupt=None, ranks=None):
    """Loss, perplexity, accuracy and bits per byte over the validation windows.

    Perplexity is exp(total loss / total tokens), not a mean of per-batch values;
    bits per byte divides the total loss in bits by the UTF-8 bytes those tokens
    stand for (val.num_bytes, separators included) times the fraction of the set evaluated.
    Returns None if interrupted (not under MPI, where the ranks could not agree when to stop).
    """
    loss_sum, n_correct, n_tokens = 0.0, 0, 0
    batches = eval_batches(val, batch_size, seq_len, max_batches)
    if ranks is not None:  # the batches shared out over the MPI ranks, their sums added up already
        (loss_sum, n_correct, n_tokens), batches = shared_eval_sums(model, batches, ranks), ()
    for x, y in batches:
        if interrupt is not None and interrupt.requested:
            return None
        s, c, n = model.evaluate(x, y)
        loss_sum += float(s)
        n_correct += int(c)
        n_tokens += int(n)
    mean = loss_sum / n_tokens
    out = {"val_loss": mean, "val_perplexity": math.exp(min(mean, 700.0)), "val_accuracy": n_correct / n_tokens,
           "val_bpb": None, "val_tokens": n_tokens}
    if val.num_bytes:
        bytes_seen = val.num_bytes * n_tokens / len(val.tokens)  # bytes per token x tokens evaluated
        out["val_bpb"] = loss_sum / math.log(2) / bytes_seen
    return out


def shared_eval_sums(model, batches, ranks):
    """(loss sum, correct, tokens) over the batches, the work shared out over the MPI ranks: each rank
    evaluates its rows of every batch (as one process's workers would), one small Allreduce a batch
    adds up the parts (so no rank waits longer than a batch for another: --rank_timeout holds), and
    the batches are summed in order, as one process sums them."""
    loss_sum, n_correct, n_tokens = 0.0, 0, 0
    for x, y in batches:
        a, b = ranks.share(len(x))
        s, c, n = ranks.sum(model.evaluate(x[a:b], y[a:b]) if b > a else (0.0, 0, 0)).tolist()
        loss_sum += s
        n_correct += int(c)
        n_tokens += int(n)
    return loss_sum, n_correct, n_tokens


def resolve_resume(args):
    """The checkpoint to continue: --resume PATH, or the newest of the run that last trained in --save_dir."""
    if args.resume == "latest":
        return choose_resume(args.save_dir)
    return args.resume


def check_overwrite(args):
    """A run without --resume into a --save_dir that holds checkpoints: refused (TrainError saying what to do)
    unless --overwrite, since its checkpoints would replace the earlier run's; with it, the note to print
    (None: no checkpoints there)."""
    found = list_checkpoints(args.save_dir)
    if not found:
        return None
    final = [f for f in found if os.path.basename(f.path) == "checkpoint_final.npz"]
    newest = (final or found)[0]
    what = ("a finished run" if final else "checkpoints of an earlier run") + f" ({newest.path}, " + \
        (f"step {newest.step})" if newest.error is None else f"unreadable: {newest.error})")
    replaced = ("the new run's checkpoint_final.npz and checkpoint_step_N.npz replace the earlier ones of the same "
                "names, and the earlier metrics.jsonl is kept as metrics.jsonl.old")
    if not args.overwrite:
        raise TrainError(f"{args.save_dir} holds {what}. Continue it with --resume (a finished run with a higher "
                         f"--max_steps), train into another --save_dir, or pass --overwrite to start over there "
                         f"({replaced})")
    return f"note: --overwrite: a new run in {args.save_dir}, which holds {what}: {replaced}"


def check_resume(ck, path, args, config, identity, num_tokens, log):
    """Errors for a checkpoint of another architecture or tokenizer; warnings for other changed flags."""
    saved, wanted = ck.config.to_dict(), config.to_dict()
    if saved != wanted:
        diffs = ", ".join(f"{k}={saved.get(k)!r} (flags give {wanted.get(k)!r})"
                          for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k))
        raise TrainError(f"{path} is a different architecture: {diffs}. Resume with the flags of the run "
                         "that wrote it (they are in its meta: python3 checkpoint.py " + path + ")")
    if not same_tokenizer(ck.meta.get("tokenizer"), identity):
        raise TrainError(f"{path} was trained on data from tokenizer {ck.meta.get('tokenizer')}, but "
                         f"{args.train_data} comes from {identity}")
    old = ck.meta.get("train_args") or {}
    changed = [f"--{k} {old[k]} -> {getattr(args, k)}" for k in TRAJECTORY_FLAGS
               if k in old and old[k] != getattr(args, k)]
    saved_tokens = (ck.meta.get("data") or {}).get("num_tokens")
    if saved_tokens is not None and saved_tokens != num_tokens:
        changed.append(f"training data {saved_tokens:,} -> {num_tokens:,} tokens")
    if changed:
        log("note: resuming with changed flags (" + "; ".join(changed) + "): training continues, "
            "but will not repeat the uninterrupted run exactly")


class Trainer:
    """One training run: data, model, optimizer, schedule and batch order, restored from a
    checkpoint when resuming. run() trains to --max_steps; every piece of state that
    decides the next update is in the checkpoints, so a resumed run repeats exactly."""

    def __init__(self, args):
        check_args(args)
        self.args = args
        # under mpiexec: this process's rank; None when it trains alone
        self.ranks = distributed.ranks(timeout=args.rank_timeout)
        self.root = self.ranks is None or self.ranks.is_root  # prints, writes metrics and checkpoints
        threads = self.ranks.limit_threads() if self.ranks else None
        if self.ranks and args.device != "cpu":
            raise TrainError(f"--device {args.device} under mpiexec (one rank per GPU) is not supported yet: train "
                             "on one GPU without mpiexec, or on the CPU with MPI ranks")
        require(args.device)  # before any data is read: without CuPy or a GPU, say what to install
        if self.ranks and args.batch_size < self.ranks.size:
            raise TrainError(f"--batch_size {args.batch_size} is smaller than the {self.ranks.size} MPI ranks: "
                             "each rank needs at least one row of every batch")
        os.makedirs(args.save_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(args.save_dir, "checkpoint_*.tmp")) if self.root else ():
            os.unlink(stale)  # left by a crash in the middle of a checkpoint write
        notes = []  # messages from before the metrics log exists

        if self.ranks and self.ranks.local_rank > 0:  # the first rank on each machine converts the data once
            self.ranks.node_barrier()
        self.train_ds = load_dataset(args.train_data, vocab_size=args.vocab_size, eot_id=args.eot_id,
                                     log=notes.append)
        self.val_ds = None
        if args.val_data:
            self.val_ds = load_dataset(args.val_data, vocab_size=args.vocab_size, eot_id=args.eot_id,
                                       log=notes.append)
            check_same_tokenizer(self.train_ds, self.val_ds)
            if num_eval_windows(self.val_ds, args.seq_len) < 1:
                raise DataError(f"{args.val_data} has {len(self.val_ds)} tokens, fewer than one window of "
                                f"seq_len + 1 = {args.seq_len + 1}; use a smaller --seq_len or more validation data")
        if self.ranks and self.ranks.local_rank == 0:
            self.ranks.node_barrier()
        self.identity = self.train_ds.tokenizer
        n_vocab = (self.identity or {}).get("n_vocab")
        if n_vocab and n_vocab != args.vocab_size:
            notes.append(f"note: --vocab_size {args.vocab_size} differs from the tokenizer's {n_vocab} tokens")
        # the batch order has its own random stream, separate from the initial weights'
        self.batches = RandomBatches(self.train_ds, args.batch_size, args.seq_len, seed=[args.seed, 1])

        from language_model import LanguageModel
        self.config, hf = init_config(args) if args.init_from else (model_config(args), None)
        self.model = LanguageModel(self.config, seed=args.seed, dtype=np.float32, workers=args.workers,
                                   device=args.device)
        if args.init_from and not args.resume:  # resuming: the checkpoint has the weights
            self.init_weights(args.init_from, hf, notes)
        self.opt = make_optimizer(args, self.model.params, threads)
        self.schedule = LRSchedule(args.learning_rate, args.warmup_steps, args.max_steps, args.min_lr,
                                   args.lr_schedule)
        self.step = 0             # updates done so far
        self.last_good = None     # newest checkpoint known to be good (named when stopping on NaN)
        self.run_id = new_run_id()  # kept in every checkpoint: a bare --resume continues this run, no other
        if self.ranks:
            self.run_id = self.ranks.bcast(self.run_id)  # rank 0's: the one its checkpoints carry
        if args.resume:
            # rank 0 picks the checkpoint, so that every rank loads the same one
            self.restore(self.ranks.bcast(resolve_resume(args) if self.root else None) if self.ranks
                         else resolve_resume(args), notes)
        elif self.root and (note := check_overwrite(args)):
            notes.append(note)
        self.log = MetricsLog(args.save_dir, resume_step=self.step if args.resume else None) if self.root \
            else QuietLog()
        if self.root:  # after the log, whose metrics.jsonl may be refused: then nothing in the folder changed
            write_run_id(args.save_dir, self.run_id)
        for msg in notes:
            self.log.say(msg)
        if self.ranks:
            self.start_ranks()
        n_params = self.model.num_parameters()
        self.log.say(f"model: {n_params:,} parameters ({self.config.to_dict()})")
        self.log.say(f"data: {len(self.train_ds):,} training tokens" +
                     (f", {len(self.val_ds):,} validation tokens" if self.val_ds else ", no validation set"))
        if args.resume:
            self.log.say(f"resumed from {self.last_good} at step {self.step}")
            self.log.record(type="resume", step=self.step, checkpoint=self.last_good, run_id=self.run_id)
        else:
            self.log.record(type="config", step=0, args=vars(args), config=self.config.to_dict(),
                            num_parameters=n_params, run_id=self.run_id)
        self.model_json = tokenizer_model_json(self.identity, self.log.say)
        self.interrupt = Interrupt()
        # seconds per part of a step, summed over the steps this process ran (see report_profile)
        self.timers = {"model": 0.0, "data": 0.0, "clip": 0.0, "optimizer": 0.0, "bookkeeping": 0.0}
        if self.ranks:  # under MPI: the Allreduce, and waiting for slower ranks in it, apart from the model
            self.timers["allreduce"] = 0.0
        self.loop_time, self.loop_steps = 0.0, 0
        self.eval_hinted = False

    def init_weights(self, path, hf, notes):
        """The weights of a Hugging Face GPT-2 folder (--init_from; hf its config.json), copied into the
        model in place."""
        from export_hf import load_hf_params
        record = hf.get("numpy_gpt") if isinstance(hf.get("numpy_gpt"), dict) else {}  # our exports say more
        theirs = record.get("tokenizer")
        if theirs and self.identity and not same_tokenizer(theirs, self.identity):  # a note: DIR/vocab.json
            # tokenizes as the original, under another name
            notes.append(f"note: {path} was trained on data from tokenizer {theirs.get('name')}, {self.args.train_data} "
                         f"comes from {self.identity.get('name')}: the same ids must mean the same text")
        copy_params(self.model.params, load_hf_params(path, self.config), path)
        step = f" (step {record['step']} of the run that wrote it)" if record.get("step") is not None else ""
        notes.append(f"initialised from {path}{step}")

    def start_ranks(self):
        """Under MPI: check that every rank starts from the same state, and say who runs where."""
        r, args = self.ranks, self.args
        r.check_same("the data, the flags and the weights", "long", **{f"--{k}": v for k, v in vars(args).items()},
                     training_tokens=len(self.train_ds), validation_tokens=len(self.val_ds) if self.val_ds else None,
                     step=self.step, weights=distributed.params_checksum(self.model.params),
                     batch_order=distributed.checksum(json.dumps(self.batches.state()).encode()))
        r.last_checkpoint = lambda: find_latest(args.save_dir, self.run_id) or self.last_good
        r.on_lost = lambda message: self.log.record(type="error", step=self.step + 1, message=message)
        self.log.say(f"{r.describe()}; {self.model.runner.n_workers} worker(s) per rank; "
                     f"each rank computes {args.batch_size // r.size}-{-(-args.batch_size // r.size)} "
                     f"of the {args.batch_size} rows of every batch")
        self.log.record(type="ranks", step=self.step, size=r.size, where=r.where,
                        workers=self.model.runner.n_workers)

    def ranks_stop(self, deadline):
        """Under MPI, whether to stop before the next step, agreed by all ranks (one small Allreduce), so
        that a signal to one rank, or --max_time on one rank's clock, stops all of them at the same step."""
        vote = self.interrupt.exit_code if self.interrupt.requested else \
            int(deadline is not None and time.monotonic() > deadline)
        agreed = self.ranks.max(vote)
        if agreed > 1 and not self.interrupt.requested:  # a signal reached another rank
            self.interrupt.requested, self.interrupt.exit_code = True, agreed
            self.interrupt.reason = next(why for why, code in Interrupt.SIGNALS.values() if code == agreed) + \
                " on another rank"
        return agreed > 0

    def restore(self, path, notes):
        ck = load_checkpoint(path)
        check_resume(ck, path, self.args, self.config, self.identity, len(self.train_ds), notes.append)
        copy_params(self.model.params, ck.params, path)   # in place: the optimizer holds these arrays
        split = (self.ranks.size if self.ranks else 1, self.model.runner.n_workers)
        saved = (ck.meta.get("ranks", 1), ck.meta.get("workers", split[1]))
        try:
            self.opt.load_state_dict(ck.arrays)
            self.batches.set_state(ck.meta["data"])
            self.step = int(ck.meta["step"])
            if not all(type(n) is int and n >= 1 for n in saved):
                raise ValueError(f"ranks x workers {saved[0]!r} x {saved[1]!r} is not two counts")
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            raise TrainError(f"{path} lacks a usable optimizer or data state to resume exactly ({e}); it may be "
                             "a weights-only or damaged file") from None
        self.last_good = path
        self.run_id = ck.meta.get("run_id") or self.run_id  # a checkpoint from before runs had ids: a new one
        if not same_gradient_sums(saved, split):
            notes.append(f"note: this run splits each batch over {split[0]} MPI rank(s) x {split[1]} worker(s), the "
                         f"checkpoint's run over {saved[0]} x {saved[1]} (--workers, mpiexec -n, or another machine's "
                         "core count): the gradients are summed in another order, so the weights may differ from an "
                         f"uninterrupted run in the last bits; --workers {saved[1]} with {saved[0]} rank(s) repeats it "
                         "exactly")

    def save(self, name):
        path = os.path.join(self.args.save_dir, name)
        meta = {"step": self.step, "tokenizer": self.identity, "tokenizer_model_json": self.model_json,
                "rng": self.batches.state()["bit_generator"],
                "data": dict(self.batches.state(), train_data=self.args.train_data, num_tokens=len(self.train_ds)),
                "train_args": {k: v for k, v in vars(self.args).items() if k != "resume"},
                "run_id": self.run_id, "workers": self.model.runner.n_workers}
        if self.ranks:  # the ranks' weights must not have drifted apart (they would, silently, with a bug)
            meta["ranks"] = self.ranks.size
            self.ranks.check_same("the weights", step=self.step,
                                  weights=distributed.params_checksum(self.model.params))
        if not self.root:
            self.ranks.barrier("long")  # while rank 0 writes: no rank may end the job before the file is complete
            self.last_good = path
            return path
        t = time.perf_counter()
        try:
            save_checkpoint(path, self.config, self.model.host_params(), meta, self.opt.state_dict())
        except OSError as e:  # the temp file is gone, the previous checkpoint untouched
            raise TrainError(write_failed(path, e, self.last_good)) from None
        if self.ranks:
            self.ranks.barrier()
        self.log.say(f"saved {path} ({time.perf_counter() - t:.1f}s)")
        self.log.record(type="checkpoint", step=self.step, path=path)
        self.last_good = path
        return path

    def evaluate(self):
        args, t = self.args, time.perf_counter()
        res = evaluate(self.model, self.val_ds, args.batch_size, args.seq_len, args.eval_batches, self.interrupt,
                       self.ranks)
        if res is None:  # interrupted
            return
        eval_s = time.perf_counter() - t
        bpb = "n/a" if res["val_bpb"] is None else f"{res['val_bpb']:.4f}"
        self.log.say(f"eval step {self.step}: val loss {res['val_loss']:.4f} | val perplexity "
                     f"{res['val_perplexity']:.2f} | val acc {res['val_accuracy']:.4f} | bits/byte {bpb} | "
                     f"{res['val_tokens']:,} tokens ({eval_s:.1f}s)")
        self.log.record(type="eval", step=self.step, **res)
        if args.eval_batches is None and args.eval_interval and self.loop_steps and not self.eval_hinted:
            train_s = self.loop_time / self.loop_steps * args.eval_interval
            if eval_s > 0.25 * train_s:
                self.eval_hinted = True
                self.log.say(f"note: evaluating the whole validation set takes {eval_s:.0f}s, "
                             f"{100 * eval_s / train_s:.0f}% of the {args.eval_interval} training steps between "
                             "evaluations; --eval_batches N samples N batches evenly across it instead")

    def train_step(self):
        """One update; returns (loss, accuracy, lr, grad_norm). Stops on a non-finite loss or gradient
        before touching the weights."""
        clock = time.perf_counter
        t0 = clock()
        lr = self.schedule(self.step)
        x, y = self.batches.next()
        t1 = clock()
        if self.ranks:  # this rank's rows of the batch, the gradients summed over the ranks
            waited = self.ranks.seconds_waiting
            loss, accuracy = self.ranks.forward_backward(self.model, x, y)
            waited = self.ranks.seconds_waiting - waited
            self.timers["allreduce"] += waited
            self.timers["model"] -= waited
        else:
            loss, accuracy = self.model.forward_backward(x, y)
        t2 = clock()
        # On the GPU the loss stays there until it is logged (reading it waits for the GPU); a
        # non-finite loss makes the gradients non-finite too, so the norm, read every step, stops it.
        if isinstance(loss, float) and not math.isfinite(loss):
            raise TrainError(nan_message("loss", loss, self.step + 1, self.last_good))
        grad_norm = clip_grad_norm(self.model.grads, self.args.grad_clip)
        if not math.isfinite(grad_norm):
            raise TrainError(nan_message("gradient norm", grad_norm, self.step + 1, self.last_good))
        t3 = clock()
        self.opt.step(self.model.grads, lr)
        t4 = clock()
        self.step += 1
        for name, dt in (("data", t1 - t0), ("model", t2 - t1), ("clip", t3 - t2), ("optimizer", t4 - t3)):
            self.timers[name] += dt
        return loss, accuracy, lr, grad_norm

    def run(self):
        """Train to --max_steps (or until Ctrl-C / SIGTERM / --max_time); returns the exit code."""
        args, log = self.args, self.log
        if self.step >= args.max_steps:
            log.say(f"checkpoint is at step {self.step}, already >= --max_steps {args.max_steps}: nothing to train")
            return 0
        deadline = time.monotonic() + 60 * args.max_time if args.max_time else None
        bar = None
        if tqdm is not None and not args.no_progress and self.root:
            # disable=None: no bar when stderr is not a terminal (a log file would fill with redraws)
            bar = tqdm(total=args.max_steps, initial=self.step, unit="step", dynamic_ncols=True, smoothing=0.1,
                       disable=None)
            log.bar = None if bar.disable else bar
        interval = {"loss": 0.0, "accuracy": 0.0, "steps": 0, "time": 0.0}
        try:
            with self.interrupt:
                while self.step < args.max_steps and not (self.ranks_stop(deadline) if self.ranks
                                                          else self.interrupt.requested):
                    if deadline is not None and not self.ranks and time.monotonic() > deadline:
                        break
                    t0 = time.perf_counter()
                    loss, accuracy, lr, grad_norm = self.train_step()
                    interval["loss"] += loss
                    interval["accuracy"] += accuracy
                    interval["steps"] += 1
                    if bar is not None:
                        bar.update(1)
                    t_bookkeeping = time.perf_counter()
                    interval["time"] += t_bookkeeping - t0
                    if self.step % args.log_interval == 0 or self.step == args.max_steps:
                        self.log_train(interval, lr, grad_norm, bar)
                        interval = {"loss": 0.0, "accuracy": 0.0, "steps": 0, "time": 0.0}
                    t_end = time.perf_counter()
                    self.timers["bookkeeping"] += t_end - t_bookkeeping
                    self.loop_time += t_end - t0
                    self.loop_steps += 1
                    if self.step == args.max_steps:
                        break  # the final evaluation and checkpoint follow
                    if self.val_ds is not None and args.eval_interval and self.step % args.eval_interval == 0:
                        self.evaluate()
                    if args.save_interval and self.step % args.save_interval == 0:
                        self.save(f"checkpoint_step_{self.step}.npz")
                if bar is not None:
                    bar.close()
                log.bar = None
                if self.step < args.max_steps:  # stopped early: a signal or --max_time
                    why = self.interrupt.reason if self.interrupt.requested else \
                        f"--max_time {args.max_time} min reached"
                    path = self.save(f"checkpoint_step_{self.step}.npz")
                    log.say(f"{why} at step {self.step}; resume with the same flags plus --resume ({path})")
                    log.record(type="stopped", step=self.step, reason=why)
                    exit_code = self.interrupt.exit_code if self.interrupt.requested else 0
                else:
                    if self.val_ds is not None:
                        self.evaluate()  # a Ctrl-C here skips the evaluation, never the final save
                    path = self.save("checkpoint_final.npz")
                    log.say(f"done: {self.step} steps; final weights in {path}")
                    exit_code = 0
        except TrainError as e:
            with contextlib.suppress(OSError):  # the error may be a full disk
                log.record(type="error", step=self.step + 1, message=str(e))
            raise
        finally:
            if bar is not None:
                bar.close()
            log.bar = None
        self.report_profile()
        return exit_code

    def log_train(self, interval, lr, grad_norm, bar):
        n, secs = interval["steps"], interval["time"]
        loss, accuracy = float(interval["loss"]) / n, float(interval["accuracy"]) / n  # on the GPU: read now
        steps_per_s, tokens_per_s = n / secs, n * self.args.batch_size * self.args.seq_len / secs
        self.log.say(f"step {self.step:>6}/{self.args.max_steps} | loss {loss:.4f} | acc {accuracy:.4f} | "
                     f"lr {lr:.2e} | grad norm {grad_norm:.3f} | {steps_per_s:.2f} steps/s | "
                     f"{tokens_per_s:,.0f} tokens/s")
        self.log.record(type="train", step=self.step, loss=loss, accuracy=accuracy, lr=lr, grad_norm=grad_norm,
                        steps_per_s=steps_per_s, tokens_per_s=tokens_per_s)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def report_profile(self):
        """Time the loop adds on top of model.forward_backward (evaluation and checkpoints excluded)."""
        if not self.loop_steps:
            return
        n, model_t = self.loop_steps, self.timers["model"]
        overhead = (self.loop_time - model_t) / model_t * 100 if model_t > 0 else float("nan")
        self.log.record(type="profile", step=self.step, steps=n, loop_ms_per_step=1000 * self.loop_time / n,
                        overhead_pct=overhead, **{f"{k}_ms_per_step": 1000 * v / n for k, v in self.timers.items()})
        if self.args.profile:
            parts = ", ".join(f"{k} {v / model_t * 100:.2f}%" for k, v in self.timers.items() if k != "model")
            self.log.say(f"profile over {n} steps: model forward_backward {1000 * model_t / n:.2f} ms/step; "
                         f"the loop adds {overhead:.2f}% ({parts})")


def train(args):
    """Run training for parsed args; returns the exit code (0 done or stopped by --max_time, 130 Ctrl-C)."""
    # one writer per --save_dir: the process that writes there (under MPI rank 0) holds the lock
    with SaveDirLock(args.save_dir) if distributed.launcher_rank() == 0 else contextlib.nullcontext():
        trainer = Trainer(args)
        try:
            return trainer.run()
        finally:
            trainer.log.close()


def same_gradient_sums(a, b):
    """Whether runs that split each batch over a = (MPI ranks, workers) and b add up the gradients bit for
    bit alike: the same split, or two shards either way (ranks cut rows as workers do, and the sum of two
    is the same in either order; more partial sums may be added in another order)."""
    return a == b or a[0] * a[1] == b[0] * b[1] == 2


def nan_message(what, value, step, last_good):
    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    return (f"{what} is {value} at step {step}; stopped without saving so no good checkpoint is overwritten "
            f"({where}). Remedies: {NAN_REMEDIES}; then start again or --resume from that checkpoint.")


def write_failed(path, e, last_good):
    why = "the disk is full" if e.errno in DISK_FULL else "writing failed"
    kept = f"the previous checkpoint {last_good} is intact" if last_good else "no checkpoint was written yet"
    return (f"cannot write {path}: {why} ({e.strerror}); {kept}. Free some space (or fix the folder), "
            "then run again with the same flags plus --resume")


def memory_needed(args):
    """Bytes the flags' model and batch need, roughly: weights, gradients and AdamW's two moments (and one
    more gradient copy per extra worker), plus the activations a step keeps for its backward pass."""
    from language_model import param_shapes
    P = sum(math.prod(s) for s in param_shapes(model_config(args)).values())
    C, F, L, H, T = args.d_model, args.d_ff, args.n_layers, args.n_heads, args.seq_len
    return 4 * P * (4 + max(0, (args.workers or os.cpu_count() or 1) - 1)) + \
        4 * args.batch_size * T * L * (8 * C + 2 * F + H * T)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.init_from:
            apply_init_from(args, given_flags(parser, argv))
        return train(args)
    except (TrainError, DataError, CheckpointError, DeviceError, distributed.RanksError) as e:
        distributed.exit_with_error(f"error: {e}")
    except MemoryError:
        distributed.exit_with_error(
            f"error: out of memory: --d_model {args.d_model} --n_layers {args.n_layers} --d_ff {args.d_ff} "
            f"--vocab_size {args.vocab_size} --batch_size {args.batch_size} --seq_len {args.seq_len} need about "
            f"{memory_needed(args) / 1e9:,.1f} GB; make the model or the batch smaller")
    except OSError as e:  # a full disk outside a checkpoint write: metrics.jsonl, the token cache
        if e.errno not in DISK_FULL:
            raise
        where = f" ({e.filename})" if e.filename else ""
        distributed.exit_with_error(f"error: the disk is full ({e.strerror}){where}, writing to {args.save_dir} or "
                                    "next to the data; free some space, then run again with the same flags plus --resume")


if __name__ == "__main__":
    sys.exit(main())
