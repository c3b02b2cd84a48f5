"""The message format: encoding a call, decoding and validating a body, and restoring argument
types from the task's hints (the table in docs/messages.md)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import inspect
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from typing import Annotated, Any, Literal, Optional, Union

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgtasks import EnvelopeError, MessageTooLarge, SerializationError, Task
from pgtasks.serialization import envelope, hints

MiB = 1024 * 1024
# Text JSON and jsonb can hold: no NUL (jsonb refuses it), no lone surrogates (not UTF-8).
CHARS = st.characters(codec="utf-8", exclude_characters="\x00")
TEXT = st.text(CHARS, max_size=30)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Address:
    street: str
    since: dt.date


@dataclasses.dataclass(frozen=True)
class User:
    id: uuid.UUID
    name: str
    joined: dt.datetime
    balance: Decimal
    color: Color
    home: Address
    previous: list[Address] = dataclasses.field(default_factory=list)
    nickname: str | None = None


@dataclasses.dataclass(frozen=True)
class Node:
    """Refers to itself: the converter must not recurse forever while it is built."""

    label: str
    at: dt.date
    child: Node | None = None


def roundtrip(fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Encode a call of ``fn`` as a producer does, decode it as a worker does, and return
    the arguments the function would receive."""
    task = Task(fn, name="tests.roundtrip")
    body = task.s(*args, **kwargs).body(MiB)
    decoded = envelope.decode(body)
    assert decoded.task == "tests.roundtrip"
    args, kwargs = task.bind_message(decoded)
    return dict(inspect.signature(fn).bind(*args, **kwargs).arguments)


# --- round trips, one hint at a time ------------------------------------------------------

UTC = dt.timezone.utc
IST = dt.timezone(dt.timedelta(hours=5, minutes=30))
AN_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")


async def takes_datetime(value: dt.datetime) -> None: ...
async def takes_date(value: dt.date) -> None: ...
async def takes_time(value: dt.time) -> None: ...
async def takes_uuid(value: uuid.UUID) -> None: ...
async def takes_decimal(value: Decimal) -> None: ...
async def takes_color(value: Color) -> None: ...
async def takes_level(value: Level) -> None: ...
async def takes_user(value: User) -> None: ...
async def takes_node(value: Node) -> None: ...
async def takes_optional(value: Optional[dt.datetime]) -> None: ...  # noqa: UP045
async def takes_pep604(value: dt.date | None) -> None: ...
async def takes_union(value: Union[int, uuid.UUID]) -> None: ...  # noqa: UP007
async def takes_list(value: list[dt.datetime]) -> None: ...
async def takes_nested_list(value: list[list[dt.date]]) -> None: ...
async def takes_sequence(value: Sequence[uuid.UUID]) -> None: ...
async def takes_dict(value: dict[str, uuid.UUID]) -> None: ...
async def takes_mapping(value: Mapping[str, list[Decimal]]) -> None: ...
async def takes_tuple(value: tuple[int, dt.datetime, Color]) -> None: ...
async def takes_var_tuple(value: tuple[uuid.UUID, ...]) -> None: ...
async def takes_int_tuple(value: tuple[int, ...]) -> None: ...
async def takes_set(value: set[int]) -> None: ...
async def takes_frozenset(value: frozenset[uuid.UUID]) -> None: ...
async def takes_annotated(value: Annotated[dt.datetime, "when"]) -> None: ...
async def takes_optional_users(value: list[User] | None) -> None: ...


ALICE = User(
    id=AN_ID,
    name="alice",
    joined=dt.datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=IST),
    balance=Decimal("12345678901234567890.000000001"),
    color=Color.GREEN,
    home=Address("1 Main St", dt.date(2020, 1, 1)),
    previous=[Address("2 Old Rd", dt.date(2010, 6, 30))],
)

