"""Guards the public surface: ``pgtasks.__all__`` is exactly what the package offers (the idea
of httpx's tests/test_exported_members.py)."""

from __future__ import annotations

import inspect
import types
import typing

import pgtasks
from pgtasks import exceptions

PUBLIC_DUNDERS = {"__version__"}


def public_members() -> set[str]:
    """Names a user can reach on ``pgtasks`` that are neither private nor submodules."""
    return {
        name
        for name, value in vars(pgtasks).items()
        if (not name.startswith("_") or name in PUBLIC_DUNDERS)
        and not isinstance(value, types.ModuleType)
    }


def test_all_lists_every_public_member_once() -> None:
    assert len(pgtasks.__all__) == len(set(pgtasks.__all__)), "a name is listed twice"
    assert set(pgtasks.__all__) == public_members()


def test_every_exported_name_exists() -> None:
    missing = [name for name in pgtasks.__all__ if not hasattr(pgtasks, name)]
    assert missing == []


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from pgtasks import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(pgtasks.__all__)


def test_exported_objects_are_defined_in_pgtasks() -> None:
    foreign = [
        name
        for name in pgtasks.__all__
        if (module := inspect.getmodule(getattr(pgtasks, name))) is not None
        and not module.__name__.startswith("pgtasks")
        # a Literal type alias (JobState, CancelOutcome) belongs to typing's module
        and typing.get_origin(getattr(pgtasks, name)) is not typing.Literal
    ]
    assert foreign == []


def test_every_error_is_exported() -> None:
    errors = {
        name
        for name, value in vars(exceptions).items()
        if isinstance(value, type) and issubclass(value, pgtasks.PgTasksError)
    }
    assert errors <= set(pgtasks.__all__)
    assert {"Retry", "Fail"} <= set(pgtasks.__all__)


def test_version_is_a_dotted_string() -> None:
    assert isinstance(pgtasks.__version__, str)
    assert all(part.isdigit() for part in pgtasks.__version__.split(".")[:2])
