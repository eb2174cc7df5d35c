"""evaluation: metrics against sklearn, the seed's table layout, bootstrap intervals, McNemar."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, classification_report, confusion_matrix, log_loss

from transferlab.evaluation.metrics import bootstrap_ci, evaluate, format_report, mcnemar, report_table
from transferlab.report.format import interval, markdown_table, number, p_value, seconds

CLASSES = [f"boat{i}" for i in range(8)]


def imbalanced_case(n=600, seed=0, accuracy=0.7):
    """8 classes, very imbalanced; classes 2 and 6 absent from y_true but predicted sometimes."""
    rng = np.random.default_rng(seed)
    weights = np.array([0.5, 0.2, 0, 0.12, 0.08, 0.06, 0, 0.04])
    y_true = rng.choice(8, size=n, p=weights / weights.sum())
    y_pred = np.where(rng.random(n) < accuracy, y_true, rng.integers(0, 8, n))
    y_pred[:5] = 2  # make sure the absent classes are predicted
    y_pred[5:8] = 6
    return y_true, y_pred


@pytest.fixture(scope="module")
def case():
    y_true, y_pred = imbalanced_case()
    return y_true, y_pred, evaluate(y_true, y_pred, CLASSES)


def test_evaluate_matches_sklearn_classification_report(case):
    y_true, y_pred, m = case
    present = sorted(set(y_true.tolist()))
    assert 2 not in present and 6 not in present and {2, 6} <= set(y_pred.tolist())
    ref = classification_report(y_true, y_pred, labels=present, output_dict=True, zero_division=0)
    assert list(m["per_class"]) == [CLASSES[c] for c in present]
    for c in present:
        row, want = m["per_class"][CLASSES[c]], ref[str(c)]
        assert row["index"] == c
        assert row["support"] == want["support"]
        for key, ref_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert row[key] == pytest.approx(want[ref_key])
    for avg in ("macro", "weighted"):
        assert m[f"{avg}_precision"] == pytest.approx(ref[f"{avg} avg"]["precision"])
        assert m[f"{avg}_recall"] == pytest.approx(ref[f"{avg} avg"]["recall"])
        assert m[f"{avg}_f1"] == pytest.approx(ref[f"{avg} avg"]["f1-score"])
    assert m["accuracy"] == pytest.approx(np.mean(y_true == y_pred))
    assert m["n"] == len(y_true)
    assert np.array_equal(m["confusion_matrix"], confusion_matrix(y_true, y_pred, labels=range(8)))
    assert len(m["confusion_matrix"]) == 8 and sum(m["confusion_matrix"][2]) == 0
    json.dumps(m)  # JSON-serialisable as is


def test_balanced_accuracy_is_mean_recall_over_present(case):
    y_true, y_pred, m = case
    recalls = [r["recall"] for r in m["per_class"].values()]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert m["balanced_accuracy"] == pytest.approx(m["macro_recall"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))


def test_a_test_set_of_one_class_all_predicted_right_is_scored_without_a_warning():
    # a CSV manifest whose only test image of one class was missing: scikit-learn's balanced accuracy warned
    # "A single label was found in 'y_true' and 'y_pred'" on the user's screen, twice
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = evaluate([0, 0, 0], [0, 0, 0], ["forest", "street"], proba=[[0.9, 0.1]] * 3)
    assert m["accuracy"] == m["balanced_accuracy"] == m["macro_f1"] == 1.0
    assert m["confusion_matrix"] == [[3, 0], [0, 0]]


def test_evaluate_log_loss_and_bad_labels():
    y_true, y_pred = imbalanced_case(n=200, seed=3)
    proba = np.full((200, 8), 0.02)
    proba[np.arange(200), y_pred] = 1 - 0.02 * 7
    m = evaluate(y_true, y_pred, CLASSES, proba=proba)
    assert m["log_loss"] == pytest.approx(log_loss(y_true, proba, labels=range(8)))
    with pytest.raises(ValueError):
        evaluate([0, 8], [0, 1], CLASSES)


def test_format_report_layout(case):
    y_true, _, m = case
    text = format_report(m, CLASSES)
    lines = text.split("\n")
    rows = [line.split("\t") for line in lines]
    n_present = len(set(y_true.tolist()))
    assert rows[0] == ["class", "precision", "recall", "f1-score", "support"]
    assert len(rows) == 1 + n_present + 3
    assert [r[0] for r in rows[-3:]] == ["accuracy", "macro avg", "weighted avg"]
    assert rows[1][0] == "0 boat0"
    for r in rows[1:]:
        assert len(r) == 5
        for cell in r[1:]:
            assert len(cell.split(".")[1]) == 3, cell
    acc = f"{m['accuracy']:.3f}"
    assert rows[-3][1:] == [acc] * 4
    assert rows[-2][4] == rows[-1][4] == f"{len(y_true)}.000"
    assert rows[1][4] == f"{m['per_class']['boat0']['support']}.000"
    assert report_table(m, CLASSES) == rows
    assert format_report(m, CLASSES, sep=",").split("\n")[0] == "class,precision,recall,f1-score,support"


def test_markdown_table_alignment():
    md = markdown_table([["method", "accuracy", "notes"], ["svm", "0.872", "fast | cheap"], ["softmax", "–", "x"]])
    lines = md.split("\n")
    assert lines[0] == "| method | accuracy | notes |"
    assert lines[1] == "| --- | ---: | --- |"
    assert "fast \\| cheap" in lines[2]
    assert len(lines) == 4


def test_shared_formatters():
    assert number(0.87249) == "0.872" and number(np.float32(0.5), 1) == "0.5" and number(12) == "12"
    assert number(None) == number(float("nan")) == "–" and number("x") == "x"
    assert seconds(3.14159) == "3.14 s" and seconds(200) == "3m 20s" and seconds(None) == seconds(math.nan) == "–"
    assert p_value(0.0001234) == "0.00012" and p_value(0.04567) == "0.046"
    assert interval(0.8, [0.75, 0.85]) == "0.800 [0.750, 0.850]" and interval(0.8, None) == "0.800"
    assert interval(None, [0.1, 0.2]) == "–"


def test_bootstrap_ci_contains_point_and_is_seeded(case):
    y_true, y_pred, m = case
    ci = bootstrap_ci(y_true, y_pred, 8, n_boot=1000, seed=0)
    assert set(ci) == {"accuracy", "macro_f1", "balanced_accuracy"}
    for key in ci:
        lo, hi = ci[key]
        assert lo <= m[key] <= hi, (key, lo, m[key], hi)
        assert 0 < hi - lo < 0.3
    assert bootstrap_ci(y_true, y_pred, 8, n_boot=1000, seed=0) == ci
    assert bootstrap_ci(y_true, y_pred, 8, n_boot=1000, seed=1) != ci


def test_bootstrap_ci_matches_sklearn_on_a_resample():
    """The count-matrix metrics equal sklearn's on one resample (present classes only)."""
    from transferlab.evaluation.metrics import count_metrics as _count_metrics

    y_true, y_pred = imbalanced_case(n=300, seed=5)
    idx = np.random.default_rng(0).integers(0, 300, 300)
    counts = confusion_matrix(y_true[idx], y_pred[idx], labels=range(8))[None]
    got = _count_metrics(counts)
    ref = evaluate(y_true[idx], y_pred[idx], CLASSES)
    for key in ("accuracy", "macro_f1", "balanced_accuracy"):
        assert got[key][0] == pytest.approx(ref[key])


