"""Multinomial logistic regression solved by full-batch L-BFGS in torch, along a path of C.

The linear-probe protocol of CLIP-style papers: one objective, scikit-learn's `LogisticRegression`'s
(multinomial, L2 on the weights, not on the intercept, `class_weight`, `C`), minimised by torch's L-BFGS with
a strong-Wolfe line search on the whole batch. A path of C values is solved in increasing order, each start
warm from the previous solution, so a grid of 7 C values costs little more than the largest one alone.
`logistic_path` serves the cross-validation of `evaluation.crossval`; `LBFGSLogisticRegression` is the head a
study keeps: a `LogisticRegression` (so it exports, pickles and predicts as scikit-learn's) whose `fit` uses
the same solver.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.utils.class_weight import compute_sample_weight

from .inputs import fit_inputs


def logistic_path(
    X: np.ndarray,
    y_idx: np.ndarray,
    n_classes: int,
    Cs,
    *,
    sample_weight: np.ndarray | None = None,
    max_iter: int = 200,
    tol: float = 1e-4,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(coef (n_classes, d), intercept (n_classes,)) minimising
    0.5 * ||W||^2 + C * sum_i w_i * cross_entropy_i for each C, solved in increasing C, warm-started.

    The objective is divided by C * sum(w) for the solver (same minimiser, better scaled). `tol` bounds the
    largest absolute gradient entry of the scaled objective, as scikit-learn's lbfgs does. float32, the cache's
    precision; classes with no rows get -inf-free logits (their bias is driven down, never NaN).
    """
    Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y_idx, dtype=np.int64))
    w = torch.ones(len(yt)) if sample_weight is None else torch.from_numpy(np.asarray(sample_weight, np.float32))
    total = float(w.sum())  # the objective's sum of weights: lambda = 1 / (C * total) after dividing by it
    w = w / total
    W = torch.zeros(n_classes, Xt.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    order = np.argsort(np.asarray(Cs, dtype=np.float64), kind="stable")
    out: list = [None] * len(order)
    for i in order:
        lam = 1.0 / (float(Cs[i]) * total)
        opt = torch.optim.LBFGS(
            [W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-9, line_search_fn="strong_wolfe"
        )

        def closure():
            opt.zero_grad()
            loss = (torch.nn.functional.cross_entropy(Xt @ W.T + b, yt, reduction="none") * w).sum()
            loss = loss + 0.5 * lam * (W * W).sum()
            loss.backward()
            return loss

        opt.step(closure)
        out[i] = (W.detach().numpy().copy(), b.detach().numpy().copy())
    return out


class LBFGSLogisticRegression(LogisticRegression):
    """scikit-learn's `LogisticRegression` (multinomial, L2) fitted by `logistic_path`'s torch L-BFGS.

    Hyperparameters, fitted attributes (`coef_`, `intercept_`, `classes_`, `n_iter_`) and prediction are
    `LogisticRegression`'s; only `C`, `class_weight`, `max_iter` and `tol` are read by `fit` (L2 penalty, with an
    intercept). On the same data it reaches scikit-learn's lbfgs optimum (tests compare the two) several times
    faster on 1000-d features, which is what makes a C path inside repeated CV affordable.
    """

    def fit(self, X, y, sample_weight=None):
        X, y = fit_inputs(self, X, y, dtype=(np.float32, np.float64))
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        if k < 2:
            raise ValueError(
                f"This solver needs samples of at least 2 classes in the data, but the data contains only one class: {self.classes_[0]!r}"
            )
        sw = compute_sample_weight(self.class_weight, y) if self.class_weight is not None else np.ones(len(y))
        if sample_weight is not None:
            sw = sw * np.asarray(sample_weight, dtype=np.float64)
        sw = sw * len(y) / sw.sum() if sw.sum() > 0 else sw
        ((W, b),) = logistic_path(
            X, y_idx, k, [self.C], sample_weight=sw, max_iter=self.max_iter, tol=min(self.tol, 1e-4)
        )
        if k == 2:  # scikit-learn's binary form: one row, the difference of the two classes' logits
            W, b = W[1:] - W[:1], b[1:] - b[:1]
        self.coef_ = W.astype(X.dtype)
        self.intercept_ = b.astype(X.dtype)
        self.n_iter_ = np.array([self.max_iter], dtype=np.int32)
        return self
