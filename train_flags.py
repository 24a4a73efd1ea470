"""train.py's command line: every flag with its help, the checks of their values, and the values
the flags left out take.

    parser = build_parser()
    args = parser.parse_args(argv)
    apply_defaults(args, given_flags(parser, argv), init)   # --init_from's folder, then --preset
    check_args(args)

A flag given on the command line always wins. One left out takes, in this order, the value of
--init_from's config.json (the architecture), of --preset (config.PRESETS: a model size and its
batch; a preset may set any flag), else its default. A preset's --time_budget gives way to a
--max_steps given: that many steps are asked for. A preset's values of the block's own flags
(BLOCK_FLAGS) hold only for the block it names (arch, GPT-2's when it names none): with another
--arch given, --d_ff left out is llama.swiglu_hidden(d_model) for llama, 4 d_model for gpt2, and
--activation that block's default (swiglu, gelu).
"""
import argparse
import math

from budget import MAX_MINUTES
from config import GPT2_EOT_ID, GPT2_VOCAB_SIZE, MAX_SEQ_LEN, PRESETS, flags_from_config
from errors import TrainError
from llama import ROPE_THETA, swiglu_hidden
from optimizer import OPTIMIZERS, LRSchedule

MAX_STEPS = 5000  # --max_steps without --time_budget


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
                        f"(default: {GPT2_EOT_ID} for vocab {GPT2_VOCAB_SIZE}, else vocab_size - 1)")
    m = p.add_argument_group("model")
    m.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="tiny|small|medium|large: a model size of the README's table, which sets the model flags, "
                        "--batch_size and --seq_len; laptop: the recipe for 15 minutes on a 2-core laptop, which "
                        "sets every model and optimizer flag and --time_budget 15, and --vocab_size 4096: train our "
                        "BPE of that size on the training text first (python3 tokenizer.py --train_bpe --vocab_size "
                        "4096 TRAIN.txt --model_file bpe4096.json) and tokenize with it (README, 2. Tokenize). "
                        "Flags given as well win; --max_steps given drops the preset's --time_budget")
    m.add_argument("--vocab_size", type=int, default=GPT2_VOCAB_SIZE,
                   help=f"vocabulary size ({GPT2_VOCAB_SIZE} for GPT-2's tiktoken)")
    m.add_argument("--d_model", type=int, default=128, help="width of the residual stream")
    m.add_argument("--n_heads", type=int, default=4, help="attention heads per layer (must divide d_model)")
    m.add_argument("--d_ff", type=int, default=512,
                   help="hidden width of the feed-forward block (default 512; with --arch llama SwiGLU's 8/3 d_model "
                        "rounded up to a multiple of 64, e.g. 384 for d_model 128)")
    m.add_argument("--n_layers", type=int, default=2, help="number of transformer blocks")
    m.add_argument("--seq_len", type=int, default=128,
                   help="tokens per training window; also the model's max_seq_len (longest context)")
    m.add_argument("--use_learned_pos", action="store_true",
                   help="learned positional embeddings (GPT-2) instead of fixed sinusoidal ones")
    m.add_argument("--no_tie_embeddings", action="store_true",
                   help="give the output layer its own weight instead of reusing the token embedding")
    m.add_argument("--activation", choices=("gelu", "relu", "relu2", "swiglu"), default="gelu",
                   help="feed-forward nonlinearity of GPT-2's block: gelu (GPT-2's tanh form), relu, or relu2 "
                        "(relu(x)^2); --arch llama's is swiglu, its only one (default gelu, with --arch llama swiglu)")
    m.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2",
                   help="the block: gpt2 (layer norm, position table, GELU MLP, biases) or llama (RMSNorm, rotary "
                        "positions, SwiGLU feed-forward, no biases, no position table), as llama2.c's TinyStories "
                        "models")
    m.add_argument("--rope_theta", type=float, default=None,
                   help=f"--arch llama: base of the rotary positions' frequencies (default {ROPE_THETA:g})")
    m.add_argument("--n_kv_heads", type=int, default=None,
                   help="--arch llama: key/value heads, fewer than --n_heads for grouped-query attention (must divide "
                        "--n_heads; default: --n_heads)")
    m.add_argument("--init_from", default=None, metavar="DIR",
                   help="start from the weights of a Hugging Face GPT-2 or Llama folder (config.json + "
                        "model.safetensors, e.g. written by export_hf.py). Its config.json gives the architecture: "
                        "leave the model flags out (any given must agree); --seq_len defaults to its context "
                        "(n_positions, max_position_embeddings) and may be shorter")
    o = p.add_argument_group("optimization")
    o.add_argument("--batch_size", type=int, default=32, help="windows per step")
    o.add_argument("--grad_accum", type=int, default=1, metavar="N",
                   help="compute each batch as N micro-batches of batch_size/N windows, one after the other, "
                        "their gradients added up: the same update for less memory")
    o.add_argument("--max_steps", type=int, default=None,
                   help=f"total optimizer steps (default: {MAX_STEPS}; with --time_budget: what fits, at most this "
                        "when given)")
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
    o.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="drop each element with probability P while training, as GPT-2 does (0.1 there): after the "
                        "embeddings, on the attention weights and on each residual branch; never in evaluation or "
                        "generation. Helps against overfitting small data (default 0: off)")
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
    r.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT, or alone: the newest checkpoint of the run that last trained "
                        "in --save_dir (pass the same flags as the interrupted run)")
    r.add_argument("--overwrite", action="store_true",
                   help="start a new run (no --resume) in a --save_dir that holds checkpoints of an earlier one, "
                        "which is refused without this flag: the new run's checkpoint_final.npz and "
                        "checkpoint_step_N.npz replace the earlier ones of the same names; the earlier metrics.jsonl "
                        "is kept as metrics.jsonl.old (.old.1, ... if taken)")
    r.add_argument("--max_time", type=float, default=None,
                   help="stop after this many minutes of training, saving a checkpoint to resume from (the "
                        "schedule is not changed: see --time_budget)")
    r.add_argument("--time_budget", type=float, default=None, metavar="MINUTES",
                   help=f"train for this many minutes of wall time (0 < MINUTES <= {MAX_MINUTES:g}), the learning-rate "
                        "schedule ending when they are up: the speed of the first steps (the first one not timed; "
                        "10 steps and 20 s, or a tenth of the budget) sets how many steps fit, periodic evaluations "
                        "and checkpoints included, and the run and its schedule end there (the horizon, logged); "
                        "each time another 2%% of the budget has passed the horizon is fitted again from the speed "
                        "since, the schedule bending to end there, so a machine that gets busier or quieter "
                        "meanwhile still ends near the budget. --max_steps given caps it; warmup stays in steps; "
                        "the final evaluation and checkpoint come after the budget. The checkpoints record what "
                        "the budget measured and the time used: --resume continues with the time left. --max_time "
                        "still stops the run early")
    r.add_argument("--profile", action="store_true",
                   help="print where step time goes (model vs data, clipping, optimizer, logging); on a GPU it "
                        "waits for the GPU at each part, to time it")
    r.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    r.add_argument("--rank_timeout", type=float, default=30.0,
                   help="under mpiexec: stop when the other ranks give no answer for this many seconds "
                        "(a rank died or hangs); a rank on the same machine that dies stops the others at once")
    return p


