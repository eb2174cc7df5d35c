"""PNG figures for the report: learning curves, learning rate, confusion matrix, class counts, data efficiency.

Uses ``matplotlib.figure.Figure`` directly (Agg canvas), so no global pyplot state is touched.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import logging
import os
import shutil
import threading
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from ..warning_filters import warning_filter

DPI = 120

# Fonts that draw the scripts matplotlib's DejaVu Sans lacks (CJK, Devanagari, Thai, ...), tried in this order after
# it where installed (matplotlib falls back glyph by glyph): class names in Chinese or Japanese were drawn as boxes,
# with one warning per glyph per figure (42 for a 4-class run).
FALLBACK_FONTS = (
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Noto Sans CJK TC",
    "Noto Sans CJK KR",
    "Source Han Sans",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
    "Microsoft YaHei",
    "SimHei",
    "Yu Gothic",
    "Meiryo",
    "MS Gothic",
    "Malgun Gothic",
    "PingFang SC",
    "Hiragino Sans",
    "Apple SD Gothic Neo",
    "Noto Sans",
    "Noto Sans Devanagari",
    "Noto Sans Arabic",
    "Noto Sans Hebrew",
    "Noto Sans Thai",
    "Arial Unicode MS",
)
GLYPH_WARNING = "Glyph "  # matplotlib's "Glyph 29483 (...) missing from font(s) DejaVu Sans."


@functools.cache
def font_families() -> tuple[str, ...]:
    """DejaVu Sans, then the FALLBACK_FONTS installed here."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ("DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed))


@functools.cache
def _drawable() -> frozenset[int]:
    """The code points some font of `font_families()` has a glyph for."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    points: set[int] = set()
    for family in font_families():
        path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        points |= set(FT2Font(path).get_charmap())
    return frozenset(points)


def missing_glyphs(texts) -> list[str]:
    """The characters of `texts` no font of `font_families()` draws (the figures show them as boxes)."""
    chars = {c for t in texts for c in str(t) if not c.isspace() and c.isprintable()}
    with _quiet_font_manager():
        drawable = _drawable()
    return sorted(c for c in chars if ord(c) not in drawable)


FIGURE_KEY = "transferlab-figure"  # the PNG text chunk holding what a figure was drawn from (`figure_key`)
_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("figure_key", default=None)
_store: contextvars.ContextVar[Path | None] = contextvars.ContextVar("figure_store", default=None)


@contextlib.contextmanager
def figure_store(directory):
    """Meanwhile, every figure drawn is also kept in `directory` under its `figure_key`, and a figure found there is
    copied instead of drawn: a rerun into another folder (the study's warm rerun) draws none it drew before. None: no
    store. A store that cannot be written (read-only) is only not written."""
    token = _store.set(None if directory is None else Path(directory))
    try:
        yield
    finally:
        _store.reset(token)


def _keep(path: Path, kept: Path) -> None:
    """Copy the figure at `path` into the store as `kept` (whole or not at all); never raises."""
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_name(f".{kept.name}.{os.getpid()}.{threading.get_ident()}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, kept)
    except OSError:
        pass


def _feed(h, obj) -> None:
    """Hash `obj` (arrays by dtype, shape and bytes; containers item by item; the rest by repr) into `h`."""
    if isinstance(obj, np.ndarray):
        h.update(f"ndarray{obj.dtype.str}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


@functools.cache
def _code() -> bytes:
    """This module's source and matplotlib's version: a figure drawn by other code is drawn again."""
    return Path(__file__).read_bytes() + matplotlib.__version__.encode()


def figure_key(name: str, arguments: dict) -> str:
    """What a figure is drawn from: the plot, its arguments (but the path), the fonts, this code, matplotlib."""
    h = hashlib.sha256(_code() + name.encode())
    _feed(h, [DPI, font_families(), {k: v for k, v in arguments.items() if k != "path"}])
    return h.hexdigest()


def _drawn_from(path: Path) -> str | None:
    """The `figure_key` stored in the PNG at `path` (None: none, or not a readable PNG). Read from the chunks before
    the pixels, as `_save` writes it: PIL's `text` would decode the whole image to look for chunks after them."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.info.get(FIGURE_KEY) if im.format == "PNG" else None
    except (OSError, ValueError, SyntaxError):
        return None


def _figure(plot):
    """Draw `plot` with `font_families()` and without matplotlib's per-glyph warnings (the report says once which
    characters no installed font draws: `missing_glyphs`). A PNG already at its `path` that was drawn from the same
    arguments by the same code (its `figure_key`, stored in the file) is kept as it is, and one in the
    `figure_store` is copied: a rerun of a study redrew every figure, 60% of a warm rerun of `transferlab demo` (the
    figures are the same bytes either way)."""
    signature = inspect.signature(plot)

    @functools.wraps(plot)
    def drawn(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        path = Path(bound.arguments["path"])
        key = figure_key(plot.__name__, bound.arguments)
        if path.is_file() and _drawn_from(path) == key:
            return path
        store = _store.get()
        kept = store / f"{key}.png" if store is not None and path.suffix.lower() == ".png" else None
        if kept is not None and kept.is_file() and _drawn_from(kept) == key:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kept, path)
            return path
        token = _key.set(key)
        try:
            with (
                matplotlib.rc_context({"font.family": list(font_families())}),
                warning_filter("ignore", UserWarning, GLYPH_WARNING),
                _quiet_font_manager(),
            ):
                out = plot(*args, **kwargs)
        finally:
            _key.reset(token)
        if kept is not None:
            _keep(path, kept)
        return out

    return drawn


@contextlib.contextmanager
def _quiet_font_manager():
    """matplotlib's font manager logs "findfont: Failed to find font weight normal for <fallback font>, now using
    500" (some CJK fonts have only a medium weight) at every figure: nothing to act on."""
    log = logging.getLogger("matplotlib.font_manager")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = _key.get()
    meta = {FIGURE_KEY: key} if key and path.suffix.lower() == ".png" else None
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata=meta)
    return path


