"""Progress (a rich bar on a terminal, plain log lines elsewhere) and the end-of-run summary table.

Results go to stdout (``out``), logs and progress to stderr (``console``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .run_dir import printable

console = Console(stderr=True)  # logs, progress, errors: markup for colour, so data goes in through shown()
out = Console(markup=False)  # results: data alone, never read as markup (an image named "[/bad].jpg")


def shown(text: object) -> str:
    """Text from the data (a file name, an image id, a path, an error) as it may go into a line of ``console``:
    control characters written as escapes (a name never drives the terminal) and Rich markup escaped."""
    return escape(printable(str(text)))


class ConsoleHandler(logging.Handler):
    """Log records printed by :data:`console`: above a live progress bar on a terminal (a plain stream handler
    would write through it), as plain lines elsewhere."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # a log line must never fail the run
            self.handleError(record)


def progress_interval() -> float:
    """Seconds between plain progress lines (``MLCSEG_PROGRESS_INTERVAL``, default 10)."""
    try:
        return max(0.0, float(os.environ.get("MLCSEG_PROGRESS_INTERVAL", "10")))
    except ValueError:
        return 10.0


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
        if seconds >= 60
        else f"{seconds}s"
    )


class Ticks:
    """Images finished inside shards: added where they finish (``add``), taken by the driver's bar (``take``). This
    one counts in this process; a Ray backend gives one that workers reach (``backends/ray.py``)."""

    def __init__(self) -> None:
        self._n, self._lock = 0, threading.Lock()

    def add(self, n: int = 1) -> None:
        with self._lock:
            self._n += n

    def take(self) -> int:
        with self._lock:
            n, self._n = self._n, 0
        return n


@contextlib.contextmanager
def polled(ticks: Ticks, advance: Callable[[int], None], total: int, every: float = 0.25) -> Iterator[None]:
    """While the block runs, ``ticks`` moved into ``advance`` every ``every`` seconds by a thread of the driver;
    when it ends, the bar brought to ``total`` (images a stage does not count one by one: those failed earlier)."""
    moved, stop = [0], threading.Event()
    ticks.take()  # a count shared by the command's stages: what came late from the one before is not this one's

    def move() -> None:
        n = min(ticks.take(), total - moved[0])
        if n > 0:
            moved[0] += n
            advance(n)

    def loop() -> None:
        while not stop.wait(every):
            move()

    thread = threading.Thread(target=loop, name="mlcseg-progress", daemon=True)
    thread.start()
    finished = False
    try:
        yield
        finished = True
    finally:
        stop.set()
        thread.join()
        move()
        if finished and moved[0] < total:
            advance(total - moved[0])


@contextlib.contextmanager
def plain_progress(
    description: str,
    total: int,
    unit: str,
    write: Callable[[str], None] | None = None,
    interval: float | None = None,
) -> Iterator[Callable[..., None]]:
    """Progress for logs (no terminal: ``nohup``, CI, a cluster job's log): one line per ``interval`` seconds and
    one at the end - ``extract: 3/12 shards (25%), 0.50 shards/s, ETA 18s``."""
    write = write or (lambda line: print(line, file=sys.stderr, flush=True))
    interval = progress_interval() if interval is None else interval
    t0 = last = time.monotonic()
    done = 0

    def line() -> str:
        elapsed = max(time.monotonic() - t0, 1e-9)
        rate = done / elapsed
        eta = f", ETA {_eta((total - done) / rate)}" if 0 < done < total else f", {_eta(elapsed)}" if done else ""
        return f"{description}: {done}/{total} {unit} ({100 * done // max(total, 1)}%), {rate:.2f} {unit}/s{eta}"

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        if time.monotonic() - last >= interval and done < total:
            last = time.monotonic()
            write(line())

    yield advance
    if total:
        write(line())


@contextlib.contextmanager
def progress_bar(description: str, total: int, unit: str = "items") -> Iterator[Callable[..., None]]:
    """Yields an ``advance(n=1)`` callable: a bar on a terminal, plain lines at a steady interval elsewhere."""
    if not sys.stderr.isatty():
        with plain_progress(description, total, unit) as advance:
            yield advance
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)


def summary_table(title: str, rows: list[dict], to: Console | None = None) -> None:
    """The end-of-run table: one row per stage (the executor's summary)."""
    t = Table(title=printable(title) if to in (None, out) else shown(title), show_header=True, header_style="bold")
    for col in ("stage", "images", "errors", "seconds", "images/s", "output"):
        t.add_column(col)
    for r in rows:
        n, sec = r.get("images"), r.get("seconds") or 0
        rate = f"{n / sec:.2f}" if n and sec > 0 and not r.get("skipped") else "-"
        t.add_row(
            r["stage"],
            "-" if n is None else str(n),
            str(r.get("errors", 0)),
            "skipped" if r.get("skipped") else f"{sec:.1f}",
            rate,
            printable(str(r.get("output", ""))),
        )
    (to or out).print(t)
