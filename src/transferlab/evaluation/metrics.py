"""Metrics in the seed report's layout, bootstrap intervals and McNemar's test.

Per-class rows and averages cover the classes present in ``y_true`` only (a test set may
lack some training classes), exactly as the seed's classification tables did.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
)

from ..warning_filters import warning_filter

HEADER = ["class", "precision", "recall", "f1-score", "support"]


def _labels(y, n_classes: int, name: str) -> np.ndarray:
    y = np.asarray(y).astype(np.int64, copy=False).ravel()
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name} has labels outside 0..{n_classes - 1}")
    return y


def evaluate(y_true, y_pred, classes: list[str], proba=None) -> dict:
    """Accuracy, macro/weighted P/R/F1, balanced accuracy, per-class rows and the confusion matrix."""
    k = len(classes)
    y_true, y_pred = _labels(y_true, k, "y_true"), _labels(y_pred, k, "y_pred")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels, y_pred {len(y_pred)}")
    present = np.unique(y_true).tolist()
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    out = {"n": len(y_true), "accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average=avg, zero_division=0)
        out.update({f"{avg}_precision": float(ap), f"{avg}_recall": float(ar), f"{avg}_f1": float(af)})
    # Ignored, as intended: predicted classes absent from y_true, and a test set of one class all predicted as
    # it (its internal confusion matrix is then 1 x 1, which is right for a mean recall over present classes).
    with (
        warning_filter("ignore", UserWarning, "y_pred contains classes not in y_true"),
        warning_filter("ignore", UserWarning, "A single label was found in 'y_true' and 'y_pred'"),
    ):
        out["balanced_accuracy"] = float(balanced_accuracy_score(y_true, y_pred))  # = mean recall over present
    out["per_class"] = {
        classes[c]: {
            "index": c,
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, c in enumerate(present)
    }
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=list(range(k))).tolist()
    if proba is not None:
        with warning_filter("ignore", UserWarning):  # rows that do not sum exactly to one
            out["log_loss"] = float(log_loss(y_true, np.asarray(proba, dtype=np.float64), labels=list(range(k))))
    return out


def report_table(metrics: dict, classes: list[str]) -> list[list[str]]:
    """The seed's table as rows of strings: header, one row per present class, accuracy, macro and weighted avg."""

    def fmt(*values) -> list[str]:
        return [f"{float(v):.3f}" for v in values]

    rows = [list(HEADER)]
    for name, pc in metrics["per_class"].items():
        rows.append([f"{pc['index']} {name}", *fmt(pc["precision"], pc["recall"], pc["f1"], pc["support"])])
    acc, n = metrics["accuracy"], metrics["n"]
    rows.append(["accuracy", *fmt(acc, acc, acc, acc)])
    for avg in ("macro", "weighted"):
        rows.append(
            [f"{avg} avg", *fmt(metrics[f"{avg}_precision"], metrics[f"{avg}_recall"], metrics[f"{avg}_f1"], n)]
        )
    return rows


def format_report(metrics: dict, classes: list[str], sep: str = "\t") -> str:
    """The seed's text form of ``report_table`` (tab-separated by default)."""
    return "\n".join(sep.join(row) for row in report_table(metrics, classes))


def count_metrics(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and balanced accuracy from stacked confusion counts (B, K, K); present classes only."""
    tp = np.diagonal(counts, axis1=1, axis2=2).astype(np.float64)
    support, predicted = counts.sum(axis=2), counts.sum(axis=1)
    present = support > 0
    n_present = present.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(present, tp / support, 0.0)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)  # = 2PR/(P+R), 0 if undefined
    return {
        "accuracy": tp.sum(axis=1) / support.sum(axis=1),
        "macro_f1": (f1 * present).sum(axis=1) / n_present,
        "balanced_accuracy": recall.sum(axis=1) / n_present,
    }


def bootstrap_ci(y_true, y_pred, n_classes: int, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Percentile bootstrap intervals (resampling test images) for accuracy, macro-F1, balanced accuracy."""
    y_true, y_pred = _labels(y_true, n_classes, "y_true"), _labels(y_pred, n_classes, "y_pred")
    n, k = len(y_true), n_classes
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one sample")
    rng = np.random.default_rng(seed)
    codes = y_true * k + y_pred
    chunk = max(1, 2_000_000 // n)  # resamples per batch, bounds memory for large test sets
    parts = {key: [] for key in ("accuracy", "macro_f1", "balanced_accuracy")}
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        flat = codes[idx] + (np.arange(b) * k * k)[:, None]
        counts = np.bincount(flat.ravel(), minlength=b * k * k).reshape(b, k, k)
        for key, values in count_metrics(counts).items():
            parts[key].append(values)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    return {key: [float(v) for v in np.percentile(np.concatenate(vals), q)] for key, vals in parts.items()}


def mcnemar(y_true, pred_a, pred_b) -> dict:
    """McNemar's test on paired correctness; exact binomial when b + c < 25, else chi-square with continuity correction."""
    y_true, pred_a, pred_b = (np.asarray(v).ravel() for v in (y_true, pred_a, pred_b))
    right_a, right_b = pred_a == y_true, pred_b == y_true
    b, c = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    if b + c == 0:
        return {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "method": "exact"}
    if b + c < 25:
        p = stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p_value": float(min(1.0, p)), "method": "exact"}
    statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)
    return {
        "b": b,
        "c": c,
        "statistic": float(statistic),
        "p_value": float(stats.chi2.sf(statistic, df=1)),
        "method": "chi2",
    }


def full_proba(est, X, n_classes: int) -> np.ndarray:
    """predict_proba over all classes (an estimator only knows the classes it saw)."""
    p = est.predict_proba(X)
    full = np.zeros((len(X), n_classes), dtype=np.float64)
    full[:, np.asarray(est.classes_, dtype=int)] = p
    return full
