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
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import inspect
import types
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import orjson

from .exceptions import EnvelopeError, MessageTooLarge, SerializationError

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


@dataclasses.dataclass(frozen=True)
class Envelope:
    """A decoded message body."""

    task: str
    args: list[Any]
    kwargs: dict[str, Any]


def decode(body: str | bytes | Any) -> Envelope:
    """Parse and validate a message body; raises `EnvelopeError` saying what is wrong."""
    if isinstance(body, str | bytes):
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise EnvelopeError(f"the message body is not JSON: {exc}") from None
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
    return Envelope(task, args, kwargs)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


# --- restoring types from hints -----------------------------------------------------------

Converter = Callable[[Any], Any]
_JSON_NATIVE = (str, int, float, bool, type(None), Any, object)


def converter_for(hint: Any) -> Converter | None:
    """A function that turns the JSON form of ``hint`` back into it, or None when the JSON
    value is already right (JSON natives, unknown or unannotated types)."""
    if hint in _JSON_NATIVE or hint is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return converter_for(typing.get_args(hint)[0])
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        convs = [(a, converter_for(a)) for a in members]
        if all(c is None for _, c in convs):
            return None
        return _union(convs)
    if origin in (list, set, frozenset, tuple) or origin in _ABSTRACT_SEQUENCES:
        item_args = typing.get_args(hint)
        if origin is tuple and item_args and item_args[-1] is not Ellipsis:
            slots = [converter_for(a) for a in item_args]
            return lambda v: tuple(c(x) if c else x for c, x in zip(slots, v, strict=False))
        item = converter_for(item_args[0]) if item_args else None
        container = origin if origin in (list, set, frozenset, tuple) else list
        if item is None and container is list:
            return None
        return lambda v: container(item(x) if item else x for x in v)
    if origin in (dict,) or origin in _ABSTRACT_MAPPINGS:
        kv = typing.get_args(hint)
        value_conv = converter_for(kv[1]) if len(kv) == 2 else None
        if value_conv is None:
            return None
        return lambda v: {k: value_conv(x) for k, x in v.items()}
    if not isinstance(hint, type):
        return None
    return _SCALARS.get(hint) or _class_converter(hint)


_ABSTRACT_SEQUENCES = {
    typing.get_origin(typing.Sequence[int]),
    typing.get_origin(typing.Iterable[int]),
    typing.get_origin(typing.Collection[int]),
}
_ABSTRACT_MAPPINGS = {typing.get_origin(typing.Mapping[str, int])}


def _union(convs: list[tuple[Any, Converter | None]]) -> Converter:
    # A member whose JSON form needs no conversion (str, int, list[int], ...) may take the
    # value as it is; when every member needs one and none accepts it, the value is wrong.
    lenient = any(conv is None for _, conv in convs)

    def convert(value: Any) -> Any:
        if value is None:
            return None
        for member, conv in convs:
            if isinstance(member, type) and isinstance(value, member) and conv is None:
                return value
            if conv is not None:
                try:
                    return conv(value)
                except (TypeError, ValueError, KeyError, ArithmeticError):
                    continue
        if lenient:
            return value
        names = " | ".join(getattr(m, "__name__", repr(m)) for m, _ in convs)
        raise ValueError(f"{value!r} is not a valid {names}")

    return convert


def _datetime(value: Any) -> Any:
    return dt.datetime.fromisoformat(value) if isinstance(value, str) else value


def _date(value: Any) -> Any:
    return dt.date.fromisoformat(value) if isinstance(value, str) else value


def _time(value: Any) -> Any:
    return dt.time.fromisoformat(value) if isinstance(value, str) else value


def _uuid(value: Any) -> Any:
    return uuid.UUID(value) if isinstance(value, str) else value


def _decimal(value: Any) -> Any:
    return Decimal(str(value)) if isinstance(value, str | int | float) else value


_SCALARS: dict[type, Converter] = {
    dt.datetime: _datetime,
    dt.date: _date,
    dt.time: _time,
    uuid.UUID: _uuid,
    Decimal: _decimal,
}


def _class_converter(cls: type) -> Converter | None:
    if issubclass(cls, enum.Enum):
        return lambda v: v if isinstance(v, cls) else cls(v)
    if dataclasses.is_dataclass(cls):
        fields: dict[str, Converter | None] | None = None

        def build(value: Any) -> Any:
            nonlocal fields
            if not isinstance(value, dict):
                return value
            if fields is None:  # built on first use: a dataclass may refer to itself
                try:
                    hints = typing.get_type_hints(cls)
                except Exception:  # unresolvable forward references: leave values as they are
                    hints = {}
                fields = {
                    f.name: converter_for(hints.get(f.name, Any)) for f in dataclasses.fields(cls)
                }
            return cls(**{k: _apply(fields.get(k), v) for k, v in value.items()})

        return build
    validate = getattr(cls, "model_validate", None)
    if callable(validate):  # pydantic v2 models, without depending on pydantic
        return lambda v: v if isinstance(v, cls) else validate(v)
    return None


def signature_converters(fn: Callable[..., Any]) -> dict[str, Converter]:
    """Per-parameter converters for a task function; parameters that need none are left out.
    Hints that cannot be resolved (forward references to missing names) are ignored."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:
        hints = {}
    out: dict[str, Converter] = {}
    for name, param in inspect.signature(fn).parameters.items():
        hint = hints.get(name, param.annotation)
        conv = converter_for(hint)
        if conv is None:
            continue
        if param.kind is param.VAR_POSITIONAL:
            out[name] = _each_item(conv)
        elif param.kind is param.VAR_KEYWORD:
            out[name] = _each_value(conv)
        else:
            out[name] = conv
    return out


def _apply(conv: Converter | None, value: Any) -> Any:
    return conv(value) if conv is not None else value


def _each_item(conv: Converter) -> Converter:
    return lambda v: tuple(conv(x) for x in v)


def _each_value(conv: Converter) -> Converter:
    return lambda v: {k: conv(x) for k, x in v.items()}
