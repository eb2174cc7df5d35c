"""plots: every function writes a readable PNG, including degenerate inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from transferlab.report import plots

BOATS = [
    "Alilaguna",
    "Ambulanza",
    "Barchino",
    "Cacciapesca",
    "Caorlina",
    "Gondola",
    "Lanciafino10m",
    "Lanciafino10mBianca",
    "Lanciafino10mMarrone",
    "Lanciamaggioredi10mBianca",
    "Motobarca",
    "Motopontonerettangolare",
    "MotoscafoACTV",
    "Mototopo",
    "Patanella",
    "Polizia",
]


def check_png(path, min_size=(300, 200)):
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        assert im.size[0] < 5000 and im.size[1] < 5000
        return im.size


def history(n=12, valid=True):
    h = {
        "epoch": list(range(1, n + 1)),
        "train_loss": [2.0 / (e + 1) for e in range(n)],
        "train_acc": [1 - 0.5 / (e + 1) for e in range(n)],
        "lr": [1e-3 * 0.5 ** (e // 4) for e in range(n)],
    }
    if valid:
        h["valid_loss"] = [2.2 / (e + 1) + 0.05 for e in range(n)]
        h["valid_acc"] = [0.9 - 0.5 / (e + 1) for e in range(n)]
    return h


def test_learning_curves(tmp_path):
    p = plots.plot_learning_curves(history(), tmp_path / "curves.png", title="softmax: learning curves")
    assert p == tmp_path / "curves.png"
    w, h = check_png(p)
    assert w > h  # two side-by-side panels


@pytest.mark.parametrize("valid", ["nan", "absent"])
def test_learning_curves_without_validation(tmp_path, valid):
    h = history(valid=valid == "nan")
    if valid == "nan":
        h["valid_loss"] = [math.nan] * 12
        h["valid_acc"] = [math.nan] * 12
    check_png(plots.plot_learning_curves(h, str(tmp_path / "sub" / "curves.png")))


def test_lr_schedule(tmp_path):
    check_png(plots.plot_lr_schedule(history(), tmp_path / "lr.png", title="lr"))
    check_png(plots.plot_lr_schedule({"epoch": [1, 2], "lr": [0.0, 0.0]}, tmp_path / "lr0.png"))


def test_confusion_matrix_16_classes_with_zero_row(tmp_path):
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 30, (16, 16)) + np.diag(rng.integers(20, 400, 16))
    cm[3] = 0  # a class absent from the test set
    w, h = check_png(
        plots.plot_confusion_matrix(cm, BOATS, tmp_path / "cm.png", title="svm: confusion (test)"), min_size=(800, 800)
    )
    check_png(plots.plot_confusion_matrix(cm, BOATS, tmp_path / "cm_raw.png", normalize=False))


def test_confusion_matrix_large_unannotated(tmp_path):
    cm = np.eye(25, dtype=int) * 5
    check_png(plots.plot_confusion_matrix(cm, [f"c{i}" for i in range(25)], tmp_path / "cm25.png"))


def test_confusion_matrix_of_101_classes_stays_a_readable_size(tmp_path):
    # one per method in every report (and embedded in report.html): 101 classes once drew a 59-inch, ~6000 px figure
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 3, (101, 101)) + np.diag(rng.integers(5, 30, 101))
    w, h = check_png(plots.plot_confusion_matrix(cm, [f"class_{i}" for i in range(101)], tmp_path / "cm101.png"))
    assert max(w, h) <= (plots.MAX_CONFUSION_INCHES + 4) * plots.DPI


def test_class_distribution(tmp_path):
    rng = np.random.default_rng(1)
    counts = {
        split: {c: int(rng.integers(0, 500) * f) for c in BOATS}
        for split, f in (("train", 1.0), ("valid", 0.1), ("test", 0.3))
    }
    counts["test"][BOATS[2]] = 0
    check_png(plots.plot_class_distribution(counts, BOATS, tmp_path / "dist.png", title="Images per class"))


def test_data_efficiency(tmp_path):
    points = {
        "softmax": [(5, 0.2), (10, 0.3), (20, 0.41), (50, 0.5)],
        "svm": [(50, 0.58), (5, 0.25), (20, 0.47), (10, 0.35)],
    }
    check_png(plots.plot_data_efficiency(points, tmp_path / "eff.png", title="data efficiency"))
    check_png(plots.plot_data_efficiency({}, tmp_path / "empty.png"))


# ---------------------------------------------------------------- what is drawn, not only that a PNG exists


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save (the PNGs are still written)."""
    figs = []
    real = plots._save

    def capture(fig, path):
        figs.append(fig)
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    return figs


