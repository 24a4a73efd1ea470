"""Our training step side by side with PyTorch's, eager and torch.compile, in one run.

The same model (GPT-2's block or the Llama block, tied embeddings), the same batch of random tokens,
the same step (forward, backward, gradient clipping at 1.0, AdamW at lr 3e-4 with decay on the matrices
only), from the same initial weights (ours, copied into PyTorch), on the same number of threads. The
three take turns, round after round (ours, eager, compiled, ours, ...), each timed right after an
untimed step of its own (benchmark.time_alternately), so a busy machine slows them alike. Prints the
machine (CPU model, AVX2/AVX-512, versions), each one's step time in every round and their medians,
and the ratios eager / ours and compile / ours.

    python3 scripts/torch_compare.py                       # the guide's Small model (benchmark.py's default)
    python3 scripts/torch_compare.py --preset medium
    python3 scripts/torch_compare.py --preset laptop       # the Llama block, vocabulary 4,096
    python3 scripts/torch_compare.py --arch llama --rounds 9
    python3 scripts/torch_compare.py --preset small --check   # only check: PyTorch's model computes ours

--check copies our initial weights into the PyTorch model and asserts, for one batch in float32, that
the loss agrees to 1e-4 (relative), every gradient to 1e-3 (relative to its norm), and the loss after
one step too: the comparison then times the same model.

Needs PyTorch, which the rest of the repository never does; its CPU wheel is the small one:

    pip install torch --index-url https://download.pytorch.org/whl/cpu

Without it the script says so in one line and exits 0. torch.compile also needs a C++ compiler (g++);
where it fails, the script says why and times ours and eager only.
"""
import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmark import add_model_flags, fixed_batch_step, median_time, time_alternately  # noqa: E402
from config import ARCHS, LN_EPS  # noqa: E402
from embeddings import sinusoidal_positions  # noqa: E402
from flag_types import COUNT, COUNT_OR_ZERO, Parser  # noqa: E402
from llama import rope_angles  # noqa: E402
from loss import count_targets  # noqa: E402
from optimizer import decay_mask  # noqa: E402
from parallel import blas_controller  # noqa: E402
from train_flags import config_from_flags, take_preset  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
    Module = nn.Module
except ImportError:  # main() says how to install it and exits 0; the classes below are then never made
    torch = None
    Module = object

INSTALL = ("torch_compare.py: PyTorch is not installed, nothing to compare with; to run it: "
           "pip install torch --index-url https://download.pytorch.org/whl/cpu")
LR, GRAD_CLIP, WEIGHT_DECAY, BETAS, EPS = 3e-4, 1.0, 0.01, (0.9, 0.999), 1e-8  # benchmark.fixed_batch_step's AdamW
LOSS_RTOL = 1e-4  # --check: float32 loss, ours against PyTorch's
GRAD_RTOL = 1e-3  # --check: each gradient's difference over its norm


# ----------------------------------------------------------------------------- the model in PyTorch
# Shapes: B batch, T sequence length, C d_model, V vocab_size, H heads, Hkv key/value heads, hs = C // H,
# F d_ff. Modules are named as our parameters (config.param_shapes), so that "h.0.attn.c_attn.weight" is
# the same matrix in both; nn.Linear keeps it as (out, in), ours is (in, out): load_our_weights transposes.

