"""Method name -> Selector class. Methods register themselves on import."""

from __future__ import annotations

from altrack.selection.base import Selector

_REGISTRY: dict[str, type[Selector]] = {}


def register(cls: type[Selector]) -> type[Selector]:
    if cls.name in _REGISTRY:
        raise ValueError(f"selection method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_selector(name: str) -> Selector:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose from {', '.join(_REGISTRY)}") from None
