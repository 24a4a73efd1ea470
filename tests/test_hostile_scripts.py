"""Hostile and careless inputs, round two (issue 27): the scripts around training. Outputs that name an input,
the quality benchmark's own files and runs, the metrics reader, every numeric flag of every script, the Llama
flags' ranges against the Hugging Face reader, and the resume path's permissions and stop signals. Each input
is built here; each must end in one line (no traceback), and every file that was there stays byte for byte."""
import argparse
import errno
import importlib.util
import json
import math
import os
import signal
import sys
import tracemalloc
from pathlib import Path

import pytest

from helpers import few_steps, small_data  # noqa: F401  (small_data: a fixture)
from test_hostile import cli, no_hang, refused, the_error, unchanged  # noqa: F401  (no_hang: the autouse fixture)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quality = load_script("quality")


# ------------------------------------------------------------------------ 1. outputs that name an input

def quality_argv(tmp_path, *more):
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    if not train.exists():
        train.write_text("Once upon a time there was a cat.\n" * 20)
        valid.write_text("Once upon a time there was a dog.\n" * 5)
    return ["--train_text", str(train), "--valid_text", str(valid), "--work_dir", str(tmp_path / "work"),
            "--time_budget", "1", *more, "--", "--d_model", "32"]


def no_tools(monkeypatch):
    """Any tool or training run started from here fails the test: the mistake must be found before."""
    monkeypatch.setattr(quality.subprocess, "run", lambda *a, **k: pytest.fail("ran a tool"))
    monkeypatch.setattr(quality, "train", lambda *a, **k: pytest.fail("started training"))


@pytest.mark.parametrize("case", ["the training text", "a link to the validation text", "a hard link to it"])
def test_quality_never_appends_its_record_to_an_input(tmp_path, capsys, monkeypatch, case):
    quality_argv(tmp_path)  # writes the two texts
    target = {"the training text": tmp_path / "train.txt", "a link to the validation text": tmp_path / "link.txt",
              "a hard link to it": tmp_path / "hard.txt"}[case]
    if case != "the training text":
        (os.symlink if "link to" in case and "hard" not in case else os.link)(tmp_path / "valid.txt", target)
    no_tools(monkeypatch)
    with unchanged(tmp_path):
        refused(quality.main, quality_argv(tmp_path, "--results", str(target)), capsys, target, "replace the input")


def test_quality_refuses_a_results_file_that_is_one_of_its_tokenized_files(tmp_path, capsys, monkeypatch):
    quality_argv(tmp_path)  # writes the two texts
    cache = tmp_path / "work" / "tokenized"
    cache.mkdir(parents=True)
    for name in ("t.jsonl", "t.jsonl.meta.json", "v.jsonl", "v.jsonl.meta.json"):
        (cache / name).write_text("[1, 2]\n")
    monkeypatch.setattr(quality, "prepare_data", lambda args, v, say=print: (cache / "t.jsonl", cache / "v.jsonl", "gpt2"))
    no_tools(monkeypatch)
    with unchanged(tmp_path):
        # --keep_overlap: the held-out copy of the validation text (a cache, written before the data is
        # tokenized, so before this refusal) is not what this test is about
        refused(quality.main, quality_argv(tmp_path, "--keep_overlap", "--results", str(cache / "v.jsonl.meta.json")),
                capsys, "v.jsonl.meta.json", "replace the input")


def test_plot_never_writes_over_its_metrics_file(tmp_path, capsys):
    import plot_metrics
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"type": "train", "step": 1, "loss": 3.0}) + "\n")
    os.symlink(log, tmp_path / "log.png")
    with unchanged(tmp_path):
        refused(plot_metrics.main, [str(log), "--out", str(tmp_path / "log.png")], capsys, "replace the input")


def test_fixed_runs_reads_the_digests_to_check_before_saving_over_them(tmp_path, capsys, monkeypatch):
    fixed_runs = load_script("fixed_runs")
    digests = tmp_path / "digests.json"
    digests.write_text('{"run": {"weights": "a", "metrics": "b"}}\n')
    monkeypatch.setattr(fixed_runs, "run_all", lambda tmp: pytest.fail("ran training"))
    with unchanged(tmp_path):
        refused(fixed_runs.main, ["--save", str(digests), "--check", str(digests)], capsys, "replace the input")


