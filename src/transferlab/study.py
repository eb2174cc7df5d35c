"""The study: dataset -> cached features -> heads -> evaluation -> report (`transferlab run`).

Every method is fitted on train, watched on valid, and scored on test once at the end. The
defaults reproduce the seed's study (softmax head vs RBF SVM) on the embedded backbone.
"""

from __future__ import annotations

import inspect
import random
import threading
import time
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import MofNCompleteColumn, TimeElapsedColumn, TimeRemainingColumn

from .config import ConfigError, StudyConfig, resolve_selection, with_preset
from .data.datasets import DatasetError, DatasetWarning, discover
from .evaluation.budget import TimeBudget, parse_duration
from .evaluation.metrics import evaluate, full_proba
from .features.backbones import load_backbone
from .features.extract import extract_features
from .heads.cache import HeadCache, head_key
from .heads.registry import get as method_info
from .heads.registry import make_head, resolve_methods
from .heads.views import through_views
from .progress import paused, progress, starting
from .report import layout
from .report import writer as report


@dataclass
class SplitFeatures:
    X: np.ndarray
    y: np.ndarray
    paths: list[str]
    views: np.ndarray | None = None  # --flip-train: plain and flipped features side by side, for fitting heads
    hashes: list[bytes] | None = None  # each image's content hash (its feature cache key), for the leakage check

    @property
    def fit_X(self) -> np.ndarray:
        """What heads are fitted on: the views where there are, else X (heads predict on X either way)."""
        return self.X if self.views is None else self.views


def _import_in_background(module: str) -> None:
    """Import `module` in a thread of its own. skops (how the head cache and the bundles write scikit-learn heads)
    takes 0.4-0.5 s of Python to import, which the first final fit to store a head waited for (brain_mri4: a third of
    the tuned SVM's final fit, on the critical path); imported while the CV's threads compute in BLAS and libsvm, it
    costs no wall time. A failed import is left for the import that needs it to report."""
    import importlib

    def run() -> None:
        try:
            importlib.import_module(module)
        except Exception:
            pass

    threading.Thread(target=run, name=f"import {module}").start()  # not a daemon: never cut off mid-import at exit


def _seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators, which Lightning's `seed_everything` seeds, without
    importing Lightning (~1.3 s) into a run that trains nothing with it; fine-tuning seeds through it itself."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def extract_splits(cfg: StudyConfig, ds, bb) -> tuple[dict[str, SplitFeatures], dict]:
    """Features of every split in one pass, and the time a fully cached pass takes (the report's warm path).

    When every feature came from the cache, that pass was the warm path and is not repeated. Otherwise a
    second, fully cached pass times it: it hashes the images again and reads only their chunks (each
    checked once, as a rerun would), with the folder's index already built by the first pass.
    """
    all_paths = [s.path for s in ds.samples]
    kw = dict(
        cache_dir=cfg.cache_dir,
        precision=cfg.precision,
        device=cfg.device,
        batch_size=cfg.batch_size,
        runtime=cfg.runtime,
        num_workers=cfg.num_workers,
        strict=cfg.strict,
    )
    first = extract_features(all_paths, bb, progress=cfg.progress, **kw)
    warm = first if first.computed == 0 else extract_features(all_paths, bb, progress=False, **kw)
    views = None
    if cfg.tta or cfg.flip_train:  # flipped views: predict on their mean; flip_train also trains on both
        flip = extract_features(first.paths, bb, progress=cfg.progress, view="hflip", description="flipped", **kw)
        at = {p: i for i, p in enumerate(flip.paths)}
        flipped = flip.features[[at[p] for p in first.paths]]
        views = np.hstack([first.features, flipped]) if cfg.flip_train else None
        first.features = (first.features + flipped) / 2
    row = {p: i for i, p in enumerate(first.paths)}
    splits = {}
    for name in ("train", "valid", "test"):
        samples = [s for s in ds.split(name) if s.path in row]
        splits[name] = SplitFeatures(
            X=first.features[[row[s.path] for s in samples]].reshape(len(samples), first.features.shape[1]),
            y=np.array([s.label for s in samples], dtype=np.int64),
            paths=[s.path for s in samples],
            views=None if views is None else views[[row[s.path] for s in samples]],
            hashes=[first.hashes[s.path] for s in samples] if first.hashes else None,
        )
    info = {
        "seconds": first.seconds,
        "images": len(all_paths),
        "computed": first.computed,
        "from_cache": first.from_cache,
        "cached_seconds": warm.seconds,
        "cold_seconds": first.cold_seconds,
        "images_per_second": first.images_per_second,
        "precision": first.precision,
        "device": first.device,
        "runtime": first.runtime,
        "skipped": first.skipped,
    }
    return splits, info


