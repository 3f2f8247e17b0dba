"""Work done ahead of the one who needs it: an actor's threads decode the next images (or cut the next crops) while
its model runs on the current batch, so that a fast accelerator does not wait for the CPU (issue 45; how a batch
flows: docs/architecture.md, "Extraction and describe: the model never waits")."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def ahead_of_use(
    fn: Callable[[Item], Result], items: Iterable[Item], threads: int, ahead: int
) -> Iterator[tuple[Item, Result]]:
    """``(item, fn(item))`` in the items' order, ``fn`` run by ``threads`` threads on up to ``ahead`` items
    beyond the one being used (a bounded queue: memory stays flat whatever the number of items). ``threads=0``:
    each item when it is asked for, in the caller's thread. An exception of ``fn`` is raised where its item is
    used; leaving early cancels what has not started."""
    if threads <= 0:
        yield from ((item, fn(item)) for item in items)
        return
    pending: deque[tuple[Item, Future]] = deque()
    source = iter(items)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="mlcseg-ahead")
    try:
        for item in source:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) > ahead:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
