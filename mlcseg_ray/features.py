"""Deprecated: the feature-store format moved to :mod:`mlcseg_ray.formats.feature_store`. Kept so that code written
against the old layout (``from mlcseg_ray.features import write_store_shard``) goes on working."""

import warnings

from .formats.feature_store import *  # noqa: F403
from .formats.feature_store import brought_store_metadata, read_store_metadata, write_store_shard

warnings.warn("mlcseg_ray.features is now mlcseg_ray.formats.feature_store", DeprecationWarning, stacklevel=2)

__all__ = ["brought_store_metadata", "read_store_metadata", "write_store_shard"]