def warn_untrained_classes(ds, splits: dict[str, SplitFeatures], skipped: list[dict]) -> list[str]:
    """Training classes none of whose training images could be read: one warning each, also in the notes; then
    one warning for the other unreadable images (the report's notes list them all).

    The study goes on, as it does past any unreadable image (`--strict` stops at the first): such a class
    keeps its place in the class list, no head is trained on it, and its valid and test images are still
    scored, as a class the model cannot predict (recall 0), rather than dropped from the numbers unseen.
    """
    trained = set(np.unique(splits["train"].y).tolist())
    reason = {s["path"]: s["reason"] for s in skipped}
    found = []
    for label, name in enumerate(ds.classes):
        if label in trained:
            continue
        paths = [s.path for s in ds.split("train") if s.label == label]
        n_test = int((splits["test"].y == label).sum())
        example = f"e.g. {paths[0]}: {reason.get(paths[0], 'not read')}" if paths else "none listed"
        msg = (
            f"class '{name}': all {len(paths)} training images unreadable ({example}); no head learns it, "
            f"and its {n_test} test images are scored as a class the model cannot predict"
        )
        warnings.warn(msg, DatasetWarning, stacklevel=2)
        ds.notes.append(msg)
        found.append(name)
    named = {s.path for s in ds.split("train") if ds.classes[s.label] in found}
    rest = [s for s in skipped if s["path"] not in named]  # the class warnings above name the others
    if rest:
        n, many = len(rest), len(rest) != 1
        warnings.warn(
            f"{n} image{'s' * many} could not be read and {'were' if many else 'was'} skipped (e.g. "
            f"{rest[0]['path']}: {rest[0]['reason']}); the report's notes list {'them' if many else 'it'} "
            "(--strict stops instead)",
            DatasetWarning,
            stacklevel=2,
        )
    return found


def _one_point(grid_point: dict, flip_train: bool = False) -> list[dict]:
    """A CV grid point as a one-point grid; under `--flip-train` its names are `ViewAugmented`'s, as
    `heads.tuned.make_tuned` names the grid."""
    return [{(through_views(k) if flip_train else k): [v] for k, v in grid_point.items()}]


def chosen_head(name: str, cfg: StudyConfig, params: dict):
    """The head `name` with the hyperparameters repeated CV chose (`evaluation.crossval`): a tuned head searches
    only that grid point, an ensemble's members are fixed at theirs; a seed head has no grid, but the seed's SVM
    takes the temperature of its probabilities that the CV fitted (its `FoldPath.temperature_param`)."""
    kind = method_info(name).kind
    kw = {"seed": cfg.seed, "epochs": cfg.epochs, "scoring": cfg.select_metric, "flip_train": cfg.flip_train}
    est = make_head(name, **kw)
    if kind == "tuned":
        est.set_params(param_grid=_one_point(params, cfg.flip_train))
    elif kind == "ensemble":
        members = tuple(
            (m, make_head(m, **kw).set_params(param_grid=_one_point(p, cfg.flip_train))) for m, p in params.items()
        )
        est.set_params(members=members)
    elif params:
        est.set_params(**{(through_views(k) if cfg.flip_train else k): v for k, v in params.items()})
    return est


def _head_and_key(name: str, cfg: StudyConfig, splits: dict[str, SplitFeatures], chosen: dict | None):
    """The unfitted head `fit_method` fits (`chosen`: the CV's hyperparameters) and its head-cache key."""
    if chosen is not None:
        est = chosen_head(name, cfg, chosen)
    else:
        est = make_head(
            name, seed=cfg.seed, epochs=cfg.epochs, scoring=cfg.select_metric, cv=cfg.cv, flip_train=cfg.flip_train
        )
    if cfg.params.get(name):
        est.set_params(**cfg.params[name])
    tr, va = splits["train"], splits["valid"]
    return est, head_key(name, est, cfg.seed, (tr.fit_X, tr.y, va.fit_X, va.y))


