"""Hostile and careless inputs (issue 17), each built here on the fly: outputs that name an input, failed
re-exports, fresh runs over finished ones, FIFOs and devices, crafted checkpoints, safetensors, BPE files
and JSON. Each must end within seconds, in bounded memory, with one line naming the file and what is
wrong, and leave every file that was there byte for byte as it was (hashed before and after)."""
import contextlib
import errno
import hashlib
import io
import importlib.util
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tokenizer
from helpers import few_steps, small_data  # noqa: F401  (small_data: a fixture)

REPO = Path(__file__).resolve().parent.parent
STORIES = "Once upon a time, there was a dog.\nThe dog ran to the park and played all day.\n" * 20


class Hung(BaseException):
    """Raised in a test that waits too long; a BaseException, so that no `except OSError` takes it for a
    read error (TimeoutError is an OSError)."""


@pytest.fixture(autouse=True)
def no_hang():
    """A test that hangs (a FIFO opened for reading, say) fails after 20 s instead of stopping the suite."""
    def hung(signum, frame):
        raise Hung("hung: no answer within 20 s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def digests(root):
    """{path: what it is} for everything under root: a file's sha256, a link's target, a FIFO or a folder
    as such (never opened, so that hashing cannot hang or read /dev/zero)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                found[path] = "link " + os.readlink(path)
            elif stat.S_ISREG(mode):
                with open(path, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
            else:
                found[path] = stat.S_IFMT(mode)
    return found


@contextlib.contextmanager
def unchanged(root, ignore=()):
    """Every file under root stays byte for byte as it was, and nothing is added or removed (but the
    files named in ignore: train.lock holds the pid of the last run that held its folder)."""
    def state():
        return {k: v for k, v in digests(root).items() if os.path.basename(k) not in ignore}
    before = state()
    yield
    assert state() == before


def cli(main, argv, capsys):
    """(exit code, stderr) of a command-line main() run in this process."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    if isinstance(rc, str):  # sys.exit("error: ...") prints the message and exits 1
        rc, err = 1, err + rc + "\n"
    return rc, err


def the_error(err):
    """The one line of err that says what went wrong (notes on what was being done may come before it)."""
    assert "Traceback" not in err and err.endswith("\n"), err
    line = err.splitlines()[-1]
    assert line.startswith("error: ") and "error" not in "".join(err.splitlines()[:-1]), err
    return line


def refused(main, argv, capsys, *names):
    """main(argv) ends non-zero with one line that names each of names; returns the line."""
    rc, err = cli(main, argv, capsys)
    assert rc not in (0, None), err
    line = the_error(err)
    for name in names:
        assert str(name) in line, line
    return line


# ------------------------------------------------------------------------ 1. outputs that name an input

@pytest.mark.parametrize("case", ["output is the input", "output links to the input", "sidecar is the input",
                                  "bpe model is the training text", "output is the bpe model"])
def test_tokenizer_refuses_an_output_that_is_one_of_its_inputs(tmp_path, capsys, case):
    text = tmp_path / "stories.txt"
    text.write_text(STORIES)
    model = tmp_path / "bpe.json"
    assert tokenizer.main(["--train_bpe", "--vocab_size", "300", str(text), "--model_file", str(model),
                           "--quiet", "--workers", "1"]) == 0
    os.symlink(text, tmp_path / "link.txt")
    (tmp_path / "old.meta.json").write_text(STORIES)  # a text whose name is OUT.meta.json for OUT = old
    sidecar = tmp_path / "old.meta.json"
    bpe = ["--tokenizer", "lecture2_bpe", "--model_file", str(model)]
    argv, name = {
        "output is the input": ([text, text], text),
        "output links to the input": ([text, tmp_path / "link.txt"], text),
        "sidecar is the input": ([sidecar, tmp_path / "old"], sidecar),
        "bpe model is the training text": (["--train_bpe", "--vocab_size", "300", text, "--model_file", text], text),
        "output is the bpe model": ([text, model] + bpe, model),
    }[case]
    capsys.readouterr()
    with unchanged(tmp_path):
        refused(tokenizer.main, [str(a) for a in argv] + ["--quiet"], capsys, name, "replace the input")


# ------------------------------------------------------------------------ 2. a failed re-export

def checkpoint_with_bpe(path, model, step=3):
    """A small checkpoint trained (as far as its meta says) with the BPE model `model`."""
    from checkpoint import save_checkpoint
    from config import ModelConfig
    from language_model import LanguageModel
    tok = tokenizer.BPETokenizer(model, model.to_json())
    lm = LanguageModel(ModelConfig(vocab_size=model.vocab_size, d_model=8, n_heads=2, d_ff=16, n_layers=1,
                                   max_seq_len=16), seed=step)
    save_checkpoint(str(path), lm.config, lm.params, {"step": step, "tokenizer": tok.identity(),
                                                      "tokenizer_model_json": tok.model_json()})
    return str(path)


def unspellable_bpe():
    """A BPE with a token whose bytes spell "<|a|>": vocab.json would read it back as a special token."""
    import bpe
    from pretokens import ENDOFTEXT
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    for piece in (b"<|", b"<|a", b"<|a|", b"<|a|>"):
        merges.append((vocab.index(piece[:-1]) if len(piece) > 2 else piece[0], piece[-1]))
        vocab.append(piece)
    return bpe.BPEModel(vocab + [None], merges, {ENDOFTEXT: len(vocab)})


def test_a_failed_re_export_leaves_the_earlier_export_as_it_was(tmp_path, capsys):
    pytest.importorskip("safetensors")
    import bpe
    import export_hf
    import hf_format
    good = checkpoint_with_bpe(tmp_path / "good.npz", bpe.train_bpe(STORIES, 300))
    bad = checkpoint_with_bpe(tmp_path / "bad.npz", unspellable_bpe())
    out = tmp_path / "hf"
    assert export_hf.main([good, str(out)]) == 0
    capsys.readouterr()
    with unchanged(tmp_path):
        refused(export_hf.main, [bad, str(out)], capsys, bad, "<|a|>", "reads as a special token", out)

    def no_space(*args):  # a full disk in the middle of the export
        raise OSError(errno.ENOSPC, "No space left on device")
    with unchanged(tmp_path), pytest.MonkeyPatch.context() as m:
        m.setattr(hf_format, "write_tokenizer", no_space)
        refused(export_hf.main, [good, str(out)], capsys, out, "No space left")
    assert export_hf.main([good, str(out)]) == 0  # and a good export still replaces it


# ------------------------------------------------------------------------ 3. a fresh run over a finished one



def test_a_fresh_run_never_replaces_a_finished_one_and_keeps_every_metrics_file(small_data, tmp_path, capsys):
    import train
    d = tmp_path / "ck"
    assert train.main(few_steps(small_data, d)) == 0
    first = (d / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    with unchanged(d, ignore=("train.lock",)):
        refused(train.main, few_steps(small_data, d), capsys, d / "checkpoint_final.npz", "a finished run",
                "--resume", "--save_dir", "--overwrite")
    assert train.main(few_steps(small_data, d, overwrite=True, seed=1)) == 0
    assert "--overwrite: a new run" in capsys.readouterr().out
    second = (d / "metrics.jsonl").read_bytes()
    assert train.main(few_steps(small_data, d, overwrite=True, seed=2)) == 0
    assert (d / "metrics.jsonl.old").read_bytes() == first       # a third run keeps the first run's metrics
    assert (d / "metrics.jsonl.old.1").read_bytes() == second


def test_a_fresh_run_never_replaces_an_interrupted_one(small_data, tmp_path, capsys):
    import train
    d = tmp_path / "ck"
    assert train.main(few_steps(small_data, d, save_interval=2)) == 0
    os.unlink(d / "checkpoint_final.npz")  # as if stopped after step 2
    capsys.readouterr()
    refused(train.main, few_steps(small_data, d), capsys, d / "checkpoint_step_2.npz", "an earlier run", "--resume")


# ------------------------------------------------------------------------ 13. resume state out of range

@pytest.fixture(scope="module")
def finished_run(small_data, tmp_path_factory):
    import train
    d = tmp_path_factory.mktemp("run")
    assert train.main(few_steps(small_data, d)) == 0
    return str(d / "checkpoint_final.npz")


def rewrite(src, dst, meta=None, **arrays):
    """A copy of the checkpoint src at dst with meta fields (dotted keys reach inside) and arrays changed."""
    with np.load(src) as z:
        payload = {k: z[k] for k in z.files}
    record = json.loads(str(payload["meta"]))
    for key, value in (meta or {}).items():
        *path, last = key.split(".")
        inner = record
        for k in path:
            inner = inner[k]
        inner[last] = value
    payload["meta"] = np.array(json.dumps(record))
    payload.update({k.replace("__", "/"): v for k, v in arrays.items()})
    with open(dst, "wb") as f:
        np.savez(f, **payload)
    return str(dst)


@pytest.mark.parametrize("case", ["data position", "rng state", "optimizer step inf", "optimizer step negative",
                                  "workers of the wrong type", "ranks of the wrong type"])
def test_resume_state_out_of_range_is_refused(small_data, finished_run, tmp_path, capsys, case):
    import train
    change = {"data position": dict(meta={"data.batches_drawn": 10**30}),
              "rng state": dict(meta={"data.bit_generator.state.state": 2**200}),
              "optimizer step inf": dict(opt__t=np.array(np.inf)),
              "optimizer step negative": dict(opt__t=np.array(-5)),
              "workers of the wrong type": dict(meta={"workers": "many"}),
              "ranks of the wrong type": dict(meta={"ranks": [2]})}[case]
    path = rewrite(finished_run, tmp_path / "checkpoint_step_2.npz", **change)
    capsys.readouterr()
    with unchanged(tmp_path, ignore=("train.lock",)):
        refused(train.main, few_steps(small_data, tmp_path, resume=path, max_steps=6), capsys, path, "resume")


# ------------------------------------------------------------------------ 14, 9, quietly accepted: train flags

@pytest.mark.parametrize("flags, name", [
    (dict(seed=-1), "--seed"), (dict(beta1=1.0), "--beta1"), (dict(beta2=-0.1), "--beta2"),
    (dict(eot_id=-1), "--eot_id"), (dict(grad_clip="nan"), "--grad_clip"),
    (dict(seq_len=2**18), "--seq_len must be an integer from 1 to 131072"),
    (dict(d_model=2**16, n_heads=1, d_ff=2**18), "GB"),  # the first allocation fails: say how much it needs
])
def test_train_flags_out_of_range_are_one_line(small_data, tmp_path, capsys, flags, name):
    import train
    refused(train.main, few_steps(small_data, tmp_path / "ck", **flags), capsys, name)
    assert not list((tmp_path / "ck").glob("*.npz"))


# ------------------------------------------------------------------------ 5. paths that are not regular files

def test_a_save_dir_with_a_device_link_and_a_fifo_is_scanned_without_hanging(small_data, tmp_path, capsys):
    import train
    d = tmp_path / "ck"
    d.mkdir()
    os.symlink("/dev/zero", d / "checkpoint_step_5.npz")
    os.mkfifo(d / "checkpoint_step_6.npz")
    with unchanged(d, ignore=("train.lock",)):
        refused(train.main, few_steps(small_data, d), capsys, d / "checkpoint_step_6.npz", "FIFO", "--overwrite")
        refused(train.main, few_steps(small_data, d, resume=True), capsys, "no readable checkpoint", "FIFO")
    assert train.main(few_steps(small_data, d, overwrite=True)) == 0


# ------------------------------------------------------------------------ token files: 5, 8, 10, 11, 14

def small_jsonl(tmp_path, name="t.jsonl"):
    from helpers import write_data
    return write_data(tmp_path / name, 20, seed=3)


def limited_run(args, memory_mb=1500, timeout=60):
    """python args in a child whose address space is capped at memory_mb: (exit code, stderr)."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, resource.RLIM_INFINITY))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("case", ["jsonl is a fifo", "sidecar is a fifo", "sidecar links to /dev/zero",
                                  "cache record is a fifo", "cache is a directory", "huge integer",
                                  "sidecar nested deep"])
def test_token_files_that_are_not_what_they_say_are_one_line(tmp_path, capsys, case):
    import data_loader
    path = small_jsonl(tmp_path)
    name = path
    if case == "jsonl is a fifo":
        os.unlink(path)
        os.mkfifo(path)
    elif case == "sidecar is a fifo":
        os.unlink(path + ".meta.json")
        os.mkfifo(path + ".meta.json")
        name = path + ".meta.json"
    elif case == "sidecar links to /dev/zero":
        os.unlink(path + ".meta.json")
        os.symlink("/dev/zero", path + ".meta.json")
        name = path + ".meta.json"
    elif case == "cache record is a fifo":
        os.mkfifo(path + ".tokens.json")
        name = path + ".tokens.json"
    elif case == "cache is a directory":
        os.mkdir(path + ".tokens.bin")
        name = path + ".tokens.bin"
    elif case == "huge integer":
        with open(path, "a") as f:
            f.write("[" + "7" * 5000 + "]\n")
        name = path + ":21"
    elif case == "sidecar nested deep":
        Path(path + ".meta.json").write_text("[" * 200_000)
        name = path + ".meta.json"
    with unchanged(tmp_path):
        refused(data_loader.main, [path, "--vocab_size", "64"], capsys, name)


def test_a_cache_record_without_its_crc_is_not_trusted(tmp_path, capsys):
    import data_loader
    path = small_jsonl(tmp_path)
    want = np.asarray(data_loader.load_dataset(path).tokens).copy()
    record = json.loads(Path(path + ".tokens.json").read_text())
    Path(path + ".tokens.json").write_text(json.dumps(dict(record, crc32=None)))
    with open(path + ".tokens.bin", "r+b") as f:  # damaged, same size
        f.write(b"\xff\xff")
    got = data_loader.load_dataset(path, log=print)
    assert "damaged" in capsys.readouterr().out
    assert np.array_equal(np.asarray(got.tokens), want)


def test_a_jsonl_without_newlines_is_refused_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b"[1, 2")
        f.truncate(4 << 30)  # 4 GB, sparse: no disk used, and no newline anywhere
    rc, err = limited_run(["data_loader.py", path, "--eot_id", "0"])
    assert rc == 1 and f"{path}:1: a line of more than 64 MB" in the_error(err)


def test_damaged_run_records_and_metrics_lines_do_not_stop_a_resume(small_data, tmp_path, capsys):
    import train
    assert train.main(few_steps(small_data, tmp_path, save_interval=2)) == 0
    (tmp_path / "run.json").write_text("[" * 200_000)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("[" * 200_000 + "\n")
    assert train.main(few_steps(small_data, tmp_path, resume=True, max_steps=6)) == 0
    assert f"resumed from {tmp_path / 'checkpoint_final.npz'} at step 4" in capsys.readouterr().out
    os.unlink(tmp_path / "metrics.jsonl")
    os.mkfifo(tmp_path / "metrics.jsonl")
    with unchanged(tmp_path, ignore=("train.lock",)):
        refused(train.main, few_steps(small_data, tmp_path, resume=True, max_steps=8), capsys,
                tmp_path / "metrics.jsonl", "FIFO")


# ------------------------------------------------------------------------ Hugging Face folders: 4, 5, 9, 11, 12

@pytest.fixture(scope="module")
def small_bpe():
    import bpe
    return bpe.train_bpe(STORIES, 300)


def hf_folder(path, small_bpe, config=None, tensors=None):
    """A GPT-2 folder as export_hf writes it (a 300-token BPE, 8 wide, 1 layer), with config.json fields and
    tensors replaced by those given."""
    safetensors = pytest.importorskip("safetensors.numpy")
    from config import ModelConfig
    from gpt2_files import write_vocab_merges
    from hf_format import gpt2_config_json, hf_tensors
    from language_model import LanguageModel
    from pretokens import ENDOFTEXT
    cfg = ModelConfig(vocab_size=300, d_model=8, n_heads=2, d_ff=16, n_layers=1, max_seq_len=16, use_learned_pos=True)
    lm = LanguageModel(cfg, seed=0)
    path.mkdir()
    safetensors.save_file(dict(hf_tensors(cfg, lm.params), **(tensors or {})), str(path / "model.safetensors"),
                          metadata={"format": "pt"})
    write_vocab_merges(small_bpe, str(path / "vocab.json"), str(path / "merges.txt"))
    record = dict(gpt2_config_json(cfg, small_bpe.specials[ENDOFTEXT], {}), **(config or {}))
    (path / "config.json").write_text(json.dumps(record))
    return path


@pytest.mark.parametrize("case", ["config links to /dev/zero", "config is a fifo", "weights are a fifo",
                                  "weights link to /dev/zero", "config nested deep", "NaN in config",
                                  "index nested deep", "context above the limit", "weights not finite"])
def test_hostile_hugging_face_folders_are_one_line(tmp_path, capsys, small_bpe, case):
    import generate
    d = hf_folder(tmp_path / "hf", small_bpe, **{
        "context above the limit": dict(config={"n_positions": 2**18},
                                        tensors={"transformer.wpe.weight": np.zeros((2**18, 8), np.float32)}),
        "weights not finite": dict(tensors={"transformer.h.0.mlp.c_fc.bias": np.full(16, np.nan, np.float32)}),
    }.get(case, {}))
    name = {"config links to /dev/zero": "config.json", "config is a fifo": "config.json",
            "weights are a fifo": "model.safetensors", "weights link to /dev/zero": "model.safetensors",
            "config nested deep": "config.json", "NaN in config": "config.json",
            "index nested deep": "index.json", "context above the limit": "n_positions",
            "weights not finite": "h.0.mlp.c_fc.bias"}[case]
    config, weights = d / "config.json", d / "model.safetensors"
    if case in ("config links to /dev/zero", "weights link to /dev/zero"):
        target = config if case.startswith("config") else weights
        os.unlink(target)
        os.symlink("/dev/zero", target)
    elif case in ("config is a fifo", "weights are a fifo"):
        target = config if case.startswith("config") else weights
        os.unlink(target)
        os.mkfifo(target)
    elif case == "config nested deep":
        config.write_text("[" * 200_000)
    elif case == "NaN in config":
        config.write_text(config.read_text().replace('"layer_norm_epsilon": 1e-05', '"layer_norm_epsilon": NaN'))
    elif case == "index nested deep":
        os.unlink(weights)
        (d / "model.safetensors.index.json").write_text("[" * 200_000)
    with unchanged(tmp_path):
        refused(generate.main, ["--checkpoint", str(d), "--prompt", "Once", "--max_length", "3"], capsys, name)


def test_init_from_checks_the_weights_against_config_json_before_allocating(tmp_path, capsys, small_bpe):
    import train
    from helpers import write_data
    d = hf_folder(tmp_path / "hf", small_bpe, config={"n_embd": 4096, "n_layer": 64, "n_head": 64,
                                                       "n_inner": 16384})  # 13 billion parameters: 52 GB
    identity = {"type": "lecture2_bpe", "name": "toy", "n_vocab": 300, "eot_id": 63, "sha256": "0" * 64,
                "model_file": None}
    data = [write_data(tmp_path / f"{s}.jsonl", 20, seed=i, identity=identity) for i, s in enumerate(("t", "v"))]
    argv = ["--init_from", str(d), "--train_data", data[0], "--val_data", data[1], "--batch_size", "2",
            "--max_steps", "1", "--save_dir", str(tmp_path / "ck"), "--no_progress"]
    with unchanged(d):
        refused(train.main, argv, capsys, d, "do not match config.json")


def test_non_finite_weights_in_a_checkpoint_are_named(finished_run, tmp_path, capsys):
    import checkpoint
    import export_hf
    import generate
    with np.load(finished_run) as z:
        wte = z["param/wte"].copy()
    wte[3, 1] = np.inf
    path = rewrite(finished_run, tmp_path / "ck.npz", param__wte=wte)
    with unchanged(tmp_path):
        refused(generate.main, ["--checkpoint", path, "--max_length", "3"], capsys, path, "not finite", "'wte'")
        refused(checkpoint.main, [path], capsys, path, "not finite")
        if importlib.util.find_spec("safetensors"):  # the export needs it; without, it says so first
            refused(export_hf.main, [path, str(tmp_path / "hf")], capsys, path, "not finite", "'wte'")


# ------------------------------------------------------------------------ BPE files: 5, 6, 11, 15

def bpe_file(tmp_path, small_bpe, **fields):
    """small_bpe's model file with fields replaced (raw JSON text for a value given as bytes)."""
    d = json.loads(small_bpe.to_json())
    raw = {k: v for k, v in fields.items() if isinstance(v, bytes)}
    d.update({k: v for k, v in fields.items() if not isinstance(v, bytes)})
    text = json.dumps(d)
    for k, v in raw.items():
        d[k] = "@RAW@"
        text = json.dumps(d).replace('"@RAW@"', v.decode())
    path = tmp_path / "bpe.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["model is /dev/zero", "model is a fifo", "integer of 5000 digits",
                                  "vocab.json id of 5000 digits", "merges.txt longer than its vocabulary",
                                  "empty pattern", "pattern that drops text", "pathological pattern"])
