"""Checkpoints: one .npz with the weights, optimizer state and a JSON meta record.

Layout of the .npz (uncompressed, loads with allow_pickle=False):
    "param/<name>"   model parameters (GPT-2 names, e.g. "wte", "h.0.attn.c_attn.weight")
    "opt/<name>"     optimizer state (e.g. "opt/t", "opt/m/wte", "opt/v/wte"), optional
    "meta"           a JSON string: {"format": "numpy-gpt checkpoint", "version": 1,
                     "config": ModelConfig.to_dict(), "step": int, "tokenizer": identity,
                     "tokenizer_model_json": str|None, "rng": ..., "data": ..., "train_args": ...}

Writes are atomic: the file is written to a temporary name in the same directory,
fsynced, then renamed over the target, so a crash mid-write leaves the previous
checkpoint (or none) but never a truncated one.

    from checkpoint import save_checkpoint, load_checkpoint, load_model
    save_checkpoint("ck/checkpoint_step_500.npz", model.config, model.params, {"step": 500})
    ck = load_checkpoint("ck/checkpoint_step_500.npz")     # ck.config, ck.params, ck.meta, ck.arrays
    model, meta = load_model("ck/checkpoint_final.npz")

Command line (print what a checkpoint holds):
    python3 checkpoint.py checkpoints_small/checkpoint_final.npz
"""
import argparse
import glob
import json
import os
import re
import zipfile
from typing import NamedTuple

import numpy as np

from atomic import atomic_write

FORMAT = "numpy-gpt checkpoint"
VERSION = 1


class CheckpointError(Exception):
    """A file is not a usable checkpoint; the message says why and what to do."""


class Checkpoint(NamedTuple):
    config: object      # ModelConfig
    params: dict        # name -> np.ndarray
    meta: dict          # the JSON meta record
    arrays: dict        # optimizer state: name (without "opt/") -> np.ndarray


def save_checkpoint(path, config, params, meta, arrays=None):
    """Write params (+ optional optimizer arrays) and meta to path atomically.

    config: a ModelConfig (or its dict). meta: JSON-able dict; "format", "version"
    and "config" are filled in here. Refuses to write non-finite weights, so a
    diverged run can never replace a good checkpoint with NaNs.
    """
    path = str(path)
    for name, p in params.items():
        if not np.all(np.isfinite(p)):
            raise CheckpointError(f"refusing to save {path}: parameter {name!r} contains NaN or inf")
    record = dict(meta)
    record.update(format=FORMAT, version=VERSION,
                  config=config if isinstance(config, dict) else config.to_dict())
    payload = {f"param/{k}": v for k, v in params.items()}
    for k, v in (arrays or {}).items():
        payload[f"opt/{k}"] = v
    payload["meta"] = np.array(json.dumps(record))
    with atomic_write(path, "wb") as f:
        np.savez(f, **payload)
    return path


def _read_meta(npz, path):
    if "meta" not in npz.files:
        raise CheckpointError(f"{path} is an .npz file but not a numpy-gpt checkpoint (no 'meta' record)")
    try:
        meta = json.loads(str(npz["meta"]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: checkpoint meta is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a numpy-gpt checkpoint (format={meta.get('format')!r})")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise CheckpointError(f"{path} is checkpoint format version {meta.get('version')}, but this code reads "
                              f"up to version {VERSION}: update numpy-gpt (git pull) to load it")
    return meta


def _open(path):
    path = str(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable numpy-gpt checkpoint ({e}); "
                              "it may be truncated or another kind of file") from None


def read_meta(path):
    """Only the meta record (cheap: the weight arrays are not read)."""
    with _open(path) as npz:
        return _read_meta(npz, path)


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint into a Checkpoint tuple."""
    from language_model import ModelConfig
    with _open(path) as npz:
        meta = _read_meta(npz, path)
        params, arrays = {}, {}
        for key in npz.files:
            if key.startswith("param/"):
                params[key[len("param/"):]] = npz[key]
            elif key.startswith("opt/"):
                arrays[key[len("opt/"):]] = npz[key]
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config in checkpoint ({e})") from None
    return Checkpoint(config, params, meta, arrays)


def load_model(path, dtype=None):
    """A LanguageModel holding the checkpoint's weights; returns (model, meta)."""
    from language_model import LanguageModel
    ck = load_checkpoint(path)
    first = next(iter(ck.params.values()))
    model = LanguageModel(ck.config, seed=0, dtype=dtype or first.dtype)
    copy_params(model.params, ck.params, path)
    return model, ck.meta


def copy_params(dst, src, path="checkpoint"):
    """Copy src arrays into the existing dst arrays in place (names and shapes must match)."""
    if dst.keys() != src.keys():
        missing, extra = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
        raise CheckpointError(f"{path} does not match the model: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, arr in src.items():
        if dst[name].shape != arr.shape:
            raise CheckpointError(f"{path}: parameter {name!r} has shape {arr.shape}, model has {dst[name].shape}")
        dst[name][...] = arr


_STEP_RE = re.compile(r"checkpoint_step_(\d+)\.npz$")


def find_latest(save_dir):
    """Path of the checkpoint in save_dir with the highest step (None if there is none).

    Considers checkpoint_step_N.npz and checkpoint_final.npz; unreadable files are skipped.
    """
    best, best_step = None, -1
    for path in glob.glob(os.path.join(str(save_dir), "checkpoint_*.npz")):
        m = _STEP_RE.search(path)
        if m:
            step = int(m.group(1))
        elif os.path.basename(path) == "checkpoint_final.npz":
            try:
                step = int(read_meta(path).get("step", -1))
            except CheckpointError:
                continue
        else:
            continue
        # a final checkpoint at the same step wins (it is what the run ended with)
        if step > best_step or (step == best_step and path.endswith("final.npz")):
            best, best_step = path, step
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print what a numpy-gpt checkpoint holds.")
    parser.add_argument("checkpoint", help="path to a .npz checkpoint")
    args = parser.parse_args(argv)
    try:
        ck = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        parser.exit(1, f"error: {e}\n")
    n = sum(p.size for p in ck.params.values())
    print(f"{args.checkpoint}: step {ck.meta.get('step')}, {n:,} parameters, format version {ck.meta['version']}")
    print("config:", json.dumps(ck.meta["config"]))
    tok = ck.meta.get("tokenizer") or {}
    print(f"tokenizer: {tok.get('type')} {tok.get('name')} (BPE model embedded: "
          f"{ck.meta.get('tokenizer_model_json') is not None})")
    print(f"optimizer arrays: {len(ck.arrays)}")
    return 0


if __name__ == "__main__":
    main()
