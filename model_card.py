"""The model card: the README.md that export_hf.py writes into a Hugging Face folder.

First a YAML header in the form the Hugging Face hub reads (license, datasets, language, tags,
pipeline_tag, library_name), then what the model is, how it was trained, how well it does, a sample,
how to load it, its limits and the licences. It says about the run only what
shareable.shareable_record keeps (no path of the machine), the last held-out score from the run's
metrics.jsonl when that sits beside the checkpoint, and a short greedy sample from the weights.

    facts = card_facts(ck, "checkpoints_small/checkpoint_final.npz", shareable_record(ck.meta))
    text = model_card(facts, license="mit")

The weights' licence is the exporter's choice (--license). Its default, "other", chooses nothing
on their behalf: the card then says that no licence was chosen and how to state one. The data's
licence (TinyStories: CDLA-Sharing-1.0) is stated whatever the choice.
"""
import argparse
import math
import os
import re
import shlex

import numpy as np

from config import GPT2_VOCAB_SIZE
from decoding import generate
from errors import UserError
from language_model import LanguageModel
from metrics import MAX_METRICS_BYTES
from tokenizer import tokenizer_from_identity, tokenizer_kind
from untrusted import open_regular, parse_json

DATASET = "roneneldan/TinyStories"
DATA_LICENSE = "CDLA-Sharing-1.0"
DATA_LICENSE_URL = "https://cdla.dev/sharing-1-0/"
DEFAULT_LICENSE = "other"  # no licence chosen on the exporter's behalf; the card says how to state one
LICENSE_RE = re.compile(r"[a-z][a-z0-9.+-]{0,63}")  # the hub's licence ids: mit, apache-2.0, cc-by-4.0, openrail++
SAMPLE_PROMPT = "Once upon a time"
SAMPLE_TOKENS = 40  # greedy: the same text at every export of the same weights, and cheap
BLOCK_WORDS = {"gpt2": "GPT-2 block (`GPT2LMHeadModel`): LayerNorm, multi-head attention, an MLP",
               "llama": "Llama block (`LlamaForCausalLM`): RMSNorm, rotary positions, SwiGLU MLP, no biases"}


def license_id(text):
    """--license's type: a licence id as the hub spells it (lower case letters, digits, . + -)."""
    if not LICENSE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a licence id as the Hugging Face hub spells them "
                                         "(lower case, e.g. mit, apache-2.0, cc-by-4.0, other)")
    return text


# ----------------------------------------------------------------------------- what the card says

def run_metrics(path, step, run_id=None):
    """{"eval": the last eval record at or before step (None: none), "seconds": the wall-clock time of
    the run up to step, its sessions added (None: unknown)} from metrics.jsonl at path; None when there
    is no such file, it cannot be read, or it belongs to another run than run_id (a later run in the
    same folder). Lines that are not complete records are skipped."""
    records = []
    try:
        with open_regular(path, "rb", "metrics log", MAX_METRICS_BYTES, ValueError) as f:
            for line in f:
                record = metrics_record(line, path)
                if record is not None and (step is None or record["step"] <= step):  # not a later checkpoint's
                    records.append(record)
    except (OSError, ValueError):
        return None
    runs = {r.get("run_id") for r in records if r.get("type") in ("config", "resume")}
    if run_id is not None and runs and run_id not in runs:
        return None
    evals = [r for r in records if r.get("type") == "eval" and isinstance(r.get("val_loss"), float)]
    return {"eval": evals[-1] if evals else None, "seconds": session_seconds(records)}


def metrics_record(line, path):
    """The record of one line of metrics.jsonl, None for a line that is not one (a line cut short)."""
    try:
        record = parse_json(line, path)
    except ValueError:
        return None
    return record if isinstance(record, dict) and type(record.get("step")) is int else None


def session_seconds(records):
    """The time from the first to the last record of each session (each starts with a "ranks"
    record), added up: the run's wall-clock time without the pauses between a stop and a resume."""
    total, first, last = 0.0, None, None
    for r in records:
        t = r.get("time")
        if not isinstance(t, float):  # train.py's records: seconds since 1970, as a float
            continue
        if r.get("type") == "ranks" and first is not None:
            total += last - first
            first = None
        first = t if first is None else first
        last = t
    if first is None:
        return None
    return total + last - first


