"""A ``ray start --head`` of the test's own, on loopback, with Ray's default settings (token authentication on, as
Ray 2.60 ships it). Its temp folder is its own (``RAY_TMPDIR``): the ``ray_current_cluster`` record it leaves is
where ``--address auto`` looks, and nothing of it is left on the machine. Ended by its PID, and every process
started under its folder with it."""

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


@dataclass
class Head:
    port: int
    dashboard: int
    env: dict  # what a client of this head runs with: its RAY_TMPDIR, this environment's `ray` and `python`
    process: subprocess.Popen

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def stop(self) -> None:
        self.process.terminate()  # `ray start --block` ends the processes it started, given time (up to ~30 s)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
        end(started_under(self.env["RAY_TMPDIR"]))  # what is left of it: every process of its own folder


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


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, extra_env: dict | None = None):
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(extra_env or {}),
    }
    env.pop("RAY_ADDRESS", None)
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
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    head = Head(port, dash, env, process)
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
        yield head
    finally:
        head.stop()