def fit_method(
    name: str,
    cfg: StudyConfig,
    splits: dict[str, SplitFeatures],
    classes: list[str],
    chosen: dict | None = None,
    prefit: dict | None = None,
    prefit_seconds: dict | None = None,
) -> dict:
    """Fit one head on train, score it on valid and test; returns metrics and the fitted estimator. `chosen`:
    the hyperparameters repeated CV chose for it (`chosen_head`). `prefit`: for an ensemble, the study's fitted
    heads by name, which it votes with as they are where they are its members at the same hyperparameters;
    `prefit_seconds`: their training times, which the ensemble's train time then includes (it is what training it
    costs; its own step is a few milliseconds)."""
    tr, va, te = splits["train"], splits["valid"], splits["test"]
    est, key = _head_and_key(name, cfg, splits, chosen)
    heads = HeadCache(cfg.cache_dir)  # a head fitted on these very features before is loaded
    t0 = time.perf_counter()
    hit = heads.get(key)
    if hit is not None:
        est, meta = hit
        out = {
            "estimator": est,
            "train_seconds": meta["train_seconds"],  # an ensemble's includes its members' (see below)
            "cached_head": True,
            "train_note": f"fitted head loaded from the cache in {time.perf_counter() - t0:.2f} s",
        }
    else:
        kw = {"prefit": prefit} if prefit and "prefit" in inspect.signature(est.fit).parameters else {}
        try:
            if "eval_set" in inspect.signature(est.fit).parameters:
                est.fit(tr.fit_X, tr.y, eval_set=(va.fit_X, va.y), **kw)
            else:
                est.fit(tr.fit_X, tr.y)
        except ValueError as exc:  # scikit-learn's InvalidParameterError among them: the config file's value
            if not cfg.params.get(name):
                raise
            raise ConfigError(f"methods.{name} {cfg.params[name]} (the config file's hyperparameters): {exc}") from None
        out = {"estimator": est, "train_seconds": time.perf_counter() - t0}
        reused = [m for m in getattr(est, "reused_", []) if m in (prefit_seconds or {})]
        if reused:
            out["train_note"] = (
                f"on cached features: its members' fits ({', '.join(reused)}, reused from their own rows) and "
                f"its own {out['train_seconds']:.2f} s"
            )
            out["train_seconds"] += sum(prefit_seconds[m] for m in reused)
        meta = {"method": name, "seed": cfg.seed, "train_seconds": out["train_seconds"]}
        heads.put(key, est, meta | ({"train_note": out["train_note"]} if reused else {}))
    out["head_key"] = key
    out["tta"] = cfg.tta or cfg.flip_train  # it predicts on the mean of plain and flipped features (`extract_splits`)
    if len(va.y):
        out["valid"] = evaluate(va.y, est.predict(va.X), classes)
    if len(te.y):
        t0 = time.perf_counter()
        pred = np.asarray(est.predict(te.X), dtype=np.int64)
        proba = full_proba(est, te.X, len(classes))
        out["predict_seconds"] = time.perf_counter() - t0
        out["test"] = evaluate(te.y, pred, classes, proba=proba)
        out["test_pred"] = pred
        out["test_proba"] = proba
    return out


def select_by_cv(cfg: StudyConfig, splits: dict[str, SplitFeatures], bar, budget=None, backbone=None) -> dict:
    """Repeated stratified CV over train + valid of the methods that have a fold path (`evaluation.crossval`);
    `finetune` (`--preset best`) on the first repeat's folds, its scores paired with the heads' on those folds.
    The others (the seed's softmax) are listed as `left_out` and reported as baselines. `budget`
    (`evaluation.budget.TimeBudget`): selection stops at its CV share; what did not fit is in `out_of_time`."""
    from .evaluation.budget import CV_SHARE
    from .evaluation.crossval import cross_validate, decide, plan, steps

    tr, va = splits["train"], splits["valid"]
    X, y = np.concatenate([tr.X, va.X]), np.concatenate([tr.y, va.y])
    views = np.concatenate([tr.views, va.views]) if tr.views is not None else None  # --flip-train
    candidates = [m for m in cfg.methods if method_info(m).cv is not None]
    folds = plan(y, cfg.seed)
    deadline = budget.until(CV_SHARE) if budget is not None else None
    finetune = "finetune" in cfg.methods
    task = bar.add_task(f"selection: {folds.describe()}", total=steps(candidates, folds) + (folds.k if finetune else 0))

    def step(description: str) -> None:
        bar.update(task, description=f"selection: {description}", advance=1)

    out = cross_validate(
        X,
        y,
        candidates,
        metric=cfg.select_metric,
        seed=cfg.seed,
        epochs=cfg.epochs,
        plan_=folds,
        on_step=step,
        deadline=deadline,
        views=views,
        cache=HeadCache(cfg.cache_dir),
    )
    if finetune:
        with paused(bar):  # Lightning shows its own bars
            scored = _finetune_cv(cfg, splits, folds, backbone, deadline, step)
        if isinstance(scored, str):
            out["out_of_time"]["finetune"] = scored
        else:
            out["methods"]["finetune"] = scored
            out.update(
                decide(out["methods"], folds, cfg.select_metric, out["rule"], n=len(y), protocol=out["protocol"])
            )
    bar.update(task, description=f"selection: {folds.describe()}")
    gone = set(out["methods"]) | set(out["stepped_aside"]) | set(out["out_of_time"])
    out["left_out"] = [m for m in cfg.methods if m not in gone]
    return out


