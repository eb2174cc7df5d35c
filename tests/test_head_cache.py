"""Fitted heads are cached like features: a rerun loads them, a change of data or hyperparameters refits."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from transferlab.study import StudyConfig, run_study


def _cfg(data, out, cache_dir, **kw):
    kw.setdefault("methods", ["softmax", "svm"])  # the seed's study
    return StudyConfig(
        data=str(data),
        out=str(out),
        backbone="test_efficientnet",
        weights="random",
        input_size=(32, 40),
        epochs=kw.pop("epochs", 5),
        cache_dir=str(cache_dir),
        progress=False,
        num_workers=0,
        valid_fraction=0.25,
        **kw,
    )


def _same_results(a: dict, b: dict, methods=("softmax", "svm")) -> None:
    for name in methods:
        x, y = a["methods"][name], b["methods"][name]
        for k in ("accuracy", "macro_f1", "balanced_accuracy", "per_class", "confusion_matrix", "valid"):
            assert x[k] == y[k], (name, k)


@pytest.fixture
def first(small_folder, tmp_path, cache_dir):
    return run_study(_cfg(small_folder, tmp_path / "run1", cache_dir))


def test_rerun_loads_fitted_heads_with_identical_results(first, small_folder, tmp_path, cache_dir):
    assert not any(m["head_from_cache"] for m in first["methods"].values())
    entries = sorted(p.name for p in (Path(cache_dir) / "heads").iterdir())
    assert len(entries) == 2 and all((Path(cache_dir) / "heads" / e / "meta.json").is_file() for e in entries)
    again = run_study(_cfg(small_folder, tmp_path / "run2", cache_dir))
    assert all(m["head_from_cache"] for m in again["methods"].values())
    _same_results(first, again)
    for name in ("softmax", "svm"):
        assert again["methods"][name]["train_seconds"] == first["methods"][name]["train_seconds"]  # the fit's cost
        assert "loaded from the cache" in again["methods"][name]["train_note"]
        p1, p2 = (tmp_path / r / "methods" / name / "predictions.csv" for r in ("run1", "run2"))
        assert p1.read_text().replace(str(tmp_path / "run1"), "") == p2.read_text().replace(str(tmp_path / "run2"), "")
    assert again["data_efficiency"] == json.loads(json.dumps(first["data_efficiency"]))
    assert sorted(p.name for p in (Path(cache_dir) / "heads").iterdir()) == entries  # nothing new stored


def test_refit_from_scratch_gives_the_same_heads(first, small_folder, tmp_path, cache_dir):
    shutil.rmtree(Path(cache_dir) / "heads")
    again = run_study(_cfg(small_folder, tmp_path / "run2", cache_dir))
    assert not any(m["head_from_cache"] for m in again["methods"].values())
    _same_results(first, again)  # seeded: the cache saves time, it does not hide nondeterminism


def test_changed_hyperparameter_refits_only_that_head(first, small_folder, tmp_path, cache_dir):
    again = run_study(_cfg(small_folder, tmp_path / "run2", cache_dir, epochs=6))
    assert again["methods"]["svm"]["head_from_cache"]  # SVC does not depend on epochs
    assert not again["methods"]["softmax"]["head_from_cache"]
    other_seed = run_study(_cfg(small_folder, tmp_path / "run3", cache_dir, seed=1))
    assert not any(m["head_from_cache"] for m in other_seed["methods"].values())  # other split, other seed


def test_damaged_entry_is_set_aside_and_refitted(first, small_folder, tmp_path, cache_dir):
    for head in (Path(cache_dir) / "heads").glob("*/head.*"):
        head.write_bytes(b"not a head")
    with pytest.warns(UserWarning, match="could not be loaded"):
        again = run_study(_cfg(small_folder, tmp_path / "run2", cache_dir))
    assert not any(m["head_from_cache"] for m in again["methods"].values())
    _same_results(first, again)
    third = run_study(_cfg(small_folder, tmp_path / "run3", cache_dir))  # the refit was stored again
    assert all(m["head_from_cache"] for m in third["methods"].values())


def test_cv_selection_scores_are_cached_beside_the_heads(small_folder, tmp_path, cache_dir):
    first = run_study(_cfg(small_folder, tmp_path / "run1", cache_dir, cv=3, data_efficiency=False))
    extras = sorted(p.name for p in (Path(cache_dir) / "heads").glob("*/cv3-0.json"))
    assert len(extras) == 2  # softmax and svm are cross-validated by the analysis, once
    again = run_study(_cfg(small_folder, tmp_path / "run2", cache_dir, cv=3, data_efficiency=False))
    assert all(m["head_from_cache"] for m in again["methods"].values())
    assert again["selection"] == first["selection"] and again["selected"] == first["selected"]


def test_edited_code_changes_the_key_and_refits(first, small_folder, tmp_path, cache_dir, monkeypatch):
    import transferlab
    from transferlab.heads import cache as head_cache

    pkg = tmp_path / "pkg"
    shutil.copytree(Path(transferlab.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = head_cache.code_fingerprint(str(pkg))
    assert before == head_cache.code_fingerprint.__wrapped__(str(Path(transferlab.__file__).parent))
    probes = pkg / "heads" / "probes.py"
    probes.write_text(probes.read_text() + "\n# an edit\n")
    assert head_cache.code_fingerprint.__wrapped__(str(pkg)) != before
    # a run whose code differs (same version number) fits its heads afresh instead of reusing the old code's fits
    monkeypatch.setattr(head_cache, "code_fingerprint", lambda: "edited")
    again = run_study(_cfg(small_folder, tmp_path / "run2", cache_dir))
    assert not any(m["head_from_cache"] for m in again["methods"].values())
    _same_results(first, again)


# ------------------------------------------------------------------ cross-validation outcomes


def _cv_inputs():
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    X = (rng.normal(size=(4, 16))[y] * 1.5 + rng.normal(size=(120, 16))).astype(np.float32)
    return X, y


def _counting_folds(monkeypatch):
    """Counts the folds `cross_validate` fits, per method."""
    from transferlab.evaluation import crossval

    calls: dict[str, int] = {}
    real = crossval._fold

    def fold(*a, name=None, **kw):
        calls[name] = calls.get(name, 0) + 1
        return real(*a, name=name, **kw)

    monkeypatch.setattr(crossval, "_fold", fold)
    return calls


def test_a_rerun_reads_every_methods_cv_scores_from_the_cache(tmp_path, monkeypatch):
    from transferlab.evaluation.crossval import cross_validate, plan
    from transferlab.heads.cache import HeadCache

    X, y = _cv_inputs()
    n = len(plan(y, 0).folds)
    cache = HeadCache(tmp_path)
    calls = _counting_folds(monkeypatch)
    first = cross_validate(X, y, ["logreg", "lda", "ensemble"], seed=0, cache=cache)
    assert calls == {"logreg": n, "lda": n, "svm_tuned": n}  # the ensemble's members are cross-validated for it
    calls.clear()
    again = cross_validate(X, y, ["logreg", "lda", "ensemble"], seed=0, cache=cache)
    assert calls == {}  # nothing fitted
    for name in ("logreg", "lda", "ensemble"):
        a, b = first["methods"][name], again["methods"][name]
        assert (a["score"], a["fold_scores"], a["params"], a["se"]) == (
            b["score"],
            b["fold_scores"],
            b["params"],
            b["se"],
        )
    assert again["method"] == first["method"]
    assert again["methods"]["logreg"]["cached"] is True and "cached" not in first["methods"]["logreg"]
    assert again["methods"]["logreg"]["seconds"] == first["methods"]["logreg"]["seconds"]  # its cost when computed

    calls.clear()  # an added method is the only one cross-validated
    cross_validate(X, y, ["logreg", "lda", "svm"], seed=0, cache=cache)
    assert calls == {"svm": n}


def test_cv_scores_are_recomputed_when_data_seed_or_code_differ(tmp_path, monkeypatch):
    from transferlab.evaluation.crossval import cross_validate, plan
    from transferlab.heads import cache as head_cache
    from transferlab.heads.cache import HeadCache

    X, y = _cv_inputs()
    n = len(plan(y, 0).folds)
    cache = HeadCache(tmp_path)
    cross_validate(X, y, ["lda"], seed=0, cache=cache)
    calls = _counting_folds(monkeypatch)
    cross_validate(X, y, ["lda"], seed=1, cache=cache)  # other folds
    X2 = X.copy()
    X2[0, 0] += 1
    cross_validate(X2, y, ["lda"], seed=0, cache=cache)  # one feature of one image
    y2 = y.copy()
    y2[[0, 119]] = y2[[119, 0]]
    cross_validate(X, y2, ["lda"], seed=0, cache=cache)  # two labels swapped
    monkeypatch.setattr(head_cache, "code_fingerprint", lambda: "edited")
    cross_validate(X, y, ["lda"], seed=0, cache=cache)
    assert calls == {"lda": 4 * n}


def test_an_unreadable_cv_cache_entry_warns_and_is_computed_again(tmp_path, monkeypatch):
    from transferlab.evaluation.crossval import cross_validate, plan
    from transferlab.heads.cache import HeadCache

    X, y = _cv_inputs()
    cache = HeadCache(tmp_path)
    first = cross_validate(X, y, ["lda"], seed=0, cache=cache)
    (entry,) = (tmp_path / "heads" / "cv").glob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    calls = _counting_folds(monkeypatch)
    with pytest.warns(UserWarning, match="could not be read"):
        again = cross_validate(X, y, ["lda"], seed=0, cache=cache)
    assert calls == {"lda": len(plan(y, 0).folds)}
    assert again["methods"]["lda"]["score"] == first["methods"]["lda"]["score"]
    assert "cached" not in again["methods"]["lda"]
    assert entry.stat().st_size > 100  # stored afresh


def test_a_rerun_of_the_default_study_cross_validates_nothing(small_folder, tmp_path, cache_dir, monkeypatch):
    from .conftest import tiny_study

    first = run_study(tiny_study(small_folder, tmp_path / "a", cache_dir))
    calls = _counting_folds(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = run_study(tiny_study(small_folder, tmp_path / "b", cache_dir))
    assert calls == {}
    assert not [w for w in caught if "tasks" in str(w.message)]  # joblib's "0 tasks ... cancelled": none ran
    assert again["selected"] == first["selected"]
    cv_a, cv_b = first["selection"]["cv"]["methods"], again["selection"]["cv"]["methods"]
    assert {n: r["score"] for n, r in cv_a.items()} == {n: r["score"] for n, r in cv_b.items()}
    assert all(r.get("cached") for n, r in cv_b.items() if n != "ensemble")
    assert "(cached)" in (tmp_path / "b" / "report.md").read_text()


def test_an_interrupted_cv_keeps_the_methods_it_finished(tmp_path, monkeypatch):
    # The scores were stored after the whole CV: Ctrl-C during its last method lost every finished one.
    from transferlab.evaluation import crossval
    from transferlab.evaluation.crossval import cross_validate, plan
    from transferlab.heads.cache import HeadCache

    X, y = _cv_inputs()
    cache = HeadCache(tmp_path)
    real = crossval._fold

    def interrupted(*a, name=None, **kw):
        if name == "lda":  # the cheaper method runs last
            raise KeyboardInterrupt
        return real(*a, name=name, **kw)

    monkeypatch.setattr(crossval, "_fold", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cross_validate(X, y, ["lda", "logreg"], seed=0, cache=cache, n_jobs=1)
    monkeypatch.setattr(crossval, "_fold", real)
    calls = _counting_folds(monkeypatch)
    again = cross_validate(X, y, ["lda", "logreg"], seed=0, cache=cache, n_jobs=1)
    assert calls == {"lda": len(plan(y, 0).folds)}
    assert again["methods"]["logreg"]["cached"] is True


def test_cv_scores_that_cannot_be_stored_only_warn(tmp_path, monkeypatch):
    # a full disk while writing (safetensors raises its own error type, not OSError) must not lose the CV
    import numpy as np

    from transferlab.heads import cache as head_cache

    def full(*_a, **_k):
        raise RuntimeError("No space left on device")

    monkeypatch.setattr("safetensors.numpy.save_file", full)
    cache = head_cache.HeadCache(tmp_path)
    with pytest.warns(UserWarning, match="CV scores not cached"):
        cache.put_scores("k" * 24, np.zeros((2, 1, 5, 3), dtype=np.float32), 1.0)
    assert cache.scores("k" * 24) is None and not list((tmp_path / "heads" / "cv").iterdir())
