"""A small least-recently-used map for in-process tiers, bounded by count and by weight."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["LRU"]

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most ``max_entries`` items and, when ``weigh`` is given, at most ``max_weight`` in
    total weight; reading an item makes it the last to be evicted. An item heavier than
    ``max_weight`` on its own is not kept."""

    __slots__ = ("_data", "_weigh", "max_entries", "max_weight", "weight")

    def __init__(
        self,
        max_entries: int,
        max_weight: int = 0,
        weigh: Callable[[V], int] | None = None,
    ) -> None:
        self._data: OrderedDict[K, V] = OrderedDict()
        self._weigh = weigh
        self.max_entries = max_entries
        self.max_weight = max_weight
        self.weight = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: K) -> bool:
        return key in self._data

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def set(self, key: K, value: V) -> None:
        if self.max_entries <= 0:
            return
        if self._weigh is None:
            self._data[key] = value
            self._data.move_to_end(key)
            if len(self._data) > self.max_entries:
                self._data.popitem(last=False)
            return
        size = self._weigh(value)
        if size > self.max_weight:
            return
        self.pop(key)
        self._data[key] = value
        self.weight += size
        while len(self._data) > self.max_entries or self.weight > self.max_weight:
            _, evicted = self._data.popitem(last=False)
            self.weight -= self._weigh(evicted)

    def pop(self, key: K) -> V | None:
        value = self._data.pop(key, None)
        if value is not None and self._weigh is not None:
            self.weight -= self._weigh(value)
        return value

    def clear(self) -> None:
        self._data.clear()
        self.weight = 0
