"""The in-process backend: plain loops (unit tests, notebooks, small arrays)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..core.backend import torch_device
from ..core.fanout import serial_map
from ..core.progress import Ticks
from ..core.stage import Resources


class LocalBackend:
    name = "local"

    def __init__(self, requested: str = "auto") -> None:
        self.requested = requested

    def map(
        self,
        fn: Callable,
        items: Sequence,
        *shared: Any,
        resources: Resources = Resources(),
        on_done: Callable[[], None] | None = None,
    ) -> list:
        return serial_map(fn, items, *shared, on_done=on_done)

    def map_actors(
        self,
        setup: Callable[[], Any],
        work: Callable[[int, Any], Any],
        shards: Sequence[int],
        resources: Resources,
        device: str,
        num_workers: int,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        worker = setup()  # one worker state for every shard
        for n in shards:
            work(n, worker)
            if on_done:
                on_done()

    def describe(self) -> dict:
        return {"name": "local"}

    def ticks(self) -> Ticks:
        return Ticks()

    def device(self) -> str:
        if self.requested == "cpu":
            return "cpu"
        import torch

        return torch_device(self.requested, torch.cuda.is_available(), where="this machine")