def test_hostile_bpe_model_files_are_one_line(tmp_path, capsys, small_bpe, case):
    import gpt2_files
    text = tmp_path / "stories.txt"
    text.write_text(STORIES + "a" * 40 + "\n")
    model = {"model is /dev/zero": lambda: "/dev/zero",
             "model is a fifo": lambda: os.mkfifo(tmp_path / "fifo.json") or tmp_path / "fifo.json",
             "integer of 5000 digits": lambda: bpe_file(tmp_path, small_bpe, vocab_size=b"7" * 5000),
             "empty pattern": lambda: bpe_file(tmp_path, small_bpe, pattern=""),
             "pattern that drops text": lambda: bpe_file(tmp_path, small_bpe, pattern=r"\w+"),
             "pathological pattern": lambda: bpe_file(tmp_path, small_bpe, pattern=r"(?:a|a)*c|[\s\S]"),
             }.get(case, lambda: tmp_path / "vocab.json")()
    if case.startswith(("vocab.json", "merges.txt")):
        gpt2_files.write_vocab_merges(small_bpe, str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
        merges = tmp_path / "merges.txt"
        if case.startswith("vocab.json"):
            model.write_text(re.sub(r'"<\|endoftext\|>": \d+', '"<|endoftext|>": ' + "9" * 5000, model.read_text()))
        else:
            line = merges.read_text().splitlines()[1] + "\n"
            with open(merges, "a") as f:
                f.write(line * 200_000)  # each line a valid merge, repeated: far more than its vocabulary allows
    name = {"merges.txt longer than its vocabulary": "merges.txt", "pathological pattern": "backtracking",
            "pattern that drops text": "does not cover text", "empty pattern": "empty"}.get(case, model)
    with unchanged(tmp_path):
        refused(tokenizer.main, [str(text), str(tmp_path / "out.jsonl"), "--tokenizer", "lecture2_bpe",
                                 "--model_file", str(model), "--quiet", "--workers", "1"], capsys, name)


def test_a_tokenizer_file_named_in_a_checkpoint_is_checked_too(tmp_path, capsys, small_bpe):
    import generate
    path = checkpoint_with_bpe(tmp_path / "ck.npz", small_bpe)
    os.mkfifo(tmp_path / "bpe.json")
    from checkpoint import read_meta
    identity = dict(read_meta(path)["tokenizer"], model_file=str(tmp_path / "bpe.json"))
    path = rewrite(path, tmp_path / "ck2.npz", meta={"tokenizer": identity, "tokenizer_model_json": None})
    with unchanged(tmp_path):
        refused(generate.main, ["--checkpoint", path, "--max_length", "3"], capsys, tmp_path / "bpe.json", "FIFO")


# ------------------------------------------------------------------------ 7. text without the usual line ends

def test_bpe_blocks_are_cut_on_any_safe_boundary(tmp_path):
    import pretokens
    from helpers import plain_counts
    lines = "".join(f"Once upon a time é {i} dog ran \n" for i in range(3000))  # every line ends in a space
    for text in (lines, lines.replace("\n", " ")):  # ... or it is all one line
        path = tmp_path / "in.txt"
        path.write_text(text, encoding="utf-8")
        blocks = [b for b, _ in pretokens.read_blocks(path, 4096)]
        assert len(blocks) > 20 and max(map(len, blocks)) <= 2 * 4096 and b"".join(blocks) == path.read_bytes()
        assert pretokens.count_pretokens_file(path, block_bytes=4096) == plain_counts(text)


@pytest.mark.parametrize("layout", ["lines", "raw"])
@pytest.mark.parametrize("max_length", [7, 0])
def test_a_long_story_is_tokenized_in_parts_to_the_same_ids(tmp_path, small_bpe, layout, max_length):
    tok = tokenizer.BPETokenizer(small_bpe, small_bpe.to_json())
    long = "  Once upon a time, a dog ran é to the park.\r\n\nThen it  slept 12 days. " * 400
    stories = ["The cat sat.", long, "A short one.", long + "\n\nThe end."]
    sep = "\n<|endoftext|>\n" if layout == "raw" else "\n"
    path = tmp_path / "in.txt"
    path.write_bytes(tokenizer.BOM + sep.join(s if layout == "raw" else s.replace("\n", " ")
                                              for s in stories).encode())
    out = tmp_path / "out.jsonl"
    tokenizer.tokenize_file(tok, path, out, max_length, workers=1, batch_bytes=1024, progress=False, layout=layout)
    want = []
    for s in stories:
        s = (s if layout == "raw" else s.replace("\n", " ")).replace("\r\n", "\n").strip()
        ids = tok.encode_ordinary(s) + [tok.eot_id]
        step = max_length or len(ids)
        want += [ids[i:i + step] for i in range(0, len(ids), step)]
    assert [json.loads(line) for line in out.read_text().splitlines()] == want


def test_tokenizing_one_long_line_takes_flat_memory(tmp_path, small_bpe):
    model = tmp_path / "bpe.json"
    model.write_text(small_bpe.to_json())
    peak = {}
    for kind, text in (("lines", "Once upon a time there was a dog.\n" * 4000),
                       ("one line", "Once upon a time there was a dog. " * 240_000)):  # 8 MB
        path = tmp_path / f"{kind}.txt"
        path.write_text(text)
        code = ("import resource, sys, tokenizer; rc = tokenizer.main(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
        proc = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "out.jsonl"), "--tokenizer",
                               "lecture2_bpe", "--model_file", str(model), "--workers", "1", "--quiet"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        peak[kind] = int(proc.stdout.split()[-1]) / 1024  # MB
    assert peak["one line"] < peak["lines"] + 15, peak  # before: 36 MB more (50 MB took 1.1 GB)


# ------------------------------------------------------------------------ 14. ordinary mistakes: tokenizer

@pytest.mark.parametrize("case", ["output is a directory", "output under a file", "train_bpe on a directory",
                                  "train_bpe on /dev/zero", "input is a fifo"])
def test_tokenizer_mistakes_are_one_line(tmp_path, capsys, case):
    text = tmp_path / "stories.txt"
    text.write_text(STORIES)
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    argv, name = {
        "output is a directory": ([text, tmp_path / "dir"], tmp_path / "dir"),
        "output under a file": ([text, text / "out.jsonl"], text),
        "train_bpe on a directory": (["--train_bpe", tmp_path / "dir", "--model_file", tmp_path / "m.json"],
                                     tmp_path / "dir"),
        "train_bpe on /dev/zero": (["--train_bpe", "/dev/zero", "--model_file", tmp_path / "m.json"], "/dev/zero"),
        "input is a fifo": ([tmp_path / "fifo", tmp_path / "out.jsonl"], tmp_path / "fifo"),
    }[case]
    with unchanged(tmp_path):
        refused(tokenizer.main, [str(a) for a in argv] + ["--quiet", "--workers", "1"], capsys, name)


def test_tokenizing_onto_a_full_disk_is_one_line_and_keeps_the_earlier_output(tmp_path):
    import resource
    text, out = tmp_path / "stories.txt", tmp_path / "out.jsonl"
    text.write_text(STORIES * 50)
    argv = [sys.executable, "tokenizer.py", str(text), str(out), "--quiet", "--workers", "1"]
    assert subprocess.run(argv, cwd=REPO, capture_output=True, timeout=60).returncode == 0
    text.write_text(STORIES * 500)  # an output of ~110 KB, where only 64 KB fit

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
    with unchanged(tmp_path):  # the earlier out.jsonl and its sidecar too, and no temp file left
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, preexec_fn=small_disk)
        assert proc.returncode == 1 and "the disk is full" in the_error(proc.stderr) and str(out) in proc.stderr


