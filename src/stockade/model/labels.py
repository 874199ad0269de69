"""Immutable, hashable label maps."""

from __future__ import annotations

from collections.abc import Iterator, Mapping


class Labels(Mapping[str, str]):
    """A frozen label map; equal maps hash alike, so they can key caches."""

    __slots__ = ("_data", "_hash", "_items")

    def __init__(self, data: Mapping[str, str] | None = None) -> None:
        items = tuple(sorted((data or {}).items()))
        self._items = items
        self._data = dict(items)
        self._hash = hash(items)

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[Labels], tuple[dict[str, str]]]:
        # Rebuilt from the items, never with the kept hash: a string's hash differs
        # from one interpreter to the next, and the agent's warm start is pickled by
        # another process. A stale hash makes an equal Labels a different key.
        return Labels, (self._data,)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Labels({self._data!r})"

    def items_tuple(self) -> tuple[tuple[str, str], ...]:
        return self._items

    def as_dict(self) -> dict[str, str]:
        """A plain copy (what `dict(labels)` gives, at C speed: a load stores 10,000)."""
        return self._data.copy()

    def with_labels(self, **changes: str | None) -> Labels:
        data = dict(self._data)
        for k, v in changes.items():
            if v is None:
                data.pop(k, None)
            else:
                data[k] = v
        return Labels(data)

    def render(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self._items)


EMPTY = Labels()
