"""[training run] What a training run reports: printed lines, metrics.jsonl (written, and read back
checked), and where the time of a step goes. The validation metrics themselves: evaluation.py.

    log = MetricsLog("checkpoints_small/metrics.jsonl")
    log.say("model: 6,829,696 parameters")          # printed (through tqdm's bar while one shows)
    log.open(resume_step=None)                      # metrics.jsonl starts (kept up to the step resumed)
    log.record(type="train", step=50, loss=4.1)     # one JSON line, with the time
    timer = StepTimer(); timer.start(); ...; timer.lap("model"); ...; timer.stop("bookkeeping")

Reading it back (plot_metrics.py, scripts/quality.py): one record at a time, each checked, in memory
that does not grow with the log's length:

    records = Records("checkpoints_small/metrics.jsonl")    # a regular file, or one error naming it
    for r in records: ...                                   # dicts with a "type" and a whole "step" >= 0
    records.skipped                                         # lines that were not such records
    points = Thinned(2000); points.add(step, loss)          # at most 2000 of them kept, evenly spread
"""
import contextlib
import json
import math
import os
import time

from atomic import atomic_write
from errors import TrainError
from untrusted import open_regular, parse_json

MAX_METRICS_BYTES = 1 << 30  # metrics.jsonl read back on resume: a record per --log_interval steps, ~200 bytes
MAX_RECORD_BYTES = 1 << 16  # one line of it: a config record with every flag is ~2 KB
# the fields a record of each type must hold, as finite numbers, for a reader to use it
NUMBER_FIELDS = {"train": ("loss",), "eval": ("val_loss",)}

try:
    from tqdm import tqdm
except ImportError:  # tqdm is in requirements.txt, but training must not depend on a progress bar
    tqdm = None


class MetricsLog:
    """Prints messages and appends records to metrics.jsonl; quiet (an MPI rank other than 0, where
    rank 0 alone prints and writes) it does neither. Records before open() are not kept: where the
    file starts depends on the checkpoint a run resumes from, known only once it is loaded."""

    def __init__(self, path, quiet=False):
        self.path, self.quiet = path, quiet
        self.bar = None  # a tqdm progress bar while one is showing
        self.file = None
        self.said = set()

    def open(self, resume_step=None):
        """Start writing: resuming at resume_step, the records past it are dropped (they belong to the
        part of the run that was lost, like a line cut short by a kill in the middle of writing it);
        a fresh run keeps an old file as metrics.jsonl.old (.old.1, ... when taken), never overwritten."""
        if self.quiet:
            return
        try:
            if resume_step is not None and os.path.exists(self.path):
                with open_regular(self.path, "rb", "metrics log", MAX_METRICS_BYTES, TrainError) as f, \
                        atomic_write(self.path, "wb") as out:  # streamed: memory does not grow with the log
                    for line in bounded_lines(f):
                        if line is not None and self._record_step(line) <= resume_step:
                            out.write(line if line.endswith(b"\n") else line + b"\n")
            elif resume_step is None and os.path.exists(self.path):  # an earlier run's: kept, never overwritten
                old, n = self.path + ".old", 0
                while os.path.lexists(old):
                    n += 1
                    old = f"{self.path}.old.{n}"
                os.replace(self.path, old)
            self.file = open(self.path, "a", encoding="utf-8")
        except PermissionError as e:  # the log, or its folder, may not be read or written: nothing changed
            raise TrainError(f"cannot {'resume' if resume_step is not None else 'start'} the log {self.path}: "
                             f"{e.strerror} ({e.filename}); give read and write permission to it and its folder, "
                             "then run again") from None

    @staticmethod
    def _record_step(line):
        """The step of a metrics line; infinity for a line that is not a complete record."""
        try:
            step = parse_json(line, "metrics.jsonl").get("step")
            return step if isinstance(step, int) else 0
        except (ValueError, AttributeError):
            return math.inf

    def say(self, msg):
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def say_once(self, key, msg):
        """say(msg) the first time only: a hint worth giving once a run."""
        if key not in self.said:
            self.said.add(key)
            self.say(msg)

    def record(self, **fields):
        if self.file is None:
            return
        fields["time"] = round(time.time(), 3)
        self.file.write(json.dumps(fields) + "\n")
        self.file.flush()

    def close(self):
        if self.file is not None:
            with contextlib.suppress(OSError):  # a full disk was reported already
                self.file.close()


def bounded_lines(f, max_bytes=MAX_RECORD_BYTES):
    """The lines of the binary file f, each read in at most max_bytes + 1 bytes; None in place of a line
    longer than max_bytes (read past in pieces, never held whole)."""
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # the rest of the long line
                line = f.readline(max_bytes + 1)
            yield None
            continue
        yield line


def finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Records:
    """The records of a metrics.jsonl, streamed and checked: iterating yields each line that is a JSON object
    with a string "type" and a whole "step" >= 0 (and, for the types in NUMBER_FIELDS, those fields as finite
    numbers); any other line (not JSON, nested too deeply, over MAX_RECORD_BYTES, another shape, a record cut
    short by a kill) is counted in skipped. The path must be a regular file: error(...) names it otherwise;
    OSError as open() raises it."""

    def __init__(self, path, error=ValueError):
        self.path, self.error = str(path), error
        self.skipped = 0

    def __iter__(self):
        self.skipped = 0
        with open_regular(self.path, "rb", "metrics log (metrics.jsonl)", MAX_METRICS_BYTES, self.error) as f:
            for line in bounded_lines(f):
                record = self.check(line)
                if record is None:
                    if line is None or line.strip():
                        self.skipped += 1
                    continue
                yield record

    def check(self, line):
        """The record on line (bytes), or None when it is not one."""
        if line is None or not line.strip():
            return None
        try:
            record = parse_json(line, self.path)
        except ValueError:
            return None
        if not isinstance(record, dict) or not isinstance(record.get("type"), str):
            return None
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            return None
        if not all(finite_number(record.get(name)) for name in NUMBER_FIELDS.get(record["type"], ())):
            return None
        return record


