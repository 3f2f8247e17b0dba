"""Refinement maths: a patch soft score upsampled onto the image, and the two-label DenseCRF that sharpens it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
import torch.nn.functional as F
from PIL import Image
from pydensecrf.utils import unary_from_softmax

from ..core.errors import BadImage

# The bilateral kernel's sxy is given for an image whose longer side is this many pixels, and scaled with it.
BILATERAL_REFERENCE_SIDE = 500.0


@dataclass(frozen=True, kw_only=True)
class CrfParams:
    """The refiner's settings as plain values: the run config's ``crf`` and ``crf_*`` keys (meanings and defaults
    there). ``enabled`` is false when there is no CRF pass at all; ``backend`` is the refiner that runs (``auto`` is
    the torch one: on bench/refine_quality.py as good as the full DenseCRF at a ninth of its CPU time, and it runs
    on a GPU)."""

    enabled: bool
    backend: str
    iters: int
    gauss_sxy: float
    gauss_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    local_srgb: float
    local_compat: float
    max_side: int

    @classmethod
    def of(cls, settings: object) -> CrfParams:
        """From an object with the run config's ``crf`` and ``crf_*`` attributes."""
        values = {f.name: getattr(settings, f"crf_{f.name}") for f in fields(cls) if f.name != "enabled"}
        values["backend"] = "torch" if values["backend"] == "auto" else values["backend"]
        return cls(enabled=bool(settings.crf) and values["iters"] > 0, **values)


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


def crf_refine(rgb: np.ndarray, prob: np.ndarray, crf: CrfParams) -> np.ndarray:
    """Two-label DenseCRF (pydensecrf). Bilateral sxy is given at a 500 px image and scaled with the image."""
    H, W = prob.shape
    p = np.clip(prob, 1e-4, 1 - 1e-4)
    d = dcrf.DenseCRF2D(W, H, 2)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1 - p, p]).astype(np.float32))))
    d.addPairwiseGaussian(sxy=crf.gauss_sxy, compat=crf.gauss_compat)
    sxy = crf.bilateral_sxy * max(H, W) / BILATERAL_REFERENCE_SIDE
    d.addPairwiseBilateral(
        sxy=sxy,
        srgb=crf.bilateral_srgb,
        rgbim=np.require(rgb, np.uint8, ["C", "W"]),
        compat=crf.bilateral_compat,
    )
    q = np.asarray(d.inference(crf.iters)).reshape(2, H, W)
    return q[1] > q[0]


# The torch refiner's windows, (size, dilation): a pixel talks to its 8 neighbours at 1, 3 and 9 px, so that a few
# updates reach across a patch (8-16 px) while each costs 24 multiply-adds a pixel. Chosen, with its colour width
# and weight (``crf_local_srgb``, ``crf_local_compat``), on bench/refine_quality.py.
WINDOWS = ((3, 1), (3, 3), (3, 9))
# On a GPU a batch of a shard's images is refined at once, padded to one size; at most this many pixels a batch
# (about 36 images at 384 px; the kernels peak at about 200 bytes a pixel, 0.8 GB, and a GPU is shared by one
# refine task per CPU). On the CPU one image at a time: padding would only cost.
GPU_BATCH_PIXELS = 1 << 22


