"""The message format, and how task arguments become JSON and come back.

A job is a pgmq message whose body is the envelope::

    {"v": 1, "task": "myproj.tasks.send_welcome_email", "args": [42], "kwargs": {"lang": "en"}}

``args`` and ``kwargs`` are optional. Metadata rides in pgmq's ``headers`` column (see
``HEADER_*``), so any language that can call ``pgmq.send`` (or ``pgtasks.send`` /
``pgtasks.defer`` in SQL) can enqueue work. Unknown top-level keys are ignored, so later
versions can add fields.

Encoding is orjson: JSON natives, ``datetime``/``date``/``time`` (ISO 8601), ``UUID``,
``Enum`` (its value), dataclasses (as objects), plus ``Decimal`` (as a string) and objects with
pydantic's ``model_dump``. Decoding restores those types from the task's type hints, so a
parameter annotated ``datetime`` receives a ``datetime``; see docs/messages.md for the table.

Each hint compiles once into a `Shape` that both ends use: ``defer`` refuses a Python value
of the wrong type before anything is sent, and a worker refuses JSON of the wrong type (other
producers write messages too). orjson reads a non-integer or an integer beyond 64 bits as a
double; where a hint needs such a number exactly (``int``, ``Decimal``), the body is read
again with the standard library's json, every number exact (`Envelope.exactly`). Ordinary
messages are read once, by orjson.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import inspect
import json
import math
import reprlib
import types
import typing
import uuid
from collections import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import orjson
import typing_extensions

from ..exceptions import EnvelopeError, MessageTooLarge, SerializationError

VERSION = 1
HEADER_IDEMPOTENCY_KEY = "idempotency_key"


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, set | frozenset):
        return list(value)
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    raise TypeError(f"type {type(value).__qualname__} is not JSON serializable")


def dumps(value: Any) -> bytes:
    """orjson with pgtasks' extra types."""
    return orjson.dumps(value, default=_default)


# One call of a task: its name, positional and named arguments.
Call = tuple[str, tuple[Any, ...], Mapping[str, Any]]


def _envelope(task: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"v": VERSION, "task": task}
    if args:
        body["args"] = args  # orjson writes a tuple as an array
    if kwargs:
        body["kwargs"] = kwargs if type(kwargs) is dict else dict(kwargs)
    return body


def encode(
    task: str,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    max_size: int,
) -> str:
    """The envelope of one call, as JSON text. Raises `SerializationError` naming the argument
    that cannot be encoded, or `MessageTooLarge` over ``max_size`` bytes."""
    body = _envelope(task, args, kwargs)
    try:
        data = orjson.dumps(body, default=_default)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise SerializationError(
            f"cannot encode the arguments of task {task!r}: {_culprit(args, kwargs)}: {exc}"
        ) from None
    if b"\\u0000" in data and _has_nul(body):
        raise SerializationError(
            f"cannot encode the arguments of task {task!r}: {_culprit_nul(args, kwargs)} "
            "contains a NUL character (\\x00), which PostgreSQL's jsonb cannot store"
        )
    if len(data) > max_size:
        raise MessageTooLarge(
            f"the message for task {task!r} is {len(data):,} bytes, over the limit of "
            f"{max_size:,} bytes (App(max_message_size=...)); pass a reference to the data "
            "(an id, a URL) instead of the data itself"
        )
    return data.decode()


def encode_many(calls: Sequence[Call], *, max_size: int) -> str:
    """The envelopes of many calls as one JSON array (text), each element exactly what
    `encode` makes of its call, with the same checks. One orjson call for the lot: a batch
    costs a fraction of encoding its calls one by one. When the whole array may break a
    rule (an argument orjson refuses, a NUL, more than ``max_size`` bytes in all), each
    call is checked with `encode`, which raises for the first one that breaks it."""
    try:
        data: bytes | None = orjson.dumps(
            [_envelope(task, args, kwargs) for task, args, kwargs in calls], default=_default
        )
    except (TypeError, orjson.JSONEncodeError):
        data = None
    if data is None or len(data) > max_size or b"\\u0000" in data:
        for task, args, kwargs in calls:
            encode(task, args, kwargs, max_size=max_size)
    if data is None:  # every call encodes alone, so the batch should have: say so
        raise SerializationError(f"cannot encode a batch of {len(calls)} jobs as one array")
    return data.decode()


