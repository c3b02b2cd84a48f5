"""What a type hint accepts: the `Shape` both ends of a job use.

Each hint compiles once (`hints.shape_for`) into a `Shape`: the producer's check (are these
the Python values the task declares?) and the worker's loaders (from the JSON that arrives
to those values, refusing JSON of the wrong kind). Both come from the same walk of the hint,
so they agree. This module holds the shape itself, the errors a misfit raises, and the
leaves: JSON natives and the scalars pgtasks writes as strings (``Decimal``, ``datetime``,
``date``, ``time``, ``UUID``), with the rules for numbers that orjson reads as doubles.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import reprlib
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

Converter = Callable[[Any], Any]
Check = Callable[[Any], None]


class NeedsExact(Exception):
    """Raised by a loader that meets a float where its hint needs an exact number (``int``,
    ``Decimal``): orjson reads every non-integer and every integer beyond 64 bits as a
    double, so the body must be read again exactly (`Envelope.exactly`)."""


class Misfit(TypeError):
    """A value that does not fit its type hint; `explain` says where and how."""

    def __init__(self, expected: str, value: Any, given: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.value = value
        self.given = given
        self.path = ""

    def within(self, step: str) -> Misfit:
        """The same misfit seen one level further out (``[2]``, ``['key']``, ``.field``)."""
        self.path = step + self.path
        return self

    def explain(self, what: str) -> str:
        given = self.given if self.given is not None else describe(self.value)
        return f"{what}{self.path} must be {self.expected}, got {given}"

    def __str__(self) -> str:
        return self.explain("the value")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdict = 4
_REPR.maxlevel = 2
_SHOWN = {str, int, float, bool, list, tuple, dict, set, frozenset, Decimal, uuid.UUID}
_SHOWN |= {dt.datetime, dt.date, dt.time}


def short_repr(value: Any) -> str:
    """``repr`` cut short (strings and numbers to 60 characters, containers to 4 items)."""
    return _REPR.repr(value)


def describe(value: Any) -> str:
    """A value as an error message shows it: short, escaped, with its type."""
    if value is None:
        return "None"
    kind = type(value)
    if kind in _SHOWN:
        try:
            return f"{_REPR.repr(value)} ({kind.__name__})"
        except ValueError:  # an int too long to print (sys.set_int_max_str_digits)
            pass
    return f"an instance of {kind.__qualname__}"


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    """What one type hint accepts.

    ``check`` (producer) raises `Misfit` for a Python value the hint does not accept.
    ``load`` (worker) turns the JSON value orjson read into what the task receives, raising
    `Misfit` or `ValueError` for one that does not fit, and `NeedsExact` for a float that
    may stand for a number the hint needs exactly; ``load_exact`` does the same for a body
    read exactly. A ``check`` or ``load`` of None: any value, as it is. ``wants_exact`` says
    whether a float here may stand for such a number. A value of exactly the type ``native``
    (a JSON native's) fits and stays as it is at both ends: the hot paths skip the calls.
    """

    expected: str
    check: Check | None
    load: Converter | None
    load_exact: Converter | None
    wants_exact: Callable[[float], bool] | None = None
    native: type | None = None


def json_floats(value: Any) -> Any:
    """A value read exactly, with its numbers as orjson reads them (see `_as_read`)."""
    kind = type(value)
    if kind is list:
        return [json_floats(x) for x in value]
    if kind is dict:
        return {k: json_floats(x) for k, x in value.items()}
    return _as_read(value)


def _number_text(number: int | Decimal) -> str:
    text = str(number)  # digits, a sign, a point, an exponent: nothing to escape
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"


_READ_INTS = range(-(2**63), 2**64)  # the integers orjson reads as int; others become floats


def _as_read(number: Any) -> Any:
    """A number read exactly as orjson reads it: non-integers and integers beyond 64 bits as
    floats. Raises `ValueError` for one beyond a float's range, which orjson cannot read."""
    kind = type(number)
    if (kind is int and number not in _READ_INTS) or kind is Decimal:
        try:
            result = float(number)
        except OverflowError:  # an int
            result = math.inf
        if math.isinf(result):
            raise ValueError(
                f"a number is out of range: {_number_text(number)} is beyond what a float "
                "(a double) can hold; annotate the parameter Decimal (or int) to receive it "
                "exactly"
            )
        return result
    return number


ANY = Shape("any value", None, None, json_floats)


def checker(expected: str, fits: Callable[[Any], bool]) -> Check:
    def check(value: Any) -> None:
        if not fits(value):
            raise Misfit(expected, value)

    return check


def leaf(
    expected: str,
    fits: Callable[[Any], bool],
    load: Converter,
    wants_exact: Callable[[float], bool] | None = None,
    native: type | None = None,
) -> Shape:
    """A hint without items, loaded the same way from a body read either way."""
    return Shape(expected, checker(expected, fits), load, load, wants_exact, native)


def is_a(cls: type) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, cls)


