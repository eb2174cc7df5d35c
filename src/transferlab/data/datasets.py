"""Datasets: find the labelled images a user already has, and split them.

Three layouts are read, and nothing is ever written inside them:
- an ImageFolder root with `train/` and optional `valid/` (or `val/`) and `test/` folders of class folders;
- a root of class folders directly, split here (stratified, by image content) into train/valid/test;
- a CSV manifest `path,label[,split]`, paths relative to the CSV file.

Classes come from the training data, sorted like torchvision's ImageFolder. When there is no
validation split, one is carved from train (stratified, by image content and seed); test is never
touched for that. Splits made here follow each image's bytes (`stratified_split`): adding or removing
images moves only images at a class's boundary, exact duplicates share a split, and the test set of
class folders is the same for every seed.
`list_images` is the one folder walk (hidden files skipped, symlink loops not followed) that
`transferlab predict` uses too.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .hashing import content_hash, split_score
from .images import IGNORED_DIRS, IMAGE_EXTENSIONS, is_image_file, skip_reason

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "valid": "valid",
    "val": "valid",
    "validation": "valid",
    "test": "test",
    "testing": "test",
}


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message says what and where."""


class DatasetWarning(UserWarning):
    """Data that a study goes on without (files skipped, a class it cannot learn); the message says which."""


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
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}: files in class folders not read

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

    def without(self, paths) -> ImageDataset:
        """The same dataset less the given paths (images that could not be read)."""
        drop = set(paths)
        return replace(self, samples=[s for s in self.samples if s.path not in drop])


def _is_loop(real: Path, folder: Path) -> bool:
    """A folder (resolved) that is `folder` itself or one of its parents: walking it would never end."""
    top = Path(os.path.realpath(folder))
    return real == top or real in top.parents


def list_images(folder: Path, skipped: list[dict] | None = None) -> list[Path]:
    """Image files under `folder`; symlinked folders are followed once each, link loops are not walked.

    Other files (not hidden, not OS junk) go to `skipped` with the reason they are not read."""
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
        if skipped is not None:
            skipped += [
                {"path": os.path.join(dirpath, f), "reason": r}
                for f in sorted(filenames)
                if (r := skip_reason(Path(f)))
            ]
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


def _content_key(path: str, hashes: dict[str, bytes]) -> bytes:
    """The file's content hash (memoised in `hashes`); a file that cannot be read is keyed by its path."""
    if path not in hashes:
        try:
            hashes[path] = content_hash(path)
        except OSError:  # skipped with its reason at extraction; its split only needs to be deterministic
            hashes[path] = b"unreadable:" + os.fsencode(path)
    return hashes[path]


def _lowest_scores(samples: list[Sample], idx: list[int], k: int, salt: str, hashes: dict[str, bytes]) -> list[int]:
    """The `k` of `idx` whose content scores lowest under `salt`, exact duplicates taken together (never all)."""
    groups: dict[bytes, list[int]] = {}
    for i in idx:
        groups.setdefault(_content_key(samples[i].path, hashes), []).append(i)
    order = sorted(groups, key=lambda key: (split_score(key, salt), key))
    taken: list[int] = []
    for key in order[:-1]:  # the highest-scored group always stays: a class keeps at least one image
        if len(taken) >= k:
            break
        taken += groups[key]
    return taken


def stratified_split(
    samples: list[Sample],
    fraction: float,
    new_split: str,
    seed: int = 0,
    *,
    salt: str | None = None,
    hashes: dict[str, bytes] | None = None,
) -> list[Sample]:
    """Move about `fraction` of each class to `new_split`; a class keeps at least one image where it was.

    A class of n images gives up k = round(fraction * n) of them (at least one when fraction > 0 and n >= 3,
    never all n). With `salt` (image files), the k moved are those with the lowest score
    SHA-256(content hash || salt) / 2**256, a uniform u in [0, 1): an image's side depends only on its bytes,
    the salt and its class's k, so adding or removing images moves only those images and the images at the
    class's boundary (never an image of another class), renaming a file moves nothing, and exact duplicates
    (same bytes) move together: a run of duplicates at the boundary moves whole, so a class can give up a
    few more than k. `hashes` (path -> content hash) saves reading a file twice across calls. Without a salt
    (samples that are not files, e.g. rows of a feature matrix in `heads.search.holdout_split`), a permutation
    per class drawn from one `seed`ed stream picks them.
    """
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"split fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed) if salt is None else None
    hashes = {} if hashes is None else hashes
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
        if salt is None:
            moved.update(idx[j] for j in rng.permutation(n)[:k])
        else:
            moved.update(_lowest_scores(samples, idx, k, salt, hashes))
    return [replace(s, split=new_split) if i in moved else s for i, s in enumerate(samples)]


