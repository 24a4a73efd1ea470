"""--time_budget (budget.py): the horizon follows the measured speed, the schedule ends there, a resumed
run keeps the recorded horizon, every MPI rank agrees on it; and --preset laptop. Clocks are fakes
(budget.clock), never sleeps."""
import os
import subprocess
import sys

import numpy as np
import pytest

import budget
import distributed
import train
import train_flags
from checkpoint import load_checkpoint, read_meta
from helpers import MPI_ENV, MPIEXEC, REPO, metrics, needs_mpi, numbers, tiny_flags
from helpers import data  # noqa: F401  (a fixture)


class Ticks:
    """A clock that moves on by `tick` seconds each time it is read (a run's clock readings are
    deterministic, so its horizon is too)."""

    def __init__(self, tick):
        self.t, self.tick = 0.0, tick

    def __call__(self):
        self.t += self.tick
        return self.t


class Manual:
    """A clock the test sets."""
    t = 0.0

    def __call__(self):
        return self.t


class Ranks:
    """A world of several ranks seen from one: bcast hands out rank 0's values (given)."""
    is_root = False

    def __init__(self, rank0_values):
        self.values = iter(rank0_values)

    def bcast(self, obj):
        return next(self.values)


def budget_flags(data, save_dir, **over):
    """A tiny run on a 30 s budget: the measurement (a tenth of it, 3 s) ends within the warmup."""
    return tiny_flags(data, save_dir, **dict(dict(max_steps=None, time_budget=0.5, warmup_steps=30, eval_interval=0,
                                                  save_interval=0, workers=1), **over))


def same_weights(a, b):
    a, b = load_checkpoint(a), load_checkpoint(b)
    for name in (*a.params, *a.arrays):
        x, y = (a.params[name], b.params[name]) if name in a.params else (a.arrays[name], b.arrays[name])
        assert np.array_equal(x, y), name


def budget_record(save_dir):
    [rec] = [r for r in metrics(save_dir) if r["type"] == "budget"]
    return rec


# ----------------------------------------------------------------------------- the arithmetic

def test_periodic_counts_the_work_strictly_between_now_and_the_horizon():
    assert budget.periodic(100, 34, 338) == 3        # 100, 200, 300
    assert budget.periodic(100, 100, 200) == 0       # 200 is the final one, 100 is done
    assert budget.periodic(100, 99, 201) == 2
    assert budget.periodic(0, 0, 1000) == 0 and budget.periodic(10, 50, 50) == 0


def test_fit_is_the_longest_run_whose_steps_and_periodic_work_fit():
    assert budget.fit(10, 100.0, 1.0) == 110
    assert budget.fit(10, 100.0, 1.0, cap=50) == 50
    assert budget.fit(10, 100.0, 2.0) == 60
    # evaluations of 5 s every 20 steps: 80 steps and 4 of them (20, 40, 60, 80) take 100 s
    assert budget.fit(10, 100.0, 1.0, costs=[(20, 5.0)]) == 90
    assert budget.fit(10, -3.0, 1.0) == 10 and budget.fit(10, 0.5, 1.0) == 10  # no time left: stop now
    assert budget.fit(10, 1.0, 0.0, cap=1000) == 1000  # a clock that did not move: the cap


def test_the_first_step_is_not_timed_and_the_horizon_follows_the_speed():
    clock, world = Manual(), distributed.Solo()

    def measure(first_s, step_s, minutes=10):
        b, clock.t = budget.TimeBudget(minutes, world), 0.0
        step = 0
        while not b.measured(step):
            clock.t += first_s if step == 0 else step_s  # then the step is taken
            step += 1
        return step, b.step_s, b.horizon(step)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(budget, "clock", clock)
        # 600 s: a tenth of it is up after 60 s, the first step's 50 s included
        step, step_s, h = measure(first_s=50.0, step_s=1.0)
        assert (step, step_s) == (11, 1.0) and h == step + 600 - 60
        step, step_s, h = measure(first_s=50.0, step_s=2.0)
        assert (step, step_s) == (6, 2.0) and h == step + (600 - 60) // 2
        # fast steps: 10 timed steps and 20 s, whichever comes last (below a tenth of the budget)
        step, step_s, h = measure(first_s=5.0, step_s=0.5)
        assert (step, step_s) == (41, 0.5) and h == step + (600 - 25) * 2


def test_every_rank_takes_rank_0s_decision_and_horizon():
    world = Ranks([False, True, 77, 70])  # rank 0: not yet, yes; rough horizon, horizon
    with pytest.MonkeyPatch.context() as m:
        m.setattr(budget, "clock", Ticks(1000.0))  # this rank's clock says the budget is long gone
        b = budget.TimeBudget(1, world)
        assert [b.measured(s) for s in range(4)] == [False, False, False, True]
        assert b.horizon(3) == 70


def test_on_resume_keeps_the_recorded_horizon_only_under_a_budget():
    said = []
    assert budget.on_resume(120, 15, None, said.append) == 120 and "recorded horizon of 120" in said[-1]
    assert budget.on_resume(None, 15, None, said.append) is None and "measures it again" in said[-1]
    assert budget.on_resume(120, None, 5000, said.append) == 5000 and "add --time_budget" in said[-1]
    n = len(said)
    assert budget.on_resume(None, None, 5000, said.append) == 5000 and len(said) == n  # a plain run: no note


