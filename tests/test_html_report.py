"""report.html: self-contained (embedded PNGs and thumbnails, no network), rendered by headless Chromium."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.report.html import page, table, thumbnail_uri, write_html
from transferlab.study import StudyConfig, run_study

from .conftest import make_imagefolder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("html")
    data = make_imagefolder(
        tmp / "data", {"train": {"ant": 12, "bee": 8, "cat": 5}, "test": {"ant": 4, "bee": 3, "cat": 2}}
    )
    cfg = StudyConfig(
        data=str(data),
        out=str(tmp / "run"),
        backbone="test_efficientnet",
        weights="random",
        input_size=(32, 40),
        epochs=5,
        cache_dir=str(tmp / "cache"),
        progress=False,
        num_workers=0,
        valid_fraction=0.25,
    )
    run_study(cfg)
    return Path(cfg.out)


def _predictions(run_dir: Path, method: str) -> list[dict]:
    with open(run_dir / "methods" / method / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_csv_agrees_with_metrics(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for method, m in metrics["methods"].items():
        rows = _predictions(run_dir, method)
        assert list(rows[0]) == ["path", "true", "predicted", "p_predicted", "p_true", "correct"]
        assert len(rows) == metrics["n_test"]
        assert all(Path(r["path"]).is_absolute() and Path(r["path"]).exists() for r in rows)
        correct = [r["true"] == r["predicted"] for r in rows]
        assert [r["correct"] == "1" for r in rows] == correct
        assert np.mean(correct) == pytest.approx(m["accuracy"])
        cm = np.zeros((3, 3), dtype=int)
        for r in rows:
            cm[metrics["classes"].index(r["true"]), metrics["classes"].index(r["predicted"])] += 1
        assert cm.tolist() == m["confusion_matrix"]
        for r in rows:
            assert 0.0 <= float(r["p_predicted"]) <= 1.0 and 0.0 <= float(r["p_true"]) <= 1.0
            if r["correct"] == "1":
                assert r["p_predicted"] == r["p_true"]


def test_report_html_is_self_contained(run_dir):
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "http://" not in text and "https://" not in text  # nothing to fetch: opens from disk, offline
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", text)  # every image and link is embedded or in-page
    for heading in (
        "Setup",
        "Results (test set)",
        "Per-class results (test set)",
        "Timings",
        "Plots",
        "Most confident mistakes",
        "Correctly classified examples per class",
    ):
        assert heading in text, heading
    assert text.count('<table class="sortable">') >= 5
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(pngs) >= 4  # class distribution, learning curves, lr, confusion matrices
    thumbs = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', text)
    assert thumbs
    import base64
    import io

    with Image.open(io.BytesIO(base64.b64decode(thumbs[0]))) as im:
        assert im.format == "JPEG" and max(im.size) <= 200
    # the softmax head (5 epochs at lr 1e-4) still errs: its most confident mistake comes first
    wrong = [r for r in _predictions(run_dir, "softmax") if r["correct"] == "0"]
    assert wrong
    top = max(wrong, key=lambda r: float(r["p_predicted"]))
    section = text[text.index('id="mistakes-softmax"') :]
    section = section[: re.search(r"<h[23] ", section[1:]).start()]
    assert section.count('class="thumb"') == min(24, len(wrong))
    assert re.search(r'class="thumb" title="([^"]+)"', section).group(1) == top["path"]


def test_write_html_survives_missing_images(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    rows = _predictions(copy, "softmax")
    with open(
        copy / "methods" / "softmax" / "predictions.csv", "w", newline=""
    ) as f:  # point every row at a file that is gone
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "path": str(tmp_path / "gone" / Path(r["path"]).name)} for r in rows)
    text = write_html(copy).read_text()
    assert "image not readable" in text
    assert thumbnail_uri(tmp_path / "missing.png") is None


def _chromium(*args: str, tmp: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@needs_chromium
def test_chromium_renders_tables_and_thumbnails(run_dir, tmp_path):
    url = (run_dir / "report.html").resolve().as_uri()
    dom = _chromium("--virtual-time-budget=3000", "--dump-dom", url, tmp=tmp_path).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    # set by the page's script once the window loaded: every <img> decoded to real pixels
    assert int(attrs["data-images-total"]) > 5
    assert attrs["data-images-loaded"] == attrs["data-images-total"]
    assert int(attrs["data-sortable-tables"]) >= 5
    assert 'class="thumb"' in dom and 'class="pinned"' in dom and 'title="click to sort"' in dom

    shot = tmp_path / "report.png"
    _chromium("--screenshot=" + str(shot), "--window-size=1366,900", url, tmp=tmp_path)
    with Image.open(shot) as im:
        assert im.size == (1366, 900)
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.std() > 10  # text and cards, not a blank page
    print(f"screenshot: {shot}")


@needs_chromium
def test_chromium_sorts_tables(tmp_path):
    rows = [
        ["class", "F1", "support"],
        ["b boat", "0.500", "10"],
        ["a ant", "0.900", "2"],
        ["c cat", "–", "7"],
        ["accuracy", "0.700", "19"],
    ]
    probe = """<script>
      var ths=document.querySelectorAll('th'), out=[];
      function order(){return Array.prototype.map.call(document.querySelectorAll('tbody tr'),
                               function(r){return r.cells[0].textContent;}).join('|');}
      ths[1].click(); out.push(order()); ths[1].click(); out.push(order()); ths[2].click(); out.push(order());
      ths[0].click(); out.push(order());
      document.body.setAttribute('data-probe', out.join(';'));
    </script>"""
    html_text = page("sort", table(rows, pinned=1)).replace("</body>", probe + "</body>")
    path = tmp_path / "sort.html"
    path.write_text(html_text)
    dom = _chromium("--virtual-time-budget=1000", "--dump-dom", path.as_uri(), tmp=tmp_path).stdout
    probe_value = re.search(r'data-probe="([^"]*)"', dom).group(1)
    assert probe_value.split(";") == [
        "b boat|a ant|c cat|accuracy",  # F1 ascending, the missing value last, the pinned row stays at the bottom
        "a ant|b boat|c cat|accuracy",  # F1 descending
        "a ant|c cat|b boat|accuracy",  # support ascending, numerically (2 < 7 < 10)
        "a ant|b boat|c cat|accuracy",  # class names
    ]


def test_headline_and_gallery_name_the_selected_method_not_the_best_validation_split_score():
    """Issue 18, bug 2: the page crowned the best validation-split macro-F1 whatever --cv / --select-metric chose."""
    from transferlab.report.html import headline

    per_class = {"a": {"recall": 1.0}}
    methods = {
        "split_best": {
            "accuracy": 0.8,
            "macro_f1": 0.8,
            "balanced_accuracy": 0.8,
            "train_seconds": 1.0,
            "valid": {"macro_f1": 0.99, "accuracy": 0.6},
            "per_class": per_class,
        },
        "cv_best": {
            "accuracy": 0.7,
            "macro_f1": 0.7,
            "balanced_accuracy": 0.7,
            "train_seconds": 1.0,
            "valid": {"macro_f1": 0.50, "accuracy": 0.5},
            "per_class": per_class,
        },
    }
    metrics = {
        "methods": methods,
        "classes": ["a"],
        "counts": {"train": {"a": 3}},
        "selected": "cv_best",
        "selection": {
            "metric": "accuracy",
            "protocol": "5-fold CV on train + valid",
            "scores": {"split_best": {"accuracy": 0.81}, "cv_best": {"accuracy": 0.86}},
        },
    }
    page = headline(metrics)
    crowned = re.findall(r'<div class="card best"><h3>(\w+)<span class="badge">selected', page)
    assert crowned == ["cv_best"]
    assert "by accuracy on the 5-fold CV on train + valid" in page and "0.860" in page
    # a baseline CV did not score showed its validation split's score among the CV scores
    methods["baseline"] = {**methods["split_best"], "valid": {"accuracy": 0.95}}
    card = headline(metrics).split("<h3>baseline")[1].split("</div>")[0]
    assert "<dt>selection: CV accuracy</dt><dd>–</dd>" in card and "0.950" not in card, card
