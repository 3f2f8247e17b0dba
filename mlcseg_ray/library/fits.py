"""A run's fit: what it learned that is not per image, as files, and how another run applies it.

The fit of a run folder (schema :data:`FIT_SCHEMA`, README "A fit, applied to new images"):

- ``levels/fit.json`` (cluster): ``schema``; ``feature_space``, the feature store's metadata the centroids hold for
  (backbone, weights, patch size, ``max_side``, ``upscale``, precision, normalisation); ``keys``, the config keys
  that shape the fit; the dataset level's foreground ``direction``; ``far_below``, the similarity to its nearest
  dataset centroid that 95% of the fitted sample's patches reach (drift is measured against it); sample sizes.
- ``levels/dataset.parquet``, ``levels/categories.parquet``, ``levels/groups.parquet`` (cluster): the dataset
  level's centroids and foreground flags, each CLS group's centroids and flags, the CLS groups' centroids.
- ``classes.parquet`` (label): the class centroids, class ids 1..K.

A run applying it (config ``fit``: a run folder, local or in a bucket) fits nothing: its cluster stage labels each
image with these levels (each image's own level computed as always) and its label stage classes regions with these
centroids, so the class ids are the fitted run's. The applied run keeps a copy of the fit, so it can be applied in
turn, and reports how far its images drifted from it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.config import Config
from ..core.errors import FitMismatch
from ..core.fingerprint import digest
from ..core.run_dir import RunDir
from ..core.storage import atomic_write_bytes, atomic_write_json, get_bytes, read_json
from ..core.tables import atomic_write_table, read_table
from ..formats.feature_store import first_store_metadata
from .clustering import KeyLoader, LevelFits, LevelRecord
from .labelling import ClassFit

FIT_SCHEMA = 1
FEATURE_KEYS = ("backbone", "max_side", "upscale")  # what the config says of the feature space (the store: the rest)
LEVEL_KEYS = ("k_dataset", "num_categories", "k_category")  # the levels' shape
CLASS_KEYS = ("num_classes", "region_descriptor", "crop_size")  # the class centroids' shape and space
LEVEL_FILES = ("level_dataset", "level_categories", "level_groups")


def feature_space(run: RunDir) -> dict:
    """What a run's feature vectors are: its store's metadata, less the file format's version."""
    meta = first_store_metadata(run)
    return {k: v for k, v in meta.items() if k != "schema_version"}


def fit_run(cfg: Config) -> RunDir | None:
    return RunDir(cfg.fit) if cfg.fit else None


def _refuse(fitted: RunDir, key: str, theirs: object, ours: object) -> None:
    raise FitMismatch(
        f"--fit {fitted.root}: its {key} is {theirs!r}, this run's is {ours!r}; a fit applies only to features and "
        f"settings like its own (use the same {key}, or fit this run itself)"
    )


def check_config(fitted: RunDir, cfg: Config, keys: tuple[str, ...]) -> None:
    """Refuse a fit whose run was made with other ``keys`` (naming the first), or that holds no fit yet."""
    record = read_json(fitted.level_fit)
    if not record or record.get("schema") != FIT_SCHEMA:
        raise FitMismatch(f"--fit {fitted.root}: no fit there (run cluster and label on it first)")
    theirs = Config.load(fitted.config, [])
    for key in keys:
        if getattr(theirs, key) != getattr(cfg, key):
            _refuse(fitted, key, getattr(theirs, key), getattr(cfg, key))


def check_features(fitted: RunDir, run: RunDir) -> None:
    """Refuse a fit made on another feature space (backbone, weights, ``max_side``, ...), naming what differs."""
    theirs, ours = read_json(fitted.level_fit)["feature_space"], feature_space(run)
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) != ours.get(key):
            _refuse(fitted, key, theirs.get(key), ours.get(key))


def has_level_fit(run: RunDir) -> bool:
    return (read_json(run.level_fit) or {}).get("schema") == FIT_SCHEMA


def levels_id(fitted: RunDir) -> str:
    """The levels' identity: a digest of their files (a refitted run, another identity; "absent" before any)."""
    paths = [getattr(fitted, name) for name in ("level_fit", *LEVEL_FILES)]
    return digest([get_bytes(p).hex() for p in paths]) if all(p.exists() for p in paths) else "absent"


def classes_id(fitted: RunDir) -> str:
    """The class centroids' identity ("absent" before the fitted run's label stage)."""
    return digest(get_bytes(fitted.classes).hex()) if fitted.classes.exists() else "absent"


# --- written by the fitting run ---------------------------------------------------------------------------------
def _with_centroids(columns: dict, centroids: np.ndarray) -> pa.Table:
    dim = centroids.shape[-1]
    return pa.table({**columns, "centroid": pa.FixedSizeListArray.from_arrays(pa.array(centroids.ravel()), dim)})


