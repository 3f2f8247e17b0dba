"""The report's building blocks: images inlined as data URIs, escaping, and charts as inline SVG.

Everything here returns HTML text that needs no script, no stylesheet beyond the page's own and no other file: a
report is one page that can be mailed as it is and read with JavaScript off.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image


def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def jpeg_uri(img: Image.Image, quality: int = 80) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return data_uri(buf.getvalue())


def png_uri(labels: np.ndarray, palette: list[int]) -> str:
    """Label indices as a palette PNG: a mask shown with exactly the colours its legend gives."""
    img = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return data_uri(buf.getvalue(), "image/png")


def hex_colour(palette: list[int], index: int) -> str:
    return "#{:02x}{:02x}{:02x}".format(*palette[3 * index : 3 * index + 3])


def swatch(colour: str, label: str, cls: int | None = None) -> str:
    attr = f" data-class='{cls}'" if cls is not None else ""
    return f"<span class='key'><span class='sw'{attr} style='background:{colour}'></span>{esc(label)}</span>"


def bar_chart(rows: list[tuple[str, float, str]], label: str, vmax: float | None = None, colour: str = "#69c") -> str:
    """Horizontal bars: (name, value, text shown after the bar). ``vmax``: the full width (the largest value)."""
    if not rows:
        return ""
    top = vmax or max((v for _, v, _ in rows), default=1.0) or 1.0
    bar_w, row_h, label_w = 360, 20, 150
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='chart' width='{label_w + bar_w + 120}' "
        f"height='{row_h * len(rows) + 6}' role='img' aria-label='{esc(label)}'>"
    ]
    for i, (name, value, text) in enumerate(rows):
        y = 3 + i * row_h
        w = bar_w * max(value, 0) / top
        out.append(
            f"<text x='0' y='{y + 14}' font-size='12'>{esc(name[:24])}</text>"
            f"<rect x='{label_w}' y='{y + 3}' width='{w:.1f}' height='{row_h - 6}' fill='{colour}'/>"
            f"<text x='{label_w + w + 5:.1f}' y='{y + 14}' font-size='11'>{esc(text)}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def histogram(counts: list[int], edges: list[float], label: str, colour: str = "#69c") -> str:
    """Vertical bars over ``len(counts)`` bins, the first and last edges written under the axis."""
    n = len(counts)
    if not n:
        return ""
    bin_w, height, pad = 18, 120, 20
    top = max(max(counts), 1)
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='chart' width='{n * bin_w + 2 * pad + 30}' "
        f"height='{height + 50}' role='img' aria-label='{esc(label)}'>"
    ]
    for i, c in enumerate(counts):
        h = height * c / top
        x = pad + i * bin_w
        out.append(
            f"<rect x='{x + 1}' y='{height - h + 15:.1f}' width='{bin_w - 2}' height='{h:.1f}' fill='{colour}'>"
            f"<title>{edges[i]:.2f} to {edges[i + 1]:.2f}: {c}</title></rect>"
        )
        if c:
            out.append(f"<text x='{x + 1}' y='{height - h + 12:.1f}' font-size='9'>{c}</text>")
    for i in (0, n // 2, n):
        out.append(f"<text x='{pad + i * bin_w - 6}' y='{height + 30}' font-size='11'>{edges[i]:g}</text>")
    out.append("</svg>")
    return "".join(out)


def line_chart(series: dict[str, list[tuple[float, float]]], label: str, x_label: str, y_label: str) -> str:
    """Lines over the unit square (both axes 0 to 1), one colour per series with its name as a key."""
    size, pad = 200, 36
    colours = ("#2a7", "#c83", "#69c", "#96c")
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='chart' width='{size + 2 * pad + 90}' "
        f"height='{size + 2 * pad}' role='img' aria-label='{esc(label)}'>"
        f"<rect x='{pad}' y='{pad // 2}' width='{size}' height='{size}' fill='none' stroke='#999'/>"
        f"<text x='{pad + size // 2 - 20}' y='{size + pad + 14}' font-size='11'>{esc(x_label)}</text>"
        f"<text x='2' y='{pad // 2 + 10}' font-size='11'>{esc(y_label)}</text>"
        f"<text x='{pad - 8}' y='{size + pad // 2 + 12}' font-size='10'>0</text>"
        f"<text x='{pad + size - 4}' y='{size + pad // 2 + 12}' font-size='10'>1</text>"
    ]
    for k, (name, pts) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        xy = " ".join(f"{pad + size * x:.1f},{pad // 2 + size * (1 - y):.1f}" for x, y in pts)
        out.append(f"<polyline points='{xy}' fill='none' stroke='{colour}' stroke-width='2'/>")
        out.append(f"<text x='{pad + size + 8}' y='{pad + 14 * k}' font-size='11' fill='{colour}'>{esc(name)}</text>")
    out.append("</svg>")
    return "".join(out)
