"""Option sets: the one definition of each set of keyword options pgtasks takes.

An `Option` is a name, a default, a one-line help text and a check (`Check`) that knows the
range the option may take, says it in words, and can read the option from text (for the
command line). An `OptionSet` gathers the options of one set (an app's, a task's, a
worker's) and checks what a caller gave, once, where it is given: an unknown name is a
`TypeError` (as Python's own for an unexpected keyword), a value out of range a
`ConfigurationError` that names the option, the value and the range.

Each set also has a ``TypedDict`` of the same names, used as ``**options: Unpack[...]`` in
every signature that takes the set, so that a type checker still checks names and types;
tests/unit/test_options.py keeps the two (and the docs) in agreement. Internal: the sets
live with their users (``tasks/config.py``, ``worker/settings.py``, ``db/database.py``,
``app/options.py``).
"""

from __future__ import annotations

import datetime as dt
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .exceptions import ConfigurationError
from .queues import check_queue_name


class Invalid(Exception):
    """Raised by a `Check` for a value outside its range; `Option.check` words the error."""


class Check:
    """What values an option takes: ``allowed`` in words ("a whole number from 0 to 10"),
    ``__call__`` returns the value as used (or raises `Invalid`), ``parse`` reads it from
    the command line."""

    allowed: str = "any value"
    none_means: str | None = None  # when None is allowed: what it means
    cli_kind: str = "value"  # "value", "flag" (True/False), "list" (comma-separated)

    def __call__(self, value: Any) -> Any:
        return value

    def parse(self, text: str) -> Any:
        return text

    def describe(self) -> str:
        return self.allowed + (f", or None ({self.none_means})" if self.none_means else "")


def _number_text(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,g}"


class Number(Check):
    """A finite number within [low, high] (above ``low`` with ``above``); ``integer`` for a
    whole number (an ``int``); ``none`` for None allowed, meaning that."""

    def __init__(
        self,
        low: float,
        high: float,
        *,
        integer: bool = False,
        above: bool = False,
        unit: str = "",
        none: str | None = None,
    ) -> None:
        self.low, self.high, self.integer, self.above = low, high, integer, above
        self.none_means = none
        kind = "a whole number" if integer else "a number"
        if unit:
            kind += f" of {unit}"
        lower = f"above {_number_text(low)}" if above else f"from {_number_text(low)}"
        upper = f", at most {_number_text(high)}" if above else f" to {_number_text(high)}"
        self.allowed = kind + " " + lower + upper

    def __call__(self, value: Any) -> Any:
        if value is None and self.none_means is not None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise Invalid
        if self.integer and not isinstance(value, numbers.Integral):
            raise Invalid
        try:
            number = float(value)
        except (OverflowError, ValueError):
            raise Invalid from None
        if not math.isfinite(number) or number > self.high:
            raise Invalid
        if number < self.low or (self.above and number == self.low):
            raise Invalid
        return int(number) if self.integer else number

    def parse(self, text: str) -> Any:
        if self.none_means is not None and text.strip().lower() in ("", "none"):
            return None
        try:
            return int(text) if self.integer else float(text)
        except ValueError:
            raise Invalid from None


class Flag(Check):
    """True or False (a ``bool``, not any truthy value); ``none`` for None allowed, meaning
    that."""

    allowed = "True or False"
    cli_kind = "flag"

    def __init__(self, *, none: str | None = None) -> None:
        self.none_means = none

    def __call__(self, value: Any) -> Any:
        if value is None and self.none_means is not None:
            return None
        if not isinstance(value, bool):
            raise Invalid
        return value


class Choice(Check):
    """One of a few strings."""

    def __init__(self, *choices: str) -> None:
        self.choices = choices
        quoted = [repr(c) for c in choices]
        self.allowed = (", ".join(quoted[:-1]) + " or " if len(quoted) > 1 else "") + quoted[-1]

    def __call__(self, value: Any) -> Any:
        if value not in self.choices or not isinstance(value, str):
            raise Invalid
        return value


class Text(Check):
    """A non-empty string (any string with ``empty``), or None meaning ``none``."""

    def __init__(
        self, what: str = "a non-empty string", *, none: str | None = None, empty: bool = False
    ) -> None:
        self.allowed = what
        self.none_means = none
        self.empty = empty

    def __call__(self, value: Any) -> Any:
        if value is None and self.none_means is not None:
            return None
        if not isinstance(value, str) or not (self.empty or value.strip()):
            raise Invalid
        return value


class ExceptionTypes(Check):
    """A tuple of exception classes (a list or set of them is taken as a tuple)."""

    allowed = "a tuple of exception classes, like (OSError, TimeoutError)"

    def __init__(self, *, none: str | None = None) -> None:
        self.none_means = none

    def __call__(self, value: Any) -> Any:
        if value is None and self.none_means is not None:
            return None
        if not isinstance(value, tuple | list | set | frozenset):
            raise Invalid
        types = tuple(value)
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
            raise Invalid
        return types


class Duration(Check):
    """A ``datetime.timedelta`` within [low, high]; ``none`` for None allowed, meaning
    that."""

    def __init__(self, low: dt.timedelta, high: dt.timedelta, *, none: str | None = None) -> None:
        self.low, self.high = low, high
        self.none_means = none
        self.allowed = f"a datetime.timedelta from {_span(low)} to {_span(high)}"

    def __call__(self, value: Any) -> Any:
        if value is None and self.none_means is not None:
            return None
        if not isinstance(value, dt.timedelta) or not self.low <= value <= self.high:
            raise Invalid
        return value


