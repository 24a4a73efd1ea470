"""[command] Train the NumPy GPT on tokenized TinyStories: resumable, observable, robust.

Small model from the guide (about 1 s a step on 2 cores):
    python3 train.py \\
        --train_data data/train_tokenized.jsonl --val_data data/valid_tokenized.jsonl \\
        --vocab_size 50257 --d_model 128 --n_heads 4 --d_ff 512 --n_layers 2 \\
        --batch_size 32 --seq_len 128 --max_steps 5000 --learning_rate 3e-4 \\
        --warmup_steps 500 --save_dir checkpoints_small --log_interval 50 --eval_interval 500

The same model and batch by name (--preset tiny|small|medium|large, the README's table; any flag
given as well wins), its batch of 32 computed as 4 micro-batches of 8 rows for less memory:
    python3 train.py --preset small --grad_accum 4 --train_data data/train_tokenized.jsonl \\
        --val_data data/valid_tokenized.jsonl --save_dir checkpoints_small

For a wall-clock budget instead of a number of steps (the learning-rate schedule ends when the time is
up): --time_budget MINUTES. --preset laptop is a whole recipe for 15 minutes on a 2-core laptop, on our
BPE of 4,096 tokens (tokenizer.py --train_bpe --vocab_size 4096, then tokenize with it: the README):
    python3 train.py --preset laptop --train_data data/train_bpe4096.jsonl \\
        --val_data data/valid_bpe4096.jsonl --save_dir checkpoints_laptop

Continue an interrupted run (same flags plus --resume: the newest checkpoint of that run in
--save_dir, or name one). The result is bit-for-bit what the uninterrupted run gives:
    python3 train.py <same flags as before> --resume
    python3 train.py <same flags as before> --resume checkpoints_small/checkpoint_step_1000.npz

Fine-tune from a Hugging Face GPT-2 or Llama folder (config.json + model.safetensors: export_hf.py's output,
or GPT-2's own files); the architecture comes from its config.json, so the model flags can be left out:
    python3 train.py --init_from hf_small --train_data data/train_tokenized.jsonl \\
        --val_data data/valid_tokenized.jsonl --max_steps 1000 --learning_rate 1e-4 --save_dir ck_tuned

Every logged number also goes to <save_dir>/metrics.jsonl (plot_metrics.py draws it). Ctrl-C finishes the current step, saves checkpoint_step_N.npz and exits; a NaN loss
stops the run without saving and names the last good checkpoint.

Data-parallel over processes, on one machine or several (needs mpi4py, see the README;
--batch_size stays the global batch, and 2 ranks give what --workers 2 gives, bit for bit):
    mpiexec -n 2 python3 train.py <the usual flags>
    mpiexec -n 2 python3 train.py <the usual flags> --device cuda     # one rank per GPU

The loop (train_loop) is llm.c's: evaluate and save when due, stop after the last step, else one step.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

import distributed
from budget import TimeBudget
from checkpoint import copy_params
from data_loader import RandomBatches, check_same_tokenizer, load_dataset, num_eval_windows
from device import array_module, gpu_name, on_gpu, synchronize
from dropout import DropoutKey
from errors import DataError, TrainError, UserError, say
from hf_format import load_hf_params, read_hf_config
from language_model import LanguageModel, memory_needed, zero_output_projections
from loss import count_targets
from evaluation import evaluate
from metrics import Interval, MetricsLog, StepTimer, log_eval, log_train, progress_bar
from optimizer import LRSchedule, build_optimizer, clip_grad_norm
from parallel import cores, keep_freed_memory, split_rows
from run_dir import FINAL, RunDir, new_run_id, step_name
from stop import Stop, StopNow
from tokenizer import same_tokenizer, tokenizer_from_identity, tokenizer_kind
from train_flags import apply_defaults, build_parser, check_args, check_init_from, config_from_flags, given_flags
from train_state import DISK_FULL, TrainState, restore, save

NAN_REMEDIES = ("lower --learning_rate (e.g. halve it), keep --grad_clip at 1.0 or lower it, use more "
                "--warmup_steps, and check the data for extreme or wrong token ids")


def make_optimizer(args, params, threads=None):
    """The optimizer of --optimizer with the run's hyperparameters (optimizer.build)."""
    return build_optimizer(args.optimizer, params, weight_decay=args.weight_decay,
                           decay_embeddings=args.decay_embeddings, momentum=args.momentum,
                           betas=(args.beta1, args.beta2), threads=threads, muon_momentum=args.muon_momentum)


