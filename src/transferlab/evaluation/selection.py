"""Choosing among methods, on validation scores only, and what the chosen one does with less data.

`select_method` takes the methods' validation (or CV) scores, never test data; `data_efficiency` refits the
chosen head, its hyperparameters fixed, on k images per class and scores it on validation.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

from ..heads.search import METRICS, fixed, rank_key, score
from ..warning_filters import warning_filter
from .threads import default_jobs, thread_budget, thread_map

DATA_EFFICIENCY_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

FEW_PER_CLASS = "The number of unique classes is greater than 50% of the number of samples"


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
    n_jobs: int | None = None,
    fitted: bool = False,
) -> dict:
    """Validation `metric` when the head (its chosen hyperparameters fixed) trains on k images per class.

    Each class contributes min(k, its count) images, sampled with `seed`; points whose sample is not the
    whole training set are averaged over `repeats` draws. The last point is all training images; with `fitted`
    (`estimator` is already fitted on exactly (X_train, y_train): the study's final head) it is that head's own
    validation score, not a refit (the costliest fit of the curve, and the model the report describes). The draws
    are fitted in `n_jobs` threads (default: one per core; `evaluation.threads`).
    """
    y_train = np.asarray(y_train)
    classes, counts = np.unique(y_train, return_counts=True)
    cap = int(counts.max())
    ks = sorted({k for k in ks if k < cap} | {cap})
    base = fixed(estimator)
    draws = [(k, r) for k in ks for r in range(1 if k >= cap else repeats)]
    tasks, rows = [], []
    for k, r in draws:
        if k >= cap and fitted:
            tasks.append((_score, (estimator, X_valid, y_valid, metric), {}))
            rows.append(0)  # no fit
            continue
        rng = np.random.default_rng([seed, k, r])
        idx = np.concatenate([rng.permutation(np.flatnonzero(y_train == c))[:k] for c in classes])
        tasks.append((_fit_score, (base, X_train, y_train, idx, X_valid, y_valid, metric), {}))
        rows.append(len(idx))
    jobs = default_jobs(len(tasks)) if n_jobs is None else n_jobs
    # the largest fits first, so the threads end together (the smallest last, not the largest alone)
    run = sorted(range(len(tasks)), key=lambda i: -rows[i])
    with thread_budget(jobs):  # the draws are independent fits: side by side on the cores
        results = list(thread_map([tasks[i] for i in run], jobs))
    done = [None] * len(tasks)
    for i, res in zip(run, results):
        done[i] = res
    points = []
    for k in ks:
        mine = [res for (kk, _), res in zip(draws, done) if kk == k]
        scores = [s for (s, err), _ in mine if err is None]
        errors = [err for (s, err), _ in mine if err is not None]
        points.append(
            {
                "k": k,
                "n_train": int(np.minimum(counts, k).sum()),
                "score": float(np.mean(scores)) if scores else None,
                "scores": scores,
                # fitting time summed over the draws (for the fitted head: its prediction time)
                "seconds": float(sum(sec for _, sec in mine)),
                **({"error": errors[0]} if errors else {}),
            }
        )
    return {"metric": metric, "seed": seed, "repeats": repeats, "params": _scalar_params(base), "points": points}


def _fit_score(base, X_train, y_train, idx, X_valid, y_valid, metric: str) -> tuple[float | None, str | None]:
    """One draw: a clone of the head fitted on the rows `idx`, its validation score (or why it could not fit)."""
    try:
        # one image per class makes scikit-learn guess "y could represent a regression problem": not here
        with warning_filter("ignore", ConvergenceWarning), warning_filter("ignore", UserWarning, FEW_PER_CLASS):
            model = clone(base).fit(X_train[idx], y_train[idx])
        return score(y_valid, model.predict(X_valid))[metric], None
    except ValueError as exc:  # e.g. more neighbours than images at k=1
        return None, str(exc)


def _score(fitted, X_valid, y_valid, metric: str) -> tuple[float, None]:
    return score(y_valid, fitted.predict(X_valid))[metric], None


def _scalar_params(est) -> dict:
    return {k: v for k, v in est.get_params().items() if isinstance(v, (int, float, str, bool, type(None)))}
