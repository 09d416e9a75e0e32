"""Explicit registries for policies and backends, open to third-party entry points.

Built-ins are listed here by lazy ``"module:attr"`` paths, so importing hcpolicy imports
no policy module, transformers or sglang until a name is looked up.
Third-party packages add to the ``hcpolicy.policies`` and ``hcpolicy.backends``
entry-point groups; those are read on first lookup, not at import.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Callable, Generic, TypeVar

if TYPE_CHECKING:
    from hcpolicy.describe import Description

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object (or a lazy ``"module:attr"`` path resolved on first use)."""

    def __init__(self, kind: str, group: str, builtins: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.group = group
        self._items: dict[str, T | str] = dict(builtins or {})
        self._entry_points_loaded = False

    def register(self, name: str, obj: T | str | None = None) -> Callable[[T], T] | None:
        """Register ``obj`` under ``name``; without ``obj``, return a class decorator."""
        if obj is not None:
            self._add(name, obj)
            return None

        def decorate(cls: T) -> T:
            self._add(name, cls)
            return cls

        return decorate

    def _add(self, name: str, obj: T | str) -> None:
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{self.kind} name must be alphanumeric (with - or _), got {name!r}")
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        self._load_entry_points()
        if name not in self._items:
            known = ", ".join(self.names()) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}")
        obj = self._items[name]
        if isinstance(obj, str):
            module, _, attr = obj.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._items[name] = obj
        return obj

    def describe(self, name: str) -> Description:
        """Summary line and options of ``name``: read from source while it is a lazy path, so
        listing imports nothing heavy; from the object once it is imported."""
        from hcpolicy.describe import describe, describe_class

        self._load_entry_points()
        item = self._items.get(name)
        found = describe(item) if isinstance(item, str) else None
        return found if found is not None else describe_class(self.get(name))

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._items:
                # resolved lazily like built-in paths: a broken plugin fails when used, by name
                self._items[ep.name] = ep.value


POLICIES: Registry = Registry(
    "policy",
    "hcpolicy.policies",
    builtins={
        "full": "hcpolicy.policy.baselines:FullKV",
        "heterocache": "hcpolicy.policy.heterocache:HeteroCachePolicy",
        "streamingllm": "hcpolicy.policy.baselines:StreamingLLM",
        "h2o": "hcpolicy.policy.baselines:H2O",
        "snapkv": "hcpolicy.policy.baselines:SnapKV",
        "pyramidkv": "hcpolicy.policy.baselines:PyramidKV",
        "adasnapkv": "hcpolicy.policy.baselines:AdaSnapKV",
        "quest": "hcpolicy.policy.quest:Quest",
    },
)
BACKENDS: Registry = Registry(
    "backend",
    "hcpolicy.backends",
    builtins={
        "hf": "hcpolicy.backends.hf:HFBackend",
        "sglang": "hcpolicy.backends.sglang:SGLangBackend",
        "torch_engine": "hcpolicy.backends.torch_engine:TorchEngineBackend",
    },
)
