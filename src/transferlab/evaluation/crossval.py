"""The default selection: repeated stratified K-fold CV over train + valid, honest for tuned heads, noise-aware.

`plan` picks K from the smallest class (at most 5) and the repeats from the data size (more repeats for small
sets, where one split is noisiest). `cross_validate` fits every candidate's grid on every fold through its fold
path (`heads.paths`; features standardised and kernels computed once per fold) and keeps each grid point's
out-of-fold (OOF) scores. Then, for each method:

- **honest OOF predictions**: for each fold, the grid point is chosen on the *other* folds' OOF predictions of
  the same repeat, and that point's predictions are the fold's. A grid's maximum is never compared with
  untuned scores: every method's CV score is the score of its whole tuning procedure on images it did not
  choose on (a held-out fold per choice);
- the **ensemble** (soft vote) is scored on the mean of its members' honest OOF probabilities, no extra fits:
  the SVM member's decision values become probabilities at a temperature fitted, like its grid point, on the
  other folds' OOF values of the same repeat (`heads.pairwise`);
- the method's **CV score** is the select metric of its honest OOF predictions (pooled per repeat, averaged
  over repeats), with a standard error: the Nadeau-Bengio corrected SE of its per-fold differences to the best
  method (paired, corrected for the overlap of training sets across folds).

The **rule** (`rule="best"`, the default): the best honest CV score. `rule="one_se"`: among the methods within one
such SE of the best, the first in `PREFERENCE` (simpler and exportable first). On the four benchmark datasets
(`benchmarks/selection.py`) "best" had the lower test regret (mean 0.006, max 0.017, against 0.010 and 0.025):
the honest scores already carry no tuning optimism, and the preference gave up the ensemble's gain where it was
real; so the SEs are reported, and decide nothing by default. Seed methods are scored like the rest and can be
chosen. The chosen hyperparameters of each tuned method are its best grid point on all OOF predictions
pooled (its final model is fitted with them; the tuned SVM's also carry the temperature of its probabilities, fitted on
that point's OOF decision values, so its final fit needs no calibration folds of its own). Only train + valid go in: nothing here sees test data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..heads import registry
from ..heads.pairwise import fit_temperature
from ..heads.search import METRICS, cv_folds, score
from .threads import default_jobs, thread_budget, thread_map

RULES = ("one_se", "best")
VIEWS_NOTE = ", fitting on plain and flipped views"  # the protocol's wording under `--flip-train`
COST_RANK = {"seconds": 0, "minutes": 1, "hours": 2}


@dataclass
class Plan:
    """K, repeats and the folds: (repeat, fit indices, held-out indices) for each of K x repeats folds."""

    k: int
    repeats: int
    seed: int
    folds: list[tuple[int, np.ndarray, np.ndarray]]

    def describe(self) -> str:
        r = f"{self.repeats} x " if self.repeats > 1 else ""
        return f"{r}{self.k}-fold stratified CV on train + valid"


def plan(y, seed: int = 0, k: int | None = None, repeats: int | None = None, rows: int = 3000) -> Plan:
    """K = the smallest class's count, clipped to [2, 5]; repeats = rows // len(y), clipped to [1, 3]: three
    repeats below 1000 images, where one split is noisiest, one from 1500 on, where heads cost most."""
    y = np.asarray(y)
    counts = np.unique(y, return_counts=True)[1]
    k = int(k or np.clip(counts.min(), 2, 5))
    repeats = int(repeats or np.clip(rows // max(len(y), 1), 1, 3))
    folds = [(r, a, b) for r in range(repeats) for a, b in cv_folds(y, k, seed + r)]
    return Plan(k, repeats, seed, folds)


def _parts(X, y, a, b, views=None):
    """One fold's (fit rows, fit labels, held rows). With `views` (plain and flipped features side by side), the fit
    images' two views are stacked as separate rows, labels repeated, and the held images are scored on X (their
    views' mean): what `heads.views.ViewAugmented`, the final model under `--flip-train`, does."""
    if views is None:
        return X[a], y[a], X[b]
    d = views.shape[1] // 2
    return np.concatenate([views[a, :d], views[a, d:]]), np.concatenate([y[a], y[a]]), X[b]


def _fold(cv, X, y, a, b, k, points, name=None, dropped=(), views=None, **kw):
    """One fold of a method's path; its parts are taken here, in the task, so that no copy waits in a queue.
    None at once when the method was dropped (`dropped`: shared with the loop that drops methods)."""
    if name in dropped:
        return None
    return cv.fold(*_parts(X, y, a, b, views), k, points, **kw)


