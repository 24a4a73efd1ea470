"""stop.py: one question for the loop, whether to stop before the next step (signals, --max_time, and the
vote of every MPI rank), asked here of one process and of a stand-in for other ranks."""
import os
import signal

import pytest

import distributed
from helpers import wait_until
from stop import Stop


class Votes:
    """A world whose other ranks vote `theirs`: the highest vote wins, as MPI's MAX gives it."""

    def __init__(self, theirs):
        self.theirs = theirs

    def max(self, value, patience=1):
        return max(value, self.theirs)


def test_nothing_asked_nothing_stops():
    with Stop(None, distributed.Solo()) as stop:
        assert not stop.requested() and stop.exit_code == 0 and stop.reason is None


def test_ctrl_c_stops_at_the_next_question_and_a_second_one_at_once():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job
    with Stop(None, distributed.Solo()) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.interrupted and stop.requested()
        assert (stop.reason, stop.exit_code) == ("interrupted (Ctrl-C)", 130)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # given back


def test_max_time_stops_with_exit_code_0():
    stop = Stop(1e-6, distributed.Solo())  # minutes
    wait_until(stop.requested, timeout=10, what="--max_time")
    assert stop.exit_code == 0 and stop.reason == "--max_time 1e-06 min reached"


def test_a_signal_on_another_rank_stops_this_one_at_the_same_step():
    stop = Stop(None, Votes(143))
    assert stop.requested() and stop.interrupted
    assert (stop.reason, stop.exit_code) == ("terminated (SIGTERM) on another rank", 143)
    stop = Stop(1e-6, Votes(0))  # this rank's clock ran out: every rank stops
    wait_until(stop.requested, timeout=10, what="--max_time")
    assert stop.exit_code == 0
    assert not Stop(None, Votes(0)).requested()
