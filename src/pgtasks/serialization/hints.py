"""From a type hint to its `Shape`: containers, unions, literals, enums, dataclasses and
pydantic models, built from the leaves in `shapes`, and the shapes of a task function's
parameters (`signature_shapes`).

Hints pgtasks does not know, and hints that are not resolved (a forward reference as a
string), accept anything, as they always have.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import types
import typing
from collections import abc
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

import orjson
import typing_extensions

from .shapes import (
    ANY,
    NATIVES,
    SCALARS,
    Converter,
    Misfit,
    NeedsExact,
    Shape,
    checker,
    describe,
    is_a,
    json_floats,
    leaf,
    short_repr,
)


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
                raise exc.within(f"[{short_repr(k)}]") from None

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
                raise exc.within(f"[{short_repr(k)}]") from None
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
    optional = any(m is NATIVES[type(None)] for m in members)
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

    return leaf(expected, fits, load)


def _enum(cls: type[enum.Enum]) -> Shape:
    def load(value: Any) -> Any:
        try:
            return cls(value)
        except ValueError:
            raise Misfit(cls.__name__, value) from None

    return leaf(cls.__name__, is_a(cls), load)


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
                    unknown = f"an object with a field {short_repr(key)}, which it does not have"
                    raise Misfit(expected, value, unknown)
                conv = shape.load_exact if exact else shape.load
                try:
                    out[key] = item if conv is None else conv(item)
                except Misfit as exc:
                    raise exc.within(f".{key}") from None
            return cls(**out)

        return load

    return Shape(expected, checker(expected, is_a(cls)), loader(False), loader(True))


def _model(cls: type, validate: Callable[[Any], Any]) -> Shape:
    """A pydantic (v2) model, without depending on pydantic; it validates itself."""
    return Shape(
        cls.__name__,
        checker(cls.__name__, is_a(cls)),
        validate,
        lambda v: validate(json_floats(v)),  # what it would get from orjson
    )


@functools.cache
def _class_shape(cls: type) -> Shape:
    known = NATIVES.get(cls) or SCALARS.get(cls)
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
        return _mapping(dict, NATIVES[str], ANY, hint.__name__)
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


def load_value(text: str, hint: Any) -> Any:
    """A JSON value (a job's result, as text) restored to what ``hint`` describes, as a
    task's arguments are: read with orjson, and again with exact numbers where the hint
    needs them (an ``int`` or ``Decimal`` beyond a double)."""
    shape = shape_for(hint)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:  # a number beyond a double: read it exactly
        value = _loads_exact(text)
        return shape.load_exact(value) if shape.load_exact is not None else json_floats(value)
    if shape.load is None:
        return value
    try:
        return shape.load(value)
    except NeedsExact:
        exact = _loads_exact(text)
        return shape.load_exact(exact) if shape.load_exact is not None else value


def _loads_exact(text: str) -> Any:
    return json.loads(text, parse_float=Decimal, parse_int=int)