def _no_images(cdir: Path, skipped: list[dict], before: int) -> str:
    n = len(skipped) - before
    return f"class folder {cdir} has no images" + (f" ({n} file{'s' * (n != 1)} skipped, see below)" if n else "")


def _training_classes(folder: Path, notes: list[str], skipped: list[dict]) -> tuple[list[str], list[Sample]]:
    """Classes (sorted class folders with images) and their images as training samples; empty ones noted."""
    classes, samples = [], []
    for cdir in _class_dirs(folder, notes):
        before = len(skipped)
        imgs = list_images(cdir, skipped)
        if not imgs:
            notes.append(f"{_no_images(cdir, skipped, before)}: class ignored")
            continue
        samples += [Sample(str(p), len(classes), "train") for p in imgs]
        classes.append(cdir.name)
    return classes, samples


def _nested_classes_hint(root: Path, name: str) -> str:
    """When the one class's folder holds class folders of its own (a data set unzipped into a folder of its name),
    the folder to point at instead."""
    for folder in (root / name, root / "train" / name):
        if folder.is_dir():
            inner = [d.name for d in _class_dirs(folder) if any(is_image_file(p) for p in d.rglob("*"))]
            if len(inner) >= 2:
                shown = ", ".join(inner[:5]) + (f" and {len(inner) - 5} more" if len(inner) > 5 else "")
                return f"; {folder} holds folders of images ({shown}): if they are the classes, run on {folder}"
    return ""


def _train_is_a_class(root: Path) -> bool:
    """Whether `root/train` is a class folder among others (images in it, no class folders under it: a scenes set's
    trains), not a split. The same beside split folders is refused: `train/` and `test/` of loose images would
    otherwise be learned as two classes."""
    train = root / "train"
    if _class_dirs(train) or not any(p.is_file() and is_image_file(p) for p in train.iterdir()):
        return False
    splits = [n for n, split in SPLIT_ALIASES.items() if split != "train" and (root / n).is_dir()]
    if splits:
        raise DatasetError(
            f"{train} holds images but no class folders, beside the split folder(s) {', '.join(splits)}: put each "
            "class's images in train/<class>/ (and the same under the other splits)"
        )
    return True


def _from_imagefolder(root: Path) -> ImageDataset:
    train_dir = root / "train"
    notes: list[str] = []
    skipped: list[dict] = []
    classes, samples = _training_classes(train_dir, notes, skipped)
    index = {c: i for i, c in enumerate(classes)}
    for name in ("valid", "val", "validation", "test"):
        sdir = root / name
        if not sdir.is_dir():
            continue
        split = SPLIT_ALIASES[name]
        if any(s.split == split for s in samples):
            raise DatasetError(f"{root} has more than one {split} folder ({sdir})")
        for cdir in _class_dirs(sdir, notes):
            before = len(skipped)
            imgs = list_images(cdir, skipped)
            if cdir.name not in index:
                if not imgs:
                    notes.append(f"{_no_images(cdir, skipped, before)} and is not a training class: ignored")
                    continue
                raise DatasetError(
                    f"class '{cdir.name}' in {sdir} is not a class of {train_dir} "
                    f"(training classes: {', '.join(classes)})"
                )
            if not imgs:
                notes.append(_no_images(cdir, skipped, before))
            samples += [Sample(str(p), index[cdir.name], split) for p in imgs]
        loose = sorted(p.name for p in sdir.iterdir() if p.is_file() and is_image_file(p))
        if loose:  # a competition's layout: test/ of unlabelled images beside train/<class>/
            msg = (
                f"{sdir} holds {len(loose)} image{'s' * (len(loose) != 1)} outside class folders (e.g. {loose[0]}): "
                f"unlabelled, so not in the {split} split; `transferlab predict RUN {sdir}` predicts them"
            )
            notes.append(msg)
            warnings.warn(msg, DatasetWarning, stacklevel=3)
    return ImageDataset(root, classes, samples, "imagefolder", notes, skipped)