ROUND_TRIPS: list[tuple[Callable[..., Awaitable[Any]], Any]] = [
    (takes_datetime, dt.datetime(2024, 5, 17, 8, 30, 1, 123_456, tzinfo=IST)),
    (takes_datetime, dt.datetime(2024, 5, 17, 8, 30, tzinfo=UTC)),
    (takes_datetime, dt.datetime(1999, 12, 31, 23, 59, 59)),  # naive stays naive
    (takes_date, dt.date(2024, 2, 29)),
    (takes_time, dt.time(23, 59, 58, 7)),
    (takes_uuid, AN_ID),
    (takes_decimal, Decimal("12345678901234567890.000000000000000001")),
    (takes_decimal, Decimal("-0.10")),
    (takes_color, Color.RED),
    (takes_level, Level.HIGH),
    (takes_user, ALICE),
    (takes_node, Node("a", dt.date(2020, 1, 1), Node("b", dt.date(2021, 2, 2)))),
    (takes_optional, None),
    (takes_optional, dt.datetime(2024, 1, 1, tzinfo=UTC)),
    (takes_pep604, dt.date(2024, 1, 2)),
    (takes_pep604, None),
    (takes_union, 7),
    (takes_union, AN_ID),
    (takes_list, [dt.datetime(2024, 1, 1, tzinfo=UTC), dt.datetime(2025, 1, 1, tzinfo=IST)]),
    (takes_nested_list, [[dt.date(2024, 1, 1)], [], [dt.date(2024, 1, 2), dt.date(2024, 1, 3)]]),
    (takes_sequence, [AN_ID, uuid.UUID(int=1)]),
    (takes_dict, {"a": AN_ID, "b": uuid.UUID(int=2)}),
    (takes_mapping, {"prices": [Decimal("1.10"), Decimal("2.25")]}),
    (takes_tuple, (1, dt.datetime(2024, 1, 1, tzinfo=UTC), Color.GREEN)),
    (takes_var_tuple, (AN_ID, uuid.UUID(int=3))),
    (takes_int_tuple, (1, 2, 3)),
    (takes_set, {1, 2, 3}),
    (takes_frozenset, frozenset({AN_ID})),
    (takes_annotated, dt.datetime(2024, 1, 1, 12, tzinfo=UTC)),
    (takes_optional_users, [ALICE]),
]


@pytest.mark.parametrize(
    ("fn", "value"),
    ROUND_TRIPS,
    ids=[f"{fn.__name__}-{type(value).__name__}" for fn, value in ROUND_TRIPS],
)
def test_argument_types_are_restored_from_hints(
    fn: Callable[..., Awaitable[Any]], value: Any
) -> None:
    restored = roundtrip(fn, value=value)["value"]
    assert restored == value
    assert type(restored) is type(value)


def test_decimal_keeps_every_digit_and_its_exponent() -> None:
    restored = roundtrip(takes_decimal, Decimal("0.100"))["value"]
    assert str(restored) == "0.100"  # a float would have made this 0.1


def test_aware_datetime_keeps_its_offset() -> None:
    when = dt.datetime(2024, 5, 17, 8, 30, tzinfo=IST)
    restored = roundtrip(takes_datetime, when)["value"]
    assert restored.utcoffset() == dt.timedelta(hours=5, minutes=30)


def test_nested_dataclasses_are_rebuilt_all_the_way_down() -> None:
    restored = roundtrip(takes_user, ALICE)["value"]
    assert isinstance(restored.home, Address)
    assert isinstance(restored.home.since, dt.date)
    assert isinstance(restored.previous[0], Address)
    assert isinstance(restored.balance, Decimal)
    assert restored.color is Color.GREEN


async def takes_varargs(*ids: uuid.UUID, **dates: dt.date) -> None: ...


def test_var_positional_and_var_keyword_items_are_converted() -> None:
    out = roundtrip(takes_varargs, AN_ID, uuid.UUID(int=5), start=dt.date(2024, 1, 1))
    assert out == {"ids": (AN_ID, uuid.UUID(int=5)), "dates": {"start": dt.date(2024, 1, 1)}}


async def takes_natives(
    a: int, b: str, c: float, d: bool, e: None, f: Any, g: list[int]
) -> None: ...


