"""The validation search that tunes a head, and the scores every choice in transferlab is made on.

The protocol, the same for every tuned head and every method:
- default (validation split): each grid point is fitted on the training split and scored on the validation
  split with the select metric (macro-F1 by default); the best point wins (ties: then accuracy, balanced
  accuracy, grid order). The head is that point's model as fitted on train, so its validation numbers are
  the ones the choice was made on and it sees the same data as the seed methods;
- `cv=K` (K >= 2): each grid point is scored by stratified K-fold cross-validation over train + valid
  pooled (out-of-fold predictions, scored once: rare classes count with all their images instead of the
  one or two the validation split holds); the winner is then fitted on train.
No function here takes test data: selection cannot read test labels. The grids themselves are in
`heads.tuned`; the choice among methods is `evaluation.selection`.

Parameters named in `posthoc` act at prediction time only (logit adjustment), so their values are scored on
one fitted model instead of refitting it.
"""

from __future__ import annotations

import time

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import ParameterGrid
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from ..data.datasets import Sample, stratified_split
from ..warning_filters import warning_filter
from .inputs import eval_set_inputs, fit_inputs

METRICS = ("macro_f1", "accuracy", "balanced_accuracy")


def score(y_true, y_pred) -> dict[str, float]:
    """Accuracy, macro-F1 and balanced accuracy over the classes present in y_true (as `evaluate` does).

    The same numbers as scikit-learn's `f1_score(labels=present, average="macro", zero_division=0)`,
    `accuracy_score` and `balanced_accuracy_score` (tested), from one confusion count: CV scores every grid point
    of every fold this way, where scikit-learn's input checks cost ~14 ms a call."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels, codes = np.unique(np.concatenate([y_true.ravel(), y_pred.ravel()]), return_inverse=True)
    t, p = codes[: y_true.size], codes[y_true.size :]
    n = len(labels)
    support = np.bincount(t, minlength=n)
    predicted = np.bincount(p, minlength=n)
    tp = np.bincount(t[t == p], minlength=n)
    present = support > 0
    f1 = 2 * tp[present] / (support[present] + predicted[present])  # 2TP / (2TP + FP + FN)
    return {
        "macro_f1": float(f1.mean()) if present.any() else 0.0,
        "accuracy": float(tp.sum() / max(y_true.size, 1)),
        "balanced_accuracy": float((tp[present] / support[present]).mean()) if present.any() else 0.0,
    }


def _fit_predict(estimator, params: dict, posthoc: list[dict], X_fit, y_fit, X_score, keep: bool) -> dict:
    """One fit of one grid point (one fold), predictions for each of its prediction-time settings."""
    t0 = time.perf_counter()
    with threadpool_limits(1), warning_filter("ignore", ConvergenceWarning):
        try:
            model = clone(estimator).set_params(**params).fit(X_fit, y_fit)
            preds = [model.set_params(**p).predict(X_score) for p in posthoc]
        except (ValueError, np.linalg.LinAlgError) as exc:
            return {"error": str(exc)}
    return {"preds": preds, "seconds": time.perf_counter() - t0, "model": model if keep else None}


def cv_folds(y, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled, seeded k-fold (train, test) indices; classes rarer than k spread as they can."""
    from sklearn.model_selection import StratifiedKFold

    with warning_filter("ignore", UserWarning, "The least populated class"):  # classes rarer than k
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def cross_val_scores(estimator, X, y, k: int, seed: int = 0) -> dict[str, float]:
    """The three metrics of pooled out-of-fold predictions of an unfitted estimator (k-fold, stratified)."""
    X, y = np.asarray(X), np.asarray(y)
    pred = np.empty_like(y)
    with threadpool_limits(1), warning_filter("ignore", ConvergenceWarning):
        for a, b in cv_folds(y, k, seed):
            pred[b] = clone(estimator).fit(X[a], y[a]).predict(X[b])
    return score(y, pred)


def rank_key(scores: dict[str, float], metric: str) -> tuple:
    return (scores[metric], *(scores[m] for m in METRICS if m != metric))


