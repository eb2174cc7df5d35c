"""Benchmark: how far splits of a root of class folders move when images are added, or --seed changes (issue 18, bug 4).

Run by hand, not in CI:  uv run python benchmarks/split_stability.py [--trials 20] [--add 20]
Each trial writes a fresh class-folder dataset of small random PNGs (classes of 40, 25, 60, 12 and 30
images), reads it with `discover` (test fraction 0.2, valid fraction 0.1), adds `--add` new images to one
class and reads it again. It counts the images that existed before and changed split (into or out of test,
into or out of valid), in the grown class and in the other classes, and how many test images change when
only the seed changes. Writes benchmarks/results/split_stability.json.

Measured (20 trials, 20 images added to the class of 25): with one seeded permutation stream per class
(before; results/split_stability_before.json) 41 existing images crossed the test boundary per trial (9 of
the grown class, 32 of the others) and 18 the valid one, and seed 1 instead of 0 changed 58 test memberships.
By content (now): 1.05 existing images of the grown class crossed the test boundary (max 3; its quota grew
from 5 to 9), 0.75 the valid one, none of any other class, and the seed changes no test image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.data.datasets import discover

CLASSES = {"a": 40, "b": 25, "c": 60, "d": 12, "e": 30}
RESULTS = Path(__file__).parent / "results"


def _write(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def _splits(root: Path, seed: int) -> dict[str, tuple[str, str]]:
    ds = discover(root, seed=seed, valid_fraction=0.1, test_fraction=0.2)
    return {Path(s.path).relative_to(root).as_posix(): (ds.classes[s.label], s.split) for s in ds.samples}


def trial(root: Path, t: int, add: int, grow: str) -> dict:
    rng = np.random.default_rng(1000 + t)
    for cname, n in CLASSES.items():
        for i in range(n):
            _write(root / cname / f"{i:03d}.png", rng)
    before = _splits(root, seed=0)
    other_seed = _splits(root, seed=1)
    for i in range(add):
        _write(root / grow / f"new{i:03d}.png", rng)
    after = _splits(root, seed=0)
    moved = {"grown_test": 0, "grown_valid": 0, "other_test": 0, "other_valid": 0}
    for p, (cname, split) in before.items():
        new = after[p][1]
        if new == split:
            continue
        where = "grown" if cname == grow else "other"
        for name in ("test", "valid"):
            if name in (split, new):
                moved[f"{where}_{name}"] += 1
    moved["seed_changes_test"] = sum(1 for p, (_, s) in before.items() if (s == "test") != (other_seed[p][1] == "test"))
    moved["new_in_test"] = sum(1 for p, (_, s) in after.items() if p not in before and s == "test")
    return moved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--add", type=int, default=20)
    ap.add_argument("--grow", default="b", choices=sorted(CLASSES))
    args = ap.parse_args()
    rows = []
    for t in range(args.trials):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(trial(Path(tmp), t, args.add, args.grow))
    keys = list(rows[0])
    summary = {k: {"mean": float(np.mean([r[k] for r in rows])), "max": int(max(r[k] for r in rows))} for k in keys}
    print(
        f"{args.trials} trials, {sum(CLASSES.values())} images in {len(CLASSES)} classes, "
        f"{args.add} added to class {args.grow!r}: existing images that changed split (mean / max per trial)"
    )
    for k in keys:
        print(f"  {k:18s} {summary[k]['mean']:6.2f} / {summary[k]['max']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "split_stability.json").write_text(
        json.dumps(
            {
                "trials": args.trials,
                "classes": CLASSES,
                "added": args.add,
                "grown": args.grow,
                "summary": summary,
                "per_trial": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