class _OutOfTime(Exception):
    pass


def _finetune_cv(cfg: StudyConfig, splits, folds, backbone, deadline, step):
    """`finetune`'s CV entry on the first repeat's K folds (`finetune.tuner.cross_val_predict`, the same folds:
    `heads.search.cv_folds` with the same seed): its score, per-fold scores, seconds. A string (why) instead when
    the deadline passes first: after each fold the time per fold projects the rest, and within a fold, after each
    epoch, the fold's pace (`cross_val_predict(deadline=)`), so one slow fold does not spend the whole budget."""
    from dataclasses import replace

    from .finetune.tuner import OutOfTime, cross_val_predict
    from .heads.search import METRICS, score

    if deadline is not None and time.perf_counter() > deadline:
        return "the time budget's share for selection was spent before fine-tuning's CV could start"
    tr, va = splits["train"], splits["valid"]
    paths, y = list(tr.paths) + list(va.paths), np.concatenate([tr.y, va.y])
    t0 = time.perf_counter()

    def on_fold(i: int, _pred) -> None:
        step(f"CV finetune: fold {i + 1}/{folds.k}")
        if deadline is None:
            return
        per_fold = (time.perf_counter() - t0) / (i + 1)
        eta = time.perf_counter() + per_fold * (folds.k - i - 1)
        if eta > deadline:
            raise _OutOfTime(
                f"{folds.k} fine-tunings at {per_fold:.0f} s each would have ended {eta - deadline:.0f} s past the "
                "time budget's share for selection"
            )

    try:
        pred = cross_val_predict(
            replace(cfg, cv=folds.k),
            paths,
            y,
            np.concatenate([tr.X, va.X]),
            backbone,
            on_fold=on_fold,
            deadline=deadline,
        )
    except _OutOfTime as exc:
        return str(exc)
    except OutOfTime as exc:  # within a fold, after an epoch
        return f"{exc} (the time budget's share for selection)"
    held = [b for r, _, b in folds.folds if r == 0]
    return {
        "score": {m: float(v) for m, v in score(y, pred).items() if m in METRICS},
        "fold_scores": [float(score(y[b], pred[b])[cfg.select_metric]) for b in held],
        "params": {},
        "grid_points": 1,
        "seconds": time.perf_counter() - t0,
        "folds": f"the first repeat's {folds.k} folds",
    }


def choose_input_size(cfg: StudyConfig, ds, bb, sizes: list[tuple[int, int]]):
    """`--input-size auto`: features at each size (cached), the default selection's repeated CV at each (train +
    valid only), and the size whose best method has the best CV score. Returns the chosen size's backbone,
    features, extraction info and CV selection, and what was compared (metrics.json's `input_size_selection`)."""
    from dataclasses import replace

    tried = []
    for size in sizes:
        b = replace(bb, input_size=size)
        sp, info = extract_splits(cfg, ds, b)
        with _progress(cfg.progress) as bar:
            sel = select_by_cv(cfg, sp, bar)
        tried.append((b, sp, info, sel))
    metric = cfg.select_metric

    def best(sel: dict) -> float:
        return sel["methods"][sel["best"]]["score"][metric]

    b, sp, info, sel = max(tried, key=lambda t: best(t[3]))  # ties: the first, the aspect-aware size
    compared = [
        {"size": list(t[0].input_size), "best": t[3]["best"], "score": best(t[3]), "cold_seconds": t[2]["cold_seconds"]}
        for t in tried
    ]
    listing = "; ".join(f"{'x'.join(map(str, c['size']))}: {c['best']} {c['score']:.3f}" for c in compared)
    note = f"input size {'x'.join(map(str, b.input_size))} chosen by {sel['protocol']} ({metric}; {listing})"
    info["seconds"] = sum(t[2]["seconds"] for t in tried)  # every size's extraction is part of this run's cost
    return b, sp, info, sel, {"chosen": list(b.input_size), "metric": metric, "sizes": compared, "note": note}


def _fit_order(methods: list[str], cv_selection: dict | None) -> list[str]:
    """Final fits: the selected method first, then the seed baselines, then the rest by CV score (best first);
    an ensemble's members that are methods of the run come just before it, so it votes with their fits."""
    if not cv_selection:
        order = list(methods)
    else:
        scores = cv_selection["methods"]
        metric = cv_selection["metric"]

        def key(m: str):
            chosen = m == cv_selection["method"]
            seed = method_info(m).kind == "seed"
            return (not chosen, not seed, -scores.get(m, {}).get("score", {}).get(metric, -1.0), methods.index(m))

        order = sorted(methods, key=key)
    out: list[str] = []
    for m in order:
        info = method_info(m)
        members = info.cv.members if info.kind == "ensemble" and info.cv is not None else ()
        out += [x for x in members if x in methods and x not in out] + ([m] if m not in out else [])
    return out