def _offsets() -> list[tuple[int, int]]:
    grid = [
        (dy * d, dx * d)
        for k, d in WINDOWS
        for dy in range(-(k // 2), k // 2 + 1)
        for dx in range(-(k // 2), k // 2 + 1)
    ]
    return sorted(set(grid) - {(0, 0)})


def local_crf(
    rgb: torch.Tensor, prob: torch.Tensor, inside: torch.Tensor, sxy: torch.Tensor, crf: CrfParams
) -> torch.Tensor:
    """Two-label mean-field CRF with the DenseCRF's Gaussian and bilateral kernels cut to local windows (as
    ConvCRF), each row-normalised, Potts compatibility, ``crf.iters`` updates. Batched: rgb (B, 3, h, w) float
    0-255, prob and inside (B, h, w), ``inside`` 0 on the padding that brings a batch's images to one size (no
    pixel hears from it, so an image's result does not depend on its batch), sxy (B,) the bilateral kernel's
    spatial width in pixels. Returns the foreground (B, h, w) bool."""
    offsets = _offsets()
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    h, w = prob.shape[-2:]

    def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:  # x padded by r: the neighbour at (dy, dx)
        return x[..., r + dy : r + dy + h, r + dx : r + dx + w]

    img, valid = F.pad(rgb, (r, r, r, r)), F.pad(inside, (r, r, r, r))
    near = torch.stack([shifted(valid, dy, dx) for dy, dx in offsets])  # (K, B, h, w): the neighbour is an image's
    d2 = torch.tensor([dy * dy + dx * dx for dy, dx in offsets], dtype=prob.dtype, device=prob.device).view(-1, 1, 1, 1)
    # In place: the (K, B, h, w) kernels are the refiner's largest arrays and most of its cost.
    bilateral = torch.stack([((shifted(img, dy, dx) - rgb) ** 2).sum(-3) for dy, dx in offsets])
    bilateral.mul_(-1 / (2 * crf.local_srgb**2)).sub_(d2 / (2 * sxy.view(1, -1, 1, 1) ** 2))
    bilateral.clamp_(min=-16).exp_().mul_(near)  # clamped: exp's underflow to 0 is slow, and 1e-7 is nothing
    bilateral.mul_(crf.local_compat / bilateral.sum(0).clamp_(min=1e-6))
    gauss = near.mul_(torch.exp(-d2 / (2 * crf.gauss_sxy**2)))  # spatial only: a constant per offset
    kernel = bilateral.add_(gauss.mul_(crf.gauss_compat / gauss.sum(0).clamp_(min=1e-6)))
    del gauss, near
    p = prob.clamp(1e-4, 1 - 1e-4)
    logit = torch.log(p) - torch.log1p(-p)
    q = torch.sigmoid(logit)
    for _ in range(crf.iters):
        # Potts: a label's logit moves by compat x (the neighbours' belief in it minus their belief in the other)
        belief = F.pad(2 * q - 1, (r, r, r, r))
        msg = torch.zeros_like(q)
        for o, (dy, dx) in enumerate(offsets):
            msg.addcmul_(kernel[o], shifted(belief, dy, dx))
        q = torch.sigmoid(logit + msg)
    return q > 0.5


def local_crf_batch(images: list[tuple[np.ndarray, np.ndarray]], crf: CrfParams, device: str) -> list[np.ndarray]:
    """``local_crf`` of (rgb (h, w, 3) uint8, prob (h, w)) pairs of any sizes, padded into one batch on ``device``."""
    h, w = max(p.shape[0] for _, p in images), max(p.shape[1] for _, p in images)
    rgb = torch.zeros(len(images), 3, h, w)
    prob, inside = torch.zeros(len(images), h, w), torch.zeros(len(images), h, w)
    for b, (im, p) in enumerate(images):
        ih, iw = p.shape
        rgb[b, :, :ih, :iw] = torch.from_numpy(np.array(im, np.float32)).permute(2, 0, 1)
        prob[b, :ih, :iw] = torch.from_numpy(np.asarray(p, np.float32))
        inside[b, :ih, :iw] = 1
    sxy = torch.tensor([crf.bilateral_sxy * max(p.shape) / BILATERAL_REFERENCE_SIDE for _, p in images])
    fg = local_crf(*(t.to(device) for t in (rgb, prob, inside, sxy)), crf).cpu().numpy()
    return [fg[b, : p.shape[0], : p.shape[1]] for b, (_, p) in enumerate(images)]


def crf_size(H: int, W: int, max_side: int) -> tuple[int, int]:
    """The (h, w) the CRF runs at: the image's, or its longer side brought down to ``max_side``."""
    if not max_side or max(H, W) <= max_side:
        return H, W
    s = max_side / max(H, W)
    return max(1, round(H * s)), max(1, round(W * s))


def crf_inputs(
    rgb: np.ndarray, score: np.ndarray, geom: dict, patch: int, crf: CrfParams
) -> tuple[np.ndarray, np.ndarray]:
    """(rgb, probability) of one image at the size its CRF runs at (at most ``crf.max_side``: the CRF's cost grows
    with the pixels, and the score it refines is 8-16 px coarse anyway); at full size when there is no CRF."""
    H, W = rgb.shape[:2]
    if (W, H) != (geom["width"], geom["height"]):
        raise BadImage(f"image is {W}x{H} now but was {geom['width']}x{geom['height']} at extraction")
    h, w = crf_size(H, W, crf.max_side) if crf.enabled else (H, W)
    prob = upsample_score(
        score, (geom["grid_h"], geom["grid_w"]), patch, (geom["resized_h"], geom["resized_w"]), (h, w)
    )
    if (h, w) != (H, W):
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
    return rgb, prob


def refine_masks(
    inputs: list[tuple[np.ndarray, np.ndarray]],
    sizes: list[tuple[int, int]],
    crf: CrfParams,
    device: str = "cpu",
    done: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Binary masks at ``sizes`` (H, W) from ``crf_inputs``' pairs: each refined by the configured CRF (the torch
    one batched on a GPU), then brought back to full size. ``done(n)``: n more images refined."""
    done = done or (lambda n: None)
    if not inputs:  # a shard whose every image failed earlier
        return []
    if not crf.enabled:
        fg = [prob > 0.5 for _, prob in inputs]
        done(len(fg))
    elif crf.backend == "densecrf":
        fg = []
        for rgb, prob in inputs:
            fg.append(crf_refine(rgb, prob, crf))
            done(1)
    else:
        fg = [None] * len(inputs)
        budget = GPU_BATCH_PIXELS if str(device).startswith("cuda") else 0
        batches, pixels = [[]], 0
        for i in sorted(range(len(inputs)), key=lambda i: inputs[i][1].shape):  # like shapes: little padding
            if batches[-1] and pixels + inputs[i][1].size > budget:
                batches, pixels = [*batches, []], 0
            batches[-1].append(i)
            pixels += inputs[i][1].size
        for batch in batches:
            for i, m in zip(batch, local_crf_batch([inputs[i] for i in batch], crf, device), strict=True):
                fg[i] = m
            done(len(batch))
    return [
        m
        if m.shape == (H, W)
        else np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((W, H), Image.BILINEAR)) > 127
        for m, (H, W) in zip(fg, sizes, strict=True)
    ]


def refine_image(
    rgb: np.ndarray, score: np.ndarray, geom: dict, patch: int, crf: CrfParams, device: str = "cpu"
) -> np.ndarray:
    """Binary (H, W) mask of one image from its patch soft score (``crf_inputs``, then ``refine_masks``)."""
    return refine_masks([crf_inputs(rgb, score, geom, patch, crf)], [rgb.shape[:2]], crf, device)[0]