def test_confusion_matrix_rows_are_true_classes_columns_predicted(tmp_path, drawn):
    classes = ["ant", "bee", "cat"]
    # asymmetric: 6 true ants, 4 predicted bee; no true bee is ever predicted as ant; cat row empty
    cm = np.array([[2, 4, 0], [0, 3, 1], [0, 0, 0]])
    check_png(plots.plot_confusion_matrix(cm, classes, tmp_path / "cm.png"))
    (fig,) = drawn
    ax = fig.axes[0]
    (im,) = ax.get_images()
    shown = np.asarray(im.get_array())
    np.testing.assert_allclose(
        shown, [[2 / 6, 4 / 6, 0], [0, 3 / 4, 1 / 4], [0, 0, 0]]
    )  # row-normalised, not transposed
    assert ax.get_ylabel() == "true class" and ax.get_xlabel() == "predicted class"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0 ant", "1 bee", "2 cat"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0 ant (n=6)", "1 bee (n=4)", "2 cat (n=0)"]
    # the count annotations sit on (x=predicted, y=true)
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(0, 0): "2", (0, 1): "4", (1, 1): "3", (1, 2): "1"}
    # imshow's origin is the top-left: row 0 (first true class) is drawn at the top
    assert ax.get_ylim()[0] > ax.get_ylim()[1]

    plots.plot_confusion_matrix(cm, classes, tmp_path / "raw.png", normalize=False)
    np.testing.assert_array_equal(np.asarray(drawn[1].axes[0].get_images()[0].get_array()), cm)


def test_class_distribution_bar_lengths_are_the_counts(tmp_path, drawn):
    classes = ["ant", "bee", "cat"]
    counts = {"train": {"ant": 12, "bee": 8, "cat": 5}, "test": {"ant": 4, "cat": 2}}  # no test bee
    check_png(plots.plot_class_distribution(counts, classes, tmp_path / "dist.png"))
    (fig,) = drawn
    ax = fig.axes[0]
    assert len(ax.containers) == 2
    for split, bars in zip(counts, ax.containers):
        assert bars.get_label() == f"{split} ({sum(counts[split].values())})"
        widths = [r.get_width() for r in bars.patches]  # horizontal bars: the length is the width
        assert widths == [counts[split].get(c, 0) for c in classes]
        # each bar on its class's row: centres within that class's tick slot
        centres = [r.get_y() + r.get_height() / 2 for r in bars.patches]
        assert all(abs(c - i) < 0.5 for i, c in enumerate(centres))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0 ant", "1 bee", "2 cat"]
    assert [t.get_text() for t in ax.texts if t.get_text()] == ["12", "8", "5", "4", "2"]  # bar labels


