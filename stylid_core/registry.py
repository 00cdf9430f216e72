"""Name -> factory registries, so configs pick backends by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A small registry of named factories.

    Backends register with ``@REGISTRY.register("name")``; configs call ``REGISTRY.create("name", **kwargs)``.
    Registration is lazy-import friendly: a backend module that needs optional heavy dependencies only imports
    them inside its factory.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._factories)

    def create(self, name: str, **kwargs) -> T:
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or '(none)'}")
        return self._factories[name](**kwargs)
