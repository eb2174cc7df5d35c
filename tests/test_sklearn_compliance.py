"""Every head is a scikit-learn estimator (issue 18), and importing transferlab leaves the program's warning
filters alone (bug 7)."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.svm import SVC
from sklearn.utils.estimator_checks import parametrize_with_checks

import transferlab
from transferlab.heads import make_head, registry
from transferlab.heads.probes import FeatureTransform, KernelSVMHead, LinearSVMHead, ShrinkageLDAHead
from transferlab.heads.serialize import HeadFormatError, _trusted, load_head, save_head

SRC = Path(transferlab.__file__).parent


# ---- bug 7: no warning filters at import time --------------------------------------------------------------


def test_importing_the_heads_sets_no_warning_filter(monkeypatch):
    """Each module of transferlab.heads, executed afresh (as on a first import), leaves warnings.filters as it was."""
    monkeypatch.setattr(registry, "METHODS", {})  # a second copy of a module registers its methods again
    for path in sorted((SRC / "heads").glob("*.py")):
        name = "transferlab.heads" + ("" if path.stem == "__init__" else f".{path.stem}")
        spec = importlib.util.spec_from_file_location(name, path)
        with warnings.catch_warnings():
            warnings.resetwarnings()  # pytest's filterwarnings holds the very filter the old modules added
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            assert warnings.filters == [], path.name


def test_no_module_calls_warnings_filters_at_import():
    calls = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only: functions and `with` blocks are fine
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                f = node.value.func
                if isinstance(f, ast.Attribute) and f.attr in ("filterwarnings", "simplefilter", "resetwarnings"):
                    calls.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert calls == []


def test_svm_heads_need_no_deprecated_svc_probability():
    """scikit-learn 1.9 deprecates `SVC(probability=True)` (removed in 1.11): the SVM heads give probabilities
    without it (`heads.pairwise`), so no FutureWarning, and their predictions are SVC's own."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)).astype(np.float32), np.arange(60) % 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svm = make_head("svm").fit(X, y)
        tuned = make_head("svm_tuned").fit(X, y)
        p, q = svm.predict_proba(X), tuned.predict_proba(X)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert p.shape == q.shape == (60, 3)
    assert svm.svc_.probability is not True and tuned.best_estimator_[-1].svc_.probability is not True
    np.testing.assert_array_equal(svm.predict(X), SVC(kernel="rbf").fit(X, y).predict(X))  # `svm` is SVC's model


def test_seed_svm_is_scikit_learns_rbf_svc_on_features_like_the_caches():
    """`svm` fits libsvm on a kernel matrix computed with BLAS (5x faster): the same model as the seed's
    `SVC(kernel="rbf")` with scikit-learn's defaults, on non-negative pooled-feature-like data."""
    rng = np.random.default_rng(3)
    k, d = 5, 256
    y = rng.integers(0, k, 600)
    X = np.maximum(rng.normal(size=(k, d))[y] * 0.6 + rng.normal(size=(600, d)), 0).astype(np.float32)
    svm = make_head("svm").fit(X[:400], y[:400])
    ref = SVC(kernel="rbf").fit(X[:400], y[:400])
    np.testing.assert_array_equal(svm.predict(X[400:]), ref.predict(X[400:]))
    np.testing.assert_allclose(svm.decision_function(X[400:]), ref.decision_function(X[400:]), atol=1e-4)


