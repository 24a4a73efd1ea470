"""Generate text from a trained checkpoint, one token at a time, with a key/value cache.

    python3 generate.py --checkpoint checkpoints_small/checkpoint_final.npz \\
        --prompt "Once upon a time" --max_length 100 --temperature 0.8 --top_k 50 --num_samples 3
    python3 generate.py --checkpoint ck.npz --prompt "Once upon a time" --temperature 0    # greedy
    python3 generate.py --checkpoint ck.npz --prompt "The dog" --temperature 1.2 --top_p 0.9 --stream
    python3 generate.py --benchmark          # tokens/s of the guide's Small and Medium models, cache vs none
    python3 generate.py --checkpoint hf_small --prompt "Once upon a time"   # a Hugging Face GPT-2 folder
    python3 generate.py --checkpoint ck.npz --prompt "Once upon a time" --device cuda   # on an NVIDIA GPU (CuPy)

The checkpoint carries the model's config and its tokenizer's identity (and a BPE model's
JSON), so `--checkpoint` alone is enough. The guide's architecture flags (`--vocab_size
--d_model ...`) are accepted and checked against the checkpoint: a mismatch is an error.
`--checkpoint` may also be a Hugging Face GPT-2 folder (config.json + model.safetensors, as
export_hf.py writes or GPT-2's own files); its tokenizer is the folder's vocab.json + merges.txt,
else tiktoken's gpt2 for a 50257-token model.

Decoding. The prompt is run through the model once (prefill), filling a per-layer key/value
cache; each new token then costs one position's work: its query attends to the cached keys
and values. Positions are absolute (position 0 is the first token of the window), so once
the context is longer than the model's max_seq_len, sliding the window by one token moves
every token to a new position and invalidates every cached key and value. We then rebuild
the cache from the last max_seq_len tokens (one prefill) - exactly what an uncached forward
over that window computes, so the model always sees the last max_seq_len tokens, as in
nanoGPT. (Once the window slides, every step is such a prefill; keeping a shorter window
after a slide would be cheaper but would change what the model sees.)

Sampling, in this order (as Hugging Face's samplers): logits / temperature, then top-k,
then top-p on what is left, then one draw. Temperature 0 or top_k 1 is greedy (argmax).
Tokens tied with the k-th largest logit are all kept, and so are tokens tied with the
last one of the nucleus, so the kept set does not depend on how a sort breaks ties.

With --device cuda the weights and the key/value cache live on the GPU; each token copies
its row of logits (V,) back to the host, where sampling happens.
"""
import argparse
import codecs
import json
import os
import sys
import time

import numpy as np

from config import MAX_SEQ_LEN, PRESETS, config_from_flags
from device import DeviceError, require, to_host
from parallel import keep_freed_memory
from untrusted import open_regular

ARCH_FLAGS = ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers")
BENCH_PRESETS = ("small", "medium")  # of config.PRESETS: the guide's models, with a context of 256 tokens at least
BENCH_CONTEXT = 256


class GenerateError(Exception):
    """Bad input to generation; the message says what is wrong and what to do."""


# ----------------------------------------------------------------------------- sampling

def check_sampling(temperature=1.0, top_k=None, top_p=None):
    """ValueError for sampling settings that mean nothing."""
    if not temperature >= 0:  # also catches NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (1 = greedy), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def is_greedy(temperature, top_k):
    return temperature == 0 or top_k == 1


def nucleus_threshold(probs, top_p):
    """The probability of the least likely token of the nucleus: the smallest set of most
    likely tokens whose total reaches top_p (always at least the most likely token).

    Only the largest m probabilities are sorted, m growing until they hold top_p of the mass,
    so with a 50K vocabulary this is a partial sort of a few hundred values, not a full one.
    """
    V = probs.size
    m = min(V, 256)
    while True:
        top = np.sort(np.partition(probs, V - m)[V - m:] if m < V else probs)[::-1]  # (m,) descending
        cum = np.cumsum(top)
        if cum[-1] >= top_p or m == V:
            n = int(np.searchsorted(cum, top_p, side="left")) + 1  # smallest n with cum[n-1] >= top_p
            return top[min(n, m) - 1]  # n > m only by rounding when top_p = 1: keep everything
        m = min(V, 8 * m)


