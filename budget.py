"""[training run] --time_budget: how many steps fit in a run's minutes, so that the run ends when the time is up and its
learning-rate schedule ends with it, whatever the machine does meanwhile. --max_time only stops a run.

    budget = TimeBudget(minutes, world, cap=args.max_steps)
    while True:                                    # train.py's loop, first thing each iteration
        horizon = budget.tick(run.step)            # the clock, read once a step (rank 0's, for every rank)
        if horizon is not None:
            run.refit(run.step, horizon)           # the schedule bends to end there (LRSchedule.refit)
        ...                                        # a periodic evaluation or checkpoint: budget.worked(...)

The first step is a warm-up (it allocates the buffers) and is not timed; the steps after it are
timed until 10 of them and 20 s have passed, or a tenth of the budget has since the start. That
fits the first horizon: the most steps for which the steps left at that speed, plus the periodic
evaluations and checkpoints that fall before it, fit in what is left of the budget. Then the
horizon is fitted again each time another 2% of the budget has passed (or the steps the last fit
expected in that time are done), from the speed of the steps since the last fit: the machine's
speed now, so that a program that starts or stops meanwhile moves the horizon, and the run ends
within about 2% of the budget. Should the time be up before the horizon, the run ends at once. A periodic evaluation or checkpoint is not a step: the step it
follows takes longer by its cost, which the fits count where such work falls before the horizon.
--max_steps, when given, caps the horizon. The final evaluation and checkpoint come after the budget.

Every rank reads rank 0's clock, so all ranks take the same decisions at the same steps. Every
checkpoint records the budget (record()): the seconds used, the horizon, the speed and the costs,
where the last fit was; a resumed run continues from there with the time that is left.
"""
import math
import time

clock = time.monotonic  # the one clock the budget reads (tests put a fake one here)

MEASURE_STEPS, MEASURE_SECONDS, MEASURE_SHARE = 10, 20.0, 0.1
REFIT_SHARE = 0.02     # fit the horizon again each time this share of the budget has passed
MAX_MINUTES = 1e6      # the longest --time_budget (about 2 years): its arithmetic stays exact below it


def periodic(interval, step, horizon):
    """How many multiples of interval (0: never) lie strictly between step and horizon: the periodic
    evaluations or checkpoints a run at step does before its final one at horizon."""
    if not interval or horizon <= step:
        return 0
    return (horizon - 1) // interval - step // interval


def fit(step, seconds, step_s, cap=None, costs=()):
    """The largest horizon >= step whose steps from step, at step_s seconds each, and periodic work
    ((interval, seconds each) in costs) take at most `seconds`; at most cap (None: no cap)."""
    def cost(h):
        return (h - step) * step_s + sum(periodic(every, step, h) * s for every, s in costs)
    lo, hi = step, step + int(max(seconds, 0.0) / max(step_s, 1e-9)) + 1  # cost(lo) = 0, cost(hi) > seconds
    if cap is not None:
        hi = min(hi, max(cap, step) + 1)
    while hi - lo > 1:  # cost grows with h: the largest h with cost(h) <= seconds
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds else (lo, mid)
    return lo


