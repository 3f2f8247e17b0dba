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

from mlcseg_ray.core.run_dir import RunDir
from mlcseg_ray.core.tables import atomic_write_table
from mlcseg_ray.formats.feature_store import brought_store_metadata, write_store_shard

GT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("mask", pa.list_(pa.uint8())),
        ("cls", pa.int32()),
        ("family", pa.string()),
    ]
)


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
    # Knobs of the randomized family (random_spec); the defaults leave the easy and hard sets as they always were.
    first: int = 0  # first VOC mask used
    fg_gap: float | None = None  # distance of the foreground centre from the background's (None: two random units)
    fg_attn: float = 0.6  # mean CLS attention on foreground and background patches, and its noise
    bg_attn: float = 0.3
    attn_noise: float = 0.15
    cls_noise: float = 0.1  # noise on the CLS tokens: how mixed the CLS groups come out
    image_shift: float = 0.0  # every image shifted along the foreground direction by N(0, image_shift)
    latent_groups: int = 0  # hidden groups of images, each shifted by its own vector of norm group_shift
    group_shift: float = 0.0
    misleading_share: float = 0.0  # share of images whose attention lights a background region instead
    bg_per_image: int = 2  # background modes in a normal image
    class_weights: tuple | None = None  # classes redrawn with these weights (imbalance); None: the masks' own
    # Scenes (issue 22): images with no object at all (landscapes, walls), and close-ups that are nearly all object
    empty_share: float = 0.0
    closeup_share: float = 0.0


