"""The options the commands share, declared once; the input options go to every command that takes an input."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import typer

from ..core.inputs import INPUT_FIELDS, InputSpec

# Shared options ------------------------------------------------------------------------------------------------
Split = typer.Option("val", "--split", help="VOC split name")
# The input options, declared once: every command that takes an input gets them all (:func:`takes_inputs`).
INPUT_OPTIONS: dict[str, tuple[Any, Any]] = {
    "images": (
        str | None,
        typer.Option(None, "--images", help="folder or bucket prefix (s3://, gs://) of images, recursive"),
    ),
    "voc": (
        str | None,
        typer.Option(None, "--voc", help="VOC root (VOCdevkit/VOC2012 layout); evaluated at the end"),
    ),
    "split": (str, Split),
    "coco": (str | None, typer.Option(None, "--coco", help="COCO image folder (with --ann)")),
    "ann": (str | None, typer.Option(None, "--ann", help="COCO instances JSON")),
    "manifest": (str | None, typer.Option(None, "--manifest", help="CSV/Parquet with a 'uri' column")),
    "webdataset": (
        str | None,
        typer.Option(
            None,
            "--webdataset",
            help="WebDataset tar shards (.tar, .tar.gz): a folder or prefix, a brace pattern "
            "(s3://b/sa_{000000..000999}.tar), a .txt list, or one tar; read where they lie",
        ),
    ),
    "parquet": (
        str | None,
        typer.Option(
            None,
            "--parquet",
            help="Parquet files with an image column (bytes, or the Hugging Face {bytes, path} struct): a folder "
            "or prefix, a brace pattern, a .txt list, or one file",
        ),
    ),
    "image_column": (
        str | None,
        typer.Option(None, "--image-column", help="--parquet: the image column (default: found from the schema)"),
    ),
    "id_column": (
        str | None,
        typer.Option(None, "--id-column", help="--parquet: the id column (default: image_id, id, __key__ or key)"),
    ),
    "limit": (int | None, typer.Option(None, "--limit", min=1, help="only the first N images (in image-id order)")),
    "sample": (
        int | None,
        typer.Option(None, "--sample", min=1, help="a random sample of N images (see --sample-seed)"),
    ),
    "sample_seed": (int, typer.Option(0, "--sample-seed", help="seed of --sample")),
}
assert tuple(INPUT_OPTIONS) == INPUT_FIELDS, "every input field has its option"
Out = typer.Option(..., "--out", help="run folder")
Backbone = typer.Option(None, "--backbone", help="timm name (default vit_small_patch8_224.dino) or random-vit-s8")
Weights = typer.Option(None, "--weights", help="checkpoint: DINO/DINOv2 .pth, HF or timm safetensors")
Freeze = typer.Option(
    False, "--freeze", help="refit=false: keep this run's fit; added images cost their own shards, nothing else moves"
)
Fit = typer.Option(
    None,
    "--fit",
    metavar="RUN",
    help="label with the fit of this run folder (its levels and classes: the same class ids, nothing refitted)",
)
Address = typer.Option(None, "--address", help="Ray cluster address ('auto' for a local ray start --head)")
ConfigFile = typer.Option(None, "--config", help="YAML config file")
Json = typer.Option(False, "--json", help="print the result as JSON on stdout")
Overrides = typer.Argument(None, help="key=value config overrides")


def takes_inputs(command: Callable[..., None]) -> Callable[..., None]:
    """Gives ``command`` the input options of :data:`INPUT_OPTIONS`; it receives them as one ``inputs:
    InputSpec``."""
    sig = inspect.signature(command, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "inputs"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
        for name, (kind, option) in INPUT_OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        spec = InputSpec(**{name: kwargs.pop(name) for name in INPUT_FIELDS})
        command(inputs=spec, **kwargs)

    wrapper.__signature__ = sig.replace(
        parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
    )
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    del wrapper.__wrapped__  # typer reads the signature above, not the command's
    return wrapper
