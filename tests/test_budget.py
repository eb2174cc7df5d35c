"""--time-budget and --preset (issue 16): work runs cheapest first, what does not fit is skipped and said."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from transferlab.cli import main
from transferlab.config import ConfigError, with_preset
from transferlab.evaluation.budget import TimeBudget, parse_duration
from transferlab.evaluation.crossval import cross_validate, decide, plan

from .conftest import make_imagefolder


def _small_run(tmp_path, cache_dir):
    """A 3-class image folder and the CLI arguments of a quick default run on it (random tiny backbone)."""
    data = make_imagefolder(
        tmp_path / "data", {"train": {"ant": 14, "bee": 12, "cat": 10}, "test": {"ant": 4, "bee": 4, "cat": 4}}
    )
    args = ["--backbone", "test_efficientnet", "--weights", "random", "--epochs", "2", "--workers", "0"]
    args += ["--cache-dir", str(cache_dir), "--no-progress", "--input-size", "32x32"]
    return data, args


def _blobs(n=200, d=16, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = (rng.normal(size=(k, d))[y] * 1.5 + rng.normal(size=(n, d))).astype(np.float32)
    return X, y


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("10m", 600), ("1.5h", 5400), (45, 45)])
def test_durations_parse_to_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10x", "", "-5m", "0", "m", "1h30"])
def test_bad_durations_are_refused_naming_the_value(text):
    with pytest.raises(ValueError, match="time budget"):
        parse_duration(text)


def test_time_budget_flag_is_checked_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["run", "data", "--time-budget", "ten minutes"])
    assert "ten minutes" in capsys.readouterr().err


def test_a_skip_says_what_was_left_or_how_far_the_budget_was_overrun():
    # "its final fit (~0 s expected) did not fit the time budget" read as nonsense once fine-tuning had overrun it
    budget = TimeBudget(60)
    assert budget.short(12.4, "its final fit") == (
        f"its final fit (~12 s expected) did not fit the {budget.left():.0f} s left of the time budget"
    )
    spent = TimeBudget(5, start=time.perf_counter() - 65)
    assert spent.short(0.0, "its final fit") == "the time budget was spent (60 s over) before its final fit"


def test_presets_add_fine_tuning_to_the_default_run_only_for_best():
    assert with_preset(["auto"], "quick") == ["auto"]
    assert with_preset(["auto"], "best") == ["auto", "finetune"]
    assert with_preset(["auto", "finetune"], "best") == ["auto", "finetune"]
    with pytest.raises(ConfigError, match="fastest"):
        with_preset(["auto"], "fastest")


def test_a_passed_deadline_keeps_the_cheapest_method_and_drops_the_costlier_ones_with_reasons():
    X, y = _blobs()
    methods = ["svm_tuned", "logreg", "svm", "lda", "ensemble"]
    free = cross_validate(X, y, methods, n_jobs=1)
    assert free["out_of_time"] == {} and set(free["methods"]) == set(methods)
    late = cross_validate(X, y, methods, n_jobs=1, deadline=time.perf_counter() - 1)
    assert set(late["methods"]) == {"svm"}  # the seed's SVM: cost "seconds", one grid point, cheapest
    assert late["method"] == "svm"
    assert set(late["out_of_time"]) == {"svm_tuned", "logreg", "lda", "ensemble"}
    assert "past the time budget" in late["out_of_time"]["lda"]  # the first costlier one: its projection
    assert "costlier than lda" in late["out_of_time"]["svm_tuned"]
    # what did run is scored exactly as without a deadline
    assert late["methods"]["svm"]["fold_scores"] == free["methods"]["svm"]["fold_scores"]


def test_methods_scored_on_fewer_folds_are_paired_on_the_folds_they_share():
    y = np.arange(60) % 3
    p = plan(y, 0, k=3, repeats=2)
    out = {
        "a": {"score": {"macro_f1": 0.8}, "fold_scores": [0.8, 0.7, 0.9, 0.8, 0.8, 0.8]},
        "finetune": {"score": {"macro_f1": 0.9}, "fold_scores": [0.9, 0.8, 1.0]},
    }
    d = decide(out, p, "macro_f1", "best", n=60)
    assert d["method"] == "finetune"
    assert out["a"]["se"] == pytest.approx(0.0)  # differences on the first 3 folds: 0.1 each, no variance


def test_time_budget_object_reports_what_it_skipped():
    b = TimeBudget(None)
    assert b.left() == float("inf") and b.until(0.5) is None and b.summary() is None
    b = TimeBudget(10.0, start=time.perf_counter() - 20)
    assert b.left() < 0 and not b.fits(1.0)
    assert b.skip("lda", "late") == "lda skipped: late"
    assert b.summary()["skipped"] == [{"what": "lda", "why": "late"}]


def test_a_run_over_its_budget_still_selects_fits_and_reports_and_lists_what_it_skipped(tmp_path, cache_dir, capsys):
    data, args = _small_run(tmp_path, cache_dir)
    assert main(["run", str(data), "--out", str(tmp_path / "free"), *args]) == 0
    free = json.loads((tmp_path / "free" / "metrics.json").read_text())
    assert "budget" not in free and set(free["methods"]) == {"softmax", "svm", "svm_tuned", "logreg", "lda", "ensemble"}

    capsys.readouterr()
    shutil.rmtree(cache_dir / "heads")  # nothing cross-validated or fitted yet (cached CV scores cost no time)
    assert main(["run", str(data), "--out", str(tmp_path / "tight"), "--time-budget", "0.001s", *args]) == 0
    m = json.loads((tmp_path / "tight" / "metrics.json").read_text())
    printed = " ".join(capsys.readouterr().out.split())  # the terminal says what was skipped, not only the report
    assert "time budget 0.00 s: skipped " in printed and "ensemble" in printed.split("skipped ")[-1], printed
    skipped = {s["what"]: s["why"] for s in m["budget"]["skipped"]}
    assert m["budget"]["seconds"] == pytest.approx(0.001)
    assert m["selected"] in m["methods"]  # something is always selected, fitted and reported
    assert set(m["selection"]["cv"]["methods"]) == {"svm"}  # the cheapest candidate only
    assert {"logreg", "lda", "svm_tuned", "ensemble", "data-efficiency curve"} <= set(skipped)
    assert set(m["methods"]) | set(skipped) >= set(free["methods"])
    assert all(any(n.startswith(f"{w} skipped: ") for n in m["notes"]) for w in skipped)
    assert "data_efficiency" not in m
    assert (tmp_path / "tight" / "report.html").exists()


def _preset_best(tmp_path, progress: bool = False):
    """A default run with --preset best on a tiny image folder (random tiny backbone, one fine-tuning epoch)."""
    from transferlab.study import StudyConfig

    data = make_imagefolder(
        tmp_path / "data", {"train": {"ant": 6, "bee": 5, "cat": 4}, "test": {"ant": 2, "bee": 2, "cat": 2}}
    )
    return StudyConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        backbone="test_efficientnet",
        weights="random",
        input_size=(32, 40),
        preset="best",
        epochs=2,
        num_workers=0,
        progress=progress,
        data_efficiency=False,
        cache_dir=str(tmp_path / "cache"),
        finetune={"epochs": 1, "batch_size": 8, "augment": "none", "patience": 0},
    )


def test_preset_best_scores_fine_tuning_on_the_first_repeats_folds_beside_the_heads(tmp_path):
    from transferlab.study import run_study

    m = run_study(_preset_best(tmp_path))
    cv = m["selection"]["cv"]
    ft = cv["methods"]["finetune"]
    k = cv["k"]
    assert len(ft["fold_scores"]) == k and cv["repeats"] * k == len(cv["methods"]["logreg"]["fold_scores"])
    assert ft["folds"] == f"the first repeat's {k} folds" and ft["seconds"] > 0
    assert "finetune" in m["methods"] and m["selected"] in cv["methods"]
    assert "se" in ft and "finetune" not in m["selection"]["left_out"]
    assert not list((tmp_path / "run" / "methods" / "finetune" / "cv").rglob("*.ckpt"))


def test_preset_best_with_the_progress_display_on_shows_lightnings_bars_and_finishes(tmp_path, capsys):
    """Fine-tuning's Lightning progress bar (rich) cleared the study's own live display from rich's console, so
    the study's display failed when it stopped ("pop from empty list") after the whole run's work. The study's
    display now steps aside while Lightning's runs."""
    from transferlab.study import run_study

    m = run_study(_preset_best(tmp_path, progress=True))
    assert "finetune" in m["methods"] and "finetune" in m["selection"]["cv"]["methods"]
    assert "selection: " in capsys.readouterr().out  # the study's own bars were shown, before and after


