"""[files] Checkpoints: one .npz with the weights, optimizer state and a JSON meta record.

Layout of the .npz (uncompressed, loads with allow_pickle=False):
    "param/<name>"   model parameters (GPT-2 names, e.g. "wte", "h.0.attn.c_attn.weight")
    "opt/<name>"     optimizer state (e.g. "opt/t", "opt/m/wte", "opt/v/wte"), optional
    "meta"           a JSON string: {"format": "numpy-gpt checkpoint", "version": 1,
                     "config": ModelConfig.to_dict(), "step": int, ...}; train.py adds the rest
                     of its run's state (train_state.py: run id, data position, tokenizer, ...)

Writes are atomic: the file is written to a temporary name in the same directory,
fsynced, then renamed over the target, so a crash mid-write leaves the previous
checkpoint (or none) but never a truncated one. Reads trust nothing in the file: every
array's header is checked against the file's size and the config against the arrays
before anything is allocated, and the zip CRCs are checked, so a damaged file gives one
CheckpointError naming it. The folder a training run keeps its checkpoints in: run_dir.py.

    from checkpoint import save_checkpoint, load_checkpoint, load_model
    save_checkpoint("ck/checkpoint_step_500.npz", model.config, model.params, {"step": 500})
    ck = load_checkpoint("ck/checkpoint_step_500.npz")     # ck.config, ck.params, ck.meta, ck.arrays
    model, meta = load_model("ck/checkpoint_final.npz")

Command line (print what a checkpoint holds):
    python3 checkpoint.py checkpoints_small/checkpoint_final.npz
"""
import errno
import contextlib
import json
import math
import os
import struct
import tokenize
import zipfile
from typing import NamedTuple

import numpy as np

from atomic import atomic_write
from config import ModelConfig, name_mismatch, param_shapes
from device import get_array_module, to_device
from errors import CheckpointError, UserError
from flag_types import Parser
from language_model import LanguageModel
from untrusted import open_regular, parse_json

FORMAT = "numpy-gpt checkpoint"
VERSION = 1


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


def _bad(path, why):
    return CheckpointError(f"{path} is not a readable numpy-gpt checkpoint ({why}); it may be truncated, "
                           "damaged, or another kind of file")


# what reading a damaged zip file can raise, from the zipfile module or numpy's header parser
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, KeyError, IndexError,
                TypeError, SyntaxError, NotImplementedError, RuntimeError, struct.error, UnicodeDecodeError,
                OverflowError, tokenize.TokenError)


