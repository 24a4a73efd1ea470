"""Exports ready to share (issue 32): no path of the machine in any exported file (shareable.py), and the
model card export_hf.py writes as README.md (model_card.py), for both blocks and both kinds of tokenizer.
The card is parsed with huggingface_hub's ModelCard where that is installed (scripts/test.sh installs it)."""
import io
import json
import re
import shutil
from pathlib import Path

import pytest

import export_hf
import generate
import train
from bpe import train_bpe
from checkpoint import load_checkpoint
from helpers import metrics, tiny_flags, write_data
from model_card import DATA_LICENSE, DEFAULT_LICENSE, SAMPLE_PROMPT, SAMPLE_TOKENS, run_metrics, session_seconds
from shareable import shareable_record
from tokenizer import get_tokenizer

pytest.importorskip("safetensors", reason="the export needs safetensors (scripts/test.sh installs it)")

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "TinyStoriesV2-GPT4-train.sample.txt"
SECRET = "secret_user_zq81"  # the run's folder: no byte of an export may hold it
RUNS = [(arch, kind) for arch in ("gpt2", "llama") for kind in ("tiktoken", "bpe")]


def run_id(run):
    return "-".join(run)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{(arch, tokenizer kind): (checkpoint, export folder)}: four tiny runs of 4 steps, made under a folder
    named SECRET (its data, the BPE model file and the checkpoints all there), each exported."""
    home = tmp_path_factory.mktemp("home") / SECRET
    home.mkdir()
    (home / "bpe.json").write_text(train_bpe(SAMPLE.read_text(encoding="utf-8")[:20_000], 300).to_json(),
                                   encoding="utf-8")
    tokenizers = {"tiktoken": get_tokenizer("tiktoken", verbose=False),
                  "bpe": get_tokenizer("bpe", model_file=str(home / "bpe.json"), verbose=False)}
    done = {}
    for arch, kind in RUNS:
        tok, name = tokenizers[kind], f"{arch}_{kind}"
        data = (write_data(home / f"train_{name}.jsonl", 60, seed=1, identity=tok.identity()),
                write_data(home / f"valid_{name}.jsonl", 20, seed=2, identity=tok.identity()))
        save_dir = home / f"ck_{name}"
        flags = tiny_flags(data, str(save_dir), vocab_size=tok.n_vocab, arch=arch, max_steps=4, warmup_steps=2,
                           eval_interval=2, eval_batches=2, save_interval=2, log_interval=1)
        assert train.main(flags) == 0
        checkpoint = str(save_dir / "checkpoint_final.npz")
        out = home / f"hf_{name}"
        export_hf.export(checkpoint, str(out), log=lambda m: None)
        done[(arch, kind)] = checkpoint, out
    return done


def holds(data, text):
    """Whether the bytes data hold text in UTF-8, UTF-16 or UTF-32 (a checkpoint's meta is a NumPy str: UTF-32)."""
    return any(text.encode(code) in data for code in ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"))


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_no_exported_file_holds_a_path_of_the_machine(exports, run):
    checkpoint, out = exports[run]
    home = str(Path(checkpoint).parent.parent)
    assert holds(Path(checkpoint).read_bytes(), SECRET)  # the checkpoint records its paths: the test can fail
    meta = load_checkpoint(checkpoint).meta
    assert SECRET in meta["train_args"]["train_data"] and SECRET in meta["train_args"]["save_dir"]
    if run[1] == "bpe":
        assert SECRET in meta["tokenizer"]["model_file"]
    files = sorted(p for p in out.iterdir())
    assert {p.name for p in files} >= {"README.md", "config.json", "model.safetensors", "vocab.json", "merges.txt"}
    for path in files:
        data = path.read_bytes()
        assert not holds(data, SECRET) and not holds(data, home), path.name


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_config_json_keeps_the_recipe_by_name_and_hash(exports, run):
    checkpoint, out = exports[run]
    record = json.loads((out / "config.json").read_text())["numpy_gpt"]
    meta = load_checkpoint(checkpoint).meta
    assert record["step"] == 4 and record["tokens_seen"] == 4 * 8 * 16
    assert record["tokenizer"] == {k: meta["tokenizer"][k] for k in ("type", "name", "n_vocab", "eot_id", "sha256")}
    args = record["train_args"]
    assert args["train_data"] == f"train_{run[0]}_{run[1]}.jsonl" and args["val_data"].startswith("valid_")
    assert args["arch"] == run[0] and args["d_model"] == 16 and args["learning_rate"] == 1e-2
    assert "save_dir" not in args and record["data"]["train_data"] == args["train_data"]


def test_shareable_record_keeps_the_recipe_and_no_text_flag_it_does_not_know():
    meta = {"step": 3, "run_id": "20261205-010203-abcdef", "ranks": 2,
            "tokenizer": {"type": "bpe", "name": "bpe300-0123456789ab", "n_vocab": 300, "eot_id": 256,
                          "sha256": "ab" * 32, "model_file": "/home/alice/bpe.json"},
            "data": {"train_data": "C:\\Users\\alice\\train.jsonl", "num_tokens": 1000, "batches_drawn": 3,
                     "bit_generator": {"state": 1}},
            "train_args": {"train_data": "/home/alice/data/train.jsonl", "val_data": None, "batch_size": 4,
                           "seq_len": 8, "learning_rate": 3e-4, "arch": "llama", "use_learned_pos": False,
                           "init_from": "/home/alice/hf_base/", "save_dir": "/home/alice/ck",
                           "log_file": "/home/alice/log.txt", "resume": "/home/alice/ck/x.npz"}}
    record = shareable_record(meta)
    assert record == {"step": 3, "tokens_seen": 3 * 4 * 8, "ranks": 2,
                      "tokenizer": {"type": "bpe", "name": "bpe300-0123456789ab", "n_vocab": 300, "eot_id": 256,
                                    "sha256": "ab" * 32},
                      "data": {"train_data": "train.jsonl", "num_tokens": 1000},
                      "train_args": {"train_data": "train.jsonl", "val_data": None, "batch_size": 4, "seq_len": 8,
                                     "learning_rate": 3e-4, "arch": "llama", "use_learned_pos": False,
                                     "init_from": "hf_base"}}
    assert "alice" not in json.dumps(record)
    assert shareable_record({"step": 7}) == {"step": 7}  # a weights-only file: nothing more to say


def header(card):
    """The YAML header's lines (between the first two ---), read without a YAML library."""
    lines = card.splitlines()
    assert lines[0] == "---"
    return lines[1:lines.index("---", 1)]


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_the_card_says_what_the_model_is_how_it_was_trained_and_how_well(exports, run, capsys):
    checkpoint, out = exports[run]
    arch, kind = run
    card = (out / "README.md").read_text(encoding="utf-8")
    assert header(card) == [f"license: {DEFAULT_LICENSE}", "datasets:", "- roneneldan/TinyStories", "language:",
                            "- en", "tags:", "- numpy-gpt", f"- {arch}", "- tinystories",
                            "pipeline_tag: text-generation", "library_name: transformers"]
    ck = load_checkpoint(checkpoint)
    n_params = sum(p.size for p in ck.params.values())
    block = "LlamaForCausalLM" if arch == "llama" else "GPT2LMHeadModel"
    assert f"| parameters | {n_params:,} |" in card and block in card
    assert f"| vocabulary | {ck.meta['tokenizer']['n_vocab']:,} tokens" in card
    assert ("GPT-2's BPE (tiktoken gpt2)" in card) == (kind == "tiktoken")
    assert ck.meta["tokenizer"]["sha256"][:16] in card if kind == "bpe" else True
    assert f"- data: `train_{arch}_{kind}.jsonl`" in card and "- steps: 4" in card
    assert "- tokens seen: 512 " in card and re.search(r"- time: \d+ seconds? of wall-clock time", card)
    assert f"--arch {arch}" in card and "--learning_rate 0.01" in card and "--save_dir" not in card
    last = [r for r in metrics(Path(checkpoint).parent) if r["type"] == "eval"][-1]
    assert last["step"] == 4
    assert f"at step 4, on `valid_{arch}_{kind}.jsonl`" in card
    assert f"| {last['val_loss']:.4f} |" in card and f"| {last['val_bpb']:.4f} |" in card
    # the sample is the model's own greedy text, as generate.py writes it
    out_text = io.StringIO()
    assert generate.main(["--checkpoint", checkpoint, "--prompt", SAMPLE_PROMPT, "--temperature", "0",
                          "--max_length", str(SAMPLE_TOKENS)], out=out_text, err=io.StringIO()) == 0
    sample = out_text.getvalue().split("\n", 1)[1].rstrip("\n")
    assert sample.startswith(SAMPLE_PROMPT) and f"```text\n{sample}\n```" in card
    assert "python3 export_gguf.py CHECKPOINT out.gguf" in card and "AutoModelForCausalLM" in card
    assert "children's stories in English" in card and DATA_LICENSE in card
    assert "No licence was chosen for these weights" in card


@pytest.mark.parametrize("run", RUNS, ids=run_id)
def test_the_card_parses_as_a_hugging_face_model_card(exports, run):
    repocard = pytest.importorskip("huggingface_hub", reason="pip install huggingface_hub (scripts/test.sh does)")
    _, out = exports[run]
    card = repocard.ModelCard.load(out / "README.md")  # a local file: read, no network
    assert card.data.to_dict() == {"license": DEFAULT_LICENSE, "datasets": ["roneneldan/TinyStories"],
                                   "language": ["en"], "tags": ["numpy-gpt", run[0], "tinystories"],
                                   "pipeline_tag": "text-generation", "library_name": "transformers"}
    assert card.text.lstrip().startswith("# A ") and "## Evaluation" in card.text


def test_license_flag_names_the_licence_and_refuses_what_is_not_an_id(exports, tmp_path, capsys):
    checkpoint, _ = exports[("gpt2", "bpe")]
    assert export_hf.main([checkpoint, str(tmp_path / "hf"), "--license", "apache-2.0"]) == 0
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert header(card)[0] == "license: apache-2.0" and "The weights: `apache-2.0`" in card
    assert "No licence was chosen" not in card
    for bad in ("MIT", "mit\nfoo: bar", "", "a b"):
        with pytest.raises(SystemExit) as e:
            export_hf.main([checkpoint, str(tmp_path / "bad"), "--license", bad])
        assert e.value.code == 1  # flag_types.Parser: a user error, one line
        assert "is not a licence id" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_score_is_this_checkpoints_and_this_runs(exports, tmp_path):
    checkpoint, _ = exports[("llama", "bpe")]
    ck_dir = Path(checkpoint).parent
    export_hf.export(str(ck_dir / "checkpoint_step_2.npz"), str(tmp_path / "at2"), log=lambda m: None)
    card = (tmp_path / "at2" / "README.md").read_text(encoding="utf-8")
    assert "The last evaluation, at step 2," in card and "- steps: 2" in card  # not step 4's, later
    other = tmp_path / "other"  # the same checkpoint beside another run's metrics.jsonl
    other.mkdir()
    shutil.copy(checkpoint, other / "checkpoint_final.npz")
    records = [dict(r, run_id="another-run") if "run_id" in r else r for r in metrics(ck_dir)]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    export_hf.export(str(other / "checkpoint_final.npz"), str(tmp_path / "other_hf"), log=lambda m: None)
    card = (tmp_path / "other_hf" / "README.md").read_text(encoding="utf-8")
    assert "No held-out score" in card and "wall-clock" not in card


def test_a_cut_or_damaged_metrics_line_is_skipped_and_a_resumed_runs_pauses_do_not_count(exports, tmp_path):
    checkpoint, _ = exports[("gpt2", "tiktoken")]
    ck_dir = Path(checkpoint).parent
    (tmp_path / "ck").mkdir()
    shutil.copy(checkpoint, tmp_path / "ck" / "checkpoint_final.npz")
    good = (ck_dir / "metrics.jsonl").read_bytes()
    (tmp_path / "ck" / "metrics.jsonl").write_bytes(b"\xff\xfe not text\n" + good + b'{"type": "eval", "step": 4, "val')
    run = run_metrics(str(tmp_path / "ck" / "metrics.jsonl"), 4, load_checkpoint(checkpoint).meta["run_id"])
    assert run["eval"] == [r for r in metrics(ck_dir) if r["type"] == "eval"][-1]
    # two sessions of 10 and 30 seconds, 60 seconds apart: 40 seconds
    records = [{"type": "ranks", "time": 0.0}, {"type": "train", "time": 10.0}, {"type": "ranks", "time": 70.0},
               {"type": "train", "time": 90.0}, {"type": "eval", "time": 100.0}]
    assert session_seconds(records) == 40.0
    assert session_seconds([{"type": "train"}]) is None
