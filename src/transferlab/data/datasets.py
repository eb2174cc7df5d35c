"""Datasets: find the labelled images a user already has, and split them.

Three layouts are read, and nothing is ever written inside them:
- an ImageFolder root with `train/` and optional `valid/` (or `val/`) and `test/` folders of class folders;
- a root of class folders directly, split here (stratified, seeded) into train/valid/test;
- a CSV manifest `path,label[,split]`, paths relative to the CSV file.

Classes come from the training data, sorted like torchvision's ImageFolder. When there is no
validation split, one is carved from train (stratified, seeded); test is never touched for that.
`list_images` is the one folder walk (hidden files skipped, symlink loops not followed) that
`transferlab predict` uses too.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .images import IGNORED_DIRS, is_image_file

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "val": "valid",
                 "validation": "valid", "test": "test", "testing": "test"}


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message says what and where."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    split: str


@dataclass
class ImageDataset:
    root: Path
    classes: list[str]
    samples: list[Sample]
    layout: str
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def paths(self, name: str) -> list[str]:
        return [s.path for s in self.samples if s.split == name]

    def labels(self, name: str) -> np.ndarray:
        return np.array([s.label for s in self.samples if s.split == name], dtype=np.int64)

    def counts(self) -> dict[str, dict[str, int]]:
        """counts[split][class] for every split present."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            c = Counter(s.label for s in self.samples if s.split == split)
            if c:
                out[split] = {name: c.get(i, 0) for i, name in enumerate(self.classes)}
        return out

    def without(self, paths) -> "ImageDataset":
        """The same dataset less the given paths (images that could not be read)."""
        drop = set(paths)
        return replace(self, samples=[s for s in self.samples if s.path not in drop])


