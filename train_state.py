"""[training run] A training run's state besides its weights (what decides the next update, and which run it is),
and how a run saves it into a checkpoint and resumes from one.

llm.c's state file as one record, TrainState. train.py's save() writes it into a checkpoint (its
arrays beside the weights, the rest in the meta record); restore() reads it back, so that the
resumed run repeats the uninterrupted one exactly:

    save_checkpoint(path, config, params, state.to_meta(), state.opt_state)
    state = TrainState.from_checkpoint(load_checkpoint(path))

A checkpoint's meta may hold keys this code no longer writes ("rng", a copy of the batch
order's generator state kept in "data"): they are ignored.
"""
import errno
import time
from dataclasses import dataclass, replace

import distributed
from budget import TimeBudget, check_record, on_resume
from checkpoint import copy_params, load_checkpoint, save_checkpoint
from errors import CheckpointError, TrainError
from stop import saving
from tokenizer import same_tokenizer

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, file too large, over quota

# flags that change the sequence of updates: resuming with other values is allowed but not exact
TRAJECTORY_FLAGS = ("batch_size", "learning_rate", "min_lr", "warmup_steps", "lr_schedule", "weight_decay",
                    "decay_embeddings", "grad_clip", "optimizer", "beta1", "beta2", "momentum", "seed",
                    "max_steps", "train_data", "muon_momentum", "cooldown", "story_starts")


@dataclass
class TrainState:
    step: int                 # updates done so far
    run_id: str               # a bare --resume continues this run, no other (run_dir.py)
    data: dict                # the batch order's position (RandomBatches.state()), train_data, num_tokens
    opt_state: dict           # the optimizer's arrays (Optimizer.state_dict())
    tokenizer: dict           # the training data's tokenizer identity (None: unknown)
    tokenizer_model_json: str  # a BPE tokenizer's model, so that generate.py needs nothing else (or None)
    train_args: dict          # the run's flags, --resume aside
    split: tuple              # how each batch was cut: (MPI ranks, workers per rank, micro-batches)
    horizon: int = None       # --time_budget: the step the run and its schedule end at (None: no budget, or
    #                           not measured yet)
    budget: dict = None       # --time_budget: what it has measured and decided (TimeBudget.record()), and
    #                           where the schedule last bent ("bend"); None: no budget

    def to_meta(self):
        ranks, workers, grad_accum = self.split
        return {"step": self.step, "run_id": self.run_id, "data": self.data, "tokenizer": self.tokenizer,
                "tokenizer_model_json": self.tokenizer_model_json, "train_args": self.train_args,
                "ranks": ranks, "workers": workers, "grad_accum": grad_accum, "horizon": self.horizon,
                "budget": self.budget}

    @classmethod
    def from_checkpoint(cls, ck):
        """The state in a Checkpoint (checkpoint.load_checkpoint). KeyError, TypeError or ValueError
        for a file without it (a weights-only file). A checkpoint from before a field existed: no run
        id (None), the split of one process (its number of workers unknown: None), one micro-batch, no
        horizon (None)."""
        meta = ck.meta
        data = meta["data"]
        if not isinstance(data, dict):
            raise TypeError(f"data is {type(data).__name__}, not a record")
        split = (meta.get("ranks", 1), meta.get("workers"), meta.get("grad_accum", 1))
        if not all(n is None or (type(n) is int and n >= 1) for n in split):  # None: not recorded
            raise ValueError(f"ranks x workers x micro-batches {' x '.join(map(repr, split))} are not counts")
        horizon = meta.get("horizon")
        if horizon is not None and not (type(horizon) is int and horizon >= 1):
            raise ValueError(f"the horizon {horizon!r} is not a number of steps")
        budget = meta.get("budget")
        if budget is not None:
            check_record(budget)
            bend = budget.get("bend")
            if bend is not None and not (isinstance(bend, list) and len(bend) == 2 and type(bend[0]) is int
                                         and isinstance(bend[1], float) and 0 <= bend[1] <= 1):
                raise ValueError(f"the schedule's bend {bend!r} is not [step, progress]")
        return cls(step=int(meta["step"]), run_id=meta.get("run_id"), data=data, opt_state=ck.arrays,
                   tokenizer=meta.get("tokenizer"), tokenizer_model_json=meta.get("tokenizer_model_json"),
                   train_args=meta.get("train_args") or {}, split=split, horizon=horizon, budget=budget)


def same_gradient_sums(a, b):
    """Whether runs that cut each batch as a and b (MPI ranks, workers, micro-batches) add up the
    gradients bit for bit alike: the same cut, or two shards either way with the same micro-batches
    (ranks cut rows as workers do, and the sum of two is the same in either order; more partial sums
    may be added in another order)."""
    return a == b or (a[2] == b[2] and a[0] * a[1] == b[0] * b[1] == 2)


