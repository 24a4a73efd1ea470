"""scripts/scale_check.py: each stage runs and reports its time and memory (on a 1 MB file, train skipped)."""
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import scale_check  # noqa: E402


def test_scale_check_reports_every_stage(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert scale_check.main(["--mb", "1", "--stages", "bpe", "tokenize", "convert", "--vocab_size", "600",
                             "--work_dir", str(tmp_path / "w"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["stage"] for r in res["results"]] == ["bpe", "tokenize", "convert"]
    assert all(r["rc"] == 0 and r["seconds"] > 0 and r["largest_mb"] > 0 for r in res["results"])  # measured
    assert res["bytes"] >= 1_000_000 and "trained BPE: 600 tokens" in capsys.readouterr().out
    assert (tmp_path / "w" / "big.jsonl.tokens.bin").exists()


def test_made_up_words_are_each_used_twice(tmp_path):
    scale_check.make_input(tmp_path / "t.txt", 1, distinct=1000)
    counts = Counter((tmp_path / "t.txt").read_text().replace(".", " ").split())
    assert sum(n == 2 and w.islower() and len(w) >= 5 for w, n in counts.items()) > 900
