"""The command line's building blocks: the common options (``--app/-A``, ``--dsn``,
``--log-level``), a command's parser with its example and docs link, ``--json``, an option of
an `OptionSet` as a flag, and the types of the values (durations, intervals, ports).

The common options go before or after the command: on the top-level parser they carry the
defaults, on a command's parser they are suppressed unless given, so that a value given
before the command is not reset by the command's parser.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
from typing import Any

from .._options import Option

DOCS = "https://pgtasks.readthedocs.io/en/latest/cli/"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def duration(text: str) -> dt.timedelta:
    """``7d``, ``12h``, ``30m``, ``45s`` (or plain seconds) as a timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: use a number with d, h, m or s, like 7d or 12h"
        )
    unit = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds", "": "seconds"}
    return dt.timedelta(**{unit[match[2]]: float(match[1])})


def add_option(group: Any, option: Option) -> None:
    """A command line option from an option's one definition (`pgtasks._options.Option`):
    its flags, help and default; its value read from text and checked by the option's own
    check, so that a wrong one is argparse's one-line error. A True/False option gets a
    ``--no-`` form."""
    default = option.default
    if option.default_text is not None:
        shown = option.default_text
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, float):
        shown = f"{default:g}"
    else:
        shown = option.describe_default()
    help_text = f"{option.help} (default: {shown})".replace("%", "%%")
    if option.check.cli_kind == "flag":
        # the default is set on the parser: BooleanOptionalAction would add its own to help
        group.add_argument(
            *option.flags,
            dest=option.name,
            action=argparse.BooleanOptionalAction,
            help=help_text,
        )
        group.set_defaults(**{option.name: default})
        return

    def from_text(text: str) -> Any:
        try:
            return option.checked(option.check.parse(text))
        except ValueError as exc:  # QueueNameError, which says what a name may be
            raise argparse.ArgumentTypeError(str(exc)) from None
        except Exception:  # ConfigurationError, or text that is not a number
            raise argparse.ArgumentTypeError(f"{text!r} is not {option.check.describe()}") from None

    from_text.__name__ = option.name
    group.add_argument(
        *option.flags,
        dest=option.name,
        type=from_text,
        default=default,
        metavar=option.metavar,
        help=help_text,
    )


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 86_400:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0.1 to 86,400")
    return value


def port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return int(text)


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def add_common(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """The options every command takes. On the top-level parser they carry the defaults;
    on a command's parser they are SUPPRESSed unless given, so that a value given before
    the command is not reset by the command's parser."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("common options (before or after the command)")
    group.add_argument(
        "-A",
        "--app",
        metavar="MODULE:ATTR",
        default=default(os.environ.get("PGTASKS_APP")),
        help="the App, e.g. myproj.tasks:app; the current directory is importable "
        "(default: $PGTASKS_APP; worker needs it, other commands need only a database)",
    )
    group.add_argument(
        "--dsn",
        metavar="URL",
        default=default(None),
        help="database URL (default: the app's: $PGTASKS_DSN, $DATABASE_URL, else the "
        "embedded server)",
    )
    group.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        default=default(None),
        help="DEBUG, INFO, WARNING or ERROR, in any case (default: INFO for worker, "
        "WARNING otherwise)",
    )


def command(
    sub: Any, name: str, summary: str, example: str, anchor: str, details: str = ""
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + "." + (f"\n\n{details}" if details else ""),
        epilog=f"example:\n  {example}\n\ndocs: {DOCS}#{anchor}",
        formatter_class=Formatter,
    )
    add_common(parser)
    return parser


def json_option(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    # suppress: on an action's parser below a command that has --json too, so that
    # `schedules --json list` is not reset by the action's default
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print JSON, for scripts",
    )
