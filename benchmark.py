"""[command] How close is a training step to the cost of its matrix multiplies?

Times forward + backward + AdamW update steps of the model on random tokens and, in the same
run, the matrix products such a step cannot avoid done alone with NumPy (same shapes, same
layouts, preallocated outputs), and the machine's own matmul peak (a 2048^3 float32 product).
Prints both times, their ratio, tokens/s, peak memory, and what share of the machine's peak the
step and its products reach. All are timed alternately, so a busy machine slows them alike;
compare ratios and shares, not seconds.
The step splits the batch over the cores (parallel.py); the matmuls alone use NumPy's BLAS as
it comes, on every core. With --device cuda both run on the GPU (the matmuls through CuPy,
that is cuBLAS), the clock is read only after waiting for the GPU, and the memory printed is
the GPU memory CuPy's pool holds.

    python3 benchmark.py                                  # the guide's Small model
    python3 benchmark.py --d_model 256 --n_heads 8 --d_ff 1024 --n_layers 4 --batch_size 16 --seq_len 256
    python3 benchmark.py --all                            # Tiny, Small, Medium, Small with a 4096 vocabulary,
                                                          # Small with --arch llama (both vocabularies)
    python3 benchmark.py --arch llama                     # the Small model with the Llama block (d_ff 384)
    python3 benchmark.py --device cuda                    # the Small model on an NVIDIA GPU (needs CuPy)
    python3 benchmark.py --dropout 0.1                    # also the step with dropout, timed alternately
    python3 benchmark.py --optimizer muon                 # the step with Muon's update instead of AdamW's
    python3 benchmark.py --compare_workers 1              # also the step unsplit, BLAS on every core, alternately
    python3 benchmark.py --profile                        # where the step's time goes: each layer's forward
                                                          # and backward, the loss, the optimizer (any model flags)

Decoding (`--decode`, also `generate.py --benchmark`): tokens/s of greedy decoding with the
key/value cache and without it (the whole window again for every token), and the time per token
at a few context lengths, for the guide's Small and Medium models (random weights).

    python3 benchmark.py --decode
"""
import argparse
import itertools
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np

from config import ARCHS, FIELD_RANGES, GPT2_VOCAB_SIZE, MAX_SEQ_LEN, ModelConfig
from decoding import Decoder
from device import array_module, gpu_memory, synchronize, to_device
from dropout import DropoutKey
from errors import UserError
from flag_types import COUNT, PROBABILITY, SECONDS_OR_ZERO, Number, Parser
from language_model import LanguageModel
from lm_head import ROWS_PER_CHUNK
from loss import count_targets
from optimizer import OPTIMIZERS, build_optimizer, clip_grad_norm
from parallel import keep_freed_memory
from step_profile import BACKWARD, BOTH, FORWARD, LABELS, StepProfiler, random_batches, training_step
from train_flags import PRESETS, config_from_flags

RUNS = {  # --all: the guide's models (train_flags.PRESETS, with their batches), Small with a small vocabulary,
    # and Small with the Llama block (its SwiGLU width: about GPT-2's parameters), with both vocabularies
    "tiny": PRESETS["tiny"], "small": PRESETS["small"], "medium": PRESETS["medium"],
    "small-v4096": dict(PRESETS["small"], vocab_size=4096),
    "small-llama": dict(PRESETS["small"], arch="llama"),
    "small-llama-v4096": dict(PRESETS["small"], arch="llama", vocab_size=4096),
}
DECODE_PRESETS = ("small", "medium")  # --decode: the guide's models, with a context of 256 tokens at least
DECODE_CONTEXT = 256
DECODE_TOKENS = Number(int, 2, MAX_SEQ_LEN)  # tokens to decode: a first one fed, at least one timed after it