def test_more_workers_than_cores_are_capped_with_a_note(tmp_path, capsys):
    text = tmp_path / "stories.txt"
    text.write_text(STORIES)
    assert tokenizer.main([str(text), str(tmp_path / "out.jsonl"), "--quiet", "--workers", "64"]) == 0
    assert f"note: --workers 64 is more than the {os.cpu_count()} cores here" in capsys.readouterr().err


# ------------------------------------------------------------------------ 14. ordinary mistakes: prepare_tinystories

@pytest.mark.parametrize("flags, name", [(["--data_dir", "FILE"], "FILE"), (["--timeout", "nan"], "--timeout: must be"),
                                         (["--backoff", "-1"], "--backoff: must be"),
                                         (["--valid_size", "0"], "--valid_size: must be")])
def test_prepare_mistakes_are_one_line(tmp_path, capsys, flags, name):
    import prepare_tinystories
    (tmp_path / "FILE").write_text("not a folder")
    argv = ["--offline", "--quiet", "--data_dir", str(tmp_path / "data")] + \
        [str(tmp_path / f) if f == "FILE" else f for f in flags]
    with unchanged(tmp_path):
        refused(prepare_tinystories.main, argv, capsys, tmp_path / name if name == "FILE" else name)


def test_prepare_on_a_full_disk_is_one_line(tmp_path):
    import resource

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
    proc = subprocess.run([sys.executable, "prepare_tinystories.py", "--offline", "--quiet", "--data_dir",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60, preexec_fn=small_disk)
    assert proc.returncode == 1 and "the disk is full" in the_error(proc.stderr), proc.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written left


def test_a_byte_order_mark_is_not_text(tmp_path):
    import prepare_tinystories
    path = tmp_path / "raw.txt"
    path.write_bytes(b"\xef\xbb\xbf<|endoftext|>\nOnce upon a time.\n<|endoftext|>\nThe end.\n")
    assert list(prepare_tinystories.stories_from_file(path)) == ["Once upon a time.", "The end."]


# ------------------------------------------------------------------------ generate: 14, and quietly accepted

def test_generate_mistakes_are_one_line(tmp_path, capsys, small_bpe, finished_run):
    import generate
    refused(generate.main, ["--checkpoint", finished_run, "--seed", "-1"], capsys, "--seed")
    refused(generate.main, ["--checkpoint", "/dev/zero"], capsys, "/dev/zero", "character device")
    os.mkfifo(tmp_path / "fifo.npz")
    refused(generate.main, ["--checkpoint", str(tmp_path / "fifo.npz")], capsys, "fifo.npz", "FIFO")
    path = checkpoint_with_bpe(tmp_path / "ck.npz", small_bpe)
    path = rewrite(path, tmp_path / "bare.npz", meta={"tokenizer_model_json": None, "tokenizer.model_file": None})
    with unchanged(tmp_path):
        refused(generate.main, ["--checkpoint", path, "--model_file", "/dev/zero"], capsys, "/dev/zero",
                "character device")


class Counting:
    """A tokenizer's decoding, counting the ids it is asked to decode."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tok.decode(ids)

    def decode_bytes(self, ids):
        self.decoded += len(ids)
        return self.tok.decode_bytes(ids)


def test_streaming_decodes_each_token_once(small_bpe):
    import generate
    tok = tokenizer.BPETokenizer(small_bpe, small_bpe.to_json())
    ids = tok.encode("Once upon a time, é 🐶 the dog ran. " * 60)
    counting, out = Counting(tok), io.StringIO()
    printer = generate.StreamPrinter(counting, out, ids[:3])
    for i in ids[3:]:
        printer.add(i)
    printer.finish()
    assert out.getvalue() == tok.decode(ids) + "\n"
    assert counting.decoded <= len(ids) + 1  # it was quadratic: the whole text again for every token


def test_a_long_text_is_written_as_it_is_made(tmp_path, small_bpe, monkeypatch):
    import generate

    class Enough(BaseException):
        pass

    class Out(io.StringIO):
        def write(self, s):
            if self.tell() > 200:
                raise Enough
            return super().write(s)

    def endless(*args, **kwargs):
        while True:
            yield 100
    monkeypatch.setattr(generate, "generate", endless)
    path = checkpoint_with_bpe(tmp_path / "ck.npz", small_bpe)
    with pytest.raises(Enough):  # without --stream it printed nothing until --max_length tokens were made
        generate.main(["--checkpoint", path, "--max_length", "1000000000"], out=Out(), err=io.StringIO())


def test_config_values_of_the_wrong_type_are_refused(finished_run, tmp_path, capsys):
    import checkpoint
    for key, value in (("n_layers", True), ("use_learned_pos", 0), ("activation", ["gelu"])):
        path = rewrite(finished_run, tmp_path / f"{key}.npz", meta={f"config.{key}": value})
        with unchanged(tmp_path):  # n_layers true loaded as 1 layer and was exported as "n_layer": true
            refused(checkpoint.main, [path], capsys, path, key)
