"""Issue 38: inputs are untrusted. Whatever a manifest's ids, a COCO file's ``file_name``s or a folder's file names
say, nothing is written outside the run folder, no command crashes, and names reach the terminal escaped.

Every check lists the file system before and after (it does not trust the code's own paths)."""

import json
import os
import pickle
import subprocess
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import MLCSEG, TINY, TINY_CONFIG, VOC_SUBSET, mlcseg, need
from mlcseg_ray.core import storage
from mlcseg_ray.core.config import Config
from mlcseg_ray.core.inputs import InputSpec, RunInputs
from mlcseg_ray.core.run_dir import RunDir, id_problem
from mlcseg_ray.core.storage import atomic_write_many
from mlcseg_ray.formats.masks import png_bytes
from mlcseg_ray.library.listing import ProbeSettings, build_manifest
from mlcseg_ray.library.listing import list_images as listing_of
from mlcseg_ray.pipeline import Pipeline


def tree(root):
    """Every path below ``root`` (files, folders and links, links not followed)."""
    found = set()
    for folder, dirs, files in os.walk(root):
        found.update(os.path.join(folder, n) for n in dirs + files)
    return found


def written_outside(before, after, run):
    """What appeared outside ``run`` (the run folder itself and the folders above it, made for it, aside)."""
    inside, made_for_it = str(run) + os.sep, {str(run), *map(str, run.parents)}
    return sorted(p for p in after - before if not p.startswith(inside) and p not in made_for_it)


