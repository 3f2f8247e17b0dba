"""One validated configuration for every stage: YAML file + ``key=value`` overrides.

Keys are flat on purpose: the names of the method (``k_dataset``, ``vote``, ``min_region_area``...) are what users
type on the command line. Unknown keys and bad values fail before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .storage import as_location, atomic_write_text
from .urls import redacted, url_credentials

# Keys that decide how the work is cut and where it runs, never what comes out: no stage's fingerprint holds them
# (the outputs do not depend on them; tests/stages/test_cluster.py and tests/core/test_run_folder.py check it).
# shard_size is ingest's, which writes each image's shard into the manifest.
SCHEDULING_KEYS = frozenset(
    {"batch_size", "shard_size", "num_workers", "decode_threads", "sim_forward_ms", "device", "s3_endpoint_url"}
)


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who typed it."""


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- features (DESIGN §2 "Features", §4) ---
    backbone: str = Field(
        "vit_small_patch8_224.dino",
        description="timm model name, or random-vit-s8 / random-vit-tiny; sim-accelerator: a timing stand-in "
        "(bench/accelerator_feed.py), never for results",
    )
    weights: str | None = Field(None, description="path to a DINO/DINOv2 .pth or safetensors checkpoint")
    facet: Literal["key"] = "key"
    refit: bool = Field(
        True,
        description="false: a frozen run, that grows without moving: its own fit is kept, and added images cost "
        "their own shards in every stage, every existing image's outputs untouched (README 'A fit, applied to new "
        "images')",
    )
    fit: str | None = Field(
        None,
        description="a run folder (local or in a bucket) whose fit labels this run: its levels and class centroids "
        "are applied, nothing is refitted, class ids are the fitted run's (README 'A fit, applied to new images')",
    )
    max_side: int = Field(512, ge=16, description="longer side is brought down to this many pixels")
    upscale: bool = Field(False, description="also bring smaller images up to max_side")
    batch_size: int = Field(8, ge=1, description="images per forward pass")
    shard_size: int = Field(64, ge=1, description="images per feature shard")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="the backbone's forward pass (extraction and crop descriptors): bf16 autocast or float32; "
        "auto: bf16 on CUDA, float32 on CPU",
    )
    num_workers: int = Field(0, ge=0, description="extraction actors / parallel tasks; 0 = one per GPU, or 1 on CPU")
    decode_threads: int = Field(
        2,
        ge=0,
        description="threads per extraction or describe actor that decode images (and cut crops) ahead of the "
        "model, a bounded queue of them, and the actor works on two shards at once; 0: one shard at a time, "
        "decoded in the model's own thread",
    )
    sim_forward_ms: float = Field(
        25.0, gt=0, description="sim-accelerator only: the simulated forward's time per image (or crop), in ms"
    )

    # --- ingest ---
    max_pixels: int = Field(178_956_970, ge=1, description="decoded-pixel cap (PIL's decompression-bomb limit)")
    verify_images: Literal["stat", "hash"] = Field(
        "stat",
        description="how a rerun and each stage tell that an image changed since ingest: size and "
        "modification time, or also a content hash (reads every file again at ingest)",
    )

    # --- clustering (DESIGN §2 levels 1-4) ---
    k_dataset: int = Field(3, ge=2)
    num_categories: int = Field(20, ge=1)
    k_category: int = Field(3, ge=2)
    k_image: int = Field(3, ge=2)
    consistency: Literal["relative", "majority"] = "relative"
    combine: Literal["weighted", "vote", "intersection", "union", "dataset", "category", "image"] = "weighted"
    vote: int = Field(2, ge=1, le=3)
    min_gap: float = Field(
        0.4,
        ge=0,
        description="the gap test of combine=weighted: a level's split has a say in an image only if its two sides "
        "lie at least this share of the dataset's own foreground-background gap apart along the dataset's "
        "foreground direction (0: off)",
    )
    kmeans_iters: int = Field(25, ge=1)
    kmeans_tol: float = Field(1e-4, ge=0)
    kmeans_sample: int = Field(
        100_000,
        ge=100,
        description="vectors a global k-means is fitted on, drawn in one "
        "pass (dataset level; the category level's groups share as many; classes)",
    )
    seed: int = 0

    # --- refinement (DESIGN §2 "Refinement") ---
    crf: bool = True
    crf_backend: Literal["auto", "densecrf", "torch"] = Field(
        "auto",
        description="densecrf: pydensecrf's full dense CRF on the CPU; torch: a local-window mean-field CRF on the "
        "run's torch device, batched over a shard's images; auto: torch (bench/refine_quality.py)",
    )
    crf_iters: int = Field(10, ge=0)
    crf_gauss_sxy: float = Field(3.0, gt=0)
    crf_gauss_compat: float = Field(3.0, ge=0)
    crf_bilateral_sxy: float = Field(67.0, gt=0, description="at a 500 px image; scaled with image size")
    crf_bilateral_srgb: float = Field(3.0, gt=0)
    crf_bilateral_compat: float = Field(4.0, ge=0)
    crf_local_srgb: float = Field(
        20.0, gt=0, description="the torch refiner's bilateral colour width (its kernels are local windows)"
    )
    crf_local_compat: float = Field(8.0, ge=0, description="the torch refiner's bilateral weight")
    crf_max_side: int = Field(
        384,
        ge=0,
        description="the CRF runs with the longer side brought down to this many "
        "pixels, the mask upsampled after (0: full resolution)",
    )

    # --- classes (DESIGN §2 "Classes") ---
    num_classes: int = Field(20, ge=1)
    region: Literal["component", "image"] = "component"
    min_region_area: int = Field(256, ge=1, description="pixels; smaller components become background")
    max_regions: int = Field(
        8,
        ge=0,
        description="regions described per image, the largest first; the other "
        "components join their nearest kept region (0: no limit)",
    )
    region_descriptor: Literal["crop_cls", "masked_mean"] = "crop_cls"
    crop_size: int = Field(160, ge=16, description="region crops are resized to this square for crop_cls")
    min_confidence: float = Field(
        0.0,
        ge=0,
        le=1,
        description="images whose pseudo-mask's confidence is below this get no class regions in masks/ and the "
        "COCO JSON (status flag 'doubtful'); 0 keeps every image",
    )

    # --- storage ---
    s3_endpoint_url: str | None = Field(
        None,
        description="an S3-compatible store's endpoint (MinIO, Ceph, R2...), for the images and a bucket run "
        "folder; the same as setting AWS_ENDPOINT_URL_S3, which it overrides",
    )

    # --- report ---
    report_samples: int = Field(24, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: object) -> object:
        # run folders written before issue 14 name the sample size kmeans_init_sample
        if isinstance(data, dict) and "kmeans_init_sample" in data and "kmeans_sample" not in data:
            data = {**data, "kmeans_sample": data["kmeans_init_sample"]}
            data.pop("kmeans_init_sample")
        return data

    @field_validator("s3_endpoint_url", "weights")
    @classmethod
    def _no_credentials(cls, url: str | None) -> str | None:
        if url_credentials(url):
            raise ValueError(
                "the URL holds a user name or password, which would be stored in the run folder; give credentials "
                "through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or a role instead"
            )
        return url

    @field_validator("weights")
    @classmethod
    def _weights_absolute(cls, path: str | None) -> str | None:
        # actors load it on any node, in their own working directory: a local path is anchored where it was given
        return path if path is None or "://" in path else os.path.abspath(os.path.expanduser(path))

    # ------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
        """Read a YAML file (optional), apply ``key=value`` overrides, validate the whole."""
        data: dict = {}
        if path is not None:
            p = as_location(path)  # a run folder's config.yaml may be in a bucket
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            try:
                loaded = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{p}: expected a mapping of key: value, got {type(loaded).__name__}")
            data.update(loaded)
        data.update(parse_overrides(overrides or []))
        return cls.validated(data)

    @classmethod
    def validated(cls, data: dict) -> Config:
        try:
            return cls(**data)
        except ValidationError as e:
            raise ConfigError(_explain(e)) from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.model_dump(), sort_keys=False))


def parse_overrides(overrides: list[str] | dict) -> dict:
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in Config.model_fields:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(Config.model_fields)}")
        # YAML parsing gives numbers, booleans and null their types; pydantic checks the rest.
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"override {key}: {value!r} is not a YAML value ({first})") from None
    return out


def _explain(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(x) for x in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}; known keys: {', '.join(Config.model_fields)}")
        else:
            lines.append(f"{key}: {err['msg']} (got {redacted(repr(err.get('input')))})")
    return "invalid configuration: " + "; ".join(lines)
