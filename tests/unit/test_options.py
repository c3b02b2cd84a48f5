"""The option sets: one definition each, and every option checked where it is given.

Each set (the app's and the database's, the tasks', the worker's, the FastAPI helper's) is
defined once as an `OptionSet` (name, default, help, range) next to a ``TypedDict`` of the
same names used as ``**options: Unpack[...]``. These tests fail when the TypedDict, the
table, the config dataclass, the signatures that spell options out, the command line and
docs/configuration.md disagree; and they try a wrong value for every option, on every way
in. Run this file as a script to rewrite the generated tables in docs/configuration.md::

    python tests/unit/test_options.py
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime as dt
import inspect
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_type_hints

import pytest

import pgtasks
from pgtasks import App, ConfigurationError, QueueNameError
from pgtasks._options import OptionSet
from pgtasks.app.options import APP_OPTIONS
from pgtasks.cli import parser as cli_parser
from pgtasks.db.database import DATABASE_OPTIONS, Database
from pgtasks.integrations.fastapi import LIFESPAN_OPTIONS, worker_lifespan
from pgtasks.tasks import RetryPolicy, TaskConfig, registry
from pgtasks.tasks.config import TASK_DEFAULTS, TASK_OPTIONS, TaskDefaults, TaskOptions
from pgtasks.worker import WORKER_OPTIONS, Worker, WorkerOptions

NOWHERE = "postgresql://root@127.0.0.1:1/nowhere"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
CLI_DOCS = DOCS.parent / "cli.md"


@pytest.fixture(autouse=True)
def isolated_registry() -> Iterator[None]:
    shared = dict(registry.shared_tasks)
    default = registry._default
    try:
        yield
    finally:
        registry.shared_tasks.clear()
        registry.shared_tasks.update(shared)
        registry._default = default


# --- one definition ------------------------------------------------------------------------


def typed_dict_keys(td: Any) -> list[str]:
    return list(get_type_hints(td))


def test_task_typed_dicts_match_the_tables() -> None:
    assert typed_dict_keys(TaskDefaults) == list(TASK_DEFAULTS)
    assert set(typed_dict_keys(TaskOptions)) == set(TASK_OPTIONS)
    assert set(TASK_OPTIONS) - set(TASK_DEFAULTS) == {"name", "queue", "transactional"}


def test_task_config_has_a_field_per_setting() -> None:
    fields = [f.name for f in dataclasses.fields(TaskConfig)]
    assert fields == [*TASK_DEFAULTS, "transactional"]
    defaults = {f.name: f.default for f in dataclasses.fields(TaskConfig)}
    assert defaults == {**dict.fromkeys(TASK_DEFAULTS), "transactional": False}


def test_retry_policy_defaults_are_the_task_defaults() -> None:
    for field in dataclasses.fields(RetryPolicy):
        assert field.default == TASK_DEFAULTS[field.name].default, field.name


def test_worker_typed_dict_matches_the_table() -> None:
    assert typed_dict_keys(WorkerOptions) == list(WORKER_OPTIONS)


def test_every_default_passes_its_own_check() -> None:
    for table in (TASK_OPTIONS, WORKER_OPTIONS, APP_OPTIONS, DATABASE_OPTIONS, LIFESPAN_OPTIONS):
        for option in table.values():
            assert option.checked(option.default) == option.default, option.name


def explicit_parameters(fn: Any) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and name != "self")
    }


def unpacked(fn: Any) -> str:
    """The annotation of ``**options`` (a string: annotations are postponed)."""
    (var,) = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.VAR_KEYWORD]
    return str(var.annotation)


def test_app_signature_is_the_app_and_database_tables_plus_task_defaults() -> None:
    params = explicit_parameters(App.__init__)
    assert params == {**DATABASE_OPTIONS.defaults(), **APP_OPTIONS.defaults()}
    assert unpacked(App.__init__) == "Unpack[TaskDefaults]"
    assert explicit_parameters(Database.__init__) == DATABASE_OPTIONS.defaults()


def test_every_signature_that_takes_an_option_set_unpacks_its_typed_dict() -> None:
    assert unpacked(App.task) == "Unpack[TaskOptions]"
    assert unpacked(pgtasks.task) == "Unpack[TaskOptions]"
    assert unpacked(App.worker) == "Unpack[WorkerOptions]"
    assert unpacked(Worker.__init__) == "Unpack[WorkerOptions]"
    assert unpacked(worker_lifespan) == "Unpack[WorkerOptions]"
    lifespan = explicit_parameters(worker_lifespan)
    assert lifespan == {"app": inspect.Parameter.empty, **LIFESPAN_OPTIONS.defaults()}


def test_a_worker_has_an_attribute_per_option_at_its_default() -> None:
    worker = App(NOWHERE).worker(queues=["q"])
    for name, option in WORKER_OPTIONS.items():
        resolved = {"queues": ["q"], "threads": min(worker.concurrency, 40)}  # None: computed
        expected = resolved.get(name, option.default)
        assert getattr(worker, name) == expected, name


def worker_parser() -> argparse.ArgumentParser:
    top = cli_parser.build()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices["worker"]
    return parser


def test_the_command_line_worker_flags_are_the_worker_options() -> None:
    parser = worker_parser()
    dests = {a.dest: a for a in parser._actions}
    for name, option in WORKER_OPTIONS.items():
        assert name in dests, name
        assert set(option.flags) <= set(dests[name].option_strings), name
        assert parser.get_default(name) == option.default, name
        assert option.help.replace("%", "%%") in (dests[name].help or ""), name
    args = cli_parser.build().parse_args(["worker"])
    assert {name: getattr(args, name) for name in WORKER_OPTIONS} == WORKER_OPTIONS.defaults()


def test_the_command_line_reads_every_worker_option() -> None:
    argv = (
        "worker -q a,b -c 3 --burst --shutdown-timeout 1.5 --no-listen --poll-interval 0.5 "
        "--no-schedule --threads 4 --retention-interval 60"
    )
    args = cli_parser.build().parse_args(argv.split())
    options = {name: getattr(args, name) for name in WORKER_OPTIONS}
    assert options == {
        "queues": ["a", "b"],
        "concurrency": 3,
        "burst": True,
        "shutdown_timeout": 1.5,
        "listen": False,
        "poll_interval": 0.5,
        "schedule": False,
        "threads": 4,
        "retention_interval": 60.0,
    }


# --- the docs ------------------------------------------------------------------------------

GENERATED = re.compile(r"(<!-- options: ([\w-]+) -->\n)(.*?)(<!-- /options -->)", re.S)


def tables() -> dict[str, str]:
    """The generated tables of docs/configuration.md and docs/cli.md, by marker name."""
    app = OptionSet(*DATABASE_OPTIONS.values(), *APP_OPTIONS.values())
    command = OptionSet(*WORKER_OPTIONS.values(), *cli_parser.COMMAND_WORKER_OPTIONS.values())
    return {
        "app": app.markdown(),
        "task": TASK_OPTIONS.markdown(),
        "worker": WORKER_OPTIONS.markdown(flags=True),
        "lifespan": LIFESPAN_OPTIONS.markdown(),
        "cli-worker": command.markdown(command_line=True),
    }


def rendered(text: str) -> str:
    wanted = tables()
    return GENERATED.sub(lambda m: m[1] + wanted[m[2]] + m[4], text)


def test_the_docs_list_every_option_from_the_definitions() -> None:
    config, cli = DOCS.read_text(), CLI_DOCS.read_text()
    markers = [m[2] for m in GENERATED.finditer(config + cli)]
    assert sorted(markers) == sorted(tables())  # each table once
    for text, path in ((config, DOCS), (cli, CLI_DOCS)):
        assert text == rendered(text), (
            f"{path.name} is out of date: run `python tests/unit/test_options.py`"
        )


def call_keywords(doc: Path, call: str) -> dict[str, Any]:
    """The keyword arguments of the first ``call(...)`` in a python block of ``doc``."""
    for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == call:
                return {
                    k.arg: eval(ast.unparse(k.value), {"dt": dt})  # the docs' own code
                    for k in node.keywords
                    if k.arg
                }
    raise AssertionError(f"no {call}(...) in {doc}")


def test_the_examples_that_show_the_defaults_show_them_right() -> None:
    app = call_keywords(DOCS, "pgtasks.App")
    expected = {**DATABASE_OPTIONS.defaults(), **APP_OPTIONS.defaults(), **TASK_DEFAULTS.defaults()}
    assert app == {k: v for k, v in expected.items() if k in app}
    assert set(expected) - set(app) == {"default"}
    worker = call_keywords(DOCS.parent / "worker.md", "app.worker")
    assert worker == WORKER_OPTIONS.defaults()


# --- every option checked, where it is given -----------------------------------------------

BAD_TASK_VALUES: list[tuple[str, Any]] = [
    ("max_retries", -1),
    ("max_retries", 1.5),
    ("max_retries", True),
    ("max_retries", 10**9),
    ("retry_backoff", -5),
    ("retry_backoff", math.nan),
    ("retry_backoff", math.inf),
    ("retry_backoff", "2"),
    ("retry_backoff_max", -1),
    ("retry_jitter", "yes"),
    ("retry_on", ValueError),
    ("retry_on", (ValueError, "KeyError")),
    ("retry_on", (int,)),
    ("dont_retry_on", "ValueError"),
    ("timeout", -1),
    ("timeout", 0),
    ("timeout", math.nan),
    ("timeout", 10**12),
    ("lease", 0.5),
    ("lease", 10**7),
    ("lease", math.inf),
    ("on_success", "keep"),
    ("on_success", 1),
    ("keep_result", "yes"),
    ("keep_result", 1),
    ("result_ttl", 0),
    ("result_ttl", math.inf),
    ("result_ttl", "7d"),
]


def assert_names(exc: BaseException, option: str, value: Any) -> None:
    message = str(exc)
    assert f"{option} must be " in message, message
    assert f"(got {value!r})" in message, message


@pytest.mark.parametrize(("option", "value"), BAD_TASK_VALUES)
def test_a_bad_task_option_is_refused_by_the_decorator(option: str, value: Any) -> None:
    app = App(NOWHERE)

    async def f() -> None: ...

    with pytest.raises(ConfigurationError) as info:
        app.task(**{option: value})(f)
    assert_names(info.value, option, value)
    assert info.value.args[0].startswith("@task ")
    with pytest.raises(ConfigurationError):
        pgtasks.task(**{option: value})(f)
    assert app.tasks == {}


@pytest.mark.parametrize(("option", "value"), BAD_TASK_VALUES)
def test_a_bad_task_default_is_refused_by_the_app(option: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        App(NOWHERE, **{option: value})
    assert_names(info.value, option, value)
    assert info.value.args[0].startswith("App: ")


def test_the_message_says_the_range() -> None:
    with pytest.raises(ConfigurationError) as info:
        App(NOWHERE, max_retries=-1)
    assert str(info.value) == "App: max_retries must be a whole number from 0 to 10,000 (got -1)"
    with pytest.raises(ConfigurationError) as info:
        App(NOWHERE, timeout=0)
    assert str(info.value) == (
        "App: timeout must be a number of seconds above 0, at most 2,592,000, or None "
        "(no limit) (got 0)"
    )


def test_the_backoff_cap_must_not_be_below_the_base() -> None:
    with pytest.raises(ConfigurationError, match="retry_backoff_max must be at least retry_b"):
        App(NOWHERE, retry_backoff=10, retry_backoff_max=5)
    with pytest.raises(ConfigurationError, match="retry_backoff_max must be at least"):
        App(NOWHERE, retry_backoff=1000)  # above the default cap, 600

    async def f() -> None: ...

    with pytest.raises(ConfigurationError, match="retry_backoff_max must be at least"):
        App(NOWHERE).task(retry_backoff=10, retry_backoff_max=5)(f)


def test_good_options_are_kept_as_given() -> None:
    # a list is taken as a tuple at run time, though the type checker wants a tuple
    app = App(NOWHERE, retry_on=[OSError], timeout=5, max_retries=0, retry_backoff=0)  # type: ignore[arg-type]
    assert app.defaults.retry_on == (OSError,)
    assert app.defaults.timeout == 5.0
    assert app.defaults.max_retries == 0

    @app.task(lease=1, timeout=0.01, retry_backoff_max=0, retry_backoff=0, max_retries=None)
    async def f() -> None: ...

    assert f.config.lease == 1.0
    assert f.config.max_retries is None  # the app's
    assert f.retry_policy(app.defaults).max_retries == 0


def test_none_is_the_default_given_to_the_app() -> None:
    app = App(NOWHERE, max_retries=None, lease=None)
    assert app.defaults.max_retries == TASK_DEFAULTS["max_retries"].default
    assert app.defaults.lease == TASK_DEFAULTS["lease"].default


@pytest.mark.parametrize(
    ("option", "value"),
    [("name", ""), ("name", 5), ("transactional", "yes"), ("transactional", None)],
)
def test_a_bad_task_only_option_is_refused(option: str, value: Any) -> None:
    async def f() -> None: ...

    if value is None:  # None is "unset" for every task option; transactional then is False
        unset: dict[str, Any] = {option: value}
        assert App(NOWHERE).task(**unset)(f).config.transactional is False
        return
    with pytest.raises(ConfigurationError) as info:
        App(NOWHERE).task(**{option: value})(f)
    assert_names(info.value, option, value)


def test_a_bad_queue_is_a_queue_name_error() -> None:
    async def f() -> None: ...

    with pytest.raises(QueueNameError):
        App(NOWHERE).task(queue="Bad Name")(f)


def test_an_unknown_option_is_a_type_error_listing_the_options() -> None:
    async def f() -> None: ...

    with pytest.raises(TypeError, match=r"unknown option\(s\): retries \(the options are: name"):
        App(NOWHERE).task(retries=3)(f)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"App: unknown option\(s\): queue"):
        App(NOWHERE, queue="x")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"worker: unknown option\(s\): thread"):
        App(NOWHERE).worker(thread=3)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("pool_max_size", 0),
        ("pool_min_size", -1),
        ("pool_max_size", 2.5),
        ("statement_cache_size", -1),
        ("max_message_size", 0),
        ("max_message_size", 10**10),
        ("max_result_size", -1),
        ("max_result_size", 1.5),
        ("key_retention", dt.timedelta(seconds=-1)),
        ("key_retention", 60),
        ("create_queues", "no"),
        ("default", 1),
        ("dsn", 5),
    ],
)
def test_a_bad_app_option_is_refused(option: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"dsn": NOWHERE, option: value}
    with pytest.raises(ConfigurationError) as info:
        App(**kwargs)
    assert_names(info.value, option, value)


def test_the_pool_minimum_must_not_exceed_the_maximum() -> None:
    with pytest.raises(ConfigurationError, match="pool_min_size must be at most pool_max_size"):
        App(NOWHERE, pool_min_size=5, pool_max_size=2)


BAD_WORKER_VALUES: list[tuple[str, Any]] = [
    ("concurrency", 0),
    ("concurrency", -3),
    ("concurrency", 2.0),
    ("poll_interval", 0),
    ("poll_interval", -1),
    ("poll_interval", math.nan),
    ("shutdown_timeout", -1),
    ("shutdown_timeout", math.inf),
    ("burst", "yes"),
    ("listen", None),
    ("queues", "email"),
]


@pytest.mark.parametrize(("option", "value"), BAD_WORKER_VALUES)
def test_a_bad_worker_option_is_refused(option: str, value: Any) -> None:
    app = App(NOWHERE)
    with pytest.raises(ConfigurationError) as info:
        app.worker(**{"queues": ["q"], option: value})
    assert_names(info.value, option, value)
    assert info.value.args[0].startswith("worker: ")


@pytest.mark.parametrize(("option", "value"), BAD_WORKER_VALUES)
def test_a_bad_worker_option_is_refused_when_the_lifespan_is_made(option: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        worker_lifespan(App(NOWHERE), **{option: value})
    assert info.value.args[0].startswith("worker_lifespan: ")
    with pytest.raises(ConfigurationError, match="migrate must be True or False"):
        worker_lifespan(App(NOWHERE), migrate="no")  # type: ignore[arg-type]


def test_a_bad_queue_name_for_a_worker_is_a_queue_name_error() -> None:
    with pytest.raises(QueueNameError):
        App(NOWHERE).worker(queues=["Email"])


@pytest.mark.parametrize(
    "argv",
    [
        ["-c", "0"],
        ["-c", "x"],
        ["--poll-interval", "0"],
        ["--poll-interval", "-1"],
        ["--poll-interval", "nan"],
        ["--shutdown-timeout", "-1"],
        ["--shutdown-timeout", "inf"],
        ["-q", "Email"],
    ],
)
def test_a_bad_worker_flag_is_an_argparse_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli_parser.build().parse_args(["worker", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pgtasks worker: error: argument "), err
    assert "Traceback" not in err


def _write_docs() -> None:  # pragma: no cover - a maintenance script
    for path in (DOCS, CLI_DOCS):
        path.write_text(rendered(path.read_text()))
        print(f"rewrote the option tables in {path}")


if __name__ == "__main__":  # pragma: no cover
    _write_docs()
    sys.exit(0)


# --- the options of one call: checked by task.options(), which apply_async goes through ---


@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        ({"connection": "postgresql://x"}, TypeError, "connection must be an asyncpg connection"),
        ({"headers": ["a"]}, TypeError, "headers must be a mapping"),
        ({"delay": -1}, ValueError, "delay must not be negative"),
        ({"delay": math.nan}, ValueError, "delay must be a number of seconds"),
        ({"idempotency_key": ""}, ValueError, "idempotency_key must be a non-empty string"),
        ({"queue": "Bad"}, QueueNameError, "invalid queue name 'Bad'"),
    ],
)
async def test_a_bad_call_option_is_refused_by_options_and_apply_async(
    options: dict[str, Any], error: type[Exception], says: str
) -> None:
    @App(NOWHERE).task
    async def f() -> None: ...

    with pytest.raises(error, match=re.escape(says)):
        f.options(**options)
    if "delay" in options:
        options = {"countdown": options.pop("delay")}
    with pytest.raises(error, match=re.escape(says)):
        await f.apply_async((), {}, **options)  # before anything reaches the database
