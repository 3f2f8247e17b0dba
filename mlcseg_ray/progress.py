"""Rich progress bars and the end-of-run summary table, shared by every stage."""
from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int, unit: str = "items"):
    """Yields an ``advance(n=1)`` callable. Quiet when stderr is not a terminal (CI logs stay readable)."""
    if not sys.stderr.isatty():
        yield lambda n=1: None
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


def summary_table(title: str, rows: list[dict]) -> None:
    """The end-of-run table: one row per stage (the executor's summary)."""
    t = Table(title=title, show_header=True, header_style="bold")
    for col in ("stage", "images", "errors", "seconds", "images/s", "output"):
        t.add_column(col)
    for r in rows:
        n, sec = r.get("images"), r.get("seconds") or 0
        rate = f"{n / sec:.2f}" if n and sec > 0 and not r.get("skipped") else "-"
        t.add_row(r["stage"], "-" if n is None else str(n), str(r.get("errors", 0)),
                  "skipped" if r.get("skipped") else f"{sec:.1f}", rate, str(r.get("output", "")))
    console.print(t)