def test_bootstrap_ci_shrinks_with_n():
    widths = []
    for n in (200, 3200):
        y_true, y_pred = imbalanced_case(n=n, seed=1)
        lo, hi = bootstrap_ci(y_true, y_pred, 8, n_boot=500, seed=0)["accuracy"]
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_bootstrap_ci_16_classes_the_seed_test_set_shape():
    """The seed's test-set shape (1324 images, 16 classes, some absent from a resample): intervals around the point."""
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 16, 1324)
    y_pred = np.where(rng.random(1324) < 0.8, y_true, rng.integers(0, 16, 1324))
    ci = bootstrap_ci(y_true, y_pred, 16, n_boot=1000)
    point = evaluate(y_true, y_pred, [str(c) for c in range(16)])
    for key, (lo, hi) in ci.items():
        assert lo <= point[key] <= hi


def _pairs(b, c, both_right, both_wrong):
    """Labels and two prediction vectors with the given discordant counts."""
    n = b + c + both_right + both_wrong
    y = np.zeros(n, dtype=int)
    a = np.zeros(n, dtype=int)
    bb = np.zeros(n, dtype=int)
    a[b : b + c] = 1  # a wrong, b right
    bb[:b] = 1  # a right, b wrong
    a[b + c + both_right :] = 1  # both wrong
    bb[b + c + both_right :] = 2
    return y, a, bb


def test_mcnemar_exact():
    y, a, b = _pairs(b=2, c=9, both_right=50, both_wrong=5)
    r = mcnemar(y, a, b)
    assert (r["b"], r["c"], r["method"]) == (2, 9, "exact")
    # two-sided exact binomial: 2 * P(X <= 2), X ~ Bin(11, 0.5) = 2 * (1 + 11 + 55) / 2048
    assert r["p_value"] == pytest.approx(2 * 67 / 2048)
    assert r["p_value"] == pytest.approx(stats.binomtest(2, 11, 0.5).pvalue)


def test_mcnemar_chi2():
    y, a, b = _pairs(b=10, c=25, both_right=100, both_wrong=7)
    r = mcnemar(y, a, b)
    assert (r["b"], r["c"], r["method"]) == (10, 25, "chi2")
    assert r["statistic"] == pytest.approx((15 - 1) ** 2 / 35)  # 5.6
    assert r["p_value"] == pytest.approx(stats.chi2.sf(5.6, 1))
    assert r["p_value"] == pytest.approx(0.01796, abs=1e-5)  # 2 * (1 - Phi(sqrt(5.6)))


def test_mcnemar_identical_predictions():
    y, a, _ = _pairs(b=3, c=4, both_right=10, both_wrong=2)
    r = mcnemar(y, a, a)
    assert r == {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "method": "exact"}