def steps(methods: list[str], plan_: Plan) -> int:
    """How many times `cross_validate` calls `on_step` for these methods: once per fold per method with a fold
    path, an ensemble's members included."""
    n = 0
    for name in methods:
        cv = registry.get(name).cv
        if cv is None:
            continue
        if registry.get(name).kind == "ensemble":
            n += len([m for m in cv.members if m not in methods])
        else:
            n += 1
    return n * len(plan_.folds)


def _metric(y, pred, metric: str) -> float:
    return score(y, pred)[metric]


def _others(n: int, held: np.ndarray) -> np.ndarray:
    """A mask of the n images outside a fold's held part: the rest of its repeat's out-of-fold values."""
    other = np.ones(n, bool)
    other[held] = False
    return other


def _honest(S: np.ndarray, y: np.ndarray, plan_: Plan, metric: str) -> tuple[np.ndarray, list[int], int]:
    """S: (G, R, n, k) OOF scores. Honest predictions (R, n), the point chosen for each fold, the point chosen on
    everything (the final model's)."""
    pred = S.argmax(axis=3)  # (G, R, n)
    G = len(S)
    honest = np.empty(pred.shape[1:], dtype=np.int64)
    chosen = []
    for r, _, held in plan_.folds:
        other = _others(len(y), held)
        g = 0 if G == 1 else int(np.argmax([_metric(y[other], pred[i, r, other], metric) for i in range(G)]))
        chosen.append(g)
        honest[r, held] = pred[g, r, held]
    overall = (
        0
        if G == 1
        else int(np.argmax([np.mean([_metric(y, pred[i, r], metric) for r in range(plan_.repeats)]) for i in range(G)]))
    )
    return honest, chosen, overall