def test_prepare_never_writes_through_a_link_to_the_bundled_sample(tmp_path, capsys):
    import prepare_tinystories
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(prepare_tinystories.BUNDLED_VALID, data / "tinystories_train_sample.txt")
    with unchanged(tmp_path), unchanged(SAMPLE):
        refused(prepare_tinystories.main, ["--offline", "--quiet", "--data_dir", str(data)], capsys,
                "tinystories_train_sample.txt", "bundled sample")


def test_data_loader_never_writes_a_cache_over_a_file_it_was_given(tmp_path, capsys):
    import data_loader
    from helpers import write_data
    path = write_data(tmp_path / "a.jsonl", 10, seed=1)
    (tmp_path / "a.jsonl.tokens.json").write_text("[1, 2, 3]\n")  # a tokenized file under a cache's name
    with unchanged(tmp_path):
        refused(data_loader.main, [path, str(tmp_path / "a.jsonl.tokens.json")], capsys, "a.jsonl.tokens.json",
                "replace the input")


def test_append_line_keeps_every_old_line_when_the_write_fails(tmp_path, monkeypatch):
    import atomic
    results = tmp_path / "results.jsonl"
    results.write_bytes(b'{"a": 1}\n{"b": 2}')  # a last line without its newline
    atomic.append_line(results, '{"c": 3}')
    assert results.read_bytes() == b'{"a": 1}\n{"b": 2}\n{"c": 3}\n'
    before = results.read_bytes()

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OSError):
        atomic.append_line(results, '{"d": 4}')
    assert results.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["results.jsonl"]


# ------------------------------------------------------------------------ 2. the quality benchmark's own files

@pytest.mark.parametrize("case", ["work_dir is a file", "results is a folder", "results under a file",
                                  "results is a fifo", "no space for the results", "results is read-only"])