class Thinned:
    """At most max_points (x, y) points of a series too long to keep whole, spread evenly over it: every
    stride-th point is kept, and when the list is full every second one is dropped and the stride doubles.
    The first point is always kept; the last one added is kept beside them (last)."""

    def __init__(self, max_points=2000):
        self.max_points = max(2, int(max_points))
        self.xs, self.ys = [], []
        self.stride, self.seen, self.last = 1, 0, None

    def add(self, x, y):
        if self.seen % self.stride == 0:
            self.xs.append(x)
            self.ys.append(y)
            if len(self.xs) > self.max_points:
                self.xs, self.ys = self.xs[::2], self.ys[::2]
                self.stride *= 2
        self.seen += 1
        self.last = (x, y)

    def points(self):
        """(xs, ys) of the kept points, the last one added included."""
        xs, ys = list(self.xs), list(self.ys)
        if self.last is not None and (not xs or (xs[-1], ys[-1]) != self.last):
            xs.append(self.last[0])
            ys.append(self.last[1])
        return xs, ys

    def __len__(self):
        return self.seen


class _NoBar:
    def update(self, n=1):
        pass


@contextlib.contextmanager
def progress_bar(log, total, initial, show=True):
    """tqdm's bar of the steps (with the time left) while the block runs, the log's lines printed above
    it; none without show, without tqdm, or when stderr is not a terminal (a log file would fill
    with redraws). Yields something to update(1) after each step either way."""
    bar = None
    if show and tqdm is not None:
        bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.1, disable=None)
        log.bar = None if bar.disable else bar
    try:
        yield bar if bar is not None else _NoBar()
    finally:
        if bar is not None:
            bar.close()
        log.bar = None


class Interval:
    """The training steps since the last log line: their summed loss and accuracy (on the GPU they
    stay there until logged, as reading them waits for the GPU) and their seconds."""

    def __init__(self):
        self.loss, self.accuracy, self.steps, self.seconds = 0.0, 0.0, 0, 0.0

    def add(self, loss, accuracy, seconds):
        self.loss += loss
        self.accuracy += accuracy
        self.steps += 1
        self.seconds += seconds


def log_train(log, step, max_steps, interval, lr, grad_norm, tokens_per_step):
    """One line and one record of the interval's means (max_steps None: not known yet, --time_budget)."""
    n, secs = interval.steps, interval.seconds
    loss, accuracy = float(interval.loss) / n, float(interval.accuracy) / n  # on the GPU: read now
    steps_per_s, tokens_per_s = n / secs, n * tokens_per_step / secs
    log.say(f"step {step:>6}/{max_steps or '?'} | loss {loss:.4f} | acc {accuracy:.4f} | lr {lr:.2e} | "
            f"grad norm {grad_norm:.3f} | {steps_per_s:.2f} steps/s | {tokens_per_s:,.0f} tokens/s")
    log.record(type="train", step=step, loss=loss, accuracy=accuracy, lr=lr, grad_norm=grad_norm,
               steps_per_s=steps_per_s, tokens_per_s=tokens_per_s)
    if log.bar is not None:
        log.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)


def log_eval(log, step, res, seconds):
    bpb = "n/a" if res["val_bpb"] is None else f"{res['val_bpb']:.4f}"
    log.say(f"eval step {step}: val loss {res['val_loss']:.4f} | val perplexity {res['val_perplexity']:.2f} | "
            f"val acc {res['val_accuracy']:.4f} | bits/byte {bpb} | {res['val_tokens']:,} tokens ({seconds:.1f}s)")
    log.record(type="eval", step=step, **res)


class StepTimer:
    """Seconds per part of a training step, summed over the steps: start() begins a step, lap(name)
    ends its part `name`, stop(name) its last part.

    sync: a function that waits for the device (device.synchronize), called before each reading
    of the clock; on a GPU the work is only queued when a call returns, and the parts are right
    only with it (at the cost of the waits: train.py passes it with --profile).
    """

    def __init__(self, sync=None):
        self.sync = sync
        self.parts = {}
        self.steps, self.seconds = 0, 0.0  # steps timed, and their seconds in all
        self._start = self._last = 0.0

    def _now(self):
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def start(self):
        self._start = self._last = self._now()

    def lap(self, name):
        now = self._now()
        self.parts[name] = self.parts.get(name, 0.0) + now - self._last
        self._last = now

    def step_seconds(self):
        """Seconds from start() to the last lap."""
        return self._last - self._start

    def stop(self, name):
        self.lap(name)
        self.steps += 1
        self.seconds += self.step_seconds()

    def report(self, log, step, main, show=False):
        """A "profile" record of the time per step and the time the other parts add to the part `main`;
        with show, a line too."""
        if not self.steps:
            return
        n, main_s = self.steps, self.parts[main]
        overhead = (self.seconds - main_s) / main_s * 100 if main_s > 0 else float("nan")
        log.record(type="profile", step=step, steps=n, loop_ms_per_step=1000 * self.seconds / n,
                   overhead_pct=overhead, **{f"{k}_ms_per_step": 1000 * v / n for k, v in self.parts.items()})
        if show:
            parts = ", ".join(f"{k} {v / main_s * 100:.2f}%" for k, v in self.parts.items() if k != main)
            log.say(f"profile over {n} steps: {main} {1000 * main_s / n:.2f} ms/step; the loop adds {overhead:.2f}% "
                    f"({parts})")
