"""Starting or joining Ray, and what the cluster offers (CPUs, GPUs, the GPU share of a task)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from ..core.backend import torch_device
from ..core.errors import ClusterAuthError, ClusterUnreachable
from ..core.storage import endpoint_env

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ADDRESS_FORMS = "HOST:PORT, auto, ray://HOST:PORT or http://HOST:PORT"


class BadAddress(ValueError):
    """An ``--address`` that is not an address at all (a usage error, not an unreachable cluster)."""


def _host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port or (8265 if parts.scheme in ("http", "https") else 6379)
    except ValueError:
        raise BadAddress(f"--address {address!r} is not {ADDRESS_FORMS}") from None
    if not host or address.count(":") > (2 if "://" in address else 1) and not address.startswith("["):
        raise BadAddress(f"--address {address!r} is not {ADDRESS_FORMS}")
    return host, port


def check_address(address: str | None, timeout: float = 10.0) -> None:
    """Fail fast, naming the address as given, when nothing listens there (Ray itself retries for minutes, and
    with some addresses reports another one)."""
    if not address or address == "auto":
        return
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ClusterUnreachable(f"no Ray cluster answers at --address {address} ({e.strerror or e})") from None


def running_cluster_address() -> str | None:
    """What ``--address auto`` means: ``RAY_ADDRESS``, else the cluster that ``ray start --head`` on this machine
    last recorded (Ray's ``ray_current_cluster`` file), else None."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    # where Ray keeps it: $RAY_TMPDIR/ray, else $TMPDIR/ray, else /tmp/ray
    system_temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    try:
        with open(os.path.join(system_temp, "ray", "ray_current_cluster")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _keep_ray_on_loopback() -> None:
    """Ray replaces 127.0.0.1 by the machine's interface address unless told not to (the variable is read when
    Ray is first imported; set both, for a process that imported it already)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


# Set while Ray's output goes to a run's log (:func:`ray_output_to_log`): Ray's loggers write there, not here.
_RAY_LOG: list = []


@contextlib.contextmanager
def ray_output_to_log(log_path: Path) -> Iterator[None]:
    """Ray's own output goes to ``log_path``; this tool's lines stay on the terminal. Ray writes to this process's
    stderr from C++ (its core worker's warnings) as well as from Python, so the file descriptor itself is pointed
    at the log, and ``sys.stderr`` (progress, errors, the tool's log lines) at a copy of the terminal's.
    ``MLCSEG_DEBUG=1`` leaves everything on the terminal."""
    if os.environ.get("MLCSEG_DEBUG") or not _stderr_is_fd2():
        yield  # debugging, or stderr already captured by the caller (a test runner): leave it alone
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    old_stderr, sys.stderr = sys.stderr, terminal
    moved = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and h.stream in (old_stderr, sys.__stderr__)
    ]
    for h in moved:
        h.setStream(terminal)
    _RAY_LOG.append(sys.__stderr__)
    try:
        _ray_loggers_to_log()
        yield
    finally:
        _RAY_LOG.pop()
        for h in moved:
            h.setStream(old_stderr)
        sys.stderr = old_stderr
        terminal.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        terminal.close()


def _stderr_is_fd2() -> bool:
    try:
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False


def _ray_loggers_to_log() -> None:
    """Ray's Python loggers (set up when Ray or Ray Data is imported) write to the run's log while one is open."""
    if not _RAY_LOG:
        return
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if (name == "ray" or name.startswith("ray.")) and isinstance(lg, logging.Logger):
            for h in lg.handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    h.setStream(_RAY_LOG[-1])


def _use_cluster_token() -> None:
    """Send the cluster token where there is one. Ray 2.60 does so by itself only for a cluster it found (no
    address, or ``auto``), never for an explicit address, while ``ray start --head`` turns token authentication on;
    its own helper enables token mode in this process when ``RAY_AUTH_MODE`` is unset and a token exists."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Without an address: a new embedded Ray on loopback, whatever else runs on this machine (a ``ray start``
    head, a stale record of one). ``auto`` or ``HOST:PORT``: join that cluster, reached on loopback when it is
    this machine's loopback-only head. An unreachable or stale address fails within seconds, naming it."""
    if not address:
        _keep_ray_on_loopback()
    else:
        resolved = running_cluster_address() if address == "auto" else address
        if resolved is None:
            raise ClusterUnreachable(
                "--address auto: no Ray cluster runs on this machine (start one with "
                "`ray start --head`, give HOST:PORT, or leave --address out for an embedded Ray)"
            )
        check_address(resolved)
        if "://" not in resolved and _host_port(resolved)[0] in LOOPBACK:
            _keep_ray_on_loopback()
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    _ray_loggers_to_log()
    # workers' own output stays in the cluster's session logs; MLCSEG_DEBUG=1 shows it here
    forward = bool(os.environ.get("MLCSEG_DEBUG"))
    if address:
        _use_cluster_token()
        loopback = "://" not in resolved and _host_port(resolved)[0] in LOOPBACK
        try:
            ray.init(
                address=resolved,
                logging_level=logging.WARNING,
                log_to_driver=forward,
                runtime_env={"env_vars": endpoint_env()} if endpoint_env() else None,
                **({"_node_ip_address": "127.0.0.1"} if loopback else {}),
            )
        except ConnectionError as e:
            if type(e.__cause__).__name__ == "AuthenticationError":
                raise ClusterAuthError(
                    f"the Ray cluster at --address {address} wants its token: set RAY_AUTH_TOKEN "
                    f"(or RAY_AUTH_TOKEN_PATH), or copy the head's ~/.ray/auth_token here"
                ) from None
            raise ClusterUnreachable(f"no Ray cluster at --address {address}: {e}") from None
    else:
        # address="local": a new instance even where RAY_ADDRESS or ray_current_cluster names another one
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=num_cpus,
            logging_level=logging.WARNING,
            log_to_driver=forward,
        )
        _start_reaper()
    _quiet_ray_data()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    _ray_loggers_to_log()  # Ray Data's loggers exist now


def _start_reaper() -> None:
    """A watchdog that ends this embedded Ray's processes if the driver dies without shutting it down."""
    from ray._private import worker

    session_dir = worker._global_node.get_session_dir_path()
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    subprocess.Popen(
        [sys.executable, "-m", "mlcseg_ray.backends.reaper", str(os.getpid()), session_dir],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


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
    """Whether the run's stages use the cluster's GPUs (:func:`~mlcseg_ray.core.backend.torch_device`)."""
    return torch_device(device, cluster_gpus() > 0, where="the Ray cluster") == "cuda"


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


def cluster_resources() -> dict[str, float]:
    """The cluster's resources (CPU, GPU, memory, ...), without the per-node markers."""
    import ray

    return {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}


def gcs_address() -> str:
    """The address of the cluster this process is connected to."""
    import ray

    return ray.get_runtime_context().gcs_address