def kept_tokens(logits, temperature=1.0, top_k=None, top_p=None):
    """The tokens the next one is drawn from and their probabilities: (ids ascending, probs summing to 1).

    Works on the kept candidates only, so with top_k the softmax covers k values, not the vocabulary.
    """
    check_sampling(temperature, top_k, top_p)
    z = np.asarray(logits)
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"logits must be a non-empty vector, got shape {z.shape}")
    if np.isnan(z).any() or np.isposinf(z).any():
        raise ValueError("logits contain NaN or +inf: the model's weights are broken")
    V = z.size
    if is_greedy(temperature, top_k):
        return np.array([np.argmax(z)]), np.ones(1)  # ties: the lowest id
    if top_k is not None and top_k < V:
        kth = np.partition(z, V - top_k)[V - top_k]  # the k-th largest logit
        ids = np.flatnonzero(z >= kth)  # ties with it are kept too
    else:
        ids = np.flatnonzero(z > -np.inf)
        if ids.size == 0:
            raise ValueError("every logit is -inf: no token can be sampled")
    zk = z[ids].astype(np.float64)
    with np.errstate(over="ignore"):  # shift first, so a tiny temperature gives -inf, never inf - inf
        probs = np.exp((zk - zk.max()) / temperature)
    probs /= probs.sum()
    if top_p is not None and top_p < 1:
        keep = probs >= nucleus_threshold(probs, top_p)
        ids, probs = ids[keep], probs[keep]
        probs /= probs.sum()
    return ids, probs


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution the next token is drawn from, (V,) float64: zero outside the kept set, sums to 1."""
    ids, p = kept_tokens(logits, temperature, top_k, top_p)
    probs = np.zeros(np.asarray(logits).size)
    probs[ids] = p
    return probs


def draw(probs, rng):
    """An index drawn from probs (n,); entries of probability 0 are never drawn."""
    cdf = np.cumsum(probs)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    i = min(i, probs.size - 1)  # u * total can round up to total
    while probs[i] == 0:  # only after that rounding: step back to the last token that can be drawn
        i -= 1
    return i


def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """The next token id: argmax when greedy, else one draw from the kept tokens."""
    ids, probs = kept_tokens(logits, temperature, top_k, top_p)
    return int(ids[0]) if ids.size == 1 else int(ids[draw(probs, rng)])


# ----------------------------------------------------------------------------- decoding

class Decoder:
    """The logits of the next token for a growing sequence, fed to the model incrementally.

    With use_cache (the default) a token costs one position's work until the context fills
    the model's max_seq_len; then the window slides and the cache is rebuilt from the last
    max_seq_len tokens (see the module docstring). Without the cache every call runs the
    model over the whole window: the reference the cached path must match.
    """

    def __init__(self, model, use_cache=True):
        self.model = model
        self.use_cache = use_cache
        self.max_len = model.config.max_seq_len
        self.tokens = []  # the last max_len tokens fed: what the model sees
        self.cache = None
        self.rebuilds = 0  # how many times the cache was (re)filled from scratch

    def feed(self, ids):
        """Append token ids (at least one) to the context; returns the next token's logits (V,),
        a NumPy array (on the GPU, the one row copied to the host)."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("feed needs at least one token id")
        self.tokens.extend(ids)
        del self.tokens[:-self.max_len]  # memory bounded however long the text grows
        window = np.array([self.tokens])  # (1, T)
        if not self.use_cache:
            return to_host(self.model.forward(window, last_only=True)[0, -1])
        if self.cache is not None and self.cache.length + len(ids) <= self.max_len:
            # only the new positions
            return to_host(self.model.forward(np.array([ids]), kv_cache=self.cache, last_only=True)[0, -1])
        # first call, or the window slid: every position changed, so start the cache afresh
        self.cache = self.model.new_kv_cache(1)
        self.rebuilds += 1
        return to_host(self.model.forward(window, kv_cache=self.cache, last_only=True)[0, -1])


