"""Held-out evaluation of the combine rule (issue 44): families of planted data, each one kind of failure, scored by
family, never on the families a threshold was chosen on.

    python bench/held_out.py                     # 8 draws a family, 2 processes
    python bench/held_out.py --draws 4

Each family is the randomized planted generator (``tests/helpers/planted.py: random_spec``) with every failure mode
turned off but its own: background modes, misleading attention, shifts (of images, of hidden groups), close-ups,
empty scenes. Each draw is clustered once at the defaults; every rule is then scored from the level masks, weights
and gaps the cluster stage stores (``mlcseg_ray.tools.ablate.rule_score``), so a threshold can be chosen on some
families and scored on the others without clustering again. Two splits: tuned on background modes and attention,
scored on shifts, close-ups and empty scenes; and the other way round. Per held-out family: the default
(``min_gap`` as configured), the rule with ``min_gap`` chosen on the other families, each single level, the
default's regret against the dataset level, and the share of empty scenes kept clean; worst family first.
"""

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the planted-store generators (tests/helpers)
from common import machine  # noqa: E402

from helpers.planted import generate, random_spec  # noqa: E402
from mlcseg_ray.core.config import Config  # noqa: E402
from mlcseg_ray.core.run_dir import RunDir  # noqa: E402
from mlcseg_ray.library.clustering import read_pseudo  # noqa: E402
from mlcseg_ray.pipeline import Pipeline  # noqa: E402
from mlcseg_ray.tools.ablate import CLEAN_SHARE, SINGLE_LEVELS, rule_score  # noqa: E402

MASKS = ROOT.parent / "shared" / "data" / "voc2012_val_masks" / "SegmentationClass"
# every failure mode of the generator off: a family turns one back on
QUIET = dict(
    family_share={"shift": 0.0, "modes": 0.0, "mixed": 0.0},
    misleading_share=0.0,
    attn_noise=0.05,
    image_shift=0.0,
    latent_groups=0,
    group_shift=0.0,
    empty_share=0.0,
    closeup_share=0.0,
)
FAMILIES = {
    "background modes": dict(family_share={"shift": 0.0, "modes": 0.3, "mixed": 0.0}, n_bg_types=10, bg_per_image=3),
    "attention": dict(misleading_share=0.3, attn_noise=0.3),
    "shifts": dict(
        family_share={"shift": 0.3, "modes": 0.0, "mixed": 0.0}, image_shift=0.5, latent_groups=6, group_shift=0.8
    ),
    "close-ups": dict(closeup_share=0.15),
    "empty scenes": dict(empty_share=0.3),
}
SPLITS = [
    (("background modes", "attention"), ("shifts", "close-ups", "empty scenes")),
    (("shifts", "close-ups", "empty scenes"), ("background modes", "attention")),
]
GAPS = tuple(round(g, 2) for g in np.arange(0.0, 0.85, 0.1))  # the min_gap values a split may choose from


def one_draw(job: tuple[str, int, str]) -> dict:
    """One family's draw: generated, clustered at the defaults, its images' level masks, weights, gaps, attention
    and truth kept (the store removed)."""
    import torch

    torch.set_num_threads(1)  # draws run side by side, one per core
    family, draw, work = job
    out = Path(work) / f"{family.replace(' ', '_')}{draw}"
    shutil.rmtree(out, ignore_errors=True)
    spec = replace(random_spec(1000 + draw), **{**QUIET, **FAMILIES[family]})
    generate(out, spec, mask_dir=MASKS)
    Pipeline(out, Config(), backend="local").run(["cluster"], print_summary=False)
    gt = {r["image_id"]: np.asarray(r["mask"], bool) for r in pq.read_table(out / "gt.parquet").to_pylist()}
    keep = [*SINGLE_LEVELS, "attn", "weights", "gaps", "image_id"]
    rows = [{k: r[k] for k in keep} for r in read_pseudo(RunDir(out)).to_pylist()]
    shutil.rmtree(out, ignore_errors=True)
    return {"family": family, "draw": draw, "rows": rows, "gt": gt}


def score(draw: dict, rule: str, min_gap: float) -> tuple[float, float | None]:
    """A draw's foreground IoU under ``rule`` (patch level, over all its images) and its empty scenes' clean share."""
    inter = union = empty = clean = 0
    for row in draw["rows"]:
        t = draw["gt"][row["image_id"]]
        p = rule_score(row, rule, min_gap) > 0.5
        inter, union = inter + int((p & t).sum()), union + int((p | t).sum())
        if not t.any():
            empty, clean = empty + 1, clean + int(p.mean() <= CLEAN_SHARE)
    return (inter / union if union else 1.0), (clean / empty if empty else None)


def family_table(draws: list[dict], families: tuple[str, ...], chosen_gap: float, default_gap: float) -> list[str]:
    rows = []
    for family in families:
        fam = [d for d in draws if d["family"] == family]
        default = [score(d, "weighted", default_gap) for d in fam]
        tuned = [score(d, "weighted", chosen_gap)[0] for d in fam]
        levels = {lv: np.mean([score(d, lv, default_gap)[0] for d in fam]) for lv in SINGLE_LEVELS}
        mean = float(np.mean([s for s, _ in default]))
        cleans = [c for _, c in default if c is not None]
        rows.append(
            (
                mean - levels["dataset"],
                f"| {family} | {len(fam)} | {mean:.4f} | {np.mean(tuned):.4f} | "
                + " | ".join(f"{levels[lv]:.4f}" for lv in SINGLE_LEVELS)
                + f" | {mean - levels['dataset']:+.4f} | {np.min([s for s, _ in default]):.3f} | "
                + (f"{np.mean(cleans):.0%} (worst draw {np.min(cleans):.0%})" if cleans else "-")
                + " |",
            )
        )
    return [line for _, line in sorted(rows)]  # worst regret against the dataset level first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=8, help="draws a family")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mlcseg-held-out-"))
    work.mkdir(parents=True, exist_ok=True)
    default_gap = Config().min_gap
    print(f"machine: {machine()}")
    print(f"{args.draws} draws a family; the default: combine=weighted, min_gap={default_gap}")
    t0 = time.perf_counter()
    jobs = [(family, d, str(work)) for family in FAMILIES for d in range(args.draws)]
    with mp.get_context("spawn").Pool(args.processes) as pool:
        draws = pool.map(one_draw, jobs, chunksize=1)
    for tuned_on, scored_on in SPLITS:
        train = [d for d in draws if d["family"] in tuned_on]
        chosen = max(GAPS, key=lambda g: np.mean([score(d, "weighted", g)[0] for d in train]))
        print(f"\ntuned on {', '.join(tuned_on)}: min_gap {chosen}; scored on {', '.join(scored_on)}")
        print(
            "| held-out family | draws | default | min_gap chosen on the others | "
            + " | ".join(f"{lv} level" for lv in SINGLE_LEVELS)
            + " | default - dataset level | worst draw | empty scenes kept clean |"
        )
        print("|---" * (7 + len(SINGLE_LEVELS)) + "|")
        print("\n".join(family_table(draws, scored_on, chosen, default_gap)))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
