"""A ``ray start --head`` of the test's own, on loopback, with Ray's default settings (token authentication on, as
Ray 2.60 ships it). Its temp folder is its own (``RAY_TMPDIR``): the ``ray_current_cluster`` record it leaves is
where ``--address auto`` looks, and nothing of it is left on the machine. Ended by its PID, and every process
started under its folder with it. The session's head is started once (by whichever test process asks first) and
ended when the session ends (``tests/conftest.py``)."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def started_under(folder: str) -> list:
    """Processes whose command line names ``folder``: the ones a Ray started there."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(folder in a for a in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            pass
    return out


def end(procs) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def client_env(own_env: dict) -> dict:
    """This environment with a head's own variables, and no RAY_ADDRESS naming another cluster."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **own_env}


@dataclass(frozen=True)
class Head:
    """A running head, as a JSON object (``asdict``) other processes of the session rebuild it from."""

    port: int
    dashboard: int
    pid: int  # its `ray start --head --block` process
    own_env: dict  # its RAY_TMPDIR, and the PATH that finds this environment's `ray` and `python`

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    @property
    def env(self) -> dict:
        """What a client of this head runs with."""
        return client_env(self.own_env)

    def stop(self) -> None:
        """From any process (the one that started it may be gone): `ray start --block` ends the processes it
        started, given time (up to ~30 s); what is left of them is every process of its own folder."""
        with contextlib.suppress(psutil.NoSuchProcess):
            block = psutil.Process(self.pid)
            block.terminate()
            try:
                block.wait(timeout=5)
            except psutil.TimeoutExpired:
                block.kill()
        end(started_under(self.own_env["RAY_TMPDIR"]))


def kill_driver(proc: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL a driver and, at the same instant, the embedded Ray it started under ``RAY_TMPDIR=ray_tmp`` (its
    workers would otherwise finish the shard they hold after the driver is gone). Ray workers retitle themselves,
    so they are found as descendants and by their session folder, not by command line."""
    import signal

    driver = psutil.Process(proc.pid)
    doomed = [driver] + driver.children(recursive=True) + started_under(ray_tmp)
    for p in doomed:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(doomed, timeout=30)


def start_head(num_cpus: int = 2) -> Head:
    """A new head on loopback, up and answering; the caller ends it (:meth:`Head.stop`)."""
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    own_env = {"RAY_TMPDIR": ray_tmp, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    port, dash = free_port(), free_port()
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--include-dashboard",
        "true",
        "--num-cpus",
        str(num_cpus),
        "--block",
        "--disable-usage-stats",
    ]
    # own agent ports: the session's embedded Ray may hold the defaults (its job agent would then never start)
    for flag in (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ):
        cmd += [flag, str(free_port())]
    # its own session: it outlives the xdist worker that started it, until the session ends it
    process = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=client_env(own_env), start_new_session=True
    )
    head = Head(port, dash, process.pid, own_env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 where it wants the token): it is up
                break
            except OSError:
                assert time.time() < deadline and process.poll() is None, "the Ray head did not come up"
                time.sleep(1)
        record = Path(ray_tmp, "ray", "ray_current_cluster")  # `ray start` writes it last
        while not record.exists():
            assert time.time() < deadline and process.poll() is None, "the Ray head recorded no address"
            time.sleep(0.2)
    except BaseException:
        head.stop()
        raise
    return head
