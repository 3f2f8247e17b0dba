"""Progress counts images within shards (issue 41): workers add to a count as they finish images, a driver thread
moves it into the bar a few times a second, and the bar ends at the shards' images however many were counted."""

import time

from mlcseg_ray.core.progress import Ticks, plain_progress, polled


def _bar(steps, total, pause=0.05, fail=False):
    lines, ticks = [], Ticks()
    try:
        with plain_progress("extract", total, "images", write=lines.append, interval=0) as advance:
            with polled(ticks, advance, total, every=0.01):
                for n in steps:  # a worker finishing images inside one shard
                    ticks.add(n)
                    time.sleep(pause)
                if fail:
                    raise RuntimeError("a shard failed")
    except RuntimeError:
        pass
    return [line.split(" (")[0] for line in lines]


def test_the_bar_moves_within_a_shard_and_ends_at_its_images():
    assert _bar([3, 4, 5], 12) == ["extract: 3/12 images", "extract: 7/12 images", "extract: 12/12 images"]


def test_images_never_counted_still_end_the_bar_and_a_failure_does_not_fill_it():
    assert _bar([2], 5) == ["extract: 2/5 images", "extract: 5/5 images"]  # 3 failed before this stage
    assert _bar([2, 9], 5)[-1] == "extract: 5/5 images"  # never past the total
    assert _bar([2], 5, fail=True) == ["extract: 2/5 images"]  # stopped where it was
