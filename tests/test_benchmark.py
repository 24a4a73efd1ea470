"""benchmark.py times the matrix products a step cannot avoid: check it counts exactly those, that its
figures follow from its timings, and what it prints."""
import numpy as np
import pytest

import benchmark
from config import ModelConfig
from language_model import LanguageModel

CFG = ModelConfig(vocab_size=64, d_model=16, n_heads=2, d_ff=32, n_layers=1, max_seq_len=8)


def test_matmuls_only_has_the_step_flop_count():
    B, T, C, H, F, L, V = 4, 16, 32, 4, 64, 3, 100
    cfg = ModelConfig(vocab_size=V, d_model=C, n_heads=H, d_ff=F, n_layers=L, max_seq_len=T)
    N, hs = B * T, C // H
    forward_per_layer = 2 * N * (C * 3 * C + C * C + C * F + F * C) + 2 * 2 * B * H * T * T * hs
    expected = 3 * forward_per_layer * L + 3 * 2 * N * C * V  # backward is twice the forward's products
    assert benchmark.MatmulsOnly(cfg, B, T).flops == expected


def test_matmuls_only_runs_every_product_into_its_output():
    mm = benchmark.MatmulsOnly(CFG, 2, 8, dtype=np.float64)
    for a, b, out in mm.products:
        out.fill(np.nan)
    mm.run()
    a, b, out = mm.products[-1]  # outputs are shared by products of one shape: the last one written stays
    np.testing.assert_allclose(out, a @ b)
    assert all(np.isfinite(out).all() for _, _, out in mm.products)


def test_bench_figures_follow_from_its_timings():
    B, T = 2, 8
    r = benchmark.bench(CFG, B, T, steps=2, warmup=1)
    assert r["step_s"] > 0 and r["matmul_s"] > 0
    assert r["ratio"] == pytest.approx(r["step_s"] / r["matmul_s"])
    assert r["tokens_per_s"] == pytest.approx(B * T / r["step_s"])
    assert r["gflops"] == pytest.approx(benchmark.MatmulsOnly(CFG, B, T).flops / r["matmul_s"] / 1e9)
    assert r["params"] == LanguageModel(CFG, for_training=False).num_parameters()
    assert r["gpu_mb"] is None and r["peak_mb"] > 0
    # the machine's peak, timed in the same run: the step's share of it follows from the same flop count
    flops = benchmark.MatmulsOnly(CFG, B, T).flops
    assert r["peak_gflops"] > 0 and r["step_flops"] == flops
    assert r["step_share"] == pytest.approx(flops / r["step_s"] / 1e9 / r["peak_gflops"])
    assert r["matmul_share"] == pytest.approx(flops / r["matmul_s"] / 1e9 / r["peak_gflops"])
    assert benchmark.PeakMatmul(n=64).flops == 2 * 64 ** 3


def test_benchmark_prints_its_figures(monkeypatch, capsys):
    figures = dict(step_s=0.5, matmul_s=0.25, ratio=2.0, tokens_per_s=32.0, gflops=7.0, peak_mb=123.0,
                   params=4321, gpu_mb=None, step_flops=1.75e9, peak_gflops=10.0, step_share=0.35, matmul_share=0.7)
    monkeypatch.setattr(benchmark, "bench", lambda *args, **kwargs: figures)
    benchmark.main(["--vocab_size", "64", "--d_model", "16", "--n_heads", "2", "--d_ff", "32", "--n_layers", "1",
                    "--batch_size", "2", "--seq_len", "8"])
    assert capsys.readouterr().out.splitlines() == [
        "model: arch=gpt2 d_model=16 n_heads=2 d_ff=32 n_layers=1 vocab=64 batch=2 seq=8 params=4,321",
        "  step 0.500 s   matmuls alone 0.250 s (7 GFLOP/s)   ratio 2.00   32 tokens/s   peak memory 123 MB",
        "  2 GFLOP a step: the step runs at 35% of this machine's matmul peak, 10 GFLOP/s (a 2048^3 float32 "
        "product, timed in turn), its matrix products alone at 70%"]


def test_benchmark_runs_end_to_end(capsys):
    """A smoke test: the command line runs a real step and prints a line of figures."""
    benchmark.main(["--vocab_size", "64", "--d_model", "16", "--n_heads", "2", "--d_ff", "32", "--n_layers", "1",
                    "--batch_size", "2", "--seq_len", "8", "--steps", "1", "--min_seconds", "0"])
    out = capsys.readouterr().out
    assert "ratio" in out and "tokens/s" in out and "peak memory" in out