def tokenizer_model_json(identity, log):
    """The BPE model's JSON text for a bpe tokenizer (embedded in checkpoints), else None."""
    if not identity or tokenizer_kind(identity.get("type")) != "bpe":
        return None
    try:
        return tokenizer_from_identity(identity).model_json()
    except Exception as e:  # a missing file: training still works, generate.py needs the file then
        needs = f"--model_file {identity['model_file']}" if identity.get("model_file") else "its --model_file"
        log(f"warning: could not embed the BPE model in checkpoints ({e}); generate.py will need {needs}")
        return None


# ---------------------------------------------------------------------------------------- the run

@dataclass
class Run:
    """One training run: what setup() makes, and how far it is (every piece of state that decides
    the next update is in the checkpoints, so a resumed run repeats exactly)."""
    args: argparse.Namespace
    world: object                 # distributed.Solo or MPIRanks
    log: MetricsLog
    run_dir: RunDir
    train_ds: object
    val_ds: object                # None: no evaluation
    batches: RandomBatches
    model: LanguageModel
    opt: object
    schedule: LRSchedule
    tokenizer: dict               # the data's tokenizer identity
    tokenizer_model_json: str
    run_id: str                   # kept in every checkpoint: a bare --resume continues this run, no other
    horizon: int                  # the step the run and its schedule end at (--time_budget: None until measured)
    budget: TimeBudget = None     # --time_budget: fits the horizon as the run goes (budget.py)
    step: int = 0                 # updates done so far
    last_good: str = None         # newest checkpoint known to be good (named when stopping on NaN)

    @property
    def split(self):
        """How each batch is cut: (MPI ranks, workers per rank, micro-batches)."""
        return self.world.size, self.model.workers, self.args.grad_accum

    def end_at(self, horizon):
        """Set the step the run ends at, where the learning-rate schedule ends."""
        self.horizon = self.schedule.max_steps = horizon
        self.schedule.bend = None

    def refit(self, step, horizon):
        """Move the end of the run to horizon at step, the schedule bent to end there (LRSchedule.refit)."""
        self.schedule.refit(step, horizon)
        self.horizon = horizon

    def state(self):
        """The run's state besides the weights, for a checkpoint."""
        a = self.args
        return TrainState(step=self.step, run_id=self.run_id,
                          data=dict(self.batches.state(), train_data=a.train_data, num_tokens=len(self.train_ds)),
                          opt_state=self.opt.state_dict(), tokenizer=self.tokenizer,
                          tokenizer_model_json=self.tokenizer_model_json,
                          train_args={k: v for k, v in vars(a).items() if k != "resume"},
                          split=self.split, horizon=self.horizon if a.time_budget else None,
                          budget=None if self.budget is None else dict(self.budget.record(), bend=self.schedule.bend))


def setup(args, world, log, run_dir, init=None):
    """The data, model, optimizer and schedule of a run, restored from a checkpoint when resuming."""
    array_module(args.device, world.gpu)  # before any data is read: without CuPy or a GPU, say what to install
    if args.batch_size < world.size:
        raise TrainError(f"--batch_size {args.batch_size} is smaller than the {world.size} MPI ranks: "
                         "each rank needs at least one row of every batch")
    if args.batch_size < world.size * args.grad_accum:
        raise TrainError(f"--batch_size {args.batch_size} is smaller than --grad_accum {args.grad_accum} x "
                         f"{world.size} process(es): every micro-batch needs at least one row")
    threads = world.limit_threads()  # under MPI this rank's share of the cores
    train_ds, val_ds = load_data(args, world, log)
    try:
        config = replace(init[0], dropout=args.dropout) if init is not None else config_from_flags(vars(args))
    except ValueError as e:
        raise TrainError(str(e)) from None
    model = LanguageModel(config, seed=args.seed, dtype=np.float32, workers=args.workers or threads,
                          device=args.device)
    if init is not None and not args.resume:  # resuming: the checkpoint has the weights
        init_weights(model, args, init, train_ds.tokenizer, log)
    if args.zero_init_proj and not args.resume:  # an initialisation only: resuming, the checkpoint has the weights
        zero_output_projections(model.params)
    horizon = None if args.time_budget else args.max_steps
    run = Run(args=args, world=world, log=log, run_dir=run_dir, train_ds=train_ds, val_ds=val_ds,
              # the batch order has its own random stream, separate from the initial weights'
              batches=RandomBatches(train_ds, args.batch_size, args.seq_len, seed=[args.seed, 1],
                                    story_starts=args.story_starts),
              model=model, opt=make_optimizer(args, model.params, threads),
              schedule=LRSchedule(args.learning_rate, args.warmup_steps, horizon, args.min_lr, args.lr_schedule,
                                  args.cooldown),
              tokenizer=train_ds.tokenizer, tokenizer_model_json=tokenizer_model_json(train_ds.tokenizer, log.say),
              run_id=world.bcast(new_run_id()), horizon=horizon)  # rank 0's
    if args.resume:  # rank 0 picks the checkpoint, so that every rank loads the same one
        chosen = (run_dir.choose_resume() if args.resume is True else args.resume) if world.is_root else None
        restore(run, world.bcast(chosen))
    elif world.is_root:
        check_overwrite(args, run_dir, log)
    if run.horizon is None and run.budget is None:  # --time_budget, not continued from a checkpoint
        run.budget = TimeBudget(args.time_budget, world, cap=args.max_steps)
    log.open(resume_step=run.step if args.resume else None)
    if world.is_root:  # after the log, whose metrics.jsonl may be refused: then nothing in the folder changed
        run_dir.write_run_id(run.run_id)
    start(run)
    return run