class _Reader:
    """The arrays of a checkpoint .npz, each read only after its header and size were checked
    against the file: a damaged or hostile file gives a CheckpointError, never a huge allocation."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise CheckpointError(f"checkpoint not found: {self.path}")
        if os.path.isdir(self.path):
            raise CheckpointError(f"{self.path} is a directory; pass a checkpoint .npz file")
        self.file = self.zip = None
        try:
            self.file = open_regular(self.path, "rb", "checkpoint .npz file", error=CheckpointError)
            self.zip = zipfile.ZipFile(self.file)
            size = os.fstat(self.file.fileno()).st_size
            self.members = {}
            for info in self.zip.infolist():
                if not info.filename.endswith(".npy"):
                    raise _bad(self.path, f"unexpected member {info.filename!r}")
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size \
                        or info.header_offset + info.file_size > size:
                    raise _bad(self.path, f"member {info.filename!r} has a size that does not fit the file")
                self.members[info.filename[:-len(".npy")]] = info
        except BaseException as e:
            self.close()
            if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):  # the file is fine, its mode is not
                raise CheckpointError(f"cannot read {self.path}: {e.strerror}; give read permission to it (and its "
                                      "folder), or pass another checkpoint") from None
            if isinstance(e, _READ_ERRORS) and not isinstance(e, CheckpointError):
                raise _bad(self.path, f"{type(e).__name__}: {e}") from None
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for f in (self.zip, self.file):
            if f is not None:
                f.close()

    def _open_array(self, key, kinds):
        """The member under key, opened and read past its .npy header, with the (shape, fortran order,
        dtype) the header gives: checked against the member's size, and dtype.kind against kinds."""
        info = self.members[key]
        f = self.zip.open(info)
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise _bad(self.path, f"{key!r} has .npy format version {version}")
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject or dtype.kind not in kinds or \
                    math.prod(shape) * dtype.itemsize != info.file_size - f.tell():
                raise _bad(self.path, f"{key!r}: its header says {dtype} {shape}, which does not fit its "
                                      f"{info.file_size} bytes")
        except BaseException:
            f.close()
            raise
        return f, shape, fortran, dtype

    @contextlib.contextmanager
    def _errors(self, key):
        """What a damaged member raises, as a CheckpointError naming the file."""
        try:
            yield
        except CheckpointError:
            raise
        except _READ_ERRORS as e:
            raise _bad(self.path, f"{key!r}: {type(e).__name__}: {e}") from None

    def shape(self, key, kinds="f"):
        """(shape, dtype) from the header alone, without reading the data."""
        with self._errors(key):
            f, shape, _, dtype = self._open_array(key, kinds)
            f.close()
            return shape, dtype

    def read(self, key, kinds="f"):
        """The array stored under key; kinds: the dtype kinds allowed ("f" float, "iu" integer, "U" text)."""
        with self._errors(key):
            f, shape, fortran, dtype = self._open_array(key, kinds)
            with f:
                arr = np.empty(shape, dtype, order="F" if fortran else "C")  # size checked against the file
                view = memoryview(arr.reshape(-1, order="A").view(np.uint8))
                if f.readinto(view) != view.nbytes or f.read(1) != b"":  # reading to the end checks the CRC
                    raise _bad(self.path, f"{key!r} is cut short")
            return arr

    def meta(self):
        path = self.path
        if "meta" not in self.members:
            raise CheckpointError(f"{path} is an .npz file but not a numpy-gpt checkpoint (no 'meta' record)")
        meta = parse_json(str(self.read("meta", kinds="U")), f"{path}: the checkpoint meta", CheckpointError)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"{path} is not a numpy-gpt checkpoint (format={found!r})")
        version = meta.get("version")
        if type(version) is not int or version < 1 or version > VERSION:
            raise CheckpointError(f"{path} is checkpoint format version {version}, but this code reads "
                                  f"up to version {VERSION}: update numpy-gpt (git pull) to load it")
        step = meta.get("step")
        if step is not None and (type(step) is not int or step < 0):
            raise CheckpointError(f"{path}: bad step {step!r} in the checkpoint meta (damaged file?)")
        for key, kind in (("run_id", str), ("tokenizer", dict), ("tokenizer_model_json", str),
                          ("train_args", dict), ("data", dict)):
            if meta.get(key) is not None and not isinstance(meta[key], kind):
                raise CheckpointError(f"{path}: bad {key!r} in the checkpoint meta (damaged file?)")
        return meta


def read_meta(path):
    """Only the meta record (cheap: the weight arrays are not read)."""
    with _Reader(path) as r:
        return r.meta()


def check_config(config, shapes, path):
    """Errors unless shapes ({name: (shape, dtype)}, from the file's array headers) are exactly the
    parameters of config, checked before anything is allocated from the config's numbers (ModelConfig
    itself caps the context length, which sizes no array in the file)."""
    if config.n_layers > len(shapes):  # before param_shapes makes 12 names a layer
        raise CheckpointError(f"{path}: the config says {config.n_layers} layers but the file holds only "
                              f"{len(shapes)} arrays (damaged file?)")
    expected = param_shapes(config)
    mismatch = name_mismatch(expected, shapes)
    if mismatch:
        raise CheckpointError(f"{path} does not match its own config: {mismatch}")
    for name, shape in expected.items():
        if shapes[name][0] != shape:
            raise CheckpointError(f"{path}: parameter {name!r} has shape {shapes[name][0]}, its config gives {shape}")
    if len({dtype for _, dtype in shapes.values()}) != 1:
        raise CheckpointError(f"{path}: parameters of several dtypes (damaged file?)")
    return list(expected)


