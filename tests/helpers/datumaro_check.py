"""Run by Datumaro's own interpreter (``.venv-datumaro``: it pins older Pillow and pyarrow than the package): import
a dataset as CVAT's converter does and say what it found, as one JSON line.

    python datumaro_check.py coco DIR             # items, and mask annotations
    python datumaro_check.py voc DIR MASKS_DIR    # items, and pixels whose class differs from MASKS_DIR/<id>.png
"""

import json
import sys
from pathlib import Path

import numpy as np
from datumaro.components.annotation import AnnotationType
from datumaro.components.dataset import Dataset
from PIL import Image


def main() -> None:
    kind, root = sys.argv[1], sys.argv[2]
    dataset = Dataset.import_from(root, "coco_instances" if kind == "coco" else "voc_segmentation")
    out = {"items": len(dataset), "masks": 0, "differing_pixels": 0, "compared_pixels": 0}
    for item in dataset:
        masks = [a for a in item.annotations if a.type == AnnotationType.mask]
        out["masks"] += len(masks)
        if kind == "voc":  # every instance's class, painted back into one class map
            ours = np.asarray(Image.open(Path(sys.argv[3]) / f"{item.id}.png"))
            theirs = np.zeros_like(ours)
            for m in masks:
                theirs[m.image.astype(bool)] = m.label
            out["differing_pixels"] += int((theirs != ours).sum())
            out["compared_pixels"] += int(ours.size)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
