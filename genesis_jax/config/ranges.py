"""Where every number a user gives may lie, derived once from the type that carries it to the
device: a config key (through its annotation) and a command-line flag (through `flag`) share
these ranges, so a value that would overflow inside a jitted call is refused at the door."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np

INT32_MAX = int(np.iinfo(np.int32).max)  # steps, sizes, counts and token positions travel as int32
UINT32_MAX = int(np.iinfo(np.uint32).max)  # a PRNG seed is one uint32 word
FLOAT32_MAX = float(np.finfo(np.float32).max)  # rates and scales travel as float32


class RangeError(ValueError):
    """A number outside its range; the message names the range, the caller names the key."""


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float
    integer: bool
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        lo = _num(self.lo)
        return (
            f"{'an integer' if self.integer else 'a number'} within {'(' if self.lo_open else '['}{lo}, "
            f"{_num(self.hi)}{')' if self.hi_open else ']'}"
        )

    def check(self, value: Any) -> int | float:
        """`value` as this range's type, or RangeError saying what was expected."""
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (self.integer and not isinstance(value, int))
        ):
            raise RangeError(f"expected {self.describe()}")
        if not math.isfinite(value):
            raise RangeError(f"expected {self.describe()} (a finite number)")
        below = value <= self.lo if self.lo_open else value < self.lo
        above = value >= self.hi if self.hi_open else value > self.hi
        if below or above:
            raise RangeError(f"expected {self.describe()}")
        return value if self.integer else float(value)


def _num(x: float) -> str:
    if x == INT32_MAX:
        return "2**31 - 1"
    if x == UINT32_MAX:
        return "2**32 - 1"
    if abs(x) == FLOAT32_MAX:
        return "-3.4e38" if x < 0 else "3.4e38"
    return str(int(x)) if float(x).is_integer() else repr(x)


COUNT = Range(1, INT32_MAX, integer=True)
COUNT0 = Range(0, INT32_MAX, integer=True)
SEED = Range(0, UINT32_MAX, integer=True)
POSITIVE = Range(0.0, FLOAT32_MAX, integer=False, lo_open=True)
NONNEGATIVE = Range(0.0, FLOAT32_MAX, integer=False)
PROBABILITY = Range(0.0, 1.0, integer=False)
DECAY = Range(0.0, 1.0, integer=False, hi_open=True)  # an EMA decay or Adam beta: 1 would never move
FACTOR = Range(0.0, 1.0, integer=False, lo_open=True)  # a multiplier that shrinks but never zeroes
FINITE = Range(-FLOAT32_MAX, FLOAT32_MAX, integer=False)
OPEN_PROBABILITY = Range(0.0, 1.0, integer=False, lo_open=True, hi_open=True)  # neither never nor always

# Config annotations: `steps: Count = 10` is an int that `config` checks against COUNT.
Count = Annotated[int, COUNT]
Count0 = Annotated[int, COUNT0]
Seed = Annotated[int, SEED]
Positive = Annotated[float, POSITIVE]
NonNegative = Annotated[float, NONNEGATIVE]
Probability = Annotated[float, PROBABILITY]
Decay = Annotated[float, DECAY]
Factor = Annotated[float, FACTOR]
Finite = Annotated[float, FINITE]
OpenProbability = Annotated[float, OPEN_PROBABILITY]


def flag(r: Range) -> Callable[[str], int | float]:
    """An argparse `type=` that parses a flag's text and checks it against `r`."""

    def parse(text: str) -> int | float:
        try:
            value: int | float = int(text) if r.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {r.describe()}") from None
        try:
            return r.check(value)
        except RangeError as e:
            raise argparse.ArgumentTypeError(f"{text}: {e}") from None

    parse.__name__ = "integer" if r.integer else "number"
    return parse
