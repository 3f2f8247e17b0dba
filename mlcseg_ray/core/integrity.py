"""What a run folder says it holds, checked against what is there: every output a shard or a stage wrote is
recorded with its size (and a CRC32 up to ``CHECKSUM_MAX_BYTES``) in the shard's marker or the stage's record.
A rerun checks sizes (a ``stat`` per file) and recomputes what is missing or truncated; ``mlcseg verify`` also
checks the CRCs and that every Parquet file can be read, and changes nothing."""

from __future__ import annotations

from .run_dir import RunDir, markers
from .storage import file_crc, read_json
from .tables import read_metadata


def declared_outputs(writes: tuple[str, ...], run: RunDir, written: dict) -> dict[str, list]:
    """The files in ``written`` (path -> (size, crc)) that lie under the stage's declared ``writes``, relative to
    the run folder: what its marker or record keeps."""
    roots = [str(getattr(run, w)) for w in writes]
    return {
        run.relative(path): [size, crc]
        for path, (size, crc) in written.items()
        if any(path == r or path.startswith(r + "/") for r in roots)
    }


def check_outputs(run: RunDir, outputs: dict[str, list], deep: bool = False) -> list[str]:
    """What is wrong with recorded outputs, one phrase each: missing, another size, (``deep``) another CRC or an
    unreadable Parquet file."""
    problems = []
    for rel, (size, crc) in sorted(outputs.items()):
        path = run.at(rel)
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{rel} is missing")
            continue
        if actual != size:
            problems.append(f"{rel} is {actual} bytes, {size} when written")
        elif deep and crc is not None and file_crc(path) != crc:
            problems.append(f"{rel} has changed since it was written (checksum)")
        elif deep and path.suffix == ".parquet":
            try:
                read_metadata(path)
            except Exception as e:  # any reader error: the file is damaged
                problems.append(f"{rel} cannot be read ({type(e).__name__})")
    return problems


def stage_damage(
    run: RunDir, stage: str, fingerprint: str, shards: list[int] | None, deep: bool = False
) -> tuple[list[str], dict[int, list[str]]]:
    """(problems with the stage's own outputs, problems per shard) for a stage recorded with ``fingerprint``."""
    record = read_json(run.stage_record(stage)) or {}
    whole = check_outputs(run, record.get("outputs", {}), deep)
    per_shard = {}
    for n in shards or []:
        marker = read_json(run.marker(stage, n)) or {}
        if marker.get("fingerprint") == fingerprint:
            bad = check_outputs(run, marker.get("outputs", {}), deep)
            if bad:
                per_shard[n] = bad
    return whole, per_shard


def verify_run(run: RunDir) -> dict[str, list[str]]:
    """Every recorded output of every stage of ``run``, checked deeply: ``{stage: [problems]}`` (empty lists for
    sound stages). Reads the folder's records alone; changes nothing."""
    report = {}
    for stage in run.stages_with_state():
        record = read_json(run.stage_record(stage))
        if not record:
            continue
        shards = [int(m.name) for m in markers(run.state(stage))]
        fingerprint = record.get("marker_fingerprint", record.get("fingerprint"))
        whole, per_shard = stage_damage(run, stage, fingerprint, shards, deep=True)
        report[stage] = whole + [p for n in sorted(per_shard) for p in per_shard[n]]
    return report