def test_methods_scored_by_cv_whose_final_fit_was_skipped_are_reported_without_test_numbers(
    tmp_path, cache_dir, monkeypatch
):
    # CV finished, then the time left fitted no other final fit: the report lists every CV score, test numbers
    # only for what was fitted (it once raised KeyError for the skipped ones)
    monkeypatch.setattr(TimeBudget, "fits", lambda self, expected: False)
    data, args = _small_run(tmp_path, cache_dir)
    args += ["--time-budget", "1h"]
    assert main(["run", str(data), "--out", str(tmp_path / "run"), *args]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    scored = set(m["selection"]["cv"]["methods"])
    assert scored == {"svm", "svm_tuned", "logreg", "lda", "ensemble"}
    assert set(m["methods"]) == {m["selected"]}  # the selected method is always fitted; the rest were skipped
    skipped = {s["what"] for s in m["budget"]["skipped"]}
    assert scored - {m["selected"]} <= skipped and "softmax" in skipped
    report = (tmp_path / "run" / "report.md").read_text()
    assert all(f"| {n} |" in report for n in scored)
    assert "total" in m["timings"] and (tmp_path / "run" / "report.html").exists()


def test_a_seed_baseline_skipped_by_the_budget_is_not_the_per_class_comparison(tmp_path, cache_dir, monkeypatch):
    """The budget fitted the selected method and the seed's softmax (no CV timing: always tried) but not the seed's
    SVM, whose CV score made it the per-class baseline: the analysis raised KeyError 'svm' after all the work. The
    baseline is now the better fitted seed procedure on the validation split."""
    import transferlab.evaluation.crossval as crossval

    def logreg_wins(*a, **kw):
        return {**decide(*a, **kw), "method": "logreg"}

    monkeypatch.setattr(crossval, "decide", logreg_wins)
    monkeypatch.setattr(TimeBudget, "fits", lambda self, expected: expected == 0)
    data, args = _small_run(tmp_path, cache_dir)
    assert main(["run", str(data), "--out", str(tmp_path / "run"), *args, "--time-budget", "1h"]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["selected"] == "logreg" and "softmax" in m["methods"] and "svm" not in m["methods"]
    assert m["selection"]["baseline"] == "softmax" and m["recall_changes"]["baseline"] == "softmax"


def test_without_a_deadline_cv_runs_the_costliest_method_first_and_with_one_the_cheapest():
    """Cheapest first under a budget (they are scored whatever happens); otherwise costliest first, so both threads
    end together instead of one running the last folds of a long method alone (3.5 s of an idle core at 101
    classes)."""
    X, y = _blobs()
    for deadline, first in ((None, "svm_tuned"), (time.perf_counter() + 3600, "svm")):
        steps: list[str] = []
        cross_validate(
            X,
            y,
            ["svm", "lda", "svm_tuned"],
            plan_=plan(y, 0, k=3, repeats=1),
            n_jobs=1,
            on_step=steps.append,
            deadline=deadline,
        )
        assert steps[0].startswith(f"CV {first}: "), steps[:3]


def test_the_candidates_thread_takes_the_baselines_the_other_has_not_started(monkeypatch):
    """Final fits on 2 cores under a time budget: the seed baselines go to a second thread, the longest (the
    softmax, which has no CV timing) first; once the candidates are fitted, their thread fits the baselines still
    waiting (at 101 classes the second thread had fitted the SVM, then the softmax's 7.5 s, while the candidates
    took 5 s). `results` keeps the order it had: the candidates, then the baselines in their fit order."""
    import os
    import threading
    from types import SimpleNamespace

    import transferlab.study as study

    fitted_by: dict[str, str] = {}

    def fake_fit(name, *a, **kw):
        fitted_by[name] = threading.current_thread().name
        time.sleep(1.0 if name == "softmax" else 0.01)  # the softmax outlasts every candidate
        return {"estimator": name, "train_seconds": 0.0}

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(study, "fit_method", fake_fit)
    methods = ["softmax", "svm", "logreg", "lda"]
    timed = {"svm": 0.5, "logreg": 2.0, "lda": 0.2}
    cv = {
        "method": "logreg",
        "metric": "macro_f1",
        "k": 5,
        "repeats": 1,
        "methods": {n: {"seconds": s, "score": {"macro_f1": 0.9 - s / 10}, "params": {}} for n, s in timed.items()},
    }
    cfg = SimpleNamespace(methods=methods, seed=0)
    ds = SimpleNamespace(notes=[], classes=["a", "b"])
    shown: list[str] = []
    bar = SimpleNamespace(advance=lambda task: None, update=lambda task, **kw: shown.append(kw["description"]))
    results: dict = {}
    study._final_fits(cfg, {}, ds, None, cv, TimeBudget(3600), results, bar, 0)
    assert fitted_by["softmax"].startswith("final fits")
    assert fitted_by["svm"] == threading.current_thread().name  # taken by the candidates' thread
    assert list(results) == ["logreg", "lda", "svm", "softmax"]
    assert shown[-1] == "heads: svm"  # the bar names the baseline this thread fits


SIX = ["softmax", "svm", "svm_tuned", "logreg", "lda", "ensemble"]


def _final_fits_on_two_cores(monkeypatch, fake_fit, timed: dict, shown: list | None = None) -> dict:
    """`study._final_fits` of the default run's six methods, the ensemble selected, without a time budget, on 2
    cores, each fit by `fake_fit(name, ...)`; `timed`: the CV seconds that order the queue. Its results."""
    import os
    from types import SimpleNamespace

    import transferlab.study as study

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(study, "fit_method", fake_fit)
    cv = {
        "method": "ensemble",
        "metric": "macro_f1",
        "k": 5,
        "repeats": 1,
        "methods": {
            **{n: {"seconds": s, "score": {"macro_f1": 0.9 - s / 10}, "params": {}} for n, s in timed.items()},
            "ensemble": {"seconds": 0.0, "score": {"macro_f1": 0.95}, "params": {}},
        },
    }
    cfg = SimpleNamespace(methods=list(SIX), seed=0)
    ds = SimpleNamespace(notes=[], classes=["a", "b"])
    show = shown.append if shown is not None else (lambda _d: None)
    bar = SimpleNamespace(advance=lambda task: None, update=lambda task, **kw: show(kw["description"]))
    results: dict = {}
    study._final_fits(cfg, {}, ds, None, cv, TimeBudget(None), results, bar, 0)
    return results


def test_without_a_budget_both_threads_share_every_final_fit_and_the_ensemble_waits_for_its_members(monkeypatch):
    """Without a time budget the candidates' final fits are shared between the two threads too (brain_mri4: the
    tuned SVM, logreg, LDA and the ensemble, 1.4 s one after the other in one thread, while the other had fitted the
    baselines in 0.8 s and waited). Here logreg's fit can only end if LDA's starts while it runs, which needs
    two threads fitting candidates; the ensemble, which votes with its members' fits, comes after all of them."""
    import threading

    lda_started = threading.Event()
    log: list[tuple[str, str]] = []

    def fake_fit(name, *a, **kw):
        log.append(("start", name))
        if name == "lda":
            lda_started.set()
        if name == "logreg":
            assert lda_started.wait(timeout=10), "LDA's fit did not start while logreg's ran"
        log.append(("end", name))
        return {"estimator": name, "train_seconds": 0.0}

    results = _final_fits_on_two_cores(monkeypatch, fake_fit, {"svm": 0.5, "svm_tuned": 1.0, "logreg": 2.0, "lda": 0.2})
    assert set(results) == set(SIX)
    ends = [n for what, n in log if what == "end"]
    assert log[-2:] == [("start", "ensemble"), ("end", "ensemble")] and len(ends) == len(SIX)


def test_the_ensemble_is_fitted_once_its_members_are_not_after_the_whole_queue(monkeypatch):
    """The ensemble needs its members' fits only: it starts while the other thread still fits a baseline queued
    after them (here the seed's SVM, whose fit ends only once the ensemble's has started; before, the ensemble
    waited for the whole queue: the 0.2-0.3 s of its fit ran alone at the end of the final fits on brain_mri4)."""
    import threading

    ensemble_started = threading.Event()

    def fake_fit(name, *a, prefit=None, **kw):
        if name == "ensemble":
            assert set(prefit) >= {"svm_tuned", "logreg", "lda"}  # it votes with its members' fits
            ensemble_started.set()
        if name == "softmax":
            time.sleep(0.3)
        if name == "svm":
            assert ensemble_started.wait(timeout=10), "the ensemble waited for the seed SVM's fit"
        return {"estimator": name, "train_seconds": 0.0}

    shown: list[str] = []
    timed = {"logreg": 2.0, "svm_tuned": 1.0, "lda": 0.2, "svm": 0.1}  # the queue: softmax, members, svm
    assert set(_final_fits_on_two_cores(monkeypatch, fake_fit, timed, shown)) == set(SIX)
    # the bar names what the other thread still fits, not what is done (it listed every queued fit)
    (line,) = [d for d in shown if d.startswith("heads: ensemble")]
    assert "svm" in line and not any(m in line for m in ("svm_tuned", "logreg", "lda")), line


@pytest.mark.parametrize("failing", ["lda", "softmax"])
def test_an_error_in_either_final_fit_thread_is_raised_not_waited_on(monkeypatch, failing):
    """A fit that raises (not a ValueError, which leaves a method out) in whichever thread fits it ends the final
    fits with that error; the study's thread, waiting for the ensemble's members, does not wait forever."""
    import threading

    def fake_fit(name, *a, **kw):
        time.sleep(0.05)
        if name == failing:
            raise RuntimeError(f"{name} broke")
        return {"estimator": name, "train_seconds": 0.0}

    raised = []

    def run():
        try:
            _final_fits_on_two_cores(monkeypatch, fake_fit, {"logreg": 2.0, "svm_tuned": 1.0, "lda": 0.2, "svm": 0.1})
        except RuntimeError as exc:
            raised.append(str(exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "the final fits hung on the failed fit"
    assert raised == [f"{failing} broke"]


def test_a_member_failing_in_the_other_thread_while_the_ensemble_waits_for_it_is_raised(monkeypatch):
    """The study's thread has fitted its members and waits for one the other thread fits, which then fails: the wait
    ends with that error (the other thread's last wake-up came before its future was done, so the wait went on)."""
    import threading

    def fake_fit(name, *a, **kw):
        if not threading.current_thread().name.startswith("final fits"):
            time.sleep(0.2)  # the study's thread: slow enough that the other takes a member
        elif name != "softmax":
            time.sleep(0.8)  # the other thread's member fails once the study's thread waits for it
            raise RuntimeError(f"{name} broke")
        return {"estimator": name, "train_seconds": 0.0}

    raised = []

    def run():
        try:
            _final_fits_on_two_cores(monkeypatch, fake_fit, {"logreg": 2.0, "svm_tuned": 1.0, "lda": 0.2, "svm": 0.1})
        except RuntimeError as exc:
            raised.append(str(exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "the study's thread went on waiting for the failed fit"
    assert len(raised) == 1 and raised[0].endswith("broke")


def test_a_rerun_under_a_tight_budget_loads_what_the_cache_holds_instead_of_skipping_it(tmp_path, cache_dir):
    # A rerun with --time-budget skipped final fits and the data-efficiency curve by their expected cost although
    # the cache held them: loading costs nothing, so nothing is skipped.
    data, args = _small_run(tmp_path, cache_dir)
    assert main(["run", str(data), "--out", str(tmp_path / "free"), *args]) == 0
    free = json.loads((tmp_path / "free" / "metrics.json").read_text())
    assert main(["run", str(data), "--out", str(tmp_path / "tight"), "--time-budget", "0.001s", *args]) == 0
    m = json.loads((tmp_path / "tight" / "metrics.json").read_text())
    assert m["budget"]["skipped"] == []
    assert set(m["methods"]) == set(free["methods"]) and m["selected"] == free["selected"]
    assert all(r["train_note"].startswith("fitted head loaded from the cache") for r in m["methods"].values())
    assert m["data_efficiency"] == free["data_efficiency"]
