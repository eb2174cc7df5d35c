"""Selection: the tuned heads, their grids, the validation search that tunes them, and the choice of method.

The protocol, the same for every tuned head and every method:
- default (validation split): each grid point is fitted on the training split and scored on the validation
  split with the select metric (macro-F1 by default); the best point wins (ties: then accuracy, balanced
  accuracy, grid order). The head is that point's model as fitted on train, so its validation numbers are
  the ones the choice was made on and it sees the same data as the seed methods;
- `cv=K` (K >= 2): each grid point is scored by stratified K-fold cross-validation over train + valid
  pooled (out-of-fold predictions, scored once: rare classes count with all their images instead of the
  one or two the validation split holds); the winner is then fitted on train;
- among the methods of a study, the best score under the same protocol is `selected` (`select_method`).
No function here takes test data: selection cannot read test labels.

Grids are small and run on cached features, so tuning every head costs seconds, not backbone passes.
Parameters named in a spec's `posthoc` act at prediction time only (logit adjustment), so their values
are scored on one fitted model instead of refitting it.
"""

from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.model_selection import ParameterGrid
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from .probes import FeatureTransform, KernelSVMHead, LinearSVMHead, ShrinkageLDAHead, ViewAugmented

METRICS = ("macro_f1", "accuracy", "balanced_accuracy")
DATA_EFFICIENCY_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def score(y_true, y_pred) -> dict[str, float]:
    """Accuracy, macro-F1 and balanced accuracy over the classes present in y_true (as `evaluate` does)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = np.unique(y_true)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bal = balanced_accuracy_score(y_true, y_pred)
    return {"macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(y_true, y_pred)), "balanced_accuracy": float(bal)}


def _fit_predict(estimator, params: dict, posthoc: list[dict], X_fit, y_fit, X_score, keep: bool) -> dict:
    """One fit of one grid point (one fold), predictions for each of its prediction-time settings."""
    t0 = time.perf_counter()
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        try:
            model = clone(estimator).set_params(**params).fit(X_fit, y_fit)
            preds = [model.set_params(**p).predict(X_score) for p in posthoc]
        except (ValueError, np.linalg.LinAlgError) as exc:
            return {"error": str(exc)}
    return {"preds": preds, "seconds": time.perf_counter() - t0, "model": model if keep else None}


def cv_folds(y, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled, seeded k-fold (train, test) indices; classes rarer than k spread as they can."""
    from sklearn.model_selection import StratifiedKFold
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only n members"
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def cross_val_scores(estimator, X, y, k: int, seed: int = 0) -> dict[str, float]:
    """The three metrics of pooled out-of-fold predictions of an unfitted estimator (k-fold, stratified)."""
    X, y = np.asarray(X), np.asarray(y)
    pred = np.empty_like(y)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for a, b in cv_folds(y, k, seed):
            pred[b] = clone(estimator).fit(X[a], y[a]).predict(X[b])
    return score(y, pred)


def _rank_key(scores: dict[str, float], metric: str) -> tuple:
    return (scores[metric], *(scores[m] for m in METRICS if m != metric))


