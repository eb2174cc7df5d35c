"""scikit-learn's shrinkage LDA (`solver="lsqr", shrinkage="auto"`), fitted at a third of its cost.

scikit-learn computes each class's Ledoit-Wolf covariance on standardised columns with three d x d products
(`empirical_covariance`, and two in `ledoit_wolf_shrinkage`), then solves the pooled covariance with `lstsq`
(an SVD). The same numbers come from one product per class: with Z the class's centred rows, G = Z'Z and
sigma^2 = diag(G) / n, the shrinkage needs only the squared Frobenius norm of the standardised G and the rows'
squared norms, and the shrunk covariance scaled back is (1 - a) G / n + a mu diag(sigma^2). The pooled
covariance, shrunk and so positive definite, is solved by Cholesky. Classes are accumulated one at a time, so
memory is a few d x d matrices whatever the number of classes. `fitted_lda` returns a real
`LinearDiscriminantAnalysis` holding exactly the attributes its own `fit` sets (tested against it), so
prediction, probabilities and serialisation stay scikit-learn's.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis


def _class_shrunk_cov(Z: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of centred rows Z on standardised columns, scaled back (scikit-learn's
    `discriminant_analysis._cov(X, "auto")`)."""
    n, d = Z.shape
    G = Z.T @ Z
    if n < 2:  # scikit-learn: one row has no spread; its covariance is zero (a single-image class)
        return np.zeros((d, d))
    var = np.diag(G) / n
    scale = np.sqrt(var)
    scale[scale == 0] = 1.0
    inv = 1.0 / scale
    trace = var * inv**2  # the standardised columns' variances: 1, or 0 for a constant column
    mu = trace.sum() / d
    delta_ = np.square(G * inv[:, None] * inv[None, :]).sum() / n**2  # ||standardised G / n||_F^2
    beta_ = np.square(np.square(Z * inv).sum(axis=1)).sum()  # sum of (X2' X2): each row's squared norm, squared
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * trace.sum() + d * mu**2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    out = (1 - shrinkage) / n * G
    out[np.diag_indices(d)] += shrinkage * mu * scale**2
    return out


def pooled_covariances(X: np.ndarray, y_idx: np.ndarray, prior_sets: list[np.ndarray]) -> tuple[np.ndarray, list]:
    """Class means (k, d) and, for each vector of class priors, the prior-weighted sum of the classes' shrunk
    covariances (scikit-learn's `_class_cov`). X float64, y_idx in 0..k-1, every class present."""
    k = len(prior_sets[0])
    means = np.empty((k, X.shape[1]))
    pooled = [np.zeros((X.shape[1], X.shape[1])) for _ in prior_sets]
    for c in range(k):
        Xc = X[y_idx == c]
        means[c] = Xc.mean(axis=0)
        cov = _class_shrunk_cov(Xc - means[c])
        for acc, priors in zip(pooled, prior_sets):
            acc += priors[c] * cov
    return means, pooled


def lda_coefficients(means: np.ndarray, cov: np.ndarray, priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """coef (k, d) and intercept (k,) of the lsqr solver: cov is shrunk, so positive definite (Cholesky); where
    it is not (no spread left to shrink), scikit-learn's least-squares solution."""
    try:
        coef = scipy.linalg.solve(cov, means.T, assume_a="pos").T
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        coef = scipy.linalg.lstsq(cov, means.T)[0].T
    return coef, -0.5 * np.einsum("kd,kd->k", means, coef) + np.log(priors)


def fitted_lda(X: np.ndarray, y: np.ndarray, priors: np.ndarray | None = None) -> LinearDiscriminantAnalysis:
    """`LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto", priors=priors).fit(X, y)`, computed as above."""
    X = np.asarray(X, dtype=np.float64)
    classes, y_idx = np.unique(y, return_inverse=True)
    k = len(classes)
    if len(y) == k:
        raise ValueError("The number of samples must be more than the number of classes.")  # scikit-learn's
    counts = np.bincount(y_idx, minlength=k)
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto", priors=priors)
    priors_ = counts / len(y) if priors is None else np.asarray(priors, dtype=np.float64) / np.sum(priors)
    means, (cov,) = pooled_covariances(X, y_idx, [priors_])
    coef, intercept = lda_coefficients(means, cov, priors_)
    if k == 2:  # scikit-learn keeps one row for two classes
        coef = np.array(coef[1] - coef[0], ndmin=2)
        intercept = np.array(intercept[1] - intercept[0], ndmin=1)
    lda.classes_, lda.priors_, lda.means_, lda.covariance_ = classes, priors_, means, cov
    lda.coef_, lda.intercept_ = coef, intercept
    lda.n_features_in_ = X.shape[1]
    lda._max_components = lda._n_features_out = min(k - 1, X.shape[1])
    return lda