def test_quality_checks_what_it_writes_before_training(tmp_path, capsys, monkeypatch, case):
    quality_argv(tmp_path)  # writes the two texts
    (tmp_path / "file").write_text("a file\n")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    more, name = {"work_dir is a file": (["--work_dir", str(tmp_path / "file")], "file"),
                  "results is a folder": (["--results", str(tmp_path / "folder")], "folder"),
                  "results under a file": (["--results", str(tmp_path / "file" / "r.jsonl")], "file"),
                  "results is a fifo": (["--results", str(tmp_path / "fifo")], "fifo"),
                  "no space for the results": (["--results", str(tmp_path / "r.jsonl")], "disk is full"),
                  "results is read-only": (["--results", str(tmp_path / "file")], "read-only")}[case]
    if case == "results is read-only":  # as root, chmod alone would not stop a write
        os.chmod(tmp_path / "file", 0o444)
        monkeypatch.setattr(quality.os, "access", lambda path, mode: os.stat(path).st_mode & 0o222 != 0)
    if case == "no space for the results":
        real = quality.atomic_write

        def full(path, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        monkeypatch.setattr(quality, "atomic_write", full)
    no_tools(monkeypatch)
    with unchanged(tmp_path):
        refused(quality.main, quality_argv(tmp_path, *more), capsys, name)
    if case == "no space for the results":
        monkeypatch.setattr(quality, "atomic_write", real)


def fake_benchmark(tmp_path, monkeypatch, records):
    """quality.main's steps around training replaced: tokenized files that exist, a "training run" that writes
    records (dicts, or raw lines as str) as its metrics.jsonl, no samples."""
    cache = tmp_path / "work" / "tokenized"
    cache.mkdir(parents=True)
    side = {"tokenizer": {"name": "gpt2"}, "num_bytes": 100, "num_documents": 5, "num_tokens": 40}
    for name in ("t", "v"):
        (cache / f"{name}.jsonl").write_text("[1, 2]\n")
        (cache / f"{name}.jsonl.meta.json").write_text(json.dumps(side))
    monkeypatch.setattr(quality, "prepare_data", lambda args, v, say=print: (cache / "t.jsonl", cache / "v.jsonl", "gpt2"))

    def train(cmd):
        save_dir = Path(str(cmd[cmd.index("--save_dir") + 1]))
        save_dir.mkdir(parents=True)
        with open(save_dir / "metrics.jsonl", "w") as f:
            for r in records:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        return 0
    monkeypatch.setattr(quality, "train", train)
    monkeypatch.setattr(quality, "samples", lambda *a: [])


def run_records(final=True, train_lines=True, stopped=False):
    recs = [{"type": "config", "step": 0, "time": 10.0, "num_parameters": 123, "config": {"d_model": 32}},
            "not json at all", {"type": "train", "step": "seven"}, [1, 2, 3], "[" * 5000 + "]" * 5000,
            {"type": "budget", "step": 2, "horizon": 4, "seconds_per_step": 0.5}]
    if train_lines:
        recs += [{"type": "train", "step": 2, "loss": 3.0, "time": 11.0},
                 {"type": "train", "step": 4, "loss": 2.5, "time": 12.0}]
    if stopped:
        recs += [{"type": "checkpoint", "step": 3, "path": "x/checkpoint_step_3.npz"},
                 {"type": "stopped", "step": 3, "reason": "terminated (SIGTERM)"}]
    if final:
        recs += [{"type": "eval", "step": 4, "val_loss": 2.0, "val_bpb": 1.5, "val_accuracy": 0.3, "val_tokens": 32,
                  "time": 13.0},
                 {"type": "checkpoint", "step": 4, "path": "x/checkpoint_final.npz", "time": 14.0}]
    return recs


def test_quality_scores_a_run_that_logged_no_train_lines(tmp_path, capsys, monkeypatch):
    fake_benchmark(tmp_path, monkeypatch, run_records(train_lines=False))
    assert quality.main(quality_argv(tmp_path)) == 0
    [line] = (tmp_path / "work" / "results.jsonl").read_text().splitlines()
    r = json.loads(line)
    assert r["steps"] == 4 and r["val_bpb"] == 1.5 and r["train_seconds"] == 3.0 and r["horizon"] == 4
    assert "record appended" in capsys.readouterr().out


def test_quality_says_a_run_that_stopped_early_has_no_score(tmp_path, capsys, monkeypatch):
    fake_benchmark(tmp_path, monkeypatch, run_records(final=False, stopped=True))
    line = refused(quality.main, quality_argv(tmp_path), capsys, "stopped at step 3 before its end", "SIGTERM")
    assert not (tmp_path / "work" / "results.jsonl").exists(), line


def test_quality_keeps_the_score_when_the_results_file_cannot_be_written(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results.jsonl"
    results.write_text('{"an": "earlier record"}\n')
    fake_benchmark(tmp_path, monkeypatch, run_records())

    def full(path, line):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(quality, "append_line", full)
    rc, err = cli(quality.main, quality_argv(tmp_path, "--results", str(results)), capsys)
    line = the_error(err)
    assert rc == 1 and "disk is full" in line and "quality_record.json" in line, err
    assert results.read_text() == '{"an": "earlier record"}\n'
    [kept] = (tmp_path / "work" / "runs").glob("*/quality_record.json")
    assert json.loads(kept.read_text())["val_bpb"] == 1.5


def test_quality_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(quality, "prepare_data", interrupted)
    rc, err = cli(quality.main, quality_argv(tmp_path), capsys)
    assert rc == 130 and err == "interrupted: no score recorded\n", err


# ------------------------------------------------------------------------ 3. the metrics reader

def test_the_metrics_reader_skips_and_counts_what_is_not_a_record(tmp_path):
    from metrics import Records
    good = [{"type": "train", "step": 1, "loss": 3.0}, {"type": "eval", "step": 1, "val_loss": 2.9},
            {"type": "config", "step": 0}]
    bad = ['[1, 2]', '"text"', '42', '{"type": "train"}', '{"type": "train", "step": 1}',
           '{"type": "train", "step": -1, "loss": 1}', '{"type": "train", "step": true, "loss": 1}',
           '{"type": "eval", "step": 2, "val_loss": "low"}', '{"type": "train", "step": 2, "loss": NaN}',
           '{"type": 7, "step": 1}', "[" * 100000, '{"type": "train", "step": 3, "loss": 1, "x": "' + "y" * 70000 + '"}',
           '{"type": "train", "step": 4, "lo']  # the last: cut short by a kill
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([json.dumps(good[0])] + bad[:6] + [json.dumps(good[1]), ""] + bad[6:-1] +
                              [json.dumps(good[2])] + bad[-1:]))
    records = Records(path)
    assert list(records) == good and records.skipped == len(bad)


@pytest.mark.parametrize("case", ["a folder", "a fifo", "/dev/zero", "missing"])
def test_the_plotter_refuses_a_metrics_path_that_is_not_a_file(tmp_path, capsys, case):
    import plot_metrics
    path = {"a folder": tmp_path / "dir", "a fifo": tmp_path / "fifo", "/dev/zero": Path("/dev/zero"),
            "missing": tmp_path / "missing.jsonl"}[case]
    if case == "a folder":
        path.mkdir()
    elif case == "a fifo":
        os.mkfifo(path)
    with unchanged(tmp_path):
        refused(plot_metrics.main, [str(path), "--out", str(tmp_path / "out.png")], capsys, path)


def test_the_plotter_says_a_log_without_records(tmp_path, capsys):
    import plot_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('[1]\n{"type": "train"}\n')
    refused(plot_metrics.main, [str(path)], capsys, "no train or eval records")


def test_reading_a_long_log_keeps_a_bounded_number_of_points_in_bounded_memory(tmp_path):
    import plot_metrics
    path = tmp_path / "metrics.jsonl"
    line = '{"type": "train", "step": %d, "loss": 2.5, "accuracy": 0.4, "lr": 0.001, "grad_norm": 0.7, ' \
           '"steps_per_s": 3.1, "tokens_per_s": 2000.0, "time": 1764900000.123}\n'
    with open(path, "w") as f:
        f.writelines(line % i for i in range(1, 40001))  # ~7 MB: held as records, some 40 MB
    tracemalloc.start()
    train, evals, skipped = plot_metrics.read_curves(path, max_points=500)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    xs, ys = train.points()
    assert len(train) == 40000 and len(xs) <= 502 and xs[0] == 1 and xs[-1] == 40000 and skipped == 0
    assert peak < 2e6, f"{peak / 1e6:.1f} MB to read a {path.stat().st_size / 1e6:.0f} MB log"


@pytest.mark.parametrize("out, wrote", [(None, "{dir}/loss.png"), ("{tmp}/plots/", "{tmp}/plots/loss.png"),
                                        ("{tmp}/existing", "{tmp}/existing/loss.png"), ("{tmp}/c.svg", "{tmp}/c.svg")])
def test_the_plotter_writes_and_reports_the_file_it_names(tmp_path, out, wrote):
    import plot_metrics
    (tmp_path / "existing").mkdir()
    log = tmp_path / "run" / "metrics.jsonl"
    fill = dict(tmp=tmp_path, dir=log.parent)
    assert plot_metrics.output_path(str(log), out and out.format(**fill)) == wrote.format(**fill)


def test_the_plotter_refuses_an_output_it_cannot_name_a_format_for(tmp_path, capsys):
    import plot_metrics
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"type": "train", "step": 1, "loss": 3.0}) + "\n")
    with unchanged(tmp_path):
        refused(plot_metrics.main, [str(log), "--out", str(tmp_path / "curves")], capsys, "curves", ".png")


