"""Parquet tables on the file-system layer (``core/storage.py``), local or in a bucket: written atomically (whole,
streamed, or parts concatenated) and read whole, a batch at a time, or only the row groups whose statistics can
hold the rows asked for. pyarrow reads an object in ranges, never whole."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .storage import (
    Location,
    as_location,
    atomic_local,
    atomic_write_bytes,
    atomic_write_stream,
    is_local,
    note_write,
    opened,
)


# --- writes: atomic, and recorded in the shard's write record (core/storage.py) ---
def table_bytes(table: pa.Table, **kwargs: object) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kwargs)  # the same bytes a local file gets
    return sink.getvalue().to_pybytes()


def atomic_write_table(path: Location, table: pa.Table, **kwargs: object) -> None:
    path = as_location(path)
    if not is_local(path):
        atomic_write_bytes(path, table_bytes(table, **kwargs))
        return
    atomic_local(path, lambda tmp: pq.write_table(table, tmp, **kwargs))
    note_write(path)


def atomic_write_tables(
    path: Location, schema: pa.Schema, tables: Iterable[pa.Table], group_rows: int | None = None
) -> None:
    """A stream of tables (one ``schema``) written as one Parquet file, atomically, never all of it in memory. With
    ``group_rows``, row groups of exactly that many rows (the last one shorter), so the file's bytes depend on the
    rows alone, not on how the stream was cut; without it, a row group per table."""

    def write(f: BinaryIO) -> None:
        with pq.ParquetWriter(f, schema) as writer:
            if group_rows is None:
                for table in tables:
                    writer.write_table(table)
                return
            pending, held = [], 0
            for table in tables:
                pending.append(table)
                held += table.num_rows
                if held >= group_rows:
                    rows = pa.concat_tables(pending)
                    cut = held - held % group_rows
                    writer.write_table(rows.slice(0, cut), row_group_size=group_rows)
                    pending, held = [rows.slice(cut)], held - cut
            if held:
                writer.write_table(pa.concat_tables(pending), row_group_size=group_rows)

    atomic_write_stream(path, write)


def atomic_concat_tables(path: Location, parts: list[Location]) -> None:
    """Shard parts (one schema) -> one table at ``path``, atomically, streamed a part at a time (an empty table
    without parts)."""
    if not parts:
        atomic_write_table(path, pa.table({}))
        return
    atomic_write_tables(path, read_schema(parts[0]), (read_table(p) for p in parts))


# --- reads ---
def read_table(path: Location, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
    # opened here, not handed to pyarrow with the file system: pyarrow would first ask whether it is a file or a
    # folder, a second request for every object read
    with opened(path) as source:
        return pq.read_table(source, columns=columns, filters=filters)


def iter_batches(
    path: Location, columns: list[str] | None = None, batch_size: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """A Parquet file's rows a batch at a time, in file order (a bucket's object read in ranges, never whole)."""
    with opened(path) as source:
        yield from pq.ParquetFile(source).iter_batches(batch_size=batch_size, columns=columns)


def rows_where(
    path: Location, column: str, value: object, columns: list[str] | None = None
) -> tuple[pa.Table, list[int]]:
    """The rows of a Parquet file whose ``column`` equals ``value`` (``columns`` of them, or all), and their
    positions in the file: only the row groups whose statistics can hold ``value`` are read (a shard's rows of a
    manifest of any size)."""
    return _rows_in(path, column, value, value, columns)


def rows_between(path: Location, column: str, low: object, high: object, columns: list[str] | None = None) -> pa.Table:
    """The rows whose ``column`` lies in ``[low, high]``, read from the row groups whose statistics overlap that
    range (the previous manifest's rows of one ingest task's id range)."""
    return _rows_in(path, column, low, high, columns)[0]


def _rows_in(
    path: Location, column: str, low: object, high: object, columns: list[str] | None
) -> tuple[pa.Table, list[int]]:
    with opened(path) as source:
        pf = pq.ParquetFile(source)
        meta, where = pf.metadata, pf.schema_arrow.get_field_index(column)
        columns = columns or pf.schema_arrow.names
        found, positions, start = [], [], 0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            stats = group.column(where).statistics
            if stats is None or not stats.has_min_max or (stats.min <= high and low <= stats.max):
                table = pf.read_row_group(g, columns=sorted({*columns, column}))
                values = table.column(column)  # compared in Arrow: a third of a Python loop's time a group
                inside = pc.fill_null(pc.and_(pc.greater_equal(values, low), pc.less_equal(values, high)), False)
                found.append(table.filter(inside).select(columns))
                positions += (start + pc.indices_nonzero(inside).to_numpy()).tolist()
            start += group.num_rows
    schema = pa.schema([pf.schema_arrow.field(c) for c in columns])
    return (pa.concat_tables(found) if found else schema.empty_table()), positions


def _read_footer(path: Location, read: Callable) -> Any:
    with opened(path) as source:  # in a bucket, one ranged read of the footer, not the whole object
        return read(source)


def read_metadata(path: Location) -> pq.FileMetaData:
    """A Parquet file's footer alone (row counts, schema)."""
    return _read_footer(path, pq.read_metadata)


def read_schema(path: Location) -> pa.Schema:
    return _read_footer(path, pq.read_schema)


def read_tables(paths: Iterable[Location], columns: list[str] | None = None) -> pa.Table:
    tables = [read_table(p, columns=columns) for p in paths]
    return pa.concat_tables(tables) if tables else pa.table({})
