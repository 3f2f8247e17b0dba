"""The refiners on real edges: the torch refiner against pydensecrf's DenseCRF on the VOC and COCO photos' true
masks made into patch scores (tests/helpers/edges.py, as bench/refine_quality.py measures them), and its batching."""

import numpy as np
import pytest
import torch

from helpers import VOC_SUBSET, need
from mlcseg_ray.core.config import Config
from mlcseg_ray.formats.images import load_rgb
from mlcseg_ray.ops.crf import CrfParams, crf_inputs, local_crf_batch, refine_image, refine_masks

CRF = CrfParams.of(Config())


@pytest.fixture(scope="module")
def scored():
    """(rgb, soft score, geometry, true foreground, scored pixels) of 5 VOC and 5 COCO photos at the strong noise."""
    from helpers.edges import STRENGTHS, patch_score, photos, truth

    need(VOC_SUBSET)
    rng = np.random.default_rng(0)
    out = []
    for _, photo, mask in photos(5):
        fg, counted = truth(mask)
        out.append((load_rgb(str(photo), Config().max_pixels), *patch_score(fg, STRENGTHS["strong"], rng), fg, counted))
    return out


def iou(preds, items) -> float:
    inter = sum(int((p & fg & c).sum()) for p, (*_, fg, c) in zip(preds, items, strict=True))
    return inter / sum(int(((p | fg) & c).sum()) for p, (*_, fg, c) in zip(preds, items, strict=True))


def test_the_torch_refiner_is_the_default_and_as_good_as_densecrf(scored):
    """On the photos' true masks under strong noise both CRFs beat the bare upsampled score, the torch one within
    1.5 points of the full-resolution DenseCRF (bench/refine_quality.py: within 0.2 points over all 125 photos),
    and the two agree on at least 96% of the pixels."""
    assert CrfParams.of(Config()).backend == "torch" and CrfParams.of(Config(crf_iters=0)).enabled is False
    masks = {
        name: [refine_image(rgb, s, g, 8, CrfParams.of(Config(**kw))) for rgb, s, g, *_ in scored]
        for name, kw in {
            "bilinear": {"crf": False},
            "densecrf": {"crf_backend": "densecrf", "crf_max_side": 0},
            "torch": {},
        }.items()
    }
    ious = {name: iou(m, scored) for name, m in masks.items()}
    assert ious["densecrf"] > ious["bilinear"] + 0.01 and ious["torch"] > ious["bilinear"] + 0.01, ious
    assert ious["torch"] > ious["densecrf"] - 0.015, ious
    agree = np.mean([(a == b).mean() for a, b in zip(masks["torch"], masks["densecrf"], strict=True)])
    assert agree > 0.96, agree
    again = [refine_image(rgb, s, g, 8, CRF) for rgb, s, g, *_ in scored]
    assert all(np.array_equal(a, b) for a, b in zip(again, masks["torch"], strict=True))  # byte-identical rerun


def test_a_batch_gives_each_image_what_it_gets_alone(scored):
    """Images of different sizes padded into one batch: no pixel hears from the padding, so each mask is the one
    the image gets alone (bit for bit), whatever its batch."""
    inputs = [crf_inputs(rgb, s, g, 8, CRF) for rgb, s, g, *_ in scored]
    inputs.append((inputs[0][0][:100, :150], inputs[0][1][:100, :150]))  # a smaller one: padded the most
    assert len({p.shape for _, p in inputs}) > 2
    alone = [local_crf_batch([x], CRF, "cpu")[0] for x in inputs]
    together = local_crf_batch(inputs, CRF, "cpu")
    assert all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(alone, together, strict=True))
    sizes = [rgb.shape[:2] for rgb, *_ in scored] + [(100, 150)]
    assert [m.shape for m in refine_masks(inputs, sizes, CRF)] == sizes
    assert refine_masks([], [], CRF) == []  # a shard whose every image failed earlier


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bench/gpu_check.sh runs it there)")
def test_on_a_gpu_the_batched_refiner_agrees_with_the_cpu(scored):
    inputs = [crf_inputs(rgb, s, g, 8, CRF) for rgb, s, g, *_ in scored]
    sizes = [rgb.shape[:2] for rgb, *_ in scored]
    cpu, gpu = refine_masks(inputs, sizes, CRF, "cpu"), refine_masks(inputs, sizes, CRF, "cuda")
    assert np.mean([(a == b).mean() for a, b in zip(cpu, gpu, strict=True)]) > 0.999
