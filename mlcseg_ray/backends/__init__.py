"""Where a stage's work runs: in this process (:mod:`.local`) or on Ray (:mod:`.ray`). Ray is imported only here
(and by the Ray Jobs client in ``tools/jobs.py``)."""

from __future__ import annotations

from ..core.backend import Backend

BACKENDS = ("ray", "local")


def make_backend(name: str, address: str | None = None, device: str = "auto") -> Backend:
    """The backend called ``name``: ``ray`` (an embedded Ray, or the cluster at ``address``) or ``local``;
    ``device`` is the config's choice (``auto``, ``cpu``, ``cuda``)."""
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(device)
    if name == "ray":
        from .ray import RayBackend

        return RayBackend(address, device)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "make_backend"]