def generate(model, prompt_ids, max_new_tokens, rng=None, temperature=1.0, top_k=None, top_p=None,
             eot_id=None, use_cache=True, n_valid=None):
    """Yield up to max_new_tokens new token ids after prompt_ids (non-empty); stops before eot_id.

    n_valid: sample only ids below it (a model vocabulary padded beyond its tokenizer's).
    """
    check_sampling(temperature, top_k, top_p)
    if rng is None:
        rng = np.random.default_rng()
    decoder = Decoder(model, use_cache)
    logits = decoder.feed(prompt_ids)
    for i in range(max_new_tokens):
        token = sample_next(logits[:n_valid], rng, temperature, top_k, top_p)
        if token == eot_id:
            return
        yield token
        if i + 1 < max_new_tokens:
            logits = decoder.feed([token])


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


# ----------------------------------------------------------------------------- benchmark

def benchmark(model, n_tokens=256, contexts=(16, 64, 128, 256), out=sys.stdout):
    """Greedy-decode n_tokens with and without the cache; report tokens/s and per-token time by context.

    Returns {"cache"|"no cache": {"tokens_per_s": float, "ms_at": {context: ms}, "tokens": [...]}}.
    """
    if n_tokens > model.config.max_seq_len:
        raise GenerateError(f"benchmark of {n_tokens} tokens needs max_seq_len >= {n_tokens}, "
                            f"model has {model.config.max_seq_len}")
    results = {}
    for name, use_cache in (("cache", True), ("no cache", False)):
        decoder = Decoder(model, use_cache)
        logits = decoder.feed([0])
        tokens, seconds = [0], []
        while len(tokens) < n_tokens:
            token = int(np.argmax(logits))
            tokens.append(token)
            t0 = time.perf_counter()
            logits = decoder.feed([token])  # the step whose context is len(tokens)
            seconds.append(time.perf_counter() - t0)
        ms_at = {}
        for c in contexts:
            if 2 <= c <= n_tokens:  # the fastest of the steps at contexts c-4..c: the least disturbed by other work
                ms_at[c] = 1e3 * min(seconds[max(0, c - 6): c - 1])
        results[name] = {"tokens_per_s": len(seconds) / sum(seconds), "ms_at": ms_at, "tokens": tokens}
        per = "  ".join(f"ctx {c}: {ms:6.2f} ms" for c, ms in ms_at.items())
        out.write(f"  {name:8s}: {results[name]['tokens_per_s']:8.1f} tokens/s   per token at {per}\n")
        out.flush()
    same = results["cache"]["tokens"] == results["no cache"]["tokens"]
    out.write(f"  greedy tokens identical with and without the cache: {same}\n")
    return results


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = argparse.ArgumentParser(description="Generate text from a numpy-gpt checkpoint (key/value-cached decoding).")
    p.add_argument("--checkpoint", help="a .npz checkpoint written by train.py, or a Hugging Face GPT-2 folder with "
                                        "config.json + model.safetensors as export_hf.py writes (required unless --benchmark)")
    p.add_argument("--prompt", default="", help="text to continue; empty starts from the end-of-text token")
    p.add_argument("--max_length", type=int, default=100, help="most new tokens per sample, default 100 (stops earlier at end-of-text)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits: < 1 more focused, > 1 more random, 0 = greedy (argmax); default 1.0")
    p.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely tokens (1 = greedy); default: all")
    p.add_argument("--top_p", type=float, default=None,
                   help="nucleus sampling: only the most likely tokens whose probability totals p, in (0, 1]; default: off")
    p.add_argument("--num_samples", type=int, default=1, help="how many samples to generate from the prompt, default 1")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples (default: a fresh one, printed on stderr)")
    p.add_argument("--stream", action="store_true", help="print each token as soon as it is produced")
    p.add_argument("--no_cache", action="store_true",
                   help="re-run the model over the whole context for every token (slow; for comparison)")
    t = p.add_argument_group("tokenizer (normally taken from the checkpoint)")
    t.add_argument("--tokenizer_type", choices=("tiktoken", "lecture2_bpe"), default=None,
                   help="must match the checkpoint's tokenizer; used only if the checkpoint names none")
    t.add_argument("--encoding", default="gpt2",
                   help="tiktoken encoding (default gpt2), used only if the checkpoint names no tokenizer")
    t.add_argument("--model_file", default=None,
                   help="BPE model .json, needed only if the checkpoint lacks the embedded BPE model")
    a = p.add_argument_group("architecture (optional: taken from the checkpoint, checked if given)")
    a.add_argument("--vocab_size", type=int, default=None, help="vocabulary size the model was trained with")
    a.add_argument("--d_model", type=int, default=None, help="model width the model was trained with")
    a.add_argument("--n_heads", type=int, default=None, help="attention heads the model was trained with")
    a.add_argument("--d_ff", type=int, default=None, help="feed-forward width the model was trained with")
    a.add_argument("--n_layers", type=int, default=None, help="Transformer blocks the model was trained with")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (NumPy), or cuda: an NVIDIA GPU through CuPy (pip install cupy-cuda12x, or "
                        "cupy-cuda13x); any checkpoint runs on either; default cpu")
    b = p.add_argument_group("speed")
    b.add_argument("--benchmark", action="store_true",
                   help="report tokens/s with and without the cache, for --checkpoint or else the guide's "
                        "Small and Medium models (random weights, max_seq_len 256)")
    b.add_argument("--benchmark_tokens", type=int, default=256, help="tokens to decode per benchmark run, default 256")
    return p


