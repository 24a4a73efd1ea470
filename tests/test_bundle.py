"""The bundled sample is what its README says it is (the demo and tests rely on it)."""
import hashlib
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"

EXPECTED = {
    "TinyStoriesV2-GPT4-train.sample.txt": "e4b2c089502cf7800c9896bb66e7dabe6f2bec57f3ac6246d91af49e06f43a5f",
    "TinyStories-valid.sample.txt": "c5eede82c385a22f9f0c457a0c663638b17ff986a40f1579d8af924bd0b3f06d",
    "r50k_base.tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
}


def test_bundled_files_match_their_checksums():
    for name, digest in EXPECTED.items():
        assert hashlib.sha256((SAMPLE / name).read_bytes()).hexdigest() == digest, name


def test_bundle_stays_small():
    total = sum(p.stat().st_size for p in SAMPLE.iterdir())
    assert total < 5 * 2**20
