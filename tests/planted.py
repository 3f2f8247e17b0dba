"""Planted-structure feature stores: real mask geometry, synthetic features with known foreground and classes.

Geometry comes from real VOC masks (``../shared/data/voc2012_val_masks``) brought down to a patch grid (or from
random blobs when no masks are given, for scale runs). Features are written in the documented store format, so the
whole clustering stage runs on them exactly as on extracted features.

``hard`` plants one failure mode per level, each on its own family of images:

* ``shift`` images: the whole feature cloud of the image moves along the foreground direction (a global threshold,
  the dataset level, misreads them); their CLS tokens carry the shift, so they group together;
* ``modes`` images: a small object on a background of three distinct modes, with CLS attention that points at a
  background stripe (k=3 inside one image must merge the object into a background mode: the image level fails);
* ``mixed`` images: small objects, one background mode each but a different one per image, grouped together by
  their CLS tokens (k=3 inside such a mixed group merges the objects away: the category level fails).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from mlcseg_ray.features import brought_store_metadata, write_store_shard
from mlcseg_ray.store import RunDir, atomic_write_table

GT_SCHEMA = pa.schema([("image_id", pa.string()), ("grid_h", pa.int32()), ("grid_w", pa.int32()),
                       ("mask", pa.list_(pa.uint8())), ("cls", pa.int32()), ("family", pa.string())])


@dataclass
class PlantedSpec:
    difficulty: str = "easy"  # easy | hard
    dim: int = 64
    cell: int = 32  # mask pixels per patch side
    n_images: int | None = None  # None: every mask found
    shard_size: int = 64
    noise: float = 0.35
    n_bg_types: int = 6
    bg_spread: float = 0.8
    class_spread: float = 0.35
    shift: float = 0.9
    small_object: tuple = (0.02, 0.05)
    seed: int = 0
    family_share: dict = field(default_factory=lambda: {"shift": 0.2, "modes": 0.2, "mixed": 0.2})


def load_voc_grids(mask_dir: Path, cell: int, limit: int | None) -> list[tuple[str, np.ndarray, int]]:
    """(image_id, fg patch grid, majority class) for each VOC mask; 255 (borders) counts as neither."""
    from PIL import Image

    paths = sorted(Path(mask_dir).glob("*.png"))[: limit or None]
    out = []
    for p in paths:
        m = np.asarray(Image.open(p))
        gh, gw = max(1, m.shape[0] // cell), max(1, m.shape[1] // cell)
        m = m[: gh * cell, : gw * cell]
        fg = ((m > 0) & (m < 255)).reshape(gh, cell, gw, cell).mean((1, 3)) > 0.5
        classes = m[(m > 0) & (m < 255)]
        cls = int(np.bincount(classes).argmax()) if classes.size else 0
        out.append((p.stem, fg, cls))
    return out


def random_grids(n: int, grid: tuple[int, int], rng) -> list[tuple[str, np.ndarray, int]]:
    """Elliptic blobs for scale runs where real masks are not needed."""
    gh, gw = grid
    yy, xx = np.mgrid[:gh, :gw]
    out = []
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7) * gh, rng.uniform(0.3, 0.7) * gw
        ry, rx = rng.uniform(0.15, 0.35) * gh, rng.uniform(0.15, 0.35) * gw
        out.append((f"img{i:07d}", ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1, int(rng.integers(1, 21))))
    return out


def _shrink(fg: np.ndarray, rng, target: float) -> np.ndarray:
    """A small object: keep the patches of the mask nearest its centre (at least one patch)."""
    gh, gw = fg.shape
    ys, xs = np.nonzero(fg) if fg.any() else (np.array([gh // 2]), np.array([gw // 2]))
    cy, cx = ys.mean(), xs.mean()
    yy, xx = np.mgrid[:gh, :gw]
    d = (yy - cy) ** 2 + (xx - cx) ** 2
    n = max(1, int(round(target * gh * gw)))
    small = np.zeros_like(fg)
    small.flat[np.argsort(d, axis=None)[:n]] = True
    return small


def generate(out: Path, spec: PlantedSpec, grids=None, mask_dir: Path | None = None) -> RunDir:
    """Write a planted store under ``out`` (features/, images/, gt.parquet, planted.json)."""
    rng = np.random.default_rng(spec.seed)
    run = RunDir(out)
    if grids is None:
        grids = load_voc_grids(mask_dir, spec.cell, spec.n_images)
    D = spec.dim
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    # Foreground and background centres far apart; background types spread around theirs, classes around fg's.
    f, b0 = unit(rng.normal(size=D)), unit(rng.normal(size=D))
    bg = b0 + spec.bg_spread * unit(rng.normal(size=(spec.n_bg_types, D)))
    cls_vec = unit(rng.normal(size=(21, D)))
    u = unit(f - bg.mean(0))
    fam_code = {name: unit(rng.normal(size=D)) for name in ("normal", "shift+", "shift-", "modes", "mixed")}

    n = len(grids)
    families = np.array(["normal"] * n, dtype=object)
    if spec.difficulty == "hard":
        order = rng.permutation(n)
        pos = 0
        for name, share in spec.family_share.items():
            m = int(round(share * n))
            families[order[pos: pos + m]] = name
            pos += m

    meta = brought_store_metadata(D, spec.cell, backbone="planted", random_weights=True, weights="synthetic",
                                  planted=asdict(spec))
    gt_rows = []
    for s0 in range(0, n, spec.shard_size):
        records = []
        for idx in range(s0, min(n, s0 + spec.shard_size)):
            image_id, fg, cls = grids[idx]
            fam = families[idx]
            gh, gw = fg.shape
            if fam in ("modes", "mixed"):
                fg = _shrink(fg, rng, target=rng.uniform(*spec.small_object))
            P = gh * gw
            yy, xx = np.divmod(np.arange(P), gw)
            fgf = fg.ravel()
            # background types: normal images two (top/bottom), 'modes' three stripes, 'mixed' one per image
            if fam == "modes":
                types = rng.choice(spec.n_bg_types, 3, replace=False)
                bg_type = types[np.minimum(xx * 3 // gw, 2)]
            elif fam == "mixed":
                bg_type = np.full(P, rng.integers(spec.n_bg_types))
            else:
                types = rng.choice(spec.n_bg_types, 2, replace=False)
                bg_type = types[(yy * 2 // gh).clip(0, 1)]
            x = np.where(fgf[:, None], f + spec.class_spread * cls_vec[cls], bg[bg_type])
            x = x + spec.noise * rng.normal(size=(P, D)) / np.sqrt(D)  # noise of norm ~spec.noise
            attn = np.where(fgf, 0.6, 0.3) + 0.15 * rng.normal(size=P)
            if fam == "modes":  # misleading attention: a background stripe lights up
                attn = np.where(~fgf & (xx * 3 // gw == 0), 0.9, attn)
            code = "normal"
            if fam == "shift":
                sign = 1 if rng.random() < 0.5 else -1
                x = x + sign * spec.shift * u
                code = "shift+" if sign > 0 else "shift-"
            elif fam == "mixed":
                code = fam  # grouped together by their CLS tokens: a mixed group of backgrounds
            cls_token = cls_vec[cls] * (0.3 if fam == "mixed" else 1.0) + 2.0 * fam_code[code]
            cls_token = cls_token + 0.1 * rng.normal(size=D)
            records.append({"image_id": image_id, "keys": x, "cls_attn": attn, "cls_token": cls_token,
                            "grid_h": gh, "grid_w": gw, "uri": f"planted://{image_id}"})
            gt_rows.append({"image_id": image_id, "grid_h": gh, "grid_w": gw, "mask": fgf.astype(np.uint8).tolist(),
                            "cls": cls, "family": fam})
        write_store_shard(run.root, s0 // spec.shard_size, records, D, meta)
    atomic_write_table(run.root / "gt.parquet", pa.Table.from_pylist(gt_rows, schema=GT_SCHEMA))
    return run


def foreground_iou(run: RunDir, gt_path: Path | None = None) -> dict:
    """Dataset-wide foreground IoU of each level, of the combined mask, per family: {name: IoU}."""
    import pyarrow.parquet as pq

    from mlcseg_ray.cluster import read_pseudo

    gt = {r["image_id"]: r for r in pq.read_table(gt_path or run.root / "gt.parquet").to_pylist()}
    pred = read_pseudo(run, columns=["image_id", "mask", "dataset", "category", "image"]).to_pylist()
    inter, union = {}, {}
    for r in pred:
        g = gt[r["image_id"]]
        t = np.asarray(g["mask"], bool)
        for name in ("mask", "dataset", "category", "image"):
            p = np.asarray(r[name], bool)
            for key in (name, f"{name}/{g['family']}"):
                inter[key] = inter.get(key, 0) + int((p & t).sum())
                union[key] = union.get(key, 0) + int((p | t).sum())
    return {k: inter[k] / union[k] if union[k] else 1.0 for k in sorted(inter)}
