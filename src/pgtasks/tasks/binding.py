"""Binding arguments to a task function's parameters, at both ends of a job.

A producer's call is checked against the signature (the binding) and each value against its
type hint, before anything is sent; a worker binds what a message carries to the same
parameters and converts each value to its hinted type. Both use the shapes compiled once per
task (`Shapes`, from `serialization.hints`). `PlainParams` is the fast path of the usual
signature: plain parameters, passed by name, checked without `inspect.Signature.bind`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..serialization import envelope, hints
from ..serialization.shapes import Check, Converter, Misfit, NeedsExact

Bound = tuple[tuple[Any, ...], dict[str, Any]]
"""Positional and named arguments, ready to call the function with."""


@dataclass(frozen=True)
class PlainParams:
    """A signature of plain parameters only (positional-or-keyword, then keyword-only), for
    `Arguments.bind`'s fast path."""

    names: tuple[str, ...]
    positional: int
    accepted: frozenset[str]
    required: frozenset[str]

    @classmethod
    def of(cls, sig: inspect.Signature) -> PlainParams | None:
        params = list(sig.parameters.values())
        plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        if any(p.kind not in plain for p in params):
            return None
        return cls(
            names=tuple(p.name for p in params),
            positional=sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params),
            accepted=frozenset(p.name for p in params),
            required=frozenset(p.name for p in params if p.default is inspect.Parameter.empty),
        )

    def fits_named(self, kwargs: dict[str, Any]) -> bool:
        """Whether these arguments, all passed by name, bind: none unknown, none missing."""
        return kwargs.keys() <= self.accepted and self.required.issubset(kwargs)


_RECEIVED = object()  # where a workflow step's received result will go


class Arguments:
    """The parameters of one task function: checks a producer's call against them, and binds
    a message's arguments to them. The shapes are compiled on first use, not at decoration: a
    hint may name a class defined after the task."""

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self.fn = fn
        self._signature = inspect.signature(fn)
        self._plain_params = PlainParams.of(self._signature)
        self._shapes: Shapes | None = None

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Bound:
        """Check a call against the signature; keep by name every argument that can be
        passed by name, so messages are self-describing."""
        plain = self._plain_params
        if plain is not None:
            # The common signature (no positional-only, no *args/**kwargs): the same check as
            # Signature.bind at a fraction of the cost. Anything else (a missing, unknown or
            # doubled argument) falls through to bind() and its error message.
            if not args:
                if plain.fits_named(kwargs):
                    self.check(kwargs)
                    return (), kwargs
            elif len(args) <= plain.positional:
                given = dict(zip(plain.names, args, strict=False))
                if given.keys().isdisjoint(kwargs) and kwargs.keys() <= plain.accepted:
                    given.update(kwargs)
                    if plain.required <= given.keys():
                        self.check(given)
                        return (), given
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"task {self.name!r}: {exc}") from None
        self.check(bound.arguments)
        if any(
            self._signature.parameters[n].kind is inspect.Parameter.VAR_POSITIONAL and v
            for n, v in bound.arguments.items()
        ):  # with extra positionals, the parameters before them must stay positional
            return bound.args, bound.kwargs
        positional: list[Any] = []
        named: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.POSITIONAL_ONLY:
                positional.append(value)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        return tuple(positional), named

    def bind_receiving(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], count: int = 1
    ) -> Bound:
        """Check a call that is to receive ``count`` more positional arguments first: a
        chain's step, given the result of the step before it (a chord's callback, the list
        of results; a workflow's error callback, the failed step and its error). Returns the
        arguments as given, for those to go in front of at run time."""
        try:
            bound = self._signature.bind(*[_RECEIVED] * count, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"task {self.name!r}: {exc}") from None
        given: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if value is _RECEIVED:
                continue
            if isinstance(value, tuple):  # *args: what is received is among them
                value = tuple(v for v in value if v is not _RECEIVED)
            given[name] = value
        self.check(given)
        return tuple(args), dict(kwargs)

    def check(self, arguments: Mapping[str, Any]) -> None:
        """Raise `TypeError` naming the task, the argument, the type its hint expects and the
        type it was given, for the first argument whose hint does not accept it."""
        shapes = self._shapes or self._compile()
        natives, checks = shapes.natives, shapes.checks
        for name, value in arguments.items():
            if natives.get(name) is type(value):
                continue  # an int for an int: the usual case, at the cost of a lookup
            check = checks.get(name)
            if check is not None:
                try:
                    check(value)
                except Misfit as exc:
                    what = f"task {self.name!r}: argument {name!r}"
                    raise TypeError(exc.explain(what)) from None

    def _compile(self) -> Shapes:
        # on first use, not at decoration: a hint may name a class defined after the task
        self._shapes = Shapes.of(self.fn)
        return self._shapes

    def bind_message(self, env: envelope.Envelope) -> Bound:
        """See `Task.bind_message`."""
        shapes = self._shapes or self._compile()
        try:
            return self._load(env.args, env.kwargs, shapes, env.exact)
        except NeedsExact:
            exact = env.exactly()
            return self._load(exact.args, exact.kwargs, shapes, True)

    def _load(self, args: list[Any], kwargs: dict[str, Any], shapes: Shapes, exact: bool) -> Bound:
        plain = self._plain_params
        if not args and plain is not None and plain.fits_named(kwargs):
            # what producers send for ordinary parameters: no bind() needed (see `bind`)
            shapes.convert(kwargs, exact)
            return (), kwargs
        bound = self._signature.bind(*args, **kwargs)
        shapes.convert(bound.arguments, exact)
        return bound.args, bound.kwargs


@dataclass(frozen=True)
class Shapes:
    """What a task's parameters accept (see `shapes.Shape`), by name: the producer's
    checks, and the worker's loaders for bodies read by orjson and read exactly."""

    natives: dict[str, type]  # see shapes.Shape.native
    checks: dict[str, Check]
    loads: dict[str, Converter]
    exact_loads: dict[str, Converter]

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> Shapes:
        shapes = hints.signature_shapes(fn)
        return cls(
            {name: s.native for name, s in shapes.items() if s.native is not None},
            {name: s.check for name, s in shapes.items() if s.check is not None},
            {name: s.load for name, s in shapes.items() if s.load is not None},
            {name: s.load_exact for name, s in shapes.items() if s.load_exact is not None},
        )

    def convert(self, arguments: dict[str, Any], exact: bool) -> None:
        """Load the arguments of a message (read ``exact``-ly or not) in place; errors name
        the argument."""
        natives, loads = self.natives, self.exact_loads if exact else self.loads
        name = ""
        try:
            for name, value in arguments.items():
                if natives.get(name) is not type(value) and (load := loads.get(name)):
                    arguments[name] = load(value)  # a new value, no new key: safe in the loop
        except Misfit as exc:
            raise TypeError(exc.explain(f"argument {name!r}")) from None
        except TypeError as exc:
            raise TypeError(f"argument {name!r}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"argument {name!r}: {exc}") from None
