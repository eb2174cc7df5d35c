from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import classification_report

from transferlab.cli import main
from transferlab.data.datasets import DatasetWarning
from transferlab.study import StudyConfig, run_study

TINY = [
    "--backbone",
    "test_efficientnet",
    "--weights",
    "random",
    "--input-size",
    "32x40",
    "--no-progress",
    "--workers",
    "0",
]


def _cfg(data, out, cache_dir, **kw):
    kw.setdefault("methods", ["softmax", "svm"])  # the seed's study
    return StudyConfig(
        data=str(data),
        out=str(out),
        backbone="test_efficientnet",
        weights="random",
        input_size=(32, 40),
        epochs=kw.pop("epochs", 5),
        cache_dir=str(cache_dir),
        progress=False,
        num_workers=0,
        **kw,
    )


@pytest.fixture
def study(small_folder, tmp_path, cache_dir):
    cfg = _cfg(small_folder, tmp_path / "run", cache_dir, valid_fraction=0.25)
    return cfg, run_study(cfg)


def test_metrics_json_has_stable_keys(study):
    cfg, metrics = study
    saved = json.loads((Path(cfg.out) / "metrics.json").read_text())
    for key in ("backbone", "input_size", "seed", "classes", "n_train", "n_valid", "n_test", "extract", "methods"):
        assert key in saved, key
    assert saved["input_size"] == [32, 40] and saved["classes"] == ["ant", "bee", "cat"]
    assert saved["n_train"] + saved["n_valid"] == 25 and saved["n_test"] == 9
    assert {"seconds", "images", "from_cache"} <= set(saved["extract"]) and saved["extract"]["images"] == 34
    for name in ("softmax", "svm"):
        m = saved["methods"][name]
        for key in (
            "accuracy",
            "macro_f1",
            "weighted_f1",
            "balanced_accuracy",
            "train_seconds",
            "predict_seconds",
            "per_class",
        ):
            assert key in m, (name, key)
        assert set(m["per_class"]) == {"ant", "bee", "cat"}
        assert set(m["per_class"]["ant"]) >= {"precision", "recall", "f1", "support"}
        assert m["train_seconds"] > 0


def test_report_tables_match_sklearn_and_files_are_written(study):
    cfg, metrics = study
    out = Path(cfg.out)
    for name in (
        "plots/class_distribution.png",
        "methods/softmax/learning_curves.png",
        "methods/softmax/lr.png",
        "methods/softmax/confusion.png",
        "methods/svm/confusion.png",
        "methods/softmax/history.csv",
        "methods/softmax/report.tsv",
        "methods/svm/report.tsv",
        "report.md",
    ):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for section in ("## Setup", "## Results (test set)", "### Per-class results", "## Timings", "## Findings"):
        assert section in report
    m = metrics["methods"]["softmax"]
    # the seed-layout table in the .tsv agrees with sklearn's classification_report on the same predictions
    tsv = (out / "methods" / "softmax" / "report.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["class", "precision", "recall", "f1-score", "support"]
    assert len(tsv) == 1 + 3 + 3  # header, three present classes, accuracy, macro, weighted
    cm = np.array(m["confusion_matrix"])
    y_true = np.repeat(np.arange(3), cm.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(3), row) for row in cm])
    ref = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    assert float(tsv[-2].split("\t")[3]) == pytest.approx(ref["macro avg"]["f1-score"], abs=5e-4)
    assert m["macro_f1"] == pytest.approx(ref["macro avg"]["f1-score"])
    hist = (out / "methods" / "softmax" / "history.csv").read_text().splitlines()
    assert hist[0].split(",") == ["epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr"]
    assert len(hist) == 1 + 5


def test_run_folder_layout(study):
    """At the top only what a person opens first; per-method files, models and data plots in three folders."""
    cfg, metrics = study
    out = Path(cfg.out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.html", "report.md", "metrics.json", "config.yaml", "README.txt", "methods", "models", "plots"]
    )
    assert len((out / "README.txt").read_text().splitlines()) == 3
    assert sorted(p.name for p in (out / "methods").iterdir()) == sorted(metrics["methods"]) == ["softmax", "svm"]
    assert sorted(p.name for p in (out / "methods" / "softmax").iterdir()) == [
        "confusion.png",
        "history.csv",
        "learning_curves.png",
        "lr.png",
        "predictions.csv",
        "report.tsv",
    ]
    assert sorted(p.name for p in (out / "methods" / "svm").iterdir()) == [
        "confusion.png",
        "predictions.csv",
        "report.tsv",
    ]
    assert sorted(p.name for p in (out / "models").iterdir()) == ["softmax", "svm"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["class_distribution.png", "data_efficiency.png"]
    # report.md links every figure by its path in the run folder; each one exists
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (out / "report.md").read_text())
    assert sorted(links) == sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert "](plots/class_distribution.png)" in (out / "report.md").read_text()