class GPT2Attention(Module):
    """GPT-2's causal self-attention: q, k, v from one biased product, softmax(q k^T / sqrt(hs)) v."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.d_model
        self.n_heads = cfg.n_heads
        self.c_attn = nn.Linear(C, 3 * C)  # columns [q | k | v], each head after head
        self.c_proj = nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)  # (B, T, C) each
        q, k, v = (a.view(B, T, self.n_heads, -1).transpose(1, 2) for a in (q, k, v))  # (B, H, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(hs), as ours
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # heads side by side: (B, T, C)


class GPT2MLP(Module):
    """C -> F -> C with GELU's tanh form between."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(Module):
    """Pre-norm: x + attn(ln_1(x)), then + mlp(ln_2(.)) (transformer.block_forward)."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def rotate(x, cos, sin):
    """x (B, n, T, hs) turned by its positions: dimension i paired with i + hs/2 (llama.py's convention,
    Hugging Face's rotate_half), cos and sin (T, hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class LlamaAttention(Module):
    """Causal self-attention with rotary positions, no biases, Hkv key/value heads for H query heads."""

    def __init__(self, cfg):
        super().__init__()
        C, H, Hkv = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
        hs = C // H
        self.sizes = (H * hs, Hkv * hs, Hkv * hs)  # c_attn's columns: [q heads | k heads | v heads]
        self.n_heads, self.n_kv_heads = H, Hkv
        self.c_attn = nn.Linear(C, sum(self.sizes), bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        cos, sin = rope_angles(0, cfg.max_seq_len, hs, cfg.rope_theta)  # ours: (T_max, hs/2) float32
        self.register_buffer("cos", torch.from_numpy(np.ascontiguousarray(cos)), persistent=False)
        self.register_buffer("sin", torch.from_numpy(np.ascontiguousarray(sin)), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.sizes, dim=-1)
        q = q.view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, H, T, hs)
        k, v = (a.view(B, T, self.n_kv_heads, -1).transpose(1, 2) for a in (k, v))  # (B, Hkv, T, hs)
        q, k = rotate(q, self.cos[:T], self.sin[:T]), rotate(k, self.cos[:T], self.sin[:T])
        if self.n_kv_heads < self.n_heads:  # query head j reads key/value head j // G
            G = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(Module):
    """(silu(x @ w_gate) * (x @ w_up)) @ w_down, c_fc's columns [gate | up]."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.c_proj(F.silu(gate) * up)


class LlamaBlock(Module):
    """Pre-norm with RMSNorm: x + attn(ln_1(x)), then + mlp(ln_2(.)) (llama.llama_block_forward)."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = LlamaAttention(cfg)
        self.ln_2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


TORCH_BLOCKS = {  # config.arch -> (block, final norm), as language_model.BLOCKS
    "gpt2": (GPT2Block, lambda cfg: nn.LayerNorm(cfg.d_model, eps=LN_EPS)),
    "llama": (LlamaBlock, lambda cfg: nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)),
}


class TorchLM(Module):
    """Our language model in PyTorch: wte[idx] (+ the fixed sinusoidal table for GPT-2's block), the
    blocks h, ln_f, the head tied to wte, the mean cross-entropy. forward(idx, targets) -> the loss."""

    def __init__(self, cfg):
        super().__init__()
        if not cfg.tie_embeddings or cfg.positions == "learned":
            raise ValueError("torch_compare.py's model has a tied head and no learned position table, as the "
                             "benchmark's flags make it")
        block, final_norm = TORCH_BLOCKS[cfg.arch]
        self.wte = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))  # (V, C)
        table = None  # the Llama block turns q and k instead
        if cfg.positions == "sinusoidal":  # GPT-2's block: ours, (T_max, C), no gradient
            table = torch.from_numpy(sinusoidal_positions(cfg.max_seq_len, cfg.d_model))
        self.register_buffer("pos", table, persistent=False)
        self.h = nn.ModuleList([block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = final_norm(cfg)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = F.embedding(idx, self.wte)  # (B, T) -> (B, T, C)
        if self.pos is not None:
            x = x + self.pos[:T]
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte)  # (B, T, C) @ (C, V) -> (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def is_transposed(name, value):
    """Whether our parameter `name` is an nn.Linear weight in PyTorch, (out, in) where ours is (in, out)."""
    return name.startswith("h.") and value.ndim == 2


def load_our_weights(tmodel, params):
    """Copy our parameters {name: NumPy array} into the PyTorch model, in place."""
    own = dict(tmodel.named_parameters())
    if set(own) != set(params):
        raise ValueError(f"PyTorch's parameters {sorted(set(own) ^ set(params))[:4]} are not ours")
    with torch.no_grad():
        for name, value in params.items():
            value = value.T if is_transposed(name, value) else value
            own[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))