def cross_validate(
    X,
    y,
    methods: list[str],
    *,
    metric: str = "macro_f1",
    seed: int = 0,
    epochs: int = 50,
    plan_: Plan | None = None,
    rule: str = "best",
    on_step=None,
    n_jobs: int | None = None,
    deadline: float | None = None,
    views=None,
    cache=None,
) -> dict:
    """Score `methods` (registered heads on features, each with a fold path) by repeated CV; choose one.

    Returns what metrics.json's `selection` holds (see the module doc): per method its CV `score` (the three
    metrics), `fold_scores`, `se`, `params` (its final model's), `point_score` (that grid point's own pooled
    OOF score, the grid's best: above `score`), `seconds` (its folds' fitting time, summed over
    the threads); the `method` chosen and `why`. `on_step(description)` is called as work advances (the study's progress bar). Folds run in `n_jobs`
    threads (default: one per core, up to the number of folds), each with cores // n_jobs BLAS/OpenMP/torch threads.
    Methods run costliest first (registry cost, then grid size), or cheapest first under a `deadline` (a
    `time.perf_counter()` value, from `--time-budget`): once a method's finished folds project its CV past it,
    that method and every costlier one are dropped (`out_of_time`: method -> why; an ensemble none of whose members
    was scored too). The cheapest method always runs to the end. `views` (`--flip-train`): each image's plain and flipped
    features side by side, X being their mean; every fold then fits on both views of its fit images and scores its
    held images on X, as the final models do (`_parts`). `cache` (`heads.cache.HeadCache`): each method's scores on
    every fold are read from it where these very inputs were cross-validated before (`cv_key`), and stored after;
    a cached method's `seconds` are those its folds took when computed (`cached`: true).
    """
    if metric not in METRICS:
        raise ValueError(f"select metric must be one of {', '.join(METRICS)}, got '{metric}'")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got '{rule}'")
    X = np.asarray(X, dtype=np.float32)
    if views is not None:
        views = np.asarray(views, dtype=np.float32)
        if views.shape != (len(X), 2 * X.shape[1]):
            raise ValueError(f"views must be {len(X)} x {2 * X.shape[1]} (two views of X's rows), got {views.shape}")
    classes, y = np.unique(np.asarray(y), return_inverse=True)
    k = len(classes)
    plan_ = plan_ or plan(y, seed)
    step = on_step or (lambda _d: None)
    out: dict[str, dict] = {}
    honest: dict[str, np.ndarray] = {}
    state: dict[str, tuple] = {}
    extra: dict[str, dict] = {}  # members computed only for an ensemble
    needed = list(methods)  # an ensemble's members are cross-validated for it even when not asked for
    for name in methods:
        info = registry.get(name)
        if info.kind == "ensemble" and info.cv is not None:
            needed += [m for m in info.cv.members if m not in needed]
    stepped_aside: dict[str, str] = {}
    rows = max(len(a) for _, a, _ in plan_.folds) * (1 if views is None else 2)
    jobs = n_jobs if n_jobs is not None else default_jobs(len(plan_.folds))
    paths: dict[str, tuple] = {}  # every fold of every method in one stream of tasks: no core idles between methods
    for name in needed:
        info = registry.get(name)
        if info.cv is None or info.kind == "ensemble":
            continue
        reason = info.cv.too_big(rows)
        if reason:
            stepped_aside[name] = reason
            continue
        points = info.cv.points()
        paths[name] = (info.cv, points, np.empty((len(points), plan_.repeats, len(y), k), dtype=np.float32))
    order = sorted(paths, key=lambda n: (COST_RANK.get(registry.get(n).cost, len(COST_RANK)), len(paths[n][1])))
    paths = {n: paths[n] for n in order}  # cheapest first: under a deadline, the cheap candidates are scored
    dropped: dict[str, str] = {}  # method -> why it was dropped for the deadline
    seconds, done = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0)
    keys, cached = _cached_scores(cache, paths, X, y, views, plan_, seed, epochs, seconds)
    n_folds = len(plan_.folds)
    for name in cached:
        for j in range(n_folds):
            step(f"CV {name}: fold {j + 1}/{n_folds} (cached)")
    tasks, labels = [], []
    # Under a deadline the cheap methods run first (they are scored whatever happens); without one, the costliest
    # first, so the threads end together instead of one running a long method's last folds alone (at 101
    # classes: 3.5 s of one idle core behind the tuned SVM's folds).
    for name in order if deadline is not None else order[::-1]:
        if name in cached:
            continue
        cv, points, _ = paths[name]
        for j, (_, a, b) in enumerate(plan_.folds):
            kw = {"seed": seed, "epochs": epochs, "name": name, "dropped": dropped, "views": views}
            tasks.append((_fold, (cv, X, y, a, b, k, points), kw))
            labels.append((name, j))
    with thread_budget(jobs):
        for (name, j), (scores, sec) in zip(labels, thread_map(tasks, jobs)):
            if scores is None:  # dropped
                continue
            r, _, b = plan_.folds[j]
            step(f"CV {name}: fold {j + 1}/{n_folds}")
            seconds[name] += sec
            done[name] += 1
            for g, s in enumerate(scores):
                paths[name][2][g, r, b] = s
            if keys and done[name] == n_folds:  # stored as soon as it is whole: an interrupted run keeps it
                cache.put_scores(keys[name], paths[name][2], seconds[name])
            if deadline is not None and name != order[0] and name not in dropped:
                eta = time.perf_counter() + seconds[name] / done[name] * (n_folds - done[name]) / jobs
                if eta > deadline:  # this method and every costlier one after it
                    later = order[order.index(name) + 1 :]
                    dropped[name] = (
                        f"its {plan_.describe()} would have ended {eta - deadline:.0f} s past the time budget"
                    )
                    for m in later:
                        dropped.setdefault(m, f"costlier than {name}, which did not fit the time budget")
    for name in dropped:
        del paths[name]
    for name, (cv, points, S) in paths.items():
        hon, chosen, overall = _honest(S, y, plan_, metric)
        state[name] = (S, chosen, points, cv)
        params = dict(points[overall])
        if cv.temperature_param:  # the final model's calibration: the chosen point's out-of-fold values, pooled
            params[cv.temperature_param] = fit_temperature(S[overall].reshape(-1, k), np.tile(y, plan_.repeats))
        pooled = [score(y, S[overall, r].argmax(axis=1)) for r in range(plan_.repeats)]
        info_out = {
            "params": params,
            "grid_points": len(points),
            "seconds": seconds[name],
            **({"cached": True} if name in cached else {}),
            # the chosen point's own pooled OOF score: the best of the grid, so above the honest `score`
            "point_score": {m: float(np.mean([s[m] for s in pooled])) for m in METRICS},
        }
        if name in methods:
            honest[name], out[name] = hon, info_out
        else:
            extra[name] = info_out
    for name in methods:  # ensembles: the mean of their members' honest OOF probabilities
        info = registry.get(name)
        if info.kind != "ensemble" or info.cv is None:
            continue
        members = [m for m in info.cv.members if m in state]
        if not members:
            if any(m in dropped for m in info.cv.members):
                dropped[name] = "none of its members fitted the time budget"
            continue
        P = np.zeros((plan_.repeats, len(y), k), dtype=np.float64)
        for m in members:
            S, chosen, points, cv = state[m]
            for j, (r, _, b) in enumerate(plan_.folds):
                other = _others(len(y), b)  # the other folds of the same repeat: what chose the point calibrates
                g = chosen[j]
                P[r, b] += cv.probabilities(S[g, r, b], S[g, r, other], y[other])
        honest[name] = P.argmax(axis=2)
        out[name] = {
            "params": {m: {**out, **extra}[m]["params"] for m in members},
            "members": members,
            "grid_points": 1,
            "seconds": 0.0,  # no fits: its members' out-of-fold values
        }
    if not honest:
        raise ValueError(f"none of {', '.join(methods)} can be cross-validated on features")
    for name, hon in honest.items():
        per_repeat = [score(y, hon[r]) for r in range(plan_.repeats)]
        out[name]["score"] = {m: float(np.mean([s[m] for s in per_repeat])) for m in METRICS}
        out[name]["fold_scores"] = [_metric(y[b], hon[r, b], metric) for r, _, b in plan_.folds]
    out_of_time = {m: why for m, why in dropped.items() if m in methods}
    protocol = plan_.describe() + ("" if views is None else VIEWS_NOTE)
    return {
        **decide(out, plan_, metric, rule, n=len(y), protocol=protocol),
        "methods": out,
        "stepped_aside": stepped_aside,
        "out_of_time": out_of_time,
    }


