"""[training run] Whether a training run should stop early, before the next step: one question for the loop.

    with Stop(max_minutes, world) as stop:
        while True:
            last_step = step == max_steps or stop.requested()

Ctrl-C (SIGINT) or SIGTERM sets a flag that is read between steps, so the run stops at a step
boundary and saves; a second signal stops at once (StopNow, a KeyboardInterrupt that carries the
signal's exit code: 130 for SIGINT, 143 for SIGTERM), except while a checkpoint is being written
(`with saving():`): then the checkpoint is completed first, and StopNow comes right after it (a
third signal does not wait: the write is abandoned, its temp file removed, the earlier checkpoints
intact). --max_time stops it too. Under MPI every rank votes (one small Allreduce), so that a signal to one rank, or
--max_time on one rank's clock, stops all of them at the same step.
"""
import contextlib
import signal
import time

SIGNALS = {signal.SIGINT: ("interrupted (Ctrl-C)", 130), signal.SIGTERM: ("terminated (SIGTERM)", 143)}
_active = []  # the Stop whose handlers are installed (saving() asks it to wait)


class StopNow(KeyboardInterrupt):
    """A second stop signal: the run ends at once, with the signal's exit code."""

    def __init__(self, reason, exit_code):
        super().__init__(reason)
        self.reason, self.exit_code = reason, exit_code

    def __str__(self):
        return (f"{self.reason} again: stopped at once, without saving the current step; every checkpoint "
                "written so far is complete (resume from the newest with the same flags plus --resume)")


@contextlib.contextmanager
def saving():
    """Around a checkpoint write: a second stop signal waits until the write is complete (then StopNow)."""
    stop = _active[-1] if _active else None
    if stop is None:
        yield
        return
    stop.saving += 1
    try:
        yield
    finally:
        stop.saving -= 1
    if stop.pending is not None and not stop.saving:
        pending, stop.pending = stop.pending, None
        raise pending


class Stop:
    def __init__(self, max_minutes, world):
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
        self.max_minutes, self.world = max_minutes, world
        self.interrupted = False  # a signal asked the run to stop, on this rank or (agreed) another
        self.reason, self.exit_code = None, 0
        self.previous = {}
        self.saving, self.pending = 0, None  # in a checkpoint write (saving()); a StopNow held until it ends

    def __enter__(self):
        for sig in SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, signals behave as usual
                pass
        _active.append(self)
        return self

    def _handle(self, signum, frame):
        if self.interrupted:
            now = StopNow(*SIGNALS[signum])
            if self.saving and self.pending is None:  # let the checkpoint being written complete first
                self.pending = now
                return
            raise now
        self.interrupted = True
        self.reason, self.exit_code = SIGNALS[signum]

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self in _active:
            _active.remove(self)
        return False

    def requested(self):
        """Whether to stop now, agreed by every rank: the highest vote wins (a signal's exit code,
        else 1 for --max_time, else 0). Sets reason and exit_code."""
        vote = self.exit_code if self.interrupted else int(self.deadline is not None and time.monotonic() > self.deadline)
        agreed = self.world.max(vote)
        if agreed > 1 and not self.interrupted:  # a signal reached another rank
            self.interrupted, self.exit_code = True, agreed
            self.reason = next(why for why, code in SIGNALS.values() if code == agreed) + " on another rank"
        elif agreed == 1:
            self.reason = f"--max_time {self.max_minutes} min reached"
        return agreed > 0
