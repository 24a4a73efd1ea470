"""prepare_tinystories.py: story splitting, the offline path, and the downloader against a real
(local, misbehaving on purpose) HTTP server on 127.0.0.1 - no test touches the network."""
import hashlib
import os
import time
from pathlib import Path

import pytest

import prepare_tinystories as P
from errors import DownloadError
from http_server import FileServer

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
TRAIN_RAW = (SAMPLE / "TinyStoriesV2-GPT4-train.sample.txt").read_bytes()
VALID_RAW = (SAMPLE / "TinyStories-valid.sample.txt").read_bytes()
FAST = dict(retries=3, backoff=0.001, timeout=5, progress=False)


def lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


@pytest.fixture
def server():
    small = TRAIN_RAW[:200_000]
    with FileServer({"train.txt": small, "TinyStoriesV2-GPT4-train.txt": TRAIN_RAW,
                     "TinyStoriesV2-GPT4-valid.txt": TRAIN_RAW[-100_000:], "big.txt": TRAIN_RAW * 10}) as s:
        s.small = small
        yield s


# ---------------------------------------------------------------- splitting

def test_split_on_endoftext_normalises_whitespace_and_drops_empty_stories():
    text = "Once  upon\na time.\n\nThe end.\n<|endoftext|>\n  \n<|endoftext|>\nTom\tran.  \n<|endoftext|>\nTail"
    assert P.split_stories(text) == ["Once upon a time. The end.", "Tom ran.", "Tail"]


def test_streaming_splitter_gives_the_same_stories_for_any_chunking():
    text = TRAIN_RAW[:30_000].decode("utf-8")
    whole = P.split_stories(text)
    for size in (1, 7, 13, 4096):  # markers and words cut at every possible place
        sp = P.StorySplitter()
        got = [s for i in range(0, len(text), size) for s in sp.feed(text[i:i + size])] + sp.finish()
        assert got == whole
    assert len(whole) == text.count("<|endoftext|>") + (1 if text.rstrip().split("<|endoftext|>")[-1].strip() else 0)


def test_unmarked_text_is_grouped_into_stories_at_story_openings():
    text = ("Once upon a time, a cat.\n\nThe cat ran.\n\nOnce upon a time, a dog.\n\nIt barked.\n\n"
            "There once was a fox.")
    assert P.split_stories(text) == ["Once upon a time, a cat. The cat ran.",
                                     "Once upon a time, a dog. It barked.", "There once was a fox."]


def test_bundled_valid_sample_splits_into_stories_without_losing_words():
    text = VALID_RAW.decode("utf-8")
    stories = P.split_stories(text)
    assert 400 <= len(stories) <= 800  # 2,106 paragraphs, about 750 stories by the data's README
    assert all(s and "\n" not in s and "  " not in s for s in stories)
    assert " ".join(stories).split() == text.split()
    assert sum(s.startswith("Once upon a time") for s in stories) >= 400


# ---------------------------------------------------------------- offline

def test_offline_writes_the_bundled_stories_one_per_line(tmp_path, capsys):
    assert P.main(["--data_dir", str(tmp_path), "--offline", "--quiet"]) == 0
    train = lines(tmp_path / "tinystories_train_sample.txt")
    valid = lines(tmp_path / "tinystories_valid_sample.txt")
    assert len(train) == 1727 == TRAIN_RAW.count(b"<|endoftext|>")
    assert train[0].startswith("Once upon a time") and all(s.strip() == s and s for s in train)
    assert " ".join(train).split() == TRAIN_RAW.decode().replace("<|endoftext|>", " ").split()
    assert len(valid) > 400
    assert "offline" in capsys.readouterr().err
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "tinystories_train_sample.txt").st_mode & 0o777 == 0o666 & ~mask
    assert P.main(["--data_dir", str(tmp_path), "--offline", "--sample_size", "10", "--valid_size", "3",
                   "--quiet"]) == 0
    assert lines(tmp_path / "tinystories_train_sample.txt") == train[:10]
    assert len(lines(tmp_path / "tinystories_valid_sample.txt")) == 3
    assert P.main(["--data_dir", str(tmp_path), "--offline", "--full"]) == 1


# ---------------------------------------------------------------- download

def test_normal_download_with_checksum(server, tmp_path):
    dest = str(tmp_path / "f.txt")
    P.download(f"{server.url}/ok/train.txt", dest, sha256=hashlib.sha256(server.small).hexdigest(), **FAST)
    assert Path(dest).read_bytes() == server.small
    assert not os.path.exists(dest + ".part")
    assert server.log == [("ok", "train.txt", None)]
    # already there: trusted, not fetched again
    P.download(f"{server.url}/ok/train.txt", dest, **FAST)
    assert len(server.log) == 1


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    dest = str(tmp_path / "f.txt")
    P.download(f"{server.url}/drop/train.txt", dest, **FAST)
    assert Path(dest).read_bytes() == server.small
    (_, _, r1), (_, _, r2) = server.log
    assert r1 is None
    assert 0 < int(r2[len("bytes="):-1]) <= len(server.small) // 2  # resumed from what had arrived


