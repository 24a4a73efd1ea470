"""[training run] --time_budget: how many steps fit in a run's minutes, so that the learning-rate schedule ends when
the time is up. The budget shapes the run; --max_time only stops it.

    budget = TimeBudget(minutes, world, cap=args.max_steps)
    while True:                                    # train.py's loop, first thing each iteration
        if budget.measured(run.step):              # True once, on every rank at the same step
            run.end_at(budget.horizon(run.step, evaluate, eval_interval, save, save_interval))

The first step is a warm-up (it allocates the buffers) and is not timed; the steps after it are
timed until 10 of them and 20 s have passed, or a tenth of the budget has since the start. The
horizon is then the most steps for which the steps left at that speed, plus the periodic
evaluations and checkpoints that fall before it (one of each run and timed right then, when any
falls before it), fit in what is left of the budget. --max_steps, when given, caps it. The final
evaluation and checkpoint come after the budget. Rank 0's clock decides and every rank gets its
numbers, so all ranks agree on the step and the horizon. The horizon is recorded in every later
checkpoint (TrainState.horizon): a resumed run continues on it and never measures again.
"""
import time

clock = time.monotonic  # the one clock the budget reads (tests put a fake one here)

MEASURE_STEPS, MEASURE_SECONDS, MEASURE_SHARE = 10, 20.0, 0.1


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
    def __init__(self, minutes, world, cap=None):
        self.minutes, self.seconds, self.world, self.cap = minutes, 60.0 * minutes, world, cap
        self.start = self.first = None  # the clock when training starts, and after its first step
        self.start_step = None
        self.done = False
        self.step_s, self.costs = None, {}  # what it measured: seconds a step, {what: (every, seconds)}

    def measured(self, step):
        """Called before each step with the updates done so far; True (once) when the speed is known,
        or when --max_steps is reached first."""
        if self.done:
            return False
        now = clock()
        if self.start is None:
            self.start, self.start_step = now, step
        if self.cap is not None and step >= self.cap:
            self.done = True
        elif step == self.start_step + 1:
            self.first = now
        elif step > self.start_step + 1:
            timed = step - self.start_step - 1
            enough = (timed >= MEASURE_STEPS and now - self.first >= MEASURE_SECONDS) or \
                now - self.start >= MEASURE_SHARE * self.seconds
            self.done = bool(self.world.bcast(enough))  # rank 0's clock decides for every rank
            self.step_s = (now - self.first) / timed
        return self.done

    def horizon(self, step, evaluate=None, eval_every=0, save=None, save_every=0):
        """The step the run ends at, once measured(step) said True. evaluate and save (callables, or None
        when the run does none) are run and timed once each when periodic ones fall before the horizon.
        A timed checkpoint was written before the horizon was known: the caller writes it again, with
        the horizon, and the budget keeps the time for that second write."""
        if self.cap is not None and step >= self.cap:
            return self.cap
        # what fits without the periodic work: every rank then runs the same evaluation and checkpoint
        rough = self.world.bcast(fit(step, self.seconds - (clock() - self.start), self.step_s, self.cap))
        self.costs = {}
        for what, work, every in (("evaluation", evaluate, eval_every), ("checkpoint", save, save_every)):
            if work is not None and periodic(every, step, rough):
                t = clock()
                work()
                self.costs[what] = (every, clock() - t)
        again = self.costs.get("checkpoint", (0, 0.0))[1]
        left = self.seconds - (clock() - self.start) - again
        return self.world.bcast(fit(step, left, self.step_s, self.cap, self.costs.values()))

    def describe(self, step, horizon):
        """What the log says once the horizon is fixed."""
        capped = f" (--max_steps {self.cap})" if horizon == self.cap else ""
        if self.step_s is None:
            return f"--time_budget {self.minutes:g} min: --max_steps {self.cap} came before the speed was measured"
        work = "".join(f", {s:.2f} s a{'n' if what[0] == 'e' else ''} {what} every {every} steps"
                       for what, (every, s) in self.costs.items())
        return (f"--time_budget {self.minutes:g} min: {self.step_s:.3f} s a step (steps {self.start_step + 2}-{step})"
                f"{work}: the run ends at step {horizon:,}{capped}, where the learning-rate schedule ends")


def on_resume(recorded, time_budget, max_steps, say):
    """The horizon a resumed run follows (None: measure it), given the checkpoint's recorded one."""
    if recorded is None:
        if time_budget:
            say("note: the checkpoint was written before its run measured its speed: --time_budget measures "
                "it again from here")
        return max_steps if not time_budget else None
    if not time_budget:
        say(f"note: the checkpoint's run had --time_budget, which set its horizon to {recorded:,} steps; without "
            f"--time_budget this run's schedule ends at --max_steps {max_steps} instead (add --time_budget "
            "to keep the checkpoint's schedule)")
        return max_steps
    say(f"resuming on the recorded horizon of {recorded:,} steps (--time_budget does not measure again)")
    return recorded
