"""Choosing among methods, on validation scores only, and what the chosen one does with less data.

`select_method` takes the methods' validation (or CV) scores, never test data; `data_efficiency` refits the
chosen head, its hyperparameters fixed, on k images per class and scores it on validation.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from ..heads.search import METRICS, fixed, rank_key, score

DATA_EFFICIENCY_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def select_method(valid: dict[str, dict], metric: str = "macro_f1") -> dict:
    """The method with the best validation `metric` (ties: the other metrics, then order); validation only."""
    if metric not in METRICS:
        raise ValueError(f"select metric must be one of {', '.join(METRICS)}, got '{metric}'")
    if not valid:
        raise ValueError("no method has validation scores to select on")
    ranking = sorted(valid, key=lambda n: rank_key(valid[n], metric), reverse=True)  # stable: order breaks ties
    return {
        "method": ranking[0],
        "metric": metric,
        "valid": {m: valid[ranking[0]][m] for m in METRICS},
        "ranking": [[n, valid[n][metric]] for n in ranking],
    }


def data_efficiency(
    estimator,
    X_train,
    y_train,
    X_valid,
    y_valid,
    *,
    metric: str = "macro_f1",
    seed: int = 0,
    ks=DATA_EFFICIENCY_KS,
    repeats: int = 3,
) -> dict:
    """Validation `metric` when the head (its chosen hyperparameters fixed) trains on k images per class.

    Each class contributes min(k, its count) images, sampled with `seed`; points whose sample is not the
    whole training set are averaged over `repeats` draws. The last point is all training images.
    """
    y_train = np.asarray(y_train)
    classes, counts = np.unique(y_train, return_counts=True)
    cap = int(counts.max())
    ks = sorted({k for k in ks if k < cap} | {cap})
    base = fixed(estimator)
    points = []
    with threadpool_limits(1):
        for k in ks:
            points.append(
                _efficiency_point(
                    base, X_train, y_train, X_valid, y_valid, classes, counts, k, k >= cap, metric, seed, repeats
                )
            )
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
    return {
        "k": k,
        "n_train": int(np.minimum(counts, k).sum()),
        "score": float(np.mean(scores)) if scores else None,
        "scores": scores,
        "seconds": time.perf_counter() - t0,
        **({"error": errors[0]} if errors else {}),
    }


def _scalar_params(est) -> dict:
    return {k: v for k, v in est.get_params().items() if isinstance(v, (int, float, str, bool, type(None)))}
