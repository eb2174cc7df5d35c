"""Every head is a scikit-learn estimator (issue 18), and importing transferlab leaves the program's warning
filters alone (bug 7)."""

from __future__ import annotations

import ast
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.svm import SVC

import transferlab
from transferlab.heads import make_head, registry
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


def test_svc_probability_deprecation_is_silenced_inside_the_fits_only():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)).astype(np.float32), np.arange(60) % 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svm = make_head("svm").fit(X, y)
        tuned = make_head("svm_tuned").fit(X, y)
        p, q = svm.predict_proba(X), tuned.predict_proba(X)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert p.shape == q.shape == (60, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = SVC(kernel="rbf", probability=True, random_state=0).fit(X, y)  # `svm` is SVC's model, unchanged
    np.testing.assert_array_equal(svm.predict(X), ref.predict(X))
    np.testing.assert_allclose(p, ref.predict_proba(X))


def test_a_head_with_private_fitted_state_is_stored_by_skops(tmp_path):
    """`svm` (a transferlab subclass of SVC) keeps libsvm's state in `_name` attributes, which the safetensors
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

@pytest.mark.parametrize("name", ["sklearn.base.defaultdict", "sklearn.pipeline.islice",
                                  "sklearn.utils.parallel.ThreadpoolController", "sklearn.base.copy",
                                  "sklearn.base.clone", "transferlab.heads.serialize.Path",
                                  "sklearn.nope.Thing", "sklearnx.Thing", "os.system"])
def test_skops_allowlist_refuses_what_is_not_a_class_defined_under_the_trusted_roots(name):
    with pytest.raises(HeadFormatError, match="not allowed"):
        _trusted(["sklearn.svm._classes.SVC", name])


def test_skops_allowlist_accepts_scikit_learn_and_transferlab_classes():
    names = ["sklearn.svm._classes.SVC", "sklearn.pipeline.Pipeline", "transferlab.heads.seed.SeedSVC",
             "transferlab.heads.search.ValidationSearch"]
    assert _trusted(names) == names
