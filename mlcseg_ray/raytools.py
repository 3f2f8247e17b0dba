"""Starting or joining Ray, and the small helpers every stage's Ray wrapper shares."""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Optional

log = logging.getLogger("mlcseg_ray")


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Embedded Ray without an address (loopback only); ``auto`` or ``HOST:PORT`` joins a running cluster."""
    if not address:
        # An embedded single-node Ray needs no remotely reachable address: keep it on loopback (Ray otherwise
        # replaces 127.0.0.1 by the machine's interface address). Read by Ray when it is first imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=num_cpus,
            logging_level=logging.WARNING,
        )
    _quiet_ray_data()
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _quiet_ray_data() -> None:
    # Our own rich progress bars report progress; Ray Data's per-operator bars would interleave with them.
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_tasks(remote_fn, args_list: Iterable[tuple], on_result: Callable | None = None, max_in_flight: int = 0):
    """Submit ``remote_fn.remote(*args)`` for every args tuple, at most ``max_in_flight`` at once, and hand each
    result to ``on_result`` as it completes (bounded memory on the driver; results in completion order)."""
    import ray

    max_in_flight = max_in_flight or 2 * cluster_cpus()
    pending, results = [], []
    it = iter(args_list)
    exhausted = False
    while True:
        while not exhausted and len(pending) < max_in_flight:
            try:
                pending.append(remote_fn.remote(*next(it)))
            except StopIteration:
                exhausted = True
        if not pending:
            break
        done, pending = ray.wait(pending, num_returns=1)
        value = ray.get(done[0])
        if on_result is not None:
            on_result(value)
        else:
            results.append(value)
    return results
