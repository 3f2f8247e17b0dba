"""Issue 41 item 1: the COCO file's ``file_name`` is the path below the image root, as detectron2's
``register_coco_instances(name, {}, json, image_root)`` and Datumaro read it; the root itself is in ``info``."""

import json

import pyarrow as pa
import pyarrow.csv as pacsv
from hypothesis import given
from hypothesis import strategies as st

from mlcseg_ray.core.inputs import InputSpec
from mlcseg_ray.core.storage import common_folder, path_under
from mlcseg_ray.library.listing import image_root, list_images

segment = st.text(st.characters(exclude_characters="/\x00", exclude_categories=("Cs",)), min_size=1, max_size=12)
segment = segment.filter(lambda s: s not in (".", ".."))
roots = st.sampled_from(["/data/photos", "/data/photos/", "s3://bucket/set", "s3://bucket/set/", "gs://b/p"])


@given(root=roots, below=st.lists(segment, min_size=1, max_size=4))
def test_a_location_below_the_root_is_named_by_its_path_below_it(root, below):
    name = "/".join(below)
    assert path_under(root, f"{root.rstrip('/')}/{name}") == name
    assert path_under(root, f"{root.rstrip('/')}2/{name}") is None  # a sibling that shares the root's text
    assert path_under(root, f"{root.rstrip('/')}/../{name}") is None
    assert path_under(root, root) is None


def test_the_common_folder_of_locations():
    assert common_folder(["/d/a/x.jpg", "/d/a/b/y.jpg", "/d/a/c/z.png"]) == "/d/a"
    assert common_folder(["/d/a/x.jpg"]) == "/d/a"
    assert common_folder(["s3://b/set/x.jpg", "s3://b/set/more/y.jpg"]) == "s3://b/set"
    assert common_folder(["s3://b/x.jpg", "s3://c/y.jpg"]) is None  # two buckets
    assert common_folder(["/d/x.jpg", "s3://b/y.jpg"]) is None  # local files beside objects


def _names(spec: InputSpec) -> tuple[str | None, list[str]]:
    listing = list_images(spec).table
    root = image_root(spec, listing)
    return root, [path_under(root, u) for u in listing.column("uri").to_pylist()]


def test_each_input_names_its_images_below_its_root(tmp_path):
    photos = tmp_path / "photos"
    for name in ("a.jpg", "sub/b.jpg"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"not decoded here")
    # a folder: the path under the folder
    assert _names(InputSpec(images=str(photos))) == (str(photos), ["a.jpg", "sub/b.jpg"])
    # a COCO input keeps its own file_name
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 3, "file_name": "sub/b.jpg"}, {"id": 1, "file_name": "a.jpg"}]}))
    assert _names(InputSpec(coco=str(photos), ann=str(ann))) == (str(photos), ["a.jpg", "sub/b.jpg"])
    # a manifest: the path under its images' common folder, wherever the manifest is
    manifest = tmp_path / "lists" / "m.csv"
    manifest.parent.mkdir()
    pacsv.write_csv(pa.table({"uri": [str(photos / "sub/b.jpg"), str(photos / "a.jpg")]}), manifest)
    assert _names(InputSpec(manifest=str(manifest))) == (str(photos), ["a.jpg", "sub/b.jpg"])
