"""[command] Generate text from a trained checkpoint, one token at a time, with a key/value cache.

    python3 generate.py --checkpoint checkpoints_small/checkpoint_final.npz \\
        --prompt "Once upon a time" --max_length 100 --temperature 0.8 --top_k 50 --num_samples 3
    python3 generate.py --checkpoint ck.npz --prompt "Once upon a time" --temperature 0    # greedy
    python3 generate.py --checkpoint ck.npz --prompt "The dog" --temperature 1.2 --top_p 0.9 --stream
    python3 generate.py --benchmark          # tokens/s of the guide's Small and Medium models, cache vs none
    python3 generate.py --checkpoint hf_small --prompt "Once upon a time"   # a Hugging Face GPT-2 or Llama folder
    python3 generate.py --checkpoint ck.npz --prompt "Once upon a time" --device cuda   # on an NVIDIA GPU (CuPy)

The checkpoint carries the model's config and its tokenizer's identity (and a BPE model's
JSON), so `--checkpoint` alone is enough. The guide's architecture flags (`--vocab_size
--d_model ...`) are accepted and checked against the checkpoint: a mismatch is an error.
`--checkpoint` may also be a Hugging Face GPT-2 or Llama folder (config.json + model.safetensors, as
export_hf.py writes or GPT-2's own files); its tokenizer is the folder's vocab.json + merges.txt,
else tiktoken's gpt2 for a 50257-token model. open_source() tells the two apart.

How a token is made: decoding.py (the key/value cache, and the window that slides once the text
outgrows the model's context), then sampling.py (temperature, top-k, top-p, one draw). With
--device cuda the weights and the cache live on the GPU; sampling happens on the host.
--benchmark is benchmark.py's decoding benchmark (`benchmark.py --decode`), run from here.
"""
import codecs
import contextlib
import os
import sys
import time

import numpy as np

import benchmark
from bpe import MAX_MODEL_BYTES
from checkpoint import load_model
from config import FIELD_RANGES
from decoding import generate
from device import array_module
from errors import UserError
from flag_types import COUNT, SEED, TEMPERATURE, TOP_P, Parser
from hf_format import load_hf_model, load_hf_tokenizer
from parallel import keep_freed_memory
from sampling import check_sampling
from tokenizer import KINDS, get_tokenizer, tokenizer_from_identity, tokenizer_kind
from untrusted import open_regular

ARCH_FLAGS = ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers")


