"""atomic.py: a write either completes (normal permissions, folder created) or leaves the old file."""
import os

import numpy as np
import pytest

from atomic import atomic_write


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_success_writes_the_content_with_normal_permissions(tmp_path, umask_027):
    path = tmp_path / "out.txt"
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("héllo\n")
        assert not path.exists()          # nothing at the target until the block ends
        assert f.name.endswith(".tmp") and os.path.basename(f.name).startswith("out.txt.")
    assert path.read_bytes() == "héllo\n".encode("utf-8")
    assert os.stat(path).st_mode & 0o777 == 0o640   # what open() gives under umask 027, not mkstemp's 0600
    assert os.listdir(tmp_path) == ["out.txt"]


def test_binary_mode_replaces_an_existing_file(tmp_path):
    path = tmp_path / "a.npz"
    path.write_bytes(b"old")
    with atomic_write(path, "wb") as f:
        np.savez(f, x=np.arange(3))
    np.testing.assert_array_equal(np.load(path)["x"], [0, 1, 2])
    assert os.listdir(tmp_path) == ["a.npz"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_an_exception_leaves_the_old_file_and_no_temp_file(tmp_path, error):
    path = tmp_path / "out.txt"
    path.write_text("old complete file\n")
    with pytest.raises(error):
        with atomic_write(path, "w") as f:
            f.write("half of the new")
            f.flush()
            raise error("interrupted mid-write")
    assert path.read_text() == "old complete file\n"
    assert os.listdir(tmp_path) == ["out.txt"]   # no *.tmp left behind


def test_an_exception_with_no_old_file_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "new.bin", "wb") as f:
            f.write(b"partial")
            raise RuntimeError
    assert os.listdir(tmp_path) == []


def test_the_parent_folder_is_created(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    with atomic_write(path, "w") as f:
        f.write("x")
    assert path.read_text() == "x"


def test_a_read_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="write mode"):
        with atomic_write(tmp_path / "out.txt", "r"):
            pass


def test_the_process_umask_is_never_changed(tmp_path, umask_027, monkeypatch):
    # os.umask is process-wide: setting it to 0 "for a moment" races with other threads creating files
    def no_umask(mask):
        raise AssertionError("atomic_write changed the process umask")
    monkeypatch.setattr(os, "umask", no_umask)
    with atomic_write(tmp_path / "out.bin", "wb") as f:
        f.write(b"x")
    assert os.stat(tmp_path / "out.bin").st_mode & 0o777 == 0o640