def check_args(args):
    positive = ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "seq_len", "batch_size", "grad_accum",
                "max_steps", "log_interval")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:  # max_steps None: --time_budget's
            raise TrainError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    for name in ("warmup_steps", "eval_interval", "save_interval", "grad_clip", "weight_decay", "min_lr", "seed"):
        if not getattr(args, name) >= 0:  # NaN too: --grad_clip nan would turn clipping off
            raise TrainError(f"--{name} must be a number >= 0 (got {getattr(args, name)})")
    for name in ("beta1", "beta2", "momentum", "dropout"):
        if not 0 <= getattr(args, name) < 1:
            raise TrainError(f"--{name} must be in [0, 1) (got {getattr(args, name)})")
    if args.eot_id is not None and args.eot_id < 0:
        raise TrainError(f"--eot_id must be a token id >= 0 (got {args.eot_id})")
    if args.seq_len > MAX_SEQ_LEN:
        raise TrainError(f"--seq_len {args.seq_len} is above the longest context this code supports, {MAX_SEQ_LEN}")
    if args.d_model % args.n_heads:
        raise TrainError(f"--d_model {args.d_model} is not divisible by --n_heads {args.n_heads}")
    check_arch(args)
    if not 0 < args.learning_rate < math.inf:
        raise TrainError(f"--learning_rate must be a positive number (got {args.learning_rate})")
    if args.min_lr > args.learning_rate:
        raise TrainError(f"--min_lr {args.min_lr} is above --learning_rate {args.learning_rate}")
    for name in ("eval_batches", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TrainError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.max_time is not None and not args.max_time > 0:
        raise TrainError(f"--max_time must be a positive number of minutes (got {args.max_time})")
    if args.time_budget is not None and not 0 < args.time_budget <= MAX_MINUTES:  # no inf, NaN or overflow
        raise TrainError(f"--time_budget must be a positive number of minutes, at most {MAX_MINUTES:g} "
                         f"(got {args.time_budget})")
    if not args.rank_timeout > 0:
        raise TrainError(f"--rank_timeout must be a positive number of seconds (got {args.rank_timeout})")


def check_arch(args):
    """Flags of one block given with the other."""
    if args.arch == "llama":
        wrong = [f for f, bad in (("--use_learned_pos", args.use_learned_pos),
                                  (f"--activation {args.activation}", args.activation != "swiglu")) if bad]
        if wrong:
            raise TrainError(f"{' and '.join(wrong)} with --arch llama: the Llama block has rotary positions (no "
                             "position table) and a SwiGLU feed-forward; leave the flag out")
        if args.n_kv_heads is not None and (args.n_kv_heads < 1 or args.n_heads % args.n_kv_heads):
            raise TrainError(f"--n_kv_heads {args.n_kv_heads} must divide --n_heads {args.n_heads}")
        if args.rope_theta is not None and not 1 < args.rope_theta < math.inf:
            raise TrainError(f"--rope_theta must be a number above 1 (got {args.rope_theta})")
        if (args.d_model // args.n_heads) % 2:
            raise TrainError(f"--arch llama needs an even head size, --d_model / --n_heads = "
                             f"{args.d_model} / {args.n_heads} = {args.d_model // args.n_heads}: rotary positions "
                             "turn pairs of dimensions")
        return
    wrong = [f"--{name}" for name in ("rope_theta", "n_kv_heads") if getattr(args, name) is not None]
    if args.activation == "swiglu":
        wrong.append("--activation swiglu")
    if wrong:
        raise TrainError(f"{' and '.join(wrong)}: the Llama block's (--arch llama), not GPT-2's")


def given_flags(parser, argv):
    """The dests of the options argv sets itself (an option left at its default is not among them)."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=ns)
    return {name for name, value in vars(ns).items() if value is not unset}


BLOCK_FLAGS = ("d_ff", "activation", "rope_theta", "n_kv_heads")  # a preset's values for its own block only


def apply_defaults(args, given, init=None):
    """Flags not given take --init_from's values (init: its (ModelConfig, config.json), whose architecture
    wins; --seq_len its context), then --preset's (its --time_budget not when --max_steps is given),
    then their defaults."""
    taken = set(given)
    if init is not None:
        for name, value in dict(flags_from_config(init[0]), seq_len=init[0].max_seq_len).items():
            if name not in taken:
                setattr(args, name, value)
                taken.add(name)
    preset = PRESETS[args.preset] if args.preset else {}
    arch = args.arch if "arch" in taken else preset.get("arch", args.arch)
    own_block = preset.get("arch", "gpt2") == arch  # the preset's d_ff, activation, ... are its block's
    for name, value in preset.items():
        if name in taken or (name == "time_budget" and "max_steps" in taken) or \
                (name in BLOCK_FLAGS and not own_block):
            continue
        setattr(args, name, value)
    if args.max_steps is None and args.time_budget is None:
        args.max_steps = MAX_STEPS
    if "d_ff" not in taken and not (own_block and "d_ff" in preset):  # the block's own width for d_model
        if args.arch == "llama":
            args.d_ff = swiglu_hidden(args.d_model)
        elif preset and not own_block:  # a Llama recipe's model with GPT-2's block: its 4C-wide MLP
            args.d_ff = 4 * args.d_model
    if args.arch == "llama" and "activation" not in taken:
        args.activation = "swiglu"


def check_init_from(args, config):
    """--init_from's folder describes config: the architecture flags must agree with it."""
    wrong = [f"--{k} {getattr(args, k)} (folder: {v})" for k, v in flags_from_config(config).items()
             if getattr(args, k) != v]
    if args.seq_len > config.max_seq_len:
        wrong.append(f"--seq_len {args.seq_len} (folder's context: {config.max_seq_len})")
    if wrong:
        raise TrainError(f"{args.init_from}/config.json describes another model than the flags: {', '.join(wrong)}. "
                         "Leave the model flags out with --init_from: its config.json carries them")
