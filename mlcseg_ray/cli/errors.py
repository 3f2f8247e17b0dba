"""Every expected failure as one line on stderr and a documented exit code (README's table)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator

import typer

from ..core.config import ConfigError
from ..core.errors import ClusterAuthError, ClusterUnreachable, NoUsableImages, RunLocked, StageFailed, StageOrderError
from ..core.progress import console, shown

EXIT_CODES = {
    0: "done: every image has its outputs",
    1: "unexpected internal error (MLCSEG_DEBUG=1 shows the traceback)",
    2: "bad configuration, input or usage; or a stage whose inputs are missing or out of date",
    3: "the run finished, but some images failed (mlcseg errors RUN lists them)",
    4: "the run folder is in use by another run",
    5: "the run folder cannot be written: the disk is full, it is not writable (a read-only bucket, credentials the "
    "store refuses), or its object store does not answer (a rerun resumes once it does)",
    6: "no Ray cluster answers at --address",
    7: "the Ray cluster wants a token this machine lacks, or refused the one sent",
    8: "mlcseg verify found damaged or missing outputs (a rerun recomputes them)",
    130: "interrupted (Ctrl-C); a rerun resumes",
}


def error(e: object) -> None:
    """One line on stderr, never wrapped (scripts and log readers grep it)."""
    console.print(f"[bold red]error:[/] {shown(e)}", soft_wrap=True, highlight=False)


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind an exception (raised here, or inside a Ray task). Ray Data passes a task's failure on as
    text only (its traceback): there the errno is read from the text."""
    seen, texts = set(), []
    while isinstance(e, BaseException) and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        texts += [str(e), str(getattr(e, "traceback_str", ""))]
        e = e.__cause__ or getattr(e, "cause", None)
    for text in texts:
        m = re.search(r"\[Errno (\d+)\]", text)
        if m:
            return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
    return None


STORAGE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EROFS: "the file system is read-only",
}


def _unwrap(e: BaseException) -> BaseException:
    """The user-level exception behind Ray's wrappers (a task's traceback is for the logs, not the one line)."""
    seen = set()
    while type(e).__module__.startswith("ray.") and id(e) not in seen:
        seen.add(id(e))
        inner = e.__cause__ or getattr(e, "cause", None)
        # Ray Data raises a failure "from SystemException()", a marker with no message: it says less than the error
        if not isinstance(inner, BaseException) or not str(inner):
            break
        e = inner
    return e


# How botocore and aiohttp say that an object store did not answer (a Ray task passes them on as text only): the
# URL botocore names first, else the host aiohttp names.
_UNREACHABLE = (
    re.compile(r"Could not connect to the endpoint URL: \"?(\w+://[^\s\"]+)"),
    re.compile(r"Cannot connect to host ([^\s]+)"),
)


def _store_unreachable(e: BaseException) -> str | None:
    """What ``e`` (or what caused it) says the object store did not answer at, if it says so."""
    texts, seen = [], set()
    while isinstance(e, BaseException) and id(e) not in seen:
        seen.add(id(e))
        texts += [str(e), str(getattr(e, "traceback_str", ""))]
        e = e.__cause__ or e.__context__ or getattr(e, "cause", None)
    for pattern in _UNREACHABLE:
        for text in texts:
            m = pattern.search(text)
            if m:
                return m.group(1)
    return None


def _probe_unreachable(out: object) -> str | None:
    """Where the run folder's object store does not answer now, if it does not. A read cut off by an outage does not
    always say so (s3fs makes a failed listing a bare FileNotFoundError), so any failure of a run in a bucket asks
    the store once."""
    from ..core.storage import probe

    if out is None:
        return None
    try:
        probe(out)
    except Exception as answer:  # any other answer means the store is there
        return _store_unreachable(answer)
    return None


def exit_code(e: BaseException, out: object = None) -> int:
    """Report ``e`` in one line and return its exit code (:data:`EXIT_CODES`). ``out``: the run folder the command
    was given, named where an error does not name a path."""
    if isinstance(e, RunLocked):
        return _say_error(e, 4)
    if isinstance(e, ClusterUnreachable):
        return _say_error(e, 6)
    if isinstance(e, ClusterAuthError):
        return _say_error(e, 7)
    if isinstance(e, NoUsableImages):
        return _say_error(e, 3)
    stage = e.stage if isinstance(e, StageFailed) else None
    raised = e.__cause__ if isinstance(e, StageFailed) else e
    cause = _unwrap(raised)
    storage = _storage_error(e, raised, cause, stage, out)
    if storage:
        return _say_error(storage, 5)
    if isinstance(cause, (ConfigError, FileNotFoundError, ValueError, StageOrderError, NotADirectoryError)):
        return _say_error(f"{stage}: {cause}" if stage and not str(cause).startswith(stage) else cause, 2)
    if os.environ.get("MLCSEG_DEBUG"):
        raise e
    first = (str(cause).strip().splitlines() or [""])[0]  # a Ray error's text goes on with its task's traceback
    return _say_error(
        f"{'in ' + stage + ': ' if stage else ''}{type(cause).__name__}: {first} (MLCSEG_DEBUG=1 shows the traceback)",
        1,
    )


def _storage_error(e: BaseException, raised: BaseException, cause: BaseException, stage: str | None, out: object):
    """The line for a run folder that cannot be written (exit 5), or None: a store that does not answer, a bucket
    that refuses the credentials or the write, a full or read-only disk."""
    endpoint = _store_unreachable(raised) or _probe_unreachable(out)
    if endpoint:
        where = f" while {stage} ran" if stage else ""
        return f"cannot reach the object store at {endpoint}{where}; rerun once it answers to resume"
    if isinstance(cause, PermissionError) and cause.errno is None:  # a bucket's refusal (s3fs, gcsfs)
        what = f"{stage}'s write" if stage else f"access to {getattr(e, 'where', None) or out or 'the run folder'}"
        return f"the object store refused {what} ({cause}): check the credentials and that they may write there"
    os_err = _os_error(raised)
    if os_err is not None and os_err.errno in STORAGE_ERRNOS:
        where = f" while {stage} wrote" if stage else " writing"
        path = os_err.filename or getattr(e, "where", None) or out or "the run folder"
        return f"{STORAGE_ERRNOS[os_err.errno]}{where} {path}"
    return None


def _say_error(e: object, code: int) -> int:
    error(e)
    return code


@contextlib.contextmanager
def one_line_errors(out: object = None) -> Iterator[None]:
    """Every failure inside becomes one line on stderr and its exit code (:func:`exit_code`; ``out``: the run
    folder the command writes, if any)."""
    try:
        yield
    except Exception as e:  # every failure becomes one line and an exit code
        raise typer.Exit(exit_code(e, out)) from None
