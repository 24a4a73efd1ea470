"""What an export may say about its training run: the recipe, never the machine it ran on.

A checkpoint's meta record (train_state.py) is made for resuming on the machine that wrote it, so it
keeps the run's flags as given: the data's paths, the save folder, the BPE model file's path (in the
tokenizer's identity), which can show a user name, a home folder or a host's mounts. Whatever leaves
the machine (export_hf.py's config.json and model card, export_gguf.py's metadata) says instead
what shareable_record keeps: the model and optimizer flags, the steps and tokens seen, the data by
file name alone, the tokenizer by name and content hash.

    from shareable import shareable_record
    record = shareable_record(ck.meta)   # {"config", "step", "tokens_seen", "tokenizer", "data", "train_args", ...}

What is kept is listed, not what is dropped: a text flag added to train.py later is left out until it
is named here, so a new path flag cannot leak.
"""
import re

# train.py's flags that name a file or folder of the recipe: kept as the file's name alone
FILE_FLAGS = ("train_data", "val_data", "init_from")
# train.py's flags whose text is one of a few words (argparse choices): kept as they are
WORD_FLAGS = ("preset", "arch", "activation", "lr_schedule", "optimizer", "device")
# how a run was watched or where it wrote, not what it computed: left out
NOT_RECIPE = ("save_dir", "resume", "overwrite", "no_progress", "profile", "log_interval", "save_interval",
              "rank_timeout", "workers")
# what names a tokenizer (its identity without "model_file", a path)
TOKENIZER_FIELDS = ("type", "name", "n_vocab", "eot_id", "sha256")


def file_name(path):
    """The last part of a path written with / or \\ (a checkpoint may come from another system)."""
    return re.split(r"[\\/]", str(path).rstrip("\\/"))[-1]


def shareable_args(train_args):
    """train.py's recorded flags without paths: numbers and switches as they are, the choice flags,
    the data and starting folder by file name; every other text flag is left out."""
    out = {}
    for key, value in train_args.items():
        if key in NOT_RECIPE:
            continue
        if key in FILE_FLAGS and isinstance(value, str):
            out[key] = file_name(value)
        elif value is None or isinstance(value, (bool, int, float)) or (key in WORD_FLAGS and isinstance(value, str)):
            out[key] = value
    return out


def shareable_record(meta):
    """A checkpoint's meta record as it may be shared: the model's config, the step, the tokens seen
    (steps x batch_size x seq_len), the tokenizer by name and sha256, the training data by file name
    and size, the recipe (shareable_args) and the number of MPI ranks. Fields the checkpoint lacks are
    left out (a weights-only file gives only its config and step)."""
    record = {}
    if isinstance(meta.get("config"), dict):
        record["config"] = meta["config"]
    if isinstance(meta.get("step"), int):
        record["step"] = meta["step"]
    args = meta.get("train_args")
    args = shareable_args(args) if isinstance(args, dict) else {}
    counts = (record.get("step"), args.get("batch_size"), args.get("seq_len"))
    if all(isinstance(n, int) and not isinstance(n, bool) for n in counts):
        record["tokens_seen"] = counts[0] * counts[1] * counts[2]  # each window's seq_len tokens predicted
    identity = meta.get("tokenizer")
    if isinstance(identity, dict):
        record["tokenizer"] = {k: identity[k] for k in TOKENIZER_FIELDS if k in identity}
        if isinstance(identity.get("name"), str):  # a name, never a path, even from an old or odd checkpoint
            record["tokenizer"]["name"] = file_name(identity["name"])
    data = meta.get("data")
    if isinstance(data, dict):
        record["data"] = {"train_data": file_name(data["train_data"]) if isinstance(data.get("train_data"), str)
                          else None,
                          "num_tokens": data.get("num_tokens") if isinstance(data.get("num_tokens"), int) else None}
    if args:
        record["train_args"] = args
    if isinstance(meta.get("ranks"), int):
        record["ranks"] = meta["ranks"]
    return record
