"""mlcseg_ray: training-free unsupervised semantic segmentation of image collections, on Ray."""

from typing import Any

from .core.config import Config

__version__ = "0.1.0"
__all__ = ["Config", "Pipeline", "__version__", "write_store_shard"]


def __getattr__(name: str) -> Any:  # Pipeline imports Ray and torch: only when asked for
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "write_store_shard":
        from .formats.feature_store import write_store_shard

        return write_store_shard
    raise AttributeError(name)
