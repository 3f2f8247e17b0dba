"""``python -m mlcseg_ray.cli``: the same as ``mlcseg`` (how a Ray job runs it)."""

from .app import main

main()
