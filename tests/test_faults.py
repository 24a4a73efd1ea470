"""Fault tests, the reduced form of scripts/fault_test.py (run that for the full set):
kill -9 at random moments, a full disk while a checkpoint is written, damaged files."""
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import fault_test  # noqa: E402
from helpers import V, write_data  # noqa: E402

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
    facts = fault_test.full_disk(*work, at=3)
    err = facts["stderr"]
    assert facts["exit"] == 1, err
    assert err.startswith("error: cannot write ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "the disk is full" in err and facts["previous"] in err, err
    assert facts["previous"].endswith("checkpoint_step_20.npz") and facts["previous_step"] == 20  # intact
    assert facts["temp_files"] == [] and not facts["written"]  # nothing half-written left
    assert facts["resumed_exit"] == 0, facts["resumed_stderr"]
    assert facts["differences"] == []  # the resumed run ends as the uninterrupted one, bit for bit
    assert fault_test.problems_after_full_disk(facts) == []  # and the script's own check agrees


def test_damaged_checkpoints_load_intact_or_give_one_line_naming_the_file(work):
    refused = fault_test.damaged_checkpoints(work[0], random.Random(SEED), variants=150)
    assert refused > 100  # nearly every damage is noticed (a changed zip timestamp is harmless)


def test_damaged_data_files_are_rebuilt_or_give_one_line_naming_the_file(work):
    refused = fault_test.damaged_data(work[0], random.Random(SEED), variants=80)
    assert 0 < refused < 80  # the .jsonl and its sidecar are refused; the cache is rebuilt


@pytest.mark.slow
def test_damaged_files_on_the_command_line_give_one_line_and_no_traceback(work):
    runs = fault_test.damaged_on_the_command_line(work[0], random.Random(SEED), variants=1)
    assert [r["command"] for r in runs] == ["train.py", "generate.py", "checkpoint.py", "train.py"]
    for r in runs:
        err = r["stderr"]
        assert r["exit"] == 1 and "Traceback" not in err, (r["command"], r["damage"], err)
        assert err.startswith("error: ") and err.count("\n") == 1 and r["file"] in err, (r["command"], err)
    assert fault_test.problems_on_the_command_line(runs) == []


def test_a_flipped_byte_in_the_token_cache_is_noticed_and_the_cache_converted_again(tmp_path):
    import numpy as np

    from data_loader import cache_paths, load_dataset
    path = write_data(str(tmp_path / "t.jsonl"), 30, seed=5)
    tokens = np.array(load_dataset(path, vocab_size=V).tokens)
    bin_path = cache_paths(path)[0]
    with open(bin_path, "r+b") as f:  # an id that is still in range: only the checksum can tell
        f.seek(10)
        f.write(bytes([tokens[5] ^ 1]))
    messages = []
    ds = load_dataset(path, vocab_size=V, log=messages.append)
    assert any("damaged" in m and "converting again" in m for m in messages)
    assert np.array_equal(np.asarray(ds.tokens), tokens)


def test_a_jsonl_cut_at_a_line_boundary_is_told_by_its_sidecar(tmp_path):
    from data_loader import load_dataset
    from errors import DataError
    path = write_data(str(tmp_path / "t.jsonl"), 30, seed=5)
    lines = open(path).readlines()
    with open(path, "w") as f:
        f.writelines(lines[:20])
    with pytest.raises(DataError, match=r"t\.jsonl holds .* tokens but its sidecar .* says .*cut short"):
        load_dataset(path, vocab_size=V)