def check_overwrite(args, run_dir, log):
    """A fresh run (no --resume) into a --save_dir that holds checkpoints would replace them: refused
    unless --overwrite, which says what it replaces."""
    earlier = run_dir.earlier_run()
    if earlier is None:
        return
    replaced = ("the new run's checkpoint_final.npz and checkpoint_step_N.npz replace the earlier ones of the same "
                "names, and the earlier metrics.jsonl is kept as metrics.jsonl.old")
    if not args.overwrite:
        raise TrainError(f"{args.save_dir} holds {earlier}. Continue it with --resume (a finished run with a higher "
                         f"--max_steps), train into another --save_dir, or pass --overwrite to start over there "
                         f"({replaced})")
    log.say(f"note: --overwrite: a new run in {args.save_dir}, which holds {earlier}: {replaced}")


def load_data(args, world, log):
    """The training and validation datasets (memory-mapped token files)."""
    with world.local_root_first():  # the first rank on each machine converts a .jsonl once
        train_ds = load_dataset(args.train_data, vocab_size=args.vocab_size, eot_id=args.eot_id, log=log.say)
        val_ds = None
        if args.val_data:
            val_ds = load_dataset(args.val_data, vocab_size=args.vocab_size, eot_id=args.eot_id, log=log.say)
            check_same_tokenizer(train_ds, val_ds)
            if num_eval_windows(val_ds, args.seq_len) < 1:
                raise DataError(f"{args.val_data} has {len(val_ds)} tokens, fewer than one window of seq_len + 1 = "
                                f"{args.seq_len + 1}; use a smaller --seq_len or more validation data")
    n_vocab = (train_ds.tokenizer or {}).get("n_vocab")
    if n_vocab and n_vocab != args.vocab_size:
        log.say(f"note: --vocab_size {args.vocab_size} differs from the tokenizer's {n_vocab} tokens")
    return train_ds, val_ds


def start(run):
    """Say who computes what, record how the run starts, check that every rank starts from the same
    state, and from now on name the checkpoint to resume from if a rank is lost."""
    args, world, log, model = run.args, run.world, run.log, run.model
    rows = sorted({b - a for a, b in split_rows(args.batch_size, world.size)})
    gpus = world.gather(gpu_name(model.xp))  # each rank's GPU (None on the CPU)
    log.say(f"{world.describe()}; {model.workers} worker(s) each, {args.grad_accum} micro-batch(es) a step; "
            f"each process computes {'-'.join(map(str, rows))} of the {args.batch_size} rows of every batch"
            f"{which_gpus(gpus)}")
    log.record(type="ranks", step=run.step, size=world.size, where=world.where, workers=model.workers,
               **({} if gpus[0] is None else {"gpus": gpus}))
    n_params = model.num_parameters()
    log.say(f"model: {n_params:,} parameters ({model.config.to_dict()})")
    log.say(f"data: {len(run.train_ds):,} training tokens" +
            (f", {len(run.val_ds):,} validation tokens" if run.val_ds else ", no validation set"))
    if args.resume:
        log.say(f"resumed from {run.last_good} at step {run.step}")
        log.record(type="resume", step=run.step, checkpoint=run.last_good, run_id=run.run_id)
    else:
        log.record(type="config", step=0, args=vars(args), config=model.config.to_dict(), num_parameters=n_params,
                   run_id=run.run_id)
    world.check_same("the data, the flags and the weights", lambda: {
        **{f"--{k}": v for k, v in vars(args).items()}, "training_tokens": len(run.train_ds),
        "validation_tokens": len(run.val_ds) if run.val_ds else None, "step": run.step,
        "weights": distributed.params_checksum(model.params),
        "batch_order": distributed.checksum(json.dumps(run.batches.state()).encode())}, patience=distributed.SLOW)
    world.watch(functools.partial(lost_rank_message, run))


