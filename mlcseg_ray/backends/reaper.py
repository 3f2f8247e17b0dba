"""Ends an embedded Ray's processes when the driver that started it dies without ``ray.shutdown`` (``kill -9``,
OOM): Ray's dashboard and runtime-env agents, and workers that finish their task, would otherwise outlive it.

Started by :func:`mlcseg_ray.backends.ray_runtime.init_ray` as ``python -m mlcseg_ray.backends.reaper DRIVER_PID
SESSION_DIR`` in its own process session (so a signal to the driver's group does not reach it). While the driver
runs it keeps a list of the session's processes (those naming the session folder, and their descendants: workers
retitle themselves, so they are found as children); once the driver is gone it ends them, SIGTERM first, then
SIGKILL.
"""

from __future__ import annotations

import os
import sys
import time

import psutil

POLL_S = 1.0


def session_processes(session_dir: str, known: dict) -> None:
    """Add the processes of the Ray session to ``known`` (pid -> create time)."""
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(session_dir in a for a in (p.info["cmdline"] or [])):
                roots.append(p)
        except psutil.Error:
            pass
    for p in roots:
        try:
            for q in [p] + p.children(recursive=True):
                known.setdefault(q.pid, q.create_time())
        except psutil.Error:
            pass


def end(known: dict, grace_s: float = 5.0) -> int:
    procs = []
    for pid, created in known.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3:  # the same process, not a reused PID
                procs.append(p)
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(procs)


def watch(driver_pid: int, session_dir: str) -> None:
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    known: dict = {}
    while True:
        try:
            if not driver.is_running() or driver.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        session_processes(session_dir, known)
        time.sleep(POLL_S)
    session_processes(session_dir, known)
    for pid in (driver_pid, os.getpid()):  # this watchdog names the session folder too
        known.pop(pid, None)
    end(known)


if __name__ == "__main__":  # pragma: no cover - run as a process by init_ray
    watch(int(sys.argv[1]), sys.argv[2])