class MatmulsOnly:
    """The matrix products of one training step, alone: N = B*T rows, per layer and for the head.

    The widths are the block's: attn.c_attn (C, A), A = 3C for GPT-2 and (H + 2 Hkv) hs for Llama
    (fewer key/value heads with grouped-query attention); mlp.c_fc (C, Ffc), F for a two-matrix MLP (GPT-2's,
    Llama's relu2) and 2F for SwiGLU's [gate | up]; mlp.c_proj (F, C). Attention's products are timed per query head
    (B, H, T, .), which with grouped-query attention are as many multiply-adds."""

    def __init__(self, cfg, B, T, dtype=np.float32, xp=np):
        rng = np.random.default_rng(0)
        C, F, V, H = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_heads
        # the head's rows in chunks as lm_head.py makes them: all in one on the GPU (whole arrays)
        hs, N, R = C // H, B * T, B * T if xp is not np else min(ROWS_PER_CHUNK, B * T)
        block = ARCHS[cfg.arch].block_shapes(cfg)
        A, Ffc = block["attn.c_attn.weight"][1], block["mlp.c_fc.weight"][1]
        self.xp = xp

        def r(*shape):
            return to_device(rng.standard_normal(shape).astype(dtype), xp)

        x, xa, xfc, xf = r(N, C), r(N, A), r(N, Ffc), r(N, F)
        wa, w, wfc, wp = r(C, A), r(C, C), r(C, Ffc), r(F, C)
        q, att = r(B, H, T, hs), r(B, H, T, T)
        wte, logits = r(V, C), r(R, V)
        o = {s: xp.empty(s, dtype) for s in {(N, C), (N, A), (N, Ffc), (N, F), (C, A), (C, C), (C, Ffc), (F, C),
                                              (B, H, T, T), (B, H, T, hs), (R, V), (R, C), (V, C)}}
        layer = [  # (a, b, out) for out = a @ b
            (x, wa, o[N, A]), (q, q.transpose(0, 1, 3, 2), o[B, H, T, T]), (att, q, o[B, H, T, hs]),
            (x, w, o[N, C]), (x, wfc, o[N, Ffc]), (xf, wp, o[N, C]),  # forward
            (x.T, x, o[C, C]), (x, w.T, o[N, C]),  # attn.c_proj: dW, dx
            (q, q.transpose(0, 1, 3, 2), o[B, H, T, T]), (att.transpose(0, 1, 3, 2), q, o[B, H, T, hs]),  # datt, dv
            (att, q, o[B, H, T, hs]), (att.transpose(0, 1, 3, 2), q, o[B, H, T, hs]),  # dq, dk
            (x.T, xa, o[C, A]), (xa, wa.T, o[N, C]),  # attn.c_attn: dW, dx
            (xf.T, x, o[F, C]), (x, wp.T, o[N, F]),  # mlp.c_proj: dW, dx
            (x.T, xfc, o[C, Ffc]), (xfc, wfc.T, o[N, C]),  # mlp.c_fc: dW, dx
        ]
        head = [(x[:R], wte.T, o[R, V]), (logits, wte, o[R, C]), (logits.T, x[:R], o[V, C])]
        self.products = layer * cfg.n_layers + head * (-(-N // R))
        self.flops = sum(2 * a.size * b.shape[-1] for a, b, _ in self.products)
        # the rows of the profile (step_profile.py) the products belong to, in layer's order, then the head's
        attn_f, ff_f, attn_b, ff_b = (("attention", FORWARD), ("feed_forward", FORWARD),
                                      ("attention", BACKWARD), ("feed_forward", BACKWARD))
        layer_rows = [attn_f] * 4 + [ff_f] * 2 + [attn_b] * 8 + [ff_b] * 4
        assert len(layer_rows) == len(layer), "a product added to layer needs its row here too"
        rows = layer_rows * cfg.n_layers + [("head", BOTH)] * (len(self.products) - len(layer) * cfg.n_layers)
        self.flops_by_row = {}  # (row, direction) -> FLOP (2 per multiply-add)
        for row, (a, b, _) in zip(rows, self.products):
            self.flops_by_row[row] = self.flops_by_row.get(row, 0) + 2 * a.size * b.shape[-1]

    def run(self):
        for a, b, out in self.products:
            self.xp.matmul(a, b, out=out)


class PeakMatmul:
    """The machine's own matrix-multiply speed: one (n, n) @ (n, n) float32 product, the shape BLAS runs
    fastest (both cores on the CPU), to say what share of it a step reaches."""

    def __init__(self, n=2048, xp=np):
        rng = np.random.default_rng(1)
        self.a, self.b = (to_device(rng.standard_normal((n, n)).astype(np.float32), xp) for _ in range(2))
        self.out, self.xp = xp.empty((n, n), np.float32), xp
        self.flops = 2 * n ** 3

    def run(self):
        self.xp.matmul(self.a, self.b, out=self.out)


def median_time(fn, repeats, xp=np):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(xp)  # on the GPU the work is only queued when fn returns
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def fixed_batch_step(cfg, B, T, device="cpu", dropout=0.0, optimizer="adamw", workers=None):
    """The model (seed 0) and its training step on one fixed batch of B random sequences of T tokens: what
    train.py does each step (forward, backward, gradient clipping at 1.0, the update at lr 3e-4 by --optimizer,
    AdamW by default), less the data and the logging, the batch split over `workers` threads (default: one per
    core, as train.py's --workers). Returns (model, step, batch): step(with_dropout=False) runs one step; batch
    (x, y) are the NumPy token ids, so that another implementation (scripts/torch_compare.py) can take the same ones."""
    model = LanguageModel(replace(cfg, dropout=dropout), seed=0, device=device, workers=workers)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1))
    optimizer = build_optimizer(optimizer, model.params, weight_decay=0.01)  # --optimizer, adamw by default
    x, y = tokens[:, :-1], tokens[:, 1:]
    step_number = itertools.count()

    def step(with_dropout=False):
        model.zero_grad()
        model.forward_backward(x, y, count_targets(y), DropoutKey(0, next(step_number)) if with_dropout else None)
        clip_grad_norm(model.grads, 1.0)
        optimizer.step(model.grads, lr=3e-4)

    return model, step, (x, y)


