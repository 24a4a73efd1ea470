"""The range of a numeric flag, in one place: an argparse type that parses it, refuses NaN, infinity and
values outside the range with one line, and says the range in --help.

    from flag_types import COUNT, SECONDS, Number, Parser
    p = Parser(description=...)                      # argparse's, its errors one line: "error: argument ..."
    p.add_argument("--steps", type=COUNT, default=5, help=f"timed steps: {COUNT} (default 5)")
    p.add_argument("--tol", type=Number(float, 0, 1, low_open=True), ...)   # a number in (0, 1]

The same object checks a value that did not come from a command line (config.py's model fields, a
Hugging Face config.json): Number.check(value, name) raises ValueError naming it. The ranges a flag
shares with others live here (COUNT, SEED, ...) or, for the model's sizes, in config.FIELD_RANGES;
every script that takes such a flag uses the same object.
"""
import argparse
import math
import numbers


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose mistakes (a flag out of its range, an unknown flag, a missing argument) end
    as every user error of the project does (errors.py): one line, `error: ...` (with the hint to see --help),
    exit code 1."""

    def error(self, message):
        self.exit(1, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default worth showing."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Number:
    """An int or float flag's range: low <= value <= high (each end open or closed, None: no bound), finite."""

    def __init__(self, kind, low=None, high=None, low_open=False, high_open=False):
        if kind not in (int, float):
            raise ValueError(f"Number is for int or float flags, got {kind!r}")
        self.kind, self.low, self.high = kind, low, high
        self.low_open, self.high_open = low_open, high_open
        self.__name__ = "integer" if kind is int else "number"  # argparse names the type in some messages

    def __str__(self):
        """The range in words: "an integer >= 1", "a number in (0, 1]", "an integer from 1 to 4096"."""
        noun = "an integer" if self.kind is int else "a number"
        low, high = _show(self.low), _show(self.high)
        if self.low is not None and self.high is not None:
            if not self.low_open and not self.high_open:
                return f"{noun} from {low} to {high}"
            return f"{noun} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {high}"
        return f"a finite {'integer' if self.kind is int else 'number'}"

    def holds(self, value):
        """Whether value (already a number) is in the range."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def check(self, value, name):
        """value, if it is a number of this kind in the range (an int for an int, any real for a float, never a
        bool); else ValueError(f"{name} must be <range>, got <value>")."""
        kind_ok = isinstance(value, numbers.Integral if self.kind is int else numbers.Real) and \
            not isinstance(value, bool)
        if not kind_ok or not self.holds(value):
            raise ValueError(f"{name} must be {self}, got {value!r}")
        return value

    def __call__(self, text):
        """argparse's type: the flag's text as a number in the range, or ArgumentTypeError saying the range."""
        try:
            value = self.kind(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self}, got {text!r}") from None
        if not self.holds(value):
            raise argparse.ArgumentTypeError(f"must be {self}, got {text}")
        return value


def _show(bound):
    if bound is None:
        return ""
    if isinstance(bound, int) and bound >= 1 << 10 and bound & (bound - 1) == 0:
        return f"{bound} (2^{bound.bit_length() - 1})"
    if isinstance(bound, float) and bound.is_integer() and abs(bound) < 1e6:
        return str(int(bound))
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


# Ranges that several scripts' flags share
COUNT = Number(int, 1)                 # steps, samples, tokens, rounds, workers: at least one
COUNT_OR_ZERO = Number(int, 0)         # where 0 means none
SEED = Number(int, 0)                  # a random seed (NumPy's generators take any whole number >= 0)
SECONDS = Number(float, 0, 24 * 3600, low_open=True)          # a wait or a timeout
SECONDS_OR_ZERO = Number(float, 0, 24 * 3600)                 # a delay that may be none
PROBABILITY = Number(float, 0, 1, high_open=True)             # dropout
TEMPERATURE = Number(float, 0)        # sampling temperature: 0 is greedy
TOP_P = Number(float, 0, 1, low_open=True)
TOLERANCE = Number(float, 0, 1, low_open=True)                # a relative difference
