"""``--backbone sim-accelerator``: a measuring tool, never a default. It stands in for a fast accelerator that this
project's machines do not have: its forward takes ``sim_forward_ms`` per image of wall time and no CPU (a sleep,
which releases the GIL), and returns what :class:`~mlcseg_ray.models.backbones.FeatureExtractor` returns, at the
shapes of a ViT-S/8 (patch 8, 384 dimensions, 6 heads). The values are a cheap, deterministic function of each
patch's mean colour: enough for every later stage to run, meaningless as features. What it measures is whether the
pipeline around the model keeps the model busy (bench/accelerator_feed.py; BENCHMARKS.md)."""

from __future__ import annotations

import time

import torch

SIMULATED_BACKBONE = "sim-accelerator"
SIMULATED_WARNING = (
    "SIMULATED ACCELERATOR: the backbone is sim-accelerator, a timing stand-in whose features are a function of "
    "each patch's mean colour, not a network's. Its masks, classes and metrics mean nothing; it measures how well "
    "the pipeline keeps a model busy."
)
PATCH, DIM, HEADS = 8, 384, 6


class SimulatedAccelerator:
    """The forward of a model that takes ``forward_ms`` per image, with the outputs' real shapes."""

    precision = "fp32"

    def __init__(self, forward_ms: float) -> None:
        self.forward_ms = forward_ms
        generator = torch.Generator().manual_seed(0)
        self.colour_to_key = torch.randn(3, DIM, generator=generator)

    def info(self) -> dict:
        """What the feature store records of the backbone (as :class:`~mlcseg_ray.models.backbones.BackboneInfo`
        gives for a real one); ``random_weights``: nothing it gives is a trained network's."""
        return {
            "name": SIMULATED_BACKBONE,
            "arch": SIMULATED_BACKBONE,
            "patch_size": PATCH,
            "embed_dim": DIM,
            "num_heads": HEADS,
            "num_prefix_tokens": 1,
            "weights": f"none (simulated, {self.forward_ms:g} ms an image)",
            "random_weights": True,
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "precision": self.precision,
        }

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        with torch.inference_mode():
            colour = torch.nn.functional.avg_pool2d(x.float().cpu(), PATCH).flatten(2).transpose(1, 2)  # (B, N, 3)
            keys = torch.tanh(colour @ self.colour_to_key)  # (B, N, DIM)
            cls_attn = torch.softmax(colour.square().sum(-1), dim=-1)  # (B, N)
            out = {"keys": keys, "cls_attn": cls_attn, "cls": keys.mean(1)}
        # the rest of the forward's time is the accelerator's: the host waits without using a CPU
        time.sleep(max(0.0, self.forward_ms * len(x) / 1000 - (time.perf_counter() - started)))
        return out