def test_the_plotter_draws_the_file_it_reports(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import plot_metrics
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"type": "train", "step": i, "loss": 3.0 / i}) + "\n" for i in range(1, 50)))
    assert plot_metrics.main([str(log), "--out", str(tmp_path / "plots") + "/"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'plots' / 'loss.png'}\n"
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ 4. every numeric flag of every script

def script(name):
    """The main() of a script by its path."""
    if name.startswith("scripts/"):
        return load_script(name[len("scripts/"):-len(".py")]).main
    return importlib.import_module(name[:-len(".py")]).main


BAD_FLAGS = [
    ("benchmark.py", ["--steps", "0"]), ("benchmark.py", ["--min_seconds", "nan"]),
    ("benchmark.py", ["--min_seconds", "inf"]), ("benchmark.py", ["--d_ff", "0"]),
    ("benchmark.py", ["--decode", "--decode_tokens", "1"]), ("benchmark.py", ["--dropout", "1"]),
    ("benchmark.py", ["--n_layers", "2000"]), ("benchmark.py", ["--batch_size", "-3"]),
    ("prepare_tinystories.py", ["--offline", "--retries", "1000"]), ("prepare_tinystories.py", ["--offline", "--timeout", "inf"]),
    ("prepare_tinystories.py", ["--offline", "--sample_size", "0"]),
    ("generate.py", ["--checkpoint", "x.npz", "--temperature", "inf"]),
    ("generate.py", ["--checkpoint", "x.npz", "--top_p", "nan"]), ("generate.py", ["--benchmark", "--benchmark_tokens", "1"]),
    ("generate.py", ["--checkpoint", "x.npz", "--d_model", "0"]),
    ("tokenizer.py", ["in.txt", "out.jsonl", "--workers", "0"]), ("tokenizer.py", ["in.txt", "out.jsonl", "--max_length", "-1"]),
    ("tokenizer.py", ["--train_bpe", "in.txt", "--model_file", "m.json", "--vocab_size", "1e400"]),
    ("data_loader.py", ["x.jsonl", "--vocab_size", "0"]), ("data_loader.py", ["x.jsonl", "--eot_id", "-1"]),
    ("plot_metrics.py", ["metrics.jsonl", "--max_points", "1"]),
    ("scripts/quality.py", ["--train_text", "t", "--valid_text", "v", "--time_budget", "nan"]),
    ("scripts/quality.py", ["--train_text", "t", "--valid_text", "v", "--samples", "-1"]),
    ("scripts/bench_mpi.py", ["--compare", "1"]), ("scripts/bench_mpi.py", ["--workers", "0"]),
    ("scripts/scale_check.py", ["--mb", "0"]), ("scripts/scale_check.py", ["--vocab_size", "100"]),
    ("scripts/gpu_parity.py", ["--tol", "nan"]), ("scripts/fault_test.py", ["--variants", "-1"]),
]


@pytest.mark.parametrize("name, argv", BAD_FLAGS, ids=[f"{n} {' '.join(a)}" for n, a in BAD_FLAGS])
def test_a_numeric_flag_out_of_its_range_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch, name, argv):
    monkeypatch.chdir(tmp_path)
    flag = next(a for a in argv if a.startswith("--") and a not in ("--offline", "--decode", "--benchmark",
                                                                     "--train_bpe", "--checkpoint", "--model_file",
                                                                     "--train_text", "--valid_text"))
    with unchanged(tmp_path):
        line = refused(script(name), argv, capsys, flag, "must be")
    assert "got" in line


