"""Every grid point of a head on one cross-validation fold, at the cost of a few fits.

A fold path maps (X_fit, y_fit, X_held, n_classes, points) to one score matrix per grid point, shape
(len(X_held), n_classes), whose row-wise argmax is that point's prediction (columns of classes absent from
y_fit hold -inf). `evaluation.crossval` calls them for each fold of its repeated CV. The fast paths compute
what is shared across a grid once per fold and give exactly the model the study then fits:
- `logistic_fold`: standardise once, one warm-started L-BFGS path over C (`heads.lbfgs`), probabilities;
- `rbf_fold`: standardise (or not, for the seed's SVM) once, one distance matrix, one kernel per gamma reused
  across C (`SVC(kernel="precomputed")`); decision values, not probabilities;
- `lda_fold`: standardise once, the class means, shrinkages and (large classes) scatter matrices once, one pooled
  covariance per prior rule from them (`heads.lda`);
- `generic_fold`: any estimator, one fit per point (LDA, kNN, the softmax heads), `predict_proba`.
`FoldPath.probabilities` gives a point's probabilities where the path gave decision values (the ensemble needs
them): SVM decision values become probabilities at a temperature fitted on other folds' values (`heads.pairwise`).
Kernel paths hold n x n matrices: above `KERNEL_MAX_ROWS` fitting images their methods step aside (the study says
so in its notes) rather than exhaust memory; the linear heads and LDA need memory linear in the images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import softmax
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import ParameterGrid
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.class_weight import compute_sample_weight

from ..warning_filters import warning_filter
from .lbfgs import logistic_path
from .lda import lda_coefficients, pooled_matrices, pooled_parts
from .pairwise import fit_temperature, ovr_decision, per_class, tempered
from .probes import sq_distances

KERNEL_MAX_ROWS = 12000  # ~1.6 GiB of kernel matrices per fold


def _standardise(Xf: np.ndarray, Xh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tuned heads' `FeatureTransform("standard")`, fitted on Xf once per fold, applied to both parts."""
    scaler = StandardScaler().fit(Xf)
    return scaler.transform(Xf).astype(np.float32), scaler.transform(Xh).astype(np.float32)


def _full(scores: np.ndarray, present: np.ndarray, k: int) -> np.ndarray:
    """Scores over the classes present in the fit part, placed in the columns of all k classes (-inf elsewhere)."""
    scores = per_class(scores)  # a binary decision value (score of present[1] minus present[0]) as two columns
    out = np.full((len(scores), k), -np.inf, dtype=np.float32)
    out[:, present] = scores
    return out


def logistic_fold(Xf, yf, Xh, k, points, *, seed=0, max_iter=100, tol=1e-4):
    """LBFGSLogisticRegression(C, class_weight="balanced", max_iter, tol) after standardisation, every C of `points`
    in one path (`max_iter`, `tol`: the head's, bound in `heads.tuned`, so the fold's model is the one the study
    fits)."""
    Xf, Xh = _standardise(Xf, Xh)
    present, y_idx = np.unique(yf, return_inverse=True)
    Cs = [p["clf__C"] for p in points]
    path = logistic_path(
        Xf, y_idx, len(present), Cs, sample_weight=compute_sample_weight("balanced", yf), max_iter=max_iter, tol=tol
    )
    return [_full(softmax(Xh @ W.T + b, axis=1), present, k) for W, b in path]


def rbf_fold(Xf, yf, Xh, k, points, *, standardise=True, class_weight="balanced", seed=0):
    """RBF SVC with gamma = gamma_scale / (d * var(X_fit)) for each (C, gamma_scale) of `points`: one distance
    matrix per fold, one kernel per gamma. Decision values (one-vs-rest shape), argmax = SVC's prediction."""
    if standardise:
        Xf, Xh = _standardise(Xf, Xh)
    present = np.unique(yf)
    D, Dh = sq_distances(Xf, Xf), sq_distances(Xh, Xf)
    var = float(Xf.var())
    out: list = [None] * len(points)
    by_gamma: dict[float, list[int]] = {}
    for i, p in enumerate(points):
        by_gamma.setdefault(float(p.get("clf__gamma_scale", 1.0)), []).append(i)
    for gs, idx in by_gamma.items():
        gamma = gs / (Xf.shape[1] * var) if var > 0 else gs
        K, Kh = np.exp(-gamma * D, dtype=np.float64), np.exp(-gamma * Dh, dtype=np.float64)
        for i in idx:
            svc = SVC(
                kernel="precomputed",
                C=points[i].get("clf__C", 1.0),
                class_weight=class_weight,
                decision_function_shape="ovo",
            ).fit(K, yf)
            dec = svc.decision_function(Kh)
            if len(present) > 2:  # what decision_function_shape="ovr" returns, without its loop over pairs
                dec = ovr_decision(dec, len(present))
            out[i] = _full(dec, present, k)  # binary: positive for present[1]
    return out