def write_level_fit(run: RunDir, cfg: Config, fits: LevelFits, record: LevelRecord) -> None:
    """``levels/``: the levels' files (counts are the sample's) and ``fit.json``."""
    dataset = record.dataset
    n_groups, kc = fits.cat_fg.shape
    atomic_write_table(
        run.level_dataset,
        _with_centroids(
            {
                "cluster": np.arange(len(dataset.centroids)),
                "fg": dataset.fg,
                "sample_count": dataset.counts,
                "cue_score": dataset.cue_score,
            },
            dataset.centroids,
        ),
    )
    atomic_write_table(
        run.level_categories,
        _with_centroids(
            {
                "group": np.repeat(np.arange(n_groups), kc),
                "cluster": np.tile(np.arange(kc), n_groups),
                "fg": fits.cat_fg.ravel(),
                "sample_count": record.cat_counts.ravel(),
            },
            fits.cat_centroids,
        ),
    )
    groups = np.zeros((0, 1), np.float32) if record.group_centroids is None else record.group_centroids
    atomic_write_table(run.level_groups, _with_centroids({"group": np.arange(len(groups))}, groups))
    atomic_write_json(
        run.level_fit,
        {
            "schema": FIT_SCHEMA,
            "feature_space": feature_space(run),
            "keys": {k: getattr(cfg, k) for k in LEVEL_KEYS},
            "direction": dataset.direction.tolist(),
            "far_below": dataset.far_below,
            **record.stats,
        },
    )


def write_classes(run: RunDir, fit: ClassFit) -> None:
    """``classes.parquet``: the class centroids, class ids 1..K."""
    ids = np.arange(1, len(fit.centroids) + 1, dtype=np.int32)
    atomic_write_table(run.classes, _with_centroids({"class_id": ids}, fit.centroids))


# --- read by the run applying it ------------------------------------------------------------------------------
def _vectors(table: pa.Table, rows: int) -> np.ndarray:
    col = table.column("centroid").combine_chunks()
    return col.values.to_numpy().reshape(rows, -1) if rows else np.zeros((0, 0), np.float32)


def read_level_fits(fitted: RunDir, run: RunDir) -> LevelFits:
    """The fitted run's levels, ready to label ``run``'s shards (each image's CLS group from ``run``'s own tokens)."""
    record = read_json(fitted.level_fit)
    dataset = read_table(fitted.level_dataset)
    categories = read_table(fitted.level_categories)
    groups = read_table(fitted.level_groups)
    n_groups = int(record["groups"])
    kc = categories.num_rows // max(n_groups, 1)
    cat_fg = categories.column("fg").to_numpy(zero_copy_only=False).reshape(n_groups, kc)
    return LevelFits(
        _vectors(dataset, dataset.num_rows)[None],
        dataset.column("fg").to_numpy(zero_copy_only=False),
        _vectors(categories, categories.num_rows).reshape(n_groups, kc, -1),
        cat_fg,
        np.asarray(record["direction"], np.float64),
        KeyLoader(run, _vectors(groups, groups.num_rows) if groups.num_rows else None),
        float(record["far_below"]),
    )


def copy_levels(fitted: RunDir, run: RunDir) -> None:
    """The fit's level files into ``run`` (which can then be applied in turn), its record saying where from."""
    for name in LEVEL_FILES:
        atomic_write_bytes(getattr(run, name), get_bytes(getattr(fitted, name)))
    record = read_json(fitted.level_fit)
    atomic_write_json(run.level_fit, {**record, "applied_from": str(fitted.root), "levels_id": levels_id(fitted)})


def read_class_fit(fitted: RunDir) -> ClassFit:
    classes = read_table(fitted.classes)
    return ClassFit(_vectors(classes, classes.num_rows).astype(np.float32), classes.num_rows)


# --- drift ----------------------------------------------------------------------------------------------------
def region_drift(fitted: RunDir, run: RunDir) -> dict:
    """How the applied run's regions sit against the fitted run's: the share whose class score is below what 95%
    of the fitted run's regions reach, and each class's share of the regions in both."""
    theirs = read_table(fitted.regions, columns=["class_id", "score"])
    ours = read_table(run.regions, columns=["class_id", "score"])
    if not theirs.num_rows or not ours.num_rows:
        return {}
    far_below = float(np.quantile(theirs.column("score").to_numpy(), 0.05))
    k = int(max(pc.max(theirs.column("class_id")).as_py(), pc.max(ours.column("class_id")).as_py()))

    def shares(t: pa.Table) -> list[float]:
        counts = np.bincount(t.column("class_id").to_numpy(), minlength=k + 1)[1:]
        return [round(float(c), 4) for c in counts / counts.sum()]

    return {
        "far_regions": round(float(np.mean(ours.column("score").to_numpy() < far_below)), 4),
        "far_regions_expected": 0.05,
        "class_shares": shares(ours),
        "fitted_class_shares": shares(theirs),
    }