def _cached_scores(cache, paths: dict, X, y, views, plan_: Plan, seed: int, epochs: int, seconds: dict):
    """Each method's cache key, and the methods whose scores the cache holds (read into `paths`, their fitting
    seconds into `seconds`)."""
    if cache is None:
        return {}, set()
    from ..heads.cache import cv_key, data_digest

    folds = [np.asarray([r, len(a), len(b)]) for r, a, b in plan_.folds] + [
        i for _, a, b in plan_.folds for i in (a, b)
    ]
    data = data_digest(X, y, *folds, *(() if views is None else (views,)))  # once: every method's key shares it
    keys = {name: cv_key(name, points, seed, epochs, data) for name, (_, points, _) in paths.items()}
    cached = set()
    for name, (_, _, S) in paths.items():
        hit = cache.scores(keys[name])
        if hit is not None and hit[0].shape == S.shape and hit[0].dtype == S.dtype:
            S[...] = hit[0]
            seconds[name] = hit[1]
            cached.add(name)
    return keys, cached


# The order in which methods within one standard error of the best are preferred: the linear heads first
# (one matrix product to predict, exportable to ONNX, calibrated probabilities), then LDA, the SVMs, and the
# ensemble last (the costliest to run and not exportable). Methods not listed come after, in their order.
PREFERENCE = ("logreg", "lda", "svm", "svm_tuned", "ensemble")


def decide(out: dict, plan_: Plan, metric: str, rule: str, n: int, protocol: str | None = None) -> dict:
    """The chosen method and why; sets each method's `se` (corrected SE of its difference to the best).
    `protocol`: how the scores were made, as reported (default: the plan's description)."""
    names = list(out)
    best = max(names, key=lambda m: (out[m]["score"][metric], -names.index(m)))
    fb = np.array(out[best]["fold_scores"])
    n_held = n / plan_.k
    for m in names:  # paired on the folds both have: all of them, or the first repeat's (fine-tuning's, see study)
        fm = np.array(out[m]["fold_scores"])
        J = min(len(fb), len(fm))
        d = fb[:J] - fm[:J]
        var = float(d.var(ddof=1)) if J > 1 else 0.0
        out[m]["se"] = float(np.sqrt((1 / J + n_held / (n - n_held)) * var))  # Nadeau & Bengio (2003)
        out[m]["gap"] = out[best]["score"][metric] - out[m]["score"][metric]
    close = [m for m in names if out[m]["gap"] <= out[m]["se"]]
    if rule == "best":
        chosen = best
        why = f"best CV {metric}"
    else:
        rank = {m: (PREFERENCE.index(m) if m in PREFERENCE else len(PREFERENCE) + names.index(m)) for m in close}
        chosen = min(close, key=rank.get)
        why = (
            f"best CV {metric}"
            if chosen == best
            else f"within one standard error of the best ({best}: {out[best]['score'][metric]:.3f}; "
            f"{chosen}: {out[chosen]['score'][metric]:.3f} +- {out[chosen]['se']:.3f}) and first in the "
            f"preference order {', '.join(PREFERENCE)}"
        )
    return {
        "method": chosen,
        "best": best,
        "why": why,
        "within_one_se": close,
        "rule": rule,
        "metric": metric,
        "protocol": protocol or plan_.describe(),
        "k": plan_.k,
        "repeats": plan_.repeats,
    }
