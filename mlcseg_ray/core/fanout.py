"""How work fans out, with no dependency at all: the ``map_fn`` every global step takes, and its in-process form."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# ``map_fn(fn, items, *shared) -> [fn(item, *shared) for item in items]``, in order: how a stage's global part
# (k-means passes over the shards) fans out, on Ray or in-process.
MapFn = Callable[..., list]


def serial_map(fn: Callable, items: Sequence, *shared: Any, on_done: Callable[[], None] | None = None) -> list:
    """``[fn(item, *shared) for item in items]`` in this process (``on_done()`` after each item, for progress)."""
    out = []
    for item in items:
        out.append(fn(item, *shared))
        if on_done:
            on_done()
    return out


__all__ = ["MapFn", "serial_map"]