# ----------------------------------------------------------------------------- train.py

def test_the_horizon_follows_the_speed_and_the_run_is_the_plain_run_of_that_many_steps(data, tmp_path,
                                                                                     monkeypatch, capsys):
    horizons = {}
    for tick in (0.5, 0.25):
        d = str(tmp_path / f"t{tick}")
        monkeypatch.setattr(budget, "clock", Ticks(tick))
        assert train.main(budget_flags(data, d)) == 0
        rec = budget_record(d)
        assert rec["seconds_per_step"] == tick and rec["minutes"] == 0.5
        final = load_checkpoint(os.path.join(d, "checkpoint_final.npz"))
        assert final.meta["step"] == final.meta["horizon"] == rec["horizon"]
        assert final.meta["train_args"]["max_steps"] is None
        horizons[tick] = rec["step"], rec["horizon"]
    out = capsys.readouterr().out
    assert "--time_budget 0.5 min: 0.250 s a step" in out and "where the learning-rate schedule ends" in out
    (k1, h1), (k2, h2) = horizons[0.5], horizons[0.25]
    assert 1.9 < (h2 - k2) / (h1 - k1) < 2.1  # twice the speed, twice the steps left
    # the measurement ended within the warmup: the budgeted run is the run of --max_steps horizon
    plain = str(tmp_path / "plain")
    assert train.main(budget_flags(data, plain, time_budget=None, max_steps=h2)) == 0
    same_weights(os.path.join(plain, "checkpoint_final.npz"), os.path.join(tmp_path / "t0.25", "checkpoint_final.npz"))
    numbers = [[(r["step"], r["loss"], r["lr"]) for r in metrics(p) if r["type"] == "train"]
               for p in (plain, str(tmp_path / "t0.25"))]
    assert numbers[0] == numbers[1] and numbers[0][-1][2] == pytest.approx(1e-3, rel=1e-2)  # ends near min_lr


def test_a_resumed_run_keeps_the_recorded_horizon_and_ends_where_the_uninterrupted_one_ends(data, tmp_path,
                                                                                           monkeypatch, capsys):
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    flags = dict(warmup_steps=5, eval_interval=10, save_interval=20)  # decaying while measured; periodic work
    monkeypatch.setattr(budget, "clock", Ticks(0.5))
    assert train.main(budget_flags(data, whole, **flags)) == 0
    rec = budget_record(whole)
    k, h = rec["step"], rec["horizon"]
    assert rec["evaluation_seconds"] == 0.5 and rec["checkpoint_seconds"] == 0.5  # one tick each
    assert any(r["type"] == "eval" and r["step"] == k for r in metrics(whole))  # the timed evaluation, logged
    names = sorted(p for p in os.listdir(whole) if p.endswith(".npz"))
    assert f"checkpoint_step_{k}.npz" in names and len(names) >= 3
    for name in names:  # the timed checkpoint was written again, with the horizon: every one records it
        assert read_meta(os.path.join(whole, name))["horizon"] == h, name
    # resumed from a later checkpoint on a clock ten times slower: the same horizon, the same weights
    os.makedirs(part)
    last = max((n for n in names if n.startswith("checkpoint_step_")), key=lambda n: int(n[16:-4]))
    monkeypatch.setattr(budget, "clock", Ticks(5.0))
    capsys.readouterr()
    assert train.main(budget_flags(data, part, resume=os.path.join(whole, last), **flags)) == 0
    out = capsys.readouterr().out
    assert f"recorded horizon of {h}" in out and "--time_budget 0.5 min:" not in out and "changed flags" not in out
    assert read_meta(os.path.join(part, "checkpoint_final.npz"))["step"] == h
    same_weights(os.path.join(part, "checkpoint_final.npz"), os.path.join(whole, "checkpoint_final.npz"))
    assert train.main(budget_flags(data, part, resume=True, **flags)) == 0  # a finished budgeted run
    assert f"already >= the {h} steps its --time_budget fixed" in capsys.readouterr().out


def test_max_steps_caps_the_budget_and_stopping_early_keeps_it_resumable(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget, "clock", Ticks(0.01))  # fast steps: far more than 40 fit
    d = str(tmp_path / "cap")
    assert train.main(budget_flags(data, d, max_steps=40)) == 0
    assert budget_record(d)["horizon"] == 40 and read_meta(os.path.join(d, "checkpoint_final.npz"))["step"] == 40
    assert "(--max_steps 40)" in capsys.readouterr().out
    d = str(tmp_path / "tiny_cap")  # the cap comes before the measurement ends
    assert train.main(budget_flags(data, d, max_steps=2)) == 0
    assert read_meta(os.path.join(d, "checkpoint_final.npz"))["step"] == 2
    # a budgeted checkpoint resumed without --time_budget: --max_steps decides, with a note
    e = str(tmp_path / "more")
    assert train.main(budget_flags(data, e, time_budget=None, max_steps=50,
                                   resume=os.path.join(tmp_path / "cap", "checkpoint_final.npz"))) == 0
    assert "add --time_budget" in capsys.readouterr().out
    assert read_meta(os.path.join(e, "checkpoint_final.npz"))["step"] == 50