async def takes_unannotated(value, other: dict) -> None:  # type: ignore[no-untyped-def,type-arg]
    ...


def test_json_natives_and_unannotated_parameters_pass_through() -> None:
    natives = {"a": -(2**63), "b": "ü ☃ \U0001f600", "c": 1.5, "d": True, "e": None}
    natives |= {"f": {"x": [1, None]}, "g": [1, 2]}
    assert roundtrip(takes_natives, **natives) == natives
    when = "2024-01-01T00:00:00+00:00"
    assert roundtrip(takes_unannotated, when, {"k": when}) == {
        "value": when,  # no hint: the JSON string stays a string
        "other": {"k": when},
    }


# --- the body -----------------------------------------------------------------------------


async def keyword_only(user_id: int, *, lang: str = "en") -> None: ...
async def positional_only(a: int, /, b: int) -> None: ...


def test_body_is_a_versioned_envelope_with_arguments_by_name() -> None:
    task = Task(keyword_only, name="emails.send")
    body = orjson.loads(task.s(42, lang="fr").body(MiB))
    assert body == {"v": 1, "task": "emails.send", "kwargs": {"user_id": 42, "lang": "fr"}}


def test_positional_only_arguments_stay_positional() -> None:
    task = Task(positional_only, name="p.only")
    body = orjson.loads(task.s(1, 2).body(MiB))
    assert body == {"v": 1, "task": "p.only", "args": [1], "kwargs": {"b": 2}}
    decoded = envelope.decode(orjson.dumps(body))
    assert task.bind_message(decoded) == ((1, 2), {})


def test_encode_omits_empty_args_and_kwargs() -> None:
    assert orjson.loads(envelope.encode("t", (), {}, max_size=MiB)) == {"v": 1, "task": "t"}


@settings(max_examples=100, deadline=None, database=None)
@given(
    kwargs=st.dictionaries(
        st.text(CHARS, min_size=1, max_size=20),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(min_value=-(2**63), max_value=2**64 - 1)
            | st.floats(allow_nan=False, allow_infinity=False)
            | TEXT,
            lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
            max_leaves=10,
        ),
        max_size=5,
    )
)
def test_json_native_kwargs_round_trip_exactly(kwargs: dict[str, Any]) -> None:
    body = envelope.encode("prop.task", (), kwargs, max_size=16 * MiB)
    decoded = envelope.decode(body)
    assert decoded == envelope.Envelope("prop.task", [], kwargs)
    assert envelope.decode(body.encode()) == decoded  # bytes decode the same as text


