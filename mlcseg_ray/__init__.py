"""mlcseg_ray: training-free unsupervised semantic segmentation of image collections, on Ray."""
__version__ = "0.1.0"

from .config import Config  # noqa: E402

__all__ = ["Config", "Pipeline", "__version__"]


def __getattr__(name):  # Pipeline imports Ray and torch: only when asked for
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