def _final_fits(cfg: StudyConfig, splits, ds, bb, cv_selection: dict | None, budget, results: dict, bar, task) -> None:
    """Fit every method on train (`fit_method`) into `results`, in `_fit_order`, each only if the budget has room.

    After a CV selection, on more than one core, fits are shared with a second thread through a queue, the longest
    first (by their CV folds' time; the seed softmax, which has none, counts as longest): every head on features but
    the ensembles when there is no time budget (an ensemble votes with its members' fits: it is fitted here once
    they are, this thread taking only queued members meanwhile); under a budget only the seed baselines, while this
    thread fits the candidates in `_fit_order`, the selected first, each as the budget allows. Fits on features
    need no global random state (each head seeds its own), and each side gets one BLAS/OpenMP/torch thread
    (`thread_budget`), so nothing depends on which thread fits what; `results` keeps one order. `bar`'s `task`
    names the fit starting here and advances per method."""
    from concurrent.futures import ThreadPoolExecutor

    from .evaluation.threads import default_jobs, thread_budget

    order = _fit_order(cfg.methods, cv_selection)
    chosen_method = (cv_selection or {}).get("method")
    if cv_selection and budget.seconds is None:
        side = [m for m in order if method_info(m).kind not in ("ensemble", "end-to-end")]
    else:
        side = [m for m in order if cv_selection and method_info(m).kind == "seed" and m != chosen_method]
    jobs = default_jobs(2) if side else 1

    def fits_budget(name: str) -> bool:
        expected = _expected_fit_seconds(name, cv_selection)
        if name == chosen_method or budget.fits(expected) or _head_cached(name, cfg, splits, cv_selection):
            return True
        ds.notes.append(budget.skip(name, budget.short(expected, "its final fit")))
        return False

    def fit(name: str, fitted: dict) -> dict:
        """`fitted`: the results so far, which an ensemble votes with (`fit_method`'s `prefit`)."""
        if method_info(name).kind == "end-to-end":  # `finetune`: on images; scored and reported like a head
            from .finetune.tuner import fit_method as fit_finetune

            with paused(bar):  # Lightning shows its own bars
                return fit_finetune(cfg, splits, ds.classes, bb)
        chosen = (cv_selection or {}).get("methods", {}).get(name, {}).get("params")
        prefit = {m: r["estimator"] for m, r in fitted.items()}
        secs = {m: r["train_seconds"] for m, r in fitted.items()}
        try:
            return fit_method(name, cfg, splits, ds.classes, chosen, prefit=prefit, prefit_seconds=secs)
        except ConfigError:
            raise
        except ValueError as exc:  # these data do not allow it (e.g. LDA on CV folds of 1 image a class)
            if name == chosen_method:
                raise
            msg = f"{name} could not be fitted on these data and is left out: {exc}"
            ds.notes.append(msg)
            warnings.warn(msg, DatasetWarning, stacklevel=2)
            return None

    def done() -> None:
        bar.advance(task)

    queue: deque[str] = deque()  # fits not started yet: either thread takes one
    taking = threading.Lock()
    finished: dict[str, dict | None] = {}  # queued fits done, by either thread (None: left out)
    changed = threading.Condition()

    def take(among=None) -> str | None:
        """The next queued fit (the first of `among` in the queue, when given)."""
        with taking:
            for name in queue:
                if among is None or name in among:
                    queue.remove(name)
                    return name
            return None

    def notify(_=None) -> None:
        with changed:
            changed.notify_all()

    def fit_queued(name: str, here: bool) -> None:
        if here:  # the study's thread, whose fits the bar names
            bar.update(task, description=f"heads: {name}")
        finished[name] = fit(name, {})
        notify()
        done()

    def fit_side() -> None:
        while (name := take()) is not None:
            fit_queued(name, here=False)

    with thread_budget(jobs), ThreadPoolExecutor(max_workers=1, thread_name_prefix="final fits") as pool:
        alongside, started = None, []
        if jobs > 1:
            started = [m for m in side if fits_budget(m)]
            for _ in range(len(side) - len(started)):
                done()
            # the longest first: a baseline with no CV timing (the seed softmax's 50 epochs) counts as longest
            queue.extend(sorted(started, key=lambda m: -(_expected_fit_seconds(m, cv_selection) or float("inf"))))
            alongside = pool.submit(fit_side)
            # once its future is done, an error included: a wake-up from inside fit_side would come before that,
            # and a wait for a fit that failed there would go on
            alongside.add_done_callback(notify)

        def wait_for(names) -> dict:
            """This thread takes the queued fits of `names` (all of the queue: None) until none is left, then waits
            for those the other thread fits (at 101 classes the other thread had fitted the SVM and then the
            softmax, 10 s, while the candidates took 5 s); their results. The other thread's error is raised here."""
            names = [m for m in (started if names is None else names) if m in started]
            while (name := take(names)) is not None:
                fit_queued(name, here=True)
            with changed:
                changed.wait_for(lambda: all(m in finished for m in names) or alongside.done())
            if not all(m in finished for m in names):
                alongside.result()  # raises what stopped it
            return {m: finished[m] for m in names if finished[m] is not None}

        for name in order:
            if name in started or (alongside is not None and name in side):  # queued, or left out by the budget
                continue
            info = method_info(name)
            members = info.cv.members if info.kind == "ensemble" and info.cv is not None else ()
            mine = wait_for(members) if alongside is not None and set(members) & set(started) else {}
            busy = [m for m in started if m not in finished]  # queued, or being fitted by the other thread
            also = f" (+ {', '.join(busy)} alongside)" if busy else ""
            bar.update(task, description=f"heads: {name}{also}")
            if fits_budget(name):
                _seed_everything(cfg.seed)
                if (r := fit(name, {**results, **mine})) is not None:  # an ensemble votes with its members' fits
                    results[name] = r
            done()
        if alongside is not None:
            got = wait_for(None)
            alongside.result()
            results.update({m: got[m] for m in started if m in got})  # in their order