def test_same_seed_same_metrics_and_second_run_uses_cache(study, tmp_path, cache_dir, small_folder):
    cfg, first = study
    again = run_study(_cfg(small_folder, tmp_path / "run2", cache_dir, valid_fraction=0.25))
    assert again["extract"]["from_cache"] == 34 and again["extract"]["computed"] == 0
    for name in ("softmax", "svm"):
        a, b = first["methods"][name], again["methods"][name]
        assert a["per_class"] == b["per_class"] and a["confusion_matrix"] == b["confusion_matrix"]
        assert a["accuracy"] == b["accuracy"] and a["macro_f1"] == b["macro_f1"]


def test_a_rerun_into_the_same_folder_sets_aside_the_earlier_runs_other_methods(small_folder, tmp_path, cache_dir):
    """A second run into the same --out with fewer methods left the first run's bundles in models/ (they still
    predicted) beside a report that no longer spoke of them. They are moved aside, whole, with one warning."""
    import transferlab

    out = tmp_path / "run"
    args = [str(small_folder), "--out", str(out), "--cache-dir", str(cache_dir), *TINY, "--epochs", "3"]
    assert main(["run", *args, "--methods", "softmax,svm,logreg"]) == 0
    with pytest.warns(DatasetWarning, match=r"methods this run did not fit \(logreg\): moved to"):
        assert main(["run", *args, "--methods", "softmax,svm"]) == 0
    assert sorted(p.name for p in (out / "models").iterdir()) == ["softmax", "svm"]
    assert sorted(p.name for p in (out / "methods").iterdir()) == ["softmax", "svm"]
    (earlier,) = (out / "earlier").iterdir()
    images = sorted(str(p) for p in (small_folder / "test").rglob("*.png"))[:2]
    assert len(transferlab.load(earlier / "models" / "logreg").predict(images)) == 2  # set aside whole: it predicts
    assert (earlier / "methods" / "logreg" / "predictions.csv").exists()
    assert any("earlier run" in n for n in json.loads((out / "metrics.json").read_text())["notes"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)  # the same methods again: nothing to set aside
        assert main(["run", *args, "--methods", "softmax,svm"]) == 0
    assert len(list((out / "earlier").iterdir())) == 1
    # a rerun that draws no data-efficiency curve left the earlier run's plot in plots/, linked from no report
    assert (out / "plots" / "data_efficiency.png").exists()
    assert main(["run", *args, "--methods", "softmax,svm", "--no-data-efficiency"]) == 0
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["class_distribution.png"]
    assert "data_efficiency.png" not in (out / "report.md").read_text()


def test_extract_save_makes_its_folder_and_names_the_file_it_wrote(small_folder, tmp_path, cache_dir, capsys):
    # `--save new/feats` failed after the extraction (no such folder), and without .npz printed a name np.savez
    # had not written
    save = tmp_path / "new" / "feats"
    assert main(["extract", str(small_folder), "--cache-dir", str(cache_dir), "--save", str(save), *TINY]) == 0
    assert f"saved {save}.npz" in capsys.readouterr().out
    assert np.load(f"{save}.npz")["features"].shape[0] == 34
    # an existing folder: features.npz in it, as predict's and export's outputs (it wrote folder.npz beside it)
    assert main(["extract", str(small_folder), "--cache-dir", str(cache_dir), "--save", str(save.parent), *TINY]) == 0
    assert f"saved {save.parent / 'features.npz'}" in capsys.readouterr().out


def test_averages_cover_only_classes_present_in_test(tmp_path, cache_dir):
    from .conftest import make_imagefolder

    root = make_imagefolder(tmp_path / "d", {"train": {"a": 8, "b": 8, "c": 6}, "test": {"a": 3, "b": 3}})
    metrics = run_study(_cfg(root, tmp_path / "out", cache_dir))
    m = metrics["methods"]["svm"]
    assert set(m["per_class"]) == {"a", "b"}
    assert m["macro_f1"] == pytest.approx(np.mean([m["per_class"][c]["f1"] for c in ("a", "b")]))
    rows = [
        line.split("\t")[0] for line in (tmp_path / "out" / "methods" / "svm" / "report.tsv").read_text().splitlines()
    ]
    assert rows == ["class", "0 a", "1 b", "accuracy", "macro avg", "weighted avg"]


def test_cli_run_and_errors(small_folder, tmp_path, cache_dir, capsys):
    out = tmp_path / "cli"
    rc = main(["run", str(small_folder), "--out", str(out), "--epochs", "3", "--cache-dir", str(cache_dir), *TINY])
    assert rc == 0 and (out / "metrics.json").exists()
    assert "softmax" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "missing"), "--out", str(out), *TINY]) == 2
    assert "dataset not found" in capsys.readouterr().err
    assert main(["run", str(small_folder), "--methods", "magic", *TINY]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["run", str(small_folder), "--backbone", "nope_net", "--input-size", "32"]) == 2
    assert "unknown backbone" in capsys.readouterr().err


