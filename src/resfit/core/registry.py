"""One registry vocabulary for everything resfit looks up by name: architectures, weights,
adapters, engines, data sources, export formats and tasks.

Each kind of thing has one :class:`Registry`; ``register`` adds an entry (also as a decorator),
``get`` looks one up and, for an unknown name, raises a :class:`ConfigError` that lists the
names and suggests the closest ones, and ``names`` lists them in registration order. This is the
shape of torchvision's ``models/_api.py`` (``register_model`` / ``get_model`` / ``list_models``)
applied to every seam, so adding a thing is the same gesture everywhere.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar, overload

from .errors import ConfigError

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[K, T]):
    """Named entries of one kind (``kind`` names it in error messages)."""

    def __init__(self, kind: str, *, listing: str = "") -> None:
        self.kind = kind
        self.listing = listing  # how a user lists them, e.g. "`resfit models` lists them"
        self._entries: dict[K, T] = {}

    @overload
    def register(self, name: K, item: T, *, replace: bool = False) -> T: ...

    @overload
    def register(
        self, name: K, item: None = None, *, replace: bool = False
    ) -> Callable[[T], T]: ...

    def register(self, name: K, item: T | None = None, *, replace: bool = False):
        """Add ``item`` under ``name``; without ``item``, a decorator that adds what it wraps.
        A second entry under a taken name is refused unless ``replace``: two plug-ins that
        claim one name should not silently shadow each other."""

        def add(thing: T) -> T:
            if name in self._entries and not replace:
                raise ValueError(f"a {self.kind} named {name!r} is already registered")
            self._entries[name] = thing
            return thing

        return add if item is None else add(item)

    def get(self, name: K) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(self.unknown(name)) from None

    def unknown(self, name: object) -> str:
        """The message for a name that is not registered: the closest names, then all."""
        names = [str(n) for n in self._entries]
        close = difflib.get_close_matches(str(name), names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        how = f" {self.listing}:" if self.listing else " Known:"
        return f"unknown {self.kind} {name!r}.{hint}{how} {', '.join(names)}."

    def copy(self) -> Registry[K, T]:
        """An independent registry with the same entries (to change in a test)."""
        new: Registry[K, T] = Registry(self.kind, listing=self.listing)
        new._entries = dict(self._entries)
        return new

    def remove(self, name: K) -> T:
        """Take an entry out (a test's temporary plug-in, a replaced implementation)."""
        return self._entries.pop(name)

    def names(self) -> list[K]:
        return list(self._entries)

    def items(self) -> list[tuple[K, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
