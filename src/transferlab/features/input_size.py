"""The default input size: the images' typical aspect ratio at the backbone's native scale, instead of a square.

A backbone pretrained at 224x224 sees 800x240 boats squashed to a third of their width unless it is fed
224x736: `aspect_input_size` keeps the short side at the backbone's native size and sets the long side from
the median width/height of the training images (read from the files' headers, no decoding; EXIF orientation
applied, as decoding applies it), rounded to a multiple of 32 (the stride of the usual backbones). Typical aspects within 15% of square keep the native
square; aspects beyond 4:1 are clipped to 4:1. `--input-size HxW` overrides it.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..data.images import ORIENTATION, TURNED
from ..warning_filters import warning_filter

SQUARE_WITHIN = 1.15  # median aspects closer to 1 than this keep the native square size
MAX_ASPECT = 4.0
SAMPLE = 500  # images whose headers are read (evenly spaced over the sorted list)


def median_aspect(paths: list[str]) -> float | None:
    """Median width / height over up to SAMPLE of `paths` (headers only), of each image as it is decoded: after its
    EXIF orientation (a phone photo held upright is stored landscape, orientation 6); None when none can be opened."""
    paths = sorted(paths)
    idx = np.unique(np.linspace(0, len(paths) - 1, min(SAMPLE, len(paths))).astype(int)) if paths else []
    aspects = []
    for i in idx:
        try:
            with warning_filter("ignore", Image.DecompressionBombWarning), Image.open(paths[i]) as im:
                w, h = im.size
                if im.getexif().get(ORIENTATION) in TURNED:  # `load_rgb` applies the orientation
                    w, h = h, w
        except Exception:  # noqa: BLE001  unreadable (or too large) files are reported by extraction, not here
            continue
        if w > 0 and h > 0:
            aspects.append(w / h)
    return float(np.median(aspects)) if aspects else None


def aspect_input_size(native: tuple[int, int], aspect: float | None) -> tuple[int, int]:
    """(height, width) for images of typical width/height `aspect` on a backbone native at `native` (H, W)."""
    if aspect is None or abs(math.log(aspect)) < math.log(SQUARE_WITHIN):
        return tuple(native)
    aspect = min(max(aspect, 1 / MAX_ASPECT), MAX_ASPECT)
    short = min(native)
    long = max(32, int(round(short * max(aspect, 1 / aspect) / 32)) * 32)
    return (short, long) if aspect > 1 else (long, short)
