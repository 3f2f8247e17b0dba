import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from PIL import Image

from helpers import COCO_SUBSET, VOC_SUBSET, need
from helpers.badinputs import make_corpus
from mlcseg_ray.core.inputs import InputSpec
from mlcseg_ray.core.run_dir import RunDir
from mlcseg_ray.formats.images import BadImage, load_rgb, to_rgb
from mlcseg_ray.formats.manifest import read_manifest
from mlcseg_ray.library.listing import ProbeSettings, build_manifest, list_inputs

MAX_PIXELS = 178_956_970


def manifest_of(spec, folder, shard_size, **settings):
    run = RunDir(folder)
    build_manifest(spec, run, shard_size, ProbeSettings(MAX_PIXELS, 8, **settings))
    return read_manifest(run.manifest)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return root, make_corpus(root)


def test_manifest_accounts_for_every_file(corpus, tmp_path):
    root, expected = corpus
    table = manifest_of(InputSpec(images=str(root)), tmp_path, shard_size=4)
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert set(rows) == set(expected)
    for image_id, want in expected.items():
        r = rows[image_id]
        if want == "ok" or image_id == "truncated":  # truncation shows only when the pixels are decoded
            assert r["status"] == "ok", (image_id, r["error"])
        else:
            assert r["status"] == "error" and want in r["error"], (image_id, r["error"])
    # shards numbered from the sorted manifest
    assert [r["image_id"] for r in table.to_pylist()] == sorted(rows)
    assert table.column("shard").to_pylist() == [i // 4 for i in range(len(rows))]


def test_each_case_decodes_or_says_why(corpus):
    root, expected = corpus
    for image_id, want in expected.items():
        path = next(p for p in root.rglob("*") if p.relative_to(root).with_suffix("").as_posix() == image_id)
        if want == "ok":
            a = load_rgb(str(path), MAX_PIXELS, min_side=8)
            assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
        else:
            with pytest.raises(BadImage, match=want):
                load_rgb(str(path), MAX_PIXELS, min_side=8)


def test_exif_rotation_applied(corpus):
    root, _ = corpus
    a = load_rgb(str(root / "exif_rotated.jpg"), MAX_PIXELS)
    assert a.shape[:2] == (64, 32)  # stored 64x32 landscape, orientation 6 -> portrait


def test_sixteen_bit_scaled_not_clipped(corpus):
    root, _ = corpus
    a = load_rgb(str(root / "png16.png"), MAX_PIXELS)
    assert a.min() == 0 and a.max() == 255 and len(np.unique(a[..., 0])) > 100


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert (np.asarray(to_rgb(img)) == 255).all()


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    p = tmp_path / "secret.jpg"
    Image.new("RGB", (32, 32)).save(p)
    p.chmod(0)
    with pytest.raises(BadImage, match="permission denied"):
        load_rgb(str(p), MAX_PIXELS)


def test_directory_in_a_manifest(tmp_path):
    with pytest.raises(BadImage, match="is a directory"):
        load_rgb(str(tmp_path), MAX_PIXELS)


def test_same_name_in_two_folders_and_extension_clash(tmp_path):
    for rel in ("a/x.jpg", "b/x.jpg", "c/y.jpg", "c/y.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.new("RGB", (16, 16)).save(tmp_path / rel)
    ids = sorted(r["image_id"] for r in list_inputs(InputSpec(images=str(tmp_path))))
    assert ids == ["a/x", "b/x", "c/y_jpg", "c/y_png"]


def test_voc_root_and_split():
    voc = need(VOC_SUBSET)
    rows = list_inputs(InputSpec(voc=str(voc), split="val"))
    assert len(rows) == 59 and all(r["uri"].endswith(".jpg") for r in rows)
    with pytest.raises(FileNotFoundError, match="train.txt"):
        list_inputs(InputSpec(voc=str(voc), split="train"))


def test_coco_json_and_manifest_csv(tmp_path):
    coco = need(COCO_SUBSET)
    files = sorted(p.name for p in (coco / "images").iterdir())[:3]
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [{"id": 100 + i, "file_name": f} for i, f in enumerate(files)]}))
    rows = list_inputs(InputSpec(coco=str(coco / "images"), ann=str(ann)))
    assert [r["coco_id"] for r in rows] == [100, 101, 102]
    csv = tmp_path / "m.csv"
    pacsv.write_csv(pa.table({"uri": [str(coco / "images" / f) for f in files]}), csv)
    rows = list_inputs(InputSpec(manifest=str(csv)))
    assert [r["image_id"] for r in rows] == [f.rsplit(".", 1)[0] for f in files]
    table = manifest_of(InputSpec(manifest=str(csv)), tmp_path / "run", 64)
    assert table.column("status").to_pylist() == ["ok"] * 3 and min(table.column("width").to_pylist()) > 100


def test_input_errors():
    with pytest.raises(ValueError, match="exactly one input"):
        list_inputs(InputSpec())
    with pytest.raises(FileNotFoundError, match="no such folder"):
        list_inputs(InputSpec(images="/no/such/dir"))


def test_ingest_reads_an_images_header_not_its_pixels(tmp_path, monkeypatch):
    """Issue 42: with ``verify_images=stat`` ingest reads an image's first 64 KB (its header), never the whole file:
    extraction's read is then the only one of its pixels. An image whose header is longer (a 200 KB ICC profile)
    is read whole; ``verify_images=hash`` reads and hashes every file."""
    from mlcseg_ray.formats import images as images_module
    from mlcseg_ray.library import listing as listing_module

    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), np.uint8)).save(folder / "big.jpg", quality=95)
    pixels = rng.integers(0, 255, (600, 800, 3), np.uint8)
    Image.fromarray(pixels).save(folder / "icc.jpg", quality=95, icc_profile=bytes(200_000))
    reads = []
    for module in (listing_module, images_module):

        def spy(uri, first=None, real=module.read_bytes):
            reads.append((uri.rsplit("/", 1)[-1], first))
            return real(uri, first)

        monkeypatch.setattr(module, "read_bytes", spy)

    rows = manifest_of(InputSpec(images=str(folder)), tmp_path / "stat", 8).to_pylist()
    assert [(r["image_id"], r["width"], r["height"], r["status"]) for r in rows] == [
        ("big", 1600, 1200, "ok"),
        ("icc", 800, 600, "ok"),
    ]
    assert {r["content_hash"] for r in rows} == {None} and rows[0]["bytes"] == (folder / "big.jpg").stat().st_size
    assert sorted(reads, key=str) == [("big.jpg", 65536), ("icc.jpg", 65536), ("icc.jpg", None)]

    reads.clear()
    rows = manifest_of(InputSpec(images=str(folder)), tmp_path / "hash", 8, rehash=True).to_pylist()
    assert sorted(reads, key=str) == [("big.jpg", None), ("icc.jpg", None)] and all(r["content_hash"] for r in rows)