MAINS = ["benchmark.py", "prepare_tinystories.py", "generate.py", "tokenizer.py", "data_loader.py", "checkpoint.py",
         "plot_metrics.py", "export_hf.py", "scripts/quality.py", "scripts/bench_mpi.py", "scripts/scale_check.py",
         "scripts/gpu_parity.py", "scripts/fault_test.py", "scripts/fixed_runs.py", "explore.py", "overlap.py",
         "export_gguf.py"]


@pytest.mark.parametrize("name", MAINS)
def test_every_numeric_flag_has_one_range_that_help_states(name, monkeypatch, capsys):
    """Every flag that takes a number takes it through a flag_types.Number (no bare int or float), and its
    --help line states that range."""
    from flag_types import Number
    parsers = []

    def caught(self, *a, **k):
        parsers.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    try:
        script(name)([])
    except SystemExit:
        pass
    [parser] = parsers
    for action in parser._actions:
        if action.type in (int, float):
            pytest.fail(f"{name} {action.option_strings}: a bare {action.type.__name__}, no range")
        if isinstance(action.type, Number):
            assert str(action.type) in (action.help or ""), f"{name} {action.option_strings}: {action.help!r}"


# ------------------------------------------------------------------------ 7. one range for the Llama flags

FIELDS = [("vocab_size", "vocab_size", "vocab_size"), ("d_model", "d_model", "hidden_size"),
          ("n_layers", "n_layers", "num_hidden_layers"), ("d_ff", "d_ff", "intermediate_size"),
          ("seq_len", "max_seq_len", "max_position_embeddings"), ("rope_theta", "rope_theta", "rope_theta")]


