"""[training run] train.py's command line: every flag with its help, the checks of their values, the
values the flags left out take, and the recipes (--preset).

    parser = build_parser()
    args = parser.parse_args(argv)
    apply_defaults(args, given_flags(parser, argv), init)   # --init_from's folder, then --preset
    check_args(args)

One rule of precedence: a flag given on the command line wins; one left out takes, in this order,
the value of --init_from's config.json (the architecture), of --preset (PRESETS), else its default.
The one exception: a preset's --time_budget gives way to a --max_steps given (that many steps are
asked for). The block's own flags left out (--d_ff, --activation, --rope_theta, --n_kv_heads: None)
are the block's own values (config.ARCHS), so a preset that names no width serves either block:
--preset laptop --arch gpt2 is the laptop recipe with GPT-2's block (d_ff 4 d_model, gelu).
"""
import argparse
import math
from dataclasses import fields

from budget import MAX_MINUTES
from config import ARCHS, FIELD_RANGES, GPT2_EOT_ID, GPT2_VOCAB_SIZE, ROPE_THETA, ModelConfig
from errors import TrainError
from flag_types import COUNT, COUNT_OR_ZERO, PROBABILITY, SEED, HelpFormatter, Number
from optimizer import OPTIMIZERS, WSD_COOLDOWN, LRSchedule

MAX_STEPS = 5000  # --max_steps without --time_budget

# The guide's model sizes, with the batch benchmark.py times each at (train.py flag values: d_ff left out is
# the block's own width, 4 d_model for GPT-2's MLP, the guide's); and laptop, a whole recipe: every model and
# optimizer flag, for --time_budget minutes on a 2-core laptop, trained on our BPE of 4,096 tokens: the Llama
# block, which scored best of the recipes tried with scripts/quality.py (15 minutes on 3.5 MB of TinyStories;
# the README's table). Its block flags are None, the block's own (SwiGLU's d_ff 704 for d_model 256, 8 key/value
# heads, theta 10000), so --preset laptop --arch gpt2 is the GPT-2 recipe tried beside it (d_ff 1024, gelu).
# Its regularization (dropout 0.1, weight decay 0.2 on the embedding too) scored best of the variants measured
# on 2026-12-05 (docs/performance.md): the 850K tokens of training text are seen about six times in 15 minutes.
# QK-norm, relu2 and zero-initialised projections together gained 0.005 bits per byte (with weight decay 0.1),
# about the noise between runs, and QK-norm and relu2 make a model transformers and llama.cpp cannot read: off.
PRESETS = {
    "tiny": dict(d_model=64, n_heads=2, n_layers=2, batch_size=32, seq_len=128),
    "small": dict(d_model=128, n_heads=4, n_layers=2, batch_size=32, seq_len=128),
    "medium": dict(d_model=256, n_heads=8, n_layers=4, batch_size=16, seq_len=256),
    "large": dict(d_model=512, n_heads=16, n_layers=6, batch_size=16, seq_len=256),
    "laptop": dict(vocab_size=4096, d_model=256, n_heads=8, d_ff=None, n_layers=4, seq_len=128,
                   arch="llama", rope_theta=None, n_kv_heads=None,
                   use_learned_pos=False, no_tie_embeddings=False, activation=None, zero_init_proj=False,
                   qk_norm=False, logit_softcap=0.0,
                   batch_size=32, grad_accum=1, optimizer="adamw", learning_rate=2e-3, min_lr=2e-4,
                   warmup_steps=100, lr_schedule="cosine", weight_decay=0.2, decay_embeddings=True,
                   beta1=0.9, beta2=0.999, grad_clip=1.0, dropout=0.1, time_budget=15, cooldown=WSD_COOLDOWN),
}


def config_from_flags(flags):
    """The ModelConfig that train.py's flags describe ({flag name: value}; those left out take
    ModelConfig's defaults). --seq_len is the model's max_seq_len."""
    renamed = {"seq_len": "max_seq_len"}
    known = {f.name for f in fields(ModelConfig)}
    values = {renamed.get(k, k): v for k, v in flags.items() if renamed.get(k, k) in known}
    if "no_tie_embeddings" in flags:
        values["tie_embeddings"] = not flags["no_tie_embeddings"]
    return ModelConfig(**values)