def test_truncated_body_is_detected_and_resumed(server, tmp_path):
    dest = str(tmp_path / "f.txt")
    P.download(f"{server.url}/trunc/train.txt", dest, **FAST)
    assert Path(dest).read_bytes() == server.small
    assert 0 < int(server.log[1][2][len("bytes="):-1]) <= len(server.small) * 2 // 3


def test_always_truncated_fails_clearly_and_never_leaves_a_complete_looking_file(server, tmp_path):
    dest = str(tmp_path / "f.txt")
    with pytest.raises(DownloadError, match=r"4 attempts.*\.part is kept"):
        P.download(f"{server.url}/alltrunc/train.txt", dest, **FAST)
    assert not os.path.exists(dest)
    assert 0 < os.path.getsize(dest + ".part") < len(server.small)


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    dest = str(tmp_path / "f.txt")
    Path(dest + ".part").write_bytes(server.small[:12345])
    P.download(f"{server.url}/ok/train.txt", dest, **FAST)
    assert Path(dest).read_bytes() == server.small
    assert server.log == [("ok", "train.txt", "bytes=12345-")]


def test_server_error_is_retried_then_fails_with_a_clear_message(server, tmp_path):
    dest = str(tmp_path / "f.txt")
    with pytest.raises(DownloadError, match=r"after 4 attempts.*500"):
        P.download(f"{server.url}/error/train.txt", dest, **FAST)
    assert len(server.log) == 4 and not os.path.exists(dest)
    P.download(f"{server.url}/flaky/train.txt", dest, **FAST)  # one 503, then fine
    assert Path(dest).read_bytes() == server.small and len(server.log) == 6


def test_missing_file_fails_at_once(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        P.download(f"{server.url}/ok/nope.txt", str(tmp_path / "f.txt"), **FAST)
    assert len(server.log) == 1


def test_server_without_range_support_starts_over(server, tmp_path):
    dest = str(tmp_path / "f.txt")
    P.download(f"{server.url}/norange/train.txt", dest, **FAST)
    assert Path(dest).read_bytes() == server.small
    assert len(server.log) == 2 and server.log[1][2] is not None  # it asked for a range and got the whole file


def test_checksum_mismatch_deletes_the_download(server, tmp_path):
    dest = str(tmp_path / "f.txt")
    with pytest.raises(DownloadError, match="sha256"):
        P.download(f"{server.url}/corrupt/train.txt", dest, sha256=hashlib.sha256(server.small).hexdigest(), **FAST)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")


# ---------------------------------------------------------------- streaming (sample mode)

def test_stream_url_resumes_and_ignores_a_server_without_range(server):
    for mode in ("drop", "trunc", "norange", "flaky"):
        got = b"".join(P.stream_url(f"{server.url}/{mode}/train.txt", retries=3, backoff=0.001))
        assert got == server.small, mode


def test_sample_mode_stops_the_download_after_n_stories(server, tmp_path):
    url = f"{server.url}/ok/big.txt"
    stories = list(P.stream_stories(url, limit=5, retries=1, backoff=0.001))
    assert stories == P.split_stories(TRAIN_RAW.decode())[:5]
    big = len(server.httpd.files["big.txt"])
    deadline = time.time() + 10
    while not server.sent and time.time() < deadline:  # the handler notices the closed connection
        time.sleep(0.01)
    assert server.sent and server.sent[0] < big // 2


def test_main_sample_and_full_modes_against_the_local_server(server, tmp_path):
    base = f"{server.url}/drop"  # every file's first request is cut halfway
    args = ["--base_url", base, "--retries", "2", "--backoff", "0.001", "--quiet"]
    assert P.main(["--data_dir", str(tmp_path / "s"), "--sample_size", "20"] + args) == 0
    expected = P.split_stories(TRAIN_RAW.decode())
    assert lines(tmp_path / "s" / "tinystories_train_sample.txt") == expected[:20]
    assert lines(tmp_path / "s" / "tinystories_valid_sample.txt") == P.split_stories(TRAIN_RAW[-100_000:].decode())
    assert P.main(["--data_dir", str(tmp_path / "f"), "--full"] + args) == 0
    assert (tmp_path / "f" / "raw" / "TinyStoriesV2-GPT4-train.txt").read_bytes() == TRAIN_RAW
    assert lines(tmp_path / "f" / "tinystories_train.txt") == expected


def test_failed_download_falls_back_to_the_bundled_sample_unless_told_not_to(server, tmp_path, capsys):
    args = ["--data_dir", str(tmp_path), "--base_url", f"{server.url}/error", "--retries", "0", "--quiet"]
    assert P.main(args + ["--no_fallback"]) == 1
    assert "error: could not download" in capsys.readouterr().err
    assert not (tmp_path / "tinystories_train_sample.txt").exists()
    assert P.main(args) == 0
    assert "FALLING BACK" in capsys.readouterr().err
    assert len(lines(tmp_path / "tinystories_train_sample.txt")) == 1727


def test_sample_mode_that_cannot_finish_leaves_no_output(server, tmp_path):
    args = ["--data_dir", str(tmp_path), "--base_url", f"{server.url}/alltrunc", "--sample_size", "100000",
            "--retries", "1", "--backoff", "0.001", "--no_fallback", "--quiet"]
    assert P.main(args) == 1
    assert list(tmp_path.iterdir()) == []
