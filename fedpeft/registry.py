"""One registry shape for every pluggable choice (aggregation rules, PEFT methods, accountants, partitioners), as
TensorFlow Federated registers its aggregators: a class registers itself under its ``name``, and the config's
choice list, its error messages and the docs come from the registry, never from a list kept beside it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from fedpeft.errors import FedpeftError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, key: str, error: Callable[[str], FedpeftError]) -> None:
        """``what``: e.g. "aggregation rule"; ``key``: the config key that names one; ``error``: its error type."""
        self.what, self.key, self.error = what, key, error
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name")  # noqa: B009 (every registered class declares a ClassVar name)
        if name in self._classes:
            raise ValueError(f"{self.what} '{name}' is registered twice")
        self._classes[name] = cls
        return cls

    def all(self) -> dict[str, type[T]]:
        """Name -> class, in registration order (a copy)."""
        return dict(self._classes)

    def get(self, name: object) -> type[T]:
        """The class registered as ``name``; the domain error names the key, the value and the choices."""
        if isinstance(name, str) and name in self._classes:
            return self._classes[name]
        raise self.error(f"{self.key} = {name!r} is unknown; use one of {list(self._classes)}")
