"""benchmark.py times the matrix products a step cannot avoid: check it counts exactly those."""
import benchmark
from config import ModelConfig


def test_matmuls_only_has_the_step_flop_count():
    B, T, C, H, F, L, V = 4, 16, 32, 4, 64, 3, 100
    cfg = ModelConfig(vocab_size=V, d_model=C, n_heads=H, d_ff=F, n_layers=L, max_seq_len=T)
    N, hs = B * T, C // H
    forward_per_layer = 2 * N * (C * 3 * C + C * C + C * F + F * C) + 2 * 2 * B * H * T * T * hs
    expected = 3 * forward_per_layer * L + 3 * 2 * N * C * V  # backward is twice the forward's products
    assert benchmark.MatmulsOnly(cfg, B, T).flops == expected


def test_benchmark_prints_the_ratio(capsys):
    benchmark.main(["--vocab_size", "64", "--d_model", "16", "--n_heads", "2", "--d_ff", "32", "--n_layers", "1",
                    "--batch_size", "2", "--seq_len", "8", "--steps", "1", "--min_seconds", "0"])
    out = capsys.readouterr().out
    ratio = float(out.split("ratio")[1].split()[0])
    assert ratio > 0
    assert "tokens/s" in out and "peak memory" in out


def test_benchmark_times_the_step_with_and_without_dropout(capsys):
    benchmark.main(["--vocab_size", "64", "--d_model", "16", "--n_heads", "2", "--d_ff", "32", "--n_layers", "1",
                    "--batch_size", "2", "--seq_len", "8", "--steps", "1", "--min_seconds", "0", "--dropout", "0.1"])
    out = capsys.readouterr().out
    assert "with dropout 0.1: step" in out and "% on the step without" in out
