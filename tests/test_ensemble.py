"""The `ensemble` head: a soft vote of tuned heads, its honest (nested under --cv) validation score, its bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from sklearn.base import clone

import transferlab
from transferlab import study as study_module
from transferlab.cli import main
from transferlab.evaluation.analysis import selection_scores
from transferlab.evaluation.selection import data_efficiency
from transferlab.heads import make_head, resolve_methods
from transferlab.heads.ensemble import ENSEMBLE_MEMBERS, SoftVoteEnsemble
from transferlab.heads.probes import KernelSVMHead
from transferlab.heads.search import ValidationSearch, cv_folds, score
from transferlab.heads.search import fixed as _fixed
from transferlab.heads.tuned import make_tuned
from transferlab.model.export import ExportError, export_onnx
from transferlab.study import SplitFeatures

from .test_selection import TINY, _blobs, _split

HEADS = resolve_methods(["all"])
EPOCHS = 10


@pytest.fixture(scope="module")
def data():
    X, y = _blobs(n_per=(30, 16, 8), spread=2.0)
    return _split(X, y)


def test_soft_vote_is_the_mean_of_members_tuned_exactly_as_alone(data):
    (Xt, yt), (Xv, yv) = data
    est = make_head("ensemble", seed=0, epochs=EPOCHS)
    assert isinstance(est, SoftVoteEnsemble) and "ensemble" in HEADS and "ensemble" in resolve_methods(["all"])
    clone(est)
    est.fit(Xt, yt, eval_set=(Xv, yv))
    p = est.predict_proba(Xv)
    assert p.shape == (len(Xv), 3)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    assert est.names_ == list(ENSEMBLE_MEMBERS)
    members = [m.predict_proba(Xv) for m in est.members_]
    np.testing.assert_allclose(p, np.mean(members, axis=0), rtol=1e-12)
    np.testing.assert_array_equal(est.predict(Xv), est.classes_[p.argmax(1)])
    for name, m in zip(est.names_, est.members_):
        np.testing.assert_array_equal(m.classes_, est.classes_)
        alone = make_tuned(name, seed=0, epochs=EPOCHS).fit(Xt, yt, eval_set=(Xv, yv))
        assert m.best_params_ == alone.best_params_ and m.validation_ == "validation split"
        np.testing.assert_allclose(m.predict_proba(Xv), alone.predict_proba(Xv), rtol=1e-6, atol=1e-9)
    # its validation score is its vote on the validation split the members tuned on
    assert est.best_valid_ == score(yv, est.predict(Xv))
    s = est.summary()
    assert (
        s["validation"] == "validation split"
        and s["best_params"]["svm_tuned.C"] == est.members_[0].best_params_["clf__C"]
    )
    assert set(s["members"]) == set(ENSEMBLE_MEMBERS)


def test_members_must_give_probabilities_over_the_same_classes(data):
    (Xt, yt), _ = data
    with pytest.raises(AttributeError, match="probability"):
        SoftVoteEnsemble(members=(("svm", KernelSVMHead(probability=False)),)).fit(Xt, yt)
    with pytest.raises(ValueError, match="not a tuned head"):
        SoftVoteEnsemble(members=("svm_tuned", "nope")).fit(Xt, yt)
    with pytest.raises(ValueError, match="distinct"):
        SoftVoteEnsemble(members=("logreg", "logreg")).fit(Xt, yt)


def test_cv_protocol_scores_out_of_fold_with_members_tuned_inside_each_fold(data):
    (Xt, yt), (Xv, yv) = data
    est = make_head("ensemble", seed=0, epochs=EPOCHS, cv=3)
    assert isinstance(est, ValidationSearch) and est.cv == 3
    est.fit(Xt, yt, eval_set=(Xv, yv))
    assert est.validation_ == "3-fold CV on train + valid"
    # by hand: every outer fold fits a fresh ensemble on its training part only (members tune on a holdout
    # of it, never seeing the fold's scored part), predictions pooled and scored once
    X, y = np.concatenate([Xt, Xv]), np.concatenate([yt, yv])
    pred = np.empty_like(y)
    chosen = []
    for a, b in cv_folds(y, 3, seed=0):
        fold = SoftVoteEnsemble(seed=0, epochs=EPOCHS).fit(X[a], y[a])
        assert all(m.validation_.startswith("holdout") for m in fold.members_)
        assert all(len(m.best_estimator_.classes_) == 3 for m in fold.members_)
        chosen.append(fold.best_params_)
        pred[b] = fold.predict(X[b])
    assert est.best_valid_ == score(y, pred)
    # and it is not the vote of members tuned once on everything (that would leak the folds' labels)
    leaky = SoftVoteEnsemble(seed=0, epochs=EPOCHS).fit(X, y)
    assert score(y, leaky.predict(X)) != est.best_valid_
    # the final model: a fresh ensemble fitted on train alone, its members tuned on a holdout of train
    final = est.best_estimator_
    assert isinstance(final, SoftVoteEnsemble)
    assert all(m.validation_.startswith("holdout") for m in final.members_)
    assert final.members_[0].best_estimator_[-1].n_fit_ == len(yt)
    # the study's selection takes this nested score under the same protocol
    splits = {"train": SplitFeatures(Xt, yt, [""] * len(yt)), "valid": SplitFeatures(Xv, yv, [""] * len(yv))}
    scores, protocol, _ = selection_scores({"ensemble": {"estimator": est}}, splits, cv=3)
    assert scores["ensemble"] == est.best_valid_ and protocol == "3-fold CV on train + valid"
    assert est.summary()["inner"]["best_params"]


@pytest.mark.parametrize("cv", [0, 3])
def test_fixed_ensemble_refits_the_same_members_for_data_efficiency(data, cv):
    (Xt, yt), (Xv, yv) = data
    est = make_head("ensemble", seed=0, epochs=EPOCHS, cv=cv).fit(Xt, yt, eval_set=(Xv, yv))
    fixed = _fixed(est)
    assert isinstance(fixed, SoftVoteEnsemble) and [n for n, _ in fixed.members] == list(ENSEMBLE_MEMBERS)
    assert fixed.members[0][1][-1].probability  # the vote needs the SVM's probabilities
    np.testing.assert_allclose(clone(fixed).fit(Xt, yt).predict_proba(Xv), est.predict_proba(Xv), atol=1e-6)
    curve = data_efficiency(est, Xt, yt, Xv, yv, seed=0, repeats=1, ks=(1, 5))
    assert [p["k"] for p in curve["points"]] == [1, 5, 15] and curve["points"][-1]["score"] is not None
    # one image per class: LDA cannot fit, and the curve's point says which member it was
    assert curve["points"][0]["score"] is None and curve["points"][0]["error"].startswith("ensemble member lda: ")


def test_study_with_methods_ensemble_saves_a_bundle_with_the_same_probabilities(
    tmp_path, small_folder, cache_dir, monkeypatch
):
    fitted = {}

    def spy(name, cfg, splits, classes, chosen=None, **kw):
        res = fit_method(name, cfg, splits, classes, chosen, **kw)
        fitted[name] = (res, splits["test"].paths)
        return res

    fit_method = study_module.fit_method
    monkeypatch.setattr(study_module, "fit_method", spy)
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                str(small_folder),
                "--out",
                str(out),
                "--methods",
                "svm,ensemble",
                "--cache-dir",
                str(cache_dir),
                "--valid-fraction",
                "0.3",
                *TINY,
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["methods"]) == ["svm", "ensemble"] and m["methods"]["ensemble"]["bundle"] == "models/ensemble"
    assert m["methods"]["ensemble"]["tuning"]["best_params"] and "ensemble" in dict(m["selection"]["ranking"])
    assert "ensemble" in (out / "report.md").read_text()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert "flip_train" not in cfg["methods"]["ensemble"]

    res, test_paths = fitted["ensemble"]
    model = transferlab.load(out / "models" / "ensemble", cache_dir=cache_dir)
    assert type(model.estimator).__name__ == "SoftVoteEnsemble"
    np.testing.assert_array_equal(model.predict_proba(test_paths), res["test_proba"])
    classes = np.array(m["classes"])
    np.testing.assert_array_equal(model.predict(test_paths), classes[res["test_pred"]])
    with pytest.raises(ExportError, match="method ensemble .*of the tuned heads svm_tuned"):  # the registry says so
        export_onnx(out / "models" / "ensemble", tmp_path / "ensemble.onnx")


def test_the_study_ensemble_votes_with_the_members_it_fitted_alone_instead_of_refitting_them(data, tmp_path):
    """Final fits: the ensemble comes after its members (`_fit_order`) and reuses their fitted heads when their
    hyperparameters are the ones CV chose for it; the vote is the same as with members refitted inside it."""
    from transferlab.config import StudyConfig

    (Xt, yt), (Xv, yv) = data
    splits = {
        "train": SplitFeatures(Xt, yt, [""] * len(yt)),
        "valid": SplitFeatures(Xv, yv, [""] * len(yv)),
        "test": SplitFeatures(Xv, yv, [""] * len(yv)),
    }
    cfg = StudyConfig(data="", out=str(tmp_path), epochs=EPOCHS, cache_dir=str(tmp_path / "cache"))
    classes = ["a", "b", "c"]
    params = {
        "svm_tuned": {"clf__C": 10.0, "clf__gamma_scale": 0.5},
        "logreg": {"clf__C": 0.1},
        "lda": {"clf__class_weight": None},
    }
    cv_sel = {"method": "ensemble", "metric": "macro_f1", "methods": {"ensemble": {"score": {"macro_f1": 0.9}}}}
    order = study_module._fit_order(["softmax", "svm", "svm_tuned", "logreg", "lda", "ensemble"], cv_sel)
    assert order.index("ensemble") > max(order.index(m) for m in ENSEMBLE_MEMBERS) and order[0] == "svm_tuned"
    alone = {m: study_module.fit_method(m, cfg, splits, classes, params[m]) for m in ENSEMBLE_MEMBERS}
    prefit = {m: r["estimator"] for m, r in alone.items()}
    secs = {m: r["train_seconds"] for m, r in alone.items()}
    res = study_module.fit_method("ensemble", cfg, splits, classes, params, prefit=prefit, prefit_seconds=secs)
    voted = res["estimator"]
    assert voted.reused_ == list(ENSEMBLE_MEMBERS) and all(a is b for a, b in zip(voted.members_, prefit.values()))
    # its train time is what training it costs: the members' fits it reused and its own step, never below them
    assert res["train_seconds"] >= sum(secs.values()) and all(m in res["train_note"] for m in ENSEMBLE_MEMBERS)
    cached = study_module.fit_method("ensemble", cfg, splits, classes, params, prefit=prefit, prefit_seconds=secs)
    assert cached["cached_head"] and cached["train_seconds"] == res["train_seconds"]
    refit = study_module.chosen_head("ensemble", cfg, params).fit(Xt, yt, eval_set=(Xv, yv))
    assert refit.reused_ == []
    np.testing.assert_allclose(voted.predict_proba(Xv), refit.predict_proba(Xv), atol=1e-6)
    # a member fitted with other hyperparameters is not reused
    other = study_module.fit_method("logreg", cfg, splits, classes, {"clf__C": 0.01})["estimator"]
    again = study_module.chosen_head("ensemble", cfg, params).fit(Xt, yt, eval_set=(Xv, yv), prefit={"logreg": other})
    assert again.reused_ == []
