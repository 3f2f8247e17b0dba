"""The commands on a finished run folder: what failed, whether its files are intact, how good its masks are, its
pseudo-labels as datasets, which level and rule work best."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import typer

from ..core.config import Config
from ..core.progress import console, shown
from ..core.progress import out as stdout
from ..core.run_dir import printable
from .errors import error, one_line_errors
from .options import Address, Json, Split


def errors(run_dir: str = typer.Argument(..., metavar="RUN", help="run folder"), as_json: bool = Json) -> None:
    """What each stage did, every image that failed and why, and the files ingest skipped."""
    from rich.table import Table

    from ..core.run_dir import RunDir

    run = RunDir(run_dir)
    if not run.run_record.exists():
        error(f"{run_dir} is not a run folder (no run.json)")
        raise typer.Exit(2)
    rec = run.read_record()
    images = run.status_summary().images
    problems = run.read_status(problems_only=True)  # the failed and the flagged: what this command lists
    failed = [r for r in problems if r["status"] != "ok"]
    flagged = [r for r in problems if r["flag"]]
    flag_counts = dict(sorted(Counter(r["flag"] for r in flagged).items()))
    skipped = rec.get("skipped_files", {})
    stages = {
        name: {k: v for k, v in s.items() if k in ("images", "errors", "seconds", "shards_done", "shards_skipped")}
        for name, s in rec.get("stages", {}).items()
    }
    if as_json:
        stdout.print_json(
            json.dumps(
                {
                    "run": str(run.root),
                    "images": images,
                    "stages": stages,
                    "failed": failed,
                    "flagged": flagged,
                    "flag_counts": flag_counts,
                    "skipped_files": skipped,
                }
            )
        )
        return
    t = Table(title=f"stages of {printable(str(run.root))}")
    for col in ("stage", "images", "errors", "seconds"):
        t.add_column(col)
    for name, s in stages.items():
        t.add_row(name, str(s.get("images", "-")), str(s.get("errors", 0)), str(s.get("seconds", "-")))
    stdout.print(t)
    stdout.print(
        f"{images} images: {images - len(failed)} ok, {len(failed)} failed, {len(flagged)} flagged"
        + (f" ({', '.join(f'{n} {f}' for f, n in flag_counts.items())})" if flagged else ""),
        highlight=False,
    )
    if failed:
        t = Table(title="failed images")
        for col in ("image", "stage", "reason"):
            t.add_column(col)
        for r in failed:
            t.add_row(printable(r["image_id"]), r["stage"] or "-", printable(r["error"] or ""))
        stdout.print(t)
    if skipped.get("count"):
        stdout.print(
            f"ingest skipped {skipped['count']} file(s) that are not images by extension "
            f"({printable(', '.join(f'{k}: {v}' for k, v in skipped.get('by_extension', {}).items()))}): "
            f"{printable(', '.join(skipped.get('files', [])[:20]))}",
            highlight=False,
            soft_wrap=True,
        )
    for damaged in skipped.get("damaged", []):  # a tar or Parquet file read only in part
        stdout.print(f"ingest could not read to its end: {printable(damaged)}", highlight=False, soft_wrap=True)


def verify(run_dir: str = typer.Argument(..., metavar="RUN", help="run folder"), as_json: bool = Json) -> None:
    """Check every output the run folder records (present, same size and checksum, Parquet readable); changes
    nothing. Exit 8 when something is damaged: a rerun of the same command recomputes just that."""
    from ..core.integrity import verify_run
    from ..core.run_dir import RunDir

    run = RunDir(run_dir)
    if not run.run_record.exists():
        error(f"{run_dir} is not a run folder (no run.json)")
        raise typer.Exit(2)
    report = verify_run(run)
    damaged = {stage: problems for stage, problems in report.items() if problems}
    if as_json:
        stdout.print_json(json.dumps({"run": str(run.root), "stages": report, "damaged": bool(damaged)}))
    else:
        for stage, problems in report.items():
            stdout.print(f"{stage}: {'ok' if not problems else f'{len(problems)} problem(s)'}", highlight=False)
            for p in problems[:20]:
                stdout.print(f"  {printable(p)}", highlight=False, soft_wrap=True)
            if len(problems) > 20:
                stdout.print(f"  ... and {len(problems) - 20} more", highlight=False)
    if damaged:
        console.print(
            f"[yellow]damaged: rerun `mlcseg run --out {shown(run.root)}` to recompute what is listed[/]",
            soft_wrap=True,
        )
        raise typer.Exit(8)


def eval_cmd(
    pred: str = typer.Argument(..., help="run folder, or a folder of predicted masks"),
    gt: Path = typer.Argument(..., help="ground truth: VOC root, COCO mask folder or instances JSON, mask folder"),
    protocol: str = typer.Option("voc21", "--protocol", help="voc21, coco81, cocostuff27, binary, folder"),
    split: str = Split,
    ignore: int | None = typer.Option(
        None, "--ignore", help="a label value to leave out (folder, binary); VOC and COCO always ignore 255"
    ),
    matching: str = typer.Option("hungarian", "--matching", help="hungarian or majority (not for binary)"),
    out: str | None = typer.Option(
        None,
        "--out",
        help="where metrics.json and confusion.png go (default: the run folder, or PRED_eval/ beside a plain folder)",
    ),
    address: str | None = Address,
    as_json: bool = Json,
) -> None:
    """Dataset-wide metrics of predictions against ground truth.

    Predictions and ground truth are matched by file name without extension (PRED/2007_000129.png with
    GT/SegmentationClass/2007_000129.png); a ground-truth image without a prediction counts as all background and is
    listed. Label maps are single-channel PNGs (palette or grey). For --protocol binary, masks may be PNG (0/1, 0/255,
    palette, 1-bit), JPEG (thresholded at 128: lossy edges), BMP, TIFF or GIF; foreground is > 0 and nothing is
    ignored unless --ignore says so; foreground is matched to foreground (no Hungarian matching). Other protocols
    match predicted ids to classes with the Hungarian algorithm over the whole split.
    """
    from ..backends import make_backend
    from ..backends.ray_runtime import check_address
    from ..library.evaluation import evaluate_folder
    from .console import print_metrics

    with one_line_errors():
        map_fn = None
        if address:  # the evaluation's chunks as tasks on that cluster
            check_address(address)
            map_fn = make_backend("ray", address).map
        metrics = evaluate_folder(
            pred, gt, protocol, split=split, ignore=ignore, matching=matching, out=out, map_fn=map_fn, remember=True
        )
    if as_json:
        stdout.print_json(json.dumps({k: v for k, v in metrics.items() if k != "confusion"}))
    else:
        print_metrics(metrics)


def export(
    run_dir: str = typer.Argument(..., metavar="RUN", help="run folder (labelled)"),
    fmt: str = typer.Option(..., "--format", help="coco, voc, yolo-seg or hf"),
    out: str = typer.Option(..., "--out", help="where the dataset goes: a folder or a bucket prefix"),
    copy_images: bool = typer.Option(
        False, "--copy-images", help="copy the images in (coco: images/, voc: JPEGImages/); yolo-seg always does"
    ),
    min_confidence: float | None = typer.Option(None, "--min-confidence", help="only images at least this sure"),
    max_confidence: float | None = typer.Option(
        None, "--max-confidence", help="only images at most this sure (the doubtful ones, for review)"
    ),
    as_json: bool = Json,
) -> None:
    """The run's pseudo-labels as a dataset the next tool loads: coco (detectron2, mmdetection, Datumaro, FiftyOne),
    voc (CVAT's segmentation-mask import, Datumaro, mmsegmentation), yolo-seg (Ultralytics), hf (Parquet for the
    Hugging Face Hub and `datasets`)."""
    from ..core.run_dir import RunDir
    from ..library.exports import export_run

    with one_line_errors(out):
        run = RunDir(run_dir)
        if not run.run_record.exists():
            raise FileNotFoundError(f"{run_dir} is not a run folder (no run.json)")
        done = export_run(run, fmt, out, copy_images, min_confidence, max_confidence)
    if as_json:
        stdout.print_json(json.dumps(done.__dict__))
    else:
        stdout.print(
            f"{done.format}: {done.images} images, {done.annotations} regions, {done.classes} classes in "
            f"{printable(done.out)}",
            highlight=False,
            soft_wrap=True,
        )


def ablate(
    run_dir: str = typer.Argument(..., metavar="RUN", help="run folder (clustered)"),
    gt: Path = typer.Argument(..., help="ground truth: VOC root, COCO mask folder or instances JSON, mask folder"),
    protocol: str = typer.Option(
        "voc21",
        "--protocol",
        help="voc21, coco81, cocostuff27, binary, folder: how to read GT; foreground is every class > 0",
    ),
    split: str = Split,
    ignore: int | None = typer.Option(None, "--ignore", help="a label value to leave out (folder, binary)"),
    refine_top: int = typer.Option(2, "--refine-top", min=0, help="refine this many best rules with the run's CRF"),
    as_json: bool = Json,
) -> None:
    """Foreground IoU of every clustering level and combine rule on a labelled subset, from one cluster run.

    Nothing is extracted or clustered again: the run's pseudo-masks hold the three level masks and each level's
    weight per image. Each rule is scored at patch resolution (upsampled as the refine stage does), and the best
    --refine-top rules also after the run's CRF. Writes RUN/ablation.json and adds a section to RUN/report.html.
    Pick the winner for your data with combine=RULE (e.g. mlcseg cluster --out RUN combine=image).
    """
    from ..core.progress import progress_bar
    from ..core.run_dir import RunDir
    from ..formats.datasets import load_ground_truth
    from ..library.clustering import read_pseudo
    from ..library.report_page import write_report
    from ..models.backbones import untrained_warning
    from ..tools.ablate import ablate as run_ablation
    from .console import print_ablation

    with one_line_errors():
        run = RunDir(run_dir)
        if not run.config.exists():
            raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
        cfg = Config.load(run.config)
        truth = load_ground_truth(gt, protocol, split=split, ignore=ignore)
        warning = untrained_warning(run.read_record().get("backbone", {}))
        if warning:
            console.print(f"[bold red]{warning}[/]", highlight=False, soft_wrap=True)
        clustered = read_pseudo(run, ["image_id"])
        ids = set(clustered.column(0).to_pylist()) if clustered.num_rows else set()
        if not ids:
            raise ValueError(
                f"{run_dir} has no clustered image (every image failed, or cluster has not run): "
                f"`mlcseg errors {run_dir}` says why"
            )
        n = len(ids & set(truth.image_ids))
        with (
            run.lock("mlcseg ablate"),
            progress_bar("ablate", n * (1 + (refine_top if cfg.crf else 0)), "images") as advance,
        ):
            result = run_ablation(run, truth, cfg, refine_top, on_image=advance)
            if run.report.exists():
                write_report(run, cfg)
    if as_json:
        stdout.print_json(json.dumps(result))
        return
    print_ablation(result, protocol)
