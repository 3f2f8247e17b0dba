"""Where a run's images come from (:class:`InputSpec`) and what else it reads (:class:`RunInputs`).

The input fields are declared here once; the CLI's options, :class:`~mlcseg_ray.pipeline.Pipeline` and the Ray
Jobs entrypoint all take them from :data:`INPUT_FIELDS`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .urls import url_credentials

# The fields that name a file or folder (a local path or a bucket URI).
LOCATION_FIELDS = ("images", "voc", "coco", "ann", "manifest", "webdataset", "parquet", "gt")


@dataclass(frozen=True)
class InputSpec:
    """Where the images come from: exactly one of the six kinds."""

    images: str | None = None
    voc: str | None = None
    split: str = "val"
    coco: str | None = None
    ann: str | None = None
    manifest: str | None = None
    webdataset: str | None = None  # tar shards: a folder or prefix, a brace pattern, a list file, one tar
    parquet: str | None = None  # Parquet files with an image column: a folder or prefix, a pattern, one file
    image_column: str | None = None  # --parquet: the image column (default: found from the schema)
    id_column: str | None = None  # --parquet: the id column (default: image_id, id, __key__ or key, if any)
    limit: int | None = None  # only the first N images, in image-id order
    sample: int | None = None  # a random sample of N images ...
    sample_seed: int = 0  # ... drawn with this seed

    def describe(self) -> str:
        if self.images:
            what = f"folder {self.images}"
        elif self.voc:
            what = f"VOC {self.voc} ({self.split})"
        elif self.coco:
            what = f"COCO {self.coco} + {self.ann}"
        elif self.webdataset:
            what = f"WebDataset {self.webdataset}"
        elif self.parquet:
            what = f"Parquet {self.parquet}" + "".join(f", {k} {v}" for k, v in self.columns().items() if v)
        else:
            what = f"manifest {self.manifest}"
        if self.limit:
            what += f", first {self.limit}"
        if self.sample:
            what += f", sample of {self.sample} (seed {self.sample_seed})"
        return what

    def absolute(self) -> InputSpec:
        """The same input with every local path made absolute (a URI stays as it is): what a run records, so that
        a rerun from any directory reads the same files."""
        local = {
            f.name: os.path.abspath(os.path.expanduser(v))
            for f in fields(self)
            if f.name in LOCATION_FIELDS and isinstance(v := getattr(self, f.name), str) and "://" not in v
        }
        return replace(self, **local)

    def sources(self) -> list[str]:
        return [x for x in (self.images, self.voc, self.coco, self.manifest, self.webdataset, self.parquet) if x]

    def columns(self) -> dict[str, str | None]:
        return {"image_column": self.image_column, "id_column": self.id_column}

    def validate(self) -> None:
        if len(self.sources()) != 1:
            raise ValueError(
                "give exactly one input: --images DIR, --voc ROOT, --coco IMAGES --ann JSON, --manifest FILE, "
                "--webdataset TARS or --parquet FILES"
            )
        if (self.image_column or self.id_column) and not self.parquet:
            raise ValueError("--image-column and --id-column go with --parquet")
        if self.coco and not self.ann:
            raise ValueError("--coco needs --ann INSTANCES_JSON")
        if self.limit and self.sample:
            raise ValueError("give --limit or --sample, not both")
        for name in LOCATION_FIELDS:
            if url_credentials(getattr(self, name, None)):
                raise ValueError(
                    f"--{name}: the URL holds a user name or password, which would be stored in the run folder; "
                    "give credentials through the standard variables or profiles instead"
                )

    def check(self) -> None:
        """Valid, and the local paths it names exist: before a run folder is made for it."""
        self.validate()
        for flag, path in (
            ("--images", self.images),
            ("--voc", self.voc),
            ("--coco", self.coco),
            ("--ann", self.ann),
            ("--manifest", self.manifest),
            ("--webdataset", self.webdataset),
            ("--parquet", self.parquet),
        ):
            if path and "://" not in path and "{" not in path and not Path(path).exists():
                raise FileNotFoundError(f"{flag}: no such file or folder: {path}")


# The names of the input fields, in the order the CLI lists them.
INPUT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(InputSpec))


@dataclass(frozen=True)
class RunInputs(InputSpec):
    """What a run reads besides its config: the images (ingest) and the ground truth (evaluate)."""

    gt: str | None = None
    protocol: str | None = None

    def given(self) -> bool:
        return bool(self.sources())

    def spec(self) -> InputSpec:
        """Where the images come from, alone."""
        return InputSpec(**{name: getattr(self, name) for name in INPUT_FIELDS})