def test_demo_runs_offline_end_to_end(tmp_path, monkeypatch):
    """`transferlab demo`: embedded data + embedded backbone, no network (kept small for CI)."""
    import transferlab.cli as cli
    import transferlab.data.demo as demo

    real = demo.build_demo_dataset
    monkeypatch.setattr(
        demo, "build_demo_dataset", lambda root, seed=0: real(root, seed=seed, size=32, max_per_class=12)
    )
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    assert metrics["weights"].startswith("embedded:") and len(metrics["classes"]) == 10
    # ten classes: chance is 0.1. 14 test images, so one image is 0.07: over ten validation carves the svm
    # scores 0.21-0.36 (mean 0.30, the same for seeded permutations and content-drawn carves)
    assert metrics["methods"]["svm"]["accuracy"] > 0.2


def test_extract_splits_times_the_warm_path_without_repeating_a_warm_pass(
    small_folder, tmp_path, cache_dir, tiny_backbone, monkeypatch
):
    import transferlab.study as S
    from transferlab.data.datasets import discover

    calls = []
    real = S.extract_features

    def counting(paths, bb, **kw):
        calls.append(kw.get("view", "plain"))
        return real(paths, bb, **kw)

    monkeypatch.setattr(S, "extract_features", counting)
    cfg = _cfg(small_folder, tmp_path / "run", cache_dir, valid_fraction=0.25)
    ds = discover(cfg.data, seed=cfg.seed, valid_fraction=cfg.valid_fraction, test_fraction=cfg.test_fraction)
    _, cold = S.extract_splits(cfg, ds, tiny_backbone)
    assert calls == ["plain", "plain"] and cold["computed"] == 34  # computed, then one fully cached pass timed
    assert 0 < cold["cached_seconds"] != cold["seconds"]
    calls.clear()
    _, warm = S.extract_splits(cfg, ds, tiny_backbone)
    assert calls == ["plain"] and warm["computed"] == 0  # already the warm path: not read a second time
    assert warm["cached_seconds"] == warm["seconds"]


def test_metrics_time_every_stage_and_the_total(small_folder, tmp_path, cache_dir):
    """Issue 16 (nothing silent): metrics.json's `timings` has extract, heads, analysis, report and total, the stages
    add up to at most the total, and report.md's Timings section lists the stages it could time."""
    m = run_study(_cfg(small_folder, tmp_path / "run", cache_dir, valid_fraction=0.25))
    t = json.loads((tmp_path / "run" / "metrics.json").read_text())["timings"]
    assert list(t) == ["extract", "heads", "analysis", "report", "total"] and m["timings"] == t
    assert all(v > 0 for v in t.values())
    assert sum(t[k] for k in ("extract", "heads", "analysis", "report")) <= t["total"] + 1e-6
    md = (tmp_path / "run" / "report.md").read_text()
    assert "stage: extract" in md and "stage: heads" in md and "stage: analysis" in md