def _series(history: dict, key: str, n: int) -> np.ndarray | None:
    """history[key] as floats, or None when absent or all NaN."""
    values = history.get(key)
    if values is None or len(values) == 0:
        return None
    arr = np.asarray(values, dtype=np.float64)[:n]
    return None if np.all(np.isnan(arr)) else arr


def _epochs(history: dict) -> np.ndarray:
    if history.get("epoch") is not None and len(history["epoch"]):
        return np.asarray(history["epoch"], dtype=np.float64)
    n = max((len(v) for v in history.values()), default=0)
    return np.arange(1, n + 1, dtype=np.float64)


def _no_data(ax, text="no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


@_figure
def plot_learning_curves(history: dict[str, list[float]], path, title: str = "") -> Path:
    """Loss and accuracy (train / valid) per epoch, side by side; missing or NaN validation is skipped."""
    epochs = _epochs(history)
    fig = Figure(figsize=(11, 4.2))
    panels = fig.subplots(1, 2)
    for ax, metric, label in zip(panels, ("loss", "acc"), ("loss", "accuracy")):
        drawn = False
        for split, style in (("train", dict(color="tab:blue")), ("valid", dict(color="tab:orange"))):
            y = _series(history, f"{split}_{metric}", len(epochs))
            if y is not None:
                x = epochs[: len(y)]
                ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=split, **style)
                drawn = True
        if drawn:
            no_valid = _series(history, f"valid_{metric}", len(epochs)) is None
            ax.legend(title="no validation data" if no_valid else None)
        else:
            _no_data(ax)
        ax.set(xlabel="epoch", ylabel=label, title=label)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


@_figure
def plot_lr_schedule(history: dict[str, list[float]], path, title: str = "") -> Path:
    """Learning rate per epoch as a step line, log y axis."""
    epochs = _epochs(history)
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    lr = _series(history, "lr", len(epochs))
    if lr is None:
        _no_data(ax, "no learning-rate history")
    else:
        ax.step(epochs[: len(lr)], lr, where="post", color="tab:green")
        if np.nanmin(lr) > 0:
            ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="learning rate", title=title or "learning rate schedule")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


MAX_CONFUSION_INCHES = 14.0


