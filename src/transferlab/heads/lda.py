"""scikit-learn's shrinkage LDA (`solver="lsqr", shrinkage="auto"`), fitted at a third of its cost.

scikit-learn computes each class's Ledoit-Wolf covariance on standardised columns with three d x d products
(`empirical_covariance`, and two in `ledoit_wolf_shrinkage`), adds them up weighted by the priors, and solves the
pooled covariance with `lstsq` (an SVD). The same numbers come cheaper: with Z_c a class's centred rows and
sigma_c^2 their column variances, its shrunk covariance scaled back is (1 - a_c) Z_c'Z_c / n_c + a_c mu_c
diag(sigma_c^2), so the pooled covariance is one product of all rows, each weighted, plus a diagonal; the shrinkage
a_c needs only the class's Gram matrix (n_c x n_c when the class has fewer rows than columns) and its rows' norms.
The pooled covariance, shrunk and so positive definite, is solved by Cholesky. Memory: the centred rows and one
d x d matrix per prior rule, whatever the number of classes. `fitted_lda` returns a real
`LinearDiscriminantAnalysis` holding exactly the attributes its own `fit` sets (tested against it), so
prediction, probabilities and serialisation stay scikit-learn's. One deliberate difference: a class of exactly two
images is shrunk fully to its diagonal (scikit-learn's Ledoit-Wolf estimate is 0 for any two rows, which leaves
the pooled covariance singular when most classes are that small: at 2 images per class of 101 classes its
coefficients reach 1e15 and every image goes to one class).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis


def _shrinkage(W: np.ndarray, trace: np.ndarray) -> tuple[float, float]:
    """`ledoit_wolf_shrinkage` of standardised centred rows W (n, d) whose columns' variances are `trace`, and mu
    (the mean variance, the scale of the identity it shrinks toward)."""
    n, d = W.shape
    mu = trace.sum() / d
    if d == 1:  # scikit-learn's ledoit_wolf: a single column is not shrunk
        return 0.0, mu
    gram = W @ W.T if n < d else W.T @ W  # the same squared Frobenius norm, from the smaller product
    delta_ = np.square(gram).sum() / n**2
    beta_ = np.square(np.square(W).sum(axis=1)).sum()  # sum of (X2' X2): each row's squared norm, squared
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * trace.sum() + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else beta / delta, mu


# Rows per block of the pooled product: its weighted copy of the centred rows is one block (40 MiB at 1280
# columns), not all of them (a fold of 40,000 images held two 410 MiB copies per prior rule).
BLOCK_ROWS = 4096


def pooled_parts(X: np.ndarray, y_idx: np.ndarray, prior_sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list]:
    """Class means (k, d), the centred rows Z (n, d, float64) and, for each vector of class priors, the parts of the
    prior-weighted sum of the classes' shrunk covariances (scikit-learn's `_class_cov`): (row weights (n,), diagonal
    (d,)), the pooled covariance being (Z * w)'(Z * w) + diag. X float32 or float64 (computed in float64), y_idx in
    0..k-1, every class present.

    Class c's shrunk covariance scaled back is (1 - a_c) Z_c'Z_c / n_c + a_c mu_c diag(sigma_c^2), so a pooled one
    is one product of all centred rows, each weighted by sqrt(prior_c (1 - a_c) / n_c), plus a diagonal: no d x d
    matrix per class. a_c needs only the class's Gram matrix, n_c x n_c when the class has fewer rows than d."""
    k, d = len(prior_sets[0]), X.shape[1]
    means = np.empty((k, d))
    Z = np.empty(X.shape, dtype=np.float64)
    a, mu, var = np.zeros(k), np.zeros(k), np.zeros((k, d))
    for c in range(k):
        rows = y_idx == c
        Xc = X[rows].astype(np.float64, copy=False)  # fancy indexing copies: a float32 X becomes float64 here
        means[c] = Xc.mean(axis=0)
        Zc = Z[rows] = Xc - means[c]
        n = len(Zc)
        var[c] = np.square(Zc).sum(axis=0) / n
        if n < 2:  # scikit-learn: one row has no spread; its covariance is zero (a single-image class)
            continue
        scale = np.sqrt(var[c])
        scale[scale == 0] = 1.0
        # Two rows: their centred rows are opposite, so Ledoit-Wolf's estimate is 0 whatever they are (no shrinkage,
        # a rank-1 covariance); with most classes that small the pooled one is singular (scikit-learn's
        # coefficients reach 1e15, every image goes to one class). Such a class keeps only its diagonal.
        trace = var[c] / scale**2
        a[c], mu[c] = (1.0, trace.mean()) if n == 2 else _shrinkage(Zc / scale, trace)
    n_c = np.bincount(y_idx, minlength=k)
    parts = [
        (np.sqrt(priors * (1 - a) / n_c)[y_idx], (priors * a * mu) @ np.where(var > 0, var, 1.0))
        for priors in prior_sets
    ]
    return means, Z, parts


