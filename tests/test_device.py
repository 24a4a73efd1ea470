"""The seam between NumPy and CuPy (device.py): the whole-array path against the CPU's blocked one,
--device errors, and, where CuPy and a GPU exist, the GPU against NumPy."""
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import device
import fake_cupy
from device import array_module, scatter_add, whole_array_mode, whole_arrays
from errors import DeviceError
from config import ModelConfig
from language_model import LanguageModel
from loss import IGNORE_INDEX, count_targets
from optimizer import AdamW, clip_grad_norm

ROOT = Path(__file__).resolve().parent.parent
# big enough that the CPU path really cuts its work: 3 GELU blocks (d_ff 256), 2 head chunks of
# 512 rows (B*T = 640), 2 softmax blocks per chunk (vocab 600), a 2-worker split
CFG = ModelConfig(vocab_size=600, d_model=32, n_heads=4, d_ff=256, n_layers=2, max_seq_len=80)
# the Llama block at the same sizes, grouped-query (2 query heads a key/value head): its SwiGLU rows of 640 in
# blocks of 102 on the CPU
LLAMA_CFG = ModelConfig(vocab_size=600, d_model=32, n_heads=4, n_kv_heads=2, d_ff=96, n_layers=2, max_seq_len=80,
                        arch="llama")
BOTH = pytest.mark.parametrize("cfg", [CFG, LLAMA_CFG], ids=["gpt2", "llama"])
# both blocks with QK-norm and soft-capped logits
OPTIONS = [replace(CFG, qk_norm=True, logit_softcap=10.0), replace(LLAMA_CFG, qk_norm=True, logit_softcap=10.0)]
WITH_OPTIONS = pytest.mark.parametrize("cfg", [CFG, LLAMA_CFG, *OPTIONS],
                                      ids=["gpt2", "llama", "gpt2-qk_norm-softcap", "llama-qk_norm-softcap"])


def cupy_gpu():
    """The cupy module where CuPy can run on a GPU here, else None."""
    try:
        return array_module("cuda")
    except DeviceError:
        return None


def batch(seed=0, B=8, T=80, V=600):
    tokens = np.random.default_rng(seed).integers(0, V, (B, T + 1))
    idx, targets = tokens[:, :-1], tokens[:, 1:].copy()
    targets[1, :7] = IGNORE_INDEX
    return idx, targets


def max_rel_diff(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@WITH_OPTIONS
@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-6), (np.float64, 1e-12)])
def test_whole_arrays_give_what_blocks_and_workers_give(dtype, tol, cfg):
    idx, targets = batch()
    n = count_targets(targets)
    blocked = LanguageModel(cfg, seed=1, dtype=dtype, workers=2)
    loss_b, correct_b = blocked.forward_backward(idx, targets, n)
    whole = LanguageModel(cfg, seed=1, dtype=dtype, workers=2)
    with whole_array_mode():
        loss_w, correct_w = whole.forward_backward(idx, targets, n)
        evaluated = whole.evaluate(idx, targets)
    # the same kind of result either way: 0-d arrays of the model's array module
    for v in (loss_b, correct_b, loss_w, correct_w):
        assert type(v) is np.ndarray and v.ndim == 0
    assert loss_w == pytest.approx(loss_b, rel=tol) and correct_w == correct_b
    for name in blocked.grads:
        assert max_rel_diff(whole.grads[name], blocked.grads[name]) < 10 * tol, name
    loss_sum, n_correct = blocked.evaluate(idx, targets)
    assert evaluated[1] == n_correct and evaluated[0] == pytest.approx(loss_sum, rel=tol)


def test_a_training_step_on_whole_arrays_matches_the_blocked_one():
    idx, targets = batch(1)
    models = {}
    for path in ("blocked", "whole arrays"):
        with whole_array_mode(path == "whole arrays"):
            model = LanguageModel(CFG, seed=2, workers=2)
            opt = AdamW(model.params, weight_decay=0.1)
            for _ in range(2):
                model.zero_grad()
                model.forward_backward(idx, targets, count_targets(targets))
                norm = clip_grad_norm(model.grads, 0.5)
                opt.step(model.grads, lr=1e-3)
            models[path] = (model, norm)
    (blocked, norm_b), (whole, norm_w) = models.values()
    assert norm_w == pytest.approx(norm_b, rel=1e-5)
    # two steps of Adam move each weight by about 2e-3: compare the moves, not the weights
    init = LanguageModel(CFG, seed=2).params
    for name in init:
        move_b, move_w = blocked.params[name] - init[name], whole.params[name] - init[name]
        assert max_rel_diff(move_w, move_b) < 1e-3, name