def time_alternately(timed, rounds, xp=np):
    """{name: [seconds of each round]} of {name: fn}: each round runs every fn in turn, so all see the same
    machine. Each is timed right after an untimed run of itself, as in a loop of its own: after the
    matmuls, OpenBLAS's threads spin-wait for more work for ~0.1 s and would slow a step's first tenth of
    a second (training runs steps back to back, never this mix)."""
    times = {name: [] for name in timed}
    for _ in range(rounds):
        for name, fn in timed.items():
            fn()
            times[name].append(median_time(fn, 1, xp))
    return times


def bench(cfg, B, T, steps=5, min_seconds=0.0, warmup=2, device="cpu", dropout=0.0, optimizer="adamw", workers=None,
          compare_workers=None):
    """The step's and the matmuls' median times; with dropout > 0 also the step that drops with that
    probability (its masks drawn anew each step), timed in turn with the others. The step splits its batch
    over `workers` threads (default: one per core); with `compare_workers` the same step split over that many
    threads is timed in turn too (1: no split, BLAS on every core for each product)."""
    model, step, _ = fixed_batch_step(cfg, B, T, device, dropout, optimizer, workers)
    xp = model.xp

    def dropout_step():
        step(with_dropout=True)

    for _ in range(warmup):
        step()
        if dropout:
            dropout_step()
    steps = max(steps, math.ceil(min_seconds / median_time(step, 1, xp)))  # short steps: more of them, less noise
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = gpu_memory(xp)  # (in use, held by the pool) after a step: its arrays, and what it keeps for the next
    mm, peak = MatmulsOnly(cfg, B, T, xp=xp), PeakMatmul(xp=xp)
    mm.run()
    timed = {"step": step, "matmul": mm.run, "peak": peak.run}
    if dropout:
        timed["dropout_step"] = dropout_step
    if compare_workers is not None:
        other, timed["compare_step"], _ = fixed_batch_step(cfg, B, T, device, dropout, optimizer, compare_workers)
        compare_workers = other.workers  # on the GPU always 1
        timed["compare_step"]()  # the first step allocates
    times = time_alternately(timed, steps, xp)
    t = {name: float(np.median(ts)) for name, ts in times.items()}
    t_step, t_mm = t["step"], t["matmul"]
    peak_gflops = peak.flops / t["peak"] / 1e9
    return dict(step_s=t_step, matmul_s=t_mm, ratio=t_step / t_mm, tokens_per_s=B * T / t_step,
                gflops=mm.flops / t_mm / 1e9, peak_gflops=peak_gflops, step_flops=mm.flops,
                step_share=mm.flops / t_step / 1e9 / peak_gflops, matmul_share=mm.flops / t_mm / 1e9 / peak_gflops,
                peak_mb=peak_mb, params=model.num_parameters(),
                gpu_mb=None if gpu is None else gpu[1] / 2**20, dropout=dropout, dropout_step_s=t.get("dropout_step"),
                workers=model.workers, compare_workers=compare_workers, compare_step_s=t.get("compare_step"))


