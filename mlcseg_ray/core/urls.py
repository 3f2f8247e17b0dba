"""URLs as text: a user name or password in one is never stored with a run (config, records, logs)."""

from __future__ import annotations


def url_credentials(url: object) -> bool:
    """Whether a URL carries a user name or password (``http://user:pass@host/``): they would be stored with the run
    (``config.yaml``, ``run.json``) and shown in its logs; credentials go in the standard variables or profiles."""
    from urllib.parse import urlsplit

    if not isinstance(url, str) or "://" not in url:
        return False
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return False


def redacted(text: str) -> str:
    """``text`` with the user name and password of any URL in it replaced by ``***``."""
    import re

    return re.sub(r"(\w+://)[^/\s@]+@", r"\1***@", text)