def test_benchmark_times_the_step_with_and_without_dropout(capsys):
    benchmark.main(["--vocab_size", "64", "--d_model", "16", "--n_heads", "2", "--d_ff", "32", "--n_layers", "1",
                    "--batch_size", "2", "--seq_len", "8", "--steps", "1", "--min_seconds", "0", "--dropout", "0.1"])
    out = capsys.readouterr().out
    assert "with dropout 0.1: step" in out and "% on the step without" in out


def test_benchmark_times_the_model_with_qk_norm_and_soft_capped_logits(monkeypatch, capsys):
    """--qk_norm and --logit_softcap reach the model benchmark.py times, and its line names them."""
    seen = {}

    def bench(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        return benchmark.bench.__wrapped__(cfg, *args, **kwargs)
    bench.__wrapped__ = benchmark.bench
    monkeypatch.setattr(benchmark, "bench", bench)
    benchmark.main(["--vocab_size", "64", "--d_model", "16", "--n_heads", "2", "--d_ff", "32", "--n_layers", "1",
                    "--batch_size", "2", "--seq_len", "8", "--steps", "1", "--min_seconds", "0",
                    "--qk_norm", "--logit_softcap", "30"])
    assert seen["cfg"].qk_norm is True and seen["cfg"].logit_softcap == 30.0
    assert "qk_norm logit_softcap=30 " in capsys.readouterr().out


def test_decode_benchmark_command_line(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--decode", "--decode_tokens", "0"])
    assert "--decode_tokens: must be an integer from 2 to" in capsys.readouterr().err


@pytest.mark.parametrize("activation, fc", [("swiglu", 2), ("relu2", 1)])
def test_matmuls_only_counts_the_llama_blocks_products(activation, fc):
    """Llama's fused q, k, v with fewer key/value heads, SwiGLU's (C, 2F) [gate | up] (relu2's (C, F)) and
    (F, C) down projection, no biases: the products a step with --arch llama makes."""
    B, T, C, H, Hkv, F, L, V = 4, 16, 32, 4, 2, 96, 3, 100
    cfg = ModelConfig(vocab_size=V, d_model=C, n_heads=H, n_kv_heads=Hkv, d_ff=F, n_layers=L, max_seq_len=T,
                      arch="llama", activation=activation)
    N, hs = B * T, C // H
    forward_per_layer = 2 * N * (C * (H + 2 * Hkv) * hs + C * C + C * fc * F + F * C) + 2 * 2 * B * H * T * T * hs
    assert benchmark.MatmulsOnly(cfg, B, T).flops == 3 * forward_per_layer * L + 3 * 2 * N * C * V
    assert "small-llama" in benchmark.RUNS and benchmark.config_from_flags(benchmark.RUNS["small-llama"]).d_ff == 384


def test_bench_times_the_step_split_two_ways():
    """--workers and --compare_workers: the step split over each number of threads, both timed in the run."""
    r = benchmark.bench(CFG, 4, 8, steps=2, warmup=1, workers=2, compare_workers=1)
    assert r["workers"] == 2 and r["compare_workers"] == 1
    assert r["step_s"] > 0 and r["compare_step_s"] > 0
    assert benchmark.bench(CFG, 4, 8, steps=1, warmup=1, workers=1)["workers"] == 1


def test_benchmark_prints_the_two_splits(monkeypatch, capsys):
    seen = {}
    figures = dict(step_s=0.5, matmul_s=0.25, ratio=2.0, tokens_per_s=32.0, gflops=7.0, peak_mb=123.0,
                   params=4321, gpu_mb=None, step_flops=1.75e9, peak_gflops=10.0, step_share=0.35, matmul_share=0.7,
                   workers=2, compare_workers=1, compare_step_s=0.8)

    def bench(*args, **kwargs):
        seen.update(kwargs)
        return figures

    monkeypatch.setattr(benchmark, "bench", bench)
    benchmark.main(["--vocab_size", "64", "--d_model", "16", "--n_heads", "2", "--d_ff", "32", "--n_layers", "1",
                    "--workers", "2", "--compare_workers", "1"])
    assert seen["workers"] == 2 and seen["compare_workers"] == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        "  the batch split over 2 thread(s): step 0.500 s; over 1: 0.800 s, 1.60 x the time over 2")
