"""A training run's state besides its weights: what decides the next update, and which run it is.

llm.c's state file as one record. train.py writes it into every checkpoint (its arrays beside
the weights, the rest in the meta record) and reads it back to resume exactly:

    save_checkpoint(path, config, params, state.to_meta(), state.opt_state)
    state = TrainState.from_checkpoint(load_checkpoint(path))

A checkpoint's meta may hold keys this code no longer writes ("rng", a copy of the batch
order's generator state kept in "data"): they are ignored.
"""
from dataclasses import dataclass

from checkpoint import CheckpointError
from data_loader import same_tokenizer

# flags that change the sequence of updates: resuming with other values is allowed but not exact
TRAJECTORY_FLAGS = ("batch_size", "learning_rate", "min_lr", "warmup_steps", "lr_schedule", "weight_decay",
                    "decay_embeddings", "grad_clip", "optimizer", "beta1", "beta2", "momentum", "seed",
                    "max_steps", "train_data")


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

    def to_meta(self):
        ranks, workers, grad_accum = self.split
        return {"step": self.step, "run_id": self.run_id, "data": self.data, "tokenizer": self.tokenizer,
                "tokenizer_model_json": self.tokenizer_model_json, "train_args": self.train_args,
                "ranks": ranks, "workers": workers, "grad_accum": grad_accum}

    @classmethod
    def from_checkpoint(cls, ck):
        """The state in a Checkpoint (checkpoint.load_checkpoint). KeyError, TypeError or ValueError
        for a file without it (a weights-only file). A checkpoint from before a field existed: no run
        id (None), the split of one process (its number of workers unknown: None), one micro-batch."""
        meta = ck.meta
        data = meta["data"]
        if not isinstance(data, dict):
            raise TypeError(f"data is {type(data).__name__}, not a record")
        return cls(step=int(meta["step"]), run_id=meta.get("run_id"), data=data, opt_state=ck.arrays,
                   tokenizer=meta.get("tokenizer"), tokenizer_model_json=meta.get("tokenizer_model_json"),
                   train_args=meta.get("train_args") or {},
                   split=(meta.get("ranks", 1), meta.get("workers"), meta.get("grad_accum", 1)))


def same_gradient_sums(a, b):
    """Whether runs that cut each batch as a and b (MPI ranks, workers, micro-batches) add up the
    gradients bit for bit alike: the same cut, or two shards either way with the same micro-batches
    (ranks cut rows as workers do, and the sum of two is the same in either order; more partial sums
    may be added in another order)."""
    return a == b or (a[2] == b[2] and a[0] * a[1] == b[0] * b[1] == 2)


def check_resume(ck, path, args, config, identity, num_tokens, log):
    """Errors for a checkpoint of another architecture or tokenizer than this run's; a note for other
    changed flags (args: train.py's), which let training continue but not repeat the run exactly."""
    saved, wanted = ck.config.to_dict(), config.to_dict()
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
    saved_tokens = (ck.meta.get("data") or {}).get("num_tokens")
    if saved_tokens is not None and saved_tokens != num_tokens:
        changed.append(f"training data {saved_tokens:,} -> {num_tokens:,} tokens")
    if changed:
        log("note: resuming with changed flags (" + "; ".join(changed) + "): training continues, "
            "but will not repeat the uninterrupted run exactly")