TEST_SALT = "test"  # the test set of class folders: the same for every --seed


def _from_class_folders(root: Path, test_fraction: float, hashes: dict[str, bytes]) -> ImageDataset:
    notes: list[str] = []
    skipped: list[dict] = []
    classes, samples = _training_classes(root, notes, skipped)
    samples = stratified_split(samples, test_fraction, "test", salt=TEST_SALT, hashes=hashes)
    notes.append(
        f"split class folders into train/test with test fraction {test_fraction}, by image content "
        "(the same test set for every seed)"
    )
    return ImageDataset(root, classes, samples, "class-folders", notes, skipped)


# a CSV header's column names (any order, any case): the path, the label and the optional split
HEADER_NAMES = {
    "path": ("path", "file", "filename", "file_name", "filepath", "file_path", "image", "image_path", "img"),
    "label": ("label", "labels", "class", "class_name", "classname", "category", "target"),
    "split": ("split", "set", "subset"),
}


def _csv_columns(manifest: Path, row: list[str]) -> tuple[int, int, int | None] | None:
    """(path, label, split) column positions named by the first row when it is a header, else None (no header:
    `path,label[,split]`). A first row that reads as neither (its first cell no image file, no path and label
    named) is an error: taken for data it became a class of one unreadable "image"."""
    cells = [c.strip().lower() for c in row]
    found = {k: next((i for i, c in enumerate(cells) if c in names), None) for k, names in HEADER_NAMES.items()}
    if cells and cells[0] == "path":  # `path,<anything>`: the documented header, the split third when named or not
        found["path"], found["label"] = 0, 1
    if found["path"] is not None and found["label"] is not None:
        unnamed = (found["path"], found["label"]) == (0, 1) and len(cells) == 2  # rows may still add a split
        return found["path"], found["label"], 2 if unnamed else found["split"]
    first = row[0].strip() if row else ""
    if first and Path(first).suffix.lower() not in IMAGE_EXTENSIONS and not (manifest.parent / first).exists():
        raise DatasetError(
            f"{manifest}:1: {','.join(row)!r} is not an image row and not a header naming the path and label "
            f"columns (name them e.g. path,label[,split] or filename,class; without a header, rows are "
            "path,label[,split])"
        )
    return None