def photo(path, w=40, h=32, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


# --- the property: any name, no write outside -------------------------------------------------------------------
NASTY = [
    "../../../../outside/esc",
    "sub/../../../../../outside/esc",
    "/tmp/outside-abs",
    "..",
    ".",
    "",
    "a//b",
    "a\\..\\..\\b",
    "a\x00b",
    "[/bad]",
    "[bold]x[/]",
    "\x1b[2Jclear",
    "-rf",
    "--out",
    "x" * 300,
    "é/ü/名前",
    "ok/nested",
]
ids = st.one_of(st.sampled_from(NASTY), st.text(min_size=0, max_size=40))
# names a file can have on this file system (a segment: no "/", no NUL, not "." or "..", at most 255 bytes)
segments = st.text(st.characters(exclude_characters="/\x00", exclude_categories=("Cs",)), min_size=1, max_size=60)
segments = segments.filter(lambda s: s not in (".", "..") and not s.startswith(".") and len(s.encode()) <= 200)
file_names = st.lists(segments, min_size=1, max_size=3).map("/".join)


def _write_masks_as_a_run_would(run, rows):
    """What refine and label write for every usable image, through the run's own path and write functions."""
    with storage.confined_to(run.root):
        for r in rows:
            if r["status"] == "ok":
                mask = png_bytes(np.zeros((4, 4), np.uint8))
                atomic_write_many([(run.binary_mask(r["image_id"]), mask), (run.class_mask(r["image_id"]), mask)])


def _check_listing(sandbox, spec):
    run = RunDir(sandbox / "deep" / "er" / "run")
    before = tree(sandbox)
    with run.lock("test"):
        build_manifest(spec, run, 64, ProbeSettings(10**8, 8))
        rows = pq.read_table(run.manifest).to_pylist()
        _write_masks_as_a_run_would(run, rows)
    assert written_outside(before, tree(sandbox), run.root) == []
    for r in rows:  # an id that could not name a file is an error row that says why; the others have their masks
        if id_problem(r["image_id"]):
            assert r["status"] == "error" and r["error"]
        elif r["status"] == "ok":
            assert (run.masks / f"{r['image_id']}.png").is_file()
    return rows


PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(names=st.lists(ids, min_size=1, max_size=6, unique=True))
def test_no_manifest_id_writes_outside_the_run_folder(tmp_path_factory, names):
    sandbox = tmp_path_factory.mktemp("manifest")
    photo(sandbox / "img.png")
    # Parquet carries any string (NUL and control characters included), as a manifest from elsewhere may
    pq.write_table(pa.table({"uri": [str(sandbox / "img.png")] * len(names), "image_id": names}), sandbox / "m.parquet")
    rows = _check_listing(sandbox, InputSpec(manifest=str(sandbox / "m.parquet")))
    assert sorted(r["image_id"] for r in rows if not id_problem(r["image_id"])) == sorted(
        n for n in names if not id_problem(n)
    )


@PROPERTY
@given(names=st.lists(ids, min_size=1, max_size=6, unique=True))
def test_no_coco_file_name_reads_or_writes_outside_its_roots(tmp_path_factory, names):
    sandbox = tmp_path_factory.mktemp("coco")
    (sandbox / "images").mkdir()
    photo(sandbox / "outside.png")  # what an escaping file_name would reach
    ann = {"images": [{"id": k, "file_name": n + ".png"} for k, n in enumerate(names)]}
    (sandbox / "ann.json").write_text(json.dumps(ann))
    for n in names:
        if not id_problem(n):
            (sandbox / "images" / f"{n}.png").parent.mkdir(parents=True, exist_ok=True)
            photo(sandbox / "images" / f"{n}.png")
    rows = _check_listing(sandbox, InputSpec(coco=str(sandbox / "images"), ann=str(sandbox / "ann.json")))
    for r in rows:  # nothing outside the image root was read: an escaping name is an error row, never probed
        if id_problem(r["image_id"]):
            assert r["bytes"] is None and "not a path under the image root" in r["error"], r


@PROPERTY
@given(names=st.lists(file_names, min_size=1, max_size=5, unique=True))
def test_no_folder_file_name_writes_outside_the_run_folder(tmp_path_factory, names):
    sandbox = tmp_path_factory.mktemp("folder")
    images = sandbox / "images"
    for n in names:
        path = images / f"{n}.png"
        if any(path == images / f"{m}.png" or str(path).startswith(str(images / m) + os.sep) for m in names if m != n):
            continue  # a name that is another's folder
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(path)
        except (NotADirectoryError, FileExistsError, OSError):
            continue
    os.symlink("loop", images / "loop")  # a link loop at the top: skipped and counted like any non-image file
    rows = _check_listing(sandbox, InputSpec(images=str(images)))
    assert "loop" not in {r["image_id"] for r in rows}


def test_id_rule():
    for bad in ("../x", "/abs", "a//b", "a/./b", "", "a\x1bb", "a\\b", "a\udcffb", "x" * 241):
        assert id_problem(bad), bad
    for good in ("2007_000129", "a/b", "-lead", "[/bad]", "名前/ü", "a b", "x" * 240):
        assert id_problem(good) is None, good


# --- the exact inputs of the issue, through the command a user runs ---------------------------------------------
EXPLOITS = {  # manifest image_id -> what it tried (issue 38, item 1)
    "victim": "an absolute path, onto a file that exists",
    "../../../../outside/esc": "a relative climb",
    "sub/../../../../../outside/esc2": "a climb behind a folder",
}


@pytest.fixture(scope="module")
def hostile_run(cluster, tmp_path_factory):
    """One ``mlcseg run --manifest`` from the sandbox's directory, with the issue's ids and names, joined to the
    session's Ray head (whose workers run elsewhere: nothing may rest on the driver's directory)."""
    voc = need(VOC_SUBSET) / "JPEGImages"
    sandbox = tmp_path_factory.mktemp("hostile")
    (sandbox / "outside").mkdir()
    victim = sandbox / "outside" / "victim.png"
    victim.write_bytes(b"precious")
    photos = sorted(voc.iterdir())[:6]
    images = sandbox / "photos"
    images.mkdir()
    names = ["img0.jpg", "img1.jpg", "img2.jpg", "[/bad].jpg", "\x1b[2Jclear.jpg", "-lead.jpg"]
    for src, name in zip(photos, names, strict=True):
        (images / name).parent.mkdir(exist_ok=True)  # "[/bad].jpg" is "bad].jpg" in a folder "["
        (images / name).write_bytes(src.read_bytes())
    ids = [str(sandbox / "outside" / "victim"), *list(EXPLOITS)[1:], "[/bad]", "\x1b[2Jclear", "-lead"]
    pacsv.write_csv(pa.table({"uri": [f"photos/{n}" for n in names], "image_id": ids}), sandbox / "m.csv")
    run = sandbox / "a" / "b" / "run"
    before = tree(sandbox)
    # relative input paths, from the sandbox: the rerun below comes from another directory
    res = subprocess.run(
        [*MLCSEG, "run", "--manifest", "m.csv", "--out", "a/b/run", *TINY, "--address", cluster.address],
        cwd=sandbox,
        capture_output=True,
        text=True,
        timeout=600,
        env=cluster.env,
    )
    return sandbox, run, before, res, ids


@pytest.mark.slow
def test_a_manifest_id_never_writes_outside_the_run_folder(hostile_run):
    sandbox, run, before, res, ids = hostile_run
    assert res.returncode == 3, res.stderr[-3000:]  # the hostile ids are error rows; the others have masks
    assert written_outside(before, tree(sandbox), run) == []
    assert (sandbox / "outside" / "victim.png").read_bytes() == b"precious"
    status = {r["image_id"]: r for r in pq.read_table(run / "status.parquet").to_pylist()}
    for i in ids[:3]:
        assert status[i]["status"] == "error" and "image id" in status[i]["error"], status[i]
    assert status["-lead"]["status"] == "ok" and (run / "masks" / "-lead.png").is_file()
    assert status["[/bad]"]["status"] == "ok" and (run / "masks" / "[/bad].png").is_file()
    assert status["\\x1b[2Jclear"]["status"] == "error"  # a control character: kept as escapes, never a file name
    assert "\x1b[2J" not in res.stderr


@pytest.mark.slow
def test_errors_and_verify_show_every_name_escaped(hostile_run):
    sandbox, run, *_ = hostile_run
    errors = mlcseg("errors", run)
    assert errors.returncode == 0, errors.stderr
    assert "\x1b" not in errors.stdout and "\\x1b[2Jclear" in errors.stdout and "Traceback" not in errors.stderr
    listed = json.loads(mlcseg("errors", run, "--json").stdout)
    assert {r["image_id"] for r in listed["failed"]} >= {str(sandbox / "outside" / "victim"), "\\x1b[2Jclear"}
    verify = mlcseg("verify", run)
    assert verify.returncode == 0 and "Traceback" not in verify.stderr, verify.stderr


@pytest.mark.slow
def test_a_damaged_mask_of_a_markup_name_is_repaired_from_any_directory(hostile_run, cluster, tmp_path):
    sandbox, run, *_ = hostile_run
    (run / "masks" / "[/bad].png").unlink()
    verify = mlcseg("verify", run)
    assert verify.returncode == 8 and "[/bad].png" in verify.stdout, verify.stdout + verify.stderr
    # from another directory, without the input: the run recorded it as an absolute location
    res = subprocess.run(
        [*MLCSEG, "run", "--out", str(run), "--address", cluster.address],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=cluster.env,
    )
    assert res.returncode == 3, res.stderr[-3000:]
    assert "[/bad].png" in res.stderr and "MarkupError" not in res.stderr
    assert (run / "masks" / "[/bad].png").is_file()
    assert mlcseg("verify", run).returncode == 0


@pytest.mark.slow
def test_a_linked_output_folder_is_refused_not_written_through(hostile_run, tmp_path):
    sandbox, run, *_ = hostile_run
    elsewhere = tmp_path / "elsewhere"
    (run / "masks").rename(elsewhere)
    (run / "masks").symlink_to(elsewhere)
    (elsewhere / "-lead.png").unlink()  # damage that a rerun would repair by writing through the link
    before = tree(tmp_path)
    try:
        res = mlcseg("run", "--out", run)
        assert res.returncode == 2, res.stderr[-3000:]
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "is a link" in errors[0] and "Traceback" not in res.stderr
        assert tree(tmp_path) == before
    finally:
        (run / "masks").unlink()
        elsewhere.rename(run / "masks")


def test_coco_file_names_stay_under_the_image_root(tmp_path):
    """Item 2: absolute and climbing file_names are error rows; nothing is read or written outside the roots."""
    voc = sorted((need(VOC_SUBSET) / "JPEGImages").iterdir())
    sandbox = tmp_path / "s"
    (sandbox / "coco" / "images").mkdir(parents=True)
    (sandbox / "x").mkdir()
    (sandbox / "abs").mkdir()
    for i, name in enumerate(["ok1.jpg", "ok2.jpg", "ok3.jpg"]):
        (sandbox / "coco" / "images" / name).write_bytes(voc[i].read_bytes())
    (sandbox / "abs" / "cocoabs.jpg").write_bytes(voc[3].read_bytes())
    (sandbox / "x" / "escape.jpg").write_bytes(voc[4].read_bytes())
    (sandbox / "coco" / "x.jpg").write_bytes(voc[5].read_bytes())
    bad = [str(sandbox / "abs" / "cocoabs.jpg"), "../../x/escape.jpg", "../x.jpg", "a/../../x.jpg"]
    names = ["ok1.jpg", "ok2.jpg", "ok3.jpg", *bad]
    ann = sandbox / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": k + 1, "file_name": n} for k, n in enumerate(names)]}))
    run = sandbox / "coco" / "run"
    before = tree(sandbox)
    inputs = RunInputs(coco=str(sandbox / "coco" / "images"), ann=str(ann))
    cfg = Config(**TINY_CONFIG)
    Pipeline(run, cfg, backend="local", **asdict(inputs)).run(
        ["ingest", "extract", "cluster", "refine", "label"], print_summary=False
    )
    assert written_outside(before, tree(sandbox), run) == []
    status = {r["image_id"]: r for r in pq.read_table(run / "status.parquet").to_pylist()}
    for n in bad:
        row = status[n.rsplit(".", 1)[0]]
        assert row["status"] == "error" and "not a path under the image root" in row["error"], row
    assert all(status[f"ok{i}"]["status"] == "ok" for i in (1, 2, 3))
    coco = json.loads((run / "pseudo_labels.json").read_text())
    assert {im["mlcseg_image_id"] for im in coco["images"]} <= {"ok1", "ok2", "ok3"}


# --- one line and exit 2 before anything is made -----------------------------------------------------------------
class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.canary}",))