@pytest.mark.parametrize("flag, field, key", FIELDS)
def test_the_trainer_and_the_hugging_face_reader_take_the_same_range(flag, field, key):
    """What train.py's flags accept at a field's upper bound, the reader takes from an export's config.json;
    one past it both refuse, stating the same range."""
    import hf_format
    import train_flags
    from config import FIELD_RANGES, ModelConfig
    from errors import HFError, TrainError
    top = FIELD_RANGES[field].high
    small = dict(vocab_size=8, d_model=8, n_heads=2, d_ff=8, n_layers=1, max_seq_len=8, arch="llama")
    width = {"d_model": dict(n_heads=top // 16)}.get(field, {})  # heads of 16: within n_heads' own range
    config = ModelConfig(**dict(small, **width, **{field: top}))
    back = hf_format.config_from_llama_json(hf_format.llama_config_json(config, 0, {}), "config.json")
    assert back == config
    over = top * 2 if isinstance(top, int) else top * 10
    parser = train_flags.build_parser()
    argv = ["--train_data", "x", "--arch", "llama", "--d_model", "8", "--n_heads", "2", "--d_ff", "8",
            "--vocab_size", "8", "--seq_len", "8", f"--{flag}", str(over)]
    args = parser.parse_args(argv)
    train_flags.apply_defaults(args, train_flags.given_flags(parser, argv))
    with pytest.raises(TrainError) as trainer:
        train_flags.check_args(args)
    hf = hf_format.llama_config_json(config, 0, {})
    hf[key] = over
    with pytest.raises(HFError) as reader:
        hf_format.config_from_llama_json(hf, "config.json")
    in_words = str(FIELD_RANGES[field])
    assert in_words in str(trainer.value) and in_words in str(reader.value), (trainer.value, reader.value)


def test_a_checkpoint_over_a_range_is_refused_by_its_config_as_the_reader_would(tmp_path):
    from config import ModelConfig
    with pytest.raises(ValueError, match=r"n_layers must be an integer from 1 to 1024"):
        ModelConfig(n_layers=1025)
    with pytest.raises(ValueError, match=r"rope_theta must be a number in \(1, 1e\+12\]"):
        ModelConfig(arch="llama", d_model=8, n_heads=2, d_ff=8, rope_theta=1e13)


# ------------------------------------------------------------------------ 8. the resume path and stop signals



@pytest.fixture
def finished(small_data, tmp_path):
    import train
    d = tmp_path / "ck"
    assert train.main(few_steps(small_data, d, save_interval=2)) == 0
    return d


def deny(monkeypatch, *paths):
    """Opening any of paths raises EACCES, as for a file without read permission (tests run as root, which
    chmod does not stop)."""
    denied = {os.path.abspath(p) for p in paths}
    real = os.open

    def guarded(path, *a, **k):
        if os.path.abspath(os.fsdecode(path)) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, "open", guarded)


@pytest.mark.parametrize("case", ["the newest checkpoint", "every checkpoint", "--resume PATH", "metrics.jsonl",
                                  "a temp file to clean"])
def test_permission_errors_on_the_resume_path_are_one_line(small_data, finished, capsys, monkeypatch, case):
    import train
    d = finished
    final, step2 = d / "checkpoint_final.npz", d / "checkpoint_step_2.npz"
    argv = few_steps(small_data, d, max_steps=6, resume=True)
    if case == "the newest checkpoint":
        deny(monkeypatch, final)
        names = [final, "Permission denied"]
    elif case == "every checkpoint":
        deny(monkeypatch, final, step2)
        names = ["no readable checkpoint", "Permission denied"]
    elif case == "--resume PATH":
        deny(monkeypatch, step2)
        argv = few_steps(small_data, d, max_steps=6, resume=str(step2))
        names = [step2, "Permission denied"]
    elif case == "metrics.jsonl":
        deny(monkeypatch, d / "metrics.jsonl")
        names = [d / "metrics.jsonl", "Permission denied"]
    else:
        (d / "checkpoint_step_9.npz.1234.tmp").write_bytes(b"half")

        def no(path, *a, **k):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        monkeypatch.setattr(os, "unlink", no)
        names = ["checkpoint_step_9.npz.1234.tmp", "Permission denied"]
    capsys.readouterr()
    with unchanged(d, ignore=("train.lock",)):
        refused(train.main, argv, capsys, *names)


def test_checkpoint_py_says_an_unreadable_checkpoint(finished, capsys, monkeypatch):
    import checkpoint
    deny(monkeypatch, finished / "checkpoint_final.npz")
    refused(checkpoint.main, [str(finished / "checkpoint_final.npz")], capsys, "cannot read", "Permission denied")


def test_a_second_signal_waits_for_the_checkpoint_being_written():
    import distributed
    from stop import Stop, StopNow, saving
    with Stop(None, distributed.Solo()) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.interrupted and stop.exit_code == 143
        with pytest.raises(StopNow) as now:
            with saving():
                os.kill(os.getpid(), signal.SIGINT)  # a second signal: held
                written = True  # the save goes on
        assert written and now.value.exit_code == 130
        with pytest.raises(StopNow) as now:  # outside a save: at once
            os.kill(os.getpid(), signal.SIGTERM)
        assert now.value.exit_code == 143


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_stop_signal_during_a_save_completes_it_and_exits_with_its_code(small_data, tmp_path, capsys, monkeypatch,
                                                                               sig, code):
    import train
    import train_state
    from checkpoint import load_checkpoint
    real = train_state.save_checkpoint
    calls = []

    def save_checkpoint(*a, **k):
        calls.append(a[0])
        if len(calls) == 1:  # while the first checkpoint is written: a signal, then another
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), sig)
        return real(*a, **k)
    monkeypatch.setattr(train_state, "save_checkpoint", save_checkpoint)
    d = tmp_path / "ck"
    rc, err = cli(train.main, few_steps(small_data, d, save_interval=2), capsys)
    assert rc == code and "Traceback" not in err and "again: stopped at once" in err.splitlines()[-1], err
    assert len(calls) == 1 and load_checkpoint(str(d / "checkpoint_step_2.npz")).meta["step"] == 2
    assert not list(d.glob("*.tmp"))
    monkeypatch.setattr(train_state, "save_checkpoint", real)
    assert train.main(few_steps(small_data, d, resume=True)) == 0  # and the run goes on from it