def _culprit(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    named = [(f"positional argument {i}", v) for i, v in enumerate(args)]
    named += [(f"argument {k!r}", v) for k, v in kwargs.items()]
    for label, value in named:
        try:
            dumps(value)
        except (TypeError, orjson.JSONEncodeError):
            return f"{label} ({type(value).__qualname__})"
    return "the arguments"


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_has_nul(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _has_nul(dataclasses.asdict(value))
    return False


def _culprit_nul(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    for i, value in enumerate(args):
        if _has_nul(value):
            return f"positional argument {i}"
    for key, value in kwargs.items():
        if _has_nul(value):
            return f"argument {key!r}"
    return "an argument"


# --- decoding -----------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Envelope:
    """A decoded message body.

    ``body`` is the text it was read from, kept so that a number orjson could only read as
    a double can be read again exactly (`exactly`). ``exact`` is true when the body was read
    that way already: integers of any size as `int`, other numbers as `Decimal`. Treat it as
    immutable (it is not frozen: one is made per message, and a frozen dataclass costs five
    times as much to create).
    """

    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    body: str | bytes | None = dataclasses.field(default=None, compare=False, repr=False)
    exact: bool = dataclasses.field(default=False, compare=False)

    def exactly(self) -> Envelope:
        """The same message read again with every number exact. Raises `ValueError` when
        that is not possible (no body text, or a number too long to read)."""
        if self.exact:
            return self
        if self.body is None:
            raise ValueError(
                "a number in the message may have been rounded, and the message text is not "
                "available to read it exactly"
            )
        try:
            return _checked(_loads_exact(self.body), self.body, exact=True)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"the message cannot be read with exact numbers: {exc}") from None


def decode(body: str | bytes | Any) -> Envelope:
    """Parse and validate a message body; raises `EnvelopeError` saying what is wrong.

    Bodies are read with orjson. One that orjson refuses only for a number beyond a double's
    range is read exactly instead (see `Envelope.exactly`); binding then decides whether the
    number fits its parameter.
    """
    if not isinstance(body, str | bytes):
        return _checked(body, None, exact=False)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "number" not in str(exc):  # orjson: "number is infinity when parsed as double"
            raise EnvelopeError(f"the message body is not JSON: {exc}") from None
        try:
            parsed = _loads_exact(body)
        except (ValueError, RecursionError):
            raise EnvelopeError(
                f"a number is out of range: the message body has a number that cannot be read "
                f"({exc})"
            ) from None
        return _checked(parsed, body, exact=True)
    return _checked(parsed, body, exact=False)


def _loads_exact(body: str | bytes) -> Any:
    return json.loads(body, parse_float=Decimal, parse_int=int, parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _checked(body: Any, text: str | bytes | None, *, exact: bool) -> Envelope:
    if not isinstance(body, dict):
        raise EnvelopeError(
            f"the message body is a JSON {_json_type(body)}, not an object "
            '{"v": 1, "task": ..., "args": [...], "kwargs": {...}}'
        )
    version = body.get("v")
    if version != VERSION or isinstance(version, bool):  # True == 1 in Python, not in JSON
        raise EnvelopeError(
            f"the message body has envelope version {body.get('v')!r}; this pgtasks reads "
            f'version {VERSION} (a "v": {VERSION} key)'
        )
    task = body.get("task")
    if not isinstance(task, str) or not task:
        raise EnvelopeError(f'the message body has no task name ("task": {task!r})')
    args = body.get("args", [])
    kwargs = body.get("kwargs", {})
    if args is None:
        args = []
    if kwargs is None:
        kwargs = {}
    if not isinstance(args, list):
        raise EnvelopeError(f'"args" of task {task!r} is a JSON {_json_type(args)}, not an array')
    if not isinstance(kwargs, dict):
        raise EnvelopeError(
            f'"kwargs" of task {task!r} is a JSON {_json_type(kwargs)}, not an object'
        )
    return Envelope(task, args, kwargs, text, exact)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


# --- what a type hint accepts -------------------------------------------------------------
#
# Each hint compiles once into a `Shape`: the producer's check (are these the Python values
# the task declares?) and the worker's loaders (from the JSON that arrives to those values,
# refusing JSON of the wrong kind). Both come from the same walk of the hint, so they agree.

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


def _json_floats(value: Any) -> Any:
    """A value read exactly, with its numbers as orjson reads them (see `_as_read`)."""
    kind = type(value)
    if kind is list:
        return [_json_floats(x) for x in value]
    if kind is dict:
        return {k: _json_floats(x) for k, x in value.items()}
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


ANY = Shape("any value", None, None, _json_floats)


def _checker(expected: str, fits: Callable[[Any], bool]) -> Check:
    def check(value: Any) -> None:
        if not fits(value):
            raise Misfit(expected, value)

    return check


def _leaf(
    expected: str,
    fits: Callable[[Any], bool],
    load: Converter,
    wants_exact: Callable[[float], bool] | None = None,
    native: type | None = None,
) -> Shape:
    """A hint without items, loaded the same way from a body read either way."""
    return Shape(expected, _checker(expected, fits), load, load, wants_exact, native)


def _is(cls: type) -> Callable[[Any], bool]:
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


_NATIVES: dict[Any, Shape] = {
    int: _leaf("int", _is_int, _load_int, float.is_integer, int),
    float: _leaf("float", lambda v: isinstance(v, float) or _is_int(v), _load_float, None, float),
    str: _leaf("str", _is(str), _load_as(str, "str"), None, str),
    bool: _leaf("bool", _is(bool), _load_as(bool, "bool"), None, bool),
    type(None): _leaf("None", lambda v: v is None, _load_as(type(None), "None"), None, type(None)),
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

    return _leaf(expected, fits, load)


_SCALARS: dict[type, Shape] = {
    Decimal: _leaf("Decimal", _is(Decimal), _load_decimal, lambda _: True),
    dt.datetime: _parsed(dt.datetime, dt.datetime.fromisoformat, _is(dt.datetime)),
    # a datetime is a date to isinstance, but its ISO form is not a date's
    dt.date: _parsed(
        dt.date,
        dt.date.fromisoformat,
        lambda v: isinstance(v, dt.date) and not isinstance(v, dt.datetime),
    ),
    dt.time: _parsed(dt.time, dt.time.fromisoformat, _is(dt.time)),
    uuid.UUID: _parsed(uuid.UUID, uuid.UUID, _is(uuid.UUID)),
}


def _each(fn: Converter, items: Iterable[Any]) -> list[Any]:
    """``fn`` over ``items``; a `Misfit` says which item."""
    try:
        return [fn(x) for x in items]
    except Misfit as exc:
        for i, x in enumerate(items):  # again, to say where (only on the way to an error)
            try:
                fn(x)
            except Misfit:
                raise exc.within(f"[{i}]") from None
        raise


# origin -> (what the worker builds, what the producer may pass)
_SEQUENCES: dict[Any, tuple[type, type]] = {
    list: (list, list),
    tuple: (tuple, tuple),
    set: (set, set),
    frozenset: (frozenset, frozenset),
    abc.Sequence: (list, abc.Sequence),
    abc.MutableSequence: (list, abc.MutableSequence),
    abc.Collection: (list, abc.Collection),
    abc.Iterable: (list, abc.Iterable),
}
_NOT_SEQUENCES = (str, bytes, bytearray, abc.Mapping)  # iterable, but not an array in JSON
_MAPPINGS: dict[Any, type] = {dict: dict, abc.Mapping: abc.Mapping, abc.MutableMapping: dict}


def _sequence(origin: Any, item: Shape) -> Shape:
    builds, accepts = _SEQUENCES[origin]
    dots = ", ..." if origin is tuple else ""
    expected = f"{origin.__name__}[{item.expected}{dots}]"
    abstract = builds is not accepts
    item_check = item.check

    def check(value: Any) -> None:
        fits = isinstance(value, accepts) and not (abstract and isinstance(value, _NOT_SEQUENCES))
        if not fits:  # (not narrowing value's type: mypy would make it an object)
            raise Misfit(expected, value)
        if item_check is not None:
            _each(item_check, value)

    def loader(load_item: Converter | None) -> Converter:
        def load(value: Any) -> Any:
            if type(value) is not list and type(value) is not tuple:  # *args come as a tuple
                raise Misfit(expected, value)
            items = value if load_item is None else _each(load_item, value)
            return items if type(items) is builds else builds(items)

        return load

    return Shape(expected, check, loader(item.load), loader(item.load_exact))


def _fixed_tuple(slots: list[Shape]) -> Shape:
    expected = f"tuple[{', '.join(s.expected for s in slots)}]"
    size = len(slots)

    def check(value: Any) -> None:
        if not isinstance(value, tuple) or len(value) != size:
            raise Misfit(expected, value)
        for i, (shape, item) in enumerate(zip(slots, value, strict=True)):
            try:
                if shape.check is not None:
                    shape.check(item)
            except Misfit as exc:
                raise exc.within(f"[{i}]") from None

    def loader(loads: list[Converter | None]) -> Converter:
        def load(value: Any) -> Any:
            if type(value) not in (list, tuple) or len(value) != size:
                raise Misfit(expected, value)
            out = []
            for i, (conv, item) in enumerate(zip(loads, value, strict=True)):
                try:
                    out.append(item if conv is None else conv(item))
                except Misfit as exc:
                    raise exc.within(f"[{i}]") from None
            return tuple(out)

        return load

    return Shape(
        expected, check, loader([s.load for s in slots]), loader([s.load_exact for s in slots])
    )


def _mapping(origin: Any, key: Shape, value: Shape, expected: str | None = None) -> Shape:
    accepts = _MAPPINGS[origin]
    expected = expected or f"{origin.__name__}[{key.expected}, {value.expected}]"
    key_check, value_check = key.check, value.check

    def check(mapping: Any) -> None:
        fits = isinstance(mapping, accepts)
        if not fits:  # (not narrowing mapping's type: mypy would make it an object)
            raise Misfit(expected, mapping)
        for k, v in mapping.items() if key_check or value_check else ():
            if key_check is not None:
                try:
                    key_check(k)
                except Misfit:
                    raise Misfit(expected, mapping, f"a key {describe(k)}") from None
            try:
                if value_check is not None:
                    value_check(v)
            except Misfit as exc:
                raise exc.within(f"[{_REPR.repr(k)}]") from None

    def loader(load_value: Converter | None) -> Converter:
        def load(mapping: Any) -> Any:  # JSON keys are strings: only the values change
            if type(mapping) is not dict:
                raise Misfit(expected, mapping)
            if load_value is None:
                return mapping
            out = {}
            k = None
            try:
                for k, v in mapping.items():
                    out[k] = load_value(v)
            except Misfit as exc:
                raise exc.within(f"[{_REPR.repr(k)}]") from None
            return out

        return load

    return Shape(expected, check, loader(value.load), loader(value.load_exact))


def _union(members: list[Shape]) -> Shape:
    checks = [m.check for m in members if m.check is not None]
    loads = [m.load for m in members if m.load is not None]
    exact_loads = [m.load_exact for m in members if m.load_exact is not None]
    if len(checks) < len(members):  # a union with Any in it accepts anything
        return ANY
    expected = " | ".join(m.expected for m in members)
    optional = any(m is _NATIVES[type(None)] for m in members)
    wants = [m.wants_exact for m in members if m.wants_exact is not None]

    def wants_exact(number: float) -> bool:
        return any(w(number) for w in wants)

    def check(value: Any) -> None:
        if value is None and optional:
            return
        for member in checks:
            try:
                member(value)
                return
            except Misfit:
                continue
        raise Misfit(expected, value)

    def loader(member_loads: list[Converter], exact: bool) -> Converter:
        def load(value: Any) -> Any:
            if value is None and optional:
                return None
            if wants and not exact and type(value) is float and wants_exact(value):
                raise NeedsExact  # the first member that takes it decides, on the exact value
            refusal: Exception = Misfit(expected, value)
            for member in member_loads:  # in order: the first that takes the value wins
                try:
                    return member(value)
                except Misfit:
                    continue
                except (TypeError, ValueError) as exc:  # the right kind, but not valid
                    if isinstance(refusal, Misfit):
                        refusal = exc  # says more than "must be X | Y"
            raise refusal

        return load

    return Shape(
        expected,
        check,
        loader(loads, False),
        loader(exact_loads, True),
        wants_exact if wants else None,
    )


def _literal(values: tuple[Any, ...]) -> Shape:
    expected = f"Literal[{', '.join(repr(v) for v in values)}]"
    forms = [(v.value if isinstance(v, enum.Enum) else v, v) for v in values]  # JSON, Python

    def fits(value: Any) -> bool:
        return any(type(value) is type(v) and value == v for v in values)

    def load(value: Any) -> Any:
        for form, v in forms:
            if type(value) is type(form) and value == form:
                return v
        raise Misfit(expected, value)

    return _leaf(expected, fits, load)


def _enum(cls: type[enum.Enum]) -> Shape:
    def load(value: Any) -> Any:
        try:
            return cls(value)
        except ValueError:
            raise Misfit(cls.__name__, value) from None

    return _leaf(cls.__name__, _is(cls), load)


def _dataclass(cls: type) -> Shape:
    expected = cls.__name__
    fields: dict[str, Shape] | None = None

    def field_shapes() -> dict[str, Shape]:
        nonlocal fields
        if fields is None:  # on first use: a dataclass may refer to itself
            try:
                hints = typing.get_type_hints(cls)
            except Exception:  # unresolvable forward references: accept anything there
                hints = {}
            fields = {f.name: shape_for(hints.get(f.name, Any)) for f in dataclasses.fields(cls)}
        return fields

    def loader(exact: bool) -> Converter:
        def load(value: Any) -> Any:
            if type(value) is not dict:
                raise Misfit(expected, value)
            shapes = field_shapes()
            out = {}
            for key, item in value.items():
                shape = shapes.get(key)
                if shape is None:
                    unknown = f"an object with a field {_REPR.repr(key)}, which it does not have"
                    raise Misfit(expected, value, unknown)
                conv = shape.load_exact if exact else shape.load
                try:
                    out[key] = item if conv is None else conv(item)
                except Misfit as exc:
                    raise exc.within(f".{key}") from None
            return cls(**out)

        return load

    return Shape(expected, _checker(expected, _is(cls)), loader(False), loader(True))


def _model(cls: type, validate: Callable[[Any], Any]) -> Shape:
    """A pydantic (v2) model, without depending on pydantic; it validates itself."""
    return Shape(
        cls.__name__,
        _checker(cls.__name__, _is(cls)),
        validate,
        lambda v: validate(_json_floats(v)),  # what it would get from orjson
    )


@functools.cache
def _class_shape(cls: type) -> Shape:
    known = _NATIVES.get(cls) or _SCALARS.get(cls)
    if known is not None:
        return known
    if issubclass(cls, enum.Enum):
        return _enum(cls)
    if dataclasses.is_dataclass(cls):
        return _dataclass(cls)
    validate = getattr(cls, "model_validate", None)
    if callable(validate):
        return _model(cls, validate)
    return ANY  # a class pgtasks does not know: as before, no check and no conversion


_ANY_HINTS = (Any, object, inspect.Parameter.empty)


def shape_for(hint: Any) -> Shape:
    """The `Shape` of a type hint. Hints pgtasks does not know, or that are not resolved
    (a forward reference as a string), accept anything."""
    if any(hint is a for a in _ANY_HINTS):
        return ANY
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and (hint in _SEQUENCES or hint in _MAPPINGS):
        origin = hint  # bare list, dict, tuple, Sequence...: of anything
    if origin is typing.Annotated:
        return shape_for(args[0])
    if origin is typing.Union or origin is types.UnionType:
        return _union([shape_for(a) for a in args])
    if origin is typing.Literal:
        return _literal(args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return _fixed_tuple([shape_for(a) for a in args])
    if origin in _SEQUENCES:
        return _sequence(origin, shape_for(args[0]) if args else ANY)
    if origin in _MAPPINGS:
        key, value = (shape_for(args[0]), shape_for(args[1])) if len(args) == 2 else (ANY, ANY)
        return _mapping(origin, key, value)
    if isinstance(hint, typing.NewType):
        return shape_for(hint.__supertype__)
    if isinstance(hint, typing.TypeVar):
        return shape_for(hint.__bound__) if hint.__bound__ is not None else ANY
    if typing_extensions.is_typeddict(hint):
        return _mapping(dict, _NATIVES[str], ANY, hint.__name__)
    if isinstance(hint, type):
        return _class_shape(hint)
    return ANY


def signature_shapes(fn: Callable[..., Any]) -> dict[str, Shape]:
    """The `Shape` of each parameter of a task function, in the form `inspect.Signature.bind`
    gives its value: ``*args: X`` as ``tuple[X, ...]``, ``**kwargs: X`` as ``dict[str, X]``.
    """
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # a forward reference to a missing name: every hint as written
        hints = {}
    shapes: dict[str, Shape] = {}
    for name, param in inspect.signature(fn).parameters.items():
        shape = shape_for(hints.get(name, param.annotation))
        if param.kind is param.VAR_POSITIONAL:
            shape = _sequence(tuple, shape)
        elif param.kind is param.VAR_KEYWORD:
            shape = _mapping(dict, ANY, shape)  # the keys are parameter names
        shapes[name] = shape
    return shapes
