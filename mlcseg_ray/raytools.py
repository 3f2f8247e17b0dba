"""Starting or joining Ray, and the small helpers every stage's Ray wrapper shares."""
from __future__ import annotations

import logging
import os
from typing import Optional


class ClusterUnreachable(ConnectionError):
    """No Ray cluster answers at the address the user gave."""


def check_address(address: str, timeout: float = 10.0) -> None:
    """Fail fast, naming the address as given, when nothing listens there (Ray itself retries for minutes, and
    with some addresses reports another one). ``auto`` is left to Ray, which fails fast when no cluster runs."""
    import socket
    from urllib.parse import urlsplit

    if not address or address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port or (8265 if parts.scheme in ("http", "https") else 6379)
    except ValueError:
        raise ClusterUnreachable(f"--address {address!r} is not HOST:PORT, ray://HOST:PORT or http://HOST:PORT")
    if not host:
        raise ClusterUnreachable(f"--address {address!r} is not HOST:PORT, ray://HOST:PORT or http://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ClusterUnreachable(f"no Ray cluster answers at --address {address} ({e.strerror or e})") from None


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
        check_address(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        except ConnectionError as e:
            raise ClusterUnreachable(f"no Ray cluster at --address {address}: {e}") from None
    else:
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=num_cpus,
            logging_level=logging.WARNING,
        )
        _start_reaper()
    _quiet_ray_data()
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _start_reaper() -> None:
    """A watchdog that ends this embedded Ray's processes if the driver dies without shutting it down."""
    import subprocess
    import sys

    from ray._private import worker

    session_dir = worker._global_node.get_session_dir_path()
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    subprocess.Popen([sys.executable, "-m", "mlcseg_ray.reaper", str(os.getpid()), session_dir], env=env,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)


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


def use_gpus(device: str) -> bool:
    """The one GPU choice of every stage: ``auto`` uses the cluster's GPUs when it has any, ``cpu`` never,
    ``cuda`` demands them."""
    gpus = cluster_gpus()
    if device == "cuda" and gpus == 0:
        raise RuntimeError("device=cuda but the Ray cluster has no GPU")
    return device != "cpu" and gpus > 0


def task_gpus(device: str, gpus: float | None = None, cpus: int | None = None) -> float:
    """GPU share requested by one shard task (k-means passes, clustering): GPUs / CPUs of the cluster, so a GPU
    node runs one task per CPU, each seeing its GPU. Asking for a share confines the tasks to GPU nodes; on a
    cluster without GPUs (or with ``device=cpu``) it is 0 and the tasks run on CPUs."""
    if gpus is None:
        if not use_gpus(device):
            return 0.0
        gpus, cpus = cluster_gpus(), cluster_cpus()
    elif device == "cpu" or gpus <= 0:
        return 0.0
    return round(min(1.0, max(gpus / max(cpus or 1, 1), 1e-4)), 4)  # Ray wants fractions to 4 decimals