class TimeBudget:
    def __init__(self, minutes, world, cap=None, record=None):
        """record: a checkpoint's (record()), to continue its budget; None: a fresh one."""
        self.minutes, self.seconds, self.world, self.cap = minutes, 60.0 * minutes, world, cap
        r = record or {}
        self.used = r.get("used", 0.0)       # seconds of the budget spent by the processes before this one
        self.horizon = r.get("horizon")      # None: not measured yet
        if cap is not None and self.horizon is not None:
            self.horizon = min(self.horizon, cap)
        self.step_s = r.get("step_s")        # seconds a step, at the last fit
        self.costs = {what: tuple(c) for what, c in r.get("costs", {}).items()}  # {what: (every, seconds each)}
        self.mark = r.get("mark")            # [step, elapsed] at the last fit
        self.window = r.get("window", [0, 0.0])  # [steps, seconds] of the plain steps since the last fit
        self.fits = r.get("fits", 0)
        self.origin = None                   # the clock when the budget's time began (this process's view)
        self.begin = self.first = None       # measuring: [step, elapsed] at the first tick and the next one
        self.last = None                     # [step, elapsed] at the previous tick
        self.work = []                       # the periodic work done since the previous tick: [(what, every)]
        self.elapsed = self.used
        self.time_up = False                 # the last fit ended the run because the time was up

    def record(self):
        """What a checkpoint keeps of the budget (JSON), for TimeBudget(..., record=) to continue it."""
        return {"used": self.elapsed, "horizon": self.horizon, "step_s": self.step_s,
                "costs": {what: list(c) for what, c in self.costs.items()}, "mark": self.mark,
                "window": list(self.window), "fits": self.fits}

    def worked(self, what, every):
        """The loop did a periodic evaluation or checkpoint (every `every` steps) after this step's tick."""
        self.work.append((what, every))

    def tick(self, step):
        """Called before each step with the updates done so far; the new horizon when it fits one (on
        every rank alike), else None."""
        now = self.world.bcast(clock())  # rank 0's clock for every rank
        if self.origin is None:
            self.origin = now - self.used
        elapsed = now - self.origin
        if self.last is not None:
            self._account(step - self.last[0], elapsed - self.last[1])
        self.last, self.elapsed, self.work = [step, elapsed], elapsed, []
        if self.horizon is not None and step >= self.horizon:
            return None
        if self.cap is not None and step >= self.cap:
            return self._set(step, step)
        if self.horizon is None:
            return self._measure(step, elapsed)
        if elapsed >= self.seconds:  # slower than the last fit said: the run ends now
            self.time_up = True
            return self._set(step, step)
        # again after 2% of the budget, in time or in the steps the last fit expected it to hold (a machine
        # much faster than the last fit said would otherwise reach the horizon first)
        share = REFIT_SHARE * self.seconds
        if self.window[0] >= 1 and (elapsed - self.mark[1] >= share or (step - self.mark[0]) * self.step_s >= share):
            self.step_s = self.window[1] / self.window[0]
            return self._set(step, fit(step, self.seconds - elapsed, self.step_s, self.cap, self.costs.values()))
        return None

    def _account(self, steps, seconds):
        """The interval since the previous tick: plain steps go into the window's speed; one with periodic
        work after it costs the work what it took beyond the steps (split evenly over the kinds done)."""
        if not self.work:
            self.window = [self.window[0] + steps, self.window[1] + seconds]
        elif self.step_s is not None:
            extra = max(seconds - steps * self.step_s, 0.0) / len(self.work)
            for what, every in self.work:
                self.costs[what] = (every, extra)

    def _measure(self, step, elapsed):
        """The first horizon, once the first steps are timed (the first step is not)."""
        if self.begin is None:
            self.begin = [step, elapsed]
            return None
        if step == self.begin[0] + 1:
            self.first = elapsed
            return None
        timed = step - self.begin[0] - 1
        enough = (timed >= MEASURE_STEPS and elapsed - self.first >= MEASURE_SECONDS) or \
            elapsed - self.begin[1] >= MEASURE_SHARE * self.seconds
        if not enough:
            return None
        self.step_s = (elapsed - self.first) / timed
        return self._set(step, fit(step, self.seconds - elapsed, self.step_s, self.cap, self.costs.values()))

    def _set(self, step, horizon):
        self.horizon, self.mark, self.window = horizon, [step, self.elapsed], [0, 0.0]
        self.fits += 1
        return horizon

    def describe(self, step, horizon):
        """What the log says when the first horizon is fitted, or when the time is up."""
        if self.time_up:
            return (f"--time_budget {self.minutes:g} min: the time is up at step {step:,}, before the step the "
                    "last fit gave (the machine got slower): the run ends here")
        capped = f" (--max_steps {self.cap})" if horizon == self.cap else ""
        if self.step_s is None:
            return f"--time_budget {self.minutes:g} min: --max_steps {self.cap} came before the speed was measured"
        return (f"--time_budget {self.minutes:g} min: {self.step_s:.3f} s a step (steps {self.begin[0] + 2}-{step}):"
                f" the run ends at step {horizon:,}{capped} for now, where the learning-rate schedule ends; "
                f"fitted again every {REFIT_SHARE * self.seconds:.3g} s from the speed since the last fit")

    def summary(self):
        """What the log says when training ends: how much of the budget it took."""
        return (f"--time_budget {self.minutes:g} min: training took {self.elapsed:.1f} s of {self.seconds:g} s "
                f"({100 * self.elapsed / self.seconds:.1f}%), the horizon fitted {self.fits} time(s)")


def check_record(r):
    """A checkpoint's budget record (record()), refused with ValueError where it cannot be a budget's."""
    def number(x, what):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x < math.inf:
            raise ValueError(f"the budget's {what} {x!r} is not a number >= 0")

    def count(x, what):
        if type(x) is not int or x < 0:
            raise ValueError(f"the budget's {what} {x!r} is not a count")

    if not isinstance(r, dict):
        raise ValueError(f"the budget record is {type(r).__name__}, not a record")
    number(r.get("used"), "seconds used")
    if r["used"] > 60 * MAX_MINUTES:
        raise ValueError(f"the budget's seconds used {r['used']!r} are more than any budget")
    for key in ("horizon", "step_s"):
        if r.get(key) is not None:
            (count if key == "horizon" else number)(r[key], key)
    costs = r.get("costs", {})
    if not isinstance(costs, dict):
        raise ValueError("the budget's costs are not a record")
    for what, c in costs.items():
        if not (isinstance(c, list) and len(c) == 2):
            raise ValueError(f"the budget's {what} cost {c!r} is not [every, seconds]")
        count(c[0], f"{what} interval")
        number(c[1], f"{what} seconds")
    for key in ("mark", "window"):
        pair = r.get(key, [0, 0.0])
        if pair is None and key == "mark" and r.get("horizon") is None:
            continue
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError(f"the budget's {key} {pair!r} is not [step, seconds]")
        count(pair[0], key)
        number(pair[1], key)
    count(r.get("fits", 0), "number of fits")


def on_resume(recorded, record, time_budget, max_steps, say):
    """(the horizon a resumed run follows (None: measure it), the budget record it continues (None: none)),
    given the checkpoint's recorded horizon and budget record. --max_steps caps the horizon as it caps a
    fresh run's."""
    def capped(h):
        return h if max_steps is None or h is None else min(h, max_steps)

    if time_budget and record is not None:
        h = capped(record.get("horizon"))
        ends = f"its horizon at step {h:,} for now" if h is not None else "its speed not measured yet"
        say(f"resuming the --time_budget run: {record['used'] / 60:.2f} of its minutes used, {ends}")
        return h, record
    if recorded is None:
        if time_budget:
            say("note: the checkpoint was written before its run measured its speed: --time_budget measures "
                "it again from here")
        return max_steps if not time_budget else None, None
    if not time_budget:
        say(f"note: the checkpoint's run had --time_budget, which set its horizon to {recorded:,} steps; without "
            f"--time_budget this run's schedule ends at --max_steps {max_steps} instead (add --time_budget "
            "to keep the checkpoint's schedule)")
        return max_steps, None
    say(f"resuming on the recorded horizon of {capped(recorded):,} steps (a checkpoint from before --time_budget "
        "fitted its horizon again as it went: it is not measured again)")
    return capped(recorded), None