class StreamPrinter:
    """Writes text as tokens arrive, each token's bytes decoded once (time linear in the tokens). A
    multi-byte character split across tokens is held back until its last byte arrives; the text written
    in the end is tokenizer.decode of all the ids. flush: after every token (--stream), else when the
    output's buffer fills, so a long text still comes out as it grows."""

    def __init__(self, tokenizer, out, ids=(), flush=True):
        self.tokenizer, self.out, self.flush = tokenizer, out, flush
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # what decode() does, a piece at a time
        self._show(self.tokenizer.decode_bytes(list(ids)))

    def add(self, token):
        self._show(self.tokenizer.decode_bytes([token]))

    def finish(self):
        self._show(b"", final=True)
        self.out.write("\n")
        self.out.flush()

    def _show(self, data, final=False):
        text = self.utf8.decode(data, final)
        if text:
            self.out.write(text)
        if self.flush:
            self.out.flush()


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = Parser(description="Generate text from a numpy-gpt checkpoint (key/value-cached decoding).")
    p.add_argument("--checkpoint", help="a .npz checkpoint written by train.py, or a Hugging Face GPT-2 or Llama "
                                        "folder with config.json + model.safetensors as export_hf.py writes "
                                        "(required unless --benchmark)")
    p.add_argument("--prompt", default="", help="text to continue; empty starts from the end-of-text token")
    p.add_argument("--max_length", type=COUNT, default=100,
                   help=f"most new tokens per sample, {COUNT}; default 100 (stops earlier at end-of-text)")
    p.add_argument("--temperature", type=TEMPERATURE, default=1.0,
                   help=f"divides the logits: < 1 more focused, > 1 more random, 0 = greedy (argmax); {TEMPERATURE}; "
                        "default 1.0")
    p.add_argument("--top_k", type=COUNT, default=None,
                   help=f"sample only from the k most likely tokens (1 = greedy), {COUNT}; default: all")
    p.add_argument("--top_p", type=TOP_P, default=None,
                   help=f"nucleus sampling: only the most likely tokens whose probability totals p, {TOP_P}; "
                        "default: off")
    p.add_argument("--num_samples", type=COUNT, default=1,
                   help=f"how many samples to generate from the prompt, {COUNT}; default 1")
    p.add_argument("--seed", type=SEED, default=None,
                   help=f"random seed for reproducible samples, {SEED} (default: a fresh one, printed on stderr)")
    p.add_argument("--stream", action="store_true", help="print each token as soon as it is produced")
    p.add_argument("--no_cache", action="store_true",
                   help="re-run the model over the whole context for every token (slow; for comparison)")
    t = p.add_argument_group("tokenizer (normally taken from the checkpoint)")
    t.add_argument("--tokenizer_type", choices=list(KINDS), default=None,
                   help="tiktoken or bpe (lecture2_bpe: the guide's name for bpe); must match the checkpoint's "
                        "tokenizer; used only if the checkpoint names none")
    t.add_argument("--encoding", default="gpt2",
                   help="tiktoken encoding (default gpt2), used only if the checkpoint names no tokenizer")
    t.add_argument("--model_file", default=None,
                   help="BPE model .json, needed only if the checkpoint lacks the embedded BPE model")
    a = p.add_argument_group("architecture (optional: taken from the checkpoint, checked if given)")
    for name, what in (("vocab_size", "vocabulary size"), ("d_model", "model width"), ("n_heads", "attention heads"),
                       ("d_ff", "feed-forward width"), ("n_layers", "Transformer blocks")):
        a.add_argument(f"--{name}", type=FIELD_RANGES[name], default=None,
                       help=f"{what} the model was trained with, {FIELD_RANGES[name]}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (NumPy), or cuda: an NVIDIA GPU through CuPy (pip install cupy-cuda12x, or "
                        "cupy-cuda13x); any checkpoint runs on either; default cpu")
    b = p.add_argument_group("speed")
    b.add_argument("--benchmark", action="store_true",
                   help="report tokens/s with and without the cache, for --checkpoint or else the guide's "
                        "Small and Medium models (random weights, max_seq_len 256)")
    b.add_argument("--benchmark_tokens", type=benchmark.DECODE_TOKENS, default=256,
                   help=f"tokens to decode per benchmark run, {benchmark.DECODE_TOKENS}; default 256")
    return p


def check_args(args):
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not args.checkpoint and not args.benchmark:
        raise UserError("--checkpoint is required (a .npz written by train.py, or a Hugging Face GPT-2 or Llama "
                        "folder)")
    array_module(args.device)  # DeviceError: what to install for --device cuda


def check_architecture(config, args, path):
    """Architecture flags given on the command line must describe the checkpoint's model."""
    wrong = [f"--{n} {getattr(args, n)} (checkpoint: {getattr(config, n)})"
             for n in ARCH_FLAGS if getattr(args, n) is not None and getattr(args, n) != getattr(config, n)]
    if wrong:
        raise UserError(f"{path} was written by a different architecture: " + ", ".join(wrong) +
                        ". Leave the architecture flags out (the checkpoint carries its config) "
                        "or pass the ones the model was trained with.")


def checkpoint_tokenizer(meta, args):
    """The tokenizer a checkpoint was trained with (its identity is in the meta record), else the flags'."""
    identity = meta.get("tokenizer")
    if not identity:  # a checkpoint trained on plain .jsonl files does not know its tokenizer: the flags say
        return flags_tokenizer(args)
    if args.tokenizer_type and tokenizer_kind(args.tokenizer_type) != tokenizer_kind(identity.get("type")):
        raise UserError(f"--tokenizer_type {args.tokenizer_type} does not match the checkpoint's tokenizer "
                        f"({identity.get('type')} {identity.get('name')}); leave the flag out")
    model_json = meta.get("tokenizer_model_json")
    if model_json is None and args.model_file:
        try:
            with open_regular(args.model_file, "r", "BPE model file", MAX_MODEL_BYTES, UserError,
                              encoding="utf-8") as f:
                model_json = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --model_file: {e}") from None
    if tokenizer_kind(identity.get("type")) == "bpe" and model_json is None and not identity.get("model_file"):
        raise UserError("the checkpoint does not embed its BPE model: pass --model_file path/to/bpe.json")
    return tokenizer_from_identity(identity, model_json=model_json)