def _span(value: dt.timedelta) -> str:
    if value.days and not value.seconds and not value.microseconds:
        return f"{value.days:,} day" + ("s" if value.days != 1 else "")
    return f"{value.total_seconds():g} s"


class QueueName(Check):
    """A queue name pgtasks accepts; a wrong one raises `QueueNameError` (`queues`)."""

    allowed = "a queue name: 1 to 40 characters of a-z, 0-9 and _, starting with a letter"

    def __call__(self, value: Any) -> Any:
        return check_queue_name(value)


class QueueNames(Check):
    """A sequence of queue names (a list, a tuple; not one string), or None."""

    allowed = "a list of queue names"
    cli_kind = "list"

    def __init__(self, *, none: str) -> None:
        self.none_means = none

    def __call__(self, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise Invalid
        return [check_queue_name(q) for q in value]

    def parse(self, text: str) -> Any:
        names = [q.strip() for q in text.split(",") if q.strip()]
        return names or None


@dataclass(frozen=True)
class Option:
    """One keyword option: its name, default, help (one line) and range (`Check`).

    ``default_text`` says the default in words where its value does not (None, say);
    ``flags`` and ``metavar`` are its command line form, for the sets the CLI offers.
    """

    name: str
    default: Any
    help: str
    check: Check = field(default_factory=Check)
    default_text: str | None = None
    flags: tuple[str, ...] = ()
    metavar: str | None = None

    def checked(self, value: Any, where: str = "") -> Any:
        """``value`` as used, or `ConfigurationError` naming the option, value and range."""
        try:
            return self.check(value)
        except Invalid:
            prefix = f"{where}: " if where else ""
            raise ConfigurationError(
                f"{prefix}{self.name} must be {self.check.describe()} (got {value!r})"
            ) from None

    def command_line(self) -> list[str]:
        """The flags as the command line's help shows them."""
        if self.check.cli_kind == "flag":
            return [*self.flags, *(f"--no-{f[2:]}" for f in self.flags if f.startswith("--"))]
        return [f"{f} {self.metavar}" if self.metavar else f for f in self.flags]

    def describe_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        value = self.default
        if isinstance(value, dt.timedelta):
            return _span(value)
        if isinstance(value, tuple):
            inner = ", ".join(t.__name__ if isinstance(t, type) else repr(t) for t in value)
            return f"({inner},)" if len(value) == 1 else f"({inner})"
        return repr(value)


class OptionSet(Mapping[str, Option]):
    """The options of one set, by name, with what must hold between them (``relations``:
    functions of the checked values that raise `ConfigurationError`)."""

    def __init__(
        self,
        *options: Option,
        relations: tuple[Callable[[Mapping[str, Any], str], None], ...] = (),
    ) -> None:
        self._options = {o.name: o for o in options}
        self.relations = relations

    def __getitem__(self, name: str) -> Option:
        return self._options[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._options)

    def __len__(self) -> int:
        return len(self._options)

    def defaults(self) -> dict[str, Any]:
        return {name: o.default for name, o in self._options.items()}

    def check(self, given: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The options given, checked (``where`` names the caller in errors). Unknown names
        raise `TypeError`; values out of range and broken relations `ConfigurationError`."""
        unknown = [name for name in given if name not in self._options]
        if unknown:
            raise TypeError(
                f"{where}: unknown option(s): {', '.join(sorted(unknown))} "
                f"(the options are: {', '.join(self._options)})"
            )
        checked = {name: self._options[name].checked(value, where) for name, value in given.items()}
        for relation in self.relations:
            relation(checked, where)
        return checked

    def resolve(self, given: Mapping[str, Any], where: str) -> dict[str, Any]:
        """`check`, with every option not given at its default (and the relations checked
        again on the whole)."""
        values = {**self.defaults(), **self.check(given, where)}
        for relation in self.relations:
            relation(values, where)
        return values

    def markdown(self, *, flags: bool = False, command_line: bool = False) -> str:
        """A table of the set (option, default, range, meaning, and with ``flags`` the
        command line form), for docs/configuration.md; with ``command_line``, the command
        line's form first and no Python name, for docs/cli.md."""
        head = ["option", "default", "allowed", "meaning"] + (["command line"] if flags else [])
        if command_line:
            head = ["option", "default", "allowed", "meaning"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for o in self._options.values():
            default = o.describe_default()
            if o.default_text is None and isinstance(o.default, bool) and command_line:
                default = "on" if o.default else "off"
            elif o.default_text is None:
                default = f"`{default}`"
            name = ", ".join(f"`{f}`" for f in o.command_line()) if command_line else f"`{o.name}`"
            allowed = o.check.describe()
            if command_line:  # as typed: a flag takes no value, a list is comma-separated
                kind = o.check.cli_kind
                allowed = {
                    "flag": "",
                    "list": "comma-separated " + o.check.allowed.removeprefix("a list of "),
                }.get(kind, o.check.allowed)
            cells = [name, _cell(default), _cell(allowed), _cell(o.help)]
            if flags and not command_line:
                cells.append(", ".join(f"`{f}`" for f in o.command_line()))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