@settings(max_examples=100, deadline=None, database=None)
@given(
    when=st.datetimes(timezones=st.just(UTC) | st.none()),
    day=st.dates(),
    ident=st.uuids(),
    amount=st.decimals(allow_nan=False, allow_infinity=False),
    colors=st.lists(st.sampled_from(Color), max_size=5),
)
def test_typed_arguments_round_trip(
    when: dt.datetime, day: dt.date, ident: uuid.UUID, amount: Decimal, colors: list[Color]
) -> None:
    async def typed(
        when: dt.datetime, day: dt.date, ident: uuid.UUID, amount: Decimal, colors: list[Color]
    ) -> None: ...

    out = roundtrip(typed, when=when, day=day, ident=ident, amount=amount, colors=colors)
    assert out == {"when": when, "day": day, "ident": ident, "amount": amount, "colors": colors}
    assert str(out["amount"]) == str(amount)


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("{not json", "the message body is not JSON"),
        (b"\xff\xfe", "the message body is not JSON"),
        ("[1, 2]", "the message body is a JSON array, not an object"),
        ('"hello"', "the message body is a JSON string, not an object"),
        ("42", "the message body is a JSON number, not an object"),
        ("null", "the message body is a JSON null, not an object"),
        ('{"task": "t"}', "envelope version None; this pgtasks reads version 1"),
        ('{"v": 2, "task": "t"}', "envelope version 2; this pgtasks reads version 1"),
        ('{"v": "1", "task": "t"}', "envelope version '1'"),
        ('{"v": true, "task": "t"}', "envelope version True"),
        ('{"v": 1}', 'has no task name ("task": None)'),
        ('{"v": 1, "task": ""}', "has no task name (\"task\": '')"),
        ('{"v": 1, "task": 5}', 'has no task name ("task": 5)'),
        ('{"v": 1, "task": "t", "args": {"a": 1}}', "\"args\" of task 't' is a JSON object"),
        ('{"v": 1, "task": "t", "args": "x"}', "\"args\" of task 't' is a JSON string"),
        ('{"v": 1, "task": "t", "kwargs": [1]}', "\"kwargs\" of task 't' is a JSON array"),
        ('{"v": 1, "task": "t", "kwargs": 3}', "\"kwargs\" of task 't' is a JSON number"),
    ],
)
def test_decode_says_what_is_wrong(body: str | bytes, expected: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        envelope.decode(body)
    assert expected in str(info.value)


def test_decode_accepts_null_arguments_and_ignores_unknown_keys() -> None:
    body = '{"v": 1, "task": "t", "args": null, "kwargs": null, "future": {"x": 1}}'
    assert envelope.decode(body) == envelope.Envelope("t", [], {})


def test_decode_reads_the_version_as_a_json_number() -> None:
    # 1.0 is the number 1 in JSON (a producer may write it so); true is not
    assert envelope.decode('{"v": 1.0, "task": "t"}') == envelope.Envelope("t", [], {})


def test_decode_accepts_an_already_parsed_object() -> None:
    assert envelope.decode({"v": 1, "task": "t", "args": [1]}) == envelope.Envelope("t", [1], {})


def test_decode_accepts_subclasses_in_an_already_parsed_object() -> None:
    class Name(str):
        pass

    class Items(list[int]):
        pass

    body = {"v": 1, "task": Name("t"), "args": Items([1]), "kwargs": OrderedDict(a=2)}
    assert envelope.decode(body) == envelope.Envelope("t", [1], {"a": 2})


class Opaque:
    pass


def test_unencodable_keyword_argument_is_named() -> None:
    with pytest.raises(SerializationError) as info:
        envelope.encode("emails.send", (), {"user_id": 1, "attachment": Opaque()}, max_size=MiB)
    message = str(info.value)
    assert "task 'emails.send'" in message
    assert "argument 'attachment' (Opaque)" in message
    assert "user_id" not in message


def test_unencodable_positional_argument_is_named() -> None:
    with pytest.raises(SerializationError, match=r"positional argument 1 \(Opaque\)"):
        envelope.encode("t", (1, Opaque()), {}, max_size=MiB)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ({1: "non-string key"}, "str"),
        (dt.time(1, tzinfo=UTC), "tzinfo"),
        ("lone \ud800 surrogate", "UTF-8"),
    ],
    ids=["int-key", "aware-time", "surrogate"],
)
def test_values_json_cannot_hold_raise_serialization_error(value: Any, why: str) -> None:
    with pytest.raises(SerializationError) as info:
        envelope.encode("t", (), {"x": value}, max_size=MiB)
    assert "argument 'x'" in str(info.value)
    assert why in str(info.value)


def test_nul_characters_are_refused_with_the_argument_named() -> None:
    with pytest.raises(SerializationError, match=r"argument 'note' contains a NUL"):
        envelope.encode("t", (), {"ok": "fine", "note": ["a\x00b"]}, max_size=MiB)


def test_serialization_error_from_a_task_call_names_the_task() -> None:
    async def upload(blob: object) -> None: ...

    task = Task(upload, name="files.upload")
    with pytest.raises(SerializationError, match=r"task 'files.upload'.*argument 'blob'"):
        task.s(Opaque()).body(MiB)


