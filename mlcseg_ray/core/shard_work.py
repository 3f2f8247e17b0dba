"""What runs in a worker: one shard of a stage and then its marker, or one task of a stage's global part; each with
its writes confined to the run folder and, for a shard, recorded in its marker."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .integrity import declared_outputs
from .stage import Stage, StageContext
from .storage import atomic_write_json, confined_to, recording_writes


def run_shard(stage: Stage, ctx: StageContext, shard: int, shared: Any, fingerprint: str, worker: Any = None) -> None:
    """One shard of a stage, then its marker: the outputs are in place before the marker says so. Nothing is sent
    back: the driver reads the marker (a result sent back would carry every image's confidence and flag, held by
    the driver until the stage ends)."""
    t0 = time.perf_counter()
    with confined_to(ctx.run.root):  # the shard's outputs and its marker stay in the run folder
        with recording_writes() as written:
            result = stage.process_shard(ctx, shard, shared, worker) or {}
        result["seconds"] = round(time.perf_counter() - t0, 4)
        outputs = declared_outputs(stage.writes, ctx.run, written)  # what a rerun checks is still there
        inputs = {"inputs": stage.shard_inputs(ctx, shard)} if stage.per_shard(ctx.cfg) else {}
        atomic_write_json(
            ctx.run.marker(stage.name, shard), {"fingerprint": fingerprint, **result, **inputs, "outputs": outputs}
        )


def confined_task(item: Any, root: str, fn: Callable, *shared: Any) -> Any:
    """``fn(item, *shared)`` with its writes confined to the run folder ``root``: a task of a stage's global part,
    in any worker."""
    with confined_to(root):
        return fn(item, *shared)


def shard_task(shard: int, stage: Stage, ctx: StageContext, shared: Any, fp: str) -> None:
    run_shard(stage, ctx, shard, shared, fp)


def actor_shard(stage: Stage, ctx: StageContext, shared: Any, fp: str, shard: int, worker: Any) -> None:
    run_shard(stage, ctx, shard, shared, fp, worker)