def _is_loop(real: Path, folder: Path) -> bool:
    """A folder (resolved) that is `folder` itself or one of its parents: walking it would never end."""
    top = Path(os.path.realpath(folder))
    return real == top or real in top.parents


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`; symlinked folders are followed once each, link loops are not walked."""
    found = []
    seen = {Path(os.path.realpath(folder))}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = Path(os.path.realpath(os.path.join(dirpath, d)))
            if d.startswith(".") or d in IGNORED_DIRS or real in seen or _is_loop(real, folder):
                continue
            seen.add(real)
            keep.append(d)
        dirnames[:] = keep
        found += [Path(dirpath) / f for f in sorted(filenames) if is_image_file(Path(f))]
    return found


def _class_dirs(folder: Path, notes: list[str] | None = None) -> list[Path]:
    """Class folders of `folder`; a symlink back to `folder` or above it is a loop and is skipped with a note."""
    dirs = []
    for p in sorted(folder.iterdir()):
        if not p.is_dir() or p.name.startswith(".") or p.name in IGNORED_DIRS:
            continue
        if p.is_symlink() and _is_loop(Path(os.path.realpath(p)), folder):
            if notes is not None:
                notes.append(f"{p} is a symlink back to {os.path.realpath(p)} (a loop): ignored")
            continue
        dirs.append(p)
    return dirs


def stratified_split(samples: list[Sample], fraction: float, new_split: str, seed: int) -> list[Sample]:
    """Move about `fraction` of each class to `new_split`; a class keeps at least one image where it was."""
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"split fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    moved = set()
    for label in sorted(by_class):
        idx = by_class[label]
        n = len(idx)
        k = int(round(fraction * n))
        if fraction > 0 and n >= 3:
            k = max(k, 1)
        k = min(k, n - 1)
        moved.update(idx[j] for j in rng.permutation(n)[:k])
    return [replace(s, split=new_split) if i in moved else s for i, s in enumerate(samples)]


def _training_classes(folder: Path, notes: list[str]) -> tuple[list[str], list[Sample]]:
    """Classes (sorted class folders with images) and their images as training samples; empty ones noted."""
    classes, samples = [], []
    for cdir in _class_dirs(folder, notes):
        imgs = list_images(cdir)
        if not imgs:
            notes.append(f"class folder {cdir} has no images: class ignored")
            continue
        samples += [Sample(str(p), len(classes), "train") for p in imgs]
        classes.append(cdir.name)
    return classes, samples


def _from_imagefolder(root: Path) -> ImageDataset:
    train_dir = root / "train"
    notes: list[str] = []
    classes, samples = _training_classes(train_dir, notes)
    index = {c: i for i, c in enumerate(classes)}
    for name in ("valid", "val", "validation", "test"):
        sdir = root / name
        if not sdir.is_dir():
            continue
        split = SPLIT_ALIASES[name]
        if any(s.split == split for s in samples):
            raise DatasetError(f"{root} has more than one {split} folder ({sdir})")
        for cdir in _class_dirs(sdir, notes):
            imgs = list_images(cdir)
            if cdir.name not in index:
                if not imgs:
                    notes.append(f"class folder {cdir} has no images and is not a training class: ignored")
                    continue
                raise DatasetError(f"class '{cdir.name}' in {sdir} is not a class of {train_dir} "
                                   f"(training classes: {', '.join(classes)})")
            if not imgs:
                notes.append(f"class folder {cdir} has no images")
            samples += [Sample(str(p), index[cdir.name], split) for p in imgs]
    return ImageDataset(root, classes, samples, "imagefolder", notes)


def _from_class_folders(root: Path, seed: int, valid_fraction: float, test_fraction: float) -> ImageDataset:
    notes: list[str] = []
    classes, samples = _training_classes(root, notes)
    samples = stratified_split(samples, test_fraction, "test", seed)
    notes.append(f"split class folders into train/test with test fraction {test_fraction} (seed {seed})")
    return ImageDataset(root, classes, samples, "class-folders", notes)


def _from_csv(manifest: Path, allow_outside: bool) -> ImageDataset:
    base = manifest.parent.resolve()
    rows = []
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if lineno == 1 and row[0].strip().lower() == "path":
                continue
            if len(row) < 2:
                raise DatasetError(f"{manifest}:{lineno}: expected 'path,label[,split]', got {row!r}")
            path, label = row[0].strip(), row[1].strip()
            split = SPLIT_ALIASES.get(row[2].strip().lower(), None) if len(row) > 2 and row[2].strip() else "train"
            if split is None:
                raise DatasetError(f"{manifest}:{lineno}: unknown split {row[2]!r} (use train, valid or test)")
            full = (base / path).resolve()
            if not allow_outside and not full.is_relative_to(base):
                raise DatasetError(f"{manifest}:{lineno}: path {path!r} points outside {base}; "
                                   "pass --allow-outside to allow it")
            rows.append((str(base / path), label, split, lineno))
    classes = sorted({label for _, label, split, _ in rows if split == "train"})
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for path, label, split, lineno in rows:
        if label not in index:
            raise DatasetError(f"{manifest}:{lineno}: class '{label}' ({split}) has no training images")
        samples.append(Sample(path, index[label], split))
    return ImageDataset(manifest, classes, samples, "csv")


def discover(source, *, seed: int = 0, valid_fraction: float = 0.1, test_fraction: float = 0.2,
             allow_outside: bool = False) -> ImageDataset:
    """Read a dataset from a folder or CSV manifest; always returns train, valid and (usually) test."""
    root = Path(source).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset not found: {root}")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DatasetError(f"{root} is a file but not a CSV manifest (path,label[,split])")
        ds = _from_csv(root, allow_outside)
    elif (root / "train").is_dir():
        ds = _from_imagefolder(root)
    else:
        ds = _from_class_folders(root, seed, valid_fraction, test_fraction)
    if not ds.split("train"):
        raise DatasetError(f"no training images found in {root} "
                           f"(looked for {', '.join(sorted(e.lstrip('.') for e in ('.jpg', '.png', '.bmp', '.gif', '.webp', '.tiff')))})")
    if len(ds.classes) < 2:
        raise DatasetError(f"{root} has a single class ({', '.join(ds.classes)}): a classifier needs at least two")
    if not ds.split("valid"):
        ds = carve_validation(ds, valid_fraction, seed)
    return ds


def carve_validation(ds: ImageDataset, fraction: float, seed: int) -> ImageDataset:
    """Move a stratified, seeded `fraction` of train to valid (never touches test)."""
    train = [s for s in ds.samples if s.split == "train"]
    rest = [s for s in ds.samples if s.split != "train"]
    carved = stratified_split(train, fraction, "valid", seed + 1)
    notes = ds.notes + [f"validation carved from train: {fraction:.0%} per class, stratified (seed {seed})"]
    return replace(ds, samples=carved + rest, notes=notes)