def torch_training_step(cfg, params, x, y, compile_it=False):
    """(model, forward, step) in PyTorch from our initial weights: step() runs what benchmark.fixed_batch_step's
    does (zero the gradients, forward, backward, clip the gradient norm, AdamW) on the batch (x, y); forward
    is the model, or torch.compile's wrapper of it (compiled at its first call)."""
    model = TorchLM(cfg)
    load_our_weights(model, params)
    decays = decay_mask(params)  # ours: the matrices only, never the embeddings, biases or norms
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if decays[n]], "weight_decay": WEIGHT_DECAY},
              {"params": [p for n, p in named if not decays[n]], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    forward = torch.compile(model) if compile_it else model
    idx, targets = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = forward(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

    return model, lambda: forward(idx, targets), step


# ----------------------------------------------------------------------------- --check

def our_loss_and_grads(model, x, y):
    """Our loss on (x, y) and a copy of its gradients {name: array}."""
    model.zero_grad()
    loss_sum, _ = model.forward_backward(x, y, count_targets(y))
    return float(loss_sum) / count_targets(y), {name: g.copy() for name, g in model.grads.items()}


def relative_difference(theirs, ours):
    """|theirs - ours| / |ours| of two numbers, or of two arrays by their norms."""
    return float(np.linalg.norm(np.subtract(theirs, ours)) / max(float(np.linalg.norm(ours)), 1e-30))


def check_close(what, theirs, ours, rtol):
    """SystemExit (one line) unless theirs is within rtol of ours (relative_difference); returns the difference."""
    diff = relative_difference(theirs, ours)
    if not diff <= rtol:
        raise SystemExit(f"error: --check failed: {what} differs from ours by {diff:.1e} (relative), more than "
                         f"{rtol:g}: PyTorch's model does not compute ours")
    return diff


def check(name, cfg, params, our_before, our_after, x, y, compile_it):
    """Assert that PyTorch's model (eager or compiled) computes ours: loss and gradients on (x, y) from our
    initial weights, and the loss after one step (our_before: (loss, grads), our_after: the loss of ours)."""
    model, loss_of, step = torch_training_step(cfg, params, x, y, compile_it)
    loss = loss_of()
    loss.backward()
    loss_diff = check_close(f"{name}'s loss {loss.item():.7g} (ours {our_before[0]:.7g})", loss.item(),
                            our_before[0], LOSS_RTOL)
    worst = 0.0
    for pname, p in model.named_parameters():
        grad = p.grad.numpy()
        grad = grad.T if is_transposed(pname, grad) else grad
        worst = max(worst, check_close(f"{name}'s gradient of {pname}", grad, our_before[1][pname], GRAD_RTOL))
    step()
    after = loss_of().item()
    after_diff = check_close(f"{name}'s loss after one step {after:.7g} (ours {our_after:.7g})", after, our_after,
                             LOSS_RTOL)
    print(f"  {name}: loss {loss.item():.6f} (ours {our_before[0]:.6f}, relative difference {loss_diff:.1e}); "
          f"gradients within {worst:.1e} of ours; after one step {after_diff:.1e}: the same model", flush=True)


def run_check(cfg, model, step, x, y, compile_it):
    params = {name: p.copy() for name, p in model.params.items()}  # the initial weights, before our step
    before = our_loss_and_grads(model, x, y)
    step()
    after = float(model.evaluate(x, y)[0]) / count_targets(y)
    print(f"--check, float32, one batch of {x.shape[0]} x {x.shape[1]} tokens from our initial weights:")
    check("PyTorch eager", cfg, params, before, after, x, y, compile_it=False)
    if compile_it:
        check("torch.compile", cfg, params, before, after, x, y, compile_it=True)


# ----------------------------------------------------------------------------- the comparison

def machine():
    """One line: the CPU model and the flags of its float32 kernels, cores, NumPy's BLAS, PyTorch."""
    name, flags = platform.processor() or platform.machine(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the model from platform, the flags unknown
        pass
    vector = "CPU flags unknown" if flags is None else \
        ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in ("avx2", "avx512f"))
    blas = ", ".join(f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')})"
                     for b in blas_controller().select(user_api="blas").info()) or "no BLAS found"
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    return (f"machine: {name} ({vector}), {os.cpu_count()} CPUs; NumPy {np.__version__} ({blas}); "
            f"PyTorch {torch.__version__} (CPU capability {capability})")


def seconds(t):
    return f"{t:.3f} s" if t >= 0.1 else f"{1e3 * t:.1f} ms"


def print_table(times, first_compiled):
    """The rounds' step times, their medians, and each one's median over ours."""
    medians = {name: float(np.median(ts)) for name, ts in times.items()}
    rounds = len(times["ours"])
    print("| per step | median | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " | / ours |")
    print("|---" * (rounds + 3) + "|")
    for name, ts in times.items():
        print(f"| {name} | {seconds(medians[name])} | " + " | ".join(seconds(t) for t in ts) +
              f" | {medians[name] / medians['ours']:.2f} |")
    ratios = [f"{label} / ours {medians[name] / medians['ours']:.2f}"
              for name, label in (("PyTorch eager", "eager"), ("torch.compile", "compile")) if name in medians]
    print(", ".join(ratios))
    if first_compiled is not None:
        print(f"torch.compile's first step (compiling the forward and backward): {seconds(first_compiled)}")


def compare(cfg, model, step, x, y, rounds, warmup, compile_it):
    params = {name: p.copy() for name, p in model.params.items()}  # our initial weights, for PyTorch
    timed = {"ours": step, "PyTorch eager": torch_training_step(cfg, params, x, y)[2]}
    first_compiled = None
    if compile_it:
        compiled = torch_training_step(cfg, params, x, y, compile_it=True)[2]
        try:
            first_compiled = median_time(compiled, 1)
            timed["torch.compile"] = compiled
        except Exception as e:  # noqa: BLE001  (no C++ compiler, an inductor bug: say so, time the others)
            print(f"torch.compile failed here ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "timing ours and eager only", flush=True)
    for _ in range(warmup):
        for fn in timed.values():
            fn()
    print(f"{rounds} rounds, each: {', '.join(timed)} in turn, each timed after an untimed step of its own",
          flush=True)
    print_table(time_alternately(timed, rounds), first_compiled)


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("tiny", "small", "medium", "large", "laptop"), default=None,
                    help="a guide's model and its batch (train.py's --preset); model flags given win")
    add_model_flags(ap)
    ap.add_argument("--rounds", type=COUNT, default=5,
                    help=f"rounds of one timed step of each; the median is reported: {COUNT} (default 5)")
    ap.add_argument("--warmup", type=COUNT_OR_ZERO, default=2,
                    help=f"untimed steps of each before the rounds: {COUNT_OR_ZERO} (default 2)")
    ap.add_argument("--no_compile", action="store_true",
                    help="leave torch.compile out (eager only): a machine without a C++ compiler, or a quick look")
    ap.add_argument("--check", action="store_true",
                    help="only check that PyTorch's model computes ours (loss, gradients, one step) and exit")
    return take_preset(ap, argv, ap.parse_args(argv))  # the preset's model and batch, under the flags given


def main(argv=None):
    args = parse_args(argv)
    if torch is None:
        print(INSTALL)
        return 0
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process (tests call main more than once)
        pass
    try:
        cfg = config_from_flags(vars(args))
    except ValueError as e:
        raise SystemExit(f"error: the model flags: {e}") from None
    default = ARCHS[cfg.arch].activations[0]
    if cfg.activation != default:
        raise SystemExit(f"error: --activation {cfg.activation}: the PyTorch model here has the {cfg.arch} block's own "
                         f"feed-forward only ({default}); leave --activation out")
    model, step, (x, y) = fixed_batch_step(cfg, args.batch_size, args.seq_len)
    torch.set_num_threads(model.workers)  # as many threads as our step splits the batch over
    print(machine())
    print(f"model: {cfg.describe()}; batch {args.batch_size} x {args.seq_len} tokens, vocabulary {cfg.vocab_size}, "
          f"{model.num_parameters():,} parameters, float32")
    print(f"threads: ours {model.workers} (the batch split over the cores), PyTorch {torch.get_num_threads()}",
          flush=True)
    if args.check:
        run_check(cfg, model, step, x, y, compile_it=not args.no_compile)
    else:
        compare(cfg, model, step, x, y, args.rounds, args.warmup, compile_it=not args.no_compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
