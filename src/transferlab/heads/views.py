"""Training on two views of each image (plain and horizontally flipped features) and predicting on their mean."""

from __future__ import annotations

import inspect

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_array, check_is_fitted

from .inputs import eval_set_inputs, fit_inputs


def through_views(name: str) -> str:
    """A parameter name of the wrapped estimator as `ViewAugmented(estimator)` takes it (`set_params`, grids)."""
    return f"estimator__{name}"


class ViewAugmented(ClassifierMixin, BaseEstimator):
    """Train on two views of each image as separate samples; predict on their mean.

    Each row of X is one image: its plain features then its flipped features, side by side (2d columns).
    `fit` trains `estimator` on both halves stacked (labels repeated), so cross-validation and sampling
    still split by image; `predict*` use the mean of the halves (test-time augmentation), and also take
    that mean directly (d columns), as a saved model's tta features are. An `eval_set` is passed on as
    mean features. Like a Pipeline's steps, `estimator` is fitted in place (so that
    prediction-time parameters set through `set_params` reach the fitted model). `n_features_in_` is the
    2d columns of `fit`; `predict*` take 2d or d columns.
    """

    def __init__(self, estimator):
        self.estimator = estimator

    @staticmethod
    def _halves(X):
        if X.shape[1] % 2:
            raise ValueError(
                f"ViewAugmented expects plain and flipped features side by side (an even number of "
                f"columns), got n_features={X.shape[1]}"
            )
        d = X.shape[1] // 2
        return X[:, :d], X[:, d:]

    def _mean(self, X):
        check_is_fitted(self, "estimator_")
        X = check_array(X, dtype=np.float32)
        if X.shape[1] == self.n_view_features_:  # one view, or the mean already (bundles)
            return X
        if X.shape[1] != 2 * self.n_view_features_:
            raise ValueError(
                f"X has {X.shape[1]} features, but ViewAugmented is expecting "
                f"{2 * self.n_view_features_} features as input (plain and flipped side by side) "
                f"or {self.n_view_features_} (one view, or their mean)"
            )
        a, b = self._halves(X)
        return (a + b) / 2

    def fit(self, X, y, eval_set: tuple | None = None):
        X, y = fit_inputs(self, X, y, dtype=np.float32)
        a, b = self._halves(X)
        self.n_view_features_ = a.shape[1]
        self.estimator_ = self.estimator
        kw = {}
        if eval_set is not None and "eval_set" in inspect.signature(self.estimator_.fit).parameters:
            Xv, yv = eval_set_inputs(self, eval_set, dtype=np.float32, check_features=False)
            kw["eval_set"] = (self._mean(Xv), yv)
        self.estimator_.fit(np.concatenate([a, b]), np.concatenate([y, y]), **kw)
        self.classes_ = self.estimator_.classes_
        return self

    @property
    def history_(self):
        return self.estimator_.history_

    def predict(self, X):
        X = self._mean(X)  # NotFittedError before fit
        return self.estimator_.predict(X)

    @available_if(lambda self: hasattr(self.estimator, "predict_proba"))
    def predict_proba(self, X):
        X = self._mean(X)
        return self.estimator_.predict_proba(X)

    @available_if(lambda self: hasattr(self.estimator, "decision_function"))
    def decision_function(self, X):
        X = self._mean(X)
        return self.estimator_.decision_function(X)
