"""Fingerprints: short, stable hashes of what a stage's outputs were made from."""

from __future__ import annotations

import hashlib
import json
import os


def digest(obj: object) -> str:
    """A 16-hex-digit hash of any JSON-able value (keys sorted, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_identity(path: str | None) -> dict | None:
    """What a weights file is, cheaply: its resolved path, size and modification time (a changed file, a changed
    fingerprint)."""
    if not path:
        return None
    from .storage import as_location, is_remote

    if is_remote(path):  # an object: its size and ETag
        try:
            info = as_location(path).fs.info(as_location(path).path)
        except OSError:
            return {"path": str(path)}
        return {"path": str(path), "bytes": info.get("size"), "etag": info.get("ETag") or info.get("etag")}
    try:
        st = os.stat(path)
    except OSError:
        return {"path": str(path)}  # the loader reports a missing file clearly
    return {"path": os.path.realpath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def why_changed(old: dict, new: dict) -> str:
    """What changed between a stage's recorded basis and today's, in a few words."""
    if not old:
        return "made with an earlier version of mlcseg_ray"
    changed = [
        f"{k} {old.get('config', {}).get(k)!r} -> {v!r}"
        for k, v in new.get("config", {}).items()
        if old.get("config", {}).get(k) != v
    ]
    changed += [f"{u} changed" for u, v in new.get("upstream", {}).items() if old.get("upstream", {}).get(u) != v]
    changed += [f"{k} changed" for k, v in new.get("inputs", {}).items() if old.get("inputs", {}).get(k) != v]
    if old.get("version") != new.get("version"):
        changed.append("stage code changed")
    return ", ".join(changed) or "inputs changed"