def test_train_py_help_states_the_range_check_args_applies():
    """train.py's numeric flags keep their own checks (check_args, TrainError); --help states each range from
    train_flags.FLAG_RANGES, and check_args refuses a value just outside each one: the statement is true."""
    import train_flags
    from errors import TrainError
    parser = train_flags.build_parser()
    numeric = [a for a in parser._actions if a.type in (int, float)]
    assert {a.dest for a in numeric} == set(train_flags.FLAG_RANGES)
    for action in numeric:
        rng = train_flags.FLAG_RANGES[action.dest]
        assert action.help.endswith(f"; {rng}"), action.help
        outside = [math.nan, math.inf] if rng.kind is float else []
        if rng.low is not None:
            outside.append(rng.low if rng.low_open else rng.low - (1 if rng.kind is int else 1e-9))
        if rng.high is not None:
            outside.append(rng.high if rng.high_open else rng.high + (1 if rng.kind is int else rng.high))
        llama = ["--arch", "llama"] if action.dest in ("rope_theta", "n_kv_heads") else []
        argv = ["--train_data", "x", *llama]
        for value in outside:
            args = parser.parse_args(argv)
            train_flags.apply_defaults(args, train_flags.given_flags(parser, argv))
            setattr(args, action.dest, value)
            with pytest.raises(TrainError, match=f"--{action.dest}"):
                train_flags.check_args(args)