def pooled_matrix(Z: np.ndarray, weight: np.ndarray, diag: np.ndarray) -> np.ndarray:
    """(Z * weight)'(Z * weight) + diag(diag), d x d. Memory: one block of weighted rows besides the result."""
    d = Z.shape[1]
    cov = np.zeros((d, d))
    for start in range(0, len(Z), BLOCK_ROWS):  # (BLAS's symmetric update, half the arithmetic, was no faster)
        Zw = Z[start : start + BLOCK_ROWS] * weight[start : start + BLOCK_ROWS, None]
        cov += Zw.T @ Zw
    cov[np.diag_indices(d)] += diag
    return cov


# Below this many rows per class on average a class's own product is too small to run fast and the k scaled d x d
# additions cost more than the second product saves: `pooled_matrices` then forms each rule's matrix from all rows at
# once. Two rules at 1280 columns, one thread: 101 classes of 30 rows 0.21 s one product per rule against 0.52 s
# class by class, 50 of 64 0.23 against 0.31, 20 of 128 0.175 against 0.166, 4 of 540 (brain_mri4) 0.146 against 0.088.
MIN_CLASS_ROWS = 128


def pooled_matrices(Z: np.ndarray, y_idx: np.ndarray, parts: list) -> list[np.ndarray | None]:
    """`pooled_matrix` for each (weight, diag) of `pooled_parts` (one per prior rule), None where
    `lda_coefficients` solves without it (the Woodbury identity). The weights are constant within a class, so with
    several rules and large classes each class's scatter Z_c'Z_c is computed once and added to every rule's matrix,
    scaled: one n x d x d product instead of one per rule (the LDA fold path's two rules)."""
    dense = [i for i, (w, dg) in enumerate(parts) if not _low_rank(w, dg)]
    out: list[np.ndarray | None] = [None] * len(parts)
    k = int(y_idx.max()) + 1 if len(y_idx) else 0
    if len(dense) < 2 or len(Z) < MIN_CLASS_ROWS * k:
        for i in dense:
            out[i] = pooled_matrix(Z, *parts[i])
        return out
    from scipy.linalg.blas import daxpy

    d = Z.shape[1]
    for i in dense:
        out[i] = np.zeros((d, d))
    for c in range(k):
        rows = np.flatnonzero(y_idx == c)
        if not len(rows):
            continue
        scatter = None
        for start in range(0, len(rows), BLOCK_ROWS):
            Zc = Z[rows[start : start + BLOCK_ROWS]]
            scatter = Zc.T @ Zc if scatter is None else scatter + Zc.T @ Zc
        for i in dense:  # in place: cov += w_c^2 * scatter (the class's row weight, squared)
            daxpy(scatter.ravel(), out[i].ravel(), a=float(parts[i][0][rows[0]]) ** 2)
    for i in dense:
        out[i][np.diag_indices(d)] += parts[i][1]
    return out


def _low_rank(weight: np.ndarray, diag: np.ndarray) -> bool:
    """Whether (Z * w)'(Z * w) + diag is solved cheaper by the Woodbury identity: fewer weighted rows than half the
    columns and a positive diagonal (every class's shrinkage is then part of it)."""
    return 2 * int(np.count_nonzero(weight)) < len(diag) and bool(np.all(diag > 0))


def lda_coefficients(
    means: np.ndarray,
    priors: np.ndarray,
    Z: np.ndarray,
    weight: np.ndarray,
    diag: np.ndarray,
    cov: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """coef (k, d) and intercept (k,) of the lsqr solver on the pooled covariance C = U'U + D (U = Z * weight, D =
    diag; `cov`: C if already formed). C is shrunk, so positive definite: with fewer rows than half the columns it is
    solved by the Woodbury identity, C^-1 B = D^-1 B - D^-1 U' (I + U D^-1 U')^-1 U D^-1 B, an n x n Cholesky
    instead of a d x d one (at 12 images of 1280 features: ~2 ms against ~45 ms, the data-efficiency curve's small
    draws and few-shot folds); otherwise by Cholesky, and where C is not positive definite (no spread left to
    shrink), scikit-learn's least-squares solution."""
    if _low_rank(weight, diag):
        keep = weight > 0
        U = Z[keep] * weight[keep, None]
        inv = 1.0 / diag
        DB = inv[:, None] * means.T
        UD = U * inv
        inner = UD @ U.T
        inner[np.diag_indices(len(U))] += 1.0
        coef = (DB - UD.T @ scipy.linalg.solve(inner, U @ DB, assume_a="pos")).T
    else:
        cov = pooled_matrix(Z, weight, diag) if cov is None else cov
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
    means, Z, ((weight, diag),) = pooled_parts(X, y_idx, [priors_])
    cov = pooled_matrix(Z, weight, diag)  # scikit-learn's `covariance_`
    coef, intercept = lda_coefficients(means, priors_, Z, weight, diag, cov)
    if k == 2:  # scikit-learn keeps one row for two classes
        coef = np.array(coef[1] - coef[0], ndmin=2)
        intercept = np.array(intercept[1] - intercept[0], ndmin=1)
    lda.classes_, lda.priors_, lda.means_, lda.covariance_ = classes, priors_, means, cov
    lda.coef_, lda.intercept_ = coef, intercept
    lda.n_features_in_ = X.shape[1]
    lda._max_components = lda._n_features_out = min(k - 1, X.shape[1])
    return lda
