"""plots: every function writes a readable PNG, including degenerate inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from transferlab.report import plots

BOATS = ["Alilaguna", "Ambulanza", "Barchino", "Cacciapesca", "Caorlina", "Gondola", "Lanciafino10m",
         "Lanciafino10mBianca", "Lanciafino10mMarrone", "Lanciamaggioredi10mBianca", "Motobarca", "Motopontonerettangolare",
         "MotoscafoACTV", "Mototopo", "Patanella", "Polizia"]


def check_png(path, min_size=(300, 200)):
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        assert im.size[0] < 5000 and im.size[1] < 5000
        return im.size


def history(n=12, valid=True):
    h = {"epoch": list(range(1, n + 1)),
         "train_loss": [2.0 / (e + 1) for e in range(n)], "train_acc": [1 - 0.5 / (e + 1) for e in range(n)],
         "lr": [1e-3 * 0.5 ** (e // 4) for e in range(n)]}
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
    w, h = check_png(plots.plot_confusion_matrix(cm, BOATS, tmp_path / "cm.png", title="svm: confusion (test)"),
                     min_size=(800, 800))
    check_png(plots.plot_confusion_matrix(cm, BOATS, tmp_path / "cm_raw.png", normalize=False))


def test_confusion_matrix_large_unannotated(tmp_path):
    cm = np.eye(25, dtype=int) * 5
    check_png(plots.plot_confusion_matrix(cm, [f"c{i}" for i in range(25)], tmp_path / "cm25.png"))


def test_class_distribution(tmp_path):
    rng = np.random.default_rng(1)
    counts = {split: {c: int(rng.integers(0, 500) * f) for c in BOATS} for split, f in
              (("train", 1.0), ("valid", 0.1), ("test", 0.3))}
    counts["test"][BOATS[2]] = 0
    check_png(plots.plot_class_distribution(counts, BOATS, tmp_path / "dist.png", title="Images per class"))


def test_data_efficiency(tmp_path):
    points = {"softmax": [(5, 0.2), (10, 0.3), (20, 0.41), (50, 0.5)],
              "svm": [(50, 0.58), (5, 0.25), (20, 0.47), (10, 0.35)]}
    check_png(plots.plot_data_efficiency(points, tmp_path / "eff.png", title="data efficiency"))
    check_png(plots.plot_data_efficiency({}, tmp_path / "empty.png"))