def which_gpus(gpus):
    """"; rank 0 on GPU 0 (its PCI bus id), rank 1 on ..." for the ranks line ("; on GPU 0 (...)" for one
    process, "" on the CPU)."""
    if gpus[0] is None:
        return ""
    if len(gpus) == 1:
        return f"; on {gpus[0]}"
    return "; " + ", ".join(f"rank {r} on {g}" for r, g in enumerate(gpus))


def init_weights(model, args, init, identity, log):
    """--init_from: the weights of a Hugging Face GPT-2 or Llama folder (init: its (ModelConfig, config.json)),
    copied into the model in place."""
    config, hf = init
    record = hf.get("numpy_gpt") if isinstance(hf.get("numpy_gpt"), dict) else {}  # our exports say more
    theirs = record.get("tokenizer")
    if theirs and identity and not same_tokenizer(theirs, identity):  # a note: DIR/vocab.json
        # tokenizes as the original, under another name
        log.say(f"note: {args.init_from} was trained on data from tokenizer {theirs.get('name')}, {args.train_data} "
                f"comes from {identity.get('name')}: the same ids must mean the same text")
    copy_params(model.params, load_hf_params(args.init_from, config), args.init_from)
    step = f" (step {record['step']} of the run that wrote it)" if record.get("step") is not None else ""
    log.say(f"initialised from {args.init_from}{step}")


def validate(run, stop, timer):
    """Evaluate on --val_data and log it; a hint when that takes long next to the steps between."""
    args, t = run.args, time.perf_counter()
    res = evaluate(run.model, run.val_ds, args.batch_size, args.seq_len, args.eval_batches, run.world, stop)
    if res is None:  # interrupted
        return
    eval_s = time.perf_counter() - t
    log_eval(run.log, run.step, res, eval_s)
    if args.eval_batches is None and args.eval_interval and timer.steps:
        train_s = timer.seconds / timer.steps * args.eval_interval
        if eval_s > 0.25 * train_s:
            run.log.say_once("eval time", f"note: evaluating the whole validation set takes {eval_s:.0f}s, "
                             f"{100 * eval_s / train_s:.0f}% of the {args.eval_interval} training steps between "
                             "evaluations; --eval_batches N samples N batches evenly across it instead")


def accumulate_gradients(model, x, y, n_targets, micro_batches, dropout=None):
    """model.grads += the gradients of the rows x, y, in micro_batches parts one after the other
    (nanoGPT's gradient accumulation); returns their (loss sum, number correct). dropout: the
    DropoutKey of x's first row (each part's is offset by the part's first row), None: no dropout."""
    sums = [model.forward_backward(x[a:b], y[a:b], n_targets, None if dropout is None else dropout.offset(a))
            for a, b in split_rows(len(x), micro_batches)]
    loss_sum, n_correct = sums[0]
    for s, c in sums[1:]:
        loss_sum, n_correct = loss_sum + s, n_correct + c
    return loss_sum, n_correct


def check_finite(what, value, run):
    """Stop before a non-finite value reaches the weights. A value still on the GPU is not read (that
    waits for the GPU): a non-finite loss makes the gradients non-finite too, and their norm is read."""
    if not on_gpu(value) and not math.isfinite(value):
        raise TrainError(nan_message(what, value, run.step + 1, run.last_good))


def due(interval, step, start):
    """Whether `interval` (0: never) falls on step, a step this process took."""
    return bool(interval) and step > start and step % interval == 0