def check_resume(ck, path, args, config, identity, num_tokens, log):
    """Errors for a checkpoint of another architecture or tokenizer than this run's; a note for other
    changed flags (args: train.py's), which let training continue but not repeat the run exactly."""
    # dropout changes the training, not the model: a note below, not an error here
    saved, wanted = replace(ck.config, dropout=0.0).to_dict(), replace(config, dropout=0.0).to_dict()
    if saved != wanted:
        diffs = ", ".join(f"{k}={saved.get(k)!r} (flags give {wanted.get(k)!r})"
                          for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k))
        raise CheckpointError(f"{path} is a different architecture: {diffs}. Resume with the flags of the run "
                              "that wrote it (they are in its meta: python3 checkpoint.py " + path + ")")
    if not same_tokenizer(ck.meta.get("tokenizer"), identity):
        raise CheckpointError(f"{path} was trained on data from tokenizer {ck.meta.get('tokenizer')}, but "
                              f"{args.train_data} comes from {identity}")
    old = ck.meta.get("train_args") or {}
    changed = [f"--{k} {old[k]} -> {getattr(args, k)}" for k in TRAJECTORY_FLAGS
               if k in old and old[k] != getattr(args, k)]
    if ck.config.dropout != config.dropout:  # a checkpoint from before dropout existed: 0
        changed.append(f"--dropout {ck.config.dropout} -> {config.dropout}")
    saved_tokens = (ck.meta.get("data") or {}).get("num_tokens")
    if saved_tokens is not None and saved_tokens != num_tokens:
        changed.append(f"training data {saved_tokens:,} -> {num_tokens:,} tokens")
    if changed:
        log("note: resuming with changed flags (" + "; ".join(changed) + "): training continues, "
            "but will not repeat the uninterrupted run exactly")


def restore(run, path):
    """Continue the run of the checkpoint at path: its weights, optimizer state, batch order, step, run id."""
    ck = load_checkpoint(path)
    check_resume(ck, path, run.args, run.model.config, run.tokenizer, len(run.train_ds), run.log.say)
    copy_params(run.model.params, ck.params, path)   # in place: the optimizer holds these arrays
    try:
        saved = TrainState.from_checkpoint(ck)
        run.opt.load_state_dict(saved.opt_state)
        run.batches.set_state(saved.data)
    except (ValueError, KeyError, TypeError, OverflowError) as e:
        raise TrainError(f"{path} lacks a usable optimizer or data state to resume exactly ({e}); it may be "
                         "a weights-only or damaged file") from None
    run.step, run.last_good = saved.step, path
    args = run.args
    horizon, record = on_resume(saved.horizon, saved.budget, args.time_budget, args.max_steps, run.log.say)
    if record is None:
        run.end_at(horizon)
    else:  # the budget goes on: the schedule as it was, bent to end at --max_steps if that is lower
        bend = record.get("bend")
        run.end_at(saved.horizon)
        run.schedule.bend = None if bend is None else tuple(bend)
        if horizon != saved.horizon:
            run.refit(run.step, horizon)
        run.budget = TimeBudget(args.time_budget, run.world, cap=args.max_steps, record=record)
    run.run_id = saved.run_id or run.run_id  # a checkpoint from before runs had ids: a new one
    split = run.split
    was = tuple(now if then is None else then for then, now in zip(saved.split, split))  # None: not recorded
    if not same_gradient_sums(was, split):
        run.log.say(f"note: this run cuts each batch over {split[0]} MPI rank(s) x {split[1]} worker(s) x {split[2]} "
                    f"micro-batch(es), the checkpoint's run over {was[0]} x {was[1]} x {was[2]} (--workers, "
                    "--grad_accum, mpiexec -n, or another machine's core count): the gradients are summed in "
                    "another order, so the weights may differ from an uninterrupted run in the last bits; "
                    f"--workers {was[1]} --grad_accum {was[2]} with {was[0]} rank(s) repeats it exactly")


def save(run, name):
    """Write checkpoint `name` in --save_dir (rank 0 writes, the others wait until it is complete); a second
    stop signal meanwhile waits for it to be complete (stop.saving)."""
    with saving():
        return _save(run, name)


def _save(run, name):
    world, path = run.world, run.run_dir.path(name)
    # the ranks' weights must not have drifted apart (they would, silently, with a bug)
    world.check_same("the weights", lambda: {"step": run.step,
                                             "weights": distributed.params_checksum(run.model.params)})
    if world.is_root:
        t = time.perf_counter()
        state = run.state()
        try:
            save_checkpoint(path, run.model.config, run.model.host_params(), state.to_meta(), state.opt_state)
        except OSError as e:  # the temp file is gone, the previous checkpoint untouched
            raise TrainError(write_failed(path, e, run.last_good)) from None
        world.barrier()
        run.log.say(f"saved {path} ({time.perf_counter() - t:.1f}s)")
        run.log.record(type="checkpoint", step=run.step, path=path)
    else:
        world.barrier(patience=distributed.SLOW)  # while rank 0 writes: no rank may end the job before then
    run.last_good = path
    return path


def write_failed(path, e, last_good):
    why = "the disk is full" if e.errno in DISK_FULL else "writing failed"
    kept = f"the previous checkpoint {last_good} is intact" if last_good else "no checkpoint was written yet"
    return (f"cannot write {path}: {why} ({e.strerror}); {kept}. Free some space (or fix the folder), "
            "then run again with the same flags plus --resume")