def _head_cached(name: str, cfg: StudyConfig, splits, cv_selection: dict | None) -> bool:
    """Whether `fit_method` would load this head from the cache (a rerun): then it costs no time, whatever the budget
    says is left."""
    if method_info(name).kind == "end-to-end":
        return False
    chosen = (cv_selection or {}).get("methods", {}).get(name, {}).get("params")
    try:
        _, key = _head_and_key(name, cfg, splits, chosen)
    except ValueError:
        return False
    return HeadCache(cfg.cache_dir).has(key)


def _expected_fit_seconds(name: str, cv_selection: dict | None) -> float:
    """A final fit's expected cost: one CV fold of it (a fold fits 1 - 1/K of the images; a grid's fold fits
    every point, the final fit one: an overestimate). 0 when CV did not time it (it is then tried)."""
    r = (cv_selection or {}).get("methods", {}).get(name)
    if not r or not r.get("seconds"):
        return 0.0
    k, repeats = cv_selection["k"], cv_selection["repeats"]
    return r["seconds"] / (k if name == "finetune" else k * repeats)


def _efficiency_fits(cfg: StudyConfig, budget, results: dict, cv_selection: dict | None, notes: list[str]) -> bool:
    """Whether the data-efficiency curve fits the time left: about 10 points x its draws of the selected head,
    each at most its full fit, shared by the cores; or is kept beside the head in the cache (a rerun: no cost)."""
    if budget.seconds is None or not results:
        return True
    from .evaluation.analysis import efficiency_memo, efficiency_repeats
    from .evaluation.threads import default_jobs

    chosen = (cv_selection or {}).get("method") or next(iter(results))
    if chosen not in results:
        return True
    key = results[chosen].get("head_key")
    if key and HeadCache(cfg.cache_dir).extra(key, efficiency_memo(cfg.select_metric, cfg.seed, chosen)) is not None:
        return True
    draws = 10 * efficiency_repeats(chosen)
    expected = results[chosen].get("train_seconds", 0.0) * draws / default_jobs(draws)
    if budget.fits(expected):
        return True
    notes.append(budget.skip("data-efficiency curve", budget.short(expected, "the curve")))
    return False


@contextmanager
def _progress(enabled: bool):
    """One rich progress display for the stages after extraction (heads, analysis, report): a bar with elapsed time
    and ETA per stage, so nothing runs for minutes with nothing on screen."""
    stats = MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()
    with progress(*stats, enabled=enabled, spinner=True) as bar:
        yield bar


def _check_validation(cfg: StudyConfig, ds) -> None:
    """Before extraction: tuned heads selected on the validation split need one, or a holdout of three images a
    class from train (a data set of 3 images a class had an empty validation split, and they failed after the
    extraction in a ValueError traceback)."""
    tuned = [m for m in cfg.methods if method_info(m).kind in ("tuned", "ensemble")]
    if cfg.selection != "validation" or ds.split("valid") or not tuned:
        return
    counts = ds.counts()["train"]
    smallest = min(counts.values())
    if smallest < 3:
        raise ConfigError(
            f"the validation split is empty and class '{min(counts, key=counts.get)}' has {smallest} training "
            f"image(s): {', '.join(tuned)} have nothing to tune on. Run the default selection (repeated CV: "
            "without --methods/--selection), or --cv 2, or give each class at least three images"
        )