def report(name, cfg, B, T, r):
    kv = "" if cfg.n_kv_heads is None else f" n_kv_heads={cfg.n_kv_heads}"
    own = cfg.activation == ARCHS[cfg.arch].activations[0]  # the block's default feed-forward goes unsaid
    act = "" if own else f" activation={cfg.activation}"
    act += (" qk_norm" if cfg.qk_norm else "") + (f" logit_softcap={cfg.logit_softcap:g}" if cfg.logit_softcap else "")
    print(f"{name}: arch={cfg.arch}{act} d_model={cfg.d_model} n_heads={cfg.n_heads}{kv} d_ff={cfg.d_ff} "
          f"n_layers={cfg.n_layers} vocab={cfg.vocab_size} batch={B} seq={T} params={r['params']:,}")
    if r.get("gpu_mb") is None:
        times = f"step {r['step_s']:.3f} s   matmuls alone {r['matmul_s']:.3f} s"
        memory = f"peak memory {r['peak_mb']:.0f} MB"
    else:  # a GPU step takes milliseconds
        times = f"step {1000 * r['step_s']:.1f} ms   matmuls alone {1000 * r['matmul_s']:.1f} ms"
        memory = f"GPU memory {r['gpu_mb']:.0f} MB (held by CuPy's pool), host peak {r['peak_mb']:.0f} MB"
    print(f"  {times} ({r['gflops']:.0f} GFLOP/s)   ratio {r['ratio']:.2f}   {r['tokens_per_s']:,.0f} tokens/s   "
          f"{memory}", flush=True)
    print(f"  {r['step_flops'] / 1e9:.0f} GFLOP a step: the step runs at {r['step_share']:.0%} of this machine's "
          f"matmul peak, {r['peak_gflops']:.0f} GFLOP/s (a 2048^3 float32 product, timed in turn), its matrix "
          f"products alone at {r['matmul_share']:.0%}", flush=True)
    if r.get("dropout_step_s") is not None:
        t, unit = (r["dropout_step_s"], "s") if r.get("gpu_mb") is None else (1000 * r["dropout_step_s"], "ms")
        print(f"  with dropout {r['dropout']}: step {t:.3f} {unit} "
              f"({100 * (r['dropout_step_s'] / r['step_s'] - 1):+.1f}% on the step without)", flush=True)
    if r.get("compare_step_s") is not None:
        ratio = r["compare_step_s"] / r["step_s"]
        print(f"  the batch split over {r['workers']} thread(s): step {r['step_s']:.3f} s; over "
              f"{r['compare_workers']}: {r['compare_step_s']:.3f} s, {ratio:.2f} x the time over {r['workers']}",
              flush=True)


def profile(cfg, B, T, steps=5, min_seconds=0.0, warmup=2, device="cpu", dropout=0.0, optimizer="adamw", workers=None):
    """Where a training step's time goes (step_profile.py): the seconds per step of each row, the profiled
    step's mean time (the rows' reference), the same step's median time without the profiler, and the
    machine's matmul peak, all timed in turn; the matrix products' FLOP per row are MatmulsOnly's. The batch
    is split over `workers` threads (default: one per core)."""
    model = LanguageModel(replace(cfg, dropout=dropout), seed=0, device=device, workers=workers)
    xp = model.xp
    optimizer = build_optimizer(optimizer, model.params, weight_decay=0.01)  # as bench()
    batches = random_batches(cfg.vocab_size, B, T)
    profiler = StepProfiler(model, optimizer)
    step_number = itertools.count()

    def step():  # what train.py does each step, less the logging
        training_step(model, optimizer, batches, dropout=DropoutKey(0, next(step_number)) if dropout else None)

    def profiled_step():
        with profiler:
            step()

    for _ in range(warmup):
        step()
    steps = max(steps, math.ceil(min_seconds / median_time(step, 1, xp)))
    peak = PeakMatmul(xp=xp)
    times = {"peak": [], "step": [], "profiled": []}
    for _ in range(steps):  # in turn, so all see the same machine
        peak.run()
        times["peak"].append(median_time(peak.run, 1, xp))
        step()  # untimed: after the peak's product, BLAS's threads spin-wait a while (see bench)
        times["step"].append(median_time(step, 1, xp))
        times["profiled"].append(median_time(profiled_step, 1, xp))
    flops = MatmulsOnly(cfg, B, T, xp=xp).flops_by_row
    rows = profiler.rows(steps)
    for r in rows:
        r["flops"] = flops.get((r["row"], r["direction"]), 0)
    return dict(rows=rows,
                step_s=float(np.mean(times["profiled"])), plain_step_s=float(np.median(times["step"])),
                peak_gflops=peak.flops / float(np.median(times["peak"])) / 1e9, steps=steps,
                threads=profiler.shards / steps, params=model.num_parameters())