def test_message_too_large_states_the_size_and_the_limit() -> None:
    kwargs = {"data": "x" * 2000}
    size = len(envelope.encode("big.task", (), kwargs, max_size=MiB).encode())
    with pytest.raises(MessageTooLarge) as info:
        envelope.encode("big.task", (), kwargs, max_size=size - 1)
    message = str(info.value)
    assert f"is {size:,} bytes" in message
    assert f"limit of {size - 1:,} bytes" in message
    assert "'big.task'" in message
    assert isinstance(info.value, SerializationError)
    # exactly at the limit is fine
    assert envelope.encode("big.task", (), kwargs, max_size=size)


def test_message_size_counts_bytes_not_characters() -> None:
    kwargs = {"s": "☃" * 100}  # 3 bytes each in UTF-8
    body = envelope.encode("t", (), kwargs, max_size=MiB)
    assert len(body.encode()) > len(body)
    with pytest.raises(MessageTooLarge):
        envelope.encode("t", (), kwargs, max_size=len(body))


def test_sets_and_models_are_encoded_as_json() -> None:
    class Model:
        def model_dump(self, mode: str) -> dict[str, Any]:
            assert mode == "json"
            return {"a": 1}

    body = orjson.loads(envelope.encode("t", (), {"s": {3}, "m": Model()}, max_size=MiB))
    assert body["kwargs"] == {"s": [3], "m": {"a": 1}}


def test_an_optional_specific_type_refuses_a_value_it_cannot_take() -> None:
    load = hints.shape_for(dt.datetime | None).load
    assert load is not None
    assert load(None) is None
    assert load("2026-01-02T03:04:05+00:00") == dt.datetime(
        2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc
    )
    with pytest.raises(TypeError, match=r"must be datetime \| None, got 'yesterday' \(str\)"):
        load("yesterday")


def test_a_union_with_a_json_native_member_keeps_other_values() -> None:
    load = hints.shape_for(dt.datetime | str).load
    assert load is not None
    assert load("not a date") == "not a date"


# --- batches (defer_many) ------------------------------------------------------------------