def test_a_bad_weights_file_is_one_line_and_creates_nothing(tmp_path):
    """Item 4: a pickle that is not a checkpoint (and would run a command if unpickled unsafely)."""
    _Boom.canary = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": _Boom()}))
    photo(tmp_path / "img.png", 64, 64)
    res = mlcseg("run", "--images", tmp_path, "--out", tmp_path / "run", "--weights", evil, *TINY)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(evil) in errors[0] and "not a checkpoint" in errors[0], res.stderr
    assert len(res.stderr.splitlines()) < 5 and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "pwned").exists()
    # a checkpoint of another architecture: the same, naming the cause
    import torch

    torch.save({"model": {"cls_token": torch.zeros(1, 1, 7), "blocks.0.x": torch.zeros(1)}}, tmp_path / "other.pth")
    res = mlcseg("run", "--images", tmp_path, "--out", tmp_path / "run", "--weights", tmp_path / "other.pth", *TINY)
    assert res.returncode == 2 and "does not fit this backbone" in res.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override,key",
    [("max_side=[", "max_side"), ("seed=!!python/object/apply:os.system ['touch pwned']", "seed")],
)
def test_a_yaml_error_in_an_override_names_its_key(tmp_path, override, key):
    """Item 6."""
    photo(tmp_path / "img.png", 64, 64)
    res = subprocess.run(
        [*MLCSEG, "run", "--images", str(tmp_path), "--out", "run", *TINY, override],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and f"override {key}" in errors[0], res.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "pwned").exists()


