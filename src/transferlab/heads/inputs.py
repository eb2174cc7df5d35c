"""How every head checks what it is given, as scikit-learn's own classifiers do (issue 18).

`fit_inputs` validates (X, y) for `fit`: a dense, finite, non-empty 2-D X (sparse input is refused with
scikit-learn's message "Sparse data was passed ... but dense data is required"), a 1-D y of the same length
(a column vector is raveled with a DataConversionWarning), classification targets only (no continuous or
multi-output y), and it sets `n_features_in_` (and `feature_names_in_` for a DataFrame). `predict_inputs`
raises `NotFittedError` before `fit` and checks X against what `fit` saw. `eval_set_inputs` checks the
validation pair some heads take. Labels may be any hashable values numpy sorts (ints, strings): `classes_`
holds them as given and `predict` returns them.
"""

from __future__ import annotations

from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_consistent_length, check_is_fitted, column_or_1d

try:
    from sklearn.utils.validation import validate_data
except ImportError:  # scikit-learn < 1.6

    def validate_data(estimator, /, X="no_validation", y="no_validation", reset=True, **check_params):
        return estimator._validate_data(X, y, reset=reset, **check_params)


def fit_inputs(estimator, X, y, *, dtype="numeric"):
    """(X, y) for `estimator.fit`, checked; sets `estimator.n_features_in_`. `dtype`: X's dtype ("numeric"
    keeps a numeric one)."""
    X, y = validate_data(estimator, X, y, dtype=dtype)
    check_classification_targets(y)
    return X, y


def predict_inputs(estimator, X, *, dtype="numeric"):
    """X for a fitted `estimator`'s predict/predict_proba/decision_function: NotFittedError before `fit`,
    ValueError if X has another number of features than in `fit`."""
    check_is_fitted(estimator)
    return validate_data(estimator, X, reset=False, dtype=dtype)


def eval_set_inputs(estimator, eval_set, *, dtype="numeric", check_features: bool = True):
    """An `eval_set=(X_valid, y_valid)` checked as `fit`'s data is (it may be empty); None stays None.
    `check_features`: X_valid must have `estimator.n_features_in_` columns (set by `fit_inputs` first)."""
    if eval_set is None:
        return None
    Xv, yv = eval_set
    Xv = check_array(Xv, dtype=dtype, ensure_min_samples=0, input_name="eval_set X")
    yv = column_or_1d(yv, warn=True)
    check_consistent_length(Xv, yv)
    if check_features and Xv.shape[1] != estimator.n_features_in_:
        raise ValueError(
            f"eval_set X has {Xv.shape[1]} features, but {type(estimator).__name__} is fitted on "
            f"{estimator.n_features_in_}"
        )
    return Xv, yv