def test_the_whole_array_path_is_chosen_by_the_setting_or_the_array():
    a = np.zeros(3)
    assert not whole_arrays(a)
    with whole_array_mode():
        assert whole_arrays(a)
        with whole_array_mode(False):
            assert not whole_arrays(a)
        assert whole_arrays(a)
    assert not whole_arrays(a)


def test_scatter_add_counts_every_repeated_index():
    table = np.zeros((4, 2))
    scatter_add(table, np.array([1, 3, 1, 1]), np.arange(8.0).reshape(4, 2))
    np.testing.assert_array_equal(table, [[0, 0], [0 + 4 + 6, 1 + 5 + 7], [0, 0], [2, 3]])


def test_host_copies_and_cpu_helpers():
    a = np.arange(3)
    assert device.to_host(a) is a and device.to_device(a, np) is a
    assert array_module("cpu") is np and device.gpu_memory(np) is None
    device.synchronize(np)  # nothing to wait for
    with pytest.raises(DeviceError, match="cpu or cuda"):
        array_module("tpu")


@pytest.mark.skipif(cupy_gpu() is not None, reason="CuPy runs here: nothing is missing")
def test_cuda_without_cupy_or_gpu_says_what_to_install():
    with pytest.raises(DeviceError, match="pip install cupy-cuda12x") as e:
        array_module("cuda")
    assert "\n" not in str(e.value)


def test_cuda_with_a_broken_cupy_says_so_in_one_line(monkeypatch):
    class Broken:  # what `import cupy` meets when its CUDA libraries do not load
        def find_spec(self, name, path=None, target=None):
            if name == "cupy":
                raise ImportError("libcublas.so.12: cannot open shared object file\nmore detail")
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken()] + sys.meta_path)
    with pytest.raises(DeviceError, match="installed but cannot load .libcublas.so.12: cannot open shared object "
                                          r"file.; pip install cupy-cuda12x") as e:
        array_module("cuda")
    assert "\n" not in str(e.value)


def test_cuda_with_cupy_but_no_gpu_says_what_to_check(monkeypatch):
    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(DeviceError, match="no CUDA-capable device.*nvidia-smi.*cupy-cuda12x") as e:
        array_module("cuda")
    assert "\n" not in str(e.value)


def test_cuda_makes_the_gpu_it_is_given_current():
    """require's gpu(n): under MPI the rank's own GPU (distributed.World.gpu), of the n that CUDA shows."""
    with fake_cupy.installed(gpus=3) as cupy:
        shown = []
        assert array_module("cuda", gpu=lambda n: shown.append(n) or 2) is cupy
        assert shown == [3] and cupy.cuda.Device().id == 2
        assert device.gpu_name(cupy) == "GPU 2 (0000:03:00.0)" and device.gpu_name(np) is None
        array_module("cuda")  # (as LanguageModel calls it) keeps the current one
        assert cupy.cuda.Device().id == 2
        with pytest.raises(DeviceError, match="CuPy cannot use an NVIDIA GPU here .cudaErrorInvalidDevice") as e:
            array_module("cuda", gpu=lambda n: n)
        assert "\n" not in str(e.value)


@pytest.mark.skipif(cupy_gpu() is not None, reason="CuPy runs here: --device cuda would train")
@pytest.mark.parametrize("script, args", [
    ("train.py", ["--train_data", "data/sample/train_tokenized.jsonl", "--max_steps", "1"]),
    ("generate.py", ["--benchmark", "--benchmark_tokens", "8"]),
    ("benchmark.py", ["--d_model", "16", "--n_heads", "2", "--d_ff", "32", "--vocab_size", "50"]),
])
def test_device_cuda_without_a_gpu_exits_with_one_line(script, args, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / script), *args, "--device", "cuda"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cupy-cuda12x" in lines[0], proc.stderr


# ------------------------------------------------ the GPU path's plumbing, with a NumPy stand-in for CuPy

