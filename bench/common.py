"""Helpers shared by the benchmark scripts: the machine line, image lists, peak memory of a process tree."""
import os
import platform
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VOC_IMAGES = SHARED / "voc2012_val_subset" / "JPEGImages"


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}")


class PeakRSS:
    """Polls the RSS of this process and every descendant (Ray workers included) and keeps each one's peak."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peaks, self._stop = interval, {}, threading.Event()

    def _poll(self):
        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
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
            time.sleep(self.interval)

    def __enter__(self):
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def driver_and_max_worker(self) -> tuple[float, float]:
        me = os.getpid()
        driver = max((v for (pid, _), v in self.peaks.items() if pid == me), default=0) / 2**20
        workers = max((v for (pid, name), v in self.peaks.items() if pid != me and "ray::" in name or
                       (pid != me and "default_worker" in name)), default=0) / 2**20
        return driver, workers
