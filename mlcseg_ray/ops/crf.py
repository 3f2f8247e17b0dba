"""Refinement maths: a patch soft score upsampled onto the image, and the two-label DenseCRF that sharpens it."""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
import torch.nn.functional as F
from PIL import Image
from pydensecrf.utils import unary_from_softmax

from ..config import Config
from ..core.errors import BadImage

# The bilateral kernel's sxy is given for an image whose longer side is this many pixels, and scaled with it.
BILATERAL_REFERENCE_SIDE = 500.0


def upsample_score(
    score: np.ndarray, grid: tuple[int, int], patch: int, resized: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """Soft score (grid_h*grid_w,) -> probability map (H, W) in original image coordinates."""
    gh, gw = grid
    t = torch.as_tensor(np.asarray(score, np.float32).reshape(1, 1, gh, gw))
    canvas = F.interpolate(t, size=(gh * patch, gw * patch), mode="bilinear", align_corners=False)
    rh, rw = resized
    canvas = canvas[..., :rh, :rw]  # drop the bottom/right padding
    H, W = size
    if (rh, rw) != (H, W):
        canvas = F.interpolate(canvas, size=(H, W), mode="bilinear", align_corners=False)
    return canvas[0, 0].numpy().clip(0, 1)


def crf_refine(rgb: np.ndarray, prob: np.ndarray, cfg: Config) -> np.ndarray:
    """Two-label DenseCRF (pydensecrf). Bilateral sxy is given at a 500 px image and scaled with the image."""
    H, W = prob.shape
    p = np.clip(prob, 1e-4, 1 - 1e-4)
    d = dcrf.DenseCRF2D(W, H, 2)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1 - p, p]).astype(np.float32))))
    d.addPairwiseGaussian(sxy=cfg.crf_gauss_sxy, compat=cfg.crf_gauss_compat)
    sxy = cfg.crf_bilateral_sxy * max(H, W) / BILATERAL_REFERENCE_SIDE
    d.addPairwiseBilateral(
        sxy=sxy,
        srgb=cfg.crf_bilateral_srgb,
        rgbim=np.require(rgb, np.uint8, ["C", "W"]),
        compat=cfg.crf_bilateral_compat,
    )
    q = np.asarray(d.inference(cfg.crf_iters)).reshape(2, H, W)
    return q[1] > q[0]


def crf_size(H: int, W: int, max_side: int) -> tuple[int, int]:
    """The (h, w) the CRF runs at: the image's, or its longer side brought down to ``max_side``."""
    if not max_side or max(H, W) <= max_side:
        return H, W
    s = max_side / max(H, W)
    return max(1, round(H * s)), max(1, round(W * s))


def refine_image(rgb: np.ndarray, score: np.ndarray, geom: dict, patch: int, cfg: Config) -> np.ndarray:
    """Binary (H, W) mask of one image from its patch soft score. The CRF runs at most at ``crf_max_side`` (its
    cost grows with the pixels; the score it refines is 8-16 px coarse anyway), the mask brought back to full size."""
    H, W = rgb.shape[:2]
    if (W, H) != (geom["width"], geom["height"]):
        raise BadImage(f"image is {W}x{H} now but was {geom['width']}x{geom['height']} at extraction")
    crf = cfg.crf and cfg.crf_iters > 0
    h, w = crf_size(H, W, cfg.crf_max_side) if crf else (H, W)
    prob = upsample_score(
        score, (geom["grid_h"], geom["grid_w"]), patch, (geom["resized_h"], geom["resized_w"]), (h, w)
    )
    if not crf:
        return prob > 0.5
    if (h, w) == (H, W):
        return crf_refine(rgb, prob, cfg)
    mask = crf_refine(np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR)), prob, cfg)
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((W, H), Image.BILINEAR)) > 127