def check_out_outside_data(out, data) -> None:
    """Refuse a run folder inside a data folder: the next run over that folder would read the report's plots as a
    class of images (a run into DATA/results once made a class "results" of its own confusion matrices); and one
    holding files of the report's names that transferlab did not write (`layout.foreign_files`)."""
    from .data.datasets import DatasetError

    root = Path(data).resolve()
    if root.is_dir() and Path(out).resolve().is_relative_to(root):
        raise DatasetError(
            f"--out {out} is inside the data folder {data}: the next run would read the report's images as a class "
            "of its own; choose a folder outside it"
        )
    foreign = layout.foreign_files(out)
    if foreign:  # e.g. --out . in a project folder: its own README.txt or config.yaml would be replaced
        raise DatasetError(
            f"--out {out} holds {', '.join(foreign)} that transferlab did not write: the run would overwrite "
            f"{'them' if len(foreign) > 1 else 'it'}; choose a new or empty folder"
        )


def run_study(cfg: StudyConfig) -> dict:
    """Run the whole study and write DIR/report.md, DIR/metrics.json and the plots; returns the metrics.

    metrics.json's `timings` holds the wall time of each stage (extract, heads, analysis, report) and the total."""
    from .progress import started
    from .warning_filters import quiet_decoding

    try:
        with quiet_decoding():
            return _run_study(cfg)
    finally:
        started()  # a start-up spinner an error left (from Python, no command line takes it away)


