"""The default selection (issue 16): fast fold paths that give the study's own models, honest repeated CV, the
one-SE rule, the aspect-aware input size, and a default run that never reads test labels before selecting."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_info

from transferlab.cli import main
from transferlab.config import ConfigError, StudyConfig, resolve_selection
from transferlab.evaluation.crossval import PREFERENCE, VIEWS_NOTE, Plan, _fold, _honest, cross_validate, decide, plan
from transferlab.features.backbones import load_backbone
from transferlab.features.input_size import aspect_input_size, median_aspect
from transferlab.heads import registry
from transferlab.heads.lbfgs import LBFGSLogisticRegression, logistic_path
from transferlab.heads.pairwise import fit_temperature, ovr_decision, tempered
from transferlab.heads.paths import generic_fold
from transferlab.heads.probes import KernelSVMHead
from transferlab.heads.tuned import TUNED
from transferlab.study import chosen_head, run_study

from .conftest import make_imagefolder
from .test_selection import _shuffle_test_folders


def _blobs(n=240, d=24, k=4, seed=0, rare=8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    y[:rare] = k - 1
    centres = rng.normal(size=(k, d)) * 1.5
    X = (centres[y] + rng.normal(size=(n, d)) * 2.0).astype(np.float32)
    return X, y


# ------------------------------------------------------------------ the solver and the fold paths


def test_lbfgs_logistic_regression_reaches_scikit_learns_optimum():
    X, y = _blobs(300, 16, 4)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    for C in (1e-3, 1e-1):
        ours = LBFGSLogisticRegression(C=C, class_weight="balanced", max_iter=500).fit(X, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = LogisticRegression(C=C, class_weight="balanced", max_iter=5000, tol=1e-8).fit(X, y)
        np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=2e-3)
        assert (ours.predict(X) == ref.predict(X)).mean() >= 0.99
    binary = LBFGSLogisticRegression(C=1.0).fit(X, y % 2)
    assert binary.coef_.shape == (1, X.shape[1]) and set(binary.predict(X)) <= {0, 1}


def test_lbfgs_logistic_regression_weighs_explicit_sample_weights_as_scikit_learn_does():
    # scikit-learn's objective is 0.5 ||W||^2 + C * sum_i s_i * CE_i with the sample weights as given: doubling
    # every weight is doubling C. The fit once rescaled the weights to sum to n, which undid that.
    X, y = _blobs(300, 16, 4)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    sw = np.random.default_rng(1).uniform(0.5, 4.0, len(y))
    ours = LBFGSLogisticRegression(C=1e-2, max_iter=500).fit(X, y, sample_weight=sw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LogisticRegression(C=1e-2, max_iter=5000, tol=1e-8).fit(X, y, sample_weight=sw)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=2e-3)
    doubled = LBFGSLogisticRegression(C=1e-2, max_iter=500).fit(X, y, sample_weight=2 * sw)
    twice_c = LBFGSLogisticRegression(C=2e-2, max_iter=500).fit(X, y, sample_weight=sw)
    np.testing.assert_allclose(doubled.coef_, twice_c.coef_, atol=1e-3)


def test_logistic_path_solves_each_C_as_a_fresh_solve_would():
    X, y = _blobs(200, 12, 3)
    warm = logistic_path(X, y, 3, [1e-3, 1e-2, 1e-1], max_iter=500, tol=1e-6)
    for (W, b), C in zip(warm, [1e-3, 1e-2, 1e-1]):
        ((W1, b1),) = logistic_path(X, y, 3, [C], max_iter=500, tol=1e-6)
        np.testing.assert_allclose(W, W1, atol=1e-3)
    # stronger regularisation, smaller weights: the path is not one solution repeated
    assert np.linalg.norm(warm[0][0]) < np.linalg.norm(warm[2][0])


@pytest.mark.parametrize("name", ["logreg", "lda", "svm_tuned"])
def test_fast_fold_paths_give_the_models_the_study_fits(name):
    X, y = _blobs()
    spec = TUNED[name]
    points = spec.path().points()
    fast = spec.path().fold(X[:180], y[:180], X[180:], 4, points)  # with the solver settings the head has
    for p, s in zip(points, fast):
        model = spec.build(0, 50).set_params(**p).fit(X[:180], y[:180])
        assert (s.argmax(1) == model.predict(X[180:])).mean() >= (0.98 if name == "logreg" else 1.0), p
        if spec.proba:
            np.testing.assert_allclose(s, model.predict_proba(X[180:]), atol=2e-3 if name == "logreg" else 1e-5)


@pytest.mark.parametrize("n_classes", [3, 7, 30])
def test_ovr_decision_is_scikit_learns_bit_for_bit(n_classes):
    """The rbf fold path turns SVC's one-vs-one values into its one-vs-rest shape itself (scikit-learn loops over
    the pairs in Python); the values, ties of votes included, are scikit-learn's exactly."""
    from sklearn.utils.multiclass import _ovr_decision_function

    rng = np.random.default_rng(n_classes)
    ovo = rng.normal(size=(50, n_classes * (n_classes - 1) // 2)) * rng.choice([1e-8, 1.0, 1e3], size=(50, 1))
    ovo[:5] = np.sign(ovo[:5])  # many equal confidences
    ovo[5, :3] = 0.0
    np.testing.assert_array_equal(ovr_decision(ovo, n_classes), _ovr_decision_function(ovo < 0, -ovo, n_classes))
    # and what SVC's own decision_function gives on a fitted model
    X, y = _blobs(30 * n_classes, 6, n_classes)
    svc = SVC(decision_function_shape="ovo").fit(X, y)
    ovr = SVC(decision_function_shape="ovr").fit(X, y).decision_function(X)
    np.testing.assert_array_equal(ovr_decision(svc.decision_function(X), n_classes), ovr)


def test_fit_temperature_finds_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    sums = rng.normal(size=(20000, 5)) * 4
    for t in (0.5, 2.0, 8.0):
        p = tempered(sums, t)
        y = (p.cumsum(axis=1) > rng.uniform(size=(len(p), 1))).argmax(axis=1)
        assert fit_temperature(sums, y) == pytest.approx(t, rel=0.1)
    sums[:10, 2] = -np.inf  # a class absent from these rows' fit part: their probability of it is 0
    y[:10] = 2
    assert np.isfinite(fit_temperature(sums, y))
    assert (tempered(sums, 2.0)[:10, 2] == 0).all()


def test_svm_probabilities_are_calibrated_without_platt_scaling():
    """KernelSVMHead's probabilities: the softmax of SVC's one-vs-rest values at a temperature fitted out of fold,
    not libsvm's Platt scaling (five extra fits; deprecated in scikit-learn 1.9). On held-out data they are as good
    as a sigmoid calibration by 5-fold CV (scikit-learn's replacement for it), confident as often as right, and
    their most probable class is the prediction (but on a tie of votes, which libsvm breaks by class order and the
    one-vs-rest values by their confidences)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.metrics import log_loss

    X, y = _blobs(1200, 16, 5, seed=3)
    head = KernelSVMHead(class_weight=None).fit(X[:600], y[:600])
    assert head.svc_.probability is not True and 0 < head.temperature_ < 1e3
    p = head.predict_proba(X[600:])
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-9)
    ref = CalibratedClassifierCV(SVC(), method="sigmoid", cv=5).fit(X[:600], y[:600]).predict_proba(X[600:])
    assert log_loss(y[600:], p) <= log_loss(y[600:], ref) + 0.03
    pred = head.predict(X[600:])
    assert abs(p.max(axis=1).mean() - (pred == y[600:]).mean()) < 0.05
    assert (p.argmax(axis=1) == pred).mean() >= 0.99
    binary = KernelSVMHead().fit(X[:600], y[:600] % 2)
    np.testing.assert_array_equal(binary.predict_proba(X[600:]).argmax(axis=1), binary.predict(X[600:]))


def test_svm_probabilities_on_a_handful_of_images_fit_and_stay_modest():
    """One image per class leaves nothing to hold out (the calibration folds once raised scikit-learn's "n_splits=2
    cannot be greater than the number of members in each class": the data-efficiency curve's k=1 point of `svm`);
    two per class, all held-out values right, must not drive the temperature to its bound."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 4)).astype(np.float32)
    one = KernelSVMHead().fit(X[:5], np.arange(5))
    assert one.temperature_ == 1.0
    np.testing.assert_array_equal(one.predict_proba(X).argmax(axis=1), one.predict(X))
    two = KernelSVMHead().fit(X[:4], np.array([0, 0, 1, 1]))
    assert 0.1 < two.temperature_ < 10 and two.predict_proba(X).max() < 0.99


def test_an_svm_saved_with_platt_scaling_still_gives_its_probabilities():
    """A bundle saved before temperature scaling holds a KernelSVMHead whose libsvm model has Platt scaling and no
    `temperature_`: its probabilities are still libsvm's."""
    X, y = _blobs(120, 6, 3)
    head = KernelSVMHead().fit(X, y)
    del head.temperature_
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        K = np.exp(-head.gamma_ * ((X[:, None] - X[None]) ** 2).sum(-1))
        head.svc_ = SVC(kernel="precomputed", class_weight="balanced", probability=True, random_state=0).fit(K, y)
        head.support_vectors_ = X[head.svc_.support_]
        np.testing.assert_allclose(head.predict_proba(X[:10]), head.svc_.predict_proba(K[:10]), atol=1e-4)


def test_the_tuned_svms_final_fit_takes_its_temperature_from_the_cv(monkeypatch):
    """The CV has the chosen point's out-of-fold decision values for every image: the temperature fitted on them is
    part of the chosen hyperparameters, and the final fit uses it instead of fitting calibration folds again."""
    X, y = _blobs(200, 8, 4)
    chosen = cross_validate(X, y, ["svm", "svm_tuned"], seed=0)["methods"]
    params = chosen["svm_tuned"]["params"]
    assert set(params) == {"clf__C", "clf__gamma_scale", "clf__temperature"} and 0 < params["clf__temperature"] < 1e3
    assert set(chosen["svm"]["params"]) == {"temperature"}  # the seed's SVM: no grid, the same calibration

    def calibration_folds(*_a, **_k):
        raise AssertionError("calibration folds fitted again")

    monkeypatch.setattr(KernelSVMHead, "_temperature", calibration_folds)
    head = chosen_head("svm_tuned", StudyConfig(data="x", out="y"), params).fit(X, y)
    assert head.best_estimator_[-1].temperature_ == params["clf__temperature"]
    np.testing.assert_allclose(head.predict_proba(X).sum(axis=1), 1)
    for flip in (False, True):  # under --flip-train the seed's SVM is wrapped (ViewAugmented)
        cfg = StudyConfig(data="x", out="y", flip_train=flip)
        svm = chosen_head("svm", cfg, chosen["svm"]["params"]).fit(np.hstack([X, X]) if flip else X, y)
        assert (svm.estimator_ if flip else svm).temperature_ == chosen["svm"]["params"]["temperature"]


def test_the_ensembles_cv_fits_no_svm_for_probabilities(monkeypatch):
    """The SVM member's fold probabilities come from its fold path's values, calibrated on the other folds: no
    model is refitted for them (a refit with Platt scaling per fold once cost more than the SVM's whole grid)."""

    def refit(*_a, **_k):
        raise AssertionError("KernelSVMHead refitted during cross-validation")

    monkeypatch.setattr(KernelSVMHead, "fit", refit)
    X, y = _blobs(200, 8, 4)
    res = cross_validate(X, y, ["logreg", "svm_tuned", "ensemble"], seed=0)
    assert 0.5 < res["methods"]["ensemble"]["score"]["macro_f1"] <= 1


def test_seed_svm_fold_path_is_scikit_learns_rbf_svc():
    X, y = _blobs()
    (s,) = registry.get("svm").cv.fold(X[:180], y[:180], X[180:], 4, [{}])
    ref = SVC(kernel="rbf").fit(X[:180], y[:180])
    assert (s.argmax(1) == ref.predict(X[180:])).all()


@pytest.mark.parametrize("name", ["svm", "logreg", "lda", "svm_tuned"])
def test_flip_train_folds_fit_both_views_as_the_final_model_does(name):
    """Under --flip-train a fold fits on both views of its fit images and scores the held ones on the views' mean:
    the model the study then fits (`chosen_head` with flip_train, `ViewAugmented`), not the one-view model."""
    X, y = _blobs()
    F = X + np.random.default_rng(1).normal(size=X.shape).astype(np.float32) * 1.5  # the "flipped" view
    views, mean = np.hstack([X, F]), (X + F) / 2
    a, b = np.arange(180), np.arange(180, 240)
    cv = registry.get(name).cv
    points = cv.points()[:: max(1, len(cv.points()) // 3)]
    both = _fold(cv, mean, y, a, b, 4, points, views=views)
    one = _fold(cv, mean, y, a, b, 4, points)
    cfg = StudyConfig(data="d", flip_train=True)
    for p, s, s1 in zip(points, both, one):
        model = chosen_head(name, cfg, p).fit(views[a], y[a])
        assert (s.argmax(1) == model.predict(mean[b])).mean() >= (0.98 if name == "logreg" else 1.0), p
    assert any(not np.array_equal(s, s1) for s, s1 in zip(both, one))  # the views changed the fits
    with pytest.raises(ValueError, match="two views"):
        cross_validate(X, y, [name], views=X)


def test_a_class_missing_from_a_fold_gets_minus_inf_not_a_shifted_column():
    X, y = _blobs()
    keep = y[:180] != 2
    (s,) = generic_fold(
        make_pipeline(StandardScaler(), LogisticRegression()), X[:180][keep], y[:180][keep], X[180:], 4, [{}]
    )
    assert np.isneginf(s[:, 2]).all() and np.isfinite(s[:, [0, 1, 3]]).all()
    assert set(s.argmax(1)) <= {0, 1, 3}


# ------------------------------------------------------------------ honest CV and the rule


def test_plan_takes_k_from_the_rarest_class_and_repeats_from_the_size():
    y = np.repeat([0, 1, 2], [50, 40, 3])
    p = plan(y)
    assert p.k == 3 and p.repeats == 3 and len(p.folds) == 9
    for r, a, b in p.folds:
        assert len(np.intersect1d(a, b)) == 0 and len(a) + len(b) == len(y)
    for r in range(3):  # every image held out exactly once per repeat
        held = np.concatenate([b for rr, _, b in p.folds if rr == r])
        assert sorted(held) == list(range(len(y)))
    big = plan(np.arange(4000) % 10)
    assert big.k == 5 and big.repeats == 1


def test_each_fold_takes_the_grid_point_best_on_the_other_folds():
    """Point 0 is right on fold 0 only, point 1 everywhere else: fold 0 must take point 1 (its choice is made on
    the other folds), so no fold is scored with a point chosen on itself."""
    y = np.array([0, 1] * 10)
    folds = [(0, np.arange(10, 20), np.arange(10)), (0, np.arange(10), np.arange(10, 20))]
    p = Plan(2, 1, 0, folds)
    S = np.zeros((2, 1, 20, 2), dtype=np.float32)
    S[0, 0, np.arange(10), y[:10]] = 1  # point 0: right on fold 0
    S[0, 0, np.arange(10, 20), 1 - y[10:]] = 1  # wrong on fold 1
    S[1, 0, np.arange(20), y] = 1  # point 1: right everywhere
    S[1, 0, np.arange(5), 1 - y[:5]] = 1  # but half wrong on fold 0
    S[1, 0, np.arange(5), y[:5]] = 0
    honest, chosen, overall = _honest(S, y, p, "accuracy")
    assert chosen == [1, 0]  # fold 0 chosen on fold 1 (point 1 wins there), fold 1 on fold 0 (point 0 wins)
    assert (honest[0, :10] == S[1, 0, :10].argmax(1)).all() and (honest[0, 10:] == S[0, 0, 10:].argmax(1)).all()
    assert overall == 1


def test_tuned_cv_scores_are_not_grid_maxima_and_the_ensemble_votes_honest_members():
    X, y = _blobs(200, 16, 4)
    res = cross_validate(X, y, ["svm", "logreg", "lda", "svm_tuned", "ensemble"], metric="macro_f1", seed=0)
    m = res["methods"]
    assert set(m) == {"svm", "logreg", "lda", "svm_tuned", "ensemble"}
    assert res["protocol"].endswith("-fold stratified CV on train + valid") and res["repeats"] == 3
    for name, r in m.items():
        assert 0 <= r["score"]["macro_f1"] <= 1 and r["se"] >= 0 and len(r["fold_scores"]) == 3 * res["k"]
    assert m["ensemble"]["members"] == ["svm_tuned", "logreg", "lda"]
    assert m["ensemble"]["params"]["logreg"] == m["logreg"]["params"]
    for name in ("logreg", "lda", "svm_tuned"):  # the chosen point's own pooled score: the grid's best, >= honest
        point = m[name]["point_score"]["macro_f1"]
        assert point >= m[name]["score"]["macro_f1"] - 1e-12 and m[name]["grid_points"] > 1
    assert res["method"] in res["within_one_se"] and res["best"] in res["within_one_se"]
    # the same call again: the same folds, the same choice (nothing random left unseeded)
    again = cross_validate(X, y, ["svm", "logreg", "lda", "svm_tuned", "ensemble"], metric="macro_f1", seed=0)
    assert again["method"] == res["method"] and again["methods"]["svm_tuned"]["score"] == m["svm_tuned"]["score"]


def test_an_ensemble_alone_cross_validates_its_members_without_reporting_them():
    X, y = _blobs(160, 8, 3)
    res = cross_validate(X, y, ["ensemble"])
    assert list(res["methods"]) == ["ensemble"] and res["method"] == "ensemble"
    assert set(res["methods"]["ensemble"]["params"]) == {"svm_tuned", "logreg", "lda"}


def _scores(**fold_scores):
    return {n: {"score": {"macro_f1": float(np.mean(f))}, "fold_scores": f} for n, f in fold_scores.items()}


def test_one_se_rule_prefers_the_simpler_method_within_the_noise_and_not_beyond():
    p = Plan(5, 1, 0, [None] * 5)
    noisy = _scores(svm_tuned=[0.80, 0.90, 0.70, 0.85, 0.75], logreg=[0.79, 0.88, 0.72, 0.80, 0.76])
    d = decide(noisy, p, "macro_f1", "one_se", n=500)
    assert d["best"] == "svm_tuned" and d["method"] == "logreg" and "within one standard error" in d["why"]
    assert PREFERENCE.index("logreg") < PREFERENCE.index("svm_tuned")
    clear = _scores(svm_tuned=[0.90, 0.91, 0.89, 0.90, 0.92], logreg=[0.80, 0.80, 0.79, 0.81, 0.80])
    assert decide(clear, p, "macro_f1", "one_se", n=500)["method"] == "svm_tuned"
    assert decide(noisy, p, "macro_f1", "best", n=500)["method"] == "svm_tuned"


# ------------------------------------------------------------------ the input size


def test_aspect_input_size_keeps_the_short_side_native():
    assert aspect_input_size((224, 224), 800 / 240) == (224, 736)
    assert aspect_input_size((224, 224), 4 / 3) == (224, 288)
    assert aspect_input_size((224, 224), 3 / 4) == (288, 224)
    assert aspect_input_size((224, 224), 1.1) == (224, 224)  # within 15% of square
    assert aspect_input_size((224, 224), 10.0) == (224, 896)  # clipped at 4:1
    assert aspect_input_size((224, 224), None) == (224, 224)


def test_median_aspect_reads_headers_and_skips_unreadable_files(tmp_path):
    from PIL import Image

    paths = []
    for i, size in enumerate([(300, 100), (320, 100), (200, 100)]):
        Image.new("RGB", size).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert median_aspect(paths + [str(tmp_path / "bad.png")]) == pytest.approx(3.0)
    assert median_aspect([str(tmp_path / "bad.png")]) is None


def test_median_aspect_passes_over_an_image_too_large_to_decode_safely(tmp_path, monkeypatch):
    """A 195-megapixel PNG stopped the run in PIL's DecompressionBombError from reading its header (before the
    extraction, which skips it with its reason)."""
    import warnings

    from PIL import Image

    Image.new("RGB", (120, 40)).save(tmp_path / "wide.png")  # 4,800 pixels: read
    Image.new("RGB", (100, 400)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40,000 pixels: over twice the limit, an error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor a DecompressionBombWarning on the screen
        assert median_aspect([str(tmp_path / "wide.png"), str(tmp_path / "bomb.png")]) == pytest.approx(3.0)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # between one and two limits: a warning in PIL
        assert median_aspect([str(tmp_path / "bomb.png")]) == pytest.approx(0.25)


def test_median_aspect_is_the_aspect_of_the_image_as_decoded_after_exif_orientation(tmp_path):
    """A phone photo held upright is stored landscape with an EXIF orientation of 6 (or 5, 7, 8): decoded (`load_rgb`
    applies the orientation) it is portrait, and its input size must be too."""
    from PIL import Image

    from transferlab.data.images import load_rgb

    paths = []
    for i, orientation in enumerate([6, 8, 5, 7, 1]):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"{i}.jpg"
        Image.new("RGB", (400, 300)).save(path, exif=exif)  # stored 400 wide, 300 high
        paths.append(str(path))
    assert load_rgb(paths[0]).size == (300, 400)  # what the backbone is fed: portrait
    assert median_aspect(paths) == pytest.approx(3 / 4)  # four of the five turned upright
    assert median_aspect(paths[-1:]) == pytest.approx(4 / 3)
    assert aspect_input_size((224, 224), median_aspect(paths)) == (288, 224)


# ------------------------------------------------------------------ the default run


def test_selection_protocol_follows_the_methods_asked_for():
    assert resolve_selection(StudyConfig(data="d")) == "repeated-cv"  # the default: methods auto
    assert resolve_selection(StudyConfig(data="d", methods=["softmax", "svm"])) == "validation"  # the seed's study
    assert resolve_selection(StudyConfig(data="d", cv=3)) == "kfold"
    assert resolve_selection(StudyConfig(data="d", methods=["svm"], selection="repeated-cv")) == "repeated-cv"
    with pytest.raises(ConfigError, match="drop --cv"):
        resolve_selection(StudyConfig(data="d", selection="repeated-cv", cv=3))
    assert resolve_selection(StudyConfig(data="d", flip_train=True)) == "repeated-cv"  # CV fits both views too
    assert resolve_selection(StudyConfig(data="d", input_size="auto", flip_train=True)) == "repeated-cv"
    assert set(registry.resolve_methods(["auto"])) == {"softmax", "svm", "svm_tuned", "logreg", "lda", "ensemble"}
    for name in registry.resolve_methods(["auto"]):
        assert registry.get(name).cv is not None or name == "softmax"  # the seed's softmax: a baseline only


def _wide_data(root):
    counts = {"train": {"ant": 16, "bee": 12, "cat": 9}, "test": {"ant": 5, "bee": 4, "cat": 4}}
    return make_imagefolder(root, counts)  # 48x40 pictures: aspect 1.2


def test_default_run_selects_by_repeated_cv_and_never_reads_test_labels(tmp_path, cache_dir, capsys):
    data = _wide_data(tmp_path / "data")
    args = ["--backbone", "test_efficientnet", "--weights", "random", "--epochs", "3", "--workers", "0"]
    out = tmp_path / "run"
    assert main(["run", str(data), "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress", *args]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["methods"]) == ["softmax", "svm", "svm_tuned", "logreg", "lda", "ensemble"]
    sel = m["selection"]
    assert sel["protocol"] == sel["cv"]["protocol"] and "stratified CV on train + valid" in sel["protocol"]
    assert (
        m["selected"] == sel["method"] and sel["left_out"] == ["softmax"] and sel["cv"]["best"] in sel["cv"]["methods"]
    )
    native = load_backbone("test_efficientnet", weights="random").input_size
    assert tuple(m["input_size"]) == aspect_input_size(native, 48 / 40) != tuple(native)  # 1.2:1 images
    for name in ("svm_tuned", "logreg", "lda"):  # the final models use the hyperparameters CV chose
        chosen = sel["cv"]["methods"][name]["params"]
        assert m["methods"][name]["tuning"]["best_params"] == chosen
    report = (out / "report.md").read_text()
    assert f"Selected: **{m['selected']}** by {sel['protocol']}" in report and "SE of gap to best" in report
    table = report.split("### Tuned hyperparameters")[1].split("\n\n")[1].splitlines()[2:]
    rows = {r.split(" | ")[0].strip("| "): r.strip("| ").split(" | ") for r in table}
    for name in ("svm_tuned", "logreg", "lda"):  # what chose the point: the CV's grid and score, not validation's
        cv = sel["cv"]["methods"][name]
        assert rows[name][2:4] == [f"{cv['point_score']['macro_f1']:.3f}", str(cv["grid_points"])]
        assert cv["grid_points"] > 1
    assert m["config"]["selection"] == "repeated-cv"
    # the results table and the terminal's show the score the choice was made on (they showed only the validation
    # split's, which can star a method with a lower number than another's)
    head, *body = [r for r in report.split("## Results (test set)")[1].split("\n\n")[1].splitlines() if r]
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[5:7] == ["CV macro-F1", "valid macro-F1"], cols
    cv_col = {
        r.strip("|").split("|")[0].strip().removesuffix(" (selected)"): r.strip("|").split("|")[5].strip()
        for r in body[1:]
    }
    assert cv_col == {n: f"{sel['scores'][n]['macro_f1']:.3f}" if n in sel["scores"] else "–" for n in m["methods"]}
    printed = capsys.readouterr().out
    assert (
        "CV" in printed and "valid macro-F1" not in printed and "selected by macro-F1 on" in " ".join(printed.split())
    )

    wrong = _shuffle_test_folders(data, tmp_path / "wrong")  # every test image in a wrong class folder
    shutil.rmtree(cache_dir / "heads")  # the CV is computed again (its cached scores are keyed without test data)
    cfg = StudyConfig(
        data=str(wrong),
        out=str(tmp_path / "run2"),
        backbone="test_efficientnet",
        weights="random",
        epochs=3,
        cache_dir=str(cache_dir),
        progress=False,
        num_workers=0,
    )
    m2 = run_study(cfg)
    assert m2["extract"]["computed"] == 0
    assert m2["selected"] == m["selected"]

    def no_times(cv):
        return {**cv, "methods": {n: {k: v for k, v in r.items() if k != "seconds"} for n, r in cv["methods"].items()}}

    assert no_times(m2["selection"]["cv"]) == no_times(sel["cv"])  # every CV score, SE and choice


def test_repeated_cv_with_no_head_to_cross_validate_is_refused_before_extraction(tmp_path, capsys):
    # --methods softmax --selection repeated-cv ran the extraction, then died in a ValueError traceback
    # ("none of  can be cross-validated on features")
    data = _wide_data(tmp_path / "data")
    argv = ["run", str(data), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main([*argv, "--methods", "softmax", "--selection", "repeated-cv"]) == 2
    err = capsys.readouterr().err
    assert "transferlab: error: --selection repeated-cv needs a head it can cross-validate" in err
    assert "--methods softmax,svm" in err and not (tmp_path / "cache").exists()  # nothing extracted


def test_flip_train_default_run_selects_by_cv_on_both_views_without_test_labels(tmp_path, cache_dir):
    data = _wide_data(tmp_path / "data")
    args = ["--backbone", "test_efficientnet", "--weights", "random", "--epochs", "3", "--workers", "0"]
    args += ["--flip-train", "--cache-dir", str(cache_dir), "--no-progress"]
    assert main(["run", str(data), "--out", str(tmp_path / "run"), *args]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    sel = m["selection"]
    assert m["config"]["selection"] == "repeated-cv" and sel["protocol"].endswith(VIEWS_NOTE)
    for name in ("svm_tuned", "logreg", "lda"):  # the final models (ViewAugmented) use the points CV chose
        chosen = sel["cv"]["methods"][name]["params"]
        assert m["methods"][name]["tuning"]["best_params"] == {f"estimator__{k}": v for k, v in chosen.items()}
    wrong = _shuffle_test_folders(data, tmp_path / "wrong")  # every test image in a wrong class folder
    shutil.rmtree(cache_dir / "heads")  # the CV is computed again
    assert main(["run", str(wrong), "--out", str(tmp_path / "run2"), *args]) == 0
    m2 = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert m2["selected"] == m["selected"]
    assert {n: r["score"] for n, r in m2["selection"]["cv"]["methods"].items()} == {
        n: r["score"] for n, r in sel["cv"]["methods"].items()
    }


def test_final_fits_shared_by_two_threads_give_the_study_of_one_thread(tmp_path, monkeypatch):
    """On 2 cores the final fits are shared by two threads (the ensemble after its members, in the study's
    thread); on 1 core all run one after the other. Both give the same models, scores and choice (fresh caches:
    nothing is loaded)."""
    import threading

    from transferlab import study
    from transferlab.evaluation import threads

    data = _wide_data(tmp_path / "data")
    where: dict[str, str] = {}
    fit_method = study.fit_method

    def spy(name, *args, **kw):
        where[name] = threading.current_thread().name
        return fit_method(name, *args, **kw)

    monkeypatch.setattr(study, "fit_method", spy)
    runs = {}
    for cores in (2, 1):
        monkeypatch.setattr(threads.os, "cpu_count", lambda cores=cores: cores)
        cfg = StudyConfig(
            data=str(data),
            out=str(tmp_path / f"run{cores}"),
            backbone="test_efficientnet",
            weights="random",
            epochs=3,
            cache_dir=str(tmp_path / f"cache{cores}"),
            progress=False,
            num_workers=0,
        )
        runs[cores] = run_study(cfg)
        seen = dict(where)
        if cores == 2:
            assert any(t.startswith("final fits") for t in seen.values()) and seen["ensemble"] == "MainThread"
        else:
            assert set(seen.values()) == {"MainThread"}

    def scores(m):
        keys = ("accuracy", "macro_f1", "balanced_accuracy", "per_class", "confusion_matrix")
        return {n: {k: r[k] for k in keys} for n, r in m["methods"].items()}

    assert runs[2]["selected"] == runs[1]["selected"] and scores(runs[2]) == scores(runs[1])


def test_seed_methods_alone_still_run_the_seed_study_on_the_validation_split(tmp_path, cache_dir):
    data = _wide_data(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["run", str(data), "--out", str(out), "--methods", "softmax,svm", "--cache-dir", str(cache_dir)]
    argv += [
        "--backbone",
        "test_efficientnet",
        "--weights",
        "random",
        "--epochs",
        "3",
        "--workers",
        "0",
        "--no-progress",
    ]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["selection"]["protocol"] == "validation split" and "cv" not in m["selection"]
    assert list(m["methods"]) == ["softmax", "svm"]


class _Counting(LogisticRegression):
    fits = 0

    def fit(self, X, y, sample_weight=None):
        type(self).fits += 1
        return super().fit(X, y, sample_weight=sample_weight)


def test_a_one_point_search_fits_its_model_once_and_scores_it_on_validation():
    """The study fits each method at the point repeated CV chose as a one-point search: one fit, not a search fit
    and a refit."""
    from transferlab.heads.search import ValidationSearch, score

    X, y = _blobs()
    search = ValidationSearch(_Counting(), [{"C": [0.1]}], search_params={"max_iter": 5})
    _Counting.fits = 0
    search.fit(X[:180], y[:180], eval_set=(X[180:], y[180:]))
    assert _Counting.fits == 1 and search.best_params_ == {"C": 0.1}
    assert search.best_estimator_.max_iter == 100  # search-only settings do not reach the final model
    assert search.best_valid_ == score(y[180:], search.predict(X[180:]))


def test_kernel_heads_step_aside_above_their_size_and_the_ensemble_votes_without_them(monkeypatch):
    """No head may need memory quadratic in the images: above KERNEL_MAX_ROWS fitting rows the RBF SVMs are not
    cross-validated (their n x n kernels would not fit), with the reason, and the ensemble averages the rest."""
    from transferlab.heads import paths

    X, y = _blobs(160, 8, 3)
    from dataclasses import replace

    for name in ("svm", "svm_tuned"):
        info = registry.get(name)
        monkeypatch.setitem(registry.METHODS, name, replace(info, cv=replace(info.cv, max_rows=100)))
    res = cross_validate(X, y, ["svm", "svm_tuned", "logreg", "ensemble"])
    assert set(res["stepped_aside"]) == {"svm", "svm_tuned"} and "n² memory" in res["stepped_aside"]["svm"]
    assert set(res["methods"]) == {"logreg", "ensemble"}
    assert res["methods"]["ensemble"]["members"] == ["logreg", "lda"]
    assert paths.KERNEL_MAX_ROWS >= 10000  # the default limit: kernels of 10k images (~1.2 GiB) still run


def test_folds_in_two_threads_give_the_same_scores_and_choice_as_in_one():
    X, y = _blobs(160, 8, 3)
    methods = ["svm", "logreg", "lda", "svm_tuned", "ensemble"]
    threads, pools = torch.get_num_threads(), threadpool_info()
    one = cross_validate(X, y, methods, n_jobs=1)
    two = cross_validate(X, y, methods, n_jobs=2)
    assert two["method"] == one["method"]
    for name in methods:
        assert two["methods"][name]["fold_scores"] == one["methods"][name]["fold_scores"], name
        assert two["methods"][name]["params"] == one["methods"][name]["params"], name
    assert torch.get_num_threads() == threads and threadpool_info() == pools  # the budget is given back


def test_input_size_auto_compares_sizes_by_cv_without_test_labels(tmp_path, cache_dir):
    data = make_imagefolder(tmp_path / "data", {"train": {"ant": 10, "bee": 9}, "test": {"ant": 4, "bee": 4}})
    args = ["--backbone", "test_efficientnet", "--weights", "random", "--epochs", "2", "--workers", "0"]
    args += ["--methods", "logreg,lda", "--input-size", "auto", "--cache-dir", str(cache_dir), "--no-progress"]
    assert main(["run", str(data), "--out", str(tmp_path / "run"), *args]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    native = load_backbone("test_efficientnet", weights="random").input_size
    sizes = [tuple(s["size"]) for s in m["input_size_selection"]["sizes"]]
    assert sizes == [aspect_input_size(native, 48 / 40), tuple(native)]
    best = max(m["input_size_selection"]["sizes"], key=lambda s: s["score"])
    assert m["input_size"] == m["input_size_selection"]["chosen"] == best["size"]
    assert m["selection"]["protocol"].endswith("stratified CV on train + valid")
    assert any(n.startswith(f"input size {'x'.join(map(str, best['size']))} chosen by") for n in m["notes"])

    wrong = _shuffle_test_folders(data, tmp_path / "wrong")  # test labels wrong: the same sizes, scores, choice
    shutil.rmtree(cache_dir / "heads")  # every size's CV is computed again
    assert main(["run", str(wrong), "--out", str(tmp_path / "run2"), *args]) == 0
    m2 = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert m2["input_size_selection"] == m["input_size_selection"] and m2["selected"] == m["selected"]


def test_input_size_auto_needs_the_repeated_cv():
    with pytest.raises(ConfigError, match="input-size auto"):
        resolve_selection(StudyConfig(data="d", input_size="auto", cv=3))
    assert resolve_selection(StudyConfig(data="d", input_size="auto", methods=["svm"])) == "repeated-cv"


def test_score_equals_scikit_learns_metrics():
    """`score` counts one confusion matrix instead of calling scikit-learn; it must give scikit-learn's numbers,
    also with predicted classes absent from y_true, classes never predicted, and string labels."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from transferlab.heads.search import score

    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 7, 200), rng.integers(0, 9, 200)) for _ in range(20)]
    cases += [(np.array(["a", "b", "b", "c"]), np.array(["b", "b", "d", "c"])), (np.array([3, 3]), np.array([3, 3]))]
    for t, p in cases:
        present = np.unique(t)
        s = score(t, p)
        assert s["macro_f1"] == pytest.approx(
            f1_score(t, p, labels=present, average="macro", zero_division=0), abs=1e-12
        )
        assert s["accuracy"] == pytest.approx(accuracy_score(t, p), abs=1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(t, p), abs=1e-12)


@pytest.mark.filterwarnings("ignore:Only one sample available")  # scikit-learn's, on the one-image class
@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("priors", [None, "uniform"])
def test_fitted_lda_is_scikit_learns_shrinkage_lda(k, priors):
    """`heads.lda.fitted_lda` computes scikit-learn's lsqr + Ledoit-Wolf LDA with one product per class and a
    Cholesky solve; it must hold the same attributes (a scikit-learn upgrade that adds one fails here) and
    numbers, also with a constant column, a one-image class, more columns than images and a single column."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from transferlab.heads.lda import fitted_lda

    rng = np.random.default_rng(k)
    for n, d in ((300, 20), (40, 64), (30, 1)):
        y = np.r_[rng.integers(0, k, n - 1), k - 1 if k > 2 else 1]
        y[:k] = np.arange(k)
        X = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, d) + y[:, None] * rng.normal(size=d)
        if d > 3:
            X[:, 3] = 2.5  # a constant column
        if n == 40:
            y[-1], y[:-1] = k, np.resize(np.arange(k), n - 1)  # class k has one image
        p = None if priors is None else np.full(len(np.unique(y)), 1 / len(np.unique(y)))
        ours = fitted_lda(X, y, p)
        ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto", priors=p).fit(X, y)
        assert set(vars(ours)) == set(vars(ref))
        for name in ("classes_", "priors_", "means_", "covariance_", "coef_", "intercept_"):
            np.testing.assert_allclose(getattr(ours, name), getattr(ref, name), rtol=1e-7, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-9)
        assert ours._n_features_out == ref._n_features_out and ours.n_features_in_ == ref.n_features_in_


def test_fitted_lda_does_not_shrink_a_single_column():
    """scikit-learn's Ledoit-Wolf leaves one column unshrunk; computed by the formula, classes of two images give
    0 / 0 and NaN coefficients (found by scikit-learn's check_fit2d_1feature on the lda head)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from transferlab.heads.lda import fitted_lda

    rng = np.random.RandomState(0)
    y = np.array([0, 0, 1, 1, 2, 2])
    for _ in range(50):  # whether 0 / 0 comes out as NaN depends on rounding: many draws
        X = rng.uniform(size=(6, 1))
        ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(X, y)
        np.testing.assert_allclose(fitted_lda(X, y).coef_, ref.coef_, rtol=1e-9)


def test_lda_with_two_images_per_class_is_not_singular():
    """Ledoit-Wolf's estimate on two rows is 0 whatever they are, so scikit-learn's shrinkage LDA fitted on two
    images per class of many classes solves a singular covariance (coefficients ~1e15, one class for every image:
    the data-efficiency curve of a 101-class run showed 0.02 macro-F1 at 2 images per class, 0.90 at 5). Such a
    class keeps its diagonal: the head stays a sensible classifier."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from transferlab.heads.lda import fitted_lda
    from transferlab.heads.search import score

    rng = np.random.default_rng(0)
    k, d = 40, 200
    centres = rng.normal(size=(k, d))
    y, yv = np.repeat(np.arange(k), 2), np.repeat(np.arange(k), 10)
    X, Xv = (centres[t] + rng.normal(size=(len(t), d)) * 0.8 for t in (y, yv))
    ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(X, y)
    assert np.abs(ref.coef_).max() > 1e8  # scikit-learn's: the degenerate case this guards
    ours = fitted_lda(X, y)
    assert np.abs(ours.coef_).max() < 1e4
    assert score(yv, ours.predict(Xv))["macro_f1"] > 0.8


def test_lda_pooled_covariances_hold_no_full_weighted_copy_of_the_rows(monkeypatch):
    """The pooled covariance is a product of the centred rows weighted per class: it is accumulated block by block,
    from float32 rows made float64 a class at a time. A fold of 40,000 images once held a float64 copy of its rows,
    the centred rows and two weighted copies (over 1.6 GiB per thread at 1280 columns); now the centred rows and
    one block, with the same numbers as one product."""
    import tracemalloc

    from transferlab.heads import lda
    from transferlab.heads.paths import lda_fold

    rng = np.random.default_rng(0)
    n, d, k = 8 * lda.BLOCK_ROWS, 64, 4
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d)).astype(np.float32)
    rules = [np.full(k, 1 / k), np.bincount(y) / n]
    points = [{"clf__class_weight": "balanced"}, {"clf__class_weight": None}]
    tracemalloc.start()
    try:
        lda_fold(X, y, X[:10], k, points)  # a CV fold: standardised float32 rows in, both prior rules
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    centred = n * d * 8
    # the standardised rows (0.5), the centred rows (1), a class's float64 copy and one weighted block; before:
    # also a float64 copy of all rows and two weighted copies (4.8)
    assert peak < 3 * centred, peak / centred
    means, Z, parts = lda.pooled_parts(X, y, rules)
    pooled = [lda.pooled_matrix(Z, w, diag) for w, diag in parts]
    monkeypatch.setattr(lda, "BLOCK_ROWS", n)  # one block: one product
    ref_means, Z, parts = lda.pooled_parts(X.astype(np.float64), y, rules)
    np.testing.assert_array_equal(means, ref_means)
    for p, (w, diag) in zip(pooled, parts):
        np.testing.assert_allclose(p, lda.pooled_matrix(Z, w, diag), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("per_class", [300, 20])
def test_lda_pooled_matrices_of_several_prior_rules_are_each_rules_own_product(per_class, monkeypatch):
    """The LDA fold path's two prior rules: with large classes each class's scatter is computed once and added to
    both rules' matrices (one product of the rows, not two), with small ones each rule's matrix is its own product;
    either way the matrices are `pooled_matrix`'s, and a rule solved by Woodbury (fewer images than half the columns)
    gets none."""
    from transferlab.heads import lda

    rng = np.random.default_rng(1)
    k, d = 3, 48
    y = np.repeat(np.arange(k), [per_class, per_class // 2, per_class * 2])
    X = rng.normal(size=(len(y), d)) * rng.uniform(0.5, 3, d) + y[:, None] * rng.normal(size=d)
    counts = np.bincount(y)
    rules = [np.full(k, 1 / k), counts / counts.sum()]
    monkeypatch.setattr(lda, "BLOCK_ROWS", 64)  # several blocks per class
    means, Z, parts = lda.pooled_parts(X, y, rules)
    expected = [lda.pooled_matrix(Z, w, diag) for w, diag in parts]
    calls = []
    real = lda.pooled_matrix
    monkeypatch.setattr(lda, "pooled_matrix", lambda *a: calls.append(1) or real(*a))
    got = lda.pooled_matrices(Z, y, parts)
    assert len(calls) == (0 if per_class == 300 else 2)  # class by class (7 x 100 rows) or one product per rule
    for cov, ref in zip(got, expected):
        np.testing.assert_allclose(cov, ref, rtol=1e-10, atol=1e-10)
    few = np.repeat(np.arange(k), 4)  # 12 images of 48 columns: Woodbury, no d x d matrix
    _, Zf, parts_f = lda.pooled_parts(X[: len(few)] + few[:, None], few, rules)
    assert lda.pooled_matrices(Zf, few, parts_f) == [None, None]


@pytest.mark.parametrize("priors", [None, "uniform"])
def test_lda_on_fewer_images_than_half_its_columns_solves_by_woodbury_with_scikit_learns_numbers(priors, monkeypatch):
    """Below half as many images as features (the data-efficiency curve's small draws, few-shot folds) the shrunk
    pooled covariance is solved through an n x n system (Woodbury) instead of d x d: the same coefficients as
    scikit-learn's and as the d x d solve, also with a constant column; with a class of two images (kept to its
    diagonal, unlike scikit-learn) the same as the d x d solve."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from transferlab.heads import lda

    rng = np.random.default_rng(3)
    n, d, k = 40, 200, 4
    y = np.repeat(np.arange(k), n // k)
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, d) + y[:, None] * rng.normal(size=d)
    X[:, 5] = 1.5  # a constant column
    two = y.copy()
    two[-2:] = k  # a class of two images
    real = lda._low_rank
    for labels in (y, two):
        p = None if priors is None else np.full(len(np.unique(labels)), 1 / len(np.unique(labels)))
        _, _, ((weight, diag),) = lda.pooled_parts(
            X, np.unique(labels, return_inverse=True)[1], [np.bincount(labels) / n]
        )
        assert real(weight, diag)
        monkeypatch.setattr(lda, "_low_rank", real)
        ours = lda.fitted_lda(X, labels, p)
        monkeypatch.setattr(lda, "_low_rank", lambda *a: False)  # the d x d Cholesky solve
        full = lda.fitted_lda(X, labels, p)
        np.testing.assert_allclose(ours.coef_, full.coef_, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(ours.intercept_, full.intercept_, rtol=1e-9, atol=1e-11)
        if labels is y:
            ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto", priors=p).fit(X, labels)
            np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(ours.intercept_, ref.intercept_, rtol=1e-7, atol=1e-9)
