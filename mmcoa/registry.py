"""One registry type for every kind of named, pluggable thing: attacks, defenses, candidate sources,
datasets and their ``scheme:ARG`` forms, retrieval sets, model-reference schemas.

A registry maps a name to an entry (a class or a factory); a module adds its entries with the
``register`` decorator at import, and the rest of the code looks them up by name, so adding an attack
or a dataset never touches a chain of ``if``s. An unknown name raises the registry's error type with
the list of registered names, which is what a user who mistyped one needs.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry for one kind of thing (``kind`` names it in messages)."""

    def __init__(self, kind: str, error: type[Exception] = ValueError):
        self.kind, self.error = kind, error
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: add the decorated entry under ``name``; a name is registered once."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = entry
            return entry

        return add

    def register_named(self, name: str) -> Callable[[T], T]:
        """Decorator for classes that know their registered name: sets ``entry.name``, then registers."""

        def add(entry: T) -> T:
            entry.name = name  # type: ignore[attr-defined]
            return self.register(name)(entry)

        return add

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise self.error(f"unknown {self.kind} '{name}'; registered: {', '.join(self.names())}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._entries[name]) for name in self.names()]

    def split_scheme(self, name: str) -> tuple[str | None, str]:
        """For a registry of schemes: ``scheme:ARG`` with a registered scheme -> (scheme, ARG);
        any other name -> (None, name)."""
        scheme, sep, arg = name.partition(":")
        if sep and scheme in self._entries:
            return scheme, arg
        return None, name
