"""Probes: the extra heads that the tuned methods are built from, each a scikit-learn estimator.

`FeatureTransform` is the feature option of every tuned head (standardisation, L2 normalisation,
PCA whitening, or none); `KernelSVMHead` is an RBF SVM whose kernel is computed with BLAS and handed
to libsvm precomputed (the same model as `SVC(kernel="rbf")`, ~30x faster to fit on 1280-d features,
which is what makes a C x gamma grid affordable); `LinearSVMHead` is `LinearSVC` with softmax scores
as `predict_proba`; `ShrinkageLDAHead` is linear discriminant analysis with a Ledoit-Wolf shrunk shared
covariance (one closed-form fit, strong when some classes have a handful of images). Grids are in `tuned.py`,
the validation search that tunes them in `search.py`.

Fits run side by side in threads (`evaluation.threads`). liblinear's coordinate descent (and libsvm's Platt
scaling, which transferlab no longer uses) draws from one process-wide generator that each fit reseeds with its
`random_state`; two such fits at once interleave their draws and their models then depend on timing (measured:
LinearSVC weights off by 0.15, SVC Platt probabilities by 0.05). `LinearSVMHead` fits hold `RNG_LOCK`.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.metaestimators import available_if

from .inputs import fit_inputs, predict_inputs, validate_data
from .lda import fitted_lda
from .pairwise import fit_temperature, per_class, tempered
from .search import cv_folds

FEATURE_KINDS = ("none", "standard", "l2", "pca_whiten")
RNG_LOCK = threading.Lock()  # held by fits that draw from liblinear's process-wide generator


def writable(estimator):
    """`estimator`, or if some of its array attributes are read-only (a model memory-mapped from disk), a shallow
    copy holding writable copies of them: libsvm's `predict_proba` refuses read-only buffers."""
    frozen = {k: v for k, v in vars(estimator).items() if isinstance(v, np.ndarray) and not v.flags.writeable}
    if not frozen:
        return estimator
    estimator = copy.copy(estimator)
    for k, v in frozen.items():
        setattr(estimator, k, v.copy())
    return estimator


def _l2(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class FeatureTransform(TransformerMixin, BaseEstimator):
    """One feature option: `standard` (zero mean, unit variance), `l2` (unit length rows),
    `pca_whiten` (PCA to at most `n_components` whitened components) or `none`. float32 features (the cache's)
    stay float32 and float64 ones float64, as scikit-learn's transformers keep them; other dtypes become float32."""

    def __init__(self, kind: str = "standard", n_components: int = 256):
        self.kind = kind
        self.n_components = n_components

    def fit(self, X, y=None):
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"feature option must be one of {', '.join(FEATURE_KINDS)}, got '{self.kind}'")
        X = validate_data(self, X, dtype=(np.float32, np.float64))
        if self.kind == "standard":
            self.scaler_ = StandardScaler().fit(X)
        elif self.kind == "pca_whiten":
            k = max(1, min(self.n_components, X.shape[0] - 1, X.shape[1]))
            self.pca_ = PCA(n_components=k, whiten=True, random_state=0).fit(X)
        return self

    def transform(self, X):
        X = predict_inputs(self, X, dtype=(np.float32, np.float64))
        if self.kind == "standard":
            return self.scaler_.transform(X).astype(X.dtype, copy=False)
        if self.kind == "l2":
            return _l2(X)
        if self.kind == "pca_whiten":
            return self.pca_.transform(X).astype(X.dtype, copy=False)
        return X