def check_args(args):
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    for name in ("max_length", "num_samples", "benchmark_tokens"):
        if getattr(args, name) < 1:
            raise GenerateError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.seed is not None and args.seed < 0:
        raise GenerateError(f"--seed must be a number >= 0, got {args.seed}")
    if args.benchmark_tokens > MAX_SEQ_LEN:
        raise GenerateError(f"--benchmark_tokens {args.benchmark_tokens} is above the longest context this code "
                            f"supports, {MAX_SEQ_LEN}")
    if not args.checkpoint and not args.benchmark:
        raise GenerateError("--checkpoint is required (a .npz written by train.py, or a Hugging Face GPT-2 folder)")
    require(args.device)  # DeviceError: what to install for --device cuda


def check_architecture(config, args, path):
    """Architecture flags given on the command line must describe the checkpoint's model."""
    wrong = [f"--{n} {getattr(args, n)} (checkpoint: {getattr(config, n)})"
             for n in ARCH_FLAGS if getattr(args, n) is not None and getattr(args, n) != getattr(config, n)]
    if wrong:
        raise GenerateError(f"{path} was written by a different architecture: " + ", ".join(wrong) +
                            ". Leave the architecture flags out (the checkpoint carries its config) "
                            "or pass the ones the model was trained with.")


def load_tokenizer(meta, args):
    """The tokenizer the checkpoint was trained with (its identity is in the meta record)."""
    from tokenizer import get_tokenizer, tokenizer_from_identity
    identity = meta.get("tokenizer")
    if meta.get("hf_dir") and not (args.tokenizer_type or args.model_file):  # a Hugging Face folder
        from export_hf import load_hf_tokenizer
        return load_hf_tokenizer(meta["hf_dir"], meta["vocab_size"])
    if identity:
        if args.tokenizer_type and args.tokenizer_type != identity.get("type"):
            raise GenerateError(f"--tokenizer_type {args.tokenizer_type} does not match the checkpoint's tokenizer "
                                f"({identity.get('type')} {identity.get('name')}); leave the flag out")
        model_json = meta.get("tokenizer_model_json")
        if model_json is None and args.model_file:
            from bpe import MAX_MODEL_BYTES
            try:
                with open_regular(args.model_file, "r", "BPE model file", MAX_MODEL_BYTES, GenerateError,
                                  encoding="utf-8") as f:
                    model_json = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise GenerateError(f"cannot read --model_file: {e}") from None
        if identity.get("type") == "lecture2_bpe" and model_json is None and not identity.get("model_file"):
            raise GenerateError("the checkpoint does not embed its BPE model: pass --model_file path/to/bpe.json")
        return tokenizer_from_identity(identity, model_json=model_json)
    # a checkpoint trained on plain .jsonl files does not know its tokenizer: the flags say
    if (args.tokenizer_type or "tiktoken") == "tiktoken":
        return get_tokenizer("tiktoken", encoding=args.encoding, verbose=False)
    if not args.model_file:
        raise GenerateError("--tokenizer_type lecture2_bpe needs --model_file path/to/bpe.json")
    return get_tokenizer("lecture2_bpe", model_file=args.model_file, verbose=False)


