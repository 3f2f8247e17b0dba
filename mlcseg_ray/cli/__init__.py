"""The ``mlcseg`` command line: the app and the commands that run stages (``app.py``), the commands on a finished run
folder (``results.py``) and on a cluster (``jobs.py``), their shared options (``options.py``), exit codes
(``errors.py``) and what they print (``console.py``)."""

from .app import app, main

__all__ = ["app", "main"]
