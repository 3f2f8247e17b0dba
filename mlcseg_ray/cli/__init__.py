"""The ``mlcseg`` command line (``app.py``), its exit codes (``errors.py``) and what it prints (``console.py``)."""

from .app import app, main

__all__ = ["app", "main"]