def _is_int(value: Any) -> bool:
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


def _load_int(value: Any) -> Any:
    kind = type(value)
    if kind is int:
        return value
    if kind is float and value.is_integer():
        raise NeedsExact  # maybe an integer beyond 64 bits, read as a double
    if kind is Decimal:
        raise Misfit("int", value, f"{_number_text(value)} (a number that is not an integer)")
    raise Misfit("int", value)


def _load_float(value: Any) -> Any:
    kind = type(value)
    if kind is float:
        return value
    if kind is int or kind is Decimal:  # a float parameter takes an int, as in Python
        return _as_read(value)
    raise Misfit("float", value)


def _load_as(kind: type, expected: str) -> Converter:
    def load(value: Any) -> Any:
        if type(value) is kind:
            return value
        raise Misfit(expected, value)

    return load


NATIVES: dict[Any, Shape] = {
    int: leaf("int", _is_int, _load_int, float.is_integer, int),
    float: leaf("float", lambda v: isinstance(v, float) or _is_int(v), _load_float, None, float),
    str: leaf("str", is_a(str), _load_as(str, "str"), None, str),
    bool: leaf("bool", is_a(bool), _load_as(bool, "bool"), None, bool),
    type(None): leaf("None", lambda v: v is None, _load_as(type(None), "None"), None, type(None)),
}


def _load_decimal(value: Any) -> Any:
    kind = type(value)
    if kind is str:  # how pgtasks writes a Decimal
        try:
            return Decimal(value)
        except ArithmeticError:
            raise Misfit("Decimal", value) from None
    if kind is int or kind is Decimal:
        return Decimal(value)
    if kind is float:
        raise NeedsExact  # written as a JSON number (by SQL, say): its digits, not a double
    raise Misfit("Decimal", value)


def _parsed(cls: type, parse: Callable[[str], Any], fits: Callable[[Any], bool]) -> Shape:
    """A type written as a string: datetime, date, time, UUID."""
    expected = cls.__name__

    def load(value: Any) -> Any:
        if type(value) is str:
            try:
                return parse(value)
            except ValueError:
                pass
        raise Misfit(expected, value)

    return leaf(expected, fits, load)


SCALARS: dict[type, Shape] = {
    Decimal: leaf("Decimal", is_a(Decimal), _load_decimal, lambda _: True),
    dt.datetime: _parsed(dt.datetime, dt.datetime.fromisoformat, is_a(dt.datetime)),
    # a datetime is a date to isinstance, but its ISO form is not a date's
    dt.date: _parsed(
        dt.date,
        dt.date.fromisoformat,
        lambda v: isinstance(v, dt.date) and not isinstance(v, dt.datetime),
    ),
    dt.time: _parsed(dt.time, dt.time.fromisoformat, is_a(dt.time)),
    uuid.UUID: _parsed(uuid.UUID, uuid.UUID, is_a(uuid.UUID)),
}
