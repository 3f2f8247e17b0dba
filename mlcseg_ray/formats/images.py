"""Reading images from local paths or object storage, with every conversion a photo collection needs.

One function decides what an image *is* (``load_rgb``): EXIF orientation applied, any mode converted to 8-bit RGB,
decoded pixels capped before decoding. Failures raise :class:`BadImage` with a reason a person understands; callers
turn it into an error row, never a crashed job.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import BadImage
from ..core.storage import get_bytes, get_range, is_remote
from .packed import packed, read_packed

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
# Above this many pixels an image is decoded by libvips at the size the caller needs (shrink-on-load, streamed), not
# whole by PIL: a 12000 x 12000 PNG costs ~0.1 GB, not ~1.5 GB (BENCHMARKS.md, "Decoding huge images"). Below it
# the decoding is PIL's, so the pixels of every ordinary photo are as they always were.
LARGE_PIXELS = 25_000_000
# EXIF orientations 5-8 swap width and height.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


# What ingest reads of an image in ``verify_images=stat`` runs: its header (size, EXIF orientation) is in the first
# kilobytes of every ordinary photo; an image whose header lies further (a large ICC profile) is read whole.
HEADER_BYTES = 64 << 10


def read_bytes(uri: str, first: int | None = None) -> bytes:
    """An image file's bytes, or its ``first`` bytes alone (in a bucket, one ranged GET); an image inside a tar or
    Parquet file from its container (:mod:`.packed`)."""
    inside = packed(uri)
    if inside:
        return read_packed(inside, first)
    try:
        if is_remote(uri):
            return get_bytes(uri) if first is None else get_range(uri, 0, first)
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        with open(path, "rb") as f:
            return f.read() if first is None else f.read(first)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except PermissionError:
        raise BadImage("permission denied: the file is not readable") from None
    except IsADirectoryError:
        raise BadImage("is a directory, not an image file") from None
    except OSError as e:
        raise BadImage(f"cannot read file: {e}") from None


def _open(data: bytes) -> Image.Image:
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image: the file's content is not a format PIL can read") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too many pixels: {e}") from None


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    if w * h > LARGE_PIXELS and img.format == "PNG" and "exif" not in img.info:
        return w, h  # PIL would decode the whole image to look for an EXIF chunk after the pixels
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not a broken image
        orientation = 1
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def _check_size(w: int, h: int, max_pixels: int, min_side: int) -> None:
    if w * h > max_pixels:
        raise BadImage(
            f"too many pixels: {w}x{h} = {w * h:,} exceeds max_pixels={max_pixels:,} (decompression-bomb guard)"
        )
    if min(w, h) < min_side:
        raise BadImage(f"too small: {w}x{h} is smaller than one {min_side}px patch")


def probe(
    uri: str, max_pixels: int, min_side: int = 1, data: bytes | None = None, whole: bool = True
) -> tuple[int, int]:
    """Width and height after EXIF orientation, from the header only (cheap; used at ingest). ``data``: the file's
    bytes, or (``whole=False``) its first bytes only: where the header does not fit in them, the file is read whole."""
    if data is None:
        data = read_bytes(uri)
    try:
        img = _open(data)
        w, h = _oriented_size(img)
    except Exception:
        if whole:
            raise
        img = _open(read_bytes(uri))  # a header longer than the first bytes: the file, as extraction will read it
        w, h = _oriented_size(img)
    _check_size(w, h, max_pixels, min_side)
    return w, h


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_stat(uri: str) -> tuple[int | None, int | None]:
    """(size in bytes, modification time in ns) of a local file or an object (its last-modified time; None where
    the store has none); (None, None) when it cannot be read. An image inside a container: the container's."""
    uri = inside.container if (inside := packed(uri)) else uri
    try:
        if is_remote(uri):
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri)
            info = fs.info(path)
            return info.get("size"), _modified_ns(info)
        st = os.stat(uri[len("file://") :] if uri.startswith("file://") else uri)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None, None


