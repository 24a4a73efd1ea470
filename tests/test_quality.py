"""scripts/quality.py end to end on the bundled sample with a budget of seconds and a tiny recipe: the
fields of its record and their consistency (bits per byte from the loss, the tokens and the validation
text's own bytes), the cache of tokenized texts, and its one-line errors."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
TRAIN, VALID = SAMPLE / "TinyStoriesV2-GPT4-train.sample.txt", SAMPLE / "TinyStories-valid.sample.txt"
RECIPE = ["--vocab_size", "512", "--d_model", "32", "--n_heads", "2", "--d_ff", "64", "--n_layers", "1",
          "--batch_size", "8", "--seq_len", "32", "--warmup_steps", "5", "--learning_rate", "3e-3"]

spec = importlib.util.spec_from_file_location("quality", REPO / "scripts" / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """One run of the command, as a user runs it: (its stdout, its record, the work folder)."""
    work = tmp_path_factory.mktemp("quality")
    proc = subprocess.run([sys.executable, "scripts/quality.py", "--train_text", str(TRAIN), "--valid_text",
                           str(VALID), "--tokenizer", "bpe", "--time_budget", "0.05", "--work_dir", str(work),
                           "--samples", "2", "--sample_tokens", "30", "--", *RECIPE],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [line] = (work / "results.jsonl").read_text().splitlines()
    return proc.stdout, json.loads(line), work


def story_bytes(path):
    """The UTF-8 bytes of a one-story-per-line text as the evaluation counts them: each story's
    stripped text plus one byte, the newline that its end-of-text token stands for."""
    lines = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    return sum(len(line.strip().encode("utf-8")) + 1 for line in lines if line.strip())


def test_the_record_is_complete_and_consistent(benchmark):
    out, r, work = benchmark
    assert r["recipe"] == RECIPE and r["time_budget_minutes"] == 0.05 and r["tokenizer"]["vocab_size"] == 512
    assert r["steps"] == r["horizon"] > 1  # the budget shaped the run: it ended on its horizon
    assert r["seconds_per_step"] > 0 and r["train_seconds"] > 0 and r["wall_seconds"] >= r["train_seconds"]
    assert r["tokens_seen"] == r["steps"] * 8 * 32
    assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-12)
    # the whole validation text (bar a tail shorter than one window), its bytes counted from the text itself
    v = r["valid_text"]
    assert v["bytes"] == story_bytes(v["path"]) and v["tokens"] - 33 < r["val_tokens"] <= v["tokens"]
    # scored on the held-out copy: the paragraphs that repeat the training text removed (none in the sample)
    paragraphs = sum(1 for line in VALID.read_text(encoding="utf-8").splitlines() if line.strip())
    assert v["overlap_removed"] == {"removed": 0, "paragraphs": paragraphs} and Path(v["path"]).parent.name == "held_out"
    assert f"removed 0 of {paragraphs:,} paragraphs that overlap the training text" in out
    bytes_scored = v["bytes"] * r["val_tokens"] / v["tokens"]
    assert r["val_bpb"] == pytest.approx(r["val_loss"] * r["val_tokens"] / math.log(2) / bytes_scored, rel=1e-12)
    assert r["val_bpb"] < 8  # learnt something: a uniform guess over 512 tokens is log2(512) = 9 bits a token
    assert len(r["samples"]) == 2 and all(s.startswith("Once upon a time") and len(s) > 20 for s in r["samples"])
    assert r["sampling"] == {"prompt": "Once upon a time", "temperature": 0.8, "top_k": 40, "seed": 0,
                             "max_length": 30}
    assert r["machine"]["cpus"] >= 1 and r["date"][:2] == "20"
    # the table row: printed under its header, and in the record
    assert f"{quality.HEADER}\n{r['markdown_row']}" in out
    cells = [c.strip() for c in r["markdown_row"].strip("|").split(" | ")]
    assert len(cells) == quality.HEADER.split("\n")[0].count("|") - 1
    assert cells[4] == f"{r['steps']:,}" and cells[8] == f"{r['val_bpb']:.4f}"
    assert (Path(r["save_dir"]) / "checkpoint_final.npz").exists()


def test_the_tokenized_texts_are_cached_by_text_and_tokenizer(benchmark, monkeypatch, tmp_path):
    _, r, work = benchmark
    held_out = r["valid_text"]["path"]  # what the benchmark tokenized: VALID less its overlap (overlap.py)
    args, _ = quality.parse(["--train_text", str(TRAIN), "--valid_text", held_out, "--tokenizer", "bpe",
                             "--work_dir", str(work)])

    def no_tools(*a, **k):
        raise AssertionError("a tool ran although everything was cached")
    monkeypatch.setattr(quality.subprocess, "run", no_tools)
    said = []
    train, valid, key = quality.prepare_data(args, 512, said.append)
    assert key.startswith("bpe512-") and len(said) == 2 and all(s.startswith("cached") for s in said)
    assert Path(r["train_argv"][r["train_argv"].index("--val_data") + 1]) == valid
    # another text (the same stories, one more) or another tokenizer: other files, made anew
    other = tmp_path / "valid.txt"
    other.write_text(VALID.read_text(encoding="utf-8") + "\nOne more story.\n", encoding="utf-8")
    calls = []
    monkeypatch.setattr(quality, "run", lambda cmd, what: calls.append(cmd))
    args.valid_text = str(other)
    assert quality.prepare_data(args, 512, said.append)[1] != valid and len(calls) == 1
    args.tokenizer = "gpt2"
    assert quality.prepare_data(args, 50257, said.append)[0] != train and len(calls) == 3


@pytest.mark.parametrize("argv, says", [
    (["--tokenizer", "bpe", "--time_budget", "1", "--", "--d_model", "32"], "give the recipe one"),
    (["--time_budget", "1", "--", "--eval_batches", "5"], "the recipe sets --eval_batches"),
    (["--time_budget", "1", "--", "--save_dir", "x"], "the recipe sets --save_dir"),
    (["--", "--d_model", "32"], "no time budget"),
    (["--time_budget", "1", "--", "--time_budget", "2"], "given twice"),
    (["--time_budget", "1", "--", "--vocab_size", "512"], "not GPT-2's 50257"),
    (["--time_budget", "0", "--", "--d_model", "32"], "--time_budget: must be a number > 0"),
    (["--time_budget", "1", "--", "--d_model", "30"], "not divisible by n_heads"),
])
def test_bad_input_is_one_line_before_anything_runs(argv, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quality.subprocess, "run", lambda *a, **k: pytest.fail("ran a tool"))
    base = ["--train_text", str(TRAIN), "--valid_text", str(VALID), "--work_dir", str(tmp_path)]
    try:
        rc = quality.main(base + argv)
    except SystemExit as e:  # a flag out of its range: argparse's exit code
        rc = e.code
    assert rc in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert quality.main(["--train_text", str(tmp_path / "nope.txt"), "--valid_text", str(VALID),
                         "--time_budget", "1"]) == 1
    assert "nope.txt is not a text file" in capsys.readouterr().err
