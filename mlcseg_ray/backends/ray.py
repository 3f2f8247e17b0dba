"""The Ray backend: tasks with the declared resources, results in item order (so every reduction adds in the same
order), and an actor pool (Ray Data) for stages that keep a model between shards."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..core.stage import Resources
from .ray_runtime import cluster_cpus, cluster_gpus, gcs_address, init_ray, task_gpus, use_gpus

log = logging.getLogger("mlcseg_ray")

# Tasks in flight per CPU: enough to hide a task's start-up, few enough that the results waiting in the driver
# stay small.
IN_FLIGHT_PER_CPU = 2
# glibc gives each thread that allocates its own malloc arena (up to 8 a core), and an arena keeps the memory it once
# held: an actor's decode threads (issue 45) took its peak RSS to 1.3-1.4x of decoding in one thread; with two arenas
# 1.01x, and the model busier (bench/accelerator_feed.py; BENCHMARKS.md). Set in the actor's environment, as glibc
# reads it when the process starts (mallopt from inside the running actor changed nothing, measured).
ACTOR_ENV = {"MALLOC_ARENA_MAX": "2"}
# A task that died with its worker (a lost node, an OOM kill) is run again this many times before the stage fails.
TASK_RETRIES = 3


class RayBackend:
    name = "ray"

    def __init__(self, address: str | None = None, requested: str = "auto") -> None:
        self.address, self.requested = address, requested
        self._up = False
        self._ticks: RayTicks | None = None

    def _init(self) -> None:
        if not self._up:
            # the seconds before the first task are Ray's: say so, or a small run looks frozen
            log.info(f"joining the Ray cluster at {self.address}" if self.address else "starting Ray on this machine")
            init_ray(self.address)
            self._up = True

    def describe(self) -> dict:
        """The cluster the run used: its GCS address, and whether it was this run's own embedded Ray."""
        if not self._up:
            return {"name": "ray", "embedded": not self.address}
        return {"name": "ray", "embedded": not self.address, "address": gcs_address()}

    def device(self) -> str:
        self._init()
        return "cuda" if use_gpus(self.requested) else "cpu"

    def ticks(self) -> RayTicks:
        """One count for the whole command (an actor is a worker process: not one per stage)."""
        self._init()
        if self._ticks is None:
            self._ticks = RayTicks()
        return self._ticks

    def map(
        self,
        fn: Callable,
        items: Sequence,
        *shared: Any,
        resources: Resources = Resources(),
        on_done: Callable[[], None] | None = None,
    ) -> list:
        if not items:  # nothing to fan out (a folder without subfolders): no reason to start Ray
            return []
        self._init()
        share = task_gpus(self.requested)
        gpus = {"none": 0.0, "share": share, "one": 1.0 if share else 0.0}[resources.gpus]
        return ray_map(fn, items, *shared, cpus=resources.cpus, gpus=gpus, on_done=on_done)

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
        import ray
        from ray.data import ActorPoolStrategy

        self._init()
        gpu = device == "cuda"
        n_actors = max(1, min(num_workers or (int(cluster_gpus()) if gpu else 1), len(shards)))
        ds = ray.data.from_items([{"shard": n} for n in shards], override_num_blocks=len(shards)).map_batches(
            _ShardActor,
            fn_constructor_kwargs=dict(
                setup=setup, work=work, device=device, threads=max(1, cluster_cpus() // n_actors)
            ),
            batch_size=1,  # one shard per call: a shard is the unit of resume
            compute=ActorPoolStrategy(
                size=n_actors,
                max_concurrent_calls_per_actor=resources.shards_at_once,
                enable_true_multi_threading=resources.shards_at_once > 1,  # else Ray Data calls an actor in series
            ),
            num_gpus=1 if gpu else 0,
            num_cpus=1 if gpu else resources.cpus,
            runtime_env={"env_vars": ACTOR_ENV},
        )
        for _ in ds.iter_batches(batch_size=1, batch_format="numpy"):
            if on_done:
                on_done()


class _Count:
    """The actor behind :class:`RayTicks`: a count that workers add to and the driver takes."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


class RayTicks:
    """:class:`~mlcseg_ray.core.progress.Ticks` across the cluster: workers add without waiting (one small message
    per call), the driver's progress thread takes the count a few times a second. The actor asks for no CPU and
    lives on the driver's node (a worker node may be lost mid-run) and ends with the driver; a count that cannot be
    reached is a bar that stops moving, never a failed run."""

    def __init__(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.actor = ray.remote(num_cpus=0)(_Count).options(scheduling_strategy=here).remote()

    def add(self, n: int = 1) -> None:
        with contextlib.suppress(Exception):
            self.actor.add.remote(n)

    def take(self) -> int:
        import ray

        try:
            return ray.get(self.actor.take.remote(), timeout=10)
        except Exception:
            return 0


class _ShardActor:
    """A pool member: builds its worker state once, then is called by Ray Data with a batch of one shard."""

    def __init__(self, setup: Callable[[], Any], work: Callable[[int, Any], Any], device: str, threads: int) -> None:
        if device == "cpu":
            import torch

            torch.set_num_threads(max(1, threads))
        self.work = work
        self.worker = setup()

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        shards = [int(s) for s in batch["shard"]]
        for s in shards:  # its result is in the shard's marker: the driver reads that, not a copy sent back
            self.work(s, self.worker)
        return {"shard": np.asarray(shards)}


def ray_map(
    fn: Callable,
    items: Sequence,
    *shared: Any,
    cpus: float = 1.0,
    gpus: float = 0.0,
    on_done: Callable[[], None] | None = None,
) -> list:
    """``[fn(item, *shared) for item in items]`` as Ray tasks, in item order: ``shared`` put in the object store
    once, at most :data:`IN_FLIGHT_PER_CPU` tasks per CPU in flight."""
    import ray

    remote = _remote(fn, cpus, gpus)
    refs = [ray.put(a) for a in shared]
    results, pending, pos, limit = {}, {}, 0, IN_FLIGHT_PER_CPU * cluster_cpus()
    while pos < len(items) or pending:
        while pos < len(items) and len(pending) < limit:
            pending[remote.remote(items[pos], *refs)] = pos
            pos += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        results[pending.pop(done[0])] = ray.get(done[0])
        if on_done:
            on_done()
    return [results[i] for i in range(len(items))]


_REMOTES: dict = {}


def _remote(fn: Callable, cpus: float, gpus: float) -> Any:
    import ray

    key = (fn, cpus, gpus)
    if key not in _REMOTES:
        # max_calls=0: Ray's default for GPU tasks is a fresh worker per call (seconds each, CUDA set-up
        # included); a shard task keeps nothing on the GPU worth releasing between calls.
        _REMOTES[key] = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=TASK_RETRIES, max_calls=0)(fn)
    return _REMOTES[key]