def test_credentials_in_a_url_are_refused_and_not_echoed(tmp_path):
    """Item 8."""
    photo(tmp_path / "img.png", 64, 64)
    res = mlcseg("run", "--images", tmp_path, "--out", tmp_path / "run", *TINY, "s3_endpoint_url=http://me:s3cr3t@h/")
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "user name or password" in errors[0], res.stderr
    assert "s3cr3t" not in res.stderr + res.stdout and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="user name or password"):
        InputSpec(images="s3://me:s3cr3t@bucket/photos").validate()


def test_a_link_loop_at_the_top_of_a_folder_is_skipped_and_counted(tmp_path):
    """Item 7: as one folder deeper, a loop of links is a file that is not an image (counted, listed), never a
    failed run."""
    photo(tmp_path / "img.png")
    os.symlink("loop", tmp_path / "loop")
    listing = listing_of(InputSpec(images=str(tmp_path)))
    assert listing.table.column("image_id").to_pylist() == ["img"]
    assert listing.skipped["count"] == 1 and listing.skipped["files"] == ["loop"]


def test_the_input_is_recorded_as_an_absolute_location(tmp_path, monkeypatch):
    """Item 10 (the rerun from another directory is in the hostile run above)."""
    monkeypatch.chdir(tmp_path)
    spec = RunInputs(images="photos", gt="gt").absolute()
    assert spec.images == str(tmp_path / "photos") and spec.gt == str(tmp_path / "gt")
    assert RunInputs(images="s3://b/photos").absolute().images == "s3://b/photos"