def test_progress_shows_each_stage_after_extraction(small_folder, tmp_path, cache_dir, capsys, monkeypatch):
    import rich
    from rich.console import Console

    monkeypatch.setattr(rich, "_console", Console(width=120))  # wide enough for every description whole
    cfg = _cfg(small_folder, tmp_path / "run", cache_dir, valid_fraction=0.25)
    cfg.progress = True
    m = run_study(cfg)
    shown = capsys.readouterr().out
    for stage in ("heads", "analysis: selection, statistics, leakage", "report: bundles, tables, plots, report.html"):
        assert stage in shown
    # the report advances per method's files and plots, not in two steps (16 s at 150 classes with one step left)
    steps = len(m["methods"]) + 5
    (line,) = [r for r in shown.splitlines() if "report: bundles, tables" in r]
    assert f"{steps}/{steps}" in line, line


def test_three_images_a_class_run_by_default_and_refuse_validation_selection_before_extraction(
    tmp_path, cache_dir, capsys
):
    """Three images a class leave two in train and none in valid. The default run died in a tuned head's final fit
    (a one-point grid took a holdout it had no images for) and then in the data-efficiency curve (scored on the
    empty validation split); --methods all died after the extraction; --methods all --cv 2 died in LDA's fit on
    folds of one image a class, losing the other heads."""
    from .conftest import make_imagefolder

    data = make_imagefolder(tmp_path / "tiny", {"all": {f"c{i}": 3 for i in range(4)}}) / "all"
    args = [str(data), "--cache-dir", str(cache_dir), *TINY, "--epochs", "3"]
    assert main(["run", *args, "--out", str(tmp_path / "default")]) == 0
    m = json.loads((tmp_path / "default" / "metrics.json").read_text())
    assert m["n_valid"] == 0 and m["selection"]["cv"]["k"] == 2 and len(m["methods"]) == 6
    assert "data_efficiency" not in m and any("validation split is empty" in n for n in m["notes"])

    capsys.readouterr()
    assert main(["run", *args, "--out", str(tmp_path / "all"), "--methods", "all"]) == 2
    assert "the validation split is empty and class 'c0' has 2 training image(s)" in capsys.readouterr().err

    with pytest.warns(DatasetWarning, match="lda could not be fitted on these data and is left out"):
        assert main(["run", *args, "--out", str(tmp_path / "cv2"), "--methods", "all", "--cv", "2"]) == 0
    m = json.loads((tmp_path / "cv2" / "metrics.json").read_text())
    assert "lda" not in m["methods"] and {"svm_tuned", "logreg", "knn"} <= set(m["methods"])
    assert any(n.startswith("lda could not be fitted") for n in m["notes"])


def test_out_holding_a_users_files_of_the_reports_names_is_refused_before_any_work(small_folder, tmp_path, capsys):
    """`--out .` in a project folder replaced its README.txt and config.yaml with the run's, silently."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.txt").write_text("my notes\n")
    (project / "config.yaml").write_text("lr: 3\n")
    args = [str(small_folder), "--cache-dir", str(tmp_path / "c"), *TINY, "--methods", "svm"]
    assert main(["run", *args, "--out", str(project)]) == 2
    err = capsys.readouterr().err
    assert "holds config.yaml, README.txt that transferlab did not write" in err, err
    assert (project / "README.txt").read_text() == "my notes\n" and not (tmp_path / "c").exists()
    run = tmp_path / "run"  # a run folder of its own is rerun into as before
    assert main(["run", *args, "--out", str(run)]) == 0
    assert main(["run", *args, "--out", str(run)]) == 0


def test_the_python_entry_point_runs_the_study_and_loads_its_selected_model(small_folder, tmp_path):
    import transferlab

    out = tmp_path / "run"
    kw = dict(backbone="test_efficientnet", weights="random", input_size=(32, 40), epochs=3, progress=False)
    metrics = transferlab.run(
        small_folder, out=out, cache_dir=tmp_path / "c", num_workers=0, methods=["svm", "lda"], **kw
    )
    assert metrics == json.loads((out / "metrics.json").read_text()) | {"timings": metrics["timings"]}
    model = transferlab.load(out)
    assert model.path == out / "models" / metrics["selected"]
    with pytest.raises(TypeError, match="learning_rate"):
        transferlab.run(small_folder, out=out, learning_rate=3)
    for size in ("32x40", [32, 40], 32):  # as the CLI and config files take it (a string was read as characters)
        assert StudyConfig(data="d", input_size=size).input_size == ((32, 32) if size == 32 else (32, 40))
    assert StudyConfig(data="d", input_size="auto").input_size == "auto"
