"""Typed, range-checked command-line values, and the parser that reports bad input in one line.

Every number a command takes is declared with :func:`integer` or :func:`number`, so ``--batch-size 0``,
``--per-class 2.5`` or ``--kv-budget 2`` stop at parsing with one line naming the flag, the valid range and the
value given, before any model is loaded.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def _show(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _bounds(minimum: float | None, maximum: float | None, exclusive_minimum: bool = False) -> str:
    if minimum is not None and maximum is not None:
        return f"in {'(' if exclusive_minimum else '['}{_show(minimum)}, {_show(maximum)}]"
    if minimum is not None:
        return f"{'>' if exclusive_minimum else '>='} {_show(minimum)}"
    return f"<= {_show(maximum)}" if maximum is not None else ""


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer (``3``, not ``2.5`` or ``3.0``) in [minimum, maximum]."""
    what = " ".join(filter(None, ["an integer", _bounds(minimum, maximum)]))

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(minimum: float | None = None, maximum: float | None = None,
           exclusive_minimum: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [minimum, maximum] (``(minimum, maximum]`` if ``exclusive_minimum``)."""
    what = " ".join(filter(None, ["a number", _bounds(minimum, maximum, exclusive_minimum)]))

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        too_low = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
        if not math.isfinite(value) or too_low or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a parser that raises ValueError: its message becomes the flag's error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (the flag, the problem, where to read more)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