@BOTH
def test_a_gpu_step_reads_one_value_back_and_computes_what_numpy_does(cfg):
    """With fake_cupy every array of the model is a "device" array that refuses host arrays and
    counts host reads. A training step reads one value (the gradient norm), copies nothing back,
    and computes what NumPy computes on the whole-array path: up to rounding, since the stand-in
    adds the embedding gradient's repeated rows in a shuffled order, as a GPU's atomics do."""
    idx, targets = batch(3)
    n = count_targets(targets)
    with whole_array_mode():
        cpu = LanguageModel(cfg, seed=4)
        opt_cpu = AdamW(cpu.params, weight_decay=0.1)
        cpu.zero_grad()
        loss_cpu, correct_cpu = cpu.forward_backward(idx, targets, n)
        norm_cpu = clip_grad_norm(cpu.grads, 0.5)
        opt_cpu.step(cpu.grads, lr=1e-3)
        evaluated_cpu = cpu.evaluate(idx, targets)
    with fake_cupy.installed() as cupy:
        gpu = LanguageModel(cfg, seed=4, device="cuda")
        assert isinstance(gpu.params.flat, cupy.ndarray) and gpu.xp is cupy
        assert not isinstance(gpu.params.flat, np.ndarray)
        opt = AdamW(gpu.params, weight_decay=0.1)
        syncs, copies = fake_cupy.counts.syncs, fake_cupy.counts.host_copies
        gpu.zero_grad()
        loss, correct = gpu.forward_backward(idx, targets, n)
        assert fake_cupy.counts.syncs == syncs  # the loss and accuracy stay on the device
        assert isinstance(loss, cupy.ndarray) and loss.ndim == 0 and isinstance(correct, cupy.ndarray)
        norm = clip_grad_norm(gpu.grads, 0.5)
        opt.step(gpu.grads, lr=1e-3)
        assert fake_cupy.counts.syncs == syncs + 1  # the gradient norm, read once
        assert fake_cupy.counts.host_copies == copies
        assert float(loss) == pytest.approx(float(loss_cpu), rel=1e-6) and int(correct) == int(correct_cpu)
        assert norm == pytest.approx(norm_cpu, rel=1e-6)
        # one step of Adam moves each weight by about 1e-3: compare the moves, not the weights
        init = LanguageModel(cfg, seed=4).params.flat
        assert max_rel_diff(device.to_host(gpu.params.flat) - init, cpu.params.flat - init) < 1e-3
        state = opt.state_dict()  # host arrays, for the checkpoint
        assert all(type(v) is np.ndarray for v in state.values())
        assert max_rel_diff(state["v/wte"], opt_cpu.state_dict()["v/wte"]) < 1e-5
        loss_sum, n_correct = gpu.evaluate(idx, targets)
        assert float(loss_sum) == pytest.approx(float(evaluated_cpu[0]), rel=1e-6)
        assert int(n_correct) == int(evaluated_cpu[1])
        assert all(type(v) is np.ndarray for v in gpu.host_params().values())


@pytest.mark.parametrize("cfg", OPTIONS, ids=["gpt2", "llama"])
def test_qk_norm_and_the_soft_cap_on_device_arrays_compute_what_numpy_does_without_reading_back(cfg):
    """QK-norm and soft-capped logits on fake_cupy's device arrays, the embedding gradient added in NumPy's
    order (the shuffled order's rounding, amplified where a sum cancels, is what the test above allows for):
    a step's loss, accuracy and gradients and generation's logits are bit for bit the whole-array NumPy
    ones, and nothing is read back."""
    idx, targets = batch(3)
    n = count_targets(targets)
    with whole_array_mode():
        cpu = LanguageModel(cfg, seed=4)
        cpu.zero_grad()
        loss_cpu, correct_cpu = cpu.forward_backward(idx, targets, n)
        logits_cpu = cpu.forward(idx[:1, :10])
    with fake_cupy.installed(shuffle_scatter=False):
        gpu = LanguageModel(cfg, seed=4, device="cuda")
        syncs = fake_cupy.counts.syncs
        gpu.zero_grad()
        loss, correct = gpu.forward_backward(idx, targets, n)
        logits = gpu.forward(idx[:1, :10])
        assert fake_cupy.counts.syncs == syncs
        assert float(loss) == float(loss_cpu) and int(correct) == int(correct_cpu)
        np.testing.assert_array_equal(device.to_host(gpu.grads.flat), cpu.grads.flat)
        np.testing.assert_array_equal(device.to_host(logits), logits_cpu)


