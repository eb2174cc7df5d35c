"""`transferlab compare`: one table across runs, the best run/method chosen on validation only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from transferlab.cli import main
from transferlab.report.compare import best, rows
from transferlab.study import StudyConfig, run_study

from .conftest import make_imagefolder


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("compare")
    data = make_imagefolder(
        tmp / "data", {"train": {"ant": 12, "bee": 8, "cat": 5}, "test": {"ant": 4, "bee": 3, "cat": 2}}
    )
    runs = []
    for size in ((32, 40), (40, 48)):  # the same data at two input sizes
        cfg = StudyConfig(
            data=str(data),
            out=str(tmp / f"run{size[0]}"),
            backbone="test_efficientnet",
            weights="random",
            input_size=size,
            epochs=3,
            cache_dir=str(tmp / "cache"),
            progress=False,
            num_workers=0,
            valid_fraction=0.25,
            methods=["softmax", "svm"],  # the seed's study
        )
        run_study(cfg)
        runs.append(Path(cfg.out))
    return runs


def test_compare_table_and_best_on_validation(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, two_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Best on validation" in printed
    table = rows(two_runs)
    assert [(r["run"], r["method"]) for r in table] == [
        ("run32", "softmax"),
        ("run32", "svm"),
        ("run40", "softmax"),
        ("run40", "svm"),
    ]
    for r, run in zip(table, [two_runs[0]] * 2 + [two_runs[1]] * 2):
        m = json.loads((run / "metrics.json").read_text())["methods"][r["method"]]
        assert r["accuracy"] == m["accuracy"] and r["macro_f1"] == m["macro_f1"]
        assert r["valid_macro_f1"] == m["valid"]["macro_f1"] and r["train_seconds"] == m["train_seconds"]
        assert r["extract_seconds"] is not None and r["extract_seconds"] > 0  # computed in these runs
    top = best(table)
    assert top["valid_macro_f1"] == max(r["valid_macro_f1"] for r in table)
    md = (out / "compare.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| run")]
    assert len(lines) == 5  # run32, run40 (the header starts with '| run' too)
    assert md.count("★") == 2 and f"{top['run']} / {top['method']}" in md
    assert "not directly comparable" not in md  # same data, same test set
    html = (out / "compare.html").read_text()
    assert '<table class="sortable">' in html and "32x40" in html and "40x48" in html
    assert "http://" not in html and "https://" not in html


def test_best_ignores_test_numbers():
    table = [
        {"run": "a", "method": "x", "valid_macro_f1": 0.5, "macro_f1": 0.9},
        {"run": "b", "method": "y", "valid_macro_f1": 0.6, "macro_f1": 0.1},
    ]
    assert best(table)["run"] == "b"
    assert best([{**r, "valid_macro_f1": None} for r in table]) is None


def test_compare_chooses_on_what_each_run_selected_on(two_runs, tmp_path, capsys):
    cfg = StudyConfig(
        data=str(two_runs[0].parent / "data"),
        out=str(tmp_path / "cv3"),
        backbone="test_efficientnet",
        weights="random",
        input_size=(32, 40),
        epochs=3,
        cache_dir=str(two_runs[0].parent / "cache"),
        progress=False,
        num_workers=0,
        valid_fraction=0.25,
        cv=3,
        methods=["softmax", "svm"],
    )
    run_study(cfg)
    m = json.loads((tmp_path / "cv3" / "metrics.json").read_text())
    assert m["selection"]["protocol"] == "3-fold CV on train + valid"
    table = rows([two_runs[0], tmp_path / "cv3"])
    for r in table:
        if r["run"] == "cv3":  # the CV score the run selected on, not its split's
            assert r["valid_protocol"] == "3-fold CV on train + valid"
            assert r["valid_macro_f1"] == m["selection"]["scores"][r["method"]]["macro_f1"]
        else:
            assert r["valid_protocol"] == "validation split"
    assert any(
        r["valid_macro_f1"] != m["methods"][r["method"]]["valid"]["macro_f1"] for r in table if r["run"] == "cv3"
    )
    assert main(["compare", str(two_runs[0]), str(tmp_path / "cv3")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "comes from different protocols (3-fold CV on train + valid; validation split)" in printed
    assert main(["compare", str(tmp_path / "cv3")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "different protocols" not in printed and "3-fold CV on train + valid;" in printed


def test_compare_different_data_warns_and_missing_run_is_an_error(two_runs, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    m = json.loads((two_runs[0] / "metrics.json").read_text())
    m["counts"]["test"]["ant"] += 1
    m["config"]["data"] = "/elsewhere"
    (other / "metrics.json").write_text(json.dumps(m))
    assert main(["compare", str(two_runs[0]), str(other)]) == 0
    assert "differ in data folder, test set: their test numbers are not directly comparable" in " ".join(
        capsys.readouterr().out.split()
    )
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert re.search(r"not a transferlab run folder", capsys.readouterr().err)


def test_best_ranks_by_the_metric_each_run_selected_on():
    """Issue 18, bug 2: compare ranked by macro-F1 whatever --select-metric the runs used."""
    from transferlab.report.compare import caveats

    table = [
        {
            "run": "a",
            "method": "x",
            "valid_macro_f1": 0.9,
            "select_metric": "accuracy",
            "select_score": 0.70,
            "macro_f1": 0.5,
            "valid_protocol": "validation split",
        },
        {
            "run": "a",
            "method": "y",
            "valid_macro_f1": 0.6,
            "select_metric": "accuracy",
            "select_score": 0.95,
            "macro_f1": 0.5,
            "valid_protocol": "validation split",
        },
    ]
    assert best(table)["method"] == "y"
    mixed = table + [{**table[0], "run": "b", "select_metric": "macro_f1", "select_score": 0.9}]
    assert any(
        "selected on different metrics" in c
        for c in caveats([{**r, "data": "d", "test_counts": {}, "classes": []} for r in mixed])
    )


def test_compare_a_folder_of_runs_compares_the_runs_in_it(two_runs, tmp_path, capsys):
    """`transferlab compare runs/` (runs written by --out runs/a, --out runs/b) was 'not a transferlab run
    folder': it now compares the runs one level down, in name order (the data and cache folders beside them hold no
    metrics.json and are passed over)."""
    parent = two_runs[0].parent
    assert not (parent / "metrics.json").exists() and (parent / "data").is_dir()
    assert main(["compare", str(parent)]) == 0
    assert "Best on validation" in capsys.readouterr().out
    assert rows([parent]) == rows(two_runs)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "no metrics.json in it or in its subfolders" in capsys.readouterr().err