@_figure
def plot_confusion_matrix(cm, classes: list[str], path, title: str = "", normalize: bool = True) -> Path:
    """Confusion matrix (rows = true class), colour = row-normalised share, cells annotated with counts."""
    cm = np.asarray(cm, dtype=np.float64)
    k = len(classes)
    support = cm.sum(axis=1)
    if normalize:
        with np.errstate(divide="ignore", invalid="ignore"):
            shown = np.where(support[:, None] > 0, cm / support[:, None], 0.0)
    else:
        shown = cm
    size = min(max(5.0, 0.55 * k + 3.5), MAX_CONFUSION_INCHES)  # 101 classes: 14 in, not 59 in (a 6000 px PNG)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, shown.max()))
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label("share of the true class (row)" if normalize else "images")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    dark = shown[i, j] > 0.55 * (1 if normalize else shown.max())
                    ax.text(
                        j,
                        i,
                        f"{int(cm[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if dark else "black",
                    )
    names = [f"{i} {c}" for i, c in enumerate(classes)]
    font = 8 if k <= 40 else max(3.0, 8 * 40 / k)  # many classes: smaller labels on the capped figure
    ax.set_xticks(range(k), names, rotation=45 if k <= 40 else 90, ha="right", rotation_mode="anchor", fontsize=font)
    ax.set_yticks(range(k), [f"{n} (n={int(s)})" for n, s in zip(names, support)], fontsize=font)
    edges = np.arange(k + 1) - 0.5  # cell borders as two line collections: as minor ticks, 2k more ticks to draw
    ax.hlines(edges, -0.5, k - 0.5, color="lightgrey", linewidth=0.5)
    ax.vlines(edges, -0.5, k - 0.5, color="lightgrey", linewidth=0.5)
    note = ", ".join(
        (["colour: share of the row"] if normalize else []) + (["numbers: image counts"] if k <= 20 else [])
    )
    ax.set(
        xlabel="predicted class",
        ylabel="true class",
        title=(title or "confusion matrix") + (f"\n({note})" if note else ""),
    )
    fig.tight_layout()
    return _save(fig, path)


@_figure
def plot_class_distribution(counts: dict[str, dict[str, int]], classes: list[str], path, title: str = "") -> Path:
    """Images per class for each split as grouped horizontal bars, log count axis."""
    splits = list(counts)
    k = len(classes)
    fig = Figure(figsize=(9, max(3.5, k * (0.14 * max(1, len(splits)) + 0.1) + 1.2)))
    ax = fig.subplots()
    height = 0.8 / max(1, len(splits))
    y = np.arange(k)
    peak = 1
    for s, split in enumerate(splits):
        values = np.array([counts[split].get(c, 0) for c in classes], dtype=np.float64)
        peak = max(peak, values.max(initial=0))
        pos = y - 0.4 + height * (s + 0.5)
        bars = ax.barh(pos, values, height=height, label=f"{split} ({int(values.sum())})")
        ax.bar_label(bars, labels=[str(int(v)) if v else "" for v in values], padding=2, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(0.8, peak * 3)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_yticks(y, [f"{i} {c}" for i, c in enumerate(classes)], fontsize=8)
    ax.set_ylim(k - 0.5, -0.5)  # first class on top, no empty margin rows (5% of 101 classes is 5 rows)
    ax.set(xlabel="images (log scale)", ylabel="class", title=title or "images per class")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    if k <= 30:
        ax.legend(title="split (total)", loc="best")
    else:  # matplotlib's "best" tests every bar: 2.5 of 8 s at 101 classes; beside the axes it hides nothing
        ax.legend(title="split (total)", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, path)


@_figure
def plot_data_efficiency(
    points: dict[str, list[tuple[int, float]]], path, ylabel: str = "validation macro-F1", title: str = ""
) -> Path:
    """Score against training images per class, one line per method, log x axis."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ticks: set[int] = set()
    for name, pts in points.items():
        pts = sorted(pts)
        if not pts:
            continue
        x, y = zip(*pts)
        ax.plot(x, y, marker="o", label=name)
        ticks.update(int(v) for v in x)
    ax.set_xscale("log")
    if ticks:
        ax.set_xticks(sorted(ticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter("")
        ax.legend(title="method")
    else:
        _no_data(ax)
    ax.set(xlabel="training images per class (log scale)", ylabel=ylabel, title=title or "data efficiency")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