def test_gpu_evaluation_reads_its_sums_back_once_at_the_end(tmp_path):
    """Summed batch after batch on the device: the loss sum and the count of correct predictions are
    read back once each, however many batches, and give what NumPy gives."""
    import evaluation
    from data_loader import eval_batches, load_dataset
    from helpers import write_data
    val = load_dataset(write_data(tmp_path / "valid.jsonl", 60, seed=2), vocab_size=64)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_heads=2, d_ff=32, n_layers=1, max_seq_len=16)
    with whole_array_mode():
        expected = evaluation.evaluate(LanguageModel(cfg, seed=1), val, 4, 16)
    assert len(list(eval_batches(val, 4, 16))) > 10
    with fake_cupy.installed():
        gpu = LanguageModel(cfg, seed=1, device="cuda", for_training=False)
        before = fake_cupy.counts.syncs
        res = evaluation.evaluate(gpu, val, 4, 16)
        assert fake_cupy.counts.syncs - before == 2
    assert res == expected


@pytest.mark.parametrize("cupy_version", [13, 14])
def test_the_loss_runs_on_cupy_13_and_14(cupy_version):
    """CuPy 13's matmul refuses a 1-D `out` (the row sums of the softmax were one); CuPy 14 takes it."""
    from loss import softmax_cross_entropy_inplace
    rng = np.random.default_rng(6)
    logits, targets = rng.standard_normal((12, 50), dtype=np.float32), rng.integers(0, 50, 12)
    targets[3] = IGNORE_INDEX
    with whole_array_mode():
        expected = softmax_cross_entropy_inplace(logits.copy(), targets, grad_scale=1 / 11)
    with fake_cupy.installed(cupy_version=cupy_version) as cupy:
        on_gpu = cupy.asarray(logits)
        loss_sum, n_correct, row_scale = softmax_cross_entropy_inplace(on_gpu, cupy.asarray(targets), 1 / 11)
        assert float(loss_sum) == pytest.approx(expected[0], rel=1e-6) and int(n_correct) == expected[1]
        np.testing.assert_allclose(cupy.asnumpy(row_scale), expected[2], rtol=1e-6)


@BOTH
def test_gpu_products_with_a_weight_are_single_gemms(cfg):
    """CuPy runs an N-D product such as (B, T, C) @ (C, K) as B small GEMMs through an array of
    pointers, after copying a transposed weight (w.T) into a contiguous one. Every product of a
    training step with a weight is one 2-D GEMM over the rows instead, which reads w.T as it is."""
    idx, targets = batch(5)
    with fake_cupy.installed():
        gpu = LanguageModel(cfg, seed=4, device="cuda")
        gpu.zero_grad()
        gpu.forward_backward(idx, targets, count_targets(targets))
        assert fake_cupy.counts.batched_matmuls == 0
        assert [shape for shape in fake_cupy.counts.operand_copies if len(shape) == 2] == []  # only the heads' 4-D views


@pytest.mark.parametrize("arch", [{}, dict(arch="llama", n_heads=4, n_kv_heads=1)], ids=["gpt2", "llama"])
def test_gpu_generation_copies_one_row_of_logits_per_token(arch):
    from decoding import Decoder, generate
    cfg = ModelConfig(**{**dict(vocab_size=61, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=12), **arch})
    with whole_array_mode():
        cpu = LanguageModel(cfg, seed=5, dtype=np.float64)
        expected = list(generate(cpu, [1, 2], 20, np.random.default_rng(0), temperature=0.8))
    with fake_cupy.installed() as cupy:
        gpu = LanguageModel(cfg, params=cpu.params, device="cuda")
        assert isinstance(gpu.new_kv_cache(1).k[0], cupy.ndarray)
        logits = Decoder(gpu).feed([1, 2])
        assert type(logits) is np.ndarray and logits.shape == (61,)
        copies = fake_cupy.counts.host_copies
        assert list(generate(gpu, [1, 2], 20, np.random.default_rng(0), temperature=0.8)) == expected
        assert fake_cupy.counts.host_copies - copies == 20  # the prompt's logits, then one row per new token
        # no product copies the (V, C) token table (as CuPy does for h @ w_out.T on 3-D h) or runs as a batch
        assert (cfg.d_model, cfg.vocab_size) not in fake_cupy.counts.operand_copies
        assert fake_cupy.counts.batched_matmuls == 0
        back = LanguageModel(cfg, params=gpu.params)  # and back to the host
        assert type(back.params.flat) is np.ndarray
        np.testing.assert_array_equal(back.params.flat, cpu.params.flat)


