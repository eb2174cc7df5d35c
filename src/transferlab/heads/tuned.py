"""The tuned heads: each a pipeline (feature option + classifier) and the grid its `ValidationSearch` searches.

Every entry of `TUNED` is registered as a method (`heads.registry`) of kind "tuned". Grids are small and run
on cached features, so tuning every head costs seconds, not backbone passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline

from .lbfgs import LBFGSLogisticRegression
from .paths import KERNEL_MAX_ROWS, FoldPath, generic_fold, lda_fold, logistic_fold, rbf_fold
from .probes import FeatureTransform, KernelSVMHead, LinearSVMHead, ShrinkageLDAHead
from .registry import register
from .search import ValidationSearch
from .seed import SoftmaxHead
from .views import ViewAugmented, through_views


def _pipe(clf, features: str = "standard") -> Pipeline:
    return Pipeline([("features", FeatureTransform(features)), ("clf", clf)])


@dataclass(frozen=True)
class HeadSpec:
    """A tuned head: `build(seed, epochs)` makes the pipeline, `grid` is searched on validation. `exportable`:
    its chosen model has an exact ONNX graph (`model.export`)."""

    build: Callable[[int, int], Pipeline]
    grid: list[dict]
    description: str
    exportable: bool
    class_weights: bool = True
    cost: str = "seconds"
    posthoc: tuple[str, ...] = ()
    search_params: dict = field(default_factory=dict)
    fold: Callable | None = None  # a fast fold path (`heads.paths`); None: `generic_fold`, one fit per point
    proba: bool = True  # the fold path's scores are probabilities
    default: bool = False  # a candidate of the default run

    max_rows: int | None = None  # the fold path steps aside above this many fitting images (`heads.paths`)
    # the hyperparameter that takes the temperature the CV fits on the chosen point's out-of-fold decision values
    temperature_param: str | None = None

    def path(self) -> FoldPath:
        """How `evaluation.crossval` cross-validates this head over its grid."""
        return FoldPath(
            self.grid, self.fold or generic_fold, self.proba, self.build, self.max_rows, self.temperature_param
        )


# The logistic head's solver settings, the same for its CV fold path and the model the study fits (`heads.lbfgs`).
LOGREG_SOLVER = {"max_iter": 100, "tol": 3e-4}


def _softmax(seed: int, epochs: int) -> Pipeline:
    return _pipe(SoftmaxHead(epochs=epochs, batch_size=128, class_weight="balanced", seed=seed))


TUNED: dict[str, HeadSpec] = {
    "svm_tuned": HeadSpec(
        exportable=False,
        cost="minutes",
        build=lambda seed, epochs: _pipe(KernelSVMHead(class_weight="balanced", seed=seed)),
        # gamma_scale 1 (SVC's gamma="scale") was never chosen in 25 CV folds (the four shared sets and a generated
        # 101-class one; its best point 0.005-0.095 macro-F1 below the best on each): dropped, a quarter of the CV.
        grid=[{"clf__C": [1.0, 10.0, 100.0], "clf__gamma_scale": [0.125, 0.25, 0.5]}],
        fold=rbf_fold,
        proba=False,
        default=True,
        max_rows=KERNEL_MAX_ROWS,
        temperature_param="clf__temperature",
        search_params={"clf__probability": False},
        description="RBF SVM, standardised features, class_weight=balanced; C x gamma on validation",
    ),
    "logreg": HeadSpec(
        exportable=True,
        build=lambda seed, epochs: _pipe(LBFGSLogisticRegression(class_weight="balanced", **LOGREG_SOLVER)),
        grid=[{"clf__C": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]}],
        fold=partial(logistic_fold, **LOGREG_SOLVER),
        default=True,
        description="multinomial logistic regression (full-batch L-BFGS, warm-started along the C path), "
        "standardised features, class_weight=balanced; C on validation",
    ),
    "linear_svm": HeadSpec(
        exportable=True,
        cost="minutes",
        build=lambda seed, epochs: _pipe(LinearSVMHead(class_weight="balanced", tol=1e-2, random_state=seed)),
        grid=[{"clf__C": [1e-4, 1e-3, 1e-2]}],
        description="linear SVM (LinearSVC, one-vs-rest), standardised features, class_weight=balanced; "
        "C on validation",
    ),
    "lda": HeadSpec(
        exportable=True,
        build=lambda seed, epochs: _pipe(ShrinkageLDAHead()),
        grid=[{"clf__class_weight": ["balanced", None]}],
        fold=lda_fold,
        default=True,
        description="linear discriminant analysis, Ledoit-Wolf shrinkage of the shared covariance, standardised "
        "features; class priors uniform (balanced) or as in train, on validation",
    ),
    "knn": HeadSpec(
        exportable=False,
        class_weights=False,
        build=lambda seed, epochs: _pipe(
            KNeighborsClassifier(metric="cosine", algorithm="brute", weights="distance"), "l2"
        ),
        grid=[{"features__kind": ["l2", "standard"], "clf__n_neighbors": [1, 3, 5, 10, 20]}],
        description="k nearest neighbours, cosine, distance-weighted; features x k on validation",
    ),
    "softmax_tuned": HeadSpec(
        exportable=True,
        cost="minutes",
        build=_softmax,
        grid=[
            {
                "clf__lr": [1e-3, 1e-2],
                "clf__weight_decay": [0.0, 1e-4],
                "clf__class_weight": ["balanced"],
                "clf__logit_adjust": [0.0],
            },
            {
                "clf__lr": [1e-3, 1e-2],
                "clf__weight_decay": [0.0, 1e-4],
                "clf__class_weight": [None],
                "clf__logit_adjust": [0.5, 1.0],
            },
        ],
        posthoc=("clf__logit_adjust",),
        description="softmax layer (Adam, batch 128), standardised features; lr x weight decay x "
        "(class_weight=balanced | logit adjustment tau) on validation",
    ),
}


def make_tuned(
    name: str, *, seed: int = 0, epochs: int = 50, scoring: str = "macro_f1", cv: int = 0, flip_train: bool = False
) -> ValidationSearch:
    """A tuned head; with `flip_train` its pipeline trains on plain and flipped views (`ViewAugmented`)."""
    spec = TUNED[name]
    est, grid, posthoc, search = spec.build(seed, epochs), spec.grid, spec.posthoc, dict(spec.search_params)
    if flip_train:
        est = ViewAugmented(est)
        grid = [{through_views(k): v for k, v in g.items()} for g in grid]
        posthoc = tuple(through_views(k) for k in posthoc)
        search = {through_views(k): v for k, v in search.items()}
    return ValidationSearch(est, grid, scoring=scoring, posthoc=posthoc, search_params=search, cv=cv, seed=seed)


def _build(
    name: str, *, seed: int = 0, epochs: int = 50, scoring: str = "macro_f1", cv: int = 0, flip_train: bool = False, **_
) -> ValidationSearch:
    return make_tuned(name, seed=seed, epochs=epochs, scoring=scoring, cv=cv, flip_train=flip_train)


for _name, _spec in TUNED.items():
    register(
        _name,
        kind="tuned",
        description=_spec.description,
        exportable=_spec.exportable,
        class_weights=_spec.class_weights,
        cost=_spec.cost,
        cv=_spec.path(),
        default=_spec.default,
    )(partial(_build, _name))
