"""run_dir.py: which run trains in a folder, its newest checkpoint, the resume choice, the lock, stale
temp files. Only checkpoint metas are read there, so the files here hold a meta record and no weights."""
import json
import os
import re

import numpy as np
import pytest

from checkpoint import FORMAT, VERSION
from errors import CheckpointError
from run_dir import RUN_FILE, RunDir, new_run_id


def fake_checkpoint(path, step, run_id=None):
    """A checkpoint file as far as the folder's bookkeeping reads one: its meta record alone."""
    meta = {"format": FORMAT, "version": VERSION, "step": step, "run_id": run_id}
    np.savez(path, meta=np.array(json.dumps(meta)))
    return str(path)


def test_latest_picks_the_highest_step_and_a_final_checkpoint_of_the_same_step(tmp_path):
    run_dir = RunDir(tmp_path)
    assert run_dir.latest() is None
    for step in (5, 20, 10):
        fake_checkpoint(tmp_path / f"checkpoint_step_{step}.npz", step)
    assert run_dir.latest().endswith("checkpoint_step_20.npz")
    fake_checkpoint(tmp_path / "checkpoint_final.npz", 20)
    assert run_dir.latest().endswith("checkpoint_final.npz")
    fake_checkpoint(tmp_path / "checkpoint_step_30.npz", 30)
    assert run_dir.latest().endswith("checkpoint_step_30.npz")
    (tmp_path / "checkpoint_other.npz").write_bytes(b"not ours")  # neither a step nor the final file
    assert [os.path.basename(f.path) for f in run_dir.checkpoints()] == \
        ["checkpoint_step_30.npz", "checkpoint_final.npz", "checkpoint_step_20.npz", "checkpoint_step_10.npz",
         "checkpoint_step_5.npz"]


def test_choose_resume_takes_the_last_run_and_refuses_what_it_cannot_tell_apart(tmp_path):
    run_dir = RunDir(tmp_path)
    fake_checkpoint(tmp_path / "checkpoint_step_40.npz", 40, "old")
    old_final = fake_checkpoint(tmp_path / "checkpoint_final.npz", 60, "old")
    mine = fake_checkpoint(tmp_path / "checkpoint_step_20.npz", 20, "new")
    with pytest.raises(CheckpointError, match=r"several runs.*checkpoint_final.npz \(step 60\).*--resume PATH"):
        run_dir.choose_resume()  # no record of the last run, and checkpoints of two
    run_dir.write_run_id("new")
    assert run_dir.read_run_id() == "new"
    assert run_dir.choose_resume() == mine                      # not the old run's newer step 60
    assert run_dir.latest() == old_final and run_dir.latest("new") == mine
    # the last run died before its first checkpoint: say so, and how to go on
    run_dir.write_run_id("newest")
    with pytest.raises(CheckpointError, match=r"run newest\) wrote no checkpoint.*without --resume.*--resume "
                                              + re.escape(old_final)):
        run_dir.choose_resume()
    os.unlink(tmp_path / RUN_FILE)
    os.unlink(old_final)
    os.unlink(tmp_path / "checkpoint_step_40.npz")
    assert run_dir.choose_resume() == mine                      # one run only: no doubt
    # a damaged file with a higher step might be the run's newest: refused rather than skipped
    (tmp_path / "checkpoint_step_30.npz").write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(CheckpointError, match=r"checkpoint_step_30.npz cannot be read.*move that file away"):
        run_dir.choose_resume()
    assert run_dir.latest() == mine                             # the newest readable one
    # so is a damaged final checkpoint, whose step cannot be read: it was written last
    os.unlink(tmp_path / "checkpoint_step_30.npz")
    (tmp_path / "checkpoint_final.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError, match=r"checkpoint_final.npz cannot be read.*move that file away"):
        run_dir.choose_resume()
    # a damaged file older than the run's newest does not stand in the way
    os.unlink(tmp_path / "checkpoint_final.npz")
    (tmp_path / "checkpoint_step_10.npz").write_bytes(b"PK\x03\x04 damaged")
    assert run_dir.choose_resume() == mine


def test_an_empty_or_unreadable_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint_.*npz in .*pass --resume PATH"):
        RunDir(tmp_path / "missing").choose_resume()
    (tmp_path / "checkpoint_step_5.npz").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        RunDir(tmp_path).choose_resume()
    (tmp_path / RUN_FILE).write_text("{not json")
    assert RunDir(tmp_path).read_run_id() is None


def test_one_writer_at_a_time_and_the_lock_goes_with_its_holder(tmp_path):
    run_dir = RunDir(tmp_path / "ck")
    with run_dir.lock():
        assert f"pid {os.getpid()} on" in (tmp_path / "ck" / "train.lock").read_text()
        with pytest.raises(CheckpointError, match=r"in use by another training run \(pid \d+ on .*--save_dir"):
            run_dir.lock()  # another open file of the lock: flock refuses it as it would another process
    with run_dir.lock():  # released: the folder is free again
        pass


def test_clean_temp_deletes_what_a_kill_in_the_middle_of_a_write_left_and_nothing_else(tmp_path):
    for name in ("checkpoint_step_7.npz.x1y2.tmp", "checkpoint_final.npz.ab12.tmp", "checkpoint_step_5.npz",
                 "notes.tmp"):
        (tmp_path / name).write_bytes(b"x")
    RunDir(tmp_path).clean_temp()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_step_5.npz", "notes.tmp"]


def test_run_ids_are_unique_and_sort_by_their_start():
    ids = {new_run_id() for _ in range(50)}
    assert len(ids) == 50 and all(re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", i) for i in ids)
