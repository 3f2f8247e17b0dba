"""Helpers shared by the benchmark scripts: the machine line, image lists, peak memory of a process tree."""

import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VOC_IMAGES = SHARED / "voc2012_val_subset" / "JPEGImages"


def shard_markers(run: Path, stage: str) -> tuple[list[dict], float]:
    """A stage's shard markers, and the seconds in which at least one of its shards was worked on: the union of the
    shards' (start, end), each ending when its marker was written and lasting its ``seconds``. One shard at a time,
    it is the sum of their seconds; with an actor on two shards at once, their overlap counts once."""
    import json

    paths = list((run / "_state" / stage).glob("[0-9]*"))
    markers = [json.loads(p.read_text()) for p in paths]
    spans = sorted((p.stat().st_mtime - m["seconds"], p.stat().st_mtime) for p, m in zip(paths, markers, strict=True))
    inside, reach = 0.0, float("-inf")
    for start, end in spans:
        inside += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return markers, inside


def machine() -> str:
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), python {platform.python_version()}"
    )


class Poller:
    """Calls ``sample()`` every ``interval`` seconds on a background thread while the ``with`` block runs."""

    interval = 0.2

    def sample(self) -> None:
        raise NotImplementedError

    def _loop(self):
        while not self._stop.is_set():
            if self.sample() is False:  # the source is gone (no nvidia-smi, ...): stop polling
                return
            time.sleep(self.interval)

    def __enter__(self):
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class PeakRSS(Poller):
    """The RSS of this process and every descendant (Ray workers included), each one's peak."""

    def __init__(self):
        self.peaks = {}

    def sample(self):
        me = psutil.Process(os.getpid())
        procs = [me]
        try:
            procs += me.children(recursive=True)
        except psutil.Error:
            pass
        for p in procs:
            try:
                rss = p.memory_info().rss
                name = " ".join(p.cmdline()[:3])[-60:] or p.name()
            except psutil.Error:
                continue
            key = (p.pid, name)
            self.peaks[key] = max(self.peaks.get(key, 0), rss)

    def max_other(self) -> float:
        """Largest peak among the other processes of the tree (raylet, GCS, object-store helpers), MB."""
        me = os.getpid()
        return (
            max(
                (
                    v
                    for (pid, name), v in self.peaks.items()
                    if pid != me and "ray::" not in name and "default_worker" not in name
                ),
                default=0,
            )
            / 2**20
        )

    def driver_and_max_worker(self) -> tuple[float, float]:
        me = os.getpid()
        driver = max((v for (pid, _), v in self.peaks.items() if pid == me), default=0) / 2**20
        workers = (
            max(
                (
                    v
                    for (pid, name), v in self.peaks.items()
                    if pid != me and "ray::" in name or (pid != me and "default_worker" in name)
                ),
                default=0,
            )
            / 2**20
        )
        return driver, workers


class GpuMemoryPeak(Poller):
    """Peak of ``nvidia-smi``'s used memory summed over all GPUs (the work runs in Ray actors and tasks, so the
    driver's own torch counters see none of it). ``peak`` stays None without nvidia-smi."""

    interval = 0.5

    def __init__(self):
        self.peak = None

    def sample(self):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            self.peak = max(self.peak or 0, sum(int(v) for v in out.split()))
        except (OSError, ValueError, subprocess.SubprocessError):
            return False


class MemoryCap:
    """A memory cgroup around this process and every process it starts afterwards (an embedded Ray's raylet, GCS
    and workers included): past ``limit`` bytes the kernel reclaims page cache, then OOM-kills inside it. cgroup
    v1 or v2, Linux, root. ``prlimit --as`` is no substitute: it caps virtual memory, and Ray workers map the
    whole object store."""

    def __init__(self, limit: int, name: str = f"mlcseg-bench-{os.getpid()}"):
        self.limit, self.name = int(limit), name
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.exists() and "memory" in v2.read_text().split():
            self.v2, self.dir = True, Path("/sys/fs/cgroup") / name
        elif Path("/sys/fs/cgroup/memory").is_dir():
            self.v2, self.dir = False, Path("/sys/fs/cgroup/memory") / name
        else:
            raise RuntimeError("no memory cgroup controller mounted: run without --memory-cap")

    def _file(self, v1: str, v2: str) -> Path:
        return self.dir / (v2 if self.v2 else v1)

    def __enter__(self):
        self.dir.mkdir(exist_ok=True)
        self._file("memory.limit_in_bytes", "memory.max").write_text(str(self.limit))
        self._file("cgroup.procs", "cgroup.procs").write_text(str(os.getpid()))
        return self

    def peak(self) -> int:
        """Peak charge of the group (resident memory and page cache)."""
        f = self._file("memory.max_usage_in_bytes", "memory.peak")
        return int(f.read_text()) if f.exists() else 0

    def oom_kills(self) -> int:
        f = self._file("memory.oom_control", "memory.events")
        for line in f.read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def __exit__(self, *exc):
        (self.dir.parent / "cgroup.procs").write_text(str(os.getpid()))  # back to the root group
        for _ in range(300):  # Ray's processes take a while to exit after ray.shutdown()
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.2)
        print(f"note: {self.dir} still holds processes; remove it with rmdir once they have exited")