def test_bad_time_budgets_are_one_line_errors(data, tmp_path):
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit) as e:
            train.main(budget_flags(data, str(tmp_path / "ck"), time_budget=bad))
        assert str(e.value.code) == f"error: --time_budget must be a positive number of minutes (got {float(bad)})"
    proc = subprocess.run([sys.executable, "train.py", "--train_data", "x", "--time_budget", "soon"],
                          cwd=os.path.dirname(os.path.abspath(train.__file__)), capture_output=True, text=True)
    assert proc.returncode == 2 and "--time_budget: invalid float value: 'soon'" in proc.stderr


def test_a_damaged_recorded_horizon_is_refused(data, tmp_path, monkeypatch):
    from checkpoint import save_checkpoint
    monkeypatch.setattr(budget, "clock", Ticks(0.5))
    d = str(tmp_path / "ck")
    assert train.main(budget_flags(data, d)) == 0
    ck = load_checkpoint(os.path.join(d, "checkpoint_final.npz"))
    bad = str(tmp_path / "bad.npz")
    save_checkpoint(bad, ck.config, ck.params, dict(ck.meta, horizon=-5), ck.arrays)
    with pytest.raises(SystemExit) as e:
        train.main(budget_flags(data, str(tmp_path / "r"), resume=bad))
    assert "horizon -5 is not a number of steps" in str(e.value.code)


# ----------------------------------------------------------------------------- --preset laptop

def parse(argv):
    parser = train_flags.build_parser()
    argv = ["--train_data", "x", *argv]
    args = parser.parse_args(argv)
    train_flags.apply_defaults(args, train_flags.given_flags(parser, argv))
    train_flags.check_args(args)
    return args


def test_the_laptop_preset_sets_every_model_and_optimizer_flag():
    parser = train_flags.build_parser()
    groups = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
    # what a recipe does not choose: which preset or folder, how long in steps, the seed, the hardware
    # and SGD's momentum (the recipe's optimizer is AdamW)
    not_recipe = {"preset", "init_from", "max_steps", "seed", "workers", "device", "momentum"}
    assert (groups["model"] | groups["optimization"]) - not_recipe <= set(train_flags.PRESETS["laptop"])
    args = parse(["--preset", "laptop"])
    assert (args.vocab_size, args.d_model, args.n_layers, args.learning_rate, args.time_budget, args.max_steps) == \
        (4096, 256, 4, 2e-3, 15, None)
    train_flags.config_from_flags(vars(args))  # a model the code builds


def test_max_steps_given_with_the_laptop_preset_drops_its_budget_unless_the_budget_is_given_too():
    args = parse(["--preset", "laptop", "--max_steps", "300"])
    assert (args.max_steps, args.time_budget, args.learning_rate) == (300, None, 2e-3)
    args = parse(["--preset", "laptop", "--max_steps", "300", "--time_budget", "5"])
    assert (args.max_steps, args.time_budget) == (300, 5.0)  # the budget, capped at 300 steps
    args = parse(["--preset", "laptop", "--time_budget", "30", "--learning_rate", "1e-3"])
    assert (args.max_steps, args.time_budget, args.learning_rate) == (None, 30.0, 1e-3)
    assert parse([]).max_steps == train_flags.MAX_STEPS and parse([]).time_budget is None


# ----------------------------------------------------------------------------- MPI

RANKED_CLOCKS = """import os, sys
sys.path.insert(0, os.getcwd())
import budget, train
rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))


class Ticks:
    def __init__(self, tick):
        self.t, self.tick = 0.0, tick

    def __call__(self):
        self.t += self.tick
        return self.t


budget.clock = Ticks(0.5 if rank == 0 else 2.0)  # rank 1's clock says its steps are 4 times slower
sys.exit(train.main(sys.argv[1:]))
"""


@needs_mpi
def test_two_ranks_take_rank_0s_horizon_and_train_what_two_workers_train(data, tmp_path, monkeypatch):
    flags = dict(eval_interval=10, save_interval=20, batch_size=7)  # a timed evaluation and checkpoint, 4 + 3 rows
    runner = tmp_path / "ranked_clocks.py"
    runner.write_text(RANKED_CLOCKS)
    ranks_dir, workers_dir = str(tmp_path / "ranks"), str(tmp_path / "workers")
    run = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(runner), *budget_flags(data, ranks_dir, **flags)],
                         cwd=REPO, env=MPI_ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    monkeypatch.setattr(budget, "clock", Ticks(0.5))
    assert train.main(budget_flags(data, workers_dir, **dict(flags, workers=2))) == 0
    assert budget_record(ranks_dir)["horizon"] == budget_record(workers_dir)["horizon"]
    assert numbers(ranks_dir) == numbers(workers_dir)
    same_weights(os.path.join(ranks_dir, "checkpoint_final.npz"), os.path.join(workers_dir, "checkpoint_final.npz"))
