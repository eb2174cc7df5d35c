"""Analysis of a study's methods: pick one on validation, then the statistics a reviewer asks for on test.

Order matters and is the point: `analyse` first selects the method (validation scores only) and the
baseline it is compared with (the seed procedure better on validation), draws the data-efficiency
curve (train + valid only), and only then reads test predictions for bootstrap intervals, McNemar's
test and per-class recall changes. This module computes; its results go to metrics.json (`selected`,
`selection`, `ci`, `mcnemar`, `data_efficiency`, `recall_changes`), and report/sections.py renders them
as report.md's "Selection and statistics" section and the data-efficiency plot.
"""

from __future__ import annotations

import numpy as np

from ..heads import registry
from ..heads.search import ValidationSearch, cross_val_scores, fixed
from .metrics import bootstrap_ci, mcnemar
from .selection import data_efficiency, select_method


def _fit_X(split):
    return getattr(split, "fit_X", split.X)


def _memo(cache, result: dict, name: str, compute):
    """compute(), kept beside the method's fitted head in `cache` (`head_cache.HeadCache`) when there is one."""
    return compute() if cache is None else cache.memo(result.get("head_key"), name, compute)


def selection_scores(
    results: dict, splits: dict, cv: int = 0, seed: int = 0, cache=None
) -> tuple[dict, str, list[str]]:
    """Each method's validation scores under the protocol, the protocol's name, and methods left out.

    cv < 2: the validation split. cv >= 2: pooled out-of-fold scores of k-fold CV over train + valid
    (a tuned head's are those of its chosen grid point; `finetune` brings its own; other heads are
    cross-validated here).
    """
    tr, va = splits["train"], splits["valid"]
    if cv < 2:
        return {n: r["valid"] for n, r in results.items() if r.get("valid")}, "validation split", []
    X, y = np.concatenate([_fit_X(tr), _fit_X(va)]), np.concatenate([tr.y, va.y])
    scores, left_out = {}, []
    for n, r in results.items():
        est = r["estimator"]
        if isinstance(est, ValidationSearch) and est.cv == cv:
            scores[n] = est.best_valid_
        elif (r.get("cv") or {}).get("k") == cv:  # fine-tuning cross-validated itself (`finetune.fit_method`)
            scores[n] = r["cv"]["scores"]
        elif (
            registry.get(n).build is not None
        ):  # a head on features: cached beside the fitted head (`head_cache`), like the head itself
            scores[n] = _memo(cache, r, f"cv{cv}-{seed}", lambda: cross_val_scores(fixed(est), X, y, cv, seed))
        else:
            left_out.append(n)
    return scores, f"{cv}-fold CV on train + valid", left_out


def efficiency_repeats(method: str) -> int:
    """Draws per point of the data-efficiency curve: 3, or 1 for an ensemble (every draw refits all its members,
    their calibration folds included: three draws cost it a minute on a few thousand images)."""
    return 1 if registry.get(method).kind == "ensemble" else 3


def efficiency_memo(metric: str, seed: int, method: str) -> str:
    """The name the data-efficiency curve of `method`'s fitted head is kept under beside it (`HeadCache.memo`)."""
    return f"data_efficiency-{metric}-{seed}-r{efficiency_repeats(method)}-final"


def analyse(
    results: dict,
    splits: dict,
    classes: list[str],
    *,
    metric: str = "macro_f1",
    seed: int = 0,
    n_boot: int = 1000,
    efficiency: bool = True,
    cv: int = 0,
    cache=None,
    cv_selection: dict | None = None,
) -> dict:
    """Selection (validation, or `cv_selection`: `evaluation.crossval`'s repeated CV, done before the heads were
    fitted), data efficiency (train/valid), then test statistics; see the module doc."""
    if cv_selection is not None:
        scores = {n: r["score"] for n, r in cv_selection["methods"].items()}
        protocol, left_out = cv_selection["protocol"], cv_selection["left_out"]
    else:
        scores, protocol, left_out = selection_scores(results, splits, cv, seed, cache)
    if not scores:
        return {"selected": None, "selection": {"metric": metric, "note": "no validation split: nothing selected"}}
    selection = select_method(scores, metric)
    if cv_selection is not None:  # the noise-aware rule's choice, and why, over the plain ranking
        selection["method"] = cv_selection["method"]
        selection["valid"] = scores[cv_selection["method"]]
        selection["cv"] = {k: v for k, v in cv_selection.items() if k not in ("method", "left_out")}
    chosen = selection["method"]
    # The seed procedure the selected method is compared with per class: the better on the selection's scores of
    # those fitted (a time budget may have skipped one); under repeated CV, where the seed's softmax has no score,
    # the better of the fitted ones on the validation split.
    fitted = [m for m in registry.names("seed") if m in results]
    on = {m: scores[m] for m in fitted if m in scores}
    if cv_selection is not None:
        on = {m: results[m]["valid"] for m in fitted if results[m].get("valid")}
    baseline = select_method(on, metric)["method"] if on else None
    selection.update(baseline=baseline, protocol=protocol, scores=scores, left_out=left_out)
    out = {"selected": chosen, "selection": selection}
    tr, va = splits["train"], splits["valid"]
    if (
        efficiency and registry.get(chosen).build is not None
    ):  # a function of the fitted head and train/valid: cached beside the head
        curve = _memo(
            cache,
            results[chosen],
            efficiency_memo(metric, seed, chosen),
            lambda: data_efficiency(
                results[chosen]["estimator"],
                _fit_X(tr),
                tr.y,
                va.X,
                va.y,
                metric=metric,
                seed=seed,
                repeats=efficiency_repeats(chosen),
                fitted=True,  # the last point is the chosen head itself, fitted on all of train
            ),
        )
        out["data_efficiency"] = {"method": chosen, **curve}

    te = splits["test"]  # test labels are read from here on, after everything above is fixed
    if len(te.y):
        out["ci"] = {
            n: {"n_boot": n_boot, "seed": seed, **bootstrap_ci(te.y, r["test_pred"], len(classes), n_boot, seed)}
            for n, r in results.items()
            if r.get("test_pred") is not None
        }
        out["mcnemar"] = {
            f"{chosen} vs {m}": {
                "a": chosen,
                "b": m,
                **mcnemar(te.y, results[chosen]["test_pred"], results[m]["test_pred"]),
            }
            for m in registry.names("seed")
            if m in results
            and m != chosen
            and results[m].get("test_pred") is not None
            and results[chosen].get("test_pred") is not None
        }
        if baseline and baseline != chosen and "test" in results[chosen] and "test" in results[baseline]:
            out["recall_changes"] = {
                "method": chosen,
                "baseline": baseline,
                "classes": recall_changes(results[chosen]["test"], results[baseline]["test"]),
            }
    return out


def recall_changes(test: dict, base: dict) -> list[dict]:
    """Per test class: recall of the method and of the baseline, largest absolute change first."""
    rows = [
        {
            "class": c,
            "index": pc["index"],
            "support": pc["support"],
            "recall": pc["recall"],
            "baseline_recall": base["per_class"][c]["recall"],
            "change": pc["recall"] - base["per_class"][c]["recall"],
        }
        for c, pc in test["per_class"].items()
    ]
    return sorted(rows, key=lambda r: (-abs(r["change"]), r["index"]))
