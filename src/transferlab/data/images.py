"""Images: which files count as images, and how each one becomes an RGB picture.

Every decoded image is RGB, 8 bits per channel, EXIF orientation applied, first frame of
animations, transparency composited on white. Anything unreadable raises `ImageError`
with the path and the reason, so callers can skip and report it. `to_rgb` applies the same
conversion to a PIL image already in memory (bundles and ONNX preprocessing use it).

Large JPEGs decode at reduced scale when the caller says what size it resizes to (`load_rgb(path, reduce_to=)`):
libjpeg's DCT scaling (`Image.draft`) decodes a 12-megapixel photo 7-10x faster at 1/2, 1/4 or 1/8 of its size, and
the scale is chosen to keep at least `REDUCE_MARGIN` times the target size, so the resize that follows still filters.
Images smaller than that (all four benchmark datasets) decode in full, bit for bit as before.

Phone formats: AVIF is read where Pillow has AVIF support (its recent wheels do); HEIC/HEIF is read
with the `heic` extra (pillow-heif, registered here when installed). Files that are not read say why
(`skip_reason`), so a dataset lists them instead of dropping them silently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, features

from ..warning_filters import warning_filter

HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif"})
AVIF_EXTENSIONS = frozenset({".avif", ".avifs"})
HEIF_REASON = "HEIC/HEIF needs the heic extra: pip install 'transferlab[heic]'"
AVIF_REASON = "AVIF needs a Pillow with AVIF support: pip install -U pillow"
IGNORED_DIRS = frozenset({"__MACOSX"})
IGNORED_FILES = frozenset({"thumbs.db", "desktop.ini"})  # OS junk, like hidden files: never listed
ORIENTATION = 0x0112  # the EXIF orientation tag
TURNED = frozenset({5, 6, 7, 8})  # orientations that turn the image a quarter (transposes included)
REDUCE_MARGIN = 2  # a reduced decode keeps at least this many source pixels per output pixel in each dimension


def _plugin_extensions() -> frozenset[str]:
    """AVIF where this Pillow reads it; HEIC/HEIF where pillow-heif is installed (its opener registered now)."""
    found = set()
    try:
        if features.check_module("avif"):
            found |= AVIF_EXTENSIONS
    except ValueError:  # a Pillow that does not know the module
        pass
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        pass
    else:
        register_heif_opener()
        found |= HEIF_EXTENSIONS
    return frozenset(found)


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}) | _plugin_extensions()


class ImageError(Exception):
    """An image file that cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_hidden_or_ignored(path: Path) -> bool:
    return any(part.startswith(".") or part in IGNORED_DIRS for part in path.parts)


def is_image_file(path: Path) -> bool:
    """An image by extension, not hidden (`.DS_Store`, `._x.jpg`), not under `__MACOSX`."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def skip_reason(path: Path) -> str | None:
    """Why a file that `is_image_file` refuses is not read, for the list of skipped files; None for an
    image, a hidden file or OS junk (`Thumbs.db`), which are not worth a word."""
    name, suffix = path.name, path.suffix.lower()
    if is_image_file(path) or name.startswith(".") or name.lower() in IGNORED_FILES:
        return None
    if suffix in HEIF_EXTENSIONS:
        return HEIF_REASON
    if suffix in AVIF_EXTENSIONS:
        return AVIF_REASON
    if not suffix:
        return "no file extension (rename it with its image type's extension to use it)"
    return f"not an image extension ({suffix})"


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_rgb(path, reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode `path` into an RGB image, or raise ImageError naming the file.

    `reduce_to`: the (width, height) the caller resizes the decoded (upright) image to. A JPEG is then decoded at the
    smallest DCT scale that keeps at least `REDUCE_MARGIN` times that size in each dimension (`Image.draft`; no
    reduction when the file is smaller); without it, or for other formats, in full."""
    path = Path(path)
    try:
        with warning_filter("error", Image.DecompressionBombWarning):  # decoded in threads
            with Image.open(path) as img:
                img.seek(0)
                if reduce_to is not None and img.format == "JPEG":
                    w, h = reduce_to
                    if img.getexif().get(ORIENTATION) in TURNED:  # the file is stored a quarter turn from upright
                        w, h = h, w
                    img.draft(None, (REDUCE_MARGIN * w, REDUCE_MARGIN * h))
                img = ImageOps.exif_transpose(img)
                img.load()
                if img.width < 1 or img.height < 1:
                    raise ImageError(path, "image has no pixels")
                return to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"too large to decode safely ({exc})") from None
    except Exception as exc:  # PIL raises many types for broken files
        reason = (
            "empty file"
            if path.exists() and path.stat().st_size == 0
            else f"cannot decode ({type(exc).__name__}: {exc})"
        )
        if path.suffix.lower() in (HEIF_EXTENSIONS | AVIF_EXTENSIONS) - IMAGE_EXTENSIONS and reason != "empty file":
            reason = skip_reason(path) or reason  # e.g. a .heic named in a CSV manifest without the heic extra
        raise ImageError(path, reason) from None
