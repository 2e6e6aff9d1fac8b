"""Named registries: one per extension point (methods, whitening operators, datasets, architectures).

A registry maps a name to an object and is the one place that name is defined: config validation,
``wmse presets`` and the builders all read it. Registering is one call (or decorator) next to the
thing registered::

    ARCHS = Registry("arch")

    @ARCHS.register("small")
    def small(image_size, in_channels): ...

    ARCHS["small"]        # the object; an unknown name raises ValueError listing the known ones
    ARCHS.names()         # ("small", ...) in registration order
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, in registration order; ``kind`` names the extension point in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T, replace: bool = False) -> T:
        """Register ``obj`` as ``name``; a name taken by another object raises ValueError unless ``replace``."""
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items and self._items[name] is not obj and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name or pass replace=True")
        self._items[name] = obj
        return obj

    def register(self, name: str, replace: bool = False) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda obj: self.add(name, obj, replace)

    def remove(self, name: str) -> None:
        """Unregister ``name`` (tests that register a toy entry clean up with this)."""
        self._items.pop(name, None)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def get(self, name: str, arg: str | None = None) -> T:
        """The object registered as ``name``; else ValueError naming the choices (and the argument ``arg``)."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            where = f"{arg}: " if arg else ""
            raise ValueError(f"{where}unknown {self.kind} {name!r}; choose one of {', '.join(self._items)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def items(self):
        return self._items.items()

    def check(self, name: str, arg: str | None = None) -> None:
        """ValueError naming the choices when ``name`` is not registered."""
        self.get(name, arg)