def train_loop(run):
    """Train to --max_steps (or the horizon of --time_budget), or until Ctrl-C / SIGTERM / --max_time;
    returns the exit code."""
    args, world, model, log = run.args, run.world, run.model, run.log
    end = run.horizon or args.max_steps  # before --time_budget has measured: its cap, if any
    if end is not None and run.step >= end:
        what = f"--max_steps {end}" if end == args.max_steps else \
            f"the {end} steps its --time_budget fixed (to train on: no --time_budget, a higher --max_steps)"
        log.say(f"checkpoint is at step {run.step}, already >= {what}: nothing to train")
        return 0
    start, interval = run.step, Interval()
    lr = grad_norm = None  # the last step's, for its log line
    timer = StepTimer(functools.partial(synchronize, model.xp) if args.profile else None)
    stop, show_bar = Stop(args.max_time, world), world.is_root and not args.no_progress
    try:
        with stop, progress_bar(log, run.horizon, run.step, show_bar) as bar:
            while True:
                if run.budget is not None:
                    follow_budget(run, run.budget.tick(run.step), bar)
                    if run.step == run.horizon and interval.steps:  # it ended the run here: the last steps' line
                        log_train(log, run.step, run.horizon, interval, lr, grad_norm, args.batch_size * args.seq_len)
                        interval = Interval()
                last_step = run.step == run.horizon or stop.requested()
                if run.val_ds is not None and (run.step == run.horizon or due(args.eval_interval, run.step, start)):
                    validate(run, stop, timer)  # a Ctrl-C here skips the evaluation, never the save
                    periodic_work(run, "evaluation", args.eval_interval)
                if last_step or due(args.save_interval, run.step, start):
                    path = save(run, FINAL if run.step == run.horizon else step_name(run.step))
                    periodic_work(run, "checkpoint", args.save_interval)
                if last_step:
                    break
                timer.start()
                lr = run.schedule(run.step)
                x, y = run.batches.next()
                n = max(count_targets(y), 1)  # the whole batch's targets: every rank's mean divides by them
                a, b = world.rows(len(x))     # this rank's rows of the batch
                timer.lap("data")
                model.zero_grad()
                key = DropoutKey(args.seed, run.step).offset(a)  # the masks of global rows a.. of this step
                loss_sum, n_correct = accumulate_gradients(model, x[a:b], y[a:b], n, args.grad_accum, key)
                timer.lap("model")
                world.allreduce_(model.grads.flat)
                loss_sum, n_correct = world.sum([loss_sum, n_correct])
                loss, accuracy = loss_sum / n, n_correct / n
                timer.lap("allreduce")
                check_finite("loss", loss, run)
                grad_norm = clip_grad_norm(model.grads, args.grad_clip)
                check_finite("gradient norm", grad_norm, run)
                timer.lap("clip")
                run.opt.step(model.grads, lr)
                run.step += 1
                timer.lap("optimizer")
                interval.add(loss, accuracy, timer.step_seconds())
                bar.update(1)
                if run.step % args.log_interval == 0 or run.step == run.horizon:
                    log_train(log, run.step, run.horizon, interval, lr, grad_norm, args.batch_size * args.seq_len)
                    interval = Interval()
                timer.stop("bookkeeping")
    except TrainError as e:
        with contextlib.suppress(OSError):  # the error may be a full disk
            log.record(type="error", step=run.step + 1, message=str(e))
        raise
    if run.budget is not None:
        log.say(run.budget.summary())
        log.record(type="budget_used", step=run.step, seconds=run.budget.elapsed, budget_seconds=run.budget.seconds,
                   fits=run.budget.fits)
    if run.step == run.horizon:
        log.say(f"done: {run.step} steps; final weights in {path}")
    else:
        log.say(f"{stop.reason} at step {run.step}; resume with the same flags plus --resume ({path})")
        log.record(type="stopped", step=run.step, reason=stop.reason)
    timer.report(log, run.step, "model", show=args.profile)
    return stop.exit_code if run.step != run.horizon else 0


def follow_budget(run, horizon, bar):
    """--time_budget fitted the horizon (budget.py; None: it did not): the run and its schedule end there;
    logged (said the first time and when the time is up) and recorded."""
    if horizon is None:
        return
    budget, first = run.budget, run.horizon is None
    run.refit(run.step, horizon)
    bar.total = horizon
    if first or budget.time_up:
        run.log.say(budget.describe(run.step, horizon))
    run.log.record(type="budget", step=run.step, horizon=horizon, seconds_per_step=budget.step_s,
                   minutes=run.args.time_budget, elapsed_seconds=budget.elapsed,
                   **{f"{k}_seconds": s for k, (_, s) in budget.costs.items()})