def read_manifest(manifest, allow_outside: bool = False) -> tuple[list[tuple[str, str, str, int]], list[str]]:
    """A CSV manifest's rows as (path, label, split, line) and its notes. Rows `path,label[,split]` (or separated by
    ';' or tabs, as the first line is), or the columns a header names (`HEADER_NAMES`, e.g. `filename,class`). An
    empty path or label, or a path listed twice with another label or split, is an error naming the line(s); a row
    repeated exactly is read once, with a note. Paths are relative to the manifest's folder."""
    manifest = Path(manifest)
    base = manifest.parent.resolve()
    rows = []
    first: dict[Path, tuple[str, str, int]] = {}  # file -> (label, split, line) of its first row
    repeats: list[tuple[int, int]] = []
    columns: tuple[int, int, int | None] | None = None
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        line = f.readline()
        f.seek(0)  # a spreadsheet's export in a comma-decimal locale separates by ';', a TSV by tabs
        sep = next((d for d in ",;\t" if d in line), ",")
        for lineno, row in enumerate(csv.reader(f, delimiter=sep), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if columns is None:  # the first row with cells: a header, or the first image
                header = _csv_columns(manifest, row)
                columns = header or (0, 1, 2)
                if header:
                    continue
            ip, il, isp = columns
            if len(row) <= max(ip, il):
                raise DatasetError(f"{manifest}:{lineno}: expected 'path,label[,split]', got {row!r}")
            path, label = row[ip].strip(), row[il].strip()
            if not path:
                raise DatasetError(f"{manifest}:{lineno}: empty path (every row needs path,label[,split])")
            if not label:
                raise DatasetError(
                    f"{manifest}:{lineno}: empty label for {path!r} (every row needs path,label[,split])"
                )
            given = row[isp].strip() if isp is not None and len(row) > isp else ""
            split = SPLIT_ALIASES.get(given.lower(), None) if given else "train"
            if split is None:
                raise DatasetError(f"{manifest}:{lineno}: unknown split {given!r} (use train, valid or test)")
            if "\\" in path and os.sep == "/" and not (base / path).exists():  # a manifest written on Windows
                path = path.replace("\\", "/")
            full = (base / path).resolve()
            if not allow_outside and not full.is_relative_to(base):
                raise DatasetError(
                    f"{manifest}:{lineno}: path {path!r} points outside {base}; pass --allow-outside to allow it"
                )
            if full in first:
                label0, split0, line0 = first[full]
                if (label0, split0) != (label, split):
                    raise DatasetError(
                        f"{manifest}: {path!r} is listed twice: line {line0} ({label0}, {split0}) "
                        f"and line {lineno} ({label}, {split}); one file can have one label and "
                        "one split"
                    )
                repeats.append((lineno, line0))
                continue
            first[full] = (label, split, lineno)
            rows.append((str(base / path), label, split, lineno))
    notes = []
    if repeats:
        shown = ", ".join(str(line) for line, _ in repeats[:10]) + (", ..." if len(repeats) > 10 else "")
        notes.append(
            f"{manifest}: {len(repeats)} row(s) repeat an earlier row (same path, label and split) and were "
            f"read once: lines {shown} (first listed on line(s) "
            f"{', '.join(str(line0) for _, line0 in repeats[:10])})"
        )
    return rows, notes


def _from_csv(manifest: Path, allow_outside: bool) -> ImageDataset:
    """The data set a CSV manifest lists (`read_manifest`); its classes are those with training rows."""
    rows, notes = read_manifest(manifest, allow_outside)
    classes = sorted({label for _, label, split, _ in rows if split == "train"})
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for path, label, split, lineno in rows:
        if label not in index:
            raise DatasetError(f"{manifest}:{lineno}: class '{label}' ({split}) has no training images")
        samples.append(Sample(path, index[label], split))
    return ImageDataset(manifest, classes, samples, "csv", notes)


def discover(
    source, *, seed: int = 0, valid_fraction: float = 0.1, test_fraction: float = 0.2, allow_outside: bool = False
) -> ImageDataset:
    """Read a dataset from a folder or CSV manifest; always returns train, valid and (usually) test.

    Splits made here are drawn by image content (see `stratified_split`): the test set of a root of class
    folders does not depend on `seed`; a validation split carved from train does (`carve_validation`).
    """
    root = Path(source).expanduser()
    hashes: dict[str, bytes] = {}  # content hashes, read once for both carves
    if not root.exists():
        raise DatasetError(f"dataset not found: {root}")
    if root.is_file():
        if root.suffix.lower() not in (".csv", ".tsv"):
            archive = root.name.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz", ".7z", ".rar"))
            hint = ": unpack the archive and point at the folder of class folders" if archive else ""
            raise DatasetError(f"{root} is a file but not a CSV manifest (path,label[,split]){hint}")
        ds = _from_csv(root, allow_outside)
    elif (root / "train").is_dir() and not _train_is_a_class(root):
        ds = _from_imagefolder(root)
    else:
        ds = _from_class_folders(root, test_fraction, hashes)
    if not ds.split("train"):
        n = len(ds.skipped)
        why = f"; {n} file{'s' * (n != 1)} skipped ({_skipped_summary(ds.skipped)})" if n else ""
        raise DatasetError(
            f"no training images found in {root} "
            f"(looked for {', '.join(sorted(e.lstrip('.') for e in IMAGE_EXTENSIONS))}{why})"
        )
    if len(ds.classes) < 2:
        raise DatasetError(
            f"{root} has a single class ({', '.join(ds.classes)}): a classifier needs at least two"
            + _nested_classes_hint(root, ds.classes[0])
        )
    if not ds.split("valid"):
        ds = carve_validation(ds, valid_fraction, seed, hashes=hashes)
    if ds.skipped:
        ds.notes += _skipped_notes(ds.skipped)
        n = len(ds.skipped)
        warnings.warn(
            f"{n} file{'s' * (n != 1)} in {root} skipped ({_skipped_summary(ds.skipped)}); "
            "the report's notes list them",
            DatasetWarning,
            stacklevel=2,
        )
    for msg in _near_same_classes(ds.classes) + _unmeasured_classes(ds):
        ds.notes.append(msg)
        warnings.warn(msg, DatasetWarning, stacklevel=2)
    return ds


def _unmeasured_classes(ds: ImageDataset) -> list[str]:
    """Classes with training images but none to score them on, where the other classes have test images (a class
    of one image stays in train): every number in the report leaves them out."""
    counts = ds.counts()
    if "test" not in counts:
        return []
    held = [c for c in ds.classes if not counts["test"][c] and not counts.get("valid", {}).get(c)]
    if not held:
        return []
    shown = ", ".join(f"'{c}' ({counts['train'][c]})" for c in held[:10]) + (" ..." if len(held) > 10 else "")
    one = len(held) == 1
    who = f"class {shown} has" if one else f"{len(held)} classes have"
    return [
        f"{who} training images only, no test or validation image{'' if one else ' (' + shown + ')'}: the model "
        f"learns {'it' if one else 'them'}, but no score in the report measures {'it' if one else 'them'}"
    ]


def _near_same_classes(classes: list[str]) -> list[str]:
    """Class names that differ only in case, spaces, '-' or '_' ('Golden Retriever', 'golden_retriever'): two
    classes the model must tell apart, most often one class written two ways."""
    groups: dict[str, list[str]] = {}
    for c in classes:
        groups.setdefault("".join(ch for ch in c.casefold() if ch.isalnum()), []).append(c)
    return [
        f"classes {' and '.join(repr(c) for c in same)} differ only in case or separators: they are learned as "
        f"{len(same)} classes (rename to one name if they are the same)"
        for same in groups.values()
        if len(same) > 1
    ]


def _by_reason(skipped: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in skipped:
        out.setdefault(s["reason"], []).append(s["path"])
    return out


def _skipped_summary(skipped: list[dict]) -> str:
    return "; ".join(f"{len(paths)}: {reason}" for reason, paths in _by_reason(skipped).items())


def _skipped_notes(skipped: list[dict], shown: int = 20) -> list[str]:
    """One note per reason: how many files, and the first `shown` of them."""
    notes = []
    for reason, paths in _by_reason(skipped).items():
        more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
        notes.append(f"{len(paths)} file{'s' * (len(paths) != 1)} skipped ({reason}): {', '.join(paths[:shown])}{more}")
    return notes


def carve_validation(
    ds: ImageDataset, fraction: float, seed: int, *, hashes: dict[str, bytes] | None = None
) -> ImageDataset:
    """Move a stratified `fraction` of train to valid by image content, salted with `seed` (never touches test).

    The seed is part of the salt on purpose: another seed draws another validation split (to see how much
    selection depends on it) while the test set stays put; for one seed the carve is as stable as the test
    split (adding images moves only boundary images, duplicates stay together).
    """
    train = [s for s in ds.samples if s.split == "train"]
    rest = [s for s in ds.samples if s.split != "train"]
    carved = stratified_split(train, fraction, "valid", salt=f"valid:{seed}", hashes=hashes)
    notes = ds.notes + [
        f"validation carved from train: {fraction:.0%} per class, stratified by image content (seed {seed})"
    ]
    return replace(ds, samples=carved + rest, notes=notes)
