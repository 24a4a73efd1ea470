"""Fault tests, the reduced form of scripts/fault_test.py (run that for the full set):
kill -9 at random moments, a full disk while a checkpoint is written, damaged files."""
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import fault_test  # noqa: E402

SEED = 20261125  # fixed, so that CI is repeatable; the script draws a fresh one each time


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with the generated data and, made once, the uninterrupted reference run."""
    work = str(tmp_path_factory.mktemp("faults"))
    data = fault_test.make_data(str(Path(work) / "data"))
    fault_test.reference_run(work, data)
    return work, data


@pytest.mark.slow
def test_five_kill_9s_each_leave_a_loadable_checkpoint_and_the_resumed_run_is_bit_identical(work):
    rng = random.Random(SEED)
    # one kill of each kind, then one more at any instant; kill_and_resume checks the newest
    # checkpoint after each kill and, at the end, weights, optimizer state and batch position
    history = fault_test.kill_and_resume(*work, rng, kinds=["step", "checkpoint", "eval", "timer", "timer"],
                                         say=lambda msg: None)
    assert [h[0] for h in history] == ["step", "checkpoint", "eval", "timer", "timer"]
    assert any(step for _, _, step in history)  # some kill came after a checkpoint: resumed mid-run


@pytest.mark.slow
def test_a_full_disk_while_a_checkpoint_is_written_stops_with_one_line_and_keeps_the_previous_one(work):
    fault_test.full_disk(*work, at=3, say=lambda msg: None)


def test_damaged_checkpoints_load_intact_or_give_one_line_naming_the_file(work):
    refused = fault_test.damaged_checkpoints(work[0], random.Random(SEED), variants=150)
    assert refused > 100  # nearly every damage is noticed (a changed zip timestamp is harmless)


def test_damaged_data_files_are_rebuilt_or_give_one_line_naming_the_file(work):
    refused = fault_test.damaged_data(work[0], random.Random(SEED), variants=80)
    assert 0 < refused < 80  # the .jsonl and its sidecar are refused; the cache is rebuilt


@pytest.mark.slow
def test_damaged_files_on_the_command_line_give_one_line_and_no_traceback(work):
    fault_test.damaged_on_the_command_line(work[0], random.Random(SEED), variants=1)