def periodic_work(run, what, every):
    """Tell --time_budget that a periodic evaluation or checkpoint followed this step (the final ones
    come after the budget)."""
    if run.budget is not None and run.step != run.horizon:
        run.budget.worked(what, every)


def lost_rank_message(run, what):
    """What the watchdog says when a rank is lost (distributed.Watchdog): the checkpoint to resume from,
    also recorded in metrics.jsonl."""
    ck = run.run_dir.latest(run.run_id) or run.last_good
    resume = f"Resume from {ck}: the same mpiexec command plus --resume" if ck else \
        "No checkpoint was written yet: start again"
    message = f"error: {what}. {resume}"
    run.log.record(type="error", step=run.step + 1, message=message)
    return message


def nan_message(what, value, step, last_good):
    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    return (f"{what} is {value} at step {step}; stopped without saving so no good checkpoint is overwritten "
            f"({where}). Remedies: {NAN_REMEDIES}; then start again or --resume from that checkpoint.")


def train(args, world, init=None):
    """Run training for parsed args in world (distributed.world()); returns the exit code (0: done or
    stopped by --max_time, 130: Ctrl-C, 143: SIGTERM)."""
    run_dir = RunDir(args.save_dir)
    run_dir.check_not_inputs([("training data", args.train_data), ("validation data", args.val_data)])
    # one writer per --save_dir: the process that writes there (under MPI rank 0) holds the lock
    with run_dir.lock() if world.is_root else contextlib.nullcontext():
        os.makedirs(args.save_dir, exist_ok=True)
        if world.is_root:
            run_dir.clean_temp()  # left by a crash in the middle of a checkpoint write
        log = MetricsLog(run_dir.metrics_path, quiet=not world.is_root)
        try:
            return train_loop(setup(args, world, log, run_dir, init))
        finally:
            log.close()


def lost_at_start(what):
    """What the watchdog says when a rank is lost before the run has started."""
    return f"error: {what}. No checkpoint was written yet: start again"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    world = distributed.Solo()  # until the ranks start, an error ends this process alone
    try:
        init = read_hf_config(args.init_from) if args.init_from else None
        apply_defaults(args, given_flags(parser, argv), init)
        if init is not None:
            check_init_from(args, init[0])  # first: the folder's flags that disagree, before what follows from them
        check_args(args)
        world = distributed.world(args.rank_timeout, on_lost=lost_at_start)
        return train(args, world, init)
    except UserError as e:
        world.abort(f"error: {e}")
    except MemoryError:
        need = memory_needed(config_from_flags(vars(args)), args.batch_size, args.seq_len, args.workers or cores())
        world.abort(f"error: out of memory: --d_model {args.d_model} --n_layers {args.n_layers} --d_ff {args.d_ff} "
                    f"--vocab_size {args.vocab_size} --batch_size {args.batch_size} --seq_len {args.seq_len} need "
                    f"about {need / 1e9:,.1f} GB; make the model or the batch smaller")
    except OSError as e:  # a full disk outside a checkpoint write: metrics.jsonl, the token cache
        if e.errno in DISK_FULL:
            where = f" ({e.filename})" if e.filename else ""
            world.abort(f"error: the disk is full ({e.strerror}){where}, writing to {args.save_dir} or next to "
                        "the data; free some space, then run again with the same flags plus --resume")
        if e.filename:  # a file or folder of the run that cannot be read or written (no permission, say)
            world.abort(f"error: {e.filename}: {e.strerror}; fix it (its permissions, or what is there), then run "
                        "again with the same flags" + (" (plus --resume)" if args.resume else ""))
        world.crash()
        raise
    except StopNow as e:  # a second Ctrl-C or SIGTERM: at once, with that signal's exit code
        say(f"{e}")
        if world.size > 1:
            world.end_job(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (reading the data, say): nothing to save there
        say("interrupted (Ctrl-C) outside the training loop; every checkpoint written so far is complete")
        if world.size > 1:
            world.end_job(130)
        return 130
    except Exception:  # a bug: under MPI the whole job ends
        world.crash()
        raise


if __name__ == "__main__":
    sys.exit(main())
