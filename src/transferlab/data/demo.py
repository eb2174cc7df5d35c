"""A demo image set that needs no network: scikit-learn's bundled digits as small colour photos.

`build_demo_dataset` writes an ImageFolder tree `root/{train,test}/digit_<k>/<index>.png`:
each 8x8 digit is upscaled (bicubic), shifted and rotated a little, and painted with seeded
random foreground/background colours, a soft background gradient and a little noise. The
classes are made long-tailed (an exponential profile from 1 down to 1/imbalance, classes in
seeded random order), then split per class into train/test with at least one test image each.
Everything is seeded, so the same parameters give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MARKER = ".transferlab-demo.json"
MARKER_FORMAT = 1


def build_demo_dataset(
    root,
    *,
    seed: int = 0,
    size: int = 64,
    imbalance: float = 20.0,
    test_fraction: float = 0.25,
    max_per_class: int | None = None,
) -> Path:
    """Write the demo ImageFolder tree at `root` (or reuse it if already built with these parameters).

    `max_per_class` caps the largest class; the long-tail profile is applied below that cap.
    Raises FileExistsError if `root` is a non-empty folder this function did not build with
    the same parameters: nothing of the user's is ever overwritten.
    """
    root = Path(root)
    params = {
        "seed": int(seed),
        "size": int(size),
        "imbalance": float(imbalance),
        "test_fraction": float(test_fraction),
        "max_per_class": None if max_per_class is None else int(max_per_class),
    }
    if params["size"] < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    if params["imbalance"] < 1:
        raise ValueError(f"imbalance must be >= 1, got {imbalance}")
    if not 0 < params["test_fraction"] < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if max_per_class is not None and max_per_class < 2:
        raise ValueError(f"max_per_class must be at least 2 (one train, one test), got {max_per_class}")
    if _check_existing(root, params):
        return root

    splits = _choose_samples(params)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".partial-", dir=root.parent))
    try:
        _write_tree(tmp, splits, params)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if root.is_dir():
            root.rmdir()  # empty (checked above); os.replace cannot replace a directory everywhere
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _check_existing(root, params):  # a concurrent build of the same set finished first
            return root
        raise
    return root


def demo_summary(root) -> dict:
    """Counts per split per class, `{"train": {"digit_0": n, ...}, "test": {...}}`, from the marker."""
    marker = Path(root) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{root} is not a transferlab demo dataset (no {MARKER})")
    return json.loads(marker.read_text())["counts"]


def _check_existing(root: Path, params: dict) -> bool:
    """True if `root` already holds this demo set; False if it is absent or empty; raise otherwise."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder; choose another location for the demo")
    marker = root / MARKER
    if marker.is_file():
        built = json.loads(marker.read_text()).get("params")
        if built == params:
            return True
        raise FileExistsError(
            f"{root} holds a demo dataset built with other parameters ({built}); remove it or choose another folder"
        )
    if any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty; refusing to write the demo dataset there")
    return False


def _choose_samples(params: dict) -> dict[str, dict[int, list[int]]]:
    """Indices into the digits data kept per split and class: long-tailed, capped, split per class."""
    from sklearn.datasets import load_digits

    targets = load_digits().target
    n_classes = 10
    rng = np.random.default_rng(params["seed"])
    rank = np.empty(n_classes, dtype=int)
    rank[rng.permutation(n_classes)] = np.arange(n_classes)  # which class is head, which is tail
    cap = params["max_per_class"]
    splits: dict[str, dict[int, list[int]]] = {"train": {}, "test": {}}
    for k in range(n_classes):
        idx = np.flatnonzero(targets == k)
        top = len(idx) if cap is None else min(len(idx), cap)
        n = max(2, round(top * params["imbalance"] ** (-rank[k] / (n_classes - 1))))
        kept = rng.permutation(idx)[:n]
        n_test = min(n - 1, max(1, round(n * params["test_fraction"])))
        splits["test"][k] = sorted(kept[:n_test].tolist())
        splits["train"][k] = sorted(kept[n_test:].tolist())
    return splits


def _write_tree(folder: Path, splits: dict, params: dict) -> None:
    from sklearn.datasets import load_digits

    images = load_digits().images
    counts = {}
    for split, by_class in splits.items():
        counts[split] = {}
        for k, indices in by_class.items():
            cdir = folder / split / f"digit_{k}"
            cdir.mkdir(parents=True)
            for i in indices:
                _render(images[i], params["size"], [params["seed"], i]).save(cdir / f"{i:04d}.png")
            counts[split][f"digit_{k}"] = len(indices)
    marker = {"format": MARKER_FORMAT, "source": "sklearn.datasets.load_digits", "params": params, "counts": counts}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last: marks a complete build


def _render(digit: np.ndarray, size: int, seed) -> Image.Image:
    """One 8x8 digit (values 0..16) as a `size` x `size` RGB picture, seeded per image."""
    rng = np.random.default_rng(seed)
    padded = np.pad(digit / 16.0 * 255.0, 2).astype(np.uint8)  # room for shifts and rotation
    shift = rng.uniform(-1, 1, 2) * size / 12
    mask = (
        Image.fromarray(padded, "L")
        .resize((size, size), Image.Resampling.BICUBIC)
        .rotate(rng.uniform(-10, 10), Image.Resampling.BICUBIC, translate=tuple(shift), fillcolor=0)
    )
    m = (np.asarray(mask, dtype=np.float64) / 255.0)[..., None]

    fg, bg = _contrasting_colours(rng)
    ramp = np.linspace(-1, 1, size)
    direction = rng.uniform(-1, 1, 2)
    gradient = (direction[0] * ramp[None, :] + direction[1] * ramp[:, None])[..., None]
    background = bg + gradient * rng.uniform(-20, 20, 3)
    pixels = background * (1 - m) + fg * m + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random foreground and background colours whose luminances differ by at least 90/255."""
    weights = np.array([0.299, 0.587, 0.114])
    while True:
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if abs(weights @ fg - weights @ bg) >= 90:
            return fg, bg