@settings(max_examples=50, deadline=None, database=None)
@given(
    calls=st.lists(
        st.tuples(
            st.text(CHARS, min_size=1, max_size=10),
            st.lists(INT64 | TEXT | st.none(), max_size=3).map(tuple),
            st.dictionaries(TEXT, INT64 | TEXT | st.booleans(), max_size=3),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_a_batch_is_the_array_of_what_encode_makes_of_each_call(
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]],
) -> None:
    batch = orjson.loads(envelope.encode_many(calls, max_size=MiB))
    assert batch == [orjson.loads(envelope.encode(t, a, k, max_size=MiB)) for t, a, k in calls]


def test_a_bad_call_in_a_batch_is_named_and_nothing_is_returned() -> None:
    calls: list[envelope.Call] = [("t.ok", (), {"i": 1}), ("t.bad", (), {"blob": Opaque()})]
    with pytest.raises(SerializationError, match=r"task 't.bad'.*argument 'blob' \(Opaque\)"):
        envelope.encode_many(calls, max_size=MiB)
    with pytest.raises(SerializationError, match=r"argument 'note' contains a NUL"):
        envelope.encode_many([("t", (), {"i": 1}), ("t", (), {"note": "a\x00"})], max_size=MiB)


def test_the_size_limit_holds_per_message_in_a_batch() -> None:
    one = ("t", (), {"data": "x" * 100})
    size = len(envelope.encode(*one, max_size=MiB).encode())
    # ten messages at the limit: the array is far over it, and that is fine
    assert len(orjson.loads(envelope.encode_many([one] * 10, max_size=size))) == 10
    big = ("t.big", (), {"data": "x" * 101})
    with pytest.raises(MessageTooLarge, match=r"'t.big' is .* over the limit"):
        envelope.encode_many([one, big, one], max_size=size)


def test_text_that_looks_like_an_escaped_nul_is_not_a_nul_in_a_batch() -> None:
    calls: list[envelope.Call] = [("t", (), {"s": "\\u0000"})]  # a backslash, then 'u0000'
    assert orjson.loads(envelope.encode_many(calls, max_size=MiB)) == [
        {"v": 1, "task": "t", "kwargs": {"s": "\\u0000"}}
    ]


# --- what a worker accepts: the JSON types of the hints, strictly ---------------------------


def bind_body(fn: Callable[..., Awaitable[Any]], body: str | bytes | dict[str, Any]) -> Any:
    """Decode a message body as a worker does and bind it to ``fn``; returns the value its
    one parameter ``value`` receives."""
    task = Task(fn, name="t")
    args, kwargs = task.bind_message(envelope.decode(body))
    return inspect.signature(fn).bind(*args, **kwargs).arguments["value"]


def body_with(value_json: str) -> str:
    return '{"v": 1, "task": "t", "kwargs": {"value": ' + value_json + "}}"


def bind_value(fn: Callable[..., Awaitable[Any]], value_json: str) -> Any:
    """`bind_body` of a message whose one argument ``value`` is ``value_json``."""
    return bind_body(fn, body_with(value_json))


async def takes_int(value: int) -> None: ...
async def takes_float(value: float) -> None: ...
async def takes_str(value: str) -> None: ...
async def takes_bool(value: bool) -> None: ...
async def takes_none(value: None) -> None: ...
async def takes_any(value: Any) -> None: ...
async def takes_int_or_float(value: int | float) -> None: ...
async def takes_address(value: Address) -> None: ...
async def takes_float_map(value: dict[str, float]) -> None: ...
async def takes_pair(value: tuple[int, str]) -> None: ...
async def takes_int_list(value: list[int]) -> None: ...


NOT_FITTING: list[tuple[Callable[..., Awaitable[Any]], str, str]] = [
    (takes_int, '"1"', "argument 'value' must be int, got '1' (str)"),
    (takes_int, "[2]", "argument 'value' must be int, got [2] (list)"),
    (takes_int, "true", "argument 'value' must be int, got True (bool)"),
    (takes_int, "null", "argument 'value' must be int, got None"),
    (takes_int, "4.5", "argument 'value' must be int, got 4.5 (float)"),
    (takes_int, "1.0", "argument 'value' must be int, got 1.0 (a number that is not an integer)"),
    (takes_int, "1e3", "must be int, got 1E+3 (a number that is not an integer)"),
    (takes_float, '"1.5"', "argument 'value' must be float, got '1.5' (str)"),
    (takes_float, "false", "argument 'value' must be float, got False (bool)"),
    (takes_str, "5", "argument 'value' must be str, got 5 (int)"),
    (takes_bool, "1", "argument 'value' must be bool, got 1 (int)"),
    (takes_none, "0", "argument 'value' must be None, got 0 (int)"),
    (takes_int_list, '[1, "2"]', "argument 'value'[1] must be int, got '2' (str)"),
    (takes_int_list, '{"a": 1}', "argument 'value' must be list[int], got {'a': 1} (dict)"),
    (takes_float_map, '{"a": "x"}', "argument 'value'['a'] must be float, got 'x' (str)"),
    (takes_pair, "[1]", "argument 'value' must be tuple[int, str], got [1] (list)"),
    (takes_pair, "[1, 2]", "argument 'value'[1] must be str, got 2 (int)"),
    (takes_color, '"purple"', "argument 'value' must be Color, got 'purple' (str)"),
    (takes_datetime, '"yesterday"', "argument 'value' must be datetime, got 'yesterday' (str)"),
    (takes_datetime, "5", "argument 'value' must be datetime, got 5 (int)"),
    (takes_decimal, '"abc"', "argument 'value' must be Decimal, got 'abc' (str)"),
    (takes_decimal, "true", "argument 'value' must be Decimal, got True (bool)"),
    (takes_uuid, '"x"', "argument 'value' must be UUID, got 'x' (str)"),
    (
        takes_address,
        '{"street": "s", "since": "not a date"}',
        "argument 'value'.since must be date, got 'not a date' (str)",
    ),
    (takes_optional, '"tomorrow"', "argument 'value' must be datetime | None, got 'tomorrow'"),
    (
        takes_address,
        '{"street": "s", "since": "2020-01-01", "zip\\u0007": 1}',
        "must be Address, got an object with a field 'zip\\x07', which it does not have",
    ),
]


@pytest.mark.parametrize(
    ("fn", "value_json", "message"),
    NOT_FITTING,
    ids=[f"{fn.__name__}-{value}" for fn, value, _ in NOT_FITTING],
)
def test_a_worker_refuses_json_of_the_wrong_type_naming_the_argument(
    fn: Callable[..., Awaitable[Any]], value_json: str, message: str
) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        bind_value(fn, value_json)
    assert message in str(info.value)


def test_a_worker_accepts_what_json_gives_each_hint() -> None:
    assert bind_value(takes_float, "1") == 1  # an int is a float, as in Python's typing
    assert bind_value(takes_int, "-9223372036854775808") == -(2**63)
    assert bind_value(takes_none, "null") is None
    assert bind_value(takes_int_or_float, "2.5") == 2.5
    assert bind_value(takes_any, '{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}
    assert bind_value(takes_pair, '[1, "a"]') == (1, "a")


# --- exact numbers: what a SQL producer writes as a JSON number ----------------------------

# what jsonb_build_object('amount', 1234567890.123456789, 'account', 98765432109876543210)
# reads as through jsonb::text
SQL_NUMBERS = "1234567890.123456789"
SQL_BIG_INT = "98765432109876543210"


async def takes_money(
    amount: Decimal, account: int, ratio: float, note: Any, amounts: list[Decimal]
) -> None: ...


def test_numbers_are_exact_where_the_hint_needs_it() -> None:
    task = Task(takes_money, name="t")
    body = (
        f'{{"v": 1, "task": "t", "kwargs": {{"amount": {SQL_NUMBERS}, "account": {SQL_BIG_INT}, '
        f'"ratio": {SQL_NUMBERS}, "note": [{SQL_NUMBERS}, {SQL_BIG_INT}], '
        '"amounts": [0.10, 1e-30, 12345678901234567890.5]}}'
    )
    assert orjson.loads(body)["kwargs"]["amount"] == 1234567890.1234567  # what orjson makes of it
    _, kwargs = task.bind_message(envelope.decode(body))
    assert kwargs["amount"] == Decimal(SQL_NUMBERS)
    assert str(kwargs["amount"]) == SQL_NUMBERS
    assert kwargs["account"] == int(SQL_BIG_INT)
    assert type(kwargs["account"]) is int
    # a float or an unannotated parameter gets what orjson gives, however the body was read
    assert kwargs["ratio"] == float(SQL_NUMBERS)
    assert kwargs["note"] == [float(SQL_NUMBERS), float(SQL_BIG_INT)]
    assert type(kwargs["note"][1]) is float
    assert [str(a) for a in kwargs["amounts"]] == ["0.10", "1E-30", "12345678901234567890.5"]


def test_a_dataclass_field_gets_its_exact_number() -> None:
    body = body_with(
        '{"id": "12345678-1234-5678-1234-567812345678", "name": "n", "joined": '
        '"2024-01-01T00:00:00+00:00", "balance": 0.30000000000000000001, "color": "red", '
        '"home": {"street": "s", "since": "2020-01-01"}}'
    )
    user = bind_body(takes_user, body)
    assert user.balance == Decimal("0.30000000000000000001")


def test_an_int_or_float_hint_takes_a_big_integer_exactly() -> None:
    assert bind_value(takes_int_or_float, SQL_BIG_INT) == int(SQL_BIG_INT)


def test_ordinary_messages_are_read_by_orjson_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_second_read(body: str | bytes) -> Any:
        raise AssertionError("an ordinary message was read a second time")

    monkeypatch.setattr(envelope, "_loads_exact", no_second_read)
    task = Task(takes_money_like, name="t")
    _, kwargs = task.bind_message(envelope.decode(roundtrip_body()))
    assert kwargs == {"value": {"a": Decimal("1.10")}, "other": 2**63 - 1, "rate": 0.25}
    assert bind_value(takes_int_or_float, "2.5") == 2.5
    assert bind_value(takes_float, "0.1") == 0.1
    assert bind_value(takes_any, "[1.5, 2]") == [1.5, 2]
    with pytest.raises(TypeError, match=r"must be int, got 4\.5"):
        bind_value(takes_int, "4.5")  # not an integer: no need to read it again to say so


async def takes_money_like(value: dict[str, Decimal], other: int = 0, rate: float = 0) -> None: ...


def roundtrip_body() -> str:
    """What pgtasks itself writes for Decimal and int arguments: strings and integers."""
    task = Task(takes_money_like, name="t")
    return task.s({"a": Decimal("1.10")}, other=2**63 - 1, rate=0.25).body(MiB)


def test_an_integral_float_without_the_message_text_cannot_be_trusted() -> None:
    body = {"v": 1, "task": "t", "kwargs": {"value": 1e20}}  # already parsed: no text
    with pytest.raises(ValueError, match="the message text is not available"):
        bind_body(takes_int, body)


# --- numbers beyond a double -----------------------------------------------------------------


def test_a_number_beyond_a_double_is_not_called_malformed() -> None:
    body = body_with("1e400")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)  # what the worker used to dead-letter as "not JSON"
    decoded = envelope.decode(body)
    assert decoded.kwargs == {"value": Decimal("1e400")}
    assert bind_body(takes_decimal, body) == Decimal("1e400")
    for fn in (takes_float, takes_any, takes_int_or_float):
        with pytest.raises(
            ValueError, match=r"argument 'value': a number is out of range: 1E\+400"
        ):
            bind_body(fn, body)
    with pytest.raises(TypeError, match=r"must be int, got 1E\+400 \(a number that is not an"):
        bind_body(takes_int, body)


def test_an_integer_beyond_a_double_reaches_an_int_or_decimal_exactly() -> None:
    digits = "1" + "0" * 400  # jsonb writes 1e400 this way
    body = body_with(digits)
    assert bind_body(takes_int, body) == 10**400
    assert bind_body(takes_decimal, body) == Decimal(10**400)
    with pytest.raises(ValueError, match=r"a number is out of range: 1000.*\(401 characters\)"):
        bind_body(takes_any, body)


def test_a_number_that_cannot_be_read_at_all_says_so() -> None:
    body = body_with("1" * 5000)  # beyond Python's int limit, and beyond a double
    with pytest.raises(EnvelopeError, match="a number is out of range"):
        envelope.decode(body)


def test_positional_arguments_are_read_exactly_too() -> None:
    task = Task(positional_only, name="p.only")
    body = f'{{"v": 1, "task": "p.only", "args": [{SQL_BIG_INT}], "kwargs": {{"b": 2}}}}'
    assert task.bind_message(envelope.decode(body)) == ((int(SQL_BIG_INT), 2), {})
    body = '{"v": 1, "task": "p.only", "args": ["1"], "kwargs": {"b": 2}}'
    with pytest.raises(TypeError, match=r"argument 'a' must be int, got '1' \(str\)"):
        task.bind_message(envelope.decode(body))


async def takes_choice(value: Literal["a", "b"] | Color) -> None: ...


def test_literals_and_unions_take_the_first_member_that_fits() -> None:
    assert bind_value(takes_choice, '"b"') == "b"
    assert bind_value(takes_choice, '"red"') is Color.RED
    with pytest.raises(TypeError, match=r"must be Literal\['a', 'b'\] \| Color, got 'c'"):
        bind_value(takes_choice, '"c"')


def test_an_integer_beyond_64_bits_is_encoded_exactly() -> None:
    # orjson refuses it; the standard library's encoder takes over, converting what orjson
    # converts (here a datetime and a UUID beside it)
    moment = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ident = uuid.UUID(int=7)
    body = envelope.encode("t", (), {"x": 2**70, "at": moment, "id": ident}, max_size=MiB)
    assert envelope.decode(body).exactly().kwargs == {
        "x": 2**70,
        "at": moment.isoformat(),
        "id": str(ident),
    }
