"""The shared base of every defense and classifier config: choices, dict round trip, replace.

A config is a frozen dataclass that subclasses :class:`Config`. Its fields are the single source of
truth: a defense's ``__init__`` takes its defaults from the class attributes
(``threshold: float = ECSOConfig.threshold``), choice fields are typed ``Literal[...]`` and checked
here, once, and calibration stores what it found with :meth:`Config.replace`.

>>> from guardrails.defenses.ecso import ECSOConfig
>>> cfg = ECSOConfig(threshold=0.7)
>>> ECSOConfig.from_dict(cfg.to_dict()) == cfg
True
>>> cfg.replace(no_image="flag").no_image
'flag'
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

__all__ = ["Config", "choices_of"]

C = TypeVar("C", bound="Config")


def choices_of(hint: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` hint (``Literal[...] | None`` adds None); None for any other hint."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType):
        members = typing.get_args(hint)
        literals = [m for m in members if typing.get_origin(m) is Literal]
        if literals and all(typing.get_origin(m) is Literal or m is type(None) for m in members):
            out = tuple(v for m in literals for v in typing.get_args(m))
            return out + (None,) if type(None) in members else out
    return None


def _is_tuple(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return True
    return origin in (Union, types.UnionType) and any(typing.get_origin(m) is tuple for m in typing.get_args(hint))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _jsonable(value: Any) -> Any:
    """JSON-safe form of a field value. Objects that are not data (callables, OCR engines) become a
    description string, which the config's own validation refuses when read back."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    import prompts  # a template is written as its registry name, which the configs accept

    if isinstance(value, prompts.PromptTemplate):
        return value.name
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    return f"<{'callable' if callable(value) else 'object'} {getattr(value, '__module__', '?')}.{name}>"


class Config:
    """Mixin for frozen dataclass configs. A subclass's ``__post_init__`` calls ``super().__post_init__()``
    first, so every ``Literal`` field is checked before its own checks."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            allowed = choices_of(_hints(type(self)).get(f.name))  # type: ignore[arg-type]  # a class is hashable; mypy reads type[Config] as not
            value = getattr(self, f.name)
            # `type(...)` too: True == 1, and 1 must not pass for Literal[True]
            if allowed is not None and not any(value == a and type(value) is type(a) for a in allowed):
                raise ValueError(f"{f.name} must be one of {allowed}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-safe (tuples -> lists, paths -> str, prompt templates -> their names)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """The inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are a ValueError."""
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_dict needs a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ValueError(f"{cls.__name__} has no field {unknown[0]!r}; it accepts {', '.join(names)}")
        required = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                    if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{cls.__name__} needs {', '.join(map(repr, missing))}; got {', '.join(d) or 'no keys'}")
        hints = _hints(cls)  # type: ignore[arg-type]  # as in __post_init__
        # JSON has no tuples: give tuple fields their type back so a round trip compares equal.
        kw = {k: tuple(v) if isinstance(v, list) and _is_tuple(hints.get(k)) else v for k, v in d.items()}
        return cls(**kw)

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied and validated again (``dataclasses.replace``)."""
        names = [f.name for f in dataclasses.fields(self) if f.init]  # type: ignore[arg-type]
        unknown = [k for k in changes if k not in names]
        if unknown:
            raise ValueError(f"{type(self).__name__} has no field {unknown[0]!r}; it accepts {', '.join(names)}")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]