@pytest.mark.parametrize("name", ["metrics.jsonl", "run.json", "train.lock"])
def test_training_data_under_the_name_of_a_run_file_is_never_rewritten(small_data, tmp_path, capsys, name):
    import shutil
    import train
    d = tmp_path / "ck"
    d.mkdir()
    shutil.copy(small_data[0], d / name)
    shutil.copy(small_data[0] + ".meta.json", d / f"{name}.meta.json")
    with unchanged(tmp_path):
        refused(train.main, few_steps(small_data, d, train_data=str(d / name), resume=name == "metrics.jsonl"), capsys,
                d / name, "replace the input")


def test_scale_check_says_a_work_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder\n")
    with unchanged(tmp_path):
        refused(script("scripts/scale_check.py"), ["--work_dir", str(tmp_path / "file"), "--mb", "1"], capsys,
                "--work_dir", "file")


@pytest.mark.parametrize("name, patch, argv", [
    ("export_hf.py", "export", ["ck.npz", "out"]), ("data_loader.py", "load_dataset", ["x.jsonl"]),
    ("checkpoint.py", "load_checkpoint", ["ck.npz"]), ("plot_metrics.py", "read_curves", ["metrics.jsonl"]),
    ("benchmark.py", "run", []),
])
def test_ctrl_c_in_a_script_is_one_line(tmp_path, capsys, monkeypatch, name, patch, argv):
    module = importlib.import_module(name[:-len(".py")])

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(module, patch, interrupted)
    monkeypatch.chdir(tmp_path)
    rc, err = cli(module.main, argv, capsys)
    assert rc == 130 and "Traceback" not in err and len(err.splitlines()) <= 1, err


def test_quality_passes_a_sigterm_on_to_its_training_run(tmp_path):
    """SIGTERM to the benchmark alone (a scheduler ending the job): the training run gets it too, instead of
    training on with no one left to score it."""
    import subprocess
    import time
    marker, ready = tmp_path / "child got SIGTERM", tmp_path / "ready"
    child = ("import signal, sys, time, pathlib; "
             f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).touch(), sys.exit(143))); "
             f"pathlib.Path({str(ready)!r}).touch(); time.sleep(30)")
    driver = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('q', {str(REPO / 'scripts' / 'quality.py')!r}); "
              "q = importlib.util.module_from_spec(spec); spec.loader.exec_module(q); "
              f"sys.exit(q.train(['-c', {child!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO)
    deadline = time.monotonic() + 15
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 143 and marker.exists()


def test_quality_says_a_run_stopped_by_a_signal_in_one_line(tmp_path, capsys, monkeypatch):
    fake_benchmark(tmp_path, monkeypatch, run_records())
    monkeypatch.setattr(quality, "train", lambda cmd: 143)
    rc, err = cli(quality.main, quality_argv(tmp_path), capsys)
    assert rc == 143 and len(err.splitlines()) == 1 and err.startswith("terminated: no score recorded"), err
    assert not (tmp_path / "work" / "results.jsonl").exists()


def test_resuming_the_log_streams_it_and_keeps_whole_lines(tmp_path):
    """MetricsLog.open on resume reads the log a line at a time (a line past MAX_RECORD_BYTES is dropped, never
    held whole) and keeps each record up to the step resumed as a line of its own."""
    from metrics import MAX_RECORD_BYTES, MetricsLog
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"type": "train", "step": 1}\n' + b'{"type": "x", "pad": "' + b"y" * MAX_RECORD_BYTES + b'"}\n' +
                     b'{"type": "train", "step": 3}\n{"type": "train", "step": 2}')  # the last: no newline
    log = MetricsLog(str(path))
    tracemalloc.start()
    log.open(resume_step=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    log.record(type="resume", step=2)
    log.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 2] and peak < MAX_RECORD_BYTES * 3
