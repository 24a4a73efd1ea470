"""scripts/compare_trees.py: two checkouts' training steps timed in turn, each in a process of its own."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import compare_trees  # noqa: E402

TINY = ["--vocab_size", "64", "--d_model", "16", "--n_heads", "2", "--n_layers", "1", "--batch_size", "2",
        "--seq_len", "8"]


def test_it_times_both_checkouts_in_every_round(capsys):
    """This checkout against itself: a row for each round with both times, the medians, the ratio."""
    assert compare_trees.main([str(ROOT), *TINY, "--arch", "llama", "--dropout", "0.1", "--rounds", "3",
                               "--steps", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"before: {ROOT} (") and f"; after: {ROOT} (" in lines[0]
    assert lines[1].startswith("model: llama: 1 layer, d_model 16") and lines[1].endswith("dropout 0.1")
    assert lines[2:4] == ["| round | before | after |", "|---|---|---|"]
    rounds = [line.split(" | ") for line in lines[4:7]]
    assert [r[0] for r in rounds] == ["| 1", "| 2", "| 3"]
    assert all(float(r[1].rstrip(" s")) > 0 and float(r[2].rstrip(" s |")) > 0 for r in rounds)
    assert lines[7].startswith("| median | ") and lines[8].startswith("after / before: ")


def test_the_rounds_alternate_and_the_worker_builds_the_asked_model(monkeypatch):
    made, order = [], []

    class FakeCheckout:
        def __init__(self, tree, cfg, B, T, dropout):
            made.append((tree, cfg.d_model, cfg.arch, B, T, dropout))
            self.tree = tree

        def steps(self, n):
            order.append(self.tree)
            return [0.5 if self.tree == Path("/b") else 0.25] * n

        def close(self):
            pass

    monkeypatch.setattr(compare_trees, "Checkout", FakeCheckout)
    args = compare_trees.parse_args(["/b", "--after", "/a", "--preset", "laptop"])
    cfg = compare_trees.config_from_flags(vars(args))
    times = compare_trees.compare(Path("/b"), Path("/a"), cfg, args.batch_size, args.seq_len, args.dropout, 2, 1)
    assert made == [(Path("/b"), 256, "llama", 32, 128, 0.1), (Path("/a"), 256, "llama", 32, 128, 0.1)]
    assert order == [Path("/b"), Path("/a")] * 2  # in turn
    assert times == {"before": [0.5, 0.5], "after": [0.25, 0.25]}


def test_a_directory_that_is_no_checkout_is_refused(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_trees.py"), str(tmp_path), *TINY],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert f"error: {tmp_path}: not a checkout of this repository (no benchmark.py there)" in r.stderr


def test_a_checkout_whose_step_cannot_run_says_why(tmp_path):
    """A checkout from before benchmark.fixed_batch_step: the error says which checkout, and its own words."""
    (tmp_path / "parallel.py").write_text("def keep_freed_memory():\n    pass\n")
    (tmp_path / "benchmark.py").write_text("def bench():\n    pass\n")
    with pytest.raises(SystemExit, match=f"error: {tmp_path}: its step did not run: ImportError: cannot import "
                                         "name 'fixed_batch_step' from 'benchmark'"):
        compare_trees.main([str(tmp_path), *TINY, "--rounds", "1", "--steps", "1"])