def sample_tokenizer(meta, config):
    """The tokenizer the checkpoint was trained with, from what it holds (no file of this machine is
    read), or (None, why not)."""
    identity = meta.get("tokenizer")
    if not identity:
        if config.vocab_size != GPT2_VOCAB_SIZE:
            return None, "the checkpoint names no tokenizer"
        identity = {"type": "tiktoken", "name": "gpt2"}  # as generate.py assumes
    model_json = meta.get("tokenizer_model_json")
    if tokenizer_kind(identity.get("type")) == "bpe" and model_json is None:
        return None, "the checkpoint does not embed its BPE model"
    try:
        tok = tokenizer_from_identity(identity, model_json=model_json)
    except (UserError, OSError) as e:
        return None, str(e)
    if tok.n_vocab > config.vocab_size:
        return None, f"its tokenizer has more tokens ({tok.n_vocab}) than the model"
    return tok, None


def greedy_sample(model, tok, prompt=SAMPLE_PROMPT, n_tokens=SAMPLE_TOKENS):
    """prompt and its greedy continuation (decoding.generate at temperature 0), up to n_tokens or the end of
    the story."""
    ids = tok.encode(prompt)
    new = list(generate(model, ids, n_tokens, np.random.default_rng(0), temperature=0.0, eot_id=tok.eot_id,
                        n_valid=tok.n_vocab))
    return tok.decode(ids + new)


def card_facts(ck, checkpoint_path, record, tokenizer_files=True):
    """What the card says of checkpoint ck (checkpoint.load_checkpoint): its config, parameters, the
    shareable record, the run's metrics (beside the checkpoint), a greedy sample (or why there is none)
    and whether the folder has tokenizer files (vocab.json + merges.txt)."""
    model = LanguageModel(ck.config, params=ck.params, for_training=False)
    tok, why_not = sample_tokenizer(ck.meta, ck.config)
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), "metrics.jsonl")
    return {"config": ck.config, "num_parameters": model.num_parameters(), "record": record,
            "metrics": run_metrics(metrics_path, ck.meta.get("step"), ck.meta.get("run_id")),
            "sample": greedy_sample(model, tok) if tok is not None else None, "no_sample": why_not,
            "tokenizer_files": tokenizer_files}


# ----------------------------------------------------------------------------- writing it

def code(text):
    """text as inline Markdown code (a backtick inside would end it)."""
    return "`" + str(text).replace("`", "'") + "`"


