"""The offline demo dataset: tree, images, long tail, determinism, and never touching a user's folder."""

import json
from pathlib import Path

import pytest
from PIL import Image

from transferlab.data.datasets import discover
from transferlab.data.demo import MARKER, build_demo_dataset, demo_summary

CLASSES = [f"digit_{k}" for k in range(10)]
SMALL = dict(size=32, max_per_class=40)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_tree_images_and_summary(tmp_path):
    root = build_demo_dataset(tmp_path / "demo", **SMALL)
    assert root == tmp_path / "demo"
    assert sorted(p.name for p in (root / "train").iterdir()) == CLASSES
    assert {p.name for p in (root / "test").iterdir()} <= set(CLASSES)
    summary = demo_summary(root)
    for split in ("train", "test"):
        for cls in CLASSES:
            pngs = list((root / split / cls).glob("*.png"))
            assert len(pngs) == summary[split][cls] >= 1
            assert summary["train"][cls] + summary["test"][cls] <= 40
    for p in list(root.rglob("*.png"))[::25]:
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32))
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no partial build left behind
    ds = discover(root)
    assert ds.classes == CLASSES and ds.layout == "imagefolder"


def test_long_tailed_default_profile(tmp_path):
    counts = demo_summary(build_demo_dataset(tmp_path / "demo", size=16))
    totals = {c: counts["train"][c] + counts["test"][c] for c in CLASSES}
    assert 170 <= max(totals.values()) <= 183 and 7 <= min(totals.values()) <= 11
    assert max(counts["train"].values()) / min(counts["train"].values()) >= 20 / 2
    assert min(counts["test"].values()) >= 1
    assert list(totals.values()) != sorted(totals.values(), reverse=True)  # head/tail shuffled, not digit order


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = files(build_demo_dataset(tmp_path / "a", seed=3, **SMALL))
    b = files(build_demo_dataset(tmp_path / "b", seed=3, **SMALL))
    c = files(build_demo_dataset(tmp_path / "c", seed=4, **SMALL))
    assert a == b
    assert a != c
    assert (tmp_path / "a" / MARKER).read_bytes() == (tmp_path / "b" / MARKER).read_bytes()


def test_refuses_a_foreign_non_empty_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        build_demo_dataset(root, **SMALL)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_empty_folder_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    root = build_demo_dataset(tmp_path / "empty", **SMALL)
    assert (root / MARKER).is_file() and (root / "train" / "digit_0").is_dir()


def test_second_call_is_a_no_op_and_other_parameters_are_refused(tmp_path):
    root = build_demo_dataset(tmp_path / "demo", **SMALL)
    watched = [root / MARKER, next(root.rglob("*.png"))]
    before = [p.stat().st_mtime_ns for p in watched]
    assert build_demo_dataset(root, **SMALL) == root
    assert [p.stat().st_mtime_ns for p in watched] == before
    with pytest.raises(FileExistsError, match="other parameters"):
        build_demo_dataset(root, seed=1, **SMALL)
    assert json.loads((root / MARKER).read_text())["params"]["seed"] == 0


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    import transferlab.data.demo as demo

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_render", boom)
    with pytest.raises(KeyboardInterrupt):
        build_demo_dataset(tmp_path / "demo", **SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert (build_demo_dataset(tmp_path / "demo", **SMALL) / MARKER).is_file()


def test_summary_of_a_non_demo_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        demo_summary(tmp_path)


@pytest.mark.parametrize("bad", [dict(size=4), dict(imbalance=0.5), dict(test_fraction=1.0), dict(max_per_class=1)])
def test_bad_parameters(tmp_path, bad):
    with pytest.raises(ValueError):
        build_demo_dataset(tmp_path / "demo", **bad)
    assert not (tmp_path / "demo").exists()