def report_profile(cfg, B, T, r, out=None):
    """The profile's table: a row per kind of layer and direction, the rest, and the step."""
    out = out or sys.stdout
    ms, peak, threads = 1000 * r["step_s"], r["peak_gflops"], r["threads"]
    kv = "" if cfg.n_kv_heads is None else f" n_kv_heads={cfg.n_kv_heads}"
    out.write(f"profile: arch={cfg.arch} d_model={cfg.d_model} n_heads={cfg.n_heads}{kv} d_ff={cfg.d_ff} "
              f"n_layers={cfg.n_layers} vocab={cfg.vocab_size} batch={B} seq={T} params={r['params']:,}\n")
    out.write(f"  a training step: {ms:.1f} ms profiled (mean of {r['steps']}), {1000 * r['plain_step_s']:.1f} ms "
              f"without the profiler (median); matmul peak {peak:.0f} GFLOP/s (a 2048^3 float32 product)\n")
    if threads > 1:
        out.write(f"  * the forward and backward pass: the {B} sequences split over {threads:g} threads (one per core) "
                  f"running at once; a * row is the threads' seconds / {threads:g}\n")
    out.write(f"  {'row':<62} {'pass':<9} {'ms/step':>8} {'share':>6} {'GFLOP':>7} {'GFLOP/s':>8} {'of peak':>7}\n")
    accounted, total_flops = 0.0, 0
    for row in r["rows"]:
        accounted += row["seconds"]
        total_flops += row["flops"]
        mark = "*" if threads > 1 and row["sharded"] else " "
        out.write(_profile_line(f"{mark} {LABELS[row['row']]}", row["direction"], row["seconds"], r["step_s"],
                                row["flops"], peak))
    rest = r["step_s"] - accounted
    out.write(_profile_line("  rest: in no row (Python, token checks, threads waiting)", "", rest,
                            r["step_s"], 0, peak))
    out.write(_profile_line("  the whole step", "", r["step_s"], r["step_s"], total_flops, peak))
    out.flush()


def _profile_line(label, direction, seconds, step_s, flops, peak_gflops):
    line = f"  {label:<62.62} {direction:<9} {1000 * seconds:8.2f} {seconds / step_s:6.1%}"
    if flops and seconds > 0:
        gflops = flops / seconds / 1e9
        line += f" {flops / 1e9:7.2f} {gflops:8.1f} {gflops / peak_gflops:7.0%}"
    return line + "\n"


