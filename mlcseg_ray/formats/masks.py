"""Mask files: 8-bit PNGs (binary 0/255, or class ids with the VOC palette), and a region's COCO RLE."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..core.storage import as_location


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), 256 entries."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def png_bytes(array: np.ndarray, palette: list[int] | None = None) -> bytes:
    """An 8-bit PNG of ``array``: grey, or palette indices with ``palette``."""
    img = Image.fromarray(array.astype(np.uint8), mode="L" if palette is None else "P")
    if palette is not None:
        img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def read_mask(path: str | Path) -> np.ndarray:
    """A mask PNG as it is stored (class ids, or 0/255), from a local folder or a bucket."""
    with as_location(path).open("rb") as f:
        return np.asarray(Image.open(f))


def read_binary(path: str | Path) -> np.ndarray:
    """A binary mask PNG as bool (foreground where > 0)."""
    return read_mask(path) > 0


def rle_counts(mask: np.ndarray) -> str:
    """A binary mask's COCO run-length encoding: the ``counts`` string (its ``size`` is the mask's shape)."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def rle_mask(counts: str, height: int, width: int) -> np.ndarray:
    """The bool (height, width) mask a ``counts`` string of :func:`rle_counts` encodes."""
    return mask_utils.decode({"size": [height, width], "counts": counts.encode("ascii")}).astype(bool)