def holdout_split(y, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, holdout): a stratified, seeded share of each class held out (the datasets' rule). Labels
    may be of any sortable kind: classes are taken in sorted order, as `stratified_split` takes indices."""
    codes = np.unique(np.asarray(y), return_inverse=True)[1].ravel()
    moved = stratified_split([Sample(str(i), int(c), "fit") for i, c in enumerate(codes)], fraction, "holdout", seed)
    hold = np.array([s.split == "holdout" for s in moved])
    return np.flatnonzero(~hold), np.flatnonzero(hold)


def _model_has(method: str):
    """For `available_if`: the chosen model has `method` (before fit: the estimator searched over has it)."""

    def check(self) -> bool:
        return hasattr(getattr(self, "best_estimator_", self.estimator), method)

    return check


class ValidationSearch(ClassifierMixin, BaseEstimator):
    """Tune `estimator` over `param_grid` on validation data; then behave as the best fitted model.

    `fit(X, y, eval_set=(X_valid, y_valid))` fits every grid point on (X, y) and scores it on the
    validation data; without `eval_set`, a stratified `holdout` share of (X, y) plays that part and the
    winner is refitted on all of (X, y). With `cv` >= 2, every point is scored instead by stratified
    `cv`-fold cross-validation over (X, y) and the validation data pooled (out-of-fold predictions,
    scored once), and the winner is refitted on (X, y). `search_params` are set only while searching
    (e.g. no probability calibration); the winner is refitted without them. Grid points (and folds) are fitted in
    `n_jobs` processes (joblib; default 1, in-process; below 4 MB of features always in-process), each
    with `n_threads` BLAS/OpenMP threads (default 1: problems this small run up to 30x slower with threads
    on shared, busy cores, and one thread makes the choice independent of the machine). After fit:
    `best_params_`, `best_valid_` (the three validation metrics), `results_` (every point),
    `best_estimator_`, `search_seconds_`.
    """

    def __init__(
        self,
        estimator,
        param_grid,
        scoring: str = "macro_f1",
        posthoc: tuple = (),
        search_params: dict | None = None,
        cv: int = 0,
        holdout: float = 0.2,
        n_jobs: int | None = 1,
        n_threads: int | None = 1,
        seed: int = 0,
    ):
        self.estimator = estimator
        self.param_grid = param_grid
        self.scoring = scoring
        self.posthoc = posthoc
        self.search_params = search_params
        self.cv = cv
        self.holdout = holdout
        self.n_jobs = n_jobs
        self.n_threads = n_threads
        self.seed = seed

    def fit(self, X, y, eval_set: tuple | None = None):
        with threadpool_limits(self.n_threads):
            return self._fit(X, y, eval_set)

    def _splits(self, X, y, eval_set) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(X_fit, y_fit, X_score, y_score) per fold: one for a validation split, `cv` for cross-validation."""
        has_valid = eval_set is not None and len(eval_set[1])
        if self.cv and self.cv >= 2:
            Xp, yp = (np.concatenate([X, eval_set[0]]), np.concatenate([y, eval_set[1]])) if has_valid else (X, y)
            self.validation_ = f"{self.cv}-fold CV on train{' + valid' if has_valid else ''}"
            return [(Xp[a], yp[a], Xp[b], yp[b]) for a, b in cv_folds(yp, self.cv, self.seed)]
        if has_valid:
            self.validation_ = "validation split"
            return [(X, y, eval_set[0], eval_set[1])]
        fit_idx, hold_idx = holdout_split(y, self.holdout, self.seed)
        if not len(hold_idx):
            smallest = np.unique(y, return_counts=True)[1].min()
            raise ValueError(
                f"no validation data: pass eval_set or give each class at least three images "
                f"(got n_samples={len(y)}, the smallest class has {smallest})"
            )
        self.validation_ = f"holdout {self.holdout:.0%} of train"
        return [(X[fit_idx], y[fit_idx], X[hold_idx], y[hold_idx])]

    def _fit(self, X, y, eval_set):
        if self.scoring not in METRICS:
            raise ValueError(f"scoring must be one of {', '.join(METRICS)}, got '{self.scoring}'")
        t0 = time.perf_counter()
        X, y = fit_inputs(self, X, y)
        eval_set = eval_set_inputs(self, eval_set)
        points = list(ParameterGrid(self.param_grid))
        if len(points) == 1 and not (self.cv and self.cv >= 2) and (eval_set is None or not len(eval_set[1])):
            self.validation_ = "none (one grid point, no validation split)"  # nothing to choose: no holdout
            return self._fit_only_point(points[0], X, y, None, t0)
        folds = self._splits(X, y, eval_set)
        if len(points) == 1 and self.validation_ == "validation split":  # nothing to choose: fit it once
            return self._fit_only_point(points[0], X, y, folds[0], t0)
        search = dict(self.search_params or {})
        groups: dict[tuple, list[dict]] = {}
        for point in ParameterGrid(self.param_grid):
            key = tuple(sorted((k, repr(v)) for k, v in point.items() if k not in self.posthoc))
            groups.setdefault(key, []).append(point)
        keep = len(folds) == 1 and not search  # the search's own model is the final one: no refit
        tasks = [
            (
                {**search, **{k: v for k, v in points[0].items() if k not in self.posthoc}},
                [{k: v for k, v in p.items() if k in self.posthoc} for p in points],
                fold,
            )
            for points in groups.values()
            for fold in folds
        ]
        small = X.nbytes < 4_000_000  # process start-up (seconds) would cost more than it saves
        done = Parallel(n_jobs=1 if small else self.n_jobs)(
            delayed(_fit_predict)(self.estimator, params, post, Xf, yf, Xs, keep)
            for params, post, (Xf, yf, Xs, _) in tasks
        )
        self.results_, best, best_model = [], None, None
        for g, points in enumerate(groups.values()):
            runs = done[g * len(folds) : (g + 1) * len(folds)]
            failed = next((r["error"] for r in runs if "error" in r), None)
            if failed:  # e.g. more neighbours than images
                self.results_ += [{"params": p, "valid": None, "error": failed} for p in points]
                continue
            true = np.concatenate([f[3] for f in folds])
            for i, p in enumerate(points):
                s = score(true, np.concatenate([r["preds"][i] for r in runs]))
                self.results_.append({"params": p, "valid": s, "fit_seconds": sum(r["seconds"] for r in runs)})
                if best is None or rank_key(s, self.scoring) > rank_key(best["valid"], self.scoring):
                    best, best_model = self.results_[-1], runs[0]["model"]
        if best is None:
            raise ValueError(f"every grid point failed: {self.results_[0].get('error')}")
        self.best_params_ = dict(best["params"])
        self.best_valid_ = best["valid"]
        self.best_score_ = best["valid"][self.scoring]
        if keep and self.validation_ == "validation split":
            self.best_estimator_ = best_model.set_params(
                **{k: v for k, v in self.best_params_.items() if k in self.posthoc}
            )
        else:  # fold models, a holdout, or search-only settings: refit the winner on (X, y)
            with warning_filter("ignore", ConvergenceWarning):
                self.best_estimator_ = clone(self.estimator).set_params(**self.best_params_).fit(X, y)
        self.search_seconds_ = time.perf_counter() - t0
        return self

    def _fit_only_point(self, point: dict, X, y, fold, t0: float):
        """A one-point grid (e.g. hyperparameters chosen by `evaluation.crossval`): the final model (without
        search-only settings) is fitted once on (X, y) and scored on the validation split `fold` (None: no score)."""
        with warning_filter("ignore", ConvergenceWarning):
            model = clone(self.estimator).set_params(**point).fit(X, y)
        s = score(fold[3], model.predict(fold[2])) if fold is not None else None  # None: nothing to score on
        self.results_ = [{"params": point, "valid": s, "fit_seconds": time.perf_counter() - t0}]
        self.best_params_, self.best_valid_, self.best_score_ = dict(point), s, s[self.scoring] if s else None
        self.best_estimator_ = model
        self.search_seconds_ = time.perf_counter() - t0
        return self

    @property
    def classes_(self):
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.classes_

    def predict(self, X):
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.predict(X)

    @available_if(_model_has("predict_proba"))
    def predict_proba(self, X):
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.predict_proba(X)

    @available_if(_model_has("decision_function"))
    def decision_function(self, X):
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.decision_function(X)

    def summary(self) -> dict:
        """What the search chose and from what, for metrics.json and the report."""
        check_is_fitted(self, "best_estimator_")
        out = {
            "best_params": self.best_params_,
            "valid": self.best_valid_,
            "scoring": self.scoring,
            "validation": self.validation_,
            "grid_points": len(self.results_),
            "failed": sum(r["valid"] is None for r in self.results_),
            "search_seconds": self.search_seconds_,
            "results": self.results_,
        }
        if hasattr(self.best_estimator_, "summary"):  # e.g. an ensemble: what its members chose (on train)
            out["inner"] = self.best_estimator_.summary()
        return out


def fixed(estimator, proba: bool = False):
    """The estimator with its chosen hyperparameters, unfitted, without extras that only predict_proba needs
    (the SVMs' calibration) unless `proba`. A fitted ensemble: the same vote over its members so fixed (with their
    probabilities, which the vote needs)."""
    if isinstance(estimator, ValidationSearch) and hasattr(estimator.best_estimator_, "fixed"):
        estimator = estimator.best_estimator_  # e.g. an ensemble inside a one-point search (nested CV)
    if hasattr(estimator, "fixed"):  # it knows its own fixed form (`SoftVoteEnsemble.fixed`)
        return estimator.fixed()
    if isinstance(estimator, ValidationSearch):
        base = clone(estimator.best_estimator_)
        if not proba:
            base.set_params(**(estimator.search_params or {}))
    else:
        base = clone(estimator)
    if proba:
        return base
    off = {k: False for k in base.get_params() if k.split("__")[-1] == "probability"}
    return base.set_params(**off)
