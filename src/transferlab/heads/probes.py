"""Probes: the extra heads that the tuned methods are built from, each a scikit-learn estimator.

`FeatureTransform` is the feature option of every tuned head (standardisation, L2 normalisation,
PCA whitening, or none); `KernelSVMHead` is an RBF SVM whose kernel is computed with BLAS and handed
to libsvm precomputed (the same model as `SVC(kernel="rbf")`, ~30x faster to fit on 1280-d features,
which is what makes a C x gamma grid affordable); `LinearSVMHead` is `LinearSVC` with softmax scores
as `predict_proba`; `ShrinkageLDAHead` is linear discriminant analysis with a Ledoit-Wolf shrunk shared
covariance (one closed-form fit, strong when some classes have a handful of images). Grids and the
validation search that tunes them are in `selection.py`.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.validation import check_is_fitted

FEATURE_KINDS = ("none", "standard", "l2", "pca_whiten")


@contextlib.contextmanager
def svc_probability_quiet():
    """Silence scikit-learn 1.9's FutureWarning for `SVC(probability=True)` (removed in 1.11, pinned below that)
    inside the block only: transferlab changes no warning filters of the program that imports it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The `probability` parameter was deprecated",
                                category=FutureWarning)
        yield


def _l2(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class FeatureTransform(TransformerMixin, BaseEstimator):
    """One feature option: `standard` (zero mean, unit variance), `l2` (unit length rows),
    `pca_whiten` (PCA to at most `n_components` whitened components) or `none`."""

    def __init__(self, kind: str = "standard", n_components: int = 256):
        self.kind = kind
        self.n_components = n_components

    def fit(self, X, y=None):
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"feature option must be one of {', '.join(FEATURE_KINDS)}, got '{self.kind}'")
        X = np.asarray(X, dtype=np.float32)
        self.n_features_in_ = X.shape[1]
        if self.kind == "standard":
            self.scaler_ = StandardScaler().fit(X)
        elif self.kind == "pca_whiten":
            k = max(1, min(self.n_components, X.shape[0] - 1, X.shape[1]))
            self.pca_ = PCA(n_components=k, whiten=True, random_state=0).fit(X)
        return self

    def transform(self, X):
        check_is_fitted(self, "n_features_in_")
        X = np.asarray(X, dtype=np.float32)
        if self.kind == "standard":
            return self.scaler_.transform(X).astype(np.float32)
        if self.kind == "l2":
            return _l2(X)
        if self.kind == "pca_whiten":
            return self.pca_.transform(X).astype(np.float32)
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
    `probability=True` adds SVC's Platt scaling for `predict_proba`; predictions are SVC's own either way.
    """

    def __init__(self, C: float = 1.0, gamma_scale: float = 1.0, class_weight: str | None = "balanced",
                 probability: bool = True, cache_size: float = 500, max_precomputed: int = 15000, seed: int = 0):
        self.C = C
        self.gamma_scale = gamma_scale
        self.class_weight = class_weight
        self.probability = probability
        self.cache_size = cache_size
        self.max_precomputed = max_precomputed
        self.seed = seed

    def fit(self, X, y):
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        var = float(X.var())
        self.gamma_ = self.gamma_scale / (X.shape[1] * var) if var > 0 else self.gamma_scale
        self.precomputed_ = len(X) <= self.max_precomputed
        kw = dict(C=self.C, class_weight=self.class_weight, cache_size=self.cache_size, random_state=self.seed,
                  **({"probability": True} if self.probability else {}))  # the parameter warns when given
        with svc_probability_quiet():
            if self.precomputed_:
                K = np.exp(-self.gamma_ * sq_distances(X, X), dtype=np.float64)
                self.svc_ = SVC(kernel="precomputed", **kw).fit(K, y)
                self.support_vectors_ = X[self.svc_.support_]
            else:
                self.svc_ = SVC(kernel="rbf", gamma=self.gamma_, **kw).fit(X, y)
        self.n_fit_ = len(X)
        self.classes_ = self.svc_.classes_
        self.n_features_in_ = X.shape[1]
        return self

    def _kernel(self, X) -> np.ndarray:
        check_is_fitted(self, "svc_")
        X = np.asarray(X, dtype=np.float32)
        if not self.precomputed_:
            return X
        K = np.zeros((len(X), self.n_fit_))  # libsvm reads only the support vectors' columns
        K[:, self.svc_.support_] = np.exp(-self.gamma_ * sq_distances(X, self.support_vectors_))
        return K

    def decision_function(self, X):
        return self.svc_.decision_function(self._kernel(X))

    def predict(self, X):
        return self.svc_.predict(self._kernel(X))

    def predict_proba(self, X):
        if not self.probability:
            raise AttributeError("predict_proba needs probability=True")
        return self.svc_.predict_proba(self._kernel(X))


class LinearSVMHead(LinearSVC):
    """`LinearSVC` (one-vs-rest, squared hinge) whose `predict_proba` is the softmax of its decision
    values: scores for ranking and log-loss, not calibrated probabilities."""

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

    `class_weight="balanced"` gives every class the same prior (the decision then ignores how common a
    class was in training, as balanced weights do for the other heads); `None` uses the training frequencies.
    `predict_proba` is scikit-learn's: the softmax of the linear decision values (`coef_`, `intercept_`).
    """

    def __init__(self, shrinkage="auto", class_weight: str | None = "balanced"):
        self.shrinkage = shrinkage
        self.class_weight = class_weight

    def fit(self, X, y):
        if self.class_weight not in ("balanced", None):
            raise ValueError(f"class_weight must be 'balanced' or None, got {self.class_weight!r}")
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
        k = len(np.unique(y))
        priors = np.full(k, 1.0 / k) if self.class_weight == "balanced" else None
        self.lda_ = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=self.shrinkage, priors=priors).fit(X, y)
        self.classes_ = self.lda_.classes_
        self.n_features_in_ = X.shape[1]
        return self

    @property
    def coef_(self):
        return self.lda_.coef_

    @property
    def intercept_(self):
        return self.lda_.intercept_

    def decision_function(self, X):
        check_is_fitted(self, "lda_")
        return self.lda_.decision_function(np.asarray(X, dtype=np.float64))

    def predict(self, X):
        check_is_fitted(self, "lda_")
        return self.lda_.predict(np.asarray(X, dtype=np.float64))

    def predict_proba(self, X):
        check_is_fitted(self, "lda_")
        return self.lda_.predict_proba(np.asarray(X, dtype=np.float64))