def holdout_split(y, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, holdout): a stratified, seeded share of each class held out (the datasets' rule)."""
    from ..data.datasets import Sample, _stratified_split
    moved = _stratified_split([Sample(str(i), int(c), "fit") for i, c in enumerate(np.asarray(y))], fraction,
                              "holdout", seed)
    hold = np.array([s.split == "holdout" for s in moved])
    return np.flatnonzero(~hold), np.flatnonzero(hold)


class ValidationSearch(ClassifierMixin, BaseEstimator):
    """Tune `estimator` over `param_grid` on validation data; then behave as the best fitted model.

    `fit(X, y, eval_set=(X_valid, y_valid))` fits every grid point on (X, y) and scores it on the
    validation data; without `eval_set`, a stratified `holdout` share of (X, y) plays that part and the
    winner is refitted on all of (X, y). With `cv` >= 2, every point is scored instead by stratified
    `cv`-fold cross-validation over (X, y) and the validation data pooled (out-of-fold predictions,
    scored once), and the winner is refitted on (X, y). `search_params` are set only while searching
    (e.g. no Platt scaling); the winner is refitted without them. Grid points (and folds) are fitted in
    `n_jobs` processes (joblib; default 1, in-process; below 4 MB of features always in-process), each
    with `n_threads` BLAS/OpenMP threads (default 1: problems this small run up to 30x slower with threads
    on shared, busy cores, and one thread makes the choice independent of the machine). After fit:
    `best_params_`, `best_valid_` (the three validation metrics), `results_` (every point),
    `best_estimator_`, `search_seconds_`.
    """

    def __init__(self, estimator, param_grid, scoring: str = "macro_f1", posthoc: tuple = (),
                 search_params: dict | None = None, cv: int = 0, holdout: float = 0.2, n_jobs: int | None = 1,
                 n_threads: int | None = 1, seed: int = 0):
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
            Xp, yp = (np.concatenate([X, np.asarray(eval_set[0])]), np.concatenate([y, np.asarray(eval_set[1])])) \
                if has_valid else (X, y)
            self.validation_ = f"{self.cv}-fold CV on train{' + valid' if has_valid else ''}"
            return [(Xp[a], yp[a], Xp[b], yp[b]) for a, b in cv_folds(yp, self.cv, self.seed)]
        if has_valid:
            self.validation_ = "validation split"
            return [(X, y, np.asarray(eval_set[0]), np.asarray(eval_set[1]))]
        fit_idx, hold_idx = holdout_split(y, self.holdout, self.seed)
        if not len(hold_idx):
            raise ValueError("no validation data: pass eval_set or give each class at least three images")
        self.validation_ = f"holdout {self.holdout:.0%} of train"
        return [(X[fit_idx], y[fit_idx], X[hold_idx], y[hold_idx])]

    def _fit(self, X, y, eval_set):
        if self.scoring not in METRICS:
            raise ValueError(f"scoring must be one of {', '.join(METRICS)}, got '{self.scoring}'")
        t0 = time.perf_counter()
        X, y = np.asarray(X), np.asarray(y)
        folds = self._splits(X, y, eval_set)
        search = dict(self.search_params or {})
        groups: dict[tuple, list[dict]] = {}
        for point in ParameterGrid(self.param_grid):
            key = tuple(sorted((k, repr(v)) for k, v in point.items() if k not in self.posthoc))
            groups.setdefault(key, []).append(point)
        keep = len(folds) == 1 and not search  # the search's own model is the final one: no refit
        tasks = [({**search, **{k: v for k, v in points[0].items() if k not in self.posthoc}},
                  [{k: v for k, v in p.items() if k in self.posthoc} for p in points], fold)
                 for points in groups.values() for fold in folds]
        small = X.nbytes < 4_000_000  # process start-up (seconds) would cost more than it saves
        done = Parallel(n_jobs=1 if small else self.n_jobs)(
            delayed(_fit_predict)(self.estimator, params, post, Xf, yf, Xs, keep)
            for params, post, (Xf, yf, Xs, _) in tasks)
        self.results_, best, best_model = [], None, None
        for g, points in enumerate(groups.values()):
            runs = done[g * len(folds):(g + 1) * len(folds)]
            failed = next((r["error"] for r in runs if "error" in r), None)
            if failed:  # e.g. more neighbours than images
                self.results_ += [{"params": p, "valid": None, "error": failed} for p in points]
                continue
            true = np.concatenate([f[3] for f in folds])
            for i, p in enumerate(points):
                s = score(true, np.concatenate([r["preds"][i] for r in runs]))
                self.results_.append({"params": p, "valid": s, "fit_seconds": sum(r["seconds"] for r in runs)})
                if best is None or _rank_key(s, self.scoring) > _rank_key(best["valid"], self.scoring):
                    best, best_model = self.results_[-1], runs[0]["model"]
        if best is None:
            raise ValueError(f"every grid point failed: {self.results_[0].get('error')}")
        self.best_params_ = dict(best["params"])
        self.best_valid_ = best["valid"]
        self.best_score_ = best["valid"][self.scoring]
        if keep and self.validation_ == "validation split":
            self.best_estimator_ = best_model.set_params(**{k: v for k, v in self.best_params_.items()
                                                            if k in self.posthoc})
        else:  # fold models, a holdout, or search-only settings: refit the winner on (X, y)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                self.best_estimator_ = clone(self.estimator).set_params(**self.best_params_).fit(X, y)
        self.search_seconds_ = time.perf_counter() - t0
        return self

    @property
    def classes_(self):
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.classes_

    @property
    def n_features_in_(self):
        return self.best_estimator_.n_features_in_

    def predict(self, X):
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.predict(X)

    def predict_proba(self, X):
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.predict_proba(X)

    def decision_function(self, X):
        check_is_fitted(self, "best_estimator_")
        return self.best_estimator_.decision_function(X)

    def summary(self) -> dict:
        """What the search chose and from what, for metrics.json and the report."""
        check_is_fitted(self, "best_estimator_")
        out = {"best_params": self.best_params_, "valid": self.best_valid_, "scoring": self.scoring,
               "validation": self.validation_, "grid_points": len(self.results_),
               "failed": sum(r["valid"] is None for r in self.results_),
               "search_seconds": self.search_seconds_, "results": self.results_}
        if hasattr(self.best_estimator_, "summary"):  # e.g. an ensemble: what its members chose (on train)
            out["inner"] = self.best_estimator_.summary()
        return out


def _pipe(clf, features: str = "standard") -> Pipeline:
    return Pipeline([("features", FeatureTransform(features)), ("clf", clf)])


@dataclass(frozen=True)
class HeadSpec:
    """A tuned head: `build(seed, epochs)` makes the pipeline, `grid` is searched on validation."""
    build: Callable[[int, int], Pipeline]
    grid: list[dict]
    description: str
    posthoc: tuple[str, ...] = ()
    search_params: dict = field(default_factory=dict)


def _softmax(seed: int, epochs: int) -> Pipeline:
    from .seed import SoftmaxHead
    return _pipe(SoftmaxHead(epochs=epochs, batch_size=128, class_weight="balanced", seed=seed))


TUNED: dict[str, HeadSpec] = {
    "svm_tuned": HeadSpec(
        build=lambda seed, epochs: _pipe(KernelSVMHead(class_weight="balanced", seed=seed)),
        grid=[{"clf__C": [1.0, 10.0, 100.0], "clf__gamma_scale": [0.125, 0.25, 0.5, 1.0]}],
        search_params={"clf__probability": False},
        description="RBF SVM, standardised features, class_weight=balanced; C x gamma on validation"),
    "logreg": HeadSpec(
        build=lambda seed, epochs: _pipe(LogisticRegression(class_weight="balanced", max_iter=1000,
                                                            random_state=seed)),
        grid=[{"features__kind": ["standard", "pca_whiten"], "clf__C": [1e-3, 1e-2, 1e-1]}],
        description="multinomial logistic regression (L-BFGS), class_weight=balanced; features x C on validation"),
    "linear_svm": HeadSpec(
        build=lambda seed, epochs: _pipe(LinearSVMHead(class_weight="balanced", tol=1e-2, random_state=seed)),
        grid=[{"clf__C": [1e-4, 1e-3, 1e-2]}],
        description="linear SVM (LinearSVC, one-vs-rest), standardised features, class_weight=balanced; "
                    "C on validation"),
    "lda": HeadSpec(
        build=lambda seed, epochs: _pipe(ShrinkageLDAHead()),
        grid=[{"clf__class_weight": ["balanced", None]}],
        description="linear discriminant analysis, Ledoit-Wolf shrinkage of the shared covariance, standardised "
                    "features; class priors uniform (balanced) or as in train, on validation"),
    "knn": HeadSpec(
        build=lambda seed, epochs: _pipe(KNeighborsClassifier(metric="cosine", algorithm="brute", weights="distance"),
                                         "l2"),
        grid=[{"features__kind": ["l2", "standard"], "clf__n_neighbors": [1, 3, 5, 10, 20]}],
        description="k nearest neighbours, cosine, distance-weighted; features x k on validation"),
    "softmax_tuned": HeadSpec(
        build=_softmax,
        grid=[{"clf__lr": [1e-3, 1e-2], "clf__weight_decay": [0.0, 1e-4], "clf__class_weight": ["balanced"],
               "clf__logit_adjust": [0.0]},
              {"clf__lr": [1e-3, 1e-2], "clf__weight_decay": [0.0, 1e-4], "clf__class_weight": [None],
               "clf__logit_adjust": [0.5, 1.0]}],
        posthoc=("clf__logit_adjust",),
        description="softmax layer (Adam, batch 128), standardised features; lr x weight decay x "
                    "(class_weight=balanced | logit adjustment tau) on validation"),
}


def make_tuned(name: str, *, seed: int = 0, epochs: int = 50, scoring: str = "macro_f1", cv: int = 0,
               flip_train: bool = False) -> ValidationSearch:
    """A tuned head; with `flip_train` its pipeline trains on plain and flipped views (`ViewAugmented`)."""
    spec = TUNED[name]
    est, grid, posthoc, search = spec.build(seed, epochs), spec.grid, spec.posthoc, dict(spec.search_params)
    if flip_train:
        est = ViewAugmented(est)
        grid = [{f"estimator__{k}": v for k, v in g.items()} for g in grid]
        posthoc = tuple(f"estimator__{k}" for k in posthoc)
        search = {f"estimator__{k}": v for k, v in search.items()}
    return ValidationSearch(est, grid, scoring=scoring, posthoc=posthoc, search_params=search, cv=cv, seed=seed)


ENSEMBLE_MEMBERS = ("svm_tuned", "logreg", "linear_svm", "softmax_tuned")


class SoftVoteEnsemble(ClassifierMixin, BaseEstimator):
    """Soft vote: the mean of the member heads' `predict_proba` (equal weights); predicts its argmax.

    `members` names tuned heads (`TUNED`), each built as `make_tuned(name, seed=, epochs=, scoring=,
    flip_train=)` with `cv=0`: `fit(X, y, eval_set=valid)` tunes every member on the validation split
    exactly as it is tuned alone; without `eval_set` each member tunes on its stratified holdout of (X, y)
    and refits its winner on all of (X, y). An entry may also be a (name, unfitted estimator) pair, which
    is fitted as it is (`_fixed` builds such an ensemble: members with their chosen hyperparameters). Every
    member is checked to give probabilities over the same `classes_` (np.unique(y), in that order).

    Honest numbers (`make_ensemble`): under the validation-split protocol the ensemble's validation score is
    its vote on the split its members tuned on, so it is optimistic in the same way as every tuned head's
    (the best point of each member's grid); no ensemble-level choice is made on it (fixed members, equal
    weights). Under `cv`=K the ensemble is wrapped in `ValidationSearch(ensemble, [{}], cv=K)`: each outer
    fold fits a fresh ensemble whose members tune on a holdout of that fold's training part only, so its
    score is pooled out-of-fold predictions of the whole procedure (nested), with no optimism from tuning.

    scikit-learn's `VotingClassifier(voting="soft")` is not used: it label-encodes `y` but would pass
    `eval_set` labels unencoded, and (1.9) routes `eval_set` to members only with global metadata routing.
    After fit: `members_` (fitted), `names_`, `classes_`, `best_params_` (each member's choice, keyed
    "member.param"), `best_valid_` (the vote's scores on `eval_set`, None without), `validation_`,
    `search_seconds_`; `summary()` as a `ValidationSearch`'s, with every member's under "members".
    """

    def __init__(self, members: tuple = ENSEMBLE_MEMBERS, seed: int = 0, epochs: int = 50,
                 scoring: str = "macro_f1", flip_train: bool = False):
        self.members = members
        self.seed = seed
        self.epochs = epochs
        self.scoring = scoring
        self.flip_train = flip_train

    def _build(self) -> list[tuple[str, object]]:
        out = []
        for m in self.members:
            if isinstance(m, str):
                if m not in TUNED:
                    raise ValueError(f"ensemble member '{m}' is not a tuned head (known: {', '.join(TUNED)})")
                out.append((m, make_tuned(m, seed=self.seed, epochs=self.epochs, scoring=self.scoring, cv=0,
                                          flip_train=self.flip_train)))
            else:
                name, est = m
                out.append((str(name), clone(est)))
        names = [n for n, _ in out]
        if not out or len(set(names)) != len(names):
            raise ValueError(f"ensemble members must be distinct and at least one, got {names}")
        return out

    def fit(self, X, y, eval_set: tuple | None = None):
        t0 = time.perf_counter()
        X, y = np.asarray(X), np.asarray(y)
        self.classes_ = np.unique(y)
        members = self._build()
        fitted = []
        for name, est in members:
            kw = {"eval_set": eval_set} if eval_set is not None and "eval_set" in inspect.signature(est.fit).parameters \
                else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                est.fit(X, y, **kw)
            if not np.array_equal(np.asarray(est.classes_), self.classes_):
                raise ValueError(f"ensemble member {name} learned classes {list(est.classes_)}, "
                                 f"not {list(self.classes_)}")
            p = est.predict_proba(X[:2])  # AttributeError if it has no probabilities (e.g. SVC without Platt)
            if p.shape != (min(2, len(X)), len(self.classes_)) or not np.allclose(p.sum(1), 1, atol=1e-4):
                raise ValueError(f"ensemble member {name}: predict_proba gives shape {p.shape} / rows not summing "
                                 f"to 1, expected probabilities over {len(self.classes_)} classes")
            fitted.append(est)
        self.names_, self.members_ = [n for n, _ in members], fitted
        self.best_params_ = {f"{n}.{k.split('__')[-1]}": v for n, m in zip(self.names_, fitted)
                             for k, v in getattr(m, "best_params_", {}).items()}
        self.validation_ = "; ".join(sorted({getattr(m, "validation_", "fixed hyperparameters") for m in fitted}))
        has_valid = eval_set is not None and len(eval_set[1])
        self.best_valid_ = score(eval_set[1], self.predict(eval_set[0])) if has_valid else None
        self.best_score_ = self.best_valid_[self.scoring] if self.best_valid_ else None
        self.search_seconds_ = time.perf_counter() - t0
        return self

    def _probas(self, X) -> np.ndarray:
        check_is_fitted(self, "members_")
        out = []
        for name, m in zip(self.names_, self.members_):
            p = np.asarray(m.predict_proba(X), dtype=np.float64)
            if p.shape != (len(p), len(self.classes_)):
                raise ValueError(f"ensemble member {name}: predict_proba has {p.shape[1]} columns, "
                                 f"expected {len(self.classes_)}")
            out.append(p)
        return np.stack(out)

    def predict_proba(self, X):
        return self._probas(X).mean(axis=0)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def summary(self) -> dict:
        """What the members chose (the keys of `ValidationSearch.summary`), each member's summary under "members"."""
        check_is_fitted(self, "members_")
        members = {n: m.summary() for n, m in zip(self.names_, self.members_) if hasattr(m, "summary")}
        return {"best_params": self.best_params_, "valid": self.best_valid_, "scoring": self.scoring,
                "validation": self.validation_, "grid_points": sum(s["grid_points"] for s in members.values()),
                "failed": sum(s["failed"] for s in members.values()), "search_seconds": self.search_seconds_,
                "results": [], "members": members}


def make_ensemble(*, seed: int = 0, epochs: int = 50, scoring: str = "macro_f1", cv: int = 0,
                  flip_train: bool = False, members: tuple = ENSEMBLE_MEMBERS):
    """The `ensemble` head: a `SoftVoteEnsemble`; with `cv` >= 2 inside a one-point `ValidationSearch`, so
    its CV score is nested (members re-tuned inside every outer fold; see `SoftVoteEnsemble`)."""
    ens = SoftVoteEnsemble(members=members, seed=seed, epochs=epochs, scoring=scoring, flip_train=flip_train)
    return ValidationSearch(ens, [{}], scoring=scoring, cv=cv, seed=seed) if cv and cv >= 2 else ens


def resolve_methods(methods) -> list[str]:
    """Method names with "all" expanded to every head (`heads.HEADS`), in order, without repeats."""
    from .seed import HEADS
    out: list[str] = []
    for m in methods:
        for name in (HEADS if m == "all" else (m,)):
            if name not in out:
                out.append(name)
    return out


def select_method(valid: dict[str, dict], metric: str = "macro_f1") -> dict:
    """The method with the best validation `metric` (ties: the other metrics, then order); validation only."""
    if metric not in METRICS:
        raise ValueError(f"select metric must be one of {', '.join(METRICS)}, got '{metric}'")
    if not valid:
        raise ValueError("no method has validation scores to select on")
    ranking = sorted(valid, key=lambda n: _rank_key(valid[n], metric), reverse=True)  # stable: order breaks ties
    return {"method": ranking[0], "metric": metric,
            "valid": {m: valid[ranking[0]][m] for m in METRICS},
            "ranking": [[n, valid[n][metric]] for n in ranking]}


def _fixed(estimator, proba: bool = False):
    """The estimator with its chosen hyperparameters, unfitted, without extras that only predict_proba needs
    (Platt scaling) unless `proba`. A fitted ensemble: the same vote over its members so fixed (with their
    probabilities, which the vote needs)."""
    if isinstance(estimator, ValidationSearch) and isinstance(estimator.best_estimator_, SoftVoteEnsemble):
        estimator = estimator.best_estimator_
    if isinstance(estimator, SoftVoteEnsemble) and hasattr(estimator, "members_"):
        return clone(estimator).set_params(members=tuple((n, _fixed(m, proba=True))
                                                         for n, m in zip(estimator.names_, estimator.members_)))
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


def data_efficiency(estimator, X_train, y_train, X_valid, y_valid, *, metric: str = "macro_f1", seed: int = 0,
                    ks=DATA_EFFICIENCY_KS, repeats: int = 3) -> dict:
    """Validation `metric` when the head (its chosen hyperparameters fixed) trains on k images per class.

    Each class contributes min(k, its count) images, sampled with `seed`; points whose sample is not the
    whole training set are averaged over `repeats` draws. The last point is all training images.
    """
    y_train = np.asarray(y_train)
    classes, counts = np.unique(y_train, return_counts=True)
    cap = int(counts.max())
    ks = sorted({k for k in ks if k < cap} | {cap})
    base = _fixed(estimator)
    points = []
    with threadpool_limits(1):
        for k in ks:
            points.append(_efficiency_point(base, X_train, y_train, X_valid, y_valid, classes, counts, k,
                                            k >= cap, metric, seed, repeats))
    return {"metric": metric, "seed": seed, "repeats": repeats, "params": _scalar_params(base), "points": points}


def _efficiency_point(base, X_train, y_train, X_valid, y_valid, classes, counts, k, full, metric, seed, repeats):
    scores, errors, t0 = [], [], time.perf_counter()
    for r in range(1 if full else repeats):
        rng = np.random.default_rng([seed, k, r])
        idx = np.concatenate([rng.permutation(np.flatnonzero(y_train == c))[:k] for c in classes])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = clone(base).fit(X_train[idx], y_train[idx])
            scores.append(score(y_valid, model.predict(X_valid))[metric])
        except ValueError as exc:  # e.g. more neighbours than images at k=1
            errors.append(str(exc))
    return {"k": k, "n_train": int(np.minimum(counts, k).sum()),
            "score": float(np.mean(scores)) if scores else None, "scores": scores,
            "seconds": time.perf_counter() - t0, **({"error": errors[0]} if errors else {})}


def _scalar_params(est) -> dict:
    return {k: v for k, v in est.get_params().items() if isinstance(v, (int, float, str, bool, type(None)))}