def flags_from_config(config):
    """The values of train.py's architecture flags that describe config (--seq_len aside: a run may
    use a shorter context than the model's max_seq_len)."""
    return {"vocab_size": config.vocab_size, "d_model": config.d_model, "n_heads": config.n_heads,
            "d_ff": config.d_ff, "n_layers": config.n_layers, "use_learned_pos": config.use_learned_pos,
            "no_tie_embeddings": not config.tie_embeddings, "activation": config.activation, "arch": config.arch,
            "rope_theta": config.rope_theta, "n_kv_heads": config.n_kv_heads,
            "qk_norm": config.qk_norm, "logit_softcap": config.logit_softcap}


# The range of each numeric flag as check_args applies it, which --help states (the model's sizes are
# config.FIELD_RANGES, the Hugging Face reader's too)
NON_NEGATIVE = Number(float, 0)
POSITIVE = Number(float, 0, low_open=True)
COOLDOWN = Number(float, 0, 1, low_open=True)
FLAG_RANGES = {"eot_id": Number(int, 0), "vocab_size": FIELD_RANGES["vocab_size"], "d_model": FIELD_RANGES["d_model"],
               "n_heads": FIELD_RANGES["n_heads"], "d_ff": FIELD_RANGES["d_ff"], "n_layers": FIELD_RANGES["n_layers"],
               "seq_len": FIELD_RANGES["max_seq_len"], "rope_theta": FIELD_RANGES["rope_theta"],
               "n_kv_heads": COUNT, "batch_size": COUNT, "grad_accum": COUNT, "max_steps": COUNT,
               "learning_rate": POSITIVE, "min_lr": NON_NEGATIVE, "warmup_steps": COUNT_OR_ZERO,
               "weight_decay": NON_NEGATIVE, "beta1": PROBABILITY, "beta2": PROBABILITY, "momentum": PROBABILITY,
               "muon_momentum": PROBABILITY,
               "grad_clip": NON_NEGATIVE, "dropout": PROBABILITY, "seed": SEED, "workers": COUNT,
               "log_interval": COUNT, "eval_interval": COUNT_OR_ZERO, "eval_batches": COUNT,
               "save_interval": COUNT_OR_ZERO, "max_time": POSITIVE, "rank_timeout": POSITIVE,
               "time_budget": Number(float, 0, MAX_MINUTES, low_open=True), "cooldown": COOLDOWN,
               "logit_softcap": FIELD_RANGES["logit_softcap"]}


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
    d.add_argument("--story_starts", action="store_true",
                   help="start every training window at a story's start (right after an end-of-text token, or "
                        "the file's first token) instead of anywhere; a window may still run on into the next "
                        "story. Validation and evaluation windows are unchanged")
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
    m.add_argument("--d_ff", type=int, default=None,
                   help="hidden width of the feed-forward block (default: the feed-forward's own, 4 d_model for "
                        "GPT-2's MLP and --activation relu2; with --arch llama SwiGLU's 8/3 d_model rounded up to a "
                        "multiple of 64, e.g. 384 for d_model 128)")
    m.add_argument("--n_layers", type=int, default=2, help="number of transformer blocks")
    m.add_argument("--seq_len", type=int, default=128,
                   help="tokens per training window; also the model's max_seq_len (longest context)")
    m.add_argument("--use_learned_pos", action="store_true",
                   help="learned positional embeddings (GPT-2) instead of fixed sinusoidal ones")
    m.add_argument("--no_tie_embeddings", action="store_true",
                   help="give the output layer its own weight instead of reusing the token embedding")
    m.add_argument("--activation", choices=("gelu", "relu", "relu2", "swiglu"), default=None,
                   help="feed-forward nonlinearity of GPT-2's block: gelu (GPT-2's tanh form), relu, or relu2 "
                        "(relu(x)^2); --arch llama's: swiglu (gated, three matrices) or relu2 (a two-matrix MLP "
                        "without biases, not exportable to Hugging Face or GGUF) (default gelu, with --arch llama "
                        "swiglu)")
    m.add_argument("--arch", choices=list(ARCHS), default="gpt2",
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
    m.add_argument("--zero_init_proj", action="store_true",
                   help="start every block's two output projections (attn.c_proj, mlp.c_proj) at zero, so each "
                        "block begins as the identity (modded-nanogpt's); only the initial weights change, so a "
                        "--resume keeps the checkpoint's and --init_from refuses it")
    m.add_argument("--qk_norm", action="store_true",
                   help="QK-norm: divide each attention head's query and key by their root mean square before the "
                        "scores (either block; no parameters). Not exportable: transformers' GPT-2 and Llama have none")
    m.add_argument("--logit_softcap", type=float, default=0.0, metavar="C",
                   help="soft-cap the logits, z -> C tanh(z / C), before the softmax, in training, evaluation and "
                        "generation (Gemma 2 uses 30; 0: off). Not exportable: transformers' GPT-2 and Llama have none")
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
                   help="decay after warmup: cosine or linear to --min_lr (--min_lr 0: linear to zero), constant, "
                        "or wsd (warmup-stable-decay): --learning_rate, then linear to --min_lr over the last "
                        "--cooldown of the steps after warmup")
    o.add_argument("--cooldown", type=float, default=WSD_COOLDOWN, metavar="SHARE",
                   help="--lr_schedule wsd: the share of the steps after warmup spent decaying to --min_lr, at "
                        "the end (1: the whole of them, the linear schedule); with --time_budget the cooldown "
                        "follows the horizon as it is fitted again")
    o.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw", help="update rule")
    o.add_argument("--weight_decay", type=float, default=0.01,
                   help="decoupled weight decay for adamw, muon and sgd (plain adam has none) on weight matrices, "
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
    o.add_argument("--muon_momentum", type=float, default=0.95,
                   help="--optimizer muon: Nesterov momentum of the blocks' weight matrices (AdamW for the rest takes "
                        "--beta1 and --beta2)")
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
                   help="train for this many minutes of wall time, the learning-rate "
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
    for action in p._actions:  # each numeric flag's range, as check_args applies it
        if action.dest in FLAG_RANGES:
            action.help = f"{action.help}; {FLAG_RANGES[action.dest]}"
    return p


def check_args(args):
    positive = ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "seq_len", "batch_size", "grad_accum",
                "max_steps", "log_interval")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:  # max_steps None: --time_budget's
            raise TrainError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    for name in ("warmup_steps", "eval_interval", "save_interval", "grad_clip", "weight_decay", "min_lr", "seed"):
        if not 0 <= getattr(args, name) < math.inf:  # NaN too: --grad_clip nan would turn clipping off
            raise TrainError(f"--{name} must be a number >= 0 (got {getattr(args, name)})")
    for name in ("beta1", "beta2", "momentum", "dropout", "muon_momentum"):
        if not 0 <= getattr(args, name) < 1:
            raise TrainError(f"--{name} must be in [0, 1) (got {getattr(args, name)})")
    if args.eot_id is not None and args.eot_id < 0:
        raise TrainError(f"--eot_id must be a token id >= 0 (got {args.eot_id})")
    for flag, field in MODEL_FLAGS:  # the model's ranges: ModelConfig's, which a Hugging Face folder is read with
        check_model_flag(args, flag, field)
    check_model(args)
    if not 0 < args.learning_rate < math.inf:
        raise TrainError(f"--learning_rate must be a positive number (got {args.learning_rate})")
    if args.min_lr > args.learning_rate:
        raise TrainError(f"--min_lr {args.min_lr} is above --learning_rate {args.learning_rate}")
    if not COOLDOWN.holds(args.cooldown):
        raise TrainError(f"--cooldown must be {COOLDOWN} (got {args.cooldown})")
    for name in ("eval_batches", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TrainError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.max_time is not None and not 0 < args.max_time < math.inf:
        raise TrainError(f"--max_time must be a positive number of minutes (got {args.max_time})")
    if args.time_budget is not None and not 0 < args.time_budget <= MAX_MINUTES:  # no inf, NaN or overflow
        raise TrainError(f"--time_budget must be a positive number of minutes, at most {MAX_MINUTES:g} "
                         f"(got {args.time_budget})")
    if not 0 < args.rank_timeout < math.inf:
        raise TrainError(f"--rank_timeout must be a positive number of seconds (got {args.rank_timeout})")
    if args.zero_init_proj and args.init_from:
        raise TrainError(f"--zero_init_proj sets the initial weights, and --init_from {args.init_from} gives them: "
                         "leave one of the two out")


MODEL_FLAGS = (("vocab_size", "vocab_size"), ("d_model", "d_model"), ("n_heads", "n_heads"), ("d_ff", "d_ff"),
               ("n_layers", "n_layers"), ("seq_len", "max_seq_len"), ("n_kv_heads", "n_kv_heads"),
               ("rope_theta", "rope_theta"),
               ("logit_softcap", "logit_softcap"))  # (train.py's flag, ModelConfig's field)


def check_model_flag(args, flag, field):
    """TrainError unless --flag (None: not set) is in the range of ModelConfig's field (config.FIELD_RANGES)."""
    value = getattr(args, flag)
    if value is None:
        return
    try:
        FIELD_RANGES[field].check(value, f"--{flag}")
    except ValueError as e:
        raise TrainError(str(e)) from None


def check_model(args):
    """The model the flags describe, checked once, by ModelConfig's own rules (config.py: each block's
    fields, heads that fit the width); the sizes' ranges are checked before (check_model_flag)."""
    try:
        config_from_flags(vars(args))
    except ValueError as err:
        raise TrainError(f"the model flags: {err}") from None


def given_flags(parser, argv):
    """The dests of the options argv sets itself (an option left at its default is not among them)."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=ns)
    return {name for name, value in vars(ns).items() if value is not unset}


def take_preset(parser, argv, args):
    """For a script that takes some of train.py's flags and --preset (scripts/torch_compare.py, compare_trees.py):
    the preset's values of its flags that argv leaves out, set on args; the flags given win. Returns args."""
    if args.preset:
        flags, given = vars(args), given_flags(parser, argv)
        for name, value in PRESETS[args.preset].items():
            if name in flags and name not in given:
                flags[name] = value
    return args


def apply_defaults(args, given, init=None):
    """Flags not given take --init_from's values (init: its (ModelConfig, config.json), whose architecture
    wins; --seq_len its context), then --preset's (its --time_budget not when --max_steps is given),
    then their defaults; the block's own flags left out then take the block's values (config.ARCHS)."""
    taken = set(given)
    if init is not None:
        for name, value in dict(flags_from_config(init[0]), seq_len=init[0].max_seq_len).items():
            if name not in taken:
                setattr(args, name, value)
                taken.add(name)
    preset = PRESETS[args.preset] if args.preset else {}
    for name, value in preset.items():
        if name in taken or (name == "time_budget" and "max_steps" in taken):
            continue
        setattr(args, name, value)
    if args.max_steps is None and args.time_budget is None:
        args.max_steps = MAX_STEPS
    arch = ARCHS.get(args.arch)
    if args.activation is None and arch:
        args.activation = arch.activations[0]
    if args.d_ff is None and arch and args.d_model >= 1 and args.activation in arch.activations:
        args.d_ff = arch.d_ff(args.d_model, args.activation)  # the activation's width, recorded as the model has it


def check_init_from(args, config):
    """--init_from's folder describes config: the architecture flags must agree with it."""
    wrong = [f"--{k} {getattr(args, k)} (folder: {v})" for k, v in flags_from_config(config).items()
             if getattr(args, k) != v]
    if args.seq_len > config.max_seq_len:
        wrong.append(f"--seq_len {args.seq_len} (folder's context: {config.max_seq_len})")
    if wrong:
        raise TrainError(f"{args.init_from}/config.json describes another model than the flags: {', '.join(wrong)}. "
                         "Leave the model flags out with --init_from: its config.json carries them")