def _modified_ns(info: dict) -> int | None:
    """An object's last modification in ns (S3 ``LastModified``, GCS ``updated``), None where the store has none."""
    import datetime

    when = info.get("LastModified") or info.get("updated") or info.get("mtime")
    if isinstance(when, str):
        when = datetime.datetime.fromisoformat(when.replace("Z", "+00:00"))
    if isinstance(when, datetime.datetime):
        return int(when.timestamp() * 1e9)
    return int(when * 1e9) if isinstance(when, (int, float)) else None


def check_unchanged(uri: str, data: bytes, expect: dict) -> None:
    """The file is still the one ingest saw: same size and modification time, and the same content hash when
    ``expect`` carries one (``verify_images=hash``). Raises BadImage naming what changed."""
    if expect.get("bytes") is not None and len(data) != expect["bytes"]:
        raise BadImage(f"changed since ingest: {len(data)} bytes now, {expect['bytes']} then; rerun to recompute")
    # an image inside a container is not checked by a stat of the container each time: a tar member's read checks
    # the member's own header, a Parquet row its length
    if expect.get("mtime_ns") is not None and not packed(uri):
        _, mtime = file_stat(uri)
        if mtime is not None and mtime != expect["mtime_ns"]:
            raise BadImage("changed since ingest: the file was modified; rerun to recompute")
    if expect.get("content_hash") and content_hash(data) != expect["content_hash"]:
        raise BadImage("changed since ingest: its content differs; rerun to recompute")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. 16-bit and float images are scaled by their own range, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img)
        scale = a.max() > 255  # 16-bit range: scale, do not clip
        out = np.empty(a.shape, np.uint8)
        rows = max(1, (1 << 20) // max(1, a.shape[1]))  # in bands of ~1M pixels: no whole-image float64 copy
        for y in range(0, a.shape[0], rows):
            band = a[y : y + rows].astype(np.float64)
            out[y : y + rows] = np.clip(band / 65535.0 * 255.0 if scale else band, 0, 255).astype(np.uint8)
        img = Image.fromarray(out, "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become white rather than whatever colour they happen to store.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_rgb(uri: str, max_pixels: int, min_side: int = 1, expect: dict | None = None) -> np.ndarray:
    """Decode one image to an HxWx3 uint8 array, EXIF orientation applied. ``expect`` (from the manifest:
    ``bytes``, ``mtime_ns``, optionally ``content_hash``): fail if the file changed since ingest."""
    return _decoded(_checked(uri, max_pixels, min_side, expect)[1])


def _checked(uri: str, max_pixels: int, min_side: int, expect: dict | None) -> tuple[bytes, Image.Image, tuple]:
    """The file's bytes, the image opened from its header, and its oriented size, once every check passed."""
    data = read_bytes(uri)
    if expect:
        check_unchanged(uri, data, expect)
    img = _open(data)
    w, h = _oriented_size(img)
    _check_size(w, h, max_pixels, min_side)
    return data, img, (w, h)


def _decoded(img: Image.Image) -> np.ndarray:
    """The whole image as HxWx3 uint8, EXIF orientation applied; a decoding failure is a BadImage."""
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
    except BadImage:
        raise
    except OSError as e:
        msg = str(e)
        if "truncated" in msg:
            raise BadImage("truncated file: the image data ends early") from None
        raise BadImage(f"cannot decode image: {msg}") from None
    except (ValueError, SyntaxError) as e:
        raise BadImage(f"cannot decode image: {e}") from None
    return np.array(img, dtype=np.uint8)  # writable: pydensecrf needs that


def load_rgb_sized(
    uri: str,
    max_pixels: int,
    size_for: Callable[[int, int], tuple[int, int]],
    min_side: int = 1,
    expect: dict | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """An image and its EXIF-oriented size ``(w, h)``, for a caller that resizes it to ``size_for(w, h)``. A huge
    image comes already at that size (its memory is what the size needs, not what the file holds); any other comes
    whole, as :func:`load_rgb` gives it."""
    data, img, (w, h) = _checked(uri, max_pixels, min_side, expect)
    if w * h <= LARGE_PIXELS:
        return _decoded(img), (w, h)
    return _vips_sized(data, *size_for(w, h)), (w, h)


def _vips_sized(data: bytes, width: int, height: int) -> np.ndarray:
    """``data`` decoded by libvips straight to ``width`` x ``height`` 8-bit RGB (EXIF orientation applied,
    transparency on white, 16-bit scaled by the full range)."""
    import pyvips

    try:
        im = pyvips.Image.thumbnail_buffer(data, width, height=height, size="force")
        if im.hasalpha():
            im = im.flatten(background=[255] * (im.bands - 1))
        im = im.colourspace("srgb")
        if im.bands > 3:
            im = im.extract_band(0, n=3)
        if im.format != "uchar":
            im = im.cast("uchar")
        return np.ndarray(buffer=im.write_to_memory(), dtype=np.uint8, shape=(im.height, im.width, 3)).copy()
    except pyvips.Error as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadImage(f"cannot decode image: {msg}") from None


def list_files(root: Path) -> list[Path]:
    """Every file below ``root`` (recursive), sorted; hidden files and folders skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / name for name in filenames if not name.startswith(".")]
    return sorted(out)


def list_folder(root: str, below: str | None = None) -> list[tuple[PurePosixPath, str]]:
    """Every file below a local folder or an object-store prefix (``s3://bucket/photos/``, ``gs://...``),
    recursive, sorted, hidden ones skipped: ``(path relative to root, uri)``; with ``below``, only those in that
    subfolder of ``root`` (one ingest task's part of the listing). Credentials and endpoints come the standard way
    (AWS variables and profiles, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, roles)."""
    if not is_remote(root):
        local = _local_folder(root)
        return [
            (PurePosixPath(p.relative_to(local).as_posix()), str(p))
            for p in list_files(local / below if below else local)
        ]
    fs, path = _remote_folder(root)
    with _one_line_listing_errors(root):
        found = sorted(fs.find(f"{path}/{below}" if below else path))
    scheme = root.split("://", 1)[0]
    out = []
    for f in found:
        rel = PurePosixPath(f).relative_to(path)
        if not any(part.startswith(".") for part in rel.parts):
            out.append((rel, f"{scheme}://{f}"))
    return out


def folder_top(root: str) -> tuple[list[str], list[tuple[PurePosixPath, str]]]:
    """A folder's (or prefix's) subfolders, by name, sorted, and its own files as ``list_folder`` gives them: what
    ingest lists in one task per subfolder, and on the driver."""
    if not is_remote(root):
        local = _local_folder(root)
        entries = [e for e in os.scandir(local) if not e.name.startswith(".")]
        # as os.walk (list_files) has it: a link to a folder is not walked, a broken link (or a loop of links) is a
        # file, which is not an image by its extension or fails as one
        folders = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        files = sorted((PurePosixPath(e.name), str(local / e.name)) for e in entries if not _is_dir(e))
        return folders, files
    fs, path = _remote_folder(root)
    with _one_line_listing_errors(root):
        entries = fs.ls(path, detail=True)
    scheme = root.split("://", 1)[0]
    names = [(PurePosixPath(e["name"].rstrip("/")).name, e) for e in entries]
    folders = sorted(n for n, e in names if e["type"] == "directory" and not n.startswith("."))
    files = sorted(
        (PurePosixPath(n), f"{scheme}://{path}/{n}")
        for n, e in names
        if e["type"] != "directory" and not n.startswith(".")
    )
    return folders, files


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a loop of links
        return False


def _local_folder(root: str) -> Path:
    local = Path(root[len("file://") :] if root.startswith("file://") else root)
    if not local.is_dir():
        raise FileNotFoundError(f"--images: no such folder: {root}")
    return local


def _remote_folder(root: str) -> tuple[Any, str]:
    import fsspec

    with _one_line_listing_errors(root):
        fs, path = fsspec.core.url_to_fs(root)
        path = path.rstrip("/")
        found = fs.isdir(path)
    if not found:
        raise FileNotFoundError(f"--images: no such folder or prefix: {root}")
    return fs, path


@contextlib.contextmanager
def _one_line_listing_errors(root: str) -> Iterator[None]:
    """Credentials, permissions, an endpoint that does not answer: one line that names the folder."""
    try:
        yield
    except Exception as e:
        raise ValueError(f"--images: cannot list {root} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