def load_any(path, device="cpu"):
    """(model, meta) from a .npz checkpoint or a Hugging Face GPT-2 folder, the weights on device."""
    if os.path.isdir(path):
        from export_hf import load_hf_model
        return load_hf_model(path, device=device)
    from checkpoint import load_model
    return load_model(path, device=device)


def run_benchmark(args, out):
    from language_model import LanguageModel
    if args.checkpoint:
        model, _ = load_any(args.checkpoint, args.device)
        models = {args.checkpoint: model}
    else:
        models = {}
        for name in BENCH_PRESETS:
            cfg = config_from_flags(dict(PRESETS[name], seq_len=max(BENCH_CONTEXT, args.benchmark_tokens)))
            models[name] = LanguageModel(cfg, seed=0, dtype=np.float32, device=args.device)
    if hasattr(os, "getloadavg"):  # other work on the machine slows every figure below
        out.write(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
    for name, model in models.items():
        c = model.config
        out.write(f"{name}: vocab {c.vocab_size}, d_model {c.d_model}, {c.n_heads} heads, d_ff {c.d_ff}, "
                  f"{c.n_layers} layers, {model.dtype} on {args.device}; greedy decoding of "
                  f"{args.benchmark_tokens} tokens\n")
        benchmark(model, args.benchmark_tokens, out=out)
    return 0


def main(argv=None, out=None, err=None):
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        check_args(args)
        if args.benchmark:
            return run_benchmark(args, out)
        return run(args, out, err)
    except KeyboardInterrupt:
        out.write("\n")
        err.write("interrupted\n")
        return 130
    except Exception as e:
        known = (GenerateError, DeviceError) + _load_errors()
        if not isinstance(e, known):
            raise
        err.write(f"error: {e}\n")
        return 1


def _load_errors():
    """Exception types that mean bad input files (checkpoint or tokenizer), reported without a traceback."""
    import tokenizer
    from checkpoint import CheckpointError
    errors = [OSError, json.JSONDecodeError, CheckpointError]
    errors += [v for k, v in vars(tokenizer).items()
               if k.endswith("Error") and isinstance(v, type) and issubclass(v, Exception)]
    return tuple(errors)


def run(args, out, err):
    model, meta = load_any(args.checkpoint, args.device)
    config = model.config
    check_architecture(config, args, args.checkpoint)
    tok = load_tokenizer(meta, args)
    if tok.n_vocab > config.vocab_size:
        raise GenerateError(f"the tokenizer has {tok.n_vocab} tokens but the model only {config.vocab_size}: "
                            "this checkpoint was not trained with this tokenizer")
    prompt_ids = tok.encode(args.prompt) if args.prompt else []
    context = prompt_ids or [tok.eot_id]  # an empty prompt starts a new story
    if len(context) > config.max_seq_len:
        err.write(f"note: the prompt has {len(context)} tokens, more than the model's context of "
                  f"{config.max_seq_len}; the model sees only the last {config.max_seq_len}\n")
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    err.write(f"{args.checkpoint}: step {meta.get('step')}, {model.num_parameters():,} parameters, "
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
