"""The value checks shared by the methods' parameters, the protocols' options, the harness's
configuration and its command line, and the one lookup every registry uses.

A check is a function value -> None when the value is valid, else the requirement it breaks
("must be a number in [0, 1]"), so that each caller can name the value in its own words.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

Check = Callable[[object], Optional[str]]


def is_integer(value) -> bool:
    """An int that is not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float that is not a bool (NaN and infinity are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def ratio(value) -> Optional[str]:
    return None if is_number(value) and 0.0 <= value <= 1.0 else "must be a number in [0, 1]"


def non_negative(value) -> Optional[str]:
    return None if is_number(value) and value >= 0 else "must be a number >= 0"


def positive(value) -> Optional[str]:
    return None if is_number(value) and value > 0 else "must be a number > 0"


def positive_int(value) -> Optional[str]:
    return None if is_integer(value) and value >= 1 else "must be a positive integer"


def non_negative_int(value) -> Optional[str]:
    return None if is_integer(value) and value >= 0 else "must be an integer >= 0"


def integer_at_least(low: int) -> Check:
    def check(value) -> Optional[str]:
        return None if is_integer(value) and value >= low else f"must be an integer >= {low}"
    return check


def boolean(value) -> Optional[str]:
    return None if isinstance(value, bool) else "must be true or false"


def one_of(*choices) -> Check:
    def check(value) -> Optional[str]:
        if value in choices:
            return None
        return f"is not valid; valid choices: {', '.join(map(str, choices))}"
    return check


def problem(name: str, value, check: Check) -> Optional[str]:
    """"NAME VALUE REQUIREMENT" when `value` fails `check`, else None."""
    broken = check(value)
    return None if broken is None else f"{name} {value!r} {broken}"


def require(name: str, value, check: Check) -> None:
    """ValueError naming the value and its requirement when `value` fails `check`."""
    message = problem(name, value, check)
    if message is not None:
        raise ValueError(message)


def unknown(kind: str, name, table, hint: str = "") -> Optional[str]:
    """"unknown KIND 'NAME'; valid KINDs: ..." when `name` is not in `table` (every registry of
    the project answers an unknown name with these words; `hint` is appended), else None."""
    if name in table:
        return None
    return (f"unknown {kind} {name!r}; valid {kind}s: {', '.join(map(str, table))}"
            + (f"; {hint}" if hint else ""))


def lookup(kind: str, name, table, hint: str = "", error: type = ValueError):
    """table[name], or `error` with the message of `unknown`."""
    message = unknown(kind, name, table, hint)
    if message is not None:
        raise error(message)
    return table[name]


@dataclass(frozen=True)
class Option:
    """A protocol's own option, declared once on the protocol (`OPTIONS`): the constructor
    keyword and its default, the record of every cell, the harness's cell key, YAML key and
    command-line flag (--NAME-WITH-DASHES) all come from this declaration."""
    name: str
    default: object
    doc: str
    check: Check
    choices: tuple = ()  # the valid values, when there is a short list of them

    def require(self, value) -> None:
        require(self.name, value, self.check)


def choice(name: str, default, doc: str, choices: tuple) -> Option:
    """An option that takes one of a few values."""
    return Option(name, default, doc, one_of(*choices), tuple(choices))
