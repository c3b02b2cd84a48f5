"""Declaring tasks and building calls: the decorator, names, queues, call options, argument
binding, shared tasks and the default app. Nothing here touches a database."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import gc
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from decimal import Decimal
from typing import Annotated, Any, Literal, NewType, Optional, TypeVar

import orjson
import pytest

import pgtasks
from pgtasks import App, ConfigurationError, QueueNameError, Signature, Task, TaskCall
from pgtasks.tasks import registry

# An address nothing listens on: a test that reaches the network here fails loudly.
NOWHERE = "postgresql://root@127.0.0.1:1/nowhere"

UTC = dt.timezone.utc


@pytest.fixture(autouse=True)
def isolated_registry() -> Iterator[None]:
    """Shared tasks, live apps and the default app are process-wide: start each test with
    none of them and put back what was there afterwards."""
    shared = dict(registry.shared_tasks)
    apps = list(registry._producers)
    default = registry._default
    registry.shared_tasks.clear()
    for a in apps:
        registry._producers.discard(a)
    registry._default = None
    try:
        yield
    finally:
        registry.shared_tasks.clear()
        registry.shared_tasks.update(shared)
        for a in list(registry._producers):
            registry._producers.discard(a)
        for a in apps:
            registry._producers.add(a)
        registry._default = default


@pytest.fixture
def app() -> App:
    """An app whose database is unreachable: these tests never open its pool."""
    return App(NOWHERE)


# --- the decorator ------------------------------------------------------------------------


def test_bare_decorator_registers_a_task_with_defaults(app: App) -> None:
    @app.task
    async def send_email(user_id: int) -> str:
        """Send it."""
        return f"sent {user_id}"

    assert isinstance(send_email, Task)
    assert send_email.name == f"{__name__}.{send_email.fn.__qualname__}"
    assert send_email.name.endswith(
        "test_bare_decorator_registers_a_task_with_defaults.<locals>.send_email"
    )
    assert send_email.queue == "default"
    assert app.tasks == {send_email.name: send_email}
    assert app.queues == ["default"]
    assert send_email.__doc__ == "Send it."
    assert send_email.__wrapped__ is send_email.fn
    assert repr(send_email) == f"<Task {send_email.name} queue=default>"


def test_decorator_with_options(app: App) -> None:
    @app.task(name="emails.welcome", queue="emails", max_retries=5, timeout=3.0, lease=10)
    async def welcome(user_id: int) -> None: ...

    assert welcome.name == "emails.welcome"
    assert welcome.queue == "emails"
    assert welcome.config.max_retries == 5
    assert welcome.config.timeout == 3.0
    assert welcome.config.lease == 10
    assert welcome.config.retry_backoff is None  # unset: the app's default applies
    assert app.tasks["emails.welcome"] is welcome
    policy = welcome.retry_policy(app.defaults)
    assert policy.max_retries == 5
    assert policy.retry_backoff == app.defaults.retry_backoff


def test_app_queues_are_sorted_and_unique(app: App) -> None:
    @app.task(queue="zeta")
    async def a() -> None: ...

    @app.task(queue="alpha")
    async def b() -> None: ...

    @app.task(queue="zeta")
    async def c() -> None: ...

    assert app.queues == ["alpha", "zeta"]


async def test_calling_a_task_runs_the_function_directly(app: App) -> None:
    calls: list[int] = []

    @app.task
    async def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    assert await double(21) == 42
    assert calls == [21]


def sync_function(x: int) -> int:
    return x


async def async_generator() -> AsyncIterator[int]:
    yield 1


def sync_generator() -> Iterator[int]:
    yield 1


def test_a_plain_def_is_a_sync_task(app: App) -> None:
    task = app.task(sync_function)
    assert isinstance(task, pgtasks.SyncTask)
    assert isinstance(task, pgtasks.Task)
    assert not task.is_async
    assert task(3) == 3  # calling it runs it
    assert app.tasks[task.name] is task
    assert repr(task).startswith("<SyncTask ")
    shared = pgtasks.task(name="unit.shared_sync")(sync_function)
    try:
        assert isinstance(shared, pgtasks.SyncTask)
    finally:
        registry.shared_tasks.pop("unit.shared_sync")


@pytest.mark.parametrize(
    ("fn", "name"), [(async_generator, "async_generator"), (sync_generator, "sync_generator")]
)
def test_generators_are_rejected_with_a_clear_type_error(app: App, fn: Any, name: str) -> None:
    with pytest.raises(TypeError) as info:
        app.task(fn)
    assert f"@task needs a function that returns its result, and {name} is a generator" in str(
        info.value
    )
    assert app.tasks == {}


def test_a_transactional_plain_def_is_refused(app: App) -> None:
    with pytest.raises(TypeError, match=r"transactional=True needs an async def task"):
        app.task(transactional=True)(sync_function)
    assert app.tasks == {}


def test_cursor_and_connection_options_exclude_each_other(app: App) -> None:
    task = app.task(sync_function)

    class Cursor:
        def execute(self, sql: str, params: Any) -> None: ...

    with pytest.raises(ValueError, match=r"either connection= .* or cursor="):
        task.options(connection=object(), cursor=Cursor())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cursor must be a DB-API cursor"):
        task.options(cursor=42)


def test_unknown_decorator_option_is_rejected(app: App) -> None:
    async def f() -> None: ...

    with pytest.raises(TypeError, match=r"unknown option\(s\): retries"):
        app.task(retries=3)(f)  # type: ignore[call-overload]
    assert app.tasks == {}


def test_bad_task_settings_are_rejected(app: App) -> None:
    with pytest.raises(ConfigurationError, match="lease must be a number of seconds from 1 to"):

        @app.task(lease=0.5)
        async def f() -> None: ...

    async def g() -> None: ...

    with pytest.raises(ConfigurationError, match="on_success must be 'archive' or 'delete'"):
        app.task(on_success="keep")(g)  # type: ignore[call-overload]

    assert app.tasks == {}


@pytest.mark.parametrize(
    "options",
    [{"lease": 0.1}, {"on_success": "drop"}, {"pool_min_size": 5, "pool_max_size": 2}],
)
def test_bad_app_settings_are_rejected(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        App(NOWHERE, **options)


# --- names --------------------------------------------------------------------------------


def test_duplicate_names_are_rejected(app: App) -> None:
    @app.task(name="jobs.same")
    async def first() -> None: ...

    with pytest.raises(ConfigurationError) as info:

        @app.task(name="jobs.same")
        async def second() -> None: ...

    message = str(info.value)
    assert "two tasks are named 'jobs.same'" in message
    assert "another name" in message
    assert app.tasks["jobs.same"] is first


def test_registering_the_same_function_twice_is_allowed(app: App) -> None:
    async def job() -> None: ...

    first = app.task(name="jobs.again")(job)
    second = app.task(name="jobs.again")(job)
    assert app.tasks["jobs.again"] is second
    assert first.fn is second.fn


def test_the_same_name_in_two_apps_is_fine() -> None:
    one, two = App(NOWHERE), App(NOWHERE)

    @one.task(name="jobs.x")
    async def a() -> None: ...

    @two.task(name="jobs.x")
    async def b() -> None: ...

    assert one.tasks["jobs.x"] is a
    assert two.tasks["jobs.x"] is b


def test_an_app_task_may_not_take_a_shared_tasks_name(app: App) -> None:
    @pgtasks.task(name="lib.cleanup")
    async def shared() -> None: ...

    with pytest.raises(ConfigurationError, match=r"'lib\.cleanup'"):

        @app.task(name="lib.cleanup")
        async def mine() -> None: ...


def test_two_shared_tasks_may_not_share_a_name() -> None:
    @pgtasks.task(name="lib.x")
    async def a() -> None: ...

    with pytest.raises(ConfigurationError, match=r"two shared tasks are named 'lib\.x'"):

        @pgtasks.task(name="lib.x")
        async def b() -> None: ...


# --- queue names --------------------------------------------------------------------------

BAD_QUEUES = ["", "Emails", "1st", "_private", "with-dash", "with space", "é", "a" * 41, "q;drop"]


@pytest.mark.parametrize("queue", BAD_QUEUES)
def test_bad_queue_names_are_rejected_at_decoration(app: App, queue: str) -> None:
    with pytest.raises(QueueNameError) as info:

        @app.task(queue=queue)
        async def f() -> None: ...

    assert repr(queue) in str(info.value)
    assert "1 to 40 characters of a-z, 0-9 and _" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert app.tasks == {}


@pytest.mark.parametrize("queue", BAD_QUEUES)
def test_bad_queue_names_are_rejected_in_options(app: App, queue: str) -> None:
    @app.task
    async def f() -> None: ...

    with pytest.raises(QueueNameError, match="invalid queue name"):
        f.options(queue=queue)


@pytest.mark.parametrize("queue", ["a", "a" * 40, "emails_2", "q0"])
def test_good_queue_names_are_accepted(app: App, queue: str) -> None:
    @app.task(queue=queue)
    async def f() -> None: ...

    assert f.queue == queue
    assert f.options(queue=queue).s().queue == queue


# --- call options -------------------------------------------------------------------------


def test_options_build_a_task_call_with_those_options(app: App) -> None:
    @app.task(queue="emails")
    async def send(user_id: int) -> None: ...

    eta = dt.datetime(2030, 1, 1, tzinfo=UTC)
    call = send.options(queue="urgent", eta=eta, idempotency_key="k1", headers={"trace": "t"})
    assert isinstance(call, TaskCall)
    sig = call.s(7)
    assert sig.queue == "urgent"
    assert sig.options.eta == eta
    assert sig.options.idempotency_key == "k1"
    assert orjson.loads(sig.headers() or "null") == {"trace": "t", "idempotency_key": "k1"}
    assert send.s(7).queue == "emails"  # the task itself is unchanged
    assert send.s(7).headers() is None


def test_chained_options_accumulate(app: App) -> None:
    @app.task
    async def f() -> None: ...

    sig = f.options(queue="a").options(delay=dt.timedelta(minutes=2)).options(headers={"x": 1}).s()
    assert (sig.queue, sig.options.delay, sig.options.headers) == ("a", 120.0, {"x": 1})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eta": dt.datetime(2030, 1, 1)}, "eta must be a timezone-aware datetime"),
        ({"eta": dt.date(2030, 1, 1)}, "eta must be a timezone-aware datetime"),
        ({"delay": -1}, "delay must not be negative"),
        ({"delay": dt.timedelta(seconds=-0.5)}, "delay must not be negative"),
        (
            {"delay": 5, "eta": dt.datetime(2030, 1, 1, tzinfo=UTC)},
            "either delay (or countdown) or eta, not both",
        ),
        ({"idempotency_key": ""}, "idempotency_key must be a non-empty string"),
    ],
    ids=["naive-eta", "date-eta", "negative-delay", "negative-timedelta", "both", "empty-key"],
)
def test_bad_options_are_rejected(app: App, options: dict[str, Any], message: str) -> None:
    @app.task
    async def f() -> None: ...

    with pytest.raises(ValueError, match=re.escape(message)):
        f.options(**options)


MINUS_5 = dt.timezone(dt.timedelta(hours=-5))
PLUS_5 = dt.timezone(dt.timedelta(hours=5))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": float("nan")}, "delay must be a number of seconds (got nan)"),
        ({"delay": float("inf")}, "delay must be at most 3,650 days (ten years), got inf"),
        ({"delay": 1e300}, "delay must be at most 3,650 days (ten years), got 1e+300 seconds"),
        ({"delay": 10**400}, "delay must be at most 3,650 days"),
        ({"delay": dt.timedelta.max}, "delay must be at most 3,650 days"),
        ({"delay": 3650 * 86400 + 1}, "delay must be at most 3,650 days"),
        ({"eta": dt.datetime.max.replace(tzinfo=MINUS_5)}, "is out of range in UTC"),
        ({"eta": dt.datetime.min.replace(tzinfo=PLUS_5)}, "is out of range in UTC"),
        (
            {"eta": dt.datetime.now(UTC) + dt.timedelta(days=3651)},
            "eta must be at most 3,650 days (ten years) ahead",
        ),
        ({"headers": {"idempotency_key": "k"}}, "as options(idempotency_key=...), not as a header"),
        ({"headers": {"x-pgtasks-attempt": 1}}, "'x-pgtasks-attempt': names starting with"),
        ({"headers": {"X-PgTasks-Trace": 1}}, "are reserved for pgtasks' own metadata"),
    ],
    ids=[
        "nan",
        "inf",
        "1e300",
        "huge-int",
        "timedelta-max",
        "just-over-ten-years",
        "eta-beyond-9999-in-utc",
        "eta-before-year-1-in-utc",
        "eta-over-ten-years",
        "key-as-header",
        "reserved-header",
        "reserved-header-any-case",
    ],
)
def test_delays_etas_and_headers_pgtasks_cannot_honour_are_refused(
    app: App, options: dict[str, Any], message: str
) -> None:
    @app.task
    async def f() -> None: ...

    with pytest.raises(ValueError, match=re.escape(message)):
        f.options(**options)
    with pytest.raises(ValueError, match=re.escape(message)):
        f.options(queue="other").options(**options)  # also when chained


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": "5"}, "delay must be a number of seconds or a timedelta (got '5' (str))"),
        ({"delay": True}, "delay must be a number of seconds or a timedelta (got True (bool))"),
        ({"headers": ["a"]}, "headers must be a mapping of names (strings) to JSON values"),
        ({"headers": "a=1"}, "(got 'a=1' (str))"),
        ({"headers": {1: "a"}}, "header names must be strings (got 1 (int))"),
    ],
    ids=["str-delay", "bool-delay", "list-headers", "str-headers", "int-header-name"],
)
def test_options_of_the_wrong_type_say_what_they_must_be(
    app: App, options: dict[str, Any], message: str
) -> None:
    @app.task
    async def f() -> None: ...

    with pytest.raises(TypeError, match=re.escape(message)):
        f.options(**options)


def test_the_limits_themselves_are_accepted(app: App) -> None:
    @app.task
    async def f() -> None: ...

    ten_years = dt.timedelta(days=3650)
    assert f.options(delay=ten_years).s().options.delay == ten_years.total_seconds()
    assert f.options(delay=0).s().options.delay == 0
    eta = dt.datetime.now(UTC) + ten_years - dt.timedelta(minutes=1)
    assert f.options(eta=eta).s().options.eta == eta
    assert f.options(eta=dt.datetime(1, 1, 1, tzinfo=UTC)).s().options.eta is not None
    headers = {"x-pgmq-group": "g", "trace": "pgtasks", "idempotency": "not the key"}
    assert f.options(headers=headers).s().options.headers == headers


def test_delay_and_eta_are_rejected_in_either_order_across_chained_options(app: App) -> None:
    @app.task
    async def f() -> None: ...

    eta = dt.datetime(2030, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="not both"):
        f.options(delay=5).options(eta=eta)
    with pytest.raises(ValueError, match="not both"):
        f.options(eta=eta).options(delay=5)
    assert f.options(delay=0, eta=eta).s().options.eta == eta  # no delay is no conflict


async def test_apply_async_rejects_countdown_with_eta_before_connecting(app: App) -> None:
    @app.task
    async def f(x: int) -> None: ...

    with pytest.raises(ValueError, match="not both"):
        await f.apply_async((1,), countdown=3, eta=dt.datetime(2030, 1, 1, tzinfo=UTC))


# --- arguments ----------------------------------------------------------------------------


def test_messages_keep_arguments_by_name(app: App) -> None:
    @app.task(name="emails.send")
    async def send(user_id: int, template: str, *, lang: str = "en") -> None: ...

    sig = send.s(42, "welcome", lang="fr")
    assert isinstance(sig, Signature)
    assert sig.args == ()
    assert sig.kwargs == {"user_id": 42, "template": "welcome", "lang": "fr"}
    body = orjson.loads(sig.body(app.max_message_size))
    assert body == {
        "v": 1,
        "task": "emails.send",
        "kwargs": {"user_id": 42, "template": "welcome", "lang": "fr"},
    }


def test_defaults_are_not_frozen_into_the_message(app: App) -> None:
    @app.task
    async def send(user_id: int, lang: str = "en") -> None: ...

    assert send.s(1).kwargs == {"user_id": 1}


def test_positional_only_and_variadic_parameters_keep_their_shape(app: App) -> None:
    @app.task
    async def pos_only(a: int, /, b: int, **extra: int) -> None: ...

    @app.task
    async def variadic(a: int, *rest: int) -> None: ...

    sig = pos_only.s(1, 2, c=3)
    assert (sig.args, sig.kwargs) == ((1,), {"b": 2, "c": 3})
    sig = variadic.s(1, 2, 3)
    assert (sig.args, sig.kwargs) == ((1, 2, 3), {})
    sig = variadic.s(1)
    assert (sig.args, sig.kwargs) == ((), {"a": 1})


@pytest.mark.parametrize(
    ("args", "kwargs", "why"),
    [
        ((), {}, "missing a required argument: 'user_id'"),
        ((1, 2, 3), {}, "too many positional arguments"),
        ((1,), {"nope": 1}, "got an unexpected keyword argument 'nope'"),
        ((1,), {"user_id": 1}, "multiple values for argument 'user_id'"),
    ],
)
def test_binding_errors_name_the_task(
    app: App, args: tuple[Any, ...], kwargs: dict[str, Any], why: str
) -> None:
    @app.task(name="emails.send")
    async def send(user_id: int, lang: str = "en") -> None: ...

    with pytest.raises(TypeError) as info:
        send.s(*args, **kwargs)
    assert str(info.value) == f"task 'emails.send': {why}"


async def test_defer_checks_arguments_before_touching_the_database(app: App) -> None:
    @app.task(name="emails.send")
    async def send(user_id: int) -> None: ...

    # the app's DSN points nowhere: reaching the network would raise DatabaseUnavailable
    with pytest.raises(TypeError, match=r"task 'emails\.send': missing a required argument"):
        await send.defer()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"task 'emails\.send': got an unexpected keyword"):
        await send.options(delay=1).defer(1, extra=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"task 'emails\.send'"):
        await send.apply_async((1, 2))
    with pytest.raises(TypeError, match=r"task 'emails\.send'"):
        await send.delay(user="x")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"argument 'user_id' must be int, got '42' \(str\)"):
        await send.defer("42")  # type: ignore[arg-type]

    @app.task(name="files.upload")
    async def upload(blob: object) -> None: ...

    with pytest.raises(pgtasks.SerializationError, match="argument 'blob'"):
        await upload.defer(object())
    assert app.database._pool is None  # never connected


# --- argument types -----------------------------------------------------------------------


class Plan(enum.Enum):
    FREE = "free"
    PRO = "pro"


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class Opaque:
    pass


UserId = NewType("UserId", int)
Number = TypeVar("Number", bound=float)
A_DAY = dt.datetime(2024, 1, 1, tzinfo=UTC)


def taking(hint: Any) -> Task[..., None]:
    """A task with one parameter, ``value``, annotated ``hint``."""

    async def fn(value: Any) -> None: ...

    fn.__annotations__ = {"value": hint, "return": None}
    return Task(fn, name="types.check")


REFUSED: list[tuple[Any, Any, str]] = [
    (int, "42", "must be int, got '42' (str)"),
    (int, None, "must be int, got None"),
    (int, {1}, "must be int, got {1} (set)"),
    (int, 4.5, "must be int, got 4.5 (float)"),
    (int, True, "must be int, got True (bool)"),
    (int, Decimal(1), "must be int, got Decimal('1') (Decimal)"),
    (float, "1.5", "must be float, got '1.5' (str)"),
    (float, False, "must be float, got False (bool)"),
    (str, 5, "must be str, got 5 (int)"),
    (bool, 1, "must be bool, got 1 (int)"),
    (None, 0, "must be None, got 0 (int)"),
    (list[int], [1, "2"], "'value'[1] must be int, got '2' (str)"),
    (list[int], (1, 2), "must be list[int], got (1, 2) (tuple)"),
    (list[list[int]], [[1], [2, None]], "'value'[1][1] must be int, got None"),
    (set[int], [1], "must be set[int], got [1] (list)"),
    (Sequence[int], "abc", "must be Sequence[int], got 'abc' (str)"),
    (tuple[int, ...], (1, 2.5), "'value'[1] must be int, got 2.5 (float)"),
    (tuple[int, str], (1,), "must be tuple[int, str], got (1,) (tuple)"),
    (tuple[int, str], (1, 2), "'value'[1] must be str, got 2 (int)"),
    (dict[str, float], {"a": "x"}, "'value'['a'] must be float, got 'x' (str)"),
    (dict[str, float], {1: 2.0}, "must be dict[str, float], got a key 1 (int)"),
    (dict[str, float], [("a", 1.0)], "must be dict[str, float], got [('a', 1.0)] (list)"),
    (int | None, "x", "must be int | None, got 'x' (str)"),
    (Optional[list[int]], ["x"], "must be list[int] | None, got ['x'] (list)"),  # noqa: UP045
    (Literal["a", "b"], "c", "must be Literal['a', 'b'], got 'c' (str)"),
    (Literal[1], True, "must be Literal[1], got True (bool)"),
    (dt.datetime, "2024-01-01", "must be datetime, got '2024-01-01' (str)"),
    (dt.date, dt.datetime(2024, 1, 1), "must be date, got datetime.datetime(2024, 1, 1, 0, 0)"),
    (uuid.UUID, str(uuid.UUID(int=1)), "must be UUID, got '00000000-0000-0000-0000-0000000"),
    (Decimal, 1.5, "must be Decimal, got 1.5 (float)"),
    (Plan, "free", "must be Plan, got 'free' (str)"),
    (Point, {"x": 1, "y": 2}, "must be Point, got {'x': 1, 'y': 2} (dict)"),
    (Annotated[int, "an id"], "7", "must be int, got '7' (str)"),
    (UserId, "7", "must be int, got '7' (str)"),
    (Number, "7", "must be float, got '7' (str)"),
    (int, Opaque(), "must be int, got an instance of Opaque"),
    (str, 10**5000, "must be str, got an instance of int"),  # too long to print
]


@pytest.mark.parametrize(("hint", "value", "message"), REFUSED, ids=[m for _, _, m in REFUSED])
def test_defer_refuses_a_value_of_the_wrong_type_naming_task_argument_and_types(
    hint: Any, value: Any, message: str
) -> None:
    task = taking(hint)
    with pytest.raises(TypeError) as by_name:
        task.s(value=value)
    with pytest.raises(TypeError) as by_position:
        task.s(value)
    for info in (by_name, by_position):
        assert str(info.value).startswith("task 'types.check': argument 'value'")
        assert message in str(info.value)


ACCEPTED: list[tuple[Any, Any]] = [
    (int, 5),
    (int, -(2**63)),
    (float, 1),  # an int is a float, as in Python's typing
    (float, 1.5),
    (str, ""),
    (bool, False),
    (None, None),
    (list[int], []),
    (list[int], [1, 2]),
    (set[int], {1}),
    (frozenset[str], frozenset({"a"})),
    (Sequence[int], (1, 2)),
    (tuple[int, str], (1, "a")),
    (dict[str, float], {"a": 1, "b": 2.5}),
    (int | None, None),
    (Optional[int], 3),  # noqa: UP045
    (Literal["a", "b"], "a"),
    (Literal[Plan.PRO], Plan.PRO),
    (dt.datetime, A_DAY),
    (dt.date, dt.date(2024, 1, 1)),
    (uuid.UUID, uuid.UUID(int=1)),
    (Decimal, Decimal("1.10")),
    (Plan, Plan.PRO),
    (Point, Point(1, 2)),
    (UserId, UserId(7)),
    (Any, {"anything": [1, "x", None]}),
    (object, "anything"),
    ("NoSuchName", 4.5),  # a hint that cannot be resolved accepts anything
    (list, ["a", 1]),
    (dict, {"a": [1]}),
]


@pytest.mark.parametrize(("hint", "value"), ACCEPTED, ids=[repr(h) for h, _ in ACCEPTED])
def test_defer_accepts_values_of_the_hinted_type(hint: Any, value: Any) -> None:
    assert taking(hint).s(value=value).kwargs == {"value": value}


async def add(a: int, b: int) -> int:
    return a + b


async def test_the_issues_examples_are_refused_before_anything_is_sent(app: App) -> None:
    task = app.task(add)
    with pytest.raises(TypeError, match=r"argument 'a' must be int, got '1' \(str\)"):
        await task.defer("1", [2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"argument 'b' must be int, got \[2\] \(list\)"):
        await task.defer(1, [2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argument 'a' must be int"):
        await task.options(delay=1).defer(a=4.5, b=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argument 'b' must be int"):
        await task.apply_async((1,), {"b": None})
    with pytest.raises(TypeError, match="argument 'a' must be int"):
        await app.defer_many([task.s(1, 2), task.s({1}, 2)])  # type: ignore[arg-type]
    assert app.database._pool is None  # never connected


async def shaped(a: int, /, *rest: int, **named: str) -> None: ...


def test_positional_only_and_variadic_arguments_are_checked_too() -> None:
    task = Task(shaped, name="shaped")
    with pytest.raises(TypeError, match="argument 'a' must be int, got 'x'"):
        task.s("x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"argument 'rest'\[1\] must be int, got 'x' \(str\)"):
        task.s(1, 2, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"argument 'named'\['k'\] must be str, got 5 \(int\)"):
        task.s(1, k=5)  # type: ignore[arg-type]
    assert task.s(1, 2, 3, k="v").kwargs == {"k": "v"}


# --- shared tasks and the default app ------------------------------------------------------


def test_shared_tasks_belong_to_every_app() -> None:
    before = App(NOWHERE)

    @pgtasks.task(queue="maintenance")
    async def cleanup() -> None: ...

    after = App(NOWHERE)
    assert before.tasks[cleanup.name] is cleanup
    assert after.tasks[cleanup.name] is cleanup
    assert "maintenance" in after.queues


def test_shared_task_defers_through_the_only_app() -> None:
    @pgtasks.task
    async def cleanup() -> None: ...

    only = App(NOWHERE)
    assert cleanup.app is only


def test_shared_task_with_no_app_or_several_apps_says_what_to_do() -> None:
    @pgtasks.task(name="lib.cleanup")
    async def cleanup() -> None: ...

    with pytest.raises(ConfigurationError, match="and there are 0: create one App"):
        _ = cleanup.app
    one, two = App(NOWHERE), App(NOWHERE)
    with pytest.raises(ConfigurationError) as info:
        _ = cleanup.app
    assert "shared task 'lib.cleanup' needs an app to defer through, and there are 2" in str(
        info.value
    )
    assert "App(default=True)" in str(info.value)
    assert one is not two  # and both are alive until here


def test_default_app_wins_over_other_apps() -> None:
    @pgtasks.task
    async def cleanup() -> None: ...

    App(NOWHERE)
    chosen = App(NOWHERE, default=True)
    App(NOWHERE)
    assert cleanup.app is chosen
    other = App(NOWHERE)
    other.set_default()
    assert cleanup.app is other


def test_a_default_app_that_is_gone_falls_back_to_the_only_live_one() -> None:
    @pgtasks.task
    async def cleanup() -> None: ...

    App(NOWHERE, default=True)  # not kept: garbage once collected
    gc.collect()
    survivor = App(NOWHERE)
    assert cleanup.app is survivor


def test_an_app_task_always_defers_through_its_own_app() -> None:
    mine = App(NOWHERE)
    App(NOWHERE, default=True)

    @mine.task
    async def job() -> None: ...

    assert job.app is mine
