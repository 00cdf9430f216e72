"""Name -> factory registries, so configs pick backends by name."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A small registry of named factories.

    Backends register with ``@REGISTRY.register("name")``; configs call ``REGISTRY.create("name", **kwargs)``.
    Registration is lazy-import friendly: a backend module that needs optional heavy dependencies only imports
    them inside its factory.
    """

    def __init__(self, kind: str, modules: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        # name -> module that registers it when imported, so heavy backends load only when picked
        self._modules = dict(modules or {})

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(set(self._factories) | set(self._modules))

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``, importing its module first if needed."""
        if name not in self._factories and name in self._modules:
            importlib.import_module(self._modules[name])
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or '(none)'}")
        return self._factories[name]

    def create(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)
