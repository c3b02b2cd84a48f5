"""The message format: the envelope a job's body is, and the names of the headers pgtasks
reads.

A job is a pgmq message whose body is the envelope::

    {"v": 1, "task": "myproj.tasks.send_welcome_email", "args": [42], "kwargs": {"lang": "en"}}

``args`` and ``kwargs`` are optional. Metadata rides in pgmq's ``headers`` column (see
``HEADER_*``), so any language that can call ``pgmq.send`` (or ``pgtasks.send`` /
``pgtasks.defer`` in SQL) can enqueue work. Unknown top-level keys are ignored, so later
versions can add fields.

Encoding is orjson: JSON natives, ``datetime``/``date``/``time`` (ISO 8601), ``UUID``,
``Enum`` (its value), dataclasses (as objects), plus ``Decimal`` (as a string) and objects with
pydantic's ``model_dump``. Decoding parses and validates the envelope only; restoring the
hinted types of the arguments is `shapes` and `hints`' work (see docs/messages.md for the
table). orjson reads a non-integer or an integer beyond 64 bits as a double; where a hint
needs such a number exactly, the body is read again with the standard library's json, every
number exact (`Envelope.exactly`). Ordinary messages are read once, by orjson.

A task's result is encoded the same way, but stricter (`dumps_result`), since it is kept in
jsonb to come back as it was: NaN and the infinities (which orjson writes as null) and NUL
characters (which jsonb refuses) are refused, and so is anything the value's own code raises.
Each check costs a scan of the bytes; the value is looked at again only when the scan finds
a ``null`` or a ``\\u0000`` escape.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import orjson

from ..exceptions import EnvelopeError, MessageTooLarge, SerializationError

VERSION = 1
HEADER_IDEMPOTENCY_KEY = "idempotency_key"
HEADER_RELEASED = "x-pgtasks-released"
HEADER_EXPIRES = "x-pgtasks-expires"  # seconds after the enqueue, or an ISO time
HEADER_WORKFLOW = "x-pgtasks-workflow"  # {"id": workflow, "step": its place}
"""Attempts given back to a message by worker stops (``read_ct`` only grows, so a release
counts them here instead)."""
HEADER_SCHEDULED_AT = "x-pgtasks-scheduled-at"
"""The tick a scheduled job was enqueued for (ISO 8601, UTC): ``current_job().scheduled_at``."""
HEADER_SCHEDULE = "x-pgtasks-schedule"
"""The name of the schedule that enqueued a job."""
RESERVED_HEADER_PREFIX = "x-pgtasks-"
"""Headers whose names start with this are pgtasks' own."""


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
    """orjson with pgtasks' extra types; integers beyond 64 bits (which orjson refuses)
    through the standard library's encoder, with the same conversions."""
    try:
        return orjson.dumps(value, default=_default)
    except orjson.JSONEncodeError as exc:
        if "64-bit" not in str(exc):
            raise
    try:
        text = json.dumps(value, default=_default_wide, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:  # NaN or infinity beside a wide integer
        raise TypeError(f"cannot encode {type(value).__qualname__}: {exc}") from None
    return text.encode()


def _default_wide(value: Any) -> Any:
    """What orjson converts by itself, for the standard library's encoder."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return _default(value)


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
        data = dumps(body)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise SerializationError(
            f"cannot encode the arguments of task {task!r}: {_culprit(args, kwargs)}: {exc}"
        ) from None
    if has_nul(data):
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


def has_nul(data: bytes) -> bool:
    """Whether JSON text (as `dumps` writes it) holds a NUL character: the escape ``\\u0000``
    may also be the end of a string's text ``\\\\u0000`` (a backslash, then "u0000"), so
    what the scan finds is confirmed on the decoded value. One that cannot be decoded again
    counts as holding one (the safe side: jsonb would refuse a real one)."""
    if b"\\u0000" not in data:
        return False
    try:
        return _has_nul(json.loads(data))
    except (ValueError, RecursionError):
        return True


def _has_nul(value: Any) -> bool:
    """Whether decoded JSON holds a NUL character, in a string or a key."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _culprit_nul(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    for i, value in enumerate(args):
        if has_nul(dumps(value)):
            return f"positional argument {i}"
    for key, value in kwargs.items():
        if has_nul(dumps(value)):
            return f"argument {key!r}"
    return "an argument"


NOT_FINITE = "it holds a float that is not a JSON number (NaN or an infinity)"
_OUT_OF_RANGE = "Out of range float values"  # the standard library's encoder says so


def dumps_result(value: Any) -> bytes:
    """`dumps` for a value that is kept to come back as it was (a task's result). Raises
    `ValueError` saying why it cannot be: it could not be encoded (whatever the encoder or
    the value's own code, a ``model_dump``, raised; nesting too deep), it holds NaN or an
    infinity (which orjson writes as null, and JSON has no number for), or it contains a
    NUL character (which jsonb cannot store)."""
    try:
        data = dumps(value)
    except BaseException as exc:
        # Synchronous: no cancellation of the worker's can arrive in here, so whatever was
        # raised (a CancelledError or a SystemExit included) came from the value's own code.
        raise ValueError(f"could not be encoded: {_unencodable(exc)}") from None
    if b"null" in data and not _finite(value):
        raise ValueError(f"could not be encoded: {NOT_FINITE}")
    if has_nul(data):
        raise ValueError("contains a NUL character, which PostgreSQL's jsonb cannot store")
    return data


def _finite(value: Any) -> bool:
    """Whether every float in ``value`` is a JSON number: the standard library's encoder,
    told to, refuses NaN and the infinities where orjson writes null. A value it cannot
    encode for another reason counts as finite (that reason is the one to tell)."""
    try:
        json.dumps(value, default=_default_wide, allow_nan=False)
    except ValueError as exc:
        return _OUT_OF_RANGE not in str(exc)
    except Exception:
        return True
    return True


def _unencodable(exc: BaseException) -> str:
    """What went wrong when a value could not be encoded, for a person to read."""
    text = _text(exc)
    what = text if isinstance(exc, TypeError) else f"{type(exc).__qualname__}: {text}"
    cause = exc.__cause__  # orjson raises its own error from the one a default raised
    if cause is not None:
        what += f" ({type(cause).__qualname__}: {_text(cause)})"
    if isinstance(exc, RecursionError) or "Recursion limit reached" in text:
        return f"it is nested too deeply ({what})"
    if _OUT_OF_RANGE in text:  # the standard library's encoder (a wide int beside it)
        return NOT_FINITE
    return what


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # an exception whose __str__ raises
        return f"<unprintable {type(exc).__qualname__}>"


# --- decoding ------------------------------------------------------------------------------


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
    if type(body) is not str and not isinstance(body, str | bytes):
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
    if version != VERSION or type(version) is bool:  # True == 1 in Python, not in JSON
        raise EnvelopeError(
            f"the message body has envelope version {version!r}; this pgtasks reads "
            f'version {VERSION} (a "v": {VERSION} key)'
        )
    # the exact type first: JSON reads into these, and the check costs next to nothing
    task = body.get("task")
    if (type(task) is not str and not isinstance(task, str)) or not task:
        raise EnvelopeError(f'the message body has no task name ("task": {task!r})')
    args = body.get("args")
    kwargs = body.get("kwargs")
    if args is None:
        args = []
    elif type(args) is not list and not isinstance(args, list):
        raise EnvelopeError(f'"args" of task {task!r} is a JSON {_json_type(args)}, not an array')
    if kwargs is None:
        kwargs = {}
    elif type(kwargs) is not dict and not isinstance(kwargs, dict):
        raise EnvelopeError(
            f'"kwargs" of task {task!r} is a JSON {_json_type(kwargs)}, not an object'
        )
    return Envelope(task, args, kwargs, text, exact)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
