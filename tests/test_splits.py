"""Splits follow image content (issue 18, bug 4): adding images moves only boundary images, the test set of
class folders ignores --seed, exact duplicates share a split, renaming a file changes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.data.datasets import discover

SIZES = {"a": 40, "b": 25, "c": 60, "d": 12, "e": 30}


def _write(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(path)


def _folders(root: Path, sizes=SIZES, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for cname, n in sizes.items():
        for i in range(n):
            _write(root / cname / f"{i:03d}.png", rng)
    return root


def _assignment(root: Path, seed: int = 0) -> dict[str, str]:
    ds = discover(root, seed=seed, valid_fraction=0.1, test_fraction=0.2)
    return {Path(s.path).relative_to(root).as_posix(): s.split for s in ds.samples}


def test_adding_images_to_a_class_moves_no_image_of_another_class(tmp_path):
    for trial in range(3):
        root = _folders(tmp_path / f"d{trial}", seed=trial)
        before = _assignment(root)
        rng = np.random.default_rng(100 + trial)
        for i in range(20):
            _write(root / "b" / f"new{i:02d}.png", rng)
        after = _assignment(root)
        moved = {p: (s, after[p]) for p, s in before.items() if after[p] != s}
        assert not [p for p in moved if not p.startswith("b/")], moved
        # in the grown class, old images only cross the test boundary in one direction: the old images in
        # test before and after are nested (those with the lowest scores), never swapped for each other
        old_test_before = {p for p, s in before.items() if p.startswith("b/") and s == "test"}
        old_test_after = {p for p, s in after.items() if p in before and p.startswith("b/") and s == "test"}
        assert old_test_before <= old_test_after or old_test_after <= old_test_before
        k_before, k_after = len(old_test_before), sum(1 for p, s in after.items() if p.startswith("b/") and s == "test")
        new_in_test = k_after - len(old_test_after)
        assert len(old_test_before ^ old_test_after) == abs(k_after - new_in_test - k_before)
        assert (k_before, k_after) == (5, 9)  # the count rule is today's: round(0.2 * n) per class


def test_removing_images_moves_only_boundary_images(tmp_path):
    root = _folders(tmp_path / "d")
    before = _assignment(root)
    gone = ["c/003.png", "c/017.png", "c/042.png"]
    for p in gone:
        (root / p).unlink()
    after = _assignment(root)
    moved = [p for p in after if after[p] != before[p]]
    assert all(p.startswith("c/") for p in moved)
    old_test = {p for p, s in before.items() if p.startswith("c/") and s == "test" and p not in gone}
    new_test = {p for p, s in after.items() if p.startswith("c/") and s == "test"}
    assert old_test <= new_test or new_test <= old_test


def test_seed_changes_validation_but_never_the_test_set(tmp_path):
    root = _folders(tmp_path / "d")
    runs = [_assignment(root, seed) for seed in (0, 1, 7)]
    tests = [{p for p, s in r.items() if s == "test"} for r in runs]
    valids = [{p for p, s in r.items() if s == "valid"} for r in runs]
    assert tests[0] == tests[1] == tests[2] and len(tests[0]) == 8 + 5 + 12 + 2 + 6
    assert valids[0] != valids[1] and valids[1] != valids[2]
    assert _assignment(root, 1) == runs[1]  # and each seed's carve is reproducible


def test_exact_duplicates_in_a_class_share_a_split(tmp_path):
    root = _folders(tmp_path / "d", {"a": 20, "b": 20})
    for g in range(5):  # five pictures saved three times each under other names
        for copy in range(2):
            shutil.copy(root / "a" / f"{g:03d}.png", root / "a" / f"copy{copy}-{g:03d}.png")
    for seed in range(4):
        splits = _assignment(root, seed)
        for g in range(5):
            names = [f"a/{g:03d}.png"] + [f"a/copy{c}-{g:03d}.png" for c in range(2)]
            assert len({splits[n] for n in names}) == 1, (seed, g, [splits[n] for n in names])


def test_split_follows_content_not_file_name(tmp_path):
    root = _folders(tmp_path / "d", {"a": 20, "b": 15})
    before = _assignment(root)
    for cname, n in (("a", 20), ("b", 15)):  # reverse the names: 000 <-> 019, ...
        for i in range(n):
            (root / cname / f"{i:03d}.png").rename(root / cname / f"tmp{n - 1 - i:03d}.png")
        for i in range(n):
            (root / cname / f"tmp{i:03d}.png").rename(root / cname / f"{i:03d}.png")
    after = _assignment(root)
    for cname, n in (("a", 20), ("b", 15)):
        for i in range(n):
            assert after[f"{cname}/{n - 1 - i:03d}.png"] == before[f"{cname}/{i:03d}.png"]