def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint into a Checkpoint tuple. Every value taken from
    the file is checked before it sizes anything: a damaged file gives a CheckpointError naming it."""
    with _Reader(path) as r:
        meta = r.meta()
        stray = [k for k in r.members if k != "meta" and not k.startswith(("param/", "opt/"))]
        if stray:  # a damaged name: that array must not go unread, the checkpoint loading without it
            raise _bad(path, f"unexpected member {stray[0] + '.npy'!r}")
        try:
            config = ModelConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: bad model config in checkpoint ({e})") from None
        shapes = {k[len("param/"):]: r.shape(k, "f") for k in r.members if k.startswith("param/")}
        names = check_config(config, shapes, path)
        params = {name: r.read("param/" + name, "f") for name in names}  # in the model's own order
        arrays = {k[len("opt/"):]: r.read(k, "fiu") for k in r.members if k.startswith("opt/")}
    for kind, group in (("parameter", params), ("optimizer state", arrays)):
        for name, a in group.items():
            if not np.isfinite(a).all():  # save_checkpoint never writes such arrays: a damaged or foreign file
                raise CheckpointError(f"{path}: the weights are not finite: {kind} {name!r} holds NaN or inf")
    return Checkpoint(config, params, meta, arrays)


def load_model(path, dtype=None, for_training=False, device="cpu"):
    """A LanguageModel built from the checkpoint's arrays (no random weights drawn first, and
    no gradients unless for_training), on device ("cpu" or "cuda"); returns (model, meta)."""
    ck = load_checkpoint(path)
    params = ck.params
    if dtype is not None and np.dtype(dtype) != next(iter(params.values())).dtype:
        params = {k: v.astype(dtype) for k, v in params.items()}
    return LanguageModel(ck.config, params=params, for_training=for_training, device=device), ck.meta


def copy_params(dst, src, path="checkpoint"):
    """Copy src arrays (host arrays) into the existing dst arrays in place (names and shapes must match)."""
    mismatch = name_mismatch(dst, src)
    if mismatch:
        raise CheckpointError(f"{path} does not match the model: {mismatch}")
    for name, arr in src.items():
        if dst[name].shape != arr.shape:
            raise CheckpointError(f"{path}: parameter {name!r} has shape {arr.shape}, model has {dst[name].shape}")
        dst[name][...] = to_device(arr, get_array_module(dst[name]))  # host -> GPU where the model lives there


def main(argv=None):
    parser = Parser(description="Print what a numpy-gpt checkpoint holds.")
    parser.add_argument("checkpoint", help="path to a .npz checkpoint")
    args = parser.parse_args(argv)
    try:
        ck = load_checkpoint(args.checkpoint)
    except UserError as e:
        parser.exit(1, f"error: {e}\n")
    except OSError as e:  # no permission to read it
        parser.exit(1, f"error: cannot read {e.filename or args.checkpoint}: {e.strerror}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")
    n = sum(p.size for p in ck.params.values())
    print(f"{args.checkpoint}: step {ck.meta.get('step')}, {n:,} parameters, format version {ck.meta['version']}, "
          f"run {ck.meta.get('run_id') or '(no id)'}")
    print("model:", ck.config.describe())
    print("config:", json.dumps(ck.meta["config"]))
    tok = ck.meta.get("tokenizer") or {}
    print(f"tokenizer: {tok.get('type')} {tok.get('name')} (BPE model embedded: "
          f"{ck.meta.get('tokenizer_model_json') is not None})")
    print(f"optimizer arrays: {len(ck.arrays)}")
    return 0


if __name__ == "__main__":
    main()