def _run_study(cfg: StudyConfig) -> dict:
    start, started = time.perf_counter(), time.time()  # `started`: what an earlier run left is older
    budget = TimeBudget(None if cfg.time_budget is None else parse_duration(cfg.time_budget), start=start)
    out = Path(cfg.out)
    check_out_outside_data(out, cfg.data)
    cfg.methods = with_preset(cfg.methods, cfg.preset)  # --preset best: fine-tuning joins the default run
    cfg.selection = resolve_selection(cfg)  # before "auto" among the methods is expanded
    cfg.methods = resolve_methods(cfg.methods)  # "all": every head; "auto": the default run's
    if cfg.selection == "repeated-cv" and not any(method_info(m).cv is not None for m in cfg.methods):
        raise ConfigError(
            "--selection repeated-cv needs a head it can cross-validate on the cached features; the methods asked "
            f"for ({', '.join(cfg.methods)}) have none (the seed's softmax is a baseline only, fine-tuning is scored "
            f"beside the heads): add one, e.g. --methods {','.join([*cfg.methods, 'svm'])}, or drop --selection"
        )
    if any(method_info(m).kind == "end-to-end" for m in cfg.methods):  # a bad option here failed after extraction
        from .finetune.tuner import make_finetuner

        try:
            make_finetuner(cfg).check_options()
        except ValueError as exc:
            raise ConfigError(f"fine-tuning: {exc}") from None
    _seed_everything(cfg.seed)
    from .features.distributed import is_main

    starting(f"starting: reading {cfg.data}", enabled=cfg.progress and is_main())
    ds = discover(
        cfg.data,
        seed=cfg.seed,
        valid_fraction=cfg.valid_fraction,
        test_fraction=cfg.test_fraction,
        allow_outside=cfg.allow_outside,
    )
    _check_validation(cfg, ds)
    auto_size = cfg.input_size == "auto"
    starting(
        f"starting: {len(ds.samples)} images, {len(ds.classes)} classes; loading {cfg.backbone}",
        enabled=cfg.progress and is_main(),
    )
    bb = load_backbone(cfg.backbone, weights=cfg.weights, input_size=None if auto_size else cfg.input_size)
    cv_selection = size_choice = None
    if cfg.input_size is None or auto_size:  # the images' typical aspect at the backbone's native scale
        from dataclasses import replace

        from .features.input_size import aspect_input_size, median_aspect

        aspect = aspect_input_size(bb.input_size, median_aspect([s.path for s in ds.split("train")]))
        sizes = list(dict.fromkeys([aspect, tuple(bb.input_size)])) if auto_size else [aspect]
        if len(sizes) == 1:
            bb = replace(bb, input_size=sizes[0])
        else:  # --input-size auto: the same repeated CV at each size, the best CV score wins
            bb, splits, extract_info, cv_selection, size_choice = choose_input_size(cfg, ds, bb, sizes)
            ds.notes.append(size_choice["note"])
    if size_choice is None:
        splits, extract_info = extract_splits(cfg, ds, bb)
    timings = {"extract": time.perf_counter() - start}
    if len(np.unique(splits["train"].y)) < 2:
        skipped = extract_info["skipped"]
        hint = (
            f" ({len(skipped)} images unreadable, e.g. {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        )
        raise DatasetError(f"fewer than two classes have readable training images in {cfg.data}{hint}")
    warn_untrained_classes(ds, splits, extract_info["skipped"])
    from .features.distributed import is_main

    results = {}
    with _progress(cfg.progress and is_main()) as bar:
        t0 = time.perf_counter()
        _import_in_background("skops.io")
        if cfg.selection == "repeated-cv" and cv_selection is None:
            cv_selection = select_by_cv(cfg, splits, bar, budget=budget, backbone=bb)
        for name, reason in (cv_selection or {}).get("stepped_aside", {}).items():  # kernel heads on very large sets
            cfg.methods.remove(name)
            ds.notes.append(f"{name} not run: {reason}")
            warnings.warn(f"{name} not run: {reason}", DatasetWarning, stacklevel=2)
        for name, reason in (cv_selection or {}).get("out_of_time", {}).items():  # --time-budget
            cfg.methods.remove(name)
            ds.notes.append(budget.skip(name, reason))
        task = bar.add_task("heads", total=len(cfg.methods))
        _final_fits(cfg, splits, ds, bb, cv_selection, budget, results, bar, task)
        results = {n: results[n] for n in cfg.methods if n in results}  # the report's order
        if not results:
            raise DatasetError(f"no method could be fitted on these data ({'; '.join(ds.notes[-3:])})")
        cfg.methods = list(results)
        bar.update(task, description="heads")
        timings["heads"] = time.perf_counter() - t0
        if not is_main():  # several processes: only global rank 0 writes the report
            return None
        out.mkdir(parents=True, exist_ok=True)
        from .evaluation.analysis import analyse  # selection on validation first, then test statistics
        from .evaluation.leakage import check as check_leakage  # exact and near-duplicates across splits

        t0 = time.perf_counter()
        task = bar.add_task("analysis: selection, statistics, leakage", total=2)
        _seed_everything(cfg.seed)
        efficiency = cfg.data_efficiency and _efficiency_fits(cfg, budget, results, cv_selection, ds.notes)
        if efficiency and not len(splits["valid"].y):  # the curve is scored on validation
            efficiency = False
            ds.notes.append("no data-efficiency curve: the validation split is empty (too few images per class)")
        analysis = analyse(
            results,
            splits,
            ds.classes,
            metric=cfg.select_metric,
            seed=cfg.seed,
            efficiency=efficiency,
            cv=cfg.cv,
            cache=HeadCache(cfg.cache_dir),
            cv_selection=cv_selection,
        )
        if size_choice:
            analysis["input_size_selection"] = {k: v for k, v in size_choice.items() if k != "note"}
        if budget.seconds is not None:
            analysis["budget"] = budget.summary()
        bar.advance(task)
        leakage = check_leakage(splits, threshold=cfg.dup_threshold)
        bar.advance(task)
        timings["analysis"] = time.perf_counter() - t0
        from .config import write as write_config
        from .model.bundle import save_study_bundles  # DIR/models/<method>/ for `transferlab predict`, transferlab.load

        t0 = time.perf_counter()
        task = bar.add_task("report: bundles", total=report.write_steps(results) + 2)
        moved = layout.set_aside(out, set(results), since=started)
        if moved:  # --out held an earlier run's methods this run did not fit: its report no longer describes them
            msg = (
                f"{out} held what an earlier run saved for methods this run did not fit ({', '.join(moved[1])}): "
                f"moved to {moved[0]}, so models/ holds only the models this report describes"
            )
            ds.notes.append(msg)
            warnings.warn(msg, DatasetWarning, stacklevel=2)
        save_study_bundles(
            out / "models",
            results,
            bb,
            ds.classes,
            precision=extract_info["precision"],
            extra={"data": str(Path(cfg.data).resolve()), "seed": cfg.seed},
        )
        bar.update(task, description="report: tables, plots, report.html", advance=1)
        metrics = report.write(
            out,
            cfg=asdict(cfg),
            dataset=ds,
            backbone=bb,
            splits=splits,
            extract=extract_info,
            results=results,
            analysis=analysis,
            leakage=leakage,
            timings=timings,
            on_step=lambda d: bar.update(task, description=d, advance=1),
        )
        write_config(out / "config.yaml", cfg, bb, extract_info, results)  # `run --config` reruns this study
        layout.remove_unlinked_plots(out)  # an earlier run's figures this report does not show
        bar.update(task, description="report: bundles, tables, plots, report.html", advance=1)
    timings.update(report=time.perf_counter() - t0, total=time.perf_counter() - start)
    report.write_timings(out, metrics, timings)  # the last two are known only now
    return metrics