def sq_distances(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of A and B, through one matrix product."""
    A, B = np.asarray(A, np.float32), np.asarray(B, np.float32)
    d = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * (A @ B.T)
    return np.maximum(d, 0.0, out=d)


class KernelSVMHead(ClassifierMixin, BaseEstimator):
    """RBF SVM, gamma = gamma_scale / (n_features * X.var()) (gamma_scale=1 is SVC's gamma="scale").

    Fits `SVC(kernel="precomputed")` on a kernel matrix computed with BLAS; only the support vectors
    are kept for prediction. Above `max_precomputed` training images (the kernel matrix grows with
    their square) it hands libsvm the features instead: the same model, computed the slow way.
    `probability=True` adds `predict_proba`: the softmax of SVC's one-vs-rest decision values at a temperature
    fitted on out-of-fold values of `calibration_folds` stratified folds (`heads.pairwise`; seeded by `seed`),
    each fitted on the same kernel matrix: fewer and smaller fits than libsvm's Platt scaling (five), which
    scikit-learn 1.9 deprecates. A given `temperature` is used as it is, with no calibration fit (the default run
    passes the one its repeated CV fitted on the chosen point's out-of-fold values). Predictions are SVC's own
    either way, and the most probable class (but on a tie of votes).
    """

    def __init__(
        self,
        C: float = 1.0,
        gamma_scale: float = 1.0,
        class_weight: str | None = "balanced",
        probability: bool = True,
        cache_size: float = 500,
        max_precomputed: int = 15000,
        seed: int = 0,
        calibration_folds: int = 3,
        temperature: float | None = None,
    ):
        self.C = C
        self.gamma_scale = gamma_scale
        self.class_weight = class_weight
        self.probability = probability
        self.cache_size = cache_size
        self.max_precomputed = max_precomputed
        self.seed = seed
        self.calibration_folds = calibration_folds
        self.temperature = temperature

    def _svc(self, K, X, y, rows=None) -> SVC:
        """libsvm fitted on the rows `rows` (all: None), from the kernel matrix K or, without one, the features."""
        kw = dict(C=self.C, class_weight=self.class_weight, cache_size=self.cache_size)
        if rows is not None:
            K, X, y = (K[np.ix_(rows, rows)], X, y[rows]) if K is not None else (None, X[rows], y[rows])
        return SVC(kernel="precomputed", **kw).fit(K, y) if K is not None else SVC(gamma=self.gamma_, **kw).fit(X, y)

    def fit(self, X, y):
        X, y = fit_inputs(self, X, y, dtype=np.float32)
        var = float(X.var())
        self.gamma_ = self.gamma_scale / (X.shape[1] * var) if var > 0 else self.gamma_scale
        self.precomputed_ = len(X) <= self.max_precomputed
        K = np.exp(-self.gamma_ * sq_distances(X, X), dtype=np.float64) if self.precomputed_ else None
        self.svc_ = self._svc(K, X, y)
        if self.precomputed_:
            self.support_vectors_ = X[self.svc_.support_]
        self.n_fit_ = len(X)
        self.classes_ = self.svc_.classes_
        if self.probability:
            self.temperature_ = float(self.temperature) if self.temperature is not None else self._temperature(K, X, y)
        return self

    def _temperature(self, K, X, y) -> float:
        """The temperature of `predict_proba`, fitted on out-of-fold one-vs-rest values (`heads.pairwise`)."""
        y_idx = np.searchsorted(self.classes_, y)
        values = np.full((len(y), len(self.classes_)), -np.inf)
        folds = min(self.calibration_folds, int(np.bincount(y_idx).max()))
        if folds < 2:  # one image per class: nothing to hold out
            return 1.0
        for a, b in cv_folds(y, folds, self.seed):
            present = np.unique(y_idx[a])
            if len(present) < 2:
                continue
            held = K[np.ix_(b, a)] if K is not None else X[b]
            values[np.ix_(b, present)] = per_class(self._svc(K, X, y, a).decision_function(held))
        return fit_temperature(values, y_idx)

    def _kernel(self, X) -> np.ndarray:
        X = predict_inputs(self, X, dtype=np.float32)
        if not self.precomputed_:
            return X
        K = np.zeros((len(X), self.n_fit_))  # libsvm reads only the support vectors' columns
        K[:, self.svc_.support_] = np.exp(-self.gamma_ * sq_distances(X, self.support_vectors_))
        return K

    def decision_function(self, X):
        K = self._kernel(X)  # NotFittedError before fit
        return self.svc_.decision_function(K)

    def predict(self, X):
        K = self._kernel(X)
        return self.svc_.predict(K)

    @available_if(lambda self: self.probability)  # hasattr(head, "predict_proba") is False without probabilities
    def predict_proba(self, X):
        K = self._kernel(X)
        if not hasattr(self, "temperature_"):  # fitted before temperature scaling (libsvm Platt scaling)
            return writable(self.svc_).predict_proba(K)
        return tempered(per_class(self.svc_.decision_function(K)), self.temperature_)


class LinearSVMHead(LinearSVC):
    """`LinearSVC` (one-vs-rest, squared hinge) whose `predict_proba` is the softmax of its decision
    values: scores for ranking and log-loss, not calibrated probabilities. Its fit holds `RNG_LOCK`."""

    def fit(self, X, y, sample_weight=None):
        with RNG_LOCK:
            return super().fit(X, y, sample_weight=sample_weight)

    def predict_proba(self, X):
        z = np.asarray(self.decision_function(X), dtype=np.float64)
        if z.ndim == 1:  # two classes
            z = np.stack([-z, z], axis=1) / 2
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)


class ShrinkageLDAHead(ClassifierMixin, BaseEstimator):
    """Linear discriminant analysis (`LinearDiscriminantAnalysis`, lsqr solver) with the shared covariance
    shrunk toward a scaled identity: `shrinkage="auto"` is Ledoit-Wolf's closed form, a float in [0, 1] fixes it.

    `class_weight` sets the class priors: "balanced" gives every class the same prior (the decision then ignores
    how common a class was in training, as balanced weights do for the other heads); `None` uses the training
    frequencies; a dict {label: weight} (classes it omits weigh 1) weighs them, prior proportional to weight x
    count (so "balanced" is the dict of 1 / count).
    `predict_proba` is scikit-learn's: the softmax of the linear decision values (`coef_`, `intercept_`).
    """

    def __init__(self, shrinkage="auto", class_weight: str | dict | None = "balanced"):
        self.shrinkage = shrinkage
        self.class_weight = class_weight

    def fit(self, X, y):
        if not (self.class_weight in ("balanced", None) or isinstance(self.class_weight, dict)):
            raise ValueError(
                f"class_weight must be 'balanced', None or a dict of label -> weight, got {self.class_weight!r}"
            )
        X, y = fit_inputs(self, X, y, dtype=np.float64)
        classes, counts = np.unique(y, return_counts=True)
        k = len(classes)
        if k < 2:
            raise ValueError(f"ShrinkageLDAHead needs at least two classes, got one class ({classes[0]!r})")
        if isinstance(self.class_weight, dict):
            w = np.array([float(self.class_weight.get(c, 1.0)) for c in classes.tolist()]) * counts
            priors = w / w.sum()
        else:
            priors = np.full(k, 1.0 / k) if self.class_weight == "balanced" else None
        if isinstance(self.shrinkage, str) and self.shrinkage == "auto":  # scikit-learn's model, fitted faster
            self.lda_ = fitted_lda(X, y, priors)
        else:
            self.lda_ = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=self.shrinkage, priors=priors).fit(X, y)
        self.classes_ = self.lda_.classes_
        return self

    @property
    def coef_(self):
        return self.lda_.coef_

    @property
    def intercept_(self):
        return self.lda_.intercept_

    def decision_function(self, X):
        X = predict_inputs(self, X, dtype=np.float64)  # NotFittedError before fit
        return self.lda_.decision_function(X)

    def predict(self, X):
        X = predict_inputs(self, X, dtype=np.float64)
        return self.lda_.predict(X)

    def predict_proba(self, X):
        X = predict_inputs(self, X, dtype=np.float64)
        return self.lda_.predict_proba(X)
