"""Training on two views of each image (plain and horizontally flipped features) and predicting on their mean."""

from __future__ import annotations

import inspect

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted


class ViewAugmented(ClassifierMixin, BaseEstimator):
    """Train on two views of each image as separate samples; predict on their mean.

    Each row of X is one image: its plain features then its flipped features, side by side (2d columns).
    `fit` trains `estimator` on both halves stacked (labels repeated), so cross-validation and sampling
    still split by image; `predict*` use the mean of the halves (test-time augmentation), and also take
    that mean directly (d columns), as a saved model's tta features are. An `eval_set` is passed on as
    mean features. Like a Pipeline's steps, `estimator` is fitted in place (so that
    prediction-time parameters set through `set_params` reach the fitted model).
    """

    def __init__(self, estimator):
        self.estimator = estimator

    @staticmethod
    def _halves(X):
        X = np.asarray(X, dtype=np.float32)
        if X.shape[1] % 2:
            raise ValueError(f"expected plain and flipped features side by side, got {X.shape[1]} columns")
        d = X.shape[1] // 2
        return X[:, :d], X[:, d:]

    def _mean(self, X):
        X = np.asarray(X, dtype=np.float32)
        if getattr(self, "n_view_features_", None) == X.shape[1]:  # one view, or the mean already (bundles)
            return X
        a, b = self._halves(X)
        return (a + b) / 2

    def fit(self, X, y, eval_set: tuple | None = None):
        a, b = self._halves(X)
        self.n_view_features_ = a.shape[1]
        y = np.asarray(y)
        self.estimator_ = self.estimator
        kw = {}
        if eval_set is not None and "eval_set" in inspect.signature(self.estimator_.fit).parameters:
            kw["eval_set"] = (self._mean(eval_set[0]), eval_set[1])
        self.estimator_.fit(np.concatenate([a, b]), np.concatenate([y, y]), **kw)
        self.classes_ = self.estimator_.classes_
        return self

    @property
    def history_(self):
        return self.estimator_.history_

    def predict(self, X):
        check_is_fitted(self, "estimator_")
        return self.estimator_.predict(self._mean(X))

    def predict_proba(self, X):
        check_is_fitted(self, "estimator_")
        return self.estimator_.predict_proba(self._mean(X))

    def decision_function(self, X):
        check_is_fitted(self, "estimator_")
        return self.estimator_.decision_function(self._mean(X))
