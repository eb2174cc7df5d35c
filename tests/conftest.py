"""Shared fixtures: small generated image sets and a tiny random-init timm backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_image(path: Path, label: int, rng: np.random.Generator, size=(48, 40)) -> Path:
    """A class-dependent picture: a coloured blob on a noisy background, position and hue by label."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = (0.2 + 0.6 * ((label * 0.37) % 1)) * w, (0.3 + 0.4 * ((label * 0.61) % 1)) * h
    blob = np.exp(-(((xx - cx) / (0.18 * w)) ** 2 + ((yy - cy) / (0.18 * h)) ** 2))
    colour = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 23 + 160) % 256], dtype=np.float64)
    img = 40 + rng.normal(0, 12, (h, w, 3)) + blob[..., None] * (colour - 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def make_imagefolder(root: Path, counts: dict[str, dict[str, int]], seed: int = 0, ext: str = ".png") -> Path:
    """counts[split][class] images under root/split/class/."""
    rng = np.random.default_rng(seed)
    classes = sorted({c for per in counts.values() for c in per})
    for split, per in counts.items():
        for cname, n in per.items():
            for i in range(n):
                make_image(root / split / cname / f"{i:03d}{ext}", classes.index(cname), rng)
    return root


def make_photo(path: Path, size=(1600, 1200), orientation: int | None = None) -> Path:
    """A smooth, photo-like JPEG (gradients and blobs) of `size` (width, height) as stored."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    rgb = np.stack([np.sin(9 * xx) * np.cos(7 * yy), np.cos(5 * xx + 3 * yy), np.sin(13 * yy)], axis=-1)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8)).save(path, quality=92, exif=exif)
    return path


def tiny_study(data, out, cache_dir, **settings):
    """A StudyConfig on the tiny random-init backbone at 32x40, two epochs, quiet, in-process decoding: what the
    study tests vary (`settings` override any of these)."""
    from transferlab.study import StudyConfig

    base = dict(backbone="test_efficientnet", weights="random", input_size=(32, 40), epochs=2, progress=False)
    return StudyConfig(data=str(data), out=str(out), cache_dir=str(cache_dir), **{**base, "num_workers": 0, **settings})


@pytest.fixture
def small_folder(tmp_path) -> Path:
    """3 imbalanced classes with train and test splits (no valid)."""
    return make_imagefolder(
        tmp_path / "data",
        {
            "train": {"ant": 12, "bee": 8, "cat": 5},
            "test": {"ant": 4, "bee": 3, "cat": 2},
        },
    )


@pytest.fixture(scope="session")
def tiny_backbone():
    """The session's random backbone, the same in every run: seeded, since the global generator's state when the
    fixture is first used depends on what ran before (a softmax_tuned export once differed by 1.65e-4 in a full
    run, 1e-8 alone)."""
    import torch

    from transferlab.features.backbones import load_backbone

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return load_backbone("test_efficientnet", weights="random", input_size=(32, 40))


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(autouse=True, scope="session")
def _hermetic_default_cache(tmp_path_factory):
    """Code under test that falls back to the default cache writes to a session folder, never ~/.cache:
    a head or features cached by an earlier run must not let a test pass without doing the work."""
    import os

    old = os.environ.get("TRANSFERLAB_CACHE")
    os.environ["TRANSFERLAB_CACHE"] = str(tmp_path_factory.mktemp("default-cache"))
    yield
    if old is None:
        os.environ.pop("TRANSFERLAB_CACHE", None)
    else:
        os.environ["TRANSFERLAB_CACHE"] = old