def test_a_head_with_private_fitted_state_is_stored_by_skops(tmp_path):
    """`svm` (libsvm fitted on a precomputed kernel) keeps libsvm's state in `_name` attributes, which the safetensors
    format (public `name_` attributes only) would drop: it goes to skops and predicts the same after loading."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 4)), np.arange(40) % 2
    svm = make_head("svm").fit(X, y)
    info = save_head(svm, tmp_path)
    assert info["format"] == "skops"
    back = load_head(info, tmp_path)
    np.testing.assert_array_equal(back.predict(X), svm.predict(X))
    np.testing.assert_allclose(back.predict_proba(X), svm.predict_proba(X))


# ---- bug 7: the skops allowlist checks where a class is defined, not the name it is reached by --------------


@pytest.mark.parametrize(
    "name",
    [
        "sklearn.base.defaultdict",
        "sklearn.pipeline.islice",
        "sklearn.utils.parallel.ThreadpoolController",
        "sklearn.base.copy",
        "sklearn.base.clone",
        "transferlab.heads.serialize.Path",
        "sklearn.nope.Thing",
        "sklearnx.Thing",
        "os.system",
    ],
)
def test_skops_allowlist_refuses_what_is_not_a_class_defined_under_the_trusted_roots(name):
    with pytest.raises(HeadFormatError, match="not allowed"):
        _trusted(["sklearn.svm._classes.SVC", name])


def test_skops_allowlist_accepts_scikit_learn_and_transferlab_classes():
    names = [
        "sklearn.svm._classes.SVC",
        "sklearn.pipeline.Pipeline",
        "transferlab.heads.probes.KernelSVMHead",
        "transferlab.heads.search.ValidationSearch",
    ]
    assert _trusted(names) == names


# ---- issue 18: scikit-learn's own estimator checks over every head -------------------------------------------

# One-point grids (softmax_tuned: one fit, two prediction-time settings) keep the ~55 checks per head to seconds;
# the search (holdout, scoring, refit), its classes and the vote are the real ones. None: the method's own grid.
SMALL_GRIDS = {
    "svm_tuned": [{"clf__C": [1.0], "clf__gamma_scale": [1.0]}],
    "logreg": [{"features__kind": ["standard"], "clf__C": [0.1]}],
    "linear_svm": [{"clf__C": [1e-2]}],
    "lda": None,
    "knn": [{"features__kind": ["l2"], "clf__n_neighbors": [5]}],
    "softmax_tuned": [
        {"clf__lr": [0.1], "clf__weight_decay": [0.0], "clf__class_weight": [None], "clf__logit_adjust": [0.0, 1.0]}
    ],
}
EPOCHS = 5


def _small(name: str):
    """Method `name` as `make_head` builds it, with few epochs and small grids."""
    est = make_head(name, epochs=EPOCHS)
    if name == "softmax":  # the seed's lr 1e-4 needs its 50 epochs, and class weights of 1000:0.0001 on
        est.set_params(epochs=20, lr=0.1)  # unscaled toy data take 20 epochs to show
    elif name in SMALL_GRIDS and SMALL_GRIDS[name] is not None:
        est.set_params(param_grid=SMALL_GRIDS[name])
    elif name == "ensemble":  # the default members, each over its small grid
        est.set_params(members=tuple((m, _small(m)) for m in est.members))
    return est


METHODS = [n for n in registry.names() if registry.get(n).build is not None]
HEADS = {n: _small(n) for n in METHODS}
# ... and the estimators the tuned heads are built from, on their own
HEADS.update(
    {
        "FeatureTransform": FeatureTransform(),
        "FeatureTransform(l2)": FeatureTransform("l2"),
        "FeatureTransform(pca_whiten)": FeatureTransform("pca_whiten", n_components=2),
        "FeatureTransform(none)": FeatureTransform("none"),
        "KernelSVMHead": KernelSVMHead(),
        "KernelSVMHead(rbf)": KernelSVMHead(max_precomputed=0),
        "LinearSVMHead": LinearSVMHead(),
        "ShrinkageLDAHead": ShrinkageLDAHead(),
    }
)

# check name -> why it may fail, per head (one line each); everything else must pass.
EXPECTED_FAILURES: dict[str, dict[str, str]] = {
    "LinearSVMHead": {
        "check_sample_weight_equivalence_on_dense_data": "scikit-learn's LinearSVC (liblinear): sample_weight is not equivalent to repeating samples (listed in "
        "scikit-learn's own checks of LinearSVC)",
        "check_sample_weight_equivalence_on_sparse_data": "scikit-learn's LinearSVC on sparse input (which it accepts): the same liblinear difference",
    },
}
_NAME_OF = {id(est): name for name, est in HEADS.items()}


def _expected_failures(estimator) -> dict[str, str]:
    return EXPECTED_FAILURES.get(_NAME_OF.get(id(estimator)), {})


def test_every_method_with_a_builder_is_checked_and_every_reason_is_one_line():
    assert set(METHODS) <= set(HEADS) and set(EXPECTED_FAILURES) <= set(HEADS)
    assert all(reason and "\n" not in reason for fails in EXPECTED_FAILURES.values() for reason in fails.values())


@parametrize_with_checks(list(HEADS.values()), expected_failed_checks=_expected_failures)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # small grids and few epochs on the checks' toy data
        check(estimator)


# ---- what the checks found, pinned with transferlab's own data shapes -----------------------------------------


def _blobs(n_per=(24, 16, 10), d=6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2.5, (len(n_per), d))
    X = np.concatenate([centers[k] + rng.normal(0, 1.0, (n, d)) for k, n in enumerate(n_per)]).astype(np.float32)
    return X, np.concatenate([np.full(n, k) for k, n in enumerate(n_per)])


NAMES = np.array(["ant", "bee", "cat"])


@pytest.mark.parametrize("name", [*METHODS, "softmax+flip", "logreg+flip"])
def test_string_labels_give_the_model_their_integer_codes_give(name):
    """Labels are not cast to int: classes_ hold the strings, predict returns them, and the model (choice,
    probabilities) is the one the same labels as indices give, with and without validation data."""
    (X, y), (Xv, yv) = _blobs(), _blobs((8, 6, 4), seed=1)
    if name.endswith("+flip"):
        X, Xv = np.hstack([X, X[:, ::-1]]), np.hstack([Xv, Xv[:, ::-1]])
        est = make_head(name.split("+")[0], epochs=EPOCHS, flip_train=True)
        est.set_params(
            **(
                {"estimator__lr": 0.1}
                if name == "softmax+flip"
                else {"param_grid": [{f"estimator__{k}": v for k, v in SMALL_GRIDS["logreg"][0].items()}]}
            )
        )
    else:
        est = HEADS[name]
    takes_eval_set = "eval_set" in inspect.signature(est.fit).parameters
    for kw in ({}, {"eval_set": (Xv, yv)}) if takes_eval_set else ({},):
        codes = clone(est).fit(X, y, **kw)
        named = clone(est).fit(X, NAMES[y], **({"eval_set": (Xv, NAMES[yv])} if kw else {}))
        assert list(named.classes_) == ["ant", "bee", "cat"]
        np.testing.assert_array_equal(named.predict(Xv), NAMES[codes.predict(Xv)])
        if hasattr(codes, "predict_proba"):
            np.testing.assert_allclose(named.predict_proba(Xv), codes.predict_proba(Xv), rtol=1e-6, atol=1e-9)
        if hasattr(codes, "best_params_"):
            assert named.best_params_ == codes.best_params_


def test_view_augmented_checks_its_inputs():
    X, y = _blobs()
    X2 = np.hstack([X, X[:, ::-1]])
    est = make_head("softmax", epochs=EPOCHS, flip_train=True)
    with pytest.raises(NotFittedError):
        est.predict(X2)
    with pytest.raises(ValueError, match="side by side.*n_features=13"):
        clone(est).fit(np.hstack([X2, X[:, :1]]), y)
    with pytest.raises(ValueError, match="NaN"):
        clone(est).fit(np.where(np.arange(X2.size).reshape(X2.shape) == 5, np.nan, X2), y)
    with pytest.raises(TypeError, match="[Ss]parse"):
        clone(est).fit(sparse.csr_matrix(X2), y)
    est.fit(X2, NAMES[y])
    assert est.n_features_in_ == 12 and est.n_view_features_ == 6 and list(est.classes_) == list(NAMES)
    # two views, or their mean (a bundle's tta features); nothing else
    np.testing.assert_array_equal(est.predict(X2), est.predict((X2[:, :6] + X2[:, 6:]) / 2))
    with pytest.raises(ValueError, match="X has 5 features, but ViewAugmented is expecting 12"):
        est.predict(X2[:, :5])


def test_softmax_head_binary_decision_function_is_one_score_per_image():
    """As scikit-learn's binary classifiers: logit(classes_[1]) - logit(classes_[0]); probabilities unchanged."""
    X, y = _blobs((20, 14))
    est = make_head("softmax", epochs=EPOCHS).set_params(lr=0.1).fit(X, NAMES[y])
    d, p = est.decision_function(X), est.predict_proba(X)
    logits = X @ est.coef_.T + est.intercept_
    assert d.shape == (len(X),) and p.shape == (len(X), 2)
    np.testing.assert_allclose(d, logits[:, 1] - logits[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(est.predict(X), np.where(d > 0, "bee", "ant"))
    three = make_head("softmax", epochs=EPOCHS).fit(*_blobs()).decision_function(_blobs()[0])
    assert three.shape == (50, 3)


def test_class_weight_dict_weighs_classes_in_softmax_and_sets_priors_in_lda():
    X, y = _blobs()
    base = make_head("softmax", epochs=20).set_params(lr=0.1, seed=0)
    np.testing.assert_allclose(  # a dict of the balanced weights is "balanced"
        clone(base).set_params(class_weight=dict(zip(range(3), len(y) / (3 * np.bincount(y))))).fit(X, y).coef_,
        clone(base).set_params(class_weight="balanced").fit(X, y).coef_,
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="class_weight"):
        clone(base).set_params(class_weight="sometimes").fit(X, y)
    lda = ShrinkageLDAHead(class_weight={"ant": 1.0, "bee": 2.0}).fit(X, NAMES[y])  # cat weighs 1
    w = np.array([1.0, 2.0, 1.0]) * np.bincount(y)
    np.testing.assert_allclose(lda.lda_.priors_, w / w.sum())
    balanced = ShrinkageLDAHead(class_weight=dict(zip(NAMES, 1.0 / np.bincount(y)))).fit(X, NAMES[y])
    np.testing.assert_allclose(balanced.lda_.priors_, 1 / 3)