def flags_tokenizer(args):
    """The tokenizer --tokenizer_type, --encoding and --model_file name (tiktoken's gpt2 by default)."""
    if tokenizer_kind(args.tokenizer_type or "tiktoken") == "tiktoken":
        return get_tokenizer("tiktoken", encoding=args.encoding, verbose=False)
    if not args.model_file:
        raise UserError(f"--tokenizer_type {args.tokenizer_type} needs --model_file path/to/bpe.json")
    return get_tokenizer("bpe", model_file=args.model_file, verbose=False)


def open_source(path, args, with_tokenizer=True):
    """(model, tokenizer, step) of what generation starts from: a .npz checkpoint (its config, weights and
    tokenizer) or a Hugging Face GPT-2 or Llama folder (its tokenizer files, unless the tokenizer flags name one);
    the weights on --device, the architecture flags checked. with_tokenizer=False: tokenizer None."""
    if os.path.isdir(path):
        model, record = load_hf_model(path, device=args.device)
        meta, step = None, record.get("step")
    else:
        model, meta = load_model(path, device=args.device)
        step = meta.get("step")
    check_architecture(model.config, args, path)
    if not with_tokenizer:
        return model, None, step
    if meta is not None:
        tok = checkpoint_tokenizer(meta, args)
    elif args.tokenizer_type or args.model_file:
        tok = flags_tokenizer(args)
    else:
        tok = load_hf_tokenizer(path, model.config.vocab_size)
    if tok.n_vocab > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tok.n_vocab} tokens but the model only {model.config.vocab_size}: "
                        "this checkpoint was not trained with this tokenizer")
    return model, tok, step


def main(argv=None, out=None, err=None):
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        with contextlib.redirect_stderr(err):  # a flag out of its range: one line, on err
            args = parser.parse_args(argv)
    except SystemExit as e:  # that, or --help
        return e.code
    keep_freed_memory()
    try:
        check_args(args)
        if args.benchmark:
            models = {args.checkpoint: open_source(args.checkpoint, args, with_tokenizer=False)[0]} \
                if args.checkpoint else benchmark.decode_models(args.benchmark_tokens, args.device)
            benchmark.run_decode(models, args.benchmark_tokens, args.device, out)
            return 0
        return run(args, out, err)
    except KeyboardInterrupt:
        out.write("\n")
        err.write("interrupted\n")
        return 130
    except (UserError, OSError) as e:  # OSError: a file that cannot be read
        err.write(f"error: {e}\n")
        return 1


def run(args, out, err):
    model, tok, step = open_source(args.checkpoint, args)
    config = model.config
    prompt_ids = tok.encode(args.prompt) if args.prompt else []
    context = prompt_ids or [tok.eot_id]  # an empty prompt starts a new story
    if len(context) > config.max_seq_len:
        err.write(f"note: the prompt has {len(context)} tokens, more than the model's context of "
                  f"{config.max_seq_len}; the model sees only the last {config.max_seq_len}\n")
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    err.write(f"{args.checkpoint}: step {step}, {model.num_parameters():,} parameters, "
              f"context {config.max_seq_len}, tokenizer {tok.name}; seed {seed}\n")
    n_new, t0 = 0, time.perf_counter()
    for s in range(args.num_samples):
        out.write(f"----- sample {s + 1}/{args.num_samples} -----\n")
        tokens = generate(model, context, args.max_length, rng, args.temperature, args.top_k, args.top_p,
                          eot_id=tok.eot_id, use_cache=not args.no_cache, n_valid=tok.n_vocab)
        printer = StreamPrinter(tok, out, prompt_ids, flush=args.stream)  # never the whole text held
        for token in tokens:
            printer.add(token)
            n_new += 1
        printer.finish()
    seconds = time.perf_counter() - t0
    err.write(f"{n_new} tokens in {seconds:.2f} s ({n_new / max(seconds, 1e-9):.1f} tokens/s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