def test_the_write_check_follows_links_and_names(tmp_path):
    """The one check every write goes through (core/storage.check_write)."""
    run = tmp_path / "run"
    (run / "masks").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (run / "masks" / "sub").symlink_to(tmp_path / "elsewhere")
    with storage.confined_to(run):
        storage.atomic_write_bytes(run / "masks" / "a.png", b"x")
        for path in (run / "masks" / "sub" / "b.png", run / ".." / "c.png", tmp_path / "d.png"):
            with pytest.raises(storage.OutsideRunFolder):
                storage.atomic_write_bytes(path, b"x")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "elsewhere", "masks", "run", "sub"]
    assert storage.contains(storage.as_location("s3://b/run"), storage.as_location("s3://b/run/masks/a.png"))
    assert not storage.contains(storage.as_location("s3://b/run"), storage.as_location("s3://b/run/../x.png"))
    assert not storage.contains(storage.as_location("s3://b/run"), storage.as_location("s3://b/run2/x.png"))


def test_a_huge_image_is_decoded_at_the_size_extraction_needs(tmp_path):
    """Item 9 (its memory: bench/decode_memory.py, BENCHMARKS.md): above LARGE_PIXELS the decoder is asked for the
    resized size; below, the pixels are PIL's as before."""
    from mlcseg_ray.formats.images import LARGE_PIXELS, load_rgb, load_rgb_sized

    big = np.zeros((5000, 6000), np.uint16)  # 30 MP, 16-bit
    big[:, 3000:] = 65535
    Image.fromarray(big).save(tmp_path / "big16.png")
    assert 5000 * 6000 > LARGE_PIXELS
    rgb, size = load_rgb_sized(str(tmp_path / "big16.png"), 10**9, lambda w, h: (w // 20, h // 20))
    assert size == (6000, 5000) and rgb.shape == (250, 300, 3) and rgb.dtype == np.uint8
    assert rgb[:, :140].max() == 0 and rgb[:, 160:].min() == 255  # dark left, white right: the range scaled
    photo(tmp_path / "small.png", 64, 48)
    small, size = load_rgb_sized(str(tmp_path / "small.png"), 10**9, lambda w, h: (8, 6))
    assert size == (64, 48) and np.array_equal(small, load_rgb(str(tmp_path / "small.png"), 10**9))