def fenced(text):
    """text as a Markdown code block, its fence longer than any run of backticks inside."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def duration(seconds):
    if seconds < 120:
        return "1 second" if round(seconds) == 1 else f"{round(seconds)} seconds"
    return f"{seconds / 60:.0f} minutes" if seconds < 7200 else f"{seconds / 3600:.1f} hours"


def millions(n):
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def yaml_header(arch, license):
    return "\n".join(["---", f"license: {license}", "datasets:", f"- {DATASET}", "language:", "- en",
                      "tags:", "- numpy-gpt", f"- {arch}", "- tinystories",
                      "pipeline_tag: text-generation", "library_name: transformers", "---"])


def vocabulary(config, identity):
    """A line on the tokenizer: by name and content hash, never by file."""
    if not identity:
        return f"{config.vocab_size:,} tokens (the checkpoint names no tokenizer)"
    kind, name, n = tokenizer_kind(identity.get("type")), identity.get("name"), identity.get("n_vocab")
    if (kind, name) == ("tiktoken", "gpt2"):
        what = "GPT-2's BPE (tiktoken gpt2)"
    elif kind == "bpe":
        what = f"byte-level BPE {code(name)} trained with numpy-gpt's tokenizer.py"
        if identity.get("sha256"):
            what += f", sha256 {code(identity['sha256'][:16])}…"
    else:
        what = f"{kind} {code(name)}"
    padded = f" (the model's table: {config.vocab_size:,})" if n and n != config.vocab_size else ""
    return f"{n or config.vocab_size:,} tokens{padded}: {what}"


def model_section(facts):
    config, record = facts["config"], facts["record"]
    heads = f"{config.n_heads}" if config.n_kv_heads in (None, config.n_heads) else \
        f"{config.n_heads} query, {config.n_kv_heads} key/value (grouped-query attention)"
    positions = {"sinusoidal": "sinusoidal (written as a fixed `wpe` table)"}.get(config.positions, config.positions)
    rows = [("block", BLOCK_WORDS[config.arch]), ("layers", config.n_layers), ("width (d_model)", config.d_model),
            ("attention heads", heads), ("feed-forward width", f"{config.d_ff} ({config.activation})"),
            ("positions", positions), ("context", f"{config.max_seq_len} tokens"),
            ("output layer", "tied to the token embedding" if config.tie_embeddings else "its own matrix"),
            ("parameters", f"{facts['num_parameters']:,}"),
            ("vocabulary", vocabulary(config, record.get("tokenizer")))]
    lines = ["## Model", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if facts["tokenizer_files"]:
        lines += ["", "The tokenizer is in `vocab.json` + `merges.txt` (GPT-2's spelling of a byte-level BPE), so "
                  "`AutoTokenizer` encodes text into the ids the model was trained on."]
    return lines


def recipe(args):
    """The recorded flags as a train.py command line (flags left unset or off are left out)."""
    words = ["python3", "train.py"]
    for key, value in args.items():
        if value is True:
            words.append(f"--{key}")
        elif value is not None and value is not False:
            words += [f"--{key}", shlex.quote(str(value))]
    lines, line = [], ""
    for word in words:
        if line and len(line) + len(word) > 90 and word.startswith("--"):
            lines.append(line + " \\")
            line = "   "
        line += (" " if line else "") + word
    return "\n".join(lines + [line])


def training_section(facts):
    record, run = facts["record"], facts["metrics"] or {}
    args, data = record.get("train_args") or {}, record.get("data") or {}
    lines = ["## Training", "",
             "Trained from scratch with numpy-gpt (every layer's forward and backward pass written by hand in "
             "NumPy) on TinyStories (short stories in simple English, generated by GPT-3.5 and GPT-4), as the run "
             "recorded it:", ""]
    if args.get("init_from"):
        lines[2] = f"Fine-tuned with numpy-gpt from the weights of {code(args['init_from'])}, as the run recorded it:"
    if data.get("train_data"):
        size = f" ({data['num_tokens']:,} tokens)" if data.get("num_tokens") else ""
        lines.append(f"- data: {code(data['train_data'])}{size}")
    if record.get("step") is not None:
        lines.append(f"- steps: {record['step']:,}")
    if record.get("tokens_seen"):
        lines.append(f"- tokens seen: {record['tokens_seen']:,} (steps × batch_size {args['batch_size']} × "
                     f"seq_len {args['seq_len']})")
    if run.get("seconds") is not None:
        ranks = f" on {record['ranks']} MPI ranks" if record.get("ranks", 1) > 1 else ""
        lines.append(f"- time: {duration(run['seconds'])} of wall-clock time{ranks} (evaluation and checkpoints "
                     "included)")
    if args:
        lines += ["", "The recipe: the run's flags as recorded (files by name only):", "", "```bash",
                  recipe(args), "```"]
    if not (data or args):
        lines.append("- the checkpoint records no more of its run")
    return lines


def evaluation_section(facts):
    run, args = facts["metrics"], (facts["record"].get("train_args") or {})
    evaluation = run and run.get("eval")
    lines = ["## Evaluation", ""]
    if not evaluation:
        lines.append("No held-out score: no evaluation of this run was found in a `metrics.jsonl` beside the "
                     "checkpoint.")
        return lines
    text = f"{code(args['val_data'])}, the run's held-out text" if args.get("val_data") else "the run's held-out text"
    tokens = f" ({evaluation['val_tokens']:,} tokens)" if isinstance(evaluation.get("val_tokens"), int) else ""
    bpb = evaluation.get("val_bpb") if isinstance(evaluation.get("val_bpb"), float) else None
    lines += [f"The last evaluation, at step {evaluation['step']:,}, on {text}{tokens}:", "",
              "| loss (nats per token) | perplexity | bits per byte |", "|---|---|---|",
              f"| {evaluation['val_loss']:.4f} | {math.exp(min(evaluation['val_loss'], 700.0)):.2f} | "
              f"{'not recorded' if bpb is None else f'{bpb:.4f}'} |", "",
              "Bits per byte (the loss over the text's UTF-8 bytes) compares models with different tokenizers; "
              "lower is better."]
    return lines


def sample_section(facts):
    lines = ["## Sample", ""]
    if facts["sample"] is None:
        lines.append(f"No sample: {facts['no_sample']}.")
        return lines
    lines += [f"The greedy continuation (temperature 0, up to {SAMPLE_TOKENS} new tokens) of \"{SAMPLE_PROMPT}\", "
              "written by these weights at export time:", "", fenced(facts["sample"])]
    return lines


def usage_section(facts):
    lines = ["## How to use", "", "With `transformers` (and `torch`):", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             'folder = "path/to/this/folder"  # or its id on the Hugging Face hub',
             "model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)",
             'ids = tok("Once upon a time", return_tensors="pt")',
             "print(tok.decode(model.generate(**ids, max_new_tokens=60, do_sample=False)[0]))", "```", "",
             "With numpy-gpt (NumPy only), from this folder:", "", "```bash",
             'python3 generate.py --checkpoint path/to/this/folder --prompt "Once upon a time"', "```", "",
             "As GGUF (llama.cpp and its kin), from the numpy-gpt checkpoint this folder was exported from:", "",
             "```bash", "python3 export_gguf.py CHECKPOINT out.gguf", "```"]
    if not facts["tokenizer_files"]:
        lines += ["", "This folder has no tokenizer files: give `AutoTokenizer` (or numpy-gpt's `--tokenizer_type "
                  "--model_file`) the tokenizer the model was trained with."]
    return lines


def limits_section():
    return ["## Limits", "",
            "A small model of simple children's stories in English: it continues a story in the style and the "
            "small vocabulary of TinyStories, and knows little else. It was not trained to follow instructions "
            "or state facts, it repeats itself and loses the thread of long texts, and it carries whatever "
            "biases its synthetic training stories have. Use it to learn, to test, to compare recipes; not for "
            "anything that matters to someone."]


def license_section(license):
    if license == DEFAULT_LICENSE:
        weights = ("No licence was chosen for these weights: `license: other` is export_hf.py's default, which "
                   "chooses nothing on the author's behalf. Ask the author before reusing them; the author states "
                   "one by exporting again with `--license mit` (or any licence id of the hub, such as "
                   "`apache-2.0` or `cc-by-4.0`).")
    else:
        weights = f"The weights: `{license}`, as chosen by whoever exported them (`export_hf.py --license`)."
    return ["## Licence", "", weights, "",
            f"The training data, TinyStories ([{DATASET}](https://huggingface.co/datasets/{DATASET}), Eldan and Li "
            f"2023), is published under {DATA_LICENSE} ({DATA_LICENSE_URL})."]


def title(facts):
    config = facts["config"]
    block = BLOCK_WORDS[config.arch].split(" block")[0]  # GPT-2, Llama
    return [f"# A {millions(facts['num_parameters'])}-parameter {block}-style model of TinyStories", "",
            "A small language model of simple English children's stories, trained with numpy-gpt (a toolkit "
            "that trains GPT-style models with nothing but NumPy) and exported with its `export_hf.py`."]


def model_card(facts, license=DEFAULT_LICENSE):
    """The card's text (README.md) from card_facts and the weights' licence."""
    sections = [[yaml_header(facts["config"].arch, license)], title(facts), model_section(facts),
                training_section(facts), evaluation_section(facts), sample_section(facts), usage_section(facts),
                limits_section(), license_section(license)]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"