def decode_benchmark(model, n_tokens=256, contexts=(16, 64, 128, 256), out=sys.stdout):
    """Greedy-decode n_tokens with and without the cache; report tokens/s and per-token time by context.

    Returns {"cache"|"no cache": {"tokens_per_s": float, "ms_at": {context: ms}, "tokens": [...]}}.
    """
    if n_tokens > model.config.max_seq_len:
        raise UserError(f"benchmark of {n_tokens} tokens needs max_seq_len >= {n_tokens}, "
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


def decode_models(n_tokens, device="cpu"):
    """{name: model} of DECODE_PRESETS with random weights and a context of n_tokens at least."""
    return {name: LanguageModel(config_from_flags(dict(PRESETS[name], seq_len=max(DECODE_CONTEXT, n_tokens))),
                                seed=0, dtype=np.float32, device=device) for name in DECODE_PRESETS}


def run_decode(models, n_tokens, device, out=sys.stdout):
    """decode_benchmark of each of {name: model}, each with a line saying what it is."""
    if hasattr(os, "getloadavg"):  # other work on the machine slows every figure below
        out.write(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
    for name, model in models.items():
        c = model.config
        out.write(f"{name}: vocab {c.vocab_size}, d_model {c.d_model}, {c.n_heads} heads, d_ff {c.d_ff}, "
                  f"{c.n_layers} layers, {model.dtype} on {device}; greedy decoding of {n_tokens} tokens\n")
        decode_benchmark(model, n_tokens, out=out)


def print_sizes(vocab_size=GPT2_VOCAB_SIZE):
    """The guide's model sizes (train_flags.PRESETS): parameters with and without the (V, C) token embedding
    (tied to the head), as the README's table shows them."""
    print(f"| Size | d_model | n_heads | d_ff | n_layers | batch × seq | Params (all) | "
          f"Params (without the {vocab_size}-token embedding) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, p in PRESETS.items():
        vocab = p.get("vocab_size", vocab_size)  # a recipe's own vocabulary (laptop: our BPE's)
        own = (f", the {p['arch'].capitalize()} block" if "arch" in p else "") + \
            (f", {vocab}-token vocabulary" if vocab != vocab_size else "")
        model = LanguageModel(config_from_flags(dict(p, vocab_size=vocab)), for_training=False)
        print(f"| {name.capitalize()} (`--preset {name}`{own}) | {p['d_model']} | {p['n_heads']} | "
              f"{model.config.d_ff} | {p['n_layers']} | "
              f"{p['batch_size']} × {p['seq_len']} | {model.num_parameters():,} | "
              f"{model.num_parameters(include_embeddings=False):,} |")


def add_model_flags(ap):
    """The model and batch flags, benchmark.py's and scripts/torch_compare.py's."""
    size = FIELD_RANGES
    ap.add_argument("--vocab_size", type=size["vocab_size"], default=GPT2_VOCAB_SIZE,
                    help=f"vocabulary size: {size['vocab_size']} (default {GPT2_VOCAB_SIZE}, GPT-2's)")
    ap.add_argument("--d_model", type=size["d_model"], default=128,
                    help=f"model width C: {size['d_model']} (default 128)")
    ap.add_argument("--n_heads", type=size["n_heads"], default=4,
                    help=f"attention heads: {size['n_heads']}, dividing --d_model (default 4)")
    ap.add_argument("--d_ff", type=size["d_ff"], default=None,
                    help=f"feed-forward width: {size['d_ff']} (default: the block's own, 4 d_model for gpt2, SwiGLU's "
                         "for llama)")
    ap.add_argument("--n_layers", type=size["n_layers"], default=2,
                    help=f"Transformer blocks: {size['n_layers']} (default 2)")
    ap.add_argument("--arch", choices=list(ARCHS), default="gpt2", help="the block, as train.py's --arch")
    ap.add_argument("--n_kv_heads", type=size["n_kv_heads"], default=None,
                    help=f"--arch llama: key/value heads (grouped-query attention): {size['n_kv_heads']}, dividing "
                         "--n_heads (default --n_heads)")
    ap.add_argument("--activation", choices=sorted({a for arch in ARCHS.values() for a in arch.activations}),
                    default=None, help="the feed-forward, as train.py's --activation (default: the block's own, gelu "
                                       "or swiglu); relu2 with --arch llama is a two-matrix MLP, d_ff 4 d_model")
    ap.add_argument("--batch_size", type=COUNT, default=32, help=f"sequences per step: {COUNT} (default 32)")
    ap.add_argument("--seq_len", type=size["max_seq_len"], default=128,
                    help=f"tokens per sequence: {size['max_seq_len']} (default 128)")


def main(argv=None):
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(ap)
    ap.add_argument("--steps", type=COUNT, default=5,
                    help=f"timed steps at least; the median is reported: {COUNT} (default 5)")
    ap.add_argument("--min_seconds", type=SECONDS_OR_ZERO, default=3.0,
                    help=f"time at least this many seconds of steps, short steps being noisy: {SECONDS_OR_ZERO} "
                         "(default 3)")
    ap.add_argument("--dropout", type=PROBABILITY, default=0.0, metavar="P",
                    help=f"also time the step with dropout P (train.py --dropout), alternately with the one without: "
                         f"{PROBABILITY} (default 0: not)")
    ap.add_argument("--qk_norm", action="store_true", help="the model with QK-norm, as train.py's --qk_norm")
    ap.add_argument("--logit_softcap", type=FIELD_RANGES["logit_softcap"], default=0.0, metavar="C",
                    help=f"the model with soft-capped logits, as train.py's --logit_softcap: {FIELD_RANGES['logit_softcap']} "
                         "(default 0: off)")
    ap.add_argument("--all", action="store_true",
                    help="run the guide's Tiny, Small, Medium, Small-with-4096-vocab, and Small with --arch llama "
                         "(both vocabularies)")
    ap.add_argument("--sizes", action="store_true", help="only print the guide's model sizes with their parameter counts")
    ap.add_argument("--decode", action="store_true",
                    help="time greedy decoding instead (with and without the key/value cache) of the guide's "
                         "Small and Medium models")
    ap.add_argument("--decode_tokens", type=DECODE_TOKENS, default=256,
                    help=f"with --decode: tokens to decode: {DECODE_TOKENS} (default 256)")
    ap.add_argument("--profile", action="store_true",
                    help="print where a training step's time goes instead: each kind of layer's forward and backward, "
                         "the loss, the optimizer, the batch, with time, share, GFLOP/s and share of the matmul peak "
                         "(docs/performance.md explains the table)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu (NumPy) or cuda: an NVIDIA GPU through CuPy (pip install cupy-cuda12x, or cupy-cuda13x)")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw",
                    help="the update the step times, as train.py's --optimizer (weight decay 0.01)")
    ap.add_argument("--workers", type=COUNT, default=None,
                    help=f"threads the step splits its batch over, as train.py's --workers: {COUNT} (default: one per "
                         "core; 1: no split, NumPy's BLAS runs each product on every core)")
    ap.add_argument("--compare_workers", type=COUNT, default=None, metavar="N",
                    help=f"also time the step with its batch split over N threads, alternately with the other: {COUNT} "
                         "(1 against the default: splitting the batch against BLAS on every core)")
    args = ap.parse_args(argv)
    keep_freed_memory()
    try:
        run(args)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:  # it writes nothing: nothing to clean up
        raise SystemExit(130) from None


def run(args):
    array_module(args.device)  # DeviceError: what to install for --device cuda
    if args.decode:
        run_decode(decode_models(args.decode_tokens, args.device), args.decode_tokens, args.device)
        return
    if args.sizes:
        print_sizes()
        return
    if args.all:  # each in a fresh process, so each peak memory is its own
        for name, flags in RUNS.items():
            print(f"== {name}", flush=True)
            argv = [f"--{k}={v}" for k, v in {**flags, "steps": args.steps, "min_seconds": args.min_seconds,
                                                  "device": args.device, "dropout": args.dropout,
                                                  "optimizer": args.optimizer}.items()]
            argv += ["--profile"] if args.profile else []
            argv += [f"--{k}={v}" for k, v in (("workers", args.workers), ("compare_workers", args.compare_workers))
                     if v is not None]
            subprocess.run([sys.executable, os.path.abspath(__file__), *argv], check=True)
        return
    try:
        cfg = ModelConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_heads=args.n_heads, d_ff=args.d_ff,
                          n_layers=args.n_layers, max_seq_len=args.seq_len, arch=args.arch, n_kv_heads=args.n_kv_heads,
                          activation=args.activation, qk_norm=args.qk_norm, logit_softcap=args.logit_softcap)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.profile:
        result = profile(cfg, args.batch_size, args.seq_len, steps=args.steps, min_seconds=args.min_seconds,
                         device=args.device, dropout=args.dropout, optimizer=args.optimizer, workers=args.workers)
        report_profile(cfg, args.batch_size, args.seq_len, result)
        return
    result = bench(cfg, args.batch_size, args.seq_len, steps=args.steps, min_seconds=args.min_seconds,
                   device=args.device, dropout=args.dropout, optimizer=args.optimizer, workers=args.workers,
                   compare_workers=args.compare_workers)
    name = "model" if args.optimizer == "adamw" else f"model with {args.optimizer}"
    report(name, cfg, args.batch_size, args.seq_len, result)


if __name__ == "__main__":
    main()