def load_voc_grids(mask_dir: Path, cell: int, limit: int | None, first: int = 0) -> list[tuple[str, np.ndarray, int]]:
    """(image_id, fg patch grid, majority class) for each VOC mask; 255 (borders) counts as neither."""
    from PIL import Image

    paths = sorted(Path(mask_dir).glob("*.png"))[first : first + limit if limit else None]
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
        grids = load_voc_grids(mask_dir, spec.cell, spec.n_images, spec.first)
    D = spec.dim
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    # Foreground and background centres far apart; background types spread around theirs, classes around fg's.
    f, b0 = unit(rng.normal(size=D)), unit(rng.normal(size=D))
    if spec.fg_gap is not None:
        f = b0 + spec.fg_gap * unit(f - b0)
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
            families[order[pos : pos + m]] = name
            pos += m

    # The randomized knobs draw from their own stream, so the default sets stay as they were.
    rng2 = np.random.default_rng([spec.seed, 7])
    image_shift = rng2.normal(0, spec.image_shift, n) if spec.image_shift else np.zeros(n)
    latent = rng2.integers(0, max(spec.latent_groups, 1), n)
    group_vec = spec.group_shift * unit(rng2.normal(size=(max(spec.latent_groups, 1), D)) + u)
    group_code = unit(rng2.normal(size=(max(spec.latent_groups, 1), D)))
    misleading = rng2.random(n) < spec.misleading_share
    # the scene knobs draw from a third stream: the sets without empty scenes stay as they were
    rng3 = np.random.default_rng([spec.seed, 22])
    scene = rng3.random(n)
    empty = scene < spec.empty_share
    closeup = (scene >= spec.empty_share) & (scene < spec.empty_share + spec.closeup_share)
    closeup_band = rng3.uniform(0.05, 0.15, n)  # the share of background left at one edge of a close-up
    classes = (
        rng2.choice(len(spec.class_weights), n, p=np.asarray(spec.class_weights) / sum(spec.class_weights))
        if spec.class_weights
        else None
    )

    meta = brought_store_metadata(
        D, spec.cell, backbone="planted", random_weights=True, weights="synthetic", planted=asdict(spec)
    )
    gt_rows = []
    for s0 in range(0, n, spec.shard_size):
        records = []
        for idx in range(s0, min(n, s0 + spec.shard_size)):
            image_id, fg, cls = grids[idx]
            cls = int(classes[idx]) + 1 if classes is not None else cls
            fam = families[idx]
            gh, gw = fg.shape
            if fam in ("modes", "mixed"):
                fg = _shrink(fg, rng, target=rng.uniform(*spec.small_object))
            if empty[idx]:
                fg = np.zeros_like(fg)
            elif closeup[idx]:
                fg = np.ones_like(fg)
                fg[: max(1, int(round(closeup_band[idx] * gh)))] = False  # a strip of background at the top
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
                if spec.bg_per_image != 2:  # that many horizontal bands
                    m = min(spec.bg_per_image, spec.n_bg_types)
                    types = rng2.choice(spec.n_bg_types, m, replace=False)
                    bg_type = types[(yy * m // gh).clip(0, m - 1)]
            x = np.where(fgf[:, None], f + spec.class_spread * cls_vec[cls], bg[bg_type])
            x = x + spec.noise * rng.normal(size=(P, D)) / np.sqrt(D)  # noise of norm ~spec.noise
            attn = np.where(fgf, spec.fg_attn, spec.bg_attn) + spec.attn_noise * rng.normal(size=P)
            if fam == "modes":  # misleading attention: a background stripe lights up
                attn = np.where(~fgf & (xx * 3 // gw == 0), 0.9, attn)
            if misleading[idx]:  # the attention prefers a background band to the object
                band = (yy * 3 // gh) == rng2.integers(3)
                attn = np.where(~fgf & band, spec.fg_attn + 0.2, np.where(fgf, spec.bg_attn, attn))
            if spec.image_shift or spec.latent_groups:
                x = x + image_shift[idx] * u + (group_vec[latent[idx]] if spec.latent_groups else 0)
            code = "normal"
            if fam == "shift":
                sign = 1 if rng.random() < 0.5 else -1
                x = x + sign * spec.shift * u
                code = "shift+" if sign > 0 else "shift-"
            elif fam == "mixed":
                code = fam  # grouped together by their CLS tokens: a mixed group of backgrounds
            cls_token = cls_vec[cls] * (0.3 if fam == "mixed" else 1.0) + 2.0 * fam_code[code]
            cls_token = cls_token + spec.cls_noise * rng.normal(size=D)
            if spec.latent_groups:
                cls_token = cls_token + 2.0 * group_code[latent[idx]]
            records.append(
                {
                    "image_id": image_id,
                    "keys": x,
                    "cls_attn": attn,
                    "cls_token": cls_token,
                    "grid_h": gh,
                    "grid_w": gw,
                    "uri": f"planted://{image_id}",
                }
            )
            gt_rows.append(
                {
                    "image_id": image_id,
                    "grid_h": gh,
                    "grid_w": gw,
                    "mask": fgf.astype(np.uint8).tolist(),
                    "cls": cls,
                    "family": "empty" if empty[idx] else "closeup" if closeup[idx] else fam,
                }
            )
        write_store_shard(run.root, s0 // spec.shard_size, records, D, meta)
    atomic_write_table(run.root / "gt.parquet", pa.Table.from_pylist(gt_rows, schema=GT_SCHEMA))
    return run


def foreground_iou(run: RunDir, gt_path: Path | None = None, images: set[str] | None = None) -> dict:
    """Dataset-wide foreground IoU of each level, of the combined mask, per family: {name: IoU} (over ``images``
    alone, when given)."""
    import pyarrow.parquet as pq

    from mlcseg_ray.library.clustering import read_pseudo

    gt = {r["image_id"]: r for r in pq.read_table(gt_path or run.root / "gt.parquet").to_pylist()}
    pred = read_pseudo(run, columns=["image_id", "mask", "dataset", "category", "image"]).to_pylist()
    inter, union = {}, {}
    for r in pred:
        if images is not None and r["image_id"] not in images:
            continue
        g = gt[r["image_id"]]
        t = np.asarray(g["mask"], bool)
        for name in ("mask", "dataset", "category", "image"):
            p = np.asarray(r[name], bool)
            for key in (name, f"{name}/{g['family']}"):
                inter[key] = inter.get(key, 0) + int((p & t).sum())
                union[key] = union.get(key, 0) + int((p | t).sum())
    return {k: inter[k] / union[k] if union[k] else 1.0 for k in sorted(inter)}


# ---------------------------------------------------------------------------------------------------------------
# randomized families (issue 13): the rules are chosen on draws over wide ranges, not on one hand-made set
# ---------------------------------------------------------------------------------------------------------------


def random_spec(draw: int, n_masks: int = 1449, scenes: bool = False) -> PlantedSpec:
    """One draw of the randomized family: every knob of the generator over a wide range. ``scenes``: also 5% to
    30% of the images with no object and up to 15% close-ups that are nearly all object."""
    r = np.random.default_rng([draw, 13])
    n_images = int(r.integers(100, 201))
    gap = r.uniform(0.05, 0.4)
    lo = r.uniform(0.01, 0.05)
    return PlantedSpec(
        difficulty="hard",
        dim=int(r.choice([32, 48, 64, 96])),
        cell=int(r.choice([24, 32, 40, 48])),
        n_images=n_images,
        first=int(r.integers(0, max(1, n_masks - n_images))),
        shard_size=50,
        seed=draw,
        noise=r.uniform(0.2, 0.8),
        n_bg_types=int(r.integers(3, 11)),
        bg_spread=r.uniform(0.3, 1.2),
        class_spread=r.uniform(0.1, 0.6),
        shift=r.uniform(0.2, 1.5),
        small_object=(lo, 2.5 * lo),
        family_share=dict(zip(("shift", "modes", "mixed"), r.uniform(0, 0.3, 3).round(3), strict=True)),
        fg_gap=r.uniform(0.6, 1.6),
        bg_attn=0.3,
        fg_attn=0.3 + gap,
        attn_noise=r.uniform(0.05, 0.3),
        cls_noise=float(np.exp(r.uniform(np.log(0.1), np.log(3.0)))),
        image_shift=r.uniform(0, 0.5),
        latent_groups=int(r.integers(0, 8)),
        group_shift=r.uniform(0, 0.8),
        misleading_share=r.uniform(0, 0.3),
        bg_per_image=int(r.integers(1, 4)),
        class_weights=tuple(r.dirichlet(np.full(20, r.uniform(0.2, 5.0)))),
        empty_share=float(np.random.default_rng([draw, 22]).uniform(0.05, 0.3)) if scenes else 0.0,
        closeup_share=float(np.random.default_rng([draw, 23]).uniform(0, 0.15)) if scenes else 0.0,
    )


def photo_grids(run: RunDir, mask_dir: Path) -> dict[str, np.ndarray]:
    """Each extracted VOC photo's ground truth on its own patch grid (majority of each patch's pixels; the 255
    borders count as background)."""
    import pyarrow.parquet as pq
    from PIL import Image

    out = {}
    for p in sorted(run.image_tables.glob("*.parquet")):
        for r in pq.read_table(p, columns=["image_id", "grid_h", "grid_w", "status"]).to_pylist():
            if r["status"] != "ok":
                continue
            m = np.asarray(Image.open(Path(mask_dir) / f"{r['image_id']}.png"))
            fg = Image.fromarray(((m > 0) & (m < 255)).astype(np.uint8) * 255)
            out[r["image_id"]] = np.asarray(fg.resize((r["grid_w"], r["grid_h"]), Image.BOX)) > 127
    return out


def generate_on_photos(
    out: Path, base: RunDir, mask_dir: Path, strength: float, seed: int = 0, empty_share: float = 0.0
) -> RunDir:
    """A planted store on real photos: the keys of a (random-weight) ViT on the photo plus a planted semantic
    component of norm ``strength`` (foreground: one direction plus the photo's class; background: one of a few
    modes per band), so that real image statistics (texture, colour, spatial correlation) confound the levels.
    The CLS attention mixes the network's own with a planted cue; the truth is the photo's VOC mask.
    ``empty_share``: that share of the photos gets no planted object (background modes only): empty scenes whose
    truth is empty, while the photo's own texture still varies as much as in the others."""
    import pyarrow.parquet as pq

    from mlcseg_ray.formats.feature_store import key_matrix, read_store_metadata

    rng = np.random.default_rng([seed, 11])
    truth = photo_grids(base, mask_dir)
    D = read_store_metadata(sorted(base.features.glob("*.parquet"))[0])["embed_dim"]
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    f, bg, cls_vec = unit(rng.normal(size=D)), unit(rng.normal(size=(6, D))), unit(rng.normal(size=(21, D)))
    mix = rng.uniform(0.2, 0.8)  # share of the planted cue in the attention
    rng_empty = np.random.default_rng([seed, 22])
    meta = {**read_store_metadata(sorted(base.features.glob("*.parquet"))[0]), "planted_on_photos": strength}
    gt_rows = []
    shards = sorted(base.features.glob("*.parquet"))
    for n, path in enumerate(shards):
        t = pq.read_table(path, columns=["image_id", "key", "cls_attn"])
        images = {
            r["image_id"]: r
            for r in pq.read_table(
                base.image_table(int(path.stem.split("-")[-1])), columns=["image_id", "grid_h", "grid_w", "cls_token"]
            ).to_pylist()
        }
        ids = np.asarray(t.column("image_id").to_pylist())
        keys, attn = key_matrix(t.column("key")), t.column("cls_attn").to_numpy()
        records = []
        for image_id in dict.fromkeys(ids):
            rows = ids == image_id
            im = images[image_id]
            fg = truth[image_id].ravel()
            is_empty = rng_empty.random() < empty_share
            if is_empty:
                fg = np.zeros_like(fg)
            gh, gw = im["grid_h"], im["grid_w"]
            cls = int(rng.integers(1, 21))
            yy = np.arange(gh * gw) // gw
            bands = rng.choice(len(bg), 2, replace=False)[(yy * 2 // gh).clip(0, 1)]
            planted = np.where(fg[:, None], f + 0.4 * cls_vec[cls], bg[bands])
            x = unit(keys[rows]) + strength * planted
            a = attn[rows]
            a = (a - a.min()) / max(np.ptp(a), 1e-9)
            cue = np.where(fg, 0.7, 0.3) + 0.15 * rng.normal(size=fg.size)
            records.append(
                {
                    "image_id": image_id,
                    "keys": x,
                    "grid_h": gh,
                    "grid_w": gw,
                    "cls_attn": (1 - mix) * a + mix * cue,
                    "cls_token": np.asarray(im["cls_token"]) + strength * cls_vec[cls],
                }
            )
            gt_rows.append(
                {
                    "image_id": image_id,
                    "grid_h": gh,
                    "grid_w": gw,
                    "mask": fg.astype(np.uint8).tolist(),
                    "cls": cls,
                    "family": "empty" if is_empty else "photo",
                }
            )
        write_store_shard(Path(out), n, records, D, meta)
    atomic_write_table(Path(out) / "gt.parquet", pa.Table.from_pylist(gt_rows, schema=GT_SCHEMA))
    return RunDir(out)