def lda_fold(Xf, yf, Xh, k, points, *, seed=0):
    """ShrinkageLDAHead (Ledoit-Wolf shrunk class covariances, lsqr) after standardisation, for each class prior
    rule of `points` ("balanced": uniform; None: the fit part's frequencies): the class means and shrinkages are
    computed once, then one pooled covariance per rule (`heads.lda`, scikit-learn's numbers)."""
    Xf, Xh = _standardise(Xf, Xh)
    present, y_idx = np.unique(yf, return_inverse=True)
    counts = np.bincount(y_idx).astype(np.float64)
    rules = [
        np.full(len(present), 1 / len(present)) if p.get("clf__class_weight") == "balanced" else counts / counts.sum()
        for p in points
    ]
    means, Z, parts = pooled_parts(Xf, y_idx, rules)
    out = []
    for priors, (weight, diag), cov in zip(rules, parts, pooled_matrices(Z, y_idx, parts)):
        coef, intercept = lda_coefficients(means, priors, Z, weight, diag, cov)
        out.append(_full(softmax(Xh @ coef.T + intercept, axis=1), present, k))
    return out


def generic_fold(estimator, Xf, yf, Xh, k, points):
    """One clone of `estimator` per point (set_params), fitted on the fit part: its predict_proba (or decision values)."""
    present = np.unique(yf)
    out = []
    for p in points:
        with warning_filter("ignore", ConvergenceWarning):
            m = clone(estimator).set_params(**p).fit(Xf, yf)
        s = m.predict_proba(Xh) if hasattr(m, "predict_proba") else m.decision_function(Xh)
        out.append(_full(s, present, k))
    return out


@dataclass(frozen=True)
class FoldPath:
    """How `evaluation.crossval` cross-validates a method: its `grid` (scikit-learn ParameterGrid form), `fold`
    (one of the functions above, keywords bound), `proba` (whether `fold`'s scores are probabilities) and
    `build(seed, epochs)`, the estimator that `generic_fold` fits."""

    grid: list
    fold_fn: Callable
    proba: bool
    build: Callable | None = None
    max_rows: int | None = None  # above this many fitting rows the method steps aside (memory ~ rows²)
    temperature_param: str | None = None  # decision values: the hyperparameter that takes the CV's temperature

    def too_big(self, rows: int) -> str | None:
        """Why the method steps aside at `rows` fitting rows (None: it does not)."""
        if self.max_rows is None or rows <= self.max_rows:
            return None
        gib = rows * rows * 12 / 2**30  # a float32 distance matrix and a float64 kernel
        return f"{rows} fitting images need {gib:.0f} GiB of kernel matrices (n² memory); the limit is {self.max_rows}"

    def points(self) -> list[dict]:
        return list(ParameterGrid(self.grid))

    def fold(self, Xf, yf, Xh, k, points, *, seed=0, epochs=50):
        if self.fold_fn is generic_fold:
            return generic_fold(self.build(seed, epochs), Xf, yf, Xh, k, points)
        return self.fold_fn(Xf, yf, Xh, k, points, seed=seed)

    def probabilities(self, held: np.ndarray, other: np.ndarray, y_other: np.ndarray) -> np.ndarray:
        """Probabilities of one point on a fold's held part from its scores there (`held`), given the same point's
        out-of-fold scores of other images (`other`, labels `y_other`: column indices) that calibrate them. Paths
        that give probabilities return them as they are; the SVM's one-vs-rest values become their softmax at the
        temperature that fits `other` best (`heads.pairwise`): no refit."""
        if self.proba:
            return np.nan_to_num(np.asarray(held, dtype=np.float32), neginf=0.0)
        return tempered(held, fit_temperature(other, y_other)).astype(np.float32)


@dataclass(frozen=True)
class EnsemblePath:
    """An ensemble is cross-validated as the mean of its `members`' honest OOF probabilities (no fits of its own)."""

    members: tuple[str, ...]