def test_class_names_no_font_draws_give_one_note_not_a_warning_per_glyph(tmp_path, cache_dir):
    # A class named in Chinese drew boxes and printed matplotlib's "Glyph ... missing from font(s)" 42 times in a
    # 4-class run. Fonts that draw more scripts are used where installed; what none draws is said once.
    import warnings

    from transferlab.data.datasets import DatasetWarning
    from transferlab.report.plots import missing_glyphs
    from transferlab.study import run_study

    from .conftest import make_imagefolder, tiny_study

    odd = "\U00013000"  # an Egyptian hieroglyph: none of the fonts looked for draws it
    assert missing_glyphs(["café", "a&b<c>", "two words"]) == []
    assert missing_glyphs([f"x{odd}y", f"{odd}"]) == [odd]
    data = make_imagefolder(
        tmp_path / "data", {"train": {"plain": 8, f"odd{odd}": 8}, "test": {"plain": 3, f"odd{odd}": 3}}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = run_study(tiny_study(data, tmp_path / "out", cache_dir, methods=["softmax", "svm"]))
    glyphs = [w for w in caught if str(w.message).startswith("Glyph ")]
    notes = [w for w in caught if issubclass(w.category, DatasetWarning) and "no installed font" in str(w.message)]
    assert glyphs == [] and len(notes) == 1 and odd in str(notes[0].message)
    assert any("no installed font draws" in n for n in m["notes"])
    assert "no installed font draws" in (tmp_path / "out" / "report.md").read_text()


def test_scripts_an_installed_fallback_font_draws_are_not_reported_missing():
    from transferlab.report.plots import font_families, missing_glyphs

    cjk = {"Noto Sans CJK JP", "Noto Sans CJK SC", "WenQuanYi Zen Hei", "Droid Sans Fallback", "Source Han Sans"}
    if not cjk & set(font_families()):
        pytest.skip("no CJK font installed on this machine (e.g. apt install fonts-wqy-zenhei)")
    assert missing_glyphs(["日本 猫", "한국어"]) in ([], ["국", "어", "한"])  # WenQuanYi draws Hangul too


def test_above_forty_classes_only_the_selected_methods_confusion_matrix_is_drawn(tmp_path, cache_dir):
    # "a confusion matrix of 101 classes needs no 9 copies" (issue 16): at 150 classes six of them took 12 s.
    from transferlab.study import run_study

    from .conftest import make_imagefolder, tiny_study

    names = [f"c{i:02d}" for i in range(41)]
    data = make_imagefolder(tmp_path / "data", {"train": dict.fromkeys(names, 3), "test": dict.fromkeys(names, 1)})
    m = run_study(tiny_study(data, tmp_path / "out", cache_dir))
    drawn = sorted(p.parent.name for p in (tmp_path / "out" / "methods").glob("*/confusion.png"))
    assert drawn == [m["selected"]] and len(m["methods"]) > 1
    assert all((tmp_path / "out" / "methods" / n / "report.tsv").exists() for n in m["methods"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "only the selected method's confusion matrix is drawn" in md
    assert md.count("/confusion.png)") == 1

    few = make_imagefolder(
        tmp_path / "few", {"train": dict.fromkeys(names[:3], 6), "test": dict.fromkeys(names[:3], 2)}
    )
    m = run_study(tiny_study(few, tmp_path / "out2", cache_dir))
    drawn = sorted(p.parent.name for p in (tmp_path / "out2" / "methods").glob("*/confusion.png"))
    assert drawn == sorted(m["methods"])


def test_a_figure_drawn_from_the_same_data_is_kept_not_drawn_again(tmp_path, monkeypatch):
    """A rerun redrew every figure (60% of a warm `transferlab demo`); a PNG drawn from the same arguments by the same
    code is now kept. Other data, another title, a PNG of an earlier version (no key) or a damaged file: drawn."""
    from matplotlib.figure import Figure

    saves = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: saves.append(a[0]) or real(self, *a, **kw))
    cm = np.array([[5, 1], [2, 7]])
    path = tmp_path / "cm.png"
    plots.plot_confusion_matrix(cm, ["a", "b"], path, title="svm")
    first = path.read_bytes()
    assert len(saves) == 1 and Image.open(path).text[plots.FIGURE_KEY]
    plots.plot_confusion_matrix(cm.copy(), ["a", "b"], path, title="svm")
    assert len(saves) == 1 and path.read_bytes() == first  # the same data: kept
    plots.plot_confusion_matrix(cm, ["a", "b"], path, title="logreg")
    plots.plot_confusion_matrix(cm + np.eye(2, dtype=int), ["a", "b"], path, title="logreg")
    assert len(saves) == 3
    Image.open(path).convert("RGB").save(path)  # an earlier version's PNG: no key
    plots.plot_confusion_matrix(cm + np.eye(2, dtype=int), ["a", "b"], path, title="logreg")
    path.write_bytes(b"not a png")
    plots.plot_confusion_matrix(cm + np.eye(2, dtype=int), ["a", "b"], path, title="logreg")
    assert len(saves) == 5 and Image.open(path).format == "PNG"
    history = {"epoch": [1, 2], "lr": [1e-3, 1e-4]}
    plots.plot_lr_schedule(history, tmp_path / "lr.png")
    plots.plot_lr_schedule({"epoch": [1, 2], "lr": [1e-3, 1e-5]}, tmp_path / "lr.png")
    plots.plot_lr_schedule({"epoch": [1, 2], "lr": [1e-3, 1e-5]}, path=tmp_path / "lr.png")
    assert len(saves) == 7


def test_figures_kept_in_the_store_are_copied_into_another_folder_not_drawn(tmp_path, monkeypatch):
    """A warm rerun into another folder redrew every figure: the cache's `figures/` store keeps each by its key. A
    store that cannot be written costs nothing but the copy."""
    from matplotlib.figure import Figure

    saves = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: saves.append(a[0]) or real(self, *a, **kw))
    cm = np.array([[5, 1], [2, 7]])
    store = tmp_path / "cache" / "figures"
    with plots.figure_store(store):
        plots.plot_confusion_matrix(cm, ["a", "b"], tmp_path / "run1" / "cm.png", title="svm")
        plots.plot_confusion_matrix(cm, ["a", "b"], tmp_path / "run2" / "methods" / "cm.png", title="svm")
    assert len(saves) == 1 and len(list(store.glob("*.png"))) == 1
    assert (tmp_path / "run2" / "methods" / "cm.png").read_bytes() == (tmp_path / "run1" / "cm.png").read_bytes()
    plots.plot_confusion_matrix(cm, ["a", "b"], tmp_path / "run3" / "cm.png", title="svm")  # no store: drawn
    assert len(saves) == 2
    blocked = tmp_path / "file"
    blocked.write_text("a file where the store's folder would be")
    with plots.figure_store(blocked / "figures"):
        plots.plot_confusion_matrix(cm, ["a", "b"], tmp_path / "run4" / "cm.png", title="svm")
    assert len(saves) == 3 and (tmp_path / "run4" / "cm.png").is_file()


def test_a_study_rerun_into_another_folder_draws_no_figure_again(tmp_path, cache_dir, monkeypatch):
    from matplotlib.figure import Figure

    from transferlab.study import run_study

    from .conftest import make_imagefolder, tiny_study

    data = make_imagefolder(
        tmp_path / "data", {"train": {"a": 6, "b": 6}, "valid": {"a": 2, "b": 2}, "test": {"a": 3, "b": 3}}
    )
    run_study(tiny_study(data, tmp_path / "run1", cache_dir))
    saves = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: saves.append(a[0]) or real(self, *a, **kw))
    run_study(tiny_study(data, tmp_path / "run2", cache_dir))
    assert saves == []
    first = sorted(p.relative_to(tmp_path / "run1") for p in (tmp_path / "run1").rglob("*.png"))
    assert first and first == sorted(p.relative_to(tmp_path / "run2") for p in (tmp_path / "run2").rglob("*.png"))


def test_reading_a_figures_key_does_not_decode_its_pixels(tmp_path, monkeypatch):
    """Checking whether a figure can be kept read the whole PNG (PIL's `text` decodes the image to find chunks after
    the pixels): 0.12 s of a 0.57 s warm report. The key is written before the pixels and read from there."""
    from PIL import ImageFile

    path = plots.plot_lr_schedule({"epoch": [1, 2], "lr": [1e-3, 1e-4]}, tmp_path / "lr.png")
    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real(self))
    assert plots._drawn_from(path) and loads == []
