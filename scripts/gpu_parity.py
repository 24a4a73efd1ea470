"""The GPU's first training step against NumPy's, for the guide's Small and Medium models (and Small with
the Llama block, small-llama): the same
weights (drawn on the host), the same batch of random tokens; the loss of the first forward_backward
and the gradient norm must agree to --tol (default 1e-5) relative. One line per model, exit 1 if
any differs more (scripts/gpu_check.sh runs it).

    python3 scripts/gpu_parity.py                 # small and medium
    python3 scripts/gpu_parity.py small --tol 1e-6
    python3 scripts/gpu_parity.py small-llama
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import device  # noqa: E402
from benchmark import RUNS  # noqa: E402
from config import GPT2_VOCAB_SIZE  # noqa: E402
from train_flags import config_from_flags  # noqa: E402
from errors import DeviceError  # noqa: E402
from flag_types import TOLERANCE, Parser  # noqa: E402
from language_model import LanguageModel  # noqa: E402
from loss import count_targets  # noqa: E402
from optimizer import global_grad_norm  # noqa: E402

MODELS = ("small", "medium")  # the guide's sizes with their batches (train_flags.PRESETS), checked by default
MORE = ("small-llama",)  # benchmark.py's Small with --arch llama


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def check(name, tol):
    """Print one line for the model `name`; True when the loss and the norm agree to tol."""
    preset = RUNS[name]
    cfg = config_from_flags(dict(preset, vocab_size=GPT2_VOCAB_SIZE))
    B, T = preset["batch_size"], preset["seq_len"]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    n = count_targets(y)
    cpu = LanguageModel(cfg, seed=0)
    gpu = LanguageModel(cfg, seed=0, device="cuda")
    same_init = np.array_equal(device.to_host(gpu.params.flat), cpu.params.flat)
    cpu.zero_grad()
    loss_cpu = float(cpu.forward_backward(x, y, n)[0]) / n
    t0 = time.perf_counter()
    gpu.zero_grad()
    loss_gpu, _ = gpu.forward_backward(x, y, n)
    norm_gpu = global_grad_norm(gpu.grads)  # reading it waits for the GPU
    seconds = time.perf_counter() - t0  # the first step: kernel compiles included
    loss_gpu, norm_cpu = float(loss_gpu) / n, global_grad_norm(cpu.grads)
    worst, worst_rel = None, 0.0
    for key, g in cpu.grads.items():  # the tensor whose gradient differs most, for a failing run
        d = float(np.abs(device.to_host(gpu.grads[key]) - g).max() / max(float(np.abs(g).max()), 1e-30))
        if d >= worst_rel:
            worst, worst_rel = key, d
    memory = device.gpu_memory(gpu.xp)
    ok = same_init and rel(loss_gpu, loss_cpu) <= tol and rel(norm_gpu, norm_cpu) <= tol
    print(f"{name}: {'ok' if ok else 'FAILED'} loss rel {rel(loss_gpu, loss_cpu):.1e} "
          f"(cpu {loss_cpu:.7f}, gpu {loss_gpu:.7f}), grad norm rel {rel(norm_gpu, norm_cpu):.1e} "
          f"(cpu {norm_cpu:.7f}, gpu {norm_gpu:.7f}), tol {tol:g}; same init {same_init}; worst gradient "
          f"{worst} {worst_rel:.1e} of its max; first GPU step {seconds:.2f} s; "
          f"GPU pool {memory[0] >> 20} MB used, {memory[1] >> 20} MB held", flush=True)
    return ok


def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="small or medium, the guide's models (default: both), or small-llama")
    p.add_argument("--tol", type=TOLERANCE, default=1e-5,
                   help=f"largest relative difference allowed, {TOLERANCE} (default 1e-5)")
    args = p.parse_args(argv)
    for name in args.models:
        if name not in MODELS + MORE:
            p.error(f"unknown model {name!r}: choose from {', '.join(MODELS + MORE)}")
    try:
        device.array_module("cuda")
    except DeviceError as e:
        sys.exit(f"gpu_parity.py: {e}")
    results = [check(name, args.tol) for name in args.models or MODELS]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
