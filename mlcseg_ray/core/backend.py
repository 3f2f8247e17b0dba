"""The protocol every backend (:mod:`mlcseg_ray.backends`) follows: a map over items (tasks) and a map over shards
with a per-worker state (an actor pool), both in item order, and the torch device the run's models use."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .stage import Resources


class Backend(Protocol):
    name: str

    def map(
        self,
        fn: Callable,
        items: Sequence,
        *shared: Any,
        resources: Resources = Resources(),
        on_done: Callable[[], None] | None = None,
    ) -> list:
        """``[fn(item, *shared) for item in items]``, in item order."""
        ...

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
        """``work(shard, worker)`` for every shard, ``worker = setup()`` built once per worker."""
        ...

    def describe(self) -> dict:
        """What the run ran on, for run.json: the backend, and for Ray the cluster's address."""
        ...

    def ticks(self) -> Any:
        """A :class:`~mlcseg_ray.core.progress.Ticks` that this backend's workers reach: images counted where they
        finish, read by the driver's progress bar."""
        ...

    def device(self) -> str:
        """The torch device of the run's models, for the ``device`` the backend was made with (``auto``, ``cpu``,
        ``cuda``)."""
        ...


def torch_device(requested: str, gpus_visible: bool, where: str) -> str:
    """The one GPU choice of every backend: ``auto`` uses a GPU when ``where`` (this machine, the Ray cluster) has
    one, ``cpu`` never, ``cuda`` demands one."""
    if requested == "cuda" and not gpus_visible:
        raise RuntimeError(f"device=cuda but {where} has no GPU")
    return "cuda" if requested != "cpu" and gpus_visible else "cpu"
