"""scripts/torch_compare.py: without PyTorch one line and exit 0; with it, its PyTorch model computes ours
(--check, both blocks), a check that a different model fails, and the table a comparison prints."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import torch_compare  # noqa: E402

TINY = ["--vocab_size", "64", "--d_model", "16", "--n_heads", "2", "--n_layers", "2", "--batch_size", "4",
        "--seq_len", "8"]
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.skipif(HAS_TORCH, reason="PyTorch is installed in this environment: the path without it cannot run")
def test_without_torch_it_says_how_to_install_it_and_exits_0():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "torch_compare.py"), *TINY],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [torch_compare.INSTALL]
    assert "pip install torch" in r.stdout and r.stderr == ""


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_check_the_torch_model_computes_ours(arch, capsys):
    pytest.importorskip("torch")
    kv = ["--n_heads", "4", "--n_kv_heads", "2"] if arch == "llama" else []  # grouped-query attention too
    assert torch_compare.main([*TINY, "--arch", arch, *kv, "--check", "--no_compile"]) == 0
    out = capsys.readouterr().out
    assert "PyTorch eager: loss" in out and "the same model" in out


def test_check_fails_when_the_models_differ(monkeypatch):
    pytest.importorskip("torch")
    load = torch_compare.load_our_weights

    def load_with_big_logits(tmodel, params):  # the final norm's gains ten times ours: the logits too
        load(tmodel, params)
        with torch_compare.torch.no_grad():
            tmodel.ln_f.weight.mul_(10.0)

    monkeypatch.setattr(torch_compare, "load_our_weights", load_with_big_logits)
    with pytest.raises(SystemExit, match="--check failed: PyTorch eager's loss .* differs from ours"):
        torch_compare.main([*TINY, "--check", "--no_compile"])


def test_comparison_prints_the_machine_and_a_table_of_rounds(capsys):
    pytest.importorskip("torch")
    assert torch_compare.main([*TINY, "--arch", "llama", "--rounds", "2", "--warmup", "0", "--no_compile"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("machine: ") and "avx2" in lines[0] and "PyTorch " in lines[0]
    assert "| per step | median | round 1 | round 2 | / ours |" in lines
    assert any(line.startswith("| ours | ") and line.endswith(" | 1.00 |") for line in lines)
    assert any(line.startswith("| PyTorch eager | ") for line in lines)
    assert any(line.startswith("eager / ours ") for line in lines)


def test_a_preset_gives_the_model_and_batch_under_the_flags_given():
    args = torch_compare.parse_args(["--preset", "laptop", "--d_model", "64", "--n_heads", "4"])
    assert (args.arch, args.vocab_size, args.n_layers, args.batch_size, args.seq_len) == ("llama", 4096, 4, 32, 128)
    assert (args.d_model, args.n_heads) == (64, 4)  # the flags given win
    args = torch_compare.parse_args(["--preset", "medium"])
    assert (args.arch, args.d_model, args.n_layers, args.batch_size, args.seq_len) == ("gpt2", 256, 4, 16, 256)


def test_a_feed_forward_the_torch_model_lacks_is_refused_in_one_line():
    pytest.importorskip("torch")
    with pytest.raises(SystemExit) as e:
        torch_compare.main([*TINY, "--arch", "llama", "--activation", "relu2", "--check", "--no_compile"])
    assert str(e.value.code) == ("error: --activation relu2: the PyTorch model here has the llama block's own "
                                 "feed-forward only (swiglu); leave --activation out")
