"""Generates the bad-input corpus of issue 2: every case either loads correctly or is an error with a reason."""

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def _photo(w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w)[None, :]
    a[..., 1] = np.linspace(0, 255, h)[:, None]
    a[..., 2] = rng.integers(0, 255, (h, w))
    return Image.fromarray(a)


# name -> expected: "ok" (loads) / substring of the error reason
EXPECTED = {
    "zero": "empty file",
    "truncated": "truncated",
    "text": "not an image",
    "png16": "ok",
    "gray": "ok",
    "rgba": "ok",
    "palette": "ok",
    "cmyk": "ok",
    "exif_rotated": "ok",
    "tiny": "too small",
    "bomb": "too many pixels",
    "a/dup": "ok",
    "b/dup": "ok",
    "broken_link": "file not found",
}


def make_corpus(root: Path, with_bomb: bool = True) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    _photo(256, 192).save(buf, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "text.jpg").write_text("this is not a picture\n")
    grad16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(grad16).save(root / "png16.png")
    _photo().convert("L").save(root / "gray.png")
    rgba = _photo().convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    _photo().convert("P", palette=Image.ADAPTIVE).save(root / "palette.png")
    _photo().convert("CMYK").save(root / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    _photo(64, 32).save(root / "exif_rotated.jpg", exif=exif)
    _photo(4, 4).save(root / "tiny.png")
    if with_bomb:
        Image.new("1", (20000, 20000)).save(root / "bomb.png")  # 400M pixels, a few tens of KB on disk
    for d in ("a", "b"):
        (root / d).mkdir(exist_ok=True)
        _photo(seed=ord(d)).save(root / d / "dup.jpg")
    os.symlink(root / "does_not_exist.jpg", root / "broken_link.jpg")
    return {k: v for k, v in EXPECTED.items() if with_bomb or k != "bomb"}