def test_train_on_the_gpu_resume_on_either_device(tmp_path, capsys):
    """Checkpoints are host files: a GPU run's checkpoint resumes on the CPU and on the GPU to the
    weights of the GPU run itself, up to rounding (the stand-in's scatter-add has no fixed order)."""
    import train
    from checkpoint import load_checkpoint
    from helpers import tiny_flags, write_data
    data = write_data(tmp_path / "train.jsonl", 100, seed=1), write_data(tmp_path / "valid.jsonl", 20, seed=2)

    def run(save_dir, **flags):
        assert train.main(tiny_flags(data, str(tmp_path / save_dir), max_steps=12, save_interval=6, log_interval=4,
                                     eval_interval=6, no_progress=True, **flags)) == 0
        return load_checkpoint(str(tmp_path / save_dir / "checkpoint_final.npz")).params

    with fake_cupy.installed():
        on_gpu = run("gpu", device="cuda")
        half = str(tmp_path / "gpu" / "checkpoint_step_6.npz")
        resumed_gpu = run("gpu", device="cuda", resume=half)
    with whole_array_mode():
        resumed_cpu = run("gpu", resume=half)
    at_half = load_checkpoint(half).params
    for name in on_gpu:  # the 6 steps' moves agree; a state lost on resume would change them by far more
        move = on_gpu[name] - at_half[name]
        assert max_rel_diff(resumed_gpu[name] - at_half[name], move) < 1e-3, name
        assert max_rel_diff(resumed_cpu[name] - at_half[name], move) < 1e-3, name
    assert "val loss" in capsys.readouterr().out


def test_benchmark_on_the_gpu_prints_milliseconds_and_gpu_memory(capsys):
    import benchmark
    with fake_cupy.installed():
        benchmark.main(["--vocab_size", "64", "--d_model", "16", "--n_heads", "2", "--d_ff", "32", "--n_layers", "1",
                        "--batch_size", "2", "--seq_len", "8", "--steps", "1", "--min_seconds", "0", "--device", "cuda"])
    out = capsys.readouterr().out
    assert " ms " in out and "ratio" in out and "GPU memory 2 MB" in out


# ---------------------------------------------------------------------------- on a GPU, where there is one

needs_gpu = pytest.mark.skipif(cupy_gpu() is None, reason="needs CuPy and an NVIDIA GPU (pip install cupy-cuda12x)")


@needs_gpu
def test_gpu_first_step_loss_equals_numpys_for_the_small_model():
    cfg = ModelConfig(vocab_size=50257, d_model=128, n_heads=4, d_ff=512, n_layers=2, max_seq_len=128)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (32, 129))
    cpu = LanguageModel(cfg, seed=0)
    gpu = LanguageModel(cfg, seed=0, device="cuda")
    np.testing.assert_array_equal(device.to_host(gpu.params.flat), cpu.params.flat)  # drawn on the host
    loss_cpu, _ = cpu.forward_backward(tokens[:, :-1], tokens[:, 1:], 32 * 128)
    loss_gpu, _ = gpu.forward_backward(tokens[:, :-1], tokens[:, 1:], 32 * 128)
    assert not isinstance(loss_gpu, np.ndarray)  # still on the device
    assert float(loss_gpu) == pytest.approx(loss_cpu, rel=1e-5)
    assert clip_grad_norm(gpu.grads, 1.0) == pytest.approx(clip_grad_norm(cpu.grads, 1.0), rel=1e-4)


@needs_gpu
def test_gpu_generation_with_the_cache_matches_the_cpu():
    from decoding import Decoder
    cfg = ModelConfig(vocab_size=97, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_seq_len=24)
    cpu = LanguageModel(cfg, seed=3, dtype=np.float64)
    gpu = LanguageModel(cfg, params=cpu.params, device="cuda")
    for use_cache in (True, False):
        decoders = Decoder(cpu, use_cache), Decoder(gpu, use_cache)
        token = 5
        for _ in range(30):  # past max_seq_len: the window slides and the cache is rebuilt
            a, b = (d.feed([token]) for d in decoders)
            np.testing.assert_allclose(device.to_host(b), a, rtol=1e-9, atol=1e-12)
            token = int(np.argmax(a))
